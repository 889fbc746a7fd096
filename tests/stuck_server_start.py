"""Imported by a fork server in tests (``gipc.set_forkserver_preload``): the server's start
takes a minute, in which it does not look at its socket."""

import time

time.sleep(60)
