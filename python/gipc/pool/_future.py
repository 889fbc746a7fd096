"""The pool's :class:`Future`: a ``concurrent.futures.Future`` whose every wait is cooperative.

(Waits on *any* executor's futures, ``gipc.wait`` and friends, are :mod:`gipc._futures`.)
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from typing import Any, Callable, List, Optional, TypeVar

import gevent
import gevent.event

from .._hub import clamp_timeout

_T = TypeVar("_T")

#: Timeouts from this many seconds on (about 31 years) mean none: libuv's timers cannot
#: represent much longer ones (nor infinity), and none will be reached anyway.
NO_TIMEOUT_FROM = 1e9


def wait_timeout(timeout: Optional[float]) -> Optional[float]:
    """A caller's timeout fit for gevent: ``None`` also for one too long for libuv."""
    if timeout is not None and timeout >= NO_TIMEOUT_FROM:
        return None
    return clamp_timeout(timeout)


class _Event(gevent.event.Event):  # type: ignore[misc]
    """A gevent Event for ``concurrent.futures``' waiters, which compute timeouts that may
    be shorter than gevent accepts without a warning."""

    def wait(self, timeout: Optional[float] = None) -> bool:
        return super().wait(wait_timeout(timeout))  # type: ignore[no-any-return]


class _CooperativeWaiters(list):  # type: ignore[type-arg]
    """``Future._waiters``: the waiters that ``concurrent.futures.wait`` and
    ``as_completed`` install, made cooperative.

    Those functions block on ``waiter.event``, a ``threading.Event``, which (unless gevent
    has monkey-patched ``threading``) blocks the whole thread, hub included. The waiter
    object is created fresh and installed on every future before anybody waits on it, so
    swapping its event for a gevent one when it is installed here makes the wait
    cooperative. The swap replaces the event of a waiter also installed on other kinds of
    futures: those set it from their own threads, which gevent's Event supports.
    """

    def append(self, waiter: Any) -> None:
        event = getattr(waiter, "event", None)
        if event is not None and not isinstance(event, gevent.event.Event):
            replacement = _Event()
            if event.is_set():
                replacement.set()
            waiter.event = replacement
        super().append(waiter)


#: The lock of every gipc Future (see Future.__init__).
_SHARED_CONDITION = threading.Condition()


class Future(cf.Future[_T]):
    """A ``concurrent.futures.Future`` whose waits are cooperative: ``result()``,
    ``exception()``, and ``concurrent.futures.wait``/``as_completed`` let other greenlets
    run. Created by :class:`ProcessPool`; completed by the pool's greenlets.

    ``cancel()`` of a task that has not started notifies waiters at once (no need to wait
    for the pool to reach it in its queue).
    """

    def __init__(self) -> None:
        # cf.Future.__init__ is not called: its Condition is the bulk of a future (eight
        # objects the garbage collector tracks, out of eleven), and a map() of 10,000 tasks
        # then filled the heap enough for two full collections of ~20 ms each, stalling
        # the event loop. The condition is only ever taken briefly, never waited on (waits
        # use the gevent event below), so every future shares one.
        self._condition = _SHARED_CONDITION
        self._state = cf._base.PENDING
        self._result = None
        self._exception = None
        self._waiters: List[Any] = _CooperativeWaiters()
        self._done_callbacks: List[Callable[["cf.Future[Any]"], object]] = []
        # Made by the first greenlet that has to wait: most futures of a busy pool are
        # done before anybody asks.
        self._done_event: Optional[gevent.event.Event] = None

    def result(self, timeout: Optional[float] = None) -> _T:
        """The call's return value (or its exception, raised), waiting cooperatively at most
        ``timeout`` seconds (``TimeoutError``)."""
        self._wait_done(timeout)
        return super().result(timeout=0)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        """The call's exception, or ``None``, waiting cooperatively like :meth:`result`."""
        self._wait_done(timeout)
        return super().exception(timeout=0)

    def cancel(self) -> bool:
        """Cancel the call if it has not started; ``True`` if it is (now) cancelled."""
        if not super().cancel():
            return False
        with self._condition:
            if self._state == cf._base.CANCELLED:
                super().set_running_or_notify_cancel()
        self._wake_waiters()
        return True

    def set_result(self, result: Any) -> None:
        """For the pool: complete the future with ``result``, wake its waiters, then run
        its done-callbacks (as ``concurrent.futures`` does: a callback that waits delayed
        every greenlet in ``result()`` until it returned)."""
        self._finish(result, None)

    def set_exception(self, exception: Optional[BaseException]) -> None:
        """For the pool: fail the future with ``exception``, wake its waiters, then run its
        done-callbacks."""
        self._finish(None, exception)

    def _finish(self, result: Any, exception: Optional[BaseException]) -> None:
        # What cf.Future.set_result/set_exception do, with the cooperative waiters woken
        # before the callbacks run (their own waiters, cf.wait's, are told inside).
        with self._condition:
            if self._state in (cf._base.CANCELLED, cf._base.CANCELLED_AND_NOTIFIED,
                               cf._base.FINISHED):
                raise cf.InvalidStateError(f"{self._state}: {self!r}")
            self._result = result
            self._exception = exception
            self._state = cf._base.FINISHED
            for waiter in self._waiters:
                if exception is None:
                    waiter.add_result(self)
                else:
                    waiter.add_exception(self)
            self._condition.notify_all()
        self._wake_waiters()
        self._invoke_callbacks()  # type: ignore[attr-defined]

    def _wake_waiters(self) -> None:
        if self._done_event is not None:
            self._done_event.set()

    def _wait_done(self, timeout: Optional[float]) -> None:
        # done() first: most futures are done before anybody asks.
        if self.done():
            return
        if self._done_event is None:
            self._done_event = gevent.event.Event()
        self._done_event.wait(wait_timeout(timeout))
