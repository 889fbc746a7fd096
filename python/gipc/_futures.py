"""Cooperative waits on any executor's futures: ``wait``, ``as_completed`` and ``result``
with the semantics of their ``concurrent.futures`` namesakes.

``concurrent.futures`` waits block the thread they run on; in a gevent program that is the
hub's thread, so every greenlet stops until the future is done. Here the waiting greenlet
sleeps on the hub instead, and each future wakes it through a done-callback. A callback
may run on any thread (an executor's worker, Dask's client thread), so it only appends the
future to a deque and sends on a gevent ``async`` watcher, which is the loop's thread-safe
wake-up: nothing polls, and no thread is spent on a wait.

A done-callback cannot be removed from a ``concurrent.futures.Future``. Once a wait is over,
its callbacks stay on the futures that had not finished and do nothing when they fire.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import sys
import time
from typing import Any, Deque, Iterable, Iterator, List, Optional, Set, TypeVar

import gevent
from gevent.hub import Hub, Waiter, get_hub
from gevent.monkey import get_original

from ._hub import (
    async_watcher,
    clamp_timeout,
    deadline_after,
    mailbox_here,
    seconds_left,
    yield_to_loop,
)

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "as_completed",
    "result",
    "wait",
]

_T = TypeVar("_T")

FIRST_COMPLETED = cf.FIRST_COMPLETED
FIRST_EXCEPTION = cf.FIRST_EXCEPTION
ALL_COMPLETED = cf.ALL_COMPLETED

#: How long ``as_completed`` may hand out finished futures (and its caller work on them)
#: before it gives the event loop a turn: 10,000 futures that finished together would
#: otherwise keep every other greenlet waiting for as long as the caller takes over them.
_SLICE = 0.0005

# The real thread primitives, also under monkey-patching: the lock below is taken by
# executor threads, and a wait belongs to an OS thread (its hub), not to a greenlet.
_allocate_lock = get_original("_thread", "allocate_lock")
_get_ident = get_original("_thread", "get_ident")


class _Completions:
    """The futures of one wait, delivered to the waiting greenlet as they finish."""

    def __init__(self, hub: Hub) -> None:
        self._thread = _get_ident()
        # Orders a callback's send against close(): a send on a closed watcher is undefined.
        self._lock = _allocate_lock()
        self._closed = False
        self._finished: Deque["cf.Future[Any]"] = collections.deque()
        self._waiter: Optional[Waiter] = None
        #: When the waiting greenlet last resumed after the loop ran (perf_counter).
        self.resumed = time.perf_counter()
        self._watcher = async_watcher(hub)
        self._watcher.start(self._wake)
        #: How a generator collected on another thread has the watcher closed here.
        self._mailbox = mailbox_here()

    def on_done(self, future: "cf.Future[Any]") -> None:
        """The done-callback; runs on whichever thread completed (or cancelled) the future,
        or at once on the caller's if the future was done already."""
        with self._lock:
            if self._closed:
                return
            self._finished.append(future)
            self._watcher.send()

    def _wake(self) -> None:
        # In the hub: several sends between two loop iterations arrive as one call.
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.switch(None)

    def take(self, timeout: Optional[float]) -> List["cf.Future[Any]"]:
        """The futures finished since the last call, in the order they finished; waits
        (cooperatively) for at least one, at most ``timeout`` seconds (then returns [])."""
        if not self._finished and (timeout is None or timeout > 0):
            self._waiter = waiter = Waiter()
            timer = gevent.Timeout(clamp_timeout(timeout))
            timer.start()
            try:
                waiter.get()
            except gevent.Timeout as expired:
                if expired is not timer:
                    raise
            finally:
                timer.close()
                self._waiter = None
                self.resumed = time.perf_counter()
        taken = []
        while self._finished:
            taken.append(self._finished.popleft())
        return taken

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._finished.clear()
        if _get_ident() == self._thread:
            self._watcher.close()
        else:
            # A generator collected on another thread: a watcher belongs to its loop's
            # thread (if that loop is gone, the watcher went with it).
            self._mailbox.post(self._watcher.close)


def _own_future_type() -> Optional[type]:
    # gipc's pool imports concurrent.futures.process and more; if nothing imported it, no
    # future can be one of its futures.
    pool = sys.modules.get(__package__ + ".pool")
    return None if pool is None else pool.Future


def _failed(future: "cf.Future[Any]") -> bool:
    return not future.cancelled() and future.exception(timeout=0) is not None


def wait(
    fs: Iterable["cf.Future[_T]"],
    timeout: Optional[float] = None,
    return_when: str = ALL_COMPLETED,
) -> "cf._base.DoneAndNotDoneFutures[_T]":
    """Wait for the futures ``fs`` (from any executors) to complete, letting other greenlets
    run; as :func:`concurrent.futures.wait`. Returns ``(done, not_done)`` sets.

    ``return_when`` is ``FIRST_COMPLETED``, ``FIRST_EXCEPTION`` (the first future to raise;
    all of them if none does) or ``ALL_COMPLETED``. ``timeout`` (seconds) bounds the wait;
    when it runs out, the sets say how far the futures got: no exception is raised. A
    cancelled future counts as completed from the moment it is cancelled.
    """
    if return_when not in (FIRST_COMPLETED, FIRST_EXCEPTION, ALL_COMPLETED):
        raise ValueError(f"Invalid return condition: {return_when!r}")
    deadline = deadline_after(timeout)
    pending: Set["cf.Future[Any]"] = set(fs)
    done: Set["cf.Future[Any]"] = set()

    def enough(newly_done: Iterable["cf.Future[Any]"]) -> bool:
        if not pending:
            return True
        if return_when == FIRST_COMPLETED:
            return bool(done)
        if return_when == FIRST_EXCEPTION:
            return any(_failed(f) for f in newly_done)
        return False

    newly = {f for f in pending if f.done()}
    done |= newly
    pending -= newly
    if enough(newly) or timeout is not None and timeout <= 0:
        return cf._base.DoneAndNotDoneFutures(done, pending)
    completions = _Completions(get_hub())
    try:
        for f in list(pending):
            f.add_done_callback(completions.on_done)
        while True:
            left = seconds_left(deadline)
            if left is not None:
                left = max(left, 0.0)
            newly = {f for f in completions.take(left) if f in pending}
            done |= newly
            pending -= newly
            if enough(newly) or left == 0:
                return cf._base.DoneAndNotDoneFutures(done, pending)
    finally:
        completions.close()


def as_completed(
    fs: Iterable["cf.Future[_T]"], timeout: Optional[float] = None
) -> Iterator["cf.Future[_T]"]:
    """Yield the futures ``fs`` (from any executors) as they complete, those done already
    first; as :func:`concurrent.futures.as_completed`, but the waits between two futures let
    other greenlets run. Each future is yielded once, also when given twice.

    ``timeout`` (seconds, counted from the first ``next()``) bounds the whole iteration:
    when it runs out with futures unfinished, ``TimeoutError`` (``concurrent.futures``')
    is raised. A cancelled future is yielded when it is cancelled.
    """
    deadline = deadline_after(timeout)
    pending: Set["cf.Future[Any]"] = set(fs)
    total = len(pending)
    finished = [f for f in pending if f.done()]
    pending.difference_update(finished)
    completions = _Completions(get_hub()) if pending else None
    try:
        if completions is not None:
            for f in list(pending):
                f.add_done_callback(completions.on_done)
        turn = time.perf_counter()
        while True:
            while finished:
                if time.perf_counter() - turn > _SLICE:
                    yield_to_loop()
                    turn = time.perf_counter()
                # Popped, not iterated: the caller may drop a future it was given, and
                # this generator should not keep it alive.
                yield finished.pop()
            if not pending:
                return
            assert completions is not None
            left = seconds_left(deadline)
            if left is not None and left <= 0:
                raise cf.TimeoutError(f"{len(pending)} (of {total}) futures unfinished")
            finished = [f for f in completions.take(left) if f in pending]
            turn = max(turn, completions.resumed)
            pending.difference_update(finished)
            finished.reverse()
    finally:
        if completions is not None:
            completions.close()


def result(future: "cf.Future[_T]", timeout: Optional[float] = None) -> _T:
    """``future.result(timeout)`` for a future from any executor, waiting cooperatively: its
    result, or the exception it raised, ``CancelledError`` if it was cancelled,
    ``TimeoutError`` if it is not done within ``timeout`` seconds."""
    own = _own_future_type()
    if own is not None and isinstance(future, own):
        # Its own wait is cooperative already, on a gevent Event: no watcher needed.
        return future.result(timeout)
    if not future.done():
        wait((future,), timeout)
    return future.result(timeout=0)
