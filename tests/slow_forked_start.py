"""Imported by a fork server in tests (``gipc.set_forkserver_preload``): every child it
forks sleeps a moment right after the fork, before its start-up code runs, so that a
signal sent to a child just started lands while it still has the server's dispositions."""

import os
import time

os.register_at_fork(after_in_child=lambda: time.sleep(0.3))
