"""Imported by a fork server in tests (``gipc.set_forkserver_preload``): the server pauses
``PAUSE`` seconds before and after each offer of a spare it sends (a start request that
reaches it meanwhile waits), and every child it forks sleeps ``CHILD_SLEEP`` seconds right
after the fork, before it reads its start request. Together they hold open the window in
which a start sent to the server before the offer is answered with that offered spare."""

import os
import time

from gipc import _forkserver_main

PAUSE = 0.4
CHILD_SLEEP = 1.5

_real_offer = _forkserver_main._offer


def _slow_offer(*args):  # type: ignore[no-untyped-def]
    time.sleep(PAUSE)
    try:
        return _real_offer(*args)
    finally:
        time.sleep(PAUSE)


_forkserver_main._offer = _slow_offer  # where serve() looks it up
os.register_at_fork(after_in_child=lambda: time.sleep(CHILD_SLEEP))
