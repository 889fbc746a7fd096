"""Everything gipc asks of gevent's hub, in one place.

The Rust core never waits: it says "would block" or "yield", and these helpers turn that into
a cooperative wait on the current thread's hub.
"""

from __future__ import annotations

import collections
import inspect
import sys
import time
from typing import Any, Callable, Deque, Dict, List, Optional

import gevent.hub as _gevent_hub
from gevent._hub_local import get_hub_class, get_hub_if_exists, get_loop, set_hub, set_loop
from gevent.hub import get_hub
from gevent.monkey import get_original

#: Per OS thread, also under monkey-patching (where ``threading.local`` is per greenlet).
_thread_local: Any = get_original("_thread", "_local")()

READ = 1  # libev/libuv event masks, the same on both loops
WRITE = 2

#: libev watcher priority of the timer that yields (-2..2, default 0): below everything else.
_YIELD_PRIORITY = -1


#: Timeouts from this long on mean "no timeout": libuv cannot represent ~1e16 s and more
#: (OverflowError), and nothing waits 30 years.
_FOREVER = 1e9


def clamp_timeout(timeout: Optional[float]) -> Optional[float]:
    """A timeout fit for gevent: never negative, none shorter than a millisecond (libuv
    timers cannot be, and gevent warns about every such timer), and none for a huge one."""
    if timeout is None or timeout >= _FOREVER:
        return None
    if timeout != timeout:
        raise ValueError("a timeout cannot be NaN")
    if timeout <= 0:
        return 0.0
    return max(timeout, 0.001)


def deadline_after(timeout: Optional[float]) -> Optional[float]:
    """The ``time.monotonic()`` value ``timeout`` seconds from now (None: no deadline)."""
    if timeout is None:
        return None
    return time.monotonic() + max(timeout, 0.0)


def remaining(deadline: Optional[float]) -> Optional[float]:
    """Seconds left until ``deadline`` (a ``time.monotonic()`` value), fit for gevent."""
    if deadline is None:
        return None
    return clamp_timeout(deadline - time.monotonic())


def io_watcher(fd: int, events: int, hub: Any = None) -> Any:
    """An io watcher on ``hub``'s loop (default: the current thread's), for ``READ`` or
    ``WRITE``; not started."""
    return (hub or get_hub()).loop.io(fd, events)


def async_watcher(hub: Any) -> Any:
    """A watcher on ``hub``'s loop that any thread may ``send()`` to; not started."""
    return hub.loop.async_()


class Mailbox:
    """Calls that other OS threads hand to one hub, run in that hub's thread at its loop's
    next turn: the only way gipc touches another thread's loop.

    gevent's ``loop.run_callback_threadsafe`` is not that on libuv: before it wakes the loop
    it starts the loop's callback watcher from the calling thread (``uv_check_start``, an
    edit of the loop's handle queue while the loop's own thread may be walking it). Two
    threads doing so crashed CPython 3.13 about once in 150 runs of
    ``test_threads_start_and_join_children_at_once``. Here the calling thread only appends
    to a deque (atomic under the GIL) and sends to an async watcher, whose ``send`` libev
    and libuv both make safe from any thread. The watcher does not keep the loop alive.

    Made in the hub's own thread (:func:`mailbox_here`), as any watcher must be.
    """

    __slots__ = ("hub", "_calls", "_watcher")

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self._calls: Deque[Callable[[], Any]] = collections.deque()
        self._watcher = hub.loop.async_(ref=False)
        self._watcher.start(self._deliver)

    def post(self, call: Callable[[], Any]) -> bool:
        """From any thread: has ``call()`` run in the hub's thread soon. False if that hub's
        loop is gone (destroyed): then nothing will run it, and what it would close went
        with the loop."""
        loop = self.hub.loop
        if loop is None or not loop.ptr:
            return False
        self._calls.append(call)
        try:
            self._watcher.send()
        except Exception:  # closed with its loop meanwhile
            return False
        return True

    def _deliver(self) -> None:
        # In the hub: several sends between two turns of the loop arrive as one call.
        calls = self._calls
        while calls:
            call = calls.popleft()
            try:
                call()
            except Exception:  # one failed clean-up must not keep the others from running
                self.hub.handle_error(call, *sys.exc_info())


def mailbox_here() -> Mailbox:
    """The mailbox of the current thread's hub (made on first use)."""
    hub = get_hub()
    mailbox: Optional[Mailbox] = getattr(_thread_local, "mailbox", None)
    if mailbox is None or mailbox.hub is not hub:
        mailbox = _thread_local.mailbox = Mailbox(hub)
    return mailbox


def seconds_left(deadline: Optional[float]) -> Optional[float]:
    """Seconds until ``deadline`` as they are (negative once past); None for no deadline."""
    if deadline is None:
        return None
    return deadline - time.monotonic()


def timer_watcher(seconds: float) -> Any:
    """A one-shot timer on the current thread's loop, not started."""
    return get_hub().loop.timer(seconds)


def run_soon(callback: Any, *args: Any) -> None:
    """Runs ``callback(*args)`` in the hub at its next turn (not inside the caller, e.g. a
    watcher's own callback, where closing that watcher is unsafe)."""
    get_hub().loop.run_callback(callback, *args)


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
    frees the watcher lists and closes the loop's own descriptors; it makes no
    ``epoll_ctl`` call that could reach the parent's registrations), so that the next
    default loop is a new one, from which the count of the parent's active watchers is
    then taken off (see ``_retire``).
    libuv: the inherited loop is left untouched, neither re-initialised nor closed. Walking
    its handles in a forked child aborted or crashed children (CPython 3.13, after long runs:
    a signal handle's close takes libuv's process-wide lock, and handles the parent was
    closing at fork time may be half torn down), and closing them through the inherited
    epoll descriptor would remove the parent's registrations. The child's first hub runs on
    a brand-new loop instead; as libuv supports child watchers on its default loop only,
    gevent's child watching (``gevent.subprocess``, ``gevent.os.waitpid``) is unavailable
    in gipc children on libuv. Plain ``subprocess`` and ``multiprocessing`` work.
    """
    from_other_thread = _adopt_main_thread()
    hub = get_hub_if_exists()
    loop = get_loop()
    if hub is not None:
        _abandoned.append(hub)
        if loop is None:
            loop = hub.loop
        set_hub(None)
    if from_other_thread:
        _fresh_hub_off_main_thread(loop)
        return
    if loop is None:
        return
    set_loop(None)
    _abandoned.append(loop)
    # The class the inherited hub's loop came from (reified when that hub was made).
    loop_class = None if _LOOP_SETTING is None else _LOOP_SETTING.value
    if loop_class is None or loop_class is _first_loop:
        stale = _retire(loop)
        # No way to step in when the next loop is made: make it now, if it needs more
        # than the default.
        if stale is None:
            set_hub(get_hub_class()(default=False))
        elif stale:
            hub = get_hub_class()()
            set_hub(hub)
            _forget_stale_watchers(hub.loop, stale)
        return
    global _inherited_loop, _loop_class
    _inherited_loop = loop
    _loop_class = loop_class
    _LOOP_SETTING.value = _first_loop


def resolve_hub_settings() -> None:
    """In a parent about to fork: the gevent settings that a forked child's first hub
    reads (its loop class and libev backend, its context formatter), resolved now. The
    first read of each imports a module, and another thread of the parent may be making
    its own first hub, in the middle of that import: a child forked then would wait for
    ever for the import's lock, held by a thread the child does not have. Here the parent
    waits for that thread instead, and the child finds the settings resolved (a read after
    the first costs a dictionary look-up)."""
    from gevent._config import config

    for name in ("loop", "libev_backend", "format_context"):
        getattr(config, name)


def _first_loop(flags: object = None, default: Optional[bool] = None) -> object:
    """Stands in for the loop class until a forked child makes its first loop: retires the
    inherited one first. (Until then ``gevent.config.loop`` reads as this function, and the
    inherited loop's own descriptors, close-on-exec, stay open.)"""
    assert _LOOP_SETTING is not None
    loop_class = _loop_class
    _LOOP_SETTING.value = loop_class  # once only: every later loop is an ordinary one
    stale = _retire(_inherited_loop)
    if stale is None:
        return loop_class(flags=flags, default=False)
    loop = loop_class(flags=flags, default=default)
    _forget_stale_watchers(loop, stale)
    return loop


def _retire(loop: Any) -> Optional[int]:
    """Makes sure the next loop is not the inherited one. Returns None on libuv, where that
    takes a non-default loop (see ``fresh_hub_after_fork``); on libev, the number of the
    parent's watchers that the next default loop will still count as active (below)."""
    if _is_libuv(loop):
        # Forget it without touching the native loop: gevent must not close it either.
        loop._ptr = None
        return None
    # libev's default loop lives in one static structure, and neither ev_loop_destroy nor
    # the ev_default_loop that re-initialises it resets its count of active watchers: the
    # next default loop starts out counting every watcher the parent had running at fork
    # time (a sleeping greenlet's timer, a server's io watcher). Such a loop never runs out
    # of work, so `gevent.wait()` never returns and gevent never says that a wait would
    # block for ever. (Every watcher gevent starts for itself is unreferenced, and
    # destroying stops them: only the parent's own are left in the count.)
    stale: int = getattr(loop, "activecnt", 0) if loop.default else 0
    loop.destroy()
    return stale


def _forget_stale_watchers(loop: Any, stale: int) -> None:
    """Takes the inherited count back off a new default libev loop (a loop made by
    ``ev_loop_new`` starts from zero: nothing to take off)."""
    if not getattr(loop, "default", False):
        return
    for _ in range(min(stale, getattr(loop, "activecnt", 0))):
        loop.unref()


def _fresh_hub_off_main_thread(loop: Any) -> None:
    """``fresh_hub_after_fork`` for a child forked from a thread other than the parent's
    main thread. The forking thread's loop (``loop``, if it had one) is not the only one
    inherited: the main thread's is, too, and on libev that is the default loop, which the
    child's hub, the main one now, would otherwise take over as it is, the parent's
    descriptors, watchers and callbacks with it. No hub of this thread refers to it, so it
    is found by asking for the default loop. Done at once (only such children pay for it).
    """
    if loop is not None:
        set_loop(None)
        _abandoned.append(loop)
        _retire(loop)
    loop_class: Any
    if _LOOP_SETTING is not None and _LOOP_SETTING.value is _first_loop:
        # This process is a child that had not made a loop yet: its parent's is pending.
        loop_class = _LOOP_SETTING.value = _loop_class
        _abandoned.append(_inherited_loop)
        _retire(_inherited_loop)
    else:
        from gevent._config import config

        loop_class = config.loop
    if loop_class.__module__.startswith("gevent.libuv"):
        # The main thread's default loop is left alone (see above); the hub gets a new one.
        set_hub(get_hub_class()(default=False))
        return
    inherited = loop_class(default=True)  # the parent's default loop, or a new one
    _abandoned.append(inherited)
    stale = _retire(inherited) or 0
    hub = get_hub_class()()
    set_hub(hub)
    _forget_stale_watchers(hub.loop, stale)


def _adopt_main_thread() -> bool:
    """True in a child forked from a thread other than the parent's main thread.

    The thread that forked is the child's main thread (``threading`` says so too), but
    gevent decides whether a hub is the main one, and so whether its loop is the default
    loop (the only one with child watchers: ``gevent.subprocess``, ``gevent.os.waitpid``),
    by comparing with the ident it recorded when ``gevent.hub`` was imported in the parent.
    A child forked from any other thread would get a non-default loop, and a hub that
    passes no ``KeyboardInterrupt`` or ``SystemExit`` to the main greenlet."""
    # The function gevent recorded MAIN_THREAD_IDENT with: the system's thread ident. Not
    # `_thread.get_ident` as seen from here, which gevent.monkey replaces with a greenlet's
    # id (a program that imports gipc after patch_all(): every forked child then took
    # itself for a fork from another thread, and had no child watchers).
    ident = _gevent_hub.get_thread_ident()
    if _gevent_hub.MAIN_THREAD_IDENT == ident:
        return False
    _gevent_hub.MAIN_THREAD_IDENT = ident
    return True


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
