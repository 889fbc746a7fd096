"""Imported by a fork server in tests (``gipc.set_forkserver_preload``): the server's start
takes a second longer, so that its caller's first start waits for it that long."""

import time

time.sleep(1.0)
