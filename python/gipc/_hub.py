"""Everything gipc asks of gevent's hub, in one place.

The Rust core never waits: it says "would block" or "yield", and these helpers turn that into
a cooperative wait on the current thread's hub.
"""

from __future__ import annotations

import gevent
from gevent._hub_local import get_hub_class, get_loop, set_hub, set_loop
from gevent.hub import get_hub

READ = 1  # libev/libuv event masks, the same on both loops
WRITE = 2

#: libev watcher priority of the timer that yields (-2..2, default 0): below everything else.
_YIELD_PRIORITY = -1


def wait_for(watcher: object) -> None:
    """Switches to the hub until ``watcher`` fires."""
    get_hub().wait(watcher)


def yield_to_loop() -> None:
    """Lets every other greenlet, due timer and ready descriptor have a turn, then resumes.

    ``gevent.sleep(0)`` only runs callbacks that are already queued; a zero-length *timer*
    needs a full turn of the loop, so I/O is polled and due timers fire first.

    "First" needs two more things. The loop's clock is cached from the start of its
    iteration, so a zero timer started after a long slice of work would be due *before*
    timers that fell due during that slice, and run ahead of them (libuv fires due timers in
    order of due time): the clock is refreshed first. And libev invokes the watchers that
    became ready in one iteration newest first, within a priority: the timer gets a lower
    priority than everything else (libuv has no priorities and ignores it). Without both, a
    ticker greenlet saw two slices of a busy reader back to back, not one.
    """
    hub = get_hub()
    loop = hub.loop
    loop.update_now()
    timer = loop.timer(0.0, priority=_YIELD_PRIORITY)
    try:
        hub.wait(timer)
    finally:
        timer.close()


def fresh_hub_after_fork() -> None:
    """In a forked child: abandon the hub, loop and greenlets cloned from the parent.

    No cloned greenlet or watcher callback may ever run here, and nothing done here may
    change the parent's kernel objects. The next ``get_hub()`` builds a fresh hub and loop,
    when the child first needs one (a child that never waits never pays for it).

    ``Hub.destroy()`` is not used: it throws into the inherited hub greenlet, and when that
    greenlet exits control passes to *its* parent, the main greenlet as it was at fork time.
    A child forked from any other greenlet would then resume the parent's program. The hub
    greenlet is therefore never switched to; its threadpool and resolver threads do not exist
    in the child, so they are dropped, not stopped.

    libev: ``gevent.reinit()`` then destroying the loop without running it is safe.
    libuv: the inherited loop is left untouched, neither re-initialised nor closed. Walking
    its handles in a forked child aborted or crashed children (CPython 3.13, after long runs:
    a signal handle's close takes libuv's process-wide lock, and handles the parent was
    closing at fork time may be half torn down), and closing them through the inherited
    epoll descriptor would remove the parent's registrations. The child runs on a brand-new
    loop instead; as libuv supports child watchers on its default loop only, gevent's child
    watching (``gevent.subprocess``, ``gevent.os.waitpid``) is unavailable in gipc children
    on libuv. Plain ``subprocess`` and ``multiprocessing`` work.
    """
    hub = get_hub()
    hub._threadpool = None
    hub._resolver = None
    hub.periodic_monitoring_thread = None
    loop = hub.loop
    libuv = _is_libuv(loop)
    if get_loop() is loop:
        set_loop(None)
    if libuv:
        # Forget it without touching the native loop: gevent must not close it either.
        loop._ptr = None
    else:
        gevent.reinit()
        loop.destroy()
    hub.loop = None
    set_hub(None)
    if libuv:
        set_hub(get_hub_class()(default=False))


def _is_libuv(loop: object) -> bool:
    return type(loop).__module__.startswith("gevent.libuv")
