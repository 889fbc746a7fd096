"""Everything gipc asks of gevent's hub, in one place.

The Rust core never waits: it says "would block" or "yield", and these helpers turn that into
a cooperative wait on the current thread's hub.
"""

from __future__ import annotations

import gevent
from typing import Any

from gevent._hub_local import get_hub_class, get_loop, set_hub, set_loop
from gevent.hub import get_hub

READ = 1  # libev/libuv event masks, the same on both loops
WRITE = 2


def wait_for(watcher: object) -> None:
    """Switches to the hub until ``watcher`` fires."""
    get_hub().wait(watcher)


def yield_to_loop() -> None:
    """Lets every other greenlet, due timer and ready descriptor have a turn, then resumes.

    ``gevent.sleep(0)`` only runs callbacks that are already queued; a zero-length *timer*
    needs a full turn of the loop, so I/O is polled and due timers fire first.
    """
    hub = get_hub()
    timer = hub.loop.timer(0.0)
    try:
        hub.wait(timer)
    finally:
        timer.close()


def fresh_hub_after_fork() -> None:
    """In a forked child: abandon the hub, loop and greenlets cloned from the parent.

    ``gevent.reinit()`` first detaches the inherited loop from the parent's kernel objects (on
    libuv the epoll descriptor is shared with the parent after ``fork``: tearing watchers down
    through it would remove the parent's registrations). Then the loop is destroyed without
    running, so no cloned greenlet or watcher callback ever runs here. The next ``get_hub()``
    builds a fresh hub and loop, when the child first needs one (a child that never waits
    never pays for it).

    ``Hub.destroy()`` is not used: it throws into the inherited hub greenlet, and when that
    greenlet exits control passes to *its* parent, the main greenlet as it was at fork time.
    A child forked from any other greenlet would then resume the parent's program. The hub
    greenlet is therefore never switched to; its threadpool and resolver threads do not exist
    in the child, so they are dropped, not stopped.
    """
    gevent.reinit()
    hub = get_hub()
    hub._threadpool = None
    hub._resolver = None
    hub.periodic_monitoring_thread = None
    loop = hub.loop
    fresh_default_loop = True
    if _is_libuv(loop):
        fresh_default_loop = _close_libuv_loop(loop)
        # Either way gevent must not tear the native loop down again (a second
        # uv_loop_close of the default loop is a double free): mark it gone.
        loop.ptr.data = _libuv_ffi().NULL
    if get_loop() is loop:
        set_loop(None)
    loop.destroy()
    hub.loop = None
    set_hub(None)
    if not fresh_default_loop:
        # libuv refused to close the inherited default loop (seen rarely: a handle the parent
        # was closing at fork time never finishes closing in the child). Rather than spin,
        # leave it behind and run the child on a brand-new loop. Only libuv's default loop
        # supports child watchers, so gevent.subprocess is unavailable in such a child.
        set_hub(get_hub_class()(default=False))


def _is_libuv(loop: object) -> bool:
    return type(loop).__module__.startswith("gevent.libuv")


def _libuv_ffi() -> Any:
    from gevent.libuv._corecffi import ffi  # type: ignore[import-not-found]

    return ffi


#: Handle types whose uv_close only touches the handle itself. A signal handle's close takes
#: libuv's process-wide signal lock, and in a forked child that can abort() the process (seen
#: on CPython 3.13 after long test runs); other types are not gevent's to begin with.
_SAFE_TO_CLOSE = frozenset(("timer", "prepare", "check", "idle", "async", "poll"))


def _close_libuv_loop(loop: Any, attempts: int = 100) -> bool:
    """Closes every handle of the inherited libuv loop and the loop itself, giving up after
    ``attempts`` turns instead of looping for ever as gevent's own teardown would. Returns
    False (leave the loop behind) if a handle is not safe to close here."""
    try:
        from gevent.libuv._corecffi import ffi, lib  # type: ignore[import-not-found]
    except ImportError:  # a gevent without the cffi backend: let gevent handle it
        return True
    ptr = loop.ptr
    if not ptr:
        return True
    lib.uv_stop(ptr)
    unsafe = []

    @ffi.callback("void(*)(uv_handle_t*,void*)")
    def close_one(handle: Any, _arg: Any) -> None:
        if lib.uv_is_closing(handle):
            return
        kind = ffi.string(lib.uv_handle_type_name(handle.type))
        if kind.decode("ascii", "replace") in _SAFE_TO_CLOSE:
            lib.uv_close(handle, ffi.NULL)
        else:
            unsafe.append(kind)

    lib.uv_walk(ptr, close_one, ffi.NULL)
    if unsafe:
        return False
    for _ in range(attempts):
        if lib.uv_loop_close(ptr) == 0:
            return True
        # Closed handles are only finalised by a turn of the loop; with every handle
        # closed, no callback of the parent's can run here.
        lib.uv_run(ptr, lib.UV_RUN_NOWAIT)
    return False
