"""Everything gipc asks of gevent's hub, in one place.

The Rust core never waits: it says "would block" or "yield", and these helpers turn that into
a cooperative wait on the current thread's hub.
"""

from __future__ import annotations

import gevent
from gevent.hub import get_hub

READ = 1  # libev/libuv event masks, the same on both loops
WRITE = 2


def wait_for(watcher: object) -> None:
    """Switches to the hub until ``watcher`` fires."""
    get_hub().wait(watcher)


def yield_to_loop() -> None:
    """Lets every other greenlet and due timer run once, then resumes the caller.

    ``gevent.sleep(0)`` only runs callbacks that are already queued; a zero-length *timer*
    needs a turn of the loop, so due timers and ready I/O are handled first.
    """
    gevent.sleep(0.0000001)


def fresh_hub_after_fork() -> None:
    """In a forked child: abandon the hub, loop and greenlets cloned from the parent.

    ``gevent.reinit()`` first detaches the inherited loop from the parent's kernel objects (on
    libuv the epoll descriptor is shared with the parent after ``fork``: tearing watchers down
    through it would remove the parent's registrations). Then the hub and its loop are
    destroyed without running, so no cloned greenlet or watcher callback ever runs here, and
    the next ``get_hub()`` builds fresh ones.
    """
    gevent.reinit()
    hub = get_hub()
    hub.destroy(destroy_loop=True)
    get_hub()
