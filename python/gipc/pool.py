"""A process pool that cooperates with gevent: a ``concurrent.futures.Executor`` whose workers
are gipc children, fed over gipc pipes.

Every wait (``Future.result``, ``Future.exception``, ``concurrent.futures.wait`` and
``as_completed`` on this pool's futures, ``map``, ``shutdown(wait=True)``) is a cooperative
wait: other greenlets run meanwhile. Bookkeeping is done by greenlets in the parent, three
per worker, so the pool must be used from the thread (and hub) that created it.

How the work moves:

* Each worker is a child started with :func:`gipc.start_process`, with two pipes that carry
  raw bytes: tasks in, outcomes out (see :mod:`gipc._outcome`). A task is a small header
  (which arguments travel separately), the pickled call, then every large ``bytes``
  argument as its own message; a large ``bytes`` return value comes back the same way. The
  transport writes and reads ``bytes`` in place, so those are never copied into a pickle.
* A greenlet per worker ("serving") takes the next task from the pool's queue, sends it and
  waits for what comes back: the outcome, the worker's end, or the task's deadline. Two
  helpers feed that wait: one reads outcomes off the pipe, one watches the process exit.
  Once a worker's tasks prove quick (under a millisecond), up to ``prefetch`` (8) more small
  ones are sent ahead, so it never waits for the parent between two tasks; a task's deadline runs
  from the moment the one before it finished. Sent-ahead tasks count as running (they
  cannot be cancelled); if the worker dies, those behind the one it was running go to a
  new worker.
* A worker that dies fails only the task it was running (:class:`WorkerCrashed`); one that
  runs past the task's timeout is killed and fails it with :class:`TaskTimeout`. Either
  way, and after ``max_tasks_per_child`` tasks, the worker is replaced when there is work.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures as cf
import itertools
import os
import pickle
import threading
import time
import weakref
from concurrent.futures.process import BrokenProcessPool
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Set,
    Tuple,
    Union,
)

import gevent
import gevent.event
import gevent.queue

from . import _outcome
from ._handles import _GIPCReader, _GIPCWriter
from ._hub import yield_to_loop
from ._hub import clamp_timeout, remaining
from ._outcome import Outcome, OutcomeReceiver, describe_exit
from ._process import _GProcess, start_process
from .exceptions import GIPCError

__all__ = [
    "BrokenProcessPool",
    "Future",
    "ProcessPool",
    "TaskTimeout",
    "WorkerCrashed",
]

_HIGHEST = pickle.HIGHEST_PROTOCOL

#: How long a stopping worker may take to exit before it is killed.
_STOP_GRACE = 10.0


class WorkerCrashed(BrokenProcessPool):
    """The worker running the task died (a signal such as SIGKILL or SIGSEGV,
    ``os._exit()``, ``sys.exit()``). Only that task fails; the pool replaces the worker
    and keeps serving. ``exitcode`` is ``-N`` for signal N; ``pid`` is the worker's."""

    def __init__(self, pid: int, exitcode: int, task: str = "the task") -> None:
        super().__init__(
            f"worker process {pid} {describe_exit(exitcode)} while running {task}"
        )
        self.pid = pid
        self.exitcode = exitcode
        self.task = task

    def __reduce__(self) -> Tuple[Any, ...]:
        return type(self), (self.pid, self.exitcode, self.task)


def _timeout_bases() -> Tuple[type, ...]:
    # concurrent.futures.TimeoutError is the builtin from Python 3.11 on; before, it is its
    # own class, and TaskTimeout should be caught by either spelling.
    if cf.TimeoutError is TimeoutError:  # type: ignore[comparison-overlap]
        return (TimeoutError,)
    return (cf.TimeoutError, TimeoutError)


class TaskTimeout(*_timeout_bases()):  # type: ignore[misc]
    """The task ran longer than its timeout; the worker running it was killed (and is
    replaced). Distinct from the ``TimeoutError`` that ``Future.result(timeout)`` raises when
    the *caller's* wait runs out, which leaves the task running."""

    def __init__(self, timeout: float, pid: int, task: str = "the task") -> None:
        super().__init__(
            f"{task} ran longer than its timeout of {timeout:g} s; "
            f"worker process {pid} was killed"
        )
        self.timeout = timeout
        self.pid = pid
        self.task = task

    def __reduce__(self) -> Tuple[Any, ...]:
        return type(self), (self.timeout, self.pid, self.task)


# --- Futures ------------------------------------------------------------------------------


class _Event(gevent.event.Event):  # type: ignore[misc]
    """A gevent Event for ``concurrent.futures``' waiters, which compute timeouts that may
    be shorter than gevent accepts without a warning."""

    def wait(self, timeout: Optional[float] = None) -> bool:
        return super().wait(clamp_timeout(timeout))  # type: ignore[no-any-return]


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


class Future(cf.Future):  # type: ignore[type-arg]
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
        self._waiters = _CooperativeWaiters()
        self._done_callbacks: List[Callable[["cf.Future[Any]"], object]] = []
        # Made by the first greenlet that has to wait: most futures of a busy pool are
        # done before anybody asks.
        self._done_event: Optional[gevent.event.Event] = None

    def result(self, timeout: Optional[float] = None) -> Any:
        self._wait_done(timeout)
        return super().result(timeout=0)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        self._wait_done(timeout)
        return super().exception(timeout=0)

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        with self._condition:
            if self._state == cf._base.CANCELLED:
                super().set_running_or_notify_cancel()
        self._wake_waiters()
        return True

    def set_result(self, result: Any) -> None:
        super().set_result(result)
        self._wake_waiters()

    def set_exception(self, exception: Optional[BaseException]) -> None:
        super().set_exception(exception)
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        if self._done_event is not None:
            self._done_event.set()

    def _wait_done(self, timeout: Optional[float]) -> None:
        # done(), not the event: done-callbacks (which may ask for the result) run inside
        # set_result, before the event is set.
        if self.done():
            return
        if self._done_event is None:
            self._done_event = gevent.event.Event()
        self._done_event.wait(clamp_timeout(timeout))


# --- Tasks on the wire ----------------------------------------------------------------------


def _encode_task(
    fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]
) -> List[bytes]:
    """The messages of one task: which arguments travel on their own, the pickled call,
    then those arguments (large ``bytes``, sent as they are). Raises what pickle raises."""
    raw_slots: List[Union[int, str]] = []
    raws: List[bytes] = []
    if any(_is_raw(a) for a in args):
        listed = list(args)
        for i, a in enumerate(listed):
            if _is_raw(a):
                raw_slots.append(i)
                raws.append(a)
                listed[i] = None
        args = tuple(listed)
    if any(_is_raw(v) for v in kwargs.values()):
        kwargs = dict(kwargs)
        for key, v in kwargs.items():
            if _is_raw(v):
                raw_slots.append(key)
                raws.append(v)
                kwargs[key] = None
    body = pickle.dumps((fn, args, kwargs), protocol=_HIGHEST)
    return [pickle.dumps(tuple(raw_slots), protocol=_HIGHEST), body, *raws]


def _is_raw(obj: Any) -> bool:
    return obj.__class__ is bytes and len(obj) >= _outcome.RAW_THRESHOLD


#: The message that tells a worker to exit.
_STOP = b""


def _receive_task(tasks: _GIPCReader) -> Union[None, Outcome, Tuple[Any, ...]]:
    """In the worker: the next call ``(fn, args, kwargs)``, ``None`` when told to stop (or
    the parent is gone), or an Outcome holding the error if the call cannot be unpickled."""
    try:
        head = tasks.get()
        if head == _STOP:
            return None
        raw_slots = pickle.loads(head)
        body = tasks.get()
        raws = [tasks.get() for _ in raw_slots]
    except EOFError:
        return None
    try:
        fn, args, kwargs = pickle.loads(body)
    except Exception as exc:
        return Outcome(exception=exc)
    if raw_slots:
        args = list(args)
        for slot, raw in zip(raw_slots, raws):
            if isinstance(slot, int):
                args[slot] = raw
            else:
                kwargs[slot] = raw
    return fn, tuple(args), kwargs


def _worker_main(
    tasks: _GIPCReader,
    outcomes: _GIPCWriter,
    initializer: Optional[Callable[..., Any]],
    initargs: Tuple[Any, ...],
) -> None:
    """A worker's life: run the initializer and report how it went, then run tasks one at a
    time and report each outcome, until told to stop or the parent is gone."""
    if initializer is not None:
        ready = _outcome.call(initializer, initargs, {})
    else:
        ready = Outcome()
    if not _outcome.send(outcomes, ready) or ready.exception is not None:
        return
    del ready
    while True:
        task = _receive_task(tasks)
        if task is None:
            return
        if isinstance(task, Outcome):
            outcome = task
        else:
            outcome = _outcome.call(*task)
        del task
        if not _outcome.send(outcomes, outcome):
            return
        # Drop the value (and an exception's frames) before waiting for the next task.
        del outcome


def _run_chunk(fn: Callable[..., Any], chunk: List[Tuple[Any, ...]]) -> List[Any]:
    return [fn(*args) for args in chunk]


def _chunks(iterable: Iterable[Tuple[Any, ...]], size: int) -> Iterator[List[Tuple[Any, ...]]]:
    it = iter(iterable)
    while True:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk


def _task_name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return f"task {name}()" if name else "the task"


# --- The pool -------------------------------------------------------------------------------


class _WorkItem:
    __slots__ = ("future", "fn", "args", "kwargs", "timeout", "started")

    def __init__(
        self,
        future: Future,
        fn: Callable[..., Any],
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
        timeout: Optional[float],
    ) -> None:
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.timeout = timeout
        #: Sent to a worker once already (its future is running): a worker that died
        #: before starting it hands it on, and it must not be marked running again.
        self.started = False


class _Gone:
    """In a worker's reply queue: the worker is gone (``reason`` says how it was noticed)."""

    __slots__ = ("reason",)

    def __init__(self, reason: Optional[BaseException]) -> None:
        self.reason = reason


#: In a worker's reply queue: the process has exited (an outcome may still follow).
_EXITED = object()
#: `_await_reply`: the deadline passed.
_TIMED_OUT = object()
#: `_next_item`: nothing in the queue right now.
_EMPTY = object()

#: ProcessPool's default ``prefetch``: how many tasks a worker may have been sent beyond the
#: one it runs, once its tasks prove quick. The next one is then waiting in its pipe when
#: it finishes, and the parent handles outcomes and sends tasks several at a time.
#: Measured, 10,000 tiny tasks on 2 workers: 0 -> 8.8k, 2 -> 13-16k, 8 -> 18-20k tasks/s.
DEFAULT_PREFETCH = 8
#: A task that took less than this (seen from the parent) counts as quick.
_QUICK_TASK = 0.001
#: Tasks are sent ahead only while all in flight fit in this many bytes, far below a pipe's
#: buffer, so sending ahead never blocks.
_AHEAD_BYTES = 32 * 1024


class _Worker:
    """The parent's side of one worker process."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.process: Optional[_GProcess] = None
        self.tasks: Optional[_GIPCWriter] = None
        self.receiver: Optional[OutcomeReceiver] = None
        #: Outcomes, and news of the worker's end, in the order they were noticed.
        self.replies: "gevent.queue.Queue[Any]" = gevent.queue.Queue()
        self.serving: Optional[gevent.Greenlet] = None
        self.helpers: List[gevent.Greenlet] = []
        self.exit_watch: Optional[gevent.Greenlet] = None
        #: Tasks sent and not answered yet, oldest (the one running) first, with the bytes
        #: each took on the pipe.
        self.in_flight: "collections.deque[Tuple[_WorkItem, int]]" = collections.deque()
        self.bytes_in_flight = 0
        #: When the oldest task in flight started running, as far as the parent can tell.
        self.head_since = 0.0
        #: Whether its last task took less than _QUICK_TASK: then tasks are sent ahead.
        self.quick = False
        self.tasks_sent = 0
        #: Died or was killed while serving: what it held goes to a new worker.
        self.lost = False

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0  # type: ignore[return-value]

    def gone(self) -> bool:
        """Whether the worker has died (checked before sending it a task)."""
        if not self.replies.empty():
            return True
        return self.process is None or self.process.exitcode is not None


_live_pools: "weakref.WeakSet[ProcessPool]" = weakref.WeakSet()


#: How long submitting a large map() may keep the event loop busy before it yields.
_SUBMIT_SLICE = 0.0005


def _submit_all(submissions: Iterator[Future]) -> List[Future]:
    """Runs the submissions, giving the event loop a turn every half millisecond: queueing
    10,000 tasks takes tens of milliseconds, which other greenlets must not wait for."""
    futures = []
    slice_start = time.perf_counter()
    for future in submissions:
        futures.append(future)
        if len(futures) % 64 == 0 and time.perf_counter() - slice_start > _SUBMIT_SLICE:
            yield_to_loop()
            slice_start = time.perf_counter()
    return futures


class ProcessPool(cf.Executor):
    """A ``concurrent.futures.Executor`` running calls in up to ``max_workers`` gipc child
    processes, every wait cooperative with gevent.

    Args:
        max_workers: the most workers at once (default: the CPUs this process may use).
            Workers start when there is work for them and are reused across tasks.
        initializer: called as ``initializer(*initargs)`` in each new worker before its
            first task. If it raises, the pool is broken: pending and later tasks fail with
            ``BrokenProcessPool``. (It and ``initargs`` reach the worker by ``fork``, so
            they need not be picklable; tasks, their arguments and results must be.)
        max_tasks_per_child: replace a worker after it has run this many tasks.
        task_timeout: default time limit, in seconds, for a task once it is sent to a
            worker; a worker that exceeds it is killed and the task fails with
            :class:`TaskTimeout`. ``submit_with_timeout`` sets it per task.
        prefetch: how many small tasks (32 KiB in all) a worker whose tasks take under a
            millisecond may be sent ahead of the one it runs (default 8). This more than
            doubles the throughput of tiny tasks; the price is that a long task arriving
            after quick ones can hold back up to this many tasks behind it while other
            workers are free, and tasks sent ahead can no longer be cancelled. ``0`` sends
            a worker one task at a time.

    The pool is driven by greenlets of the hub of the thread that created it; use it from
    that thread.
    """

    def __init__(
        self,
        max_workers: Optional[int] = None,
        initializer: Optional[Callable[..., Any]] = None,
        initargs: Tuple[Any, ...] = (),
        *,
        max_tasks_per_child: Optional[int] = None,
        task_timeout: Optional[float] = None,
        prefetch: int = DEFAULT_PREFETCH,
    ) -> None:
        if max_workers is None:
            max_workers = _usable_cpus()
        elif not isinstance(max_workers, int) or max_workers <= 0:
            raise ValueError("max_workers must be a positive int")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be callable")
        if max_tasks_per_child is not None and (
            not isinstance(max_tasks_per_child, int) or max_tasks_per_child <= 0
        ):
            raise ValueError("max_tasks_per_child must be a positive int or None")
        if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
            raise ValueError("prefetch must be an int >= 0")
        self._prefetch = prefetch
        self._max_workers = max_workers
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._max_tasks = max_tasks_per_child
        self._task_timeout = _check_timeout(task_timeout)
        # Work items in submission order; a None tells one worker to stop.
        self._queue: "gevent.queue.Queue[Optional[_WorkItem]]" = gevent.queue.Queue()
        self._pending = 0  # work items in the queue
        self._idle = 0  # workers waiting on the queue
        self._starting = 0  # workers not yet ready for their first task
        self._workers: Set[_Worker] = set()
        self._numbers = itertools.count(1)
        self._shutdown = False
        self._broken: Optional[str] = None
        self._broken_cause: Optional[BaseException] = None
        _live_pools.add(self)

    # -- The Executor API --

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Schedule ``fn(*args, **kwargs)`` and return its :class:`Future`. Never blocks."""
        return self._submit(fn, args, kwargs, self._task_timeout)

    def submit_with_timeout(
        self, timeout: Optional[float], fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> Future:
        """``submit`` with this task's own time limit (seconds, or ``None`` for none),
        instead of the pool's ``task_timeout``."""
        return self._submit(fn, args, kwargs, _check_timeout(timeout))

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: Optional[float] = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """Like the builtin ``map``, running the calls in the pool; results come in order.

        All calls are submitted at once. ``timeout`` bounds the whole iteration, from this
        call on (``TimeoutError``). ``chunksize`` > 1 sends the calls in groups of that
        many: fewer round trips for small calls (a group counts as one task for timeouts
        and ``max_tasks_per_child``). An exception raised by a call is raised when its
        result is reached; leaving the iteration early cancels what has not started.
        """
        futures, chunked = self._submit_map(fn, iterables, chunksize)
        deadline = None if timeout is None else time.monotonic() + timeout

        def results() -> Iterator[Any]:
            try:
                futures.reverse()
                while futures:
                    future = futures.pop()
                    value = future.result(remaining(deadline))
                    if chunked:
                        yield from value
                    else:
                        yield value
                    del future, value
            finally:
                for future in futures:
                    future.cancel()

        return results()

    def map_unordered(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: Optional[float] = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """``map``, but each result is yielded as soon as it is ready, whatever its
        position. Same arguments and error handling as ``map``."""
        futures, chunked = self._submit_map(fn, iterables, chunksize)
        deadline = None if timeout is None else time.monotonic() + timeout
        finished: "gevent.queue.Queue[Future]" = gevent.queue.Queue()
        for future in futures:
            future.add_done_callback(finished.put_nowait)

        def results() -> Iterator[Any]:
            try:
                for _ in range(len(futures)):
                    try:
                        future = finished.get(timeout=remaining(deadline))
                    except gevent.queue.Empty:
                        raise cf.TimeoutError() from None
                    value = future.result()
                    if chunked:
                        yield from value
                    else:
                        yield value
                    del future, value
            finally:
                for future in futures:
                    future.cancel()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submissions; workers exit once the queue is done.

        Args:
            wait: wait (cooperatively) until every pending task has finished and every
                worker has exited and been reaped, with all descriptors closed.
                Otherwise return at once; the pool's greenlets finish the work.
            cancel_futures: cancel the tasks that have not started.
        """
        if not self._shutdown:
            self._shutdown = True
            if cancel_futures:
                for item in self._drain():
                    item.future.cancel()
            for _ in range(len(self._workers)):
                self._queue.put_nowait(None)
        if wait:
            current = gevent.getcurrent()
            while True:
                serving = [
                    w.serving
                    for w in self._workers
                    if w.serving is not None and w.serving is not current
                ]
                if not serving:
                    break
                gevent.joinall(serving)
            if not self._workers:
                _live_pools.discard(self)

    # -- Internals --

    def _submit(
        self,
        fn: Callable[..., Any],
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
        timeout: Optional[float],
    ) -> Future:
        if self._broken is not None:
            raise self._broken_error()
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        future = Future()
        self._queue.put_nowait(_WorkItem(future, fn, args, kwargs, timeout))
        self._pending += 1
        self._adjust_workers()
        return future

    def _submit_map(
        self, fn: Callable[..., Any], iterables: Tuple[Iterable[Any], ...], chunksize: int
    ) -> Tuple[List[Future], bool]:
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError("chunksize must be a positive int")
        calls = zip(*iterables)
        if chunksize == 1:
            return _submit_all(self.submit(fn, *args) for args in calls), False
        chunks = _chunks(calls, chunksize)
        return _submit_all(self.submit(_run_chunk, fn, chunk) for chunk in chunks), True

    def _broken_error(self) -> BrokenProcessPool:
        error = BrokenProcessPool(self._broken)
        error.__cause__ = self._broken_cause
        return error

    def _drain(self) -> List[_WorkItem]:
        """Takes every work item out of the queue (dropping stop marks)."""
        items = []
        while True:
            try:
                item = self._queue.get_nowait()
            except gevent.queue.Empty:
                break
            if item is not None:
                items.append(item)
        self._pending = 0
        return items

    def _adjust_workers(self, handoff: Iterable[_WorkItem] = ()) -> None:
        """Starts workers while there is work that no idle or starting worker will take.
        ``handoff``: items a worker had taken but never started (it died first); they go
        to a new worker of their own."""
        handoff = list(handoff)
        if self._broken is not None:
            for item in handoff:
                self._fail(item, self._broken_error())
            return
        if handoff:
            self._add_worker(handoff)
        while (
            len(self._workers) < self._max_workers
            and self._pending > self._idle + self._starting
        ):
            self._add_worker([])

    def _add_worker(self, first_items: List[_WorkItem]) -> None:
        worker = _Worker(next(self._numbers))
        self._workers.add(worker)
        self._starting += 1
        worker.serving = gevent.spawn(self._serve, worker, first_items)

    def _next_item(self, wait: bool) -> Union[None, _WorkItem, object]:
        """The next work item from the queue; ``None`` for a stop mark; ``_EMPTY`` when
        ``wait`` is false and the queue is empty."""
        if not wait:
            try:
                item: Optional[_WorkItem] = self._queue.get_nowait()
            except gevent.queue.Empty:
                return _EMPTY
        else:
            self._idle += 1
            try:
                item = self._queue.get()
            finally:
                self._idle -= 1
        if item is not None:
            self._pending -= 1
        return item

    def _serve(self, worker: _Worker, first_items: List[_WorkItem]) -> None:
        """The serving greenlet of one worker, from its start to its end: keeps the worker
        fed (one task, or several ahead once its tasks prove quick) and completes the
        futures from its outcomes, in order."""
        replace = True  # whether the pool may need a new worker when this one ends
        held: Deque[_WorkItem] = collections.deque(first_items)  # taken, not sent yet
        abnormal = False
        stopping = False  # took a stop mark from the queue
        try:
            try:
                ready = self._start(worker)
            finally:
                self._starting -= 1
            if not ready:
                return
            while True:
                stopping = self._feed(worker, held, take_new=not stopping) or stopping
                if worker.lost:
                    return
                if not worker.in_flight:
                    if stopping and not held:
                        replace = False
                        return
                    if self._max_tasks is not None and worker.tasks_sent >= self._max_tasks:
                        return
                    continue
                if not self._finish_oldest(worker):
                    return
        except BaseException:  # killed (GreenletExit) or a bug: nothing held can be served
            abnormal = True
            raise
        finally:
            # Tasks sent to a worker that died or was killed never started if they were
            # behind the one it ran: with those it had not sent, a new worker takes them.
            handoff = [item for item, _ in worker.in_flight] + list(held)
            if abnormal and worker.in_flight and worker.process is not None:
                # Do not let it run tasks whose futures are failed below.
                worker.process.kill()
            worker.in_flight.clear()
            self._retire(worker)
            self._workers.discard(worker)
            if abnormal:
                for item in handoff:
                    self._fail(
                        item,
                        self._broken_error()
                        if self._broken
                        else BrokenProcessPool("the pool stopped serving this task unexpectedly"),
                    )
                handoff = []
            if replace:
                if stopping:
                    # The stop mark this worker took was meant for whoever serves on.
                    self._queue.put_nowait(None)
                self._adjust_workers(handoff)

    def _start(self, worker: _Worker) -> bool:
        """Forks the worker and waits for its initializer; False if the pool is broken."""
        tasks_r, tasks_w = _outcome.outcome_pipe()  # raw bytes, like the outcome pipe
        outcomes_r, outcomes_w = _outcome.outcome_pipe()
        try:
            process = start_process(
                _worker_main,
                args=(tasks_r, outcomes_w, self._initializer, self._initargs),
                name=f"gipc-pool-worker-{worker.number}",
            )
        except BaseException as exc:
            for handle in (tasks_r, tasks_w, outcomes_r, outcomes_w):
                if not handle.closed:
                    handle._release()
            if isinstance(exc, Exception):
                self._set_broken(f"a worker process could not be started: {exc}", exc)
                return False
            raise
        worker.process = process
        worker.tasks = tasks_w
        worker.receiver = OutcomeReceiver(outcomes_r)
        worker.exit_watch = gevent.spawn(self._watch_exit, worker)
        worker.helpers = [gevent.spawn(self._read_outcomes, worker), worker.exit_watch]
        reply = self._await_reply(worker, None)
        if isinstance(reply, Outcome):
            if reply.exception is None:
                return True
            self._set_broken(
                f"the initializer failed in worker process {process.pid}: "
                f"{type(reply.exception).__name__}: {reply.exception}",
                reply.exception,
            )
            return False
        code = self._reap(worker)
        self._set_broken(
            f"worker process {process.pid} {describe_exit(code)} while starting "
            "(in the initializer)",
            None,
        )
        return False

    def _feed(self, worker: _Worker, held: Deque[_WorkItem], take_new: bool) -> bool:
        """Sends the worker what it may take now: a task when it has none, more while its
        tasks are quick and what is in flight stays small; from ``held`` first, then (if
        ``take_new``) from the queue. Returns True when it took a stop mark. Sets
        ``worker.lost`` if the worker turns out to be gone."""
        while self._may_send_more(worker):
            if held:
                item = held.popleft()
            elif not take_new:
                break
            else:
                got = self._next_item(wait=not worker.in_flight)
                if got is _EMPTY:
                    break
                if got is None:
                    return True
                item = got  # type: ignore[assignment]
            if not worker.in_flight and worker.gone():
                # It died while idle: the item was never sent, so it is not the item's
                # fault. A new worker takes it.
                held.appendleft(item)
                worker.lost = True
                break
            if not self._send(worker, item, held):
                break
        return False

    def _may_send_more(self, worker: _Worker) -> bool:
        if worker.lost:
            return False
        if self._max_tasks is not None and worker.tasks_sent >= self._max_tasks:
            return False
        count = len(worker.in_flight)
        return count == 0 or (worker.quick and count <= self._prefetch)

    def _send(self, worker: _Worker, item: _WorkItem, held: Deque[_WorkItem]) -> bool:
        """Sends one item; False when feeding must stop (the item went back to ``held``
        to wait until nothing is in flight, or the worker is gone)."""
        future = item.future
        if not item.started:
            if future.cancelled() or not future.set_running_or_notify_cancel():
                return True
        item.started = True
        try:
            messages = _encode_task(item.fn, item.args, item.kwargs)
        except Exception as exc:
            future.set_exception(exc)
            return True
        size = sum(len(m) for m in messages)
        if worker.in_flight and worker.bytes_in_flight + size > _AHEAD_BYTES:
            # Sending it now might block, and this greenlet must stay free to watch the
            # running task's deadline: it goes once the worker has caught up.
            held.appendleft(item)
            return False
        assert worker.tasks is not None
        first = not worker.in_flight
        if first:
            worker.head_since = time.monotonic()
        timer = gevent.Timeout(clamp_timeout(item.timeout) if first else None)
        timer.start()
        try:
            worker.tasks.put_many(messages)
            reply: Any = None
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            reply = _TIMED_OUT
        except (OSError, GIPCError) as exc:
            reply = _Gone(exc)
        finally:
            timer.close()
        del messages
        worker.in_flight.append((item, size))
        worker.bytes_in_flight += size
        worker.tasks_sent += 1
        if reply is not None:
            self._end_oldest(worker, reply)
            return False
        return True

    def _finish_oldest(self, worker: _Worker) -> bool:
        """Waits for the outcome of the task the worker is running and completes its
        future; False if the worker is gone or was killed (it must be replaced)."""
        item, _ = worker.in_flight[0]
        deadline = None if item.timeout is None else worker.head_since + item.timeout
        reply = self._await_reply(worker, deadline)
        if not isinstance(reply, Outcome):
            self._end_oldest(worker, reply)
            return False
        _, size = worker.in_flight.popleft()
        worker.bytes_in_flight -= size
        now = time.monotonic()
        worker.quick = now - worker.head_since < _QUICK_TASK
        worker.head_since = now
        if reply.exception is None:
            item.future.set_result(reply.value)
        else:
            item.future.set_exception(reply.exception)
        return True

    def _end_oldest(self, worker: _Worker, reply: Any) -> None:
        """The worker timed out or died running its oldest task in flight: fail that
        task (after killing the worker, for a timeout), reap the worker, and mark it lost."""
        worker.lost = True
        item, _ = worker.in_flight.popleft()
        name = _task_name(item.fn)
        if reply is _TIMED_OUT:
            assert item.timeout is not None
            worker.process.kill()  # type: ignore[union-attr]
            self._reap(worker)
            item.future.set_exception(TaskTimeout(item.timeout, worker.pid, name))
        else:
            code = self._reap(worker, reply)
            item.future.set_exception(WorkerCrashed(worker.pid, code, name))

    def _await_reply(self, worker: _Worker, deadline: Optional[float]) -> Any:
        """The worker's next outcome, ``_TIMED_OUT``, or a ``_Gone``."""
        try:
            reply = worker.replies.get(timeout=remaining(deadline))
        except gevent.queue.Empty:
            # Late by a hair? Use what has arrived rather than kill the worker for it.
            try:
                reply = worker.replies.get_nowait()
            except gevent.queue.Empty:
                return _TIMED_OUT
        if reply is _EXITED:
            # An outcome sent just before the end may still be on its way.
            try:
                reply = worker.replies.get(timeout=_outcome.EXIT_GRACE)
            except gevent.queue.Empty:
                return _Gone(None)
            if reply is _EXITED:
                return _Gone(None)
        return reply

    def _read_outcomes(self, worker: _Worker) -> None:
        """Helper greenlet: outcomes off the pipe into the reply queue, then news of EOF."""
        receiver = worker.receiver
        assert receiver is not None
        while True:
            try:
                outcome = receiver.receive()
            except Exception as exc:  # EOFError: the worker is gone; GIPCError: torn message
                worker.replies.put_nowait(_Gone(exc))
                return
            worker.replies.put_nowait(outcome)
            del outcome

    def _watch_exit(self, worker: _Worker) -> int:
        """Helper greenlet: tells the serving greenlet when the process has exited, and
        returns its exit code."""
        code = _outcome.wait_for_exit(worker.process)
        worker.replies.put_nowait(_EXITED)
        return code

    def _reap(self, worker: _Worker, gone: Optional[_Gone] = None) -> int:
        """Waits for the worker to exit (killing it if it is not on its way out) and returns
        its exit code."""
        process, watch = worker.process, worker.exit_watch
        assert process is not None and watch is not None
        if gone is not None and not isinstance(gone.reason, (EOFError, type(None))):
            # A corrupt message, or a failed write: whatever the worker is doing, it is no
            # longer talking to us.
            process.kill()
        watch.join(_STOP_GRACE)
        if not watch.ready():
            process.kill()
            watch.join()
        return watch.value  # type: ignore[no-any-return]

    def _retire(self, worker: _Worker) -> None:
        """Stops the worker if it is still running, reaps it and closes everything the
        parent held for it."""
        process = worker.process
        if process is None:
            return
        tasks = worker.tasks
        if tasks is not None and not tasks.closed:
            if process.exitcode is None:
                try:
                    with gevent.Timeout(_STOP_GRACE, False):
                        tasks.put(_STOP)
                except (OSError, GIPCError):
                    pass
            try:
                tasks.close()
            except GIPCError:
                tasks._release()
        self._reap(worker)
        gevent.killall(worker.helpers)
        if worker.receiver is not None:
            worker.receiver.close()
        process.close()

    def _set_broken(self, message: str, cause: Optional[BaseException]) -> None:
        """Like ProcessPoolExecutor: a failed initializer breaks the pool. Pending tasks
        fail, new ones are refused; running ones finish and every worker then stops."""
        if self._broken is not None:
            return
        self._broken = message
        self._broken_cause = cause
        for item in self._drain():
            self._fail(item, self._broken_error())
        for _ in range(len(self._workers)):
            self._queue.put_nowait(None)

    @staticmethod
    def _fail(item: _WorkItem, error: BaseException) -> None:
        future = item.future
        if future.done():
            return
        if future.running() or future.set_running_or_notify_cancel():
            future.set_exception(error)

    def _shutdown_at_exit(self) -> None:
        """At interpreter exit, for a pool never shut down: shut it down, waiting, as
        ``ProcessPoolExecutor`` does. This runs before ``multiprocessing``'s exit handler
        (registered earlier, so called later), which would otherwise join the workers while
        the pool's greenlets stop and close them."""
        try:
            self.shutdown(wait=True)
        except Exception:  # at exit, a failure here must not hide the program's own
            pass

    def __repr__(self) -> str:
        state = "broken" if self._broken else "shut down" if self._shutdown else "running"
        return (
            f"<ProcessPool {state} workers={len(self._workers)}/{self._max_workers} "
            f"pending={self._pending}>"
        )


def _check_timeout(timeout: Optional[float]) -> Optional[float]:
    if timeout is not None and not timeout > 0:
        raise ValueError("a task timeout must be a positive number of seconds or None")
    return timeout


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:
        return os.cpu_count() or 1


@atexit.register
def _shut_pools_down_at_exit() -> None:
    for pool in list(_live_pools):
        pool._shutdown_at_exit()
