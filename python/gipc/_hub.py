"""Everything gipc asks of gevent's hub, in one place.

The Rust core never waits: it says "would block" or "yield", and these helpers turn that into
a cooperative wait on the current thread's hub.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional

from gevent._hub_local import get_hub_class, get_hub_if_exists, get_loop, set_hub, set_loop
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
    change the parent's kernel objects. The next ``get_hub()`` builds a fresh hub and loop.
    That is when the inherited native loop is dealt with, too (below): a child that never
    waits on anything never pays for either. A parent without a hub or loop leaves nothing
    to abandon.

    ``Hub.destroy()`` is not used: it throws into the inherited hub greenlet, and when that
    greenlet exits control passes to *its* parent, the main greenlet as it was at fork time.
    A child forked from any other greenlet would then resume the parent's program. The hub
    greenlet is therefore never switched to (nor deallocated: that would throw into it too).
    Its threadpool and resolver threads do not exist in the child; they are dropped with it.

    libev: the inherited default loop is destroyed without being run (``ev_loop_destroy``
    stops the watchers in memory and closes the loop's own descriptors; it makes no
    ``epoll_ctl`` call that could reach the parent's registrations), so that the next
    default loop is a new one.
    libuv: the inherited loop is left untouched, neither re-initialised nor closed. Walking
    its handles in a forked child aborted or crashed children (CPython 3.13, after long runs:
    a signal handle's close takes libuv's process-wide lock, and handles the parent was
    closing at fork time may be half torn down), and closing them through the inherited
    epoll descriptor would remove the parent's registrations. The child's first hub runs on
    a brand-new loop instead; as libuv supports child watchers on its default loop only,
    gevent's child watching (``gevent.subprocess``, ``gevent.os.waitpid``) is unavailable
    in gipc children on libuv. Plain ``subprocess`` and ``multiprocessing`` work.
    """
    hub = get_hub_if_exists()
    loop = get_loop()
    if hub is not None:
        _abandoned.append(hub)
        if loop is None:
            loop = hub.loop
        set_hub(None)
    if loop is None:
        return
    set_loop(None)
    _abandoned.append(loop)
    # The class the inherited hub's loop came from (reified when that hub was made).
    loop_class = None if _LOOP_SETTING is None else _LOOP_SETTING.value
    if loop_class is None or loop_class is _first_loop:
        if _retire(loop):
            set_hub(get_hub_class()(default=False))
        return
    global _inherited_loop, _loop_class
    _inherited_loop = loop
    _loop_class = loop_class
    _LOOP_SETTING.value = _first_loop


def _first_loop(flags: object = None, default: Optional[bool] = None) -> object:
    """Stands in for the loop class until a forked child makes its first loop: retires the
    inherited one first. (Until then ``gevent.config.loop`` reads as this function, and the
    inherited loop's own descriptors, close-on-exec, stay open.)"""
    assert _LOOP_SETTING is not None
    loop_class = _loop_class
    _LOOP_SETTING.value = loop_class  # once only: every later loop is an ordinary one
    if _retire(_inherited_loop):
        default = False
    return loop_class(flags=flags, default=default)


def _retire(loop: Any) -> bool:
    """Makes sure the next loop is not the inherited one; True on libuv, where that takes a
    non-default loop (see ``fresh_hub_after_fork``)."""
    if _is_libuv(loop):
        # Forget it without touching the native loop: gevent must not close it either.
        loop._ptr = None
        return True
    loop.destroy()
    return False


def _find_loop_setting() -> Any:
    """gevent's ``loop`` setting, when the hub looks its loop class up there each time it
    makes a loop (``Hub.loop_class``): then the first loop a child makes can be swapped for
    one that first retires the inherited loop. Otherwise None, and a child retires it at
    once."""
    try:
        from gevent._config import config
        from gevent.hub import Hub

        setting = config.settings["loop"]
        hub_asks_config = isinstance(inspect.getattr_static(Hub, "loop_class"), property)
    except (ImportError, AttributeError, KeyError):
        return None
    if not hub_asks_config or not isinstance(getattr(setting, "value", None), (type, type(None))):
        return None
    return setting


#: Everything inherited from the parent that must never be deallocated in the child.
_abandoned: List[object] = []

_LOOP_SETTING = _find_loop_setting()
#: In a forked child until it makes its first loop: the loop to retire, the class to use.
_inherited_loop: Any = None
_loop_class: Any = None

#: Whether a loop type is libuv's, by type: asking a type for its module builds a new string
#: each time, and in a forked child every new object costs a copied page.
_libuv_loop_types: Dict[type, bool] = {}


def _is_libuv(loop: object) -> bool:
    kind = type(loop)
    known = _libuv_loop_types.get(kind)
    if known is None:
        known = _libuv_loop_types[kind] = kind.__module__.startswith("gevent.libuv")
    return known
