"""ProcessPool: the queue of work items, how many workers serve it, shutdown, and the broken
state. Each worker's own life (start, feed, outcomes, end) is :mod:`gipc.pool._worker`'s."""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import itertools
import logging
import multiprocessing.util as mp_util
import os
import pickle
import time
import weakref
from concurrent.futures.process import BrokenProcessPool
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Set,
    Tuple,
    TypeVar,
    Union,
)

import gevent
import gevent.queue

from .._handles import Decoder, Encoder, _pickle_dumps, get_default_codec
from .._handles import _resolve as _resolve_pipe_codec
from .._hub import deadline_after, remaining, yield_to_loop
from .._process import resolve_start_method
from ..exceptions import GIPCTypeError
from ._future import NO_TIMEOUT_FROM, Future
from ._queue import EMPTY, TaskQueue
from ._task import WorkItem
from ._worker import Worker, WorkerSettings

if TYPE_CHECKING:
    # For the type checker only (annotations are not evaluated at run time here), so 3.9
    # needs no typing_extensions at run time.
    from typing_extensions import ParamSpec

    _P = ParamSpec("_P")

_T = TypeVar("_T")

#: Worker start failures, at debug level (see gipc's ``_process``).
_log = logging.getLogger("gipc")

#: ProcessPool's default ``prefetch``: how many tasks a worker may have been sent beyond the
#: one it runs, once its tasks prove quick. The next one is then waiting in its pipe when
#: it finishes, and the parent handles outcomes and sends tasks several at a time.
#: Measured, 10,000 tiny tasks on 2 workers: 0 -> 8.8k, 2 -> 13-16k, 8 -> 18-20k tasks/s.
DEFAULT_PREFETCH = 8
#: Workers that could not be started (fork failed, or the process died before it was
#: ready) are replaced, after a pause that doubles each time from the first value up to the
#: second; this many failures in a row break the pool.
_START_RETRY_DELAY = 0.05
_START_RETRY_MAX_DELAY = 1.0
_MAX_START_FAILURES = 6


_live_pools: "weakref.WeakSet[ProcessPool]" = weakref.WeakSet()

#: The process whose multiprocessing exit handler shuts its pools down (see
#: ``_shut_down_at_exit_here``).
_exit_hook_pid: Optional[int] = None


def _shut_down_at_exit_here() -> None:
    """Makes this process's pools shut down when it exits, also where ``atexit`` does not
    run: a gipc (or multiprocessing) child runs only multiprocessing's exit handler, which
    joins the pool's workers; with no one to tell them to stop, the child never ended. A
    finalizer of that handler runs before it joins them (once per process: a forked child
    starts with an empty list of finalizers)."""
    global _exit_hook_pid
    if _exit_hook_pid != os.getpid():
        _exit_hook_pid = os.getpid()
        mp_util.Finalize(None, _shut_pools_down_at_exit, exitpriority=10)


#: How long submitting a large map() may keep the event loop busy before it yields.
_SUBMIT_SLICE = 0.0005


def _submit_all(submissions: Iterator["Future[Any]"]) -> List["Future[Any]"]:
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


def _check_picklable(settings: WorkerSettings) -> None:
    """What a worker that is not forked receives must pickle: refused when the pool is
    made, by name, not when its first worker fails to start."""
    for what, obj in (
        ("initializer", settings.initializer),
        ("initargs", settings.initargs),
        ("decoder", settings.loads),
    ):
        try:
            pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise GIPCTypeError(
                f"with start method {settings.start_method!r}, the pool's {what} must be "
                f"picklable, and {obj!r:.80} is not ({exc})"
            ) from exc


class ProcessPool(cf.Executor):
    """A ``concurrent.futures.Executor`` running calls in up to ``max_workers`` gipc child
    processes, every wait cooperative with gevent.

    Args:
        max_workers: the most workers at once (default: the CPUs this process may use).
            Workers start when there is work for them and are reused across tasks.
        initializer: called as ``initializer(*initargs)`` in each new worker before its
            first task. If it raises, the pool is broken: pending and later tasks fail with
            ``BrokenProcessPool``. (With the fork start method it and ``initargs`` reach
            the worker by ``fork`` and need not be picklable; tasks, their arguments and
            results must be.)
        max_tasks_per_child: replace a worker after it has run this many tasks.
        task_timeout: default time limit, in seconds, for a task once it is sent to a
            worker; a worker that exceeds it is killed and the task fails with
            :class:`TaskTimeout`. ``submit_with_timeout`` sets it per task.
        prefetch: how many small tasks (32 KiB in all) a worker whose tasks take under a
            millisecond may be sent ahead of the one it runs (default 8), while no
            other worker is idle. This more than doubles the throughput of tiny tasks.
            Tasks sent ahead and not started are taken back for a worker that becomes
            free; they can no longer be cancelled. ``0`` sends a worker one task at a
            time.
        start_method: how workers are started, as for :func:`gipc.start_process`
            ("fork", "forkserver" or "spawn"; ``None``: the program's ``multiprocessing``
            start method if it set one, else fork on Linux), fixed when the pool is made.
            With "forkserver" and "spawn", ``initializer``, ``initargs`` and a custom
            ``decoder`` must pickle.
        mp_context: a ``multiprocessing`` context, whose start method is used when
            ``start_method`` is None (as for :func:`gipc.start_process`).
        encoder: how each call (the function and its arguments) is encoded for a worker:
            ``'default'`` (pickle, or what :func:`gipc.set_default_codec` set when the pool
            was made) or a callable, as for :func:`gipc.pipe`; e.g. ``cloudpickle.dumps``
            to send lambdas and local functions. Results come back pickled. Bad values
            raise ``GIPCTypeError``/``GIPCValueError``.
        decoder: how a worker decodes each call: ``'default'`` or a callable.

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
        encoder: Encoder = "default",
        decoder: Decoder = "default",
        start_method: Optional[str] = None,
        mp_context: Any = None,
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
        default_encoder, default_decoder = get_default_codec()
        dumps = _resolve_codec(encoder, "encoder", default_encoder)
        self._settings = WorkerSettings(
            initializer=initializer,
            initargs=tuple(initargs),
            # None: pickle, called directly (the common case, and the fastest).
            dumps=None if dumps is _pickle_dumps else dumps,
            loads=_resolve_codec(decoder, "decoder", default_decoder),
            prefetch=prefetch,
            max_tasks=max_tasks_per_child,
            start_method=resolve_start_method(start_method, mp_context),
        )
        if self._settings.start_method != "fork":
            _check_picklable(self._settings)
        self._max_workers = max_workers
        self._task_timeout = _check_timeout(task_timeout)
        # Work items in submission order; a None tells one worker to stop.
        self._queue = TaskQueue()
        self._pending = 0  # work items in the queue
        self._idle = 0  # workers waiting on the queue
        self._starting = 0  # workers not yet ready for their first task
        self._start_failures = 0  # workers in a row that could not be started
        self._workers: Set[Worker] = set()
        self._numbers = itertools.count(1)
        self._shutdown = False
        self._broken: Optional[str] = None
        self._broken_cause: Optional[BaseException] = None
        #: The process it belongs to (a forked child inherits the object, not the pool).
        self._pid = os.getpid()
        _live_pools.add(self)
        _shut_down_at_exit_here()

    # -- The Executor API --

    def submit(
        self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> "cf.Future[_T]":
        """Schedule ``fn(*args, **kwargs)`` and return its :class:`Future`. Never blocks.

        (Typed as the ``concurrent.futures.Future`` it is, as every executor's ``submit``:
        code written for another executor type-checks unchanged.)"""
        return self._submit(fn, args, kwargs, self._task_timeout)

    def submit_with_timeout(
        self, timeout: Optional[float], fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> "cf.Future[_T]":
        """``submit`` with this task's own time limit (seconds, or ``None`` for none),
        instead of the pool's ``task_timeout``."""
        return self._submit(fn, args, kwargs, _check_timeout(timeout))

    def map(
        self,
        fn: Callable[..., _T],
        *iterables: Iterable[Any],
        timeout: Optional[float] = None,
        chunksize: int = 1,
    ) -> Iterator[_T]:
        """Like the builtin ``map``, running the calls in the pool; results come in order.

        All calls are submitted at once. ``timeout`` bounds the whole iteration, from this
        call on (``TimeoutError``). ``chunksize`` > 1 sends the calls in groups of that
        many: fewer round trips for small calls (a group counts as one task for timeouts
        and ``max_tasks_per_child``). An exception raised by a call is raised when its
        result is reached; leaving the iteration early cancels what has not started.
        """
        futures, chunked = self._submit_map(fn, iterables, chunksize)
        deadline = _deadline(timeout)

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
        fn: Callable[..., _T],
        *iterables: Iterable[Any],
        timeout: Optional[float] = None,
        chunksize: int = 1,
    ) -> Iterator[_T]:
        """``map``, but each result is yielded as soon as it is ready, whatever its
        position. Same arguments and error handling as ``map``."""
        futures, chunked = self._submit_map(fn, iterables, chunksize)
        deadline = _deadline(timeout)
        finished: "gevent.queue.Queue[Future[Any]]" = gevent.queue.Queue()
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
                # Those handed back by a worker cannot be cancelled: they still run.
                self._requeue([item for item in self._drain() if not item.future.cancel()])
            for _ in range(len(self._workers)):
                self._queue.put(None)
        if wait:
            current = gevent.getcurrent()
            if any(w.serving is current for w in self._workers):
                # A done-callback runs in the greenlet that serves a worker, which cannot
                # wait for itself (two such callbacks waited for each other for ever).
                # concurrent.futures raises the same way; the shutdown goes on.
                raise RuntimeError(
                    "cannot wait for a pool to shut down from one of its own done-callbacks "
                    "(they run in the greenlets that serve its workers): the shutdown is "
                    "started, wait for it elsewhere, or call shutdown(wait=False) there"
                )
            while True:
                serving = [w.serving for w in self._workers]
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
    ) -> "Future[Any]":
        if self._broken is not None:
            raise self._broken_error()
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        future: Future[Any] = Future()
        self._queue.put(WorkItem(future, fn, args, kwargs, timeout))
        self._pending += 1
        self._adjust_workers()
        return future

    def _submit_map(
        self, fn: Callable[..., Any], iterables: Tuple[Iterable[Any], ...], chunksize: int
    ) -> Tuple[List["Future[Any]"], bool]:
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError("chunksize must be a positive int")
        calls = zip(*iterables)
        if chunksize == 1:
            timeout = self._task_timeout
            submissions = (self._submit(fn, args, {}, timeout) for args in calls)
            return _submit_all(submissions), False
        chunks = _chunks(calls, chunksize)
        return _submit_all(
            self._submit(_run_chunk, (fn, chunk), {}, self._task_timeout) for chunk in chunks
        ), True

    def _broken_error(self) -> BrokenProcessPool:
        error = BrokenProcessPool(self._broken)
        error.__cause__ = self._broken_cause
        return error

    def _drain(self) -> List[WorkItem]:
        """Takes every work item out of the queue (dropping stop marks)."""
        items: List[WorkItem] = []
        while True:
            item = self._queue.get_nowait()
            if item is EMPTY:
                break
            if isinstance(item, WorkItem):
                items.append(item)
        self._pending = 0
        return items

    def _requeue(self, items: List[WorkItem]) -> None:
        """Puts back, ahead of everything else, tasks taken earlier that no worker started
        (a worker handed them back, or died first)."""
        if not items:
            return
        if self._broken is not None:
            for item in items:
                item.fail(self._broken_error())
            return
        self._queue.put_front(items)
        self._pending += len(items)

    def _adjust_workers(self) -> None:
        """Starts workers while there is work that no idle or starting worker will take."""
        if self._broken is not None:
            return
        while (
            len(self._workers) < self._max_workers
            and self._pending > self._idle + self._starting
        ):
            self._add_worker()

    def _add_worker(self) -> None:
        worker = Worker(self, self._settings, next(self._numbers))
        self._workers.add(worker)
        self._starting += 1

    # -- What its workers ask of the pool --

    def _start_worker(self, worker: Worker) -> bool:
        """Paces a worker's start (a pause after workers that could not be started) and
        judges it. False if it did not start: it is then replaced, unless that broke the
        pool."""
        try:
            if self._start_failures:
                delay = _START_RETRY_DELAY * 2 ** (self._start_failures - 1)
                gevent.sleep(min(delay, _START_RETRY_MAX_DELAY))
                if self._broken is not None:
                    return False
            failure = worker.start()
            if failure is None:
                self._start_failures = 0
                return True
            if failure.breaks_pool:
                self._set_broken(failure.message, failure.cause)
            else:
                self._start_failed(failure.message, failure.cause)
            return False
        finally:
            self._starting -= 1

    def _start_failed(self, message: str, cause: Optional[BaseException]) -> None:
        """A worker could not be started: it is replaced (after a pause), unless too many
        failed in a row; then the pool is broken."""
        self._start_failures += 1
        _log.debug("pool worker start failed (%d in a row): %s", self._start_failures, message)
        if self._start_failures >= _MAX_START_FAILURES:
            self._set_broken(
                f"{self._start_failures} worker processes in a row could not be started; "
                f"the last: {message}",
                cause,
            )

    def _next_item(self, wait: bool) -> Union[None, WorkItem, object]:
        """The next work item from the queue; ``None`` for a stop mark; ``EMPTY`` when
        ``wait`` is false and the queue is empty."""
        if not wait:
            item = self._queue.get_nowait()
        else:
            self._idle += 1
            try:
                item = self._queue.get()
            finally:
                self._idle -= 1
        if item is not None and item is not EMPTY:
            self._pending -= 1
        return item

    def _has_queued(self) -> bool:
        """Whether a task waits in the queue (not only stop marks: a worker about to take
        one first takes back what other workers were sent ahead, so that after a
        shutdown nothing waits behind a long task while a worker exits)."""
        return self._queue.has_tasks()

    def _others_may_take(self) -> bool:
        """Whether a worker is idle or starting (so none should be sent a task ahead)."""
        return bool(self._idle or self._starting)

    def _take_back_for(self, idle: Worker) -> None:
        """``idle`` is about to wait for work: every task other workers hold or were sent
        ahead, and have not started, goes back to the front of the queue."""
        for worker in list(self._workers):
            if worker is not idle:
                worker.take_back_unstarted()

    def _worker_ended(
        self, worker: Worker, handoff: List[WorkItem], *, bug: bool, replace: bool, stopping: bool
    ) -> None:
        """``worker`` has been retired. ``handoff``: what it took and never started, for
        another worker (or failed, if its greenlet stopped on a ``bug``). ``replace``: the
        pool may need a new worker; ``stopping``: it had taken a stop mark."""
        self._workers.discard(worker)
        if bug:
            for item in handoff:
                item.fail(
                    self._broken_error()
                    if self._broken
                    else BrokenProcessPool("the pool stopped serving this task unexpectedly")
                )
            handoff = []
        self._requeue(handoff)
        if replace:
            if stopping:
                # The stop mark this worker took was meant for whoever serves on.
                self._queue.put(None)
            self._adjust_workers()

    # -- The broken state, shutdown at exit --

    def _set_broken(self, message: str, cause: Optional[BaseException]) -> None:
        """Like ProcessPoolExecutor: a failed initializer breaks the pool. Pending tasks
        fail, new ones are refused; running ones finish and every worker then stops."""
        if self._broken is not None:
            return
        self._broken = message
        self._broken_cause = cause
        for item in self._drain():
            item.fail(self._broken_error())
        for worker in self._workers:
            worker.fail_held(self._broken_error)
        for _ in range(len(self._workers)):
            self._queue.put(None)

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


def _run_chunk(fn: Callable[..., Any], chunk: List[Tuple[Any, ...]]) -> List[Any]:
    return [fn(*args) for args in chunk]


def _chunks(iterable: Iterable[Tuple[Any, ...]], size: int) -> Iterator[List[Tuple[Any, ...]]]:
    it = iter(iterable)
    while True:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk


def _deadline(timeout: Optional[float]) -> Optional[float]:
    if timeout is None or timeout >= NO_TIMEOUT_FROM:
        return None
    return deadline_after(timeout)


def _resolve_codec(codec: Any, role: str, default: Callable[..., Any]) -> Any:
    """A pool's codec is a pipe's, minus ``None``: calls and their arguments are objects."""
    if codec is None:
        raise GIPCTypeError(f"a pool's {role} must be 'default' or a callable, not None")
    return _resolve_pipe_codec(codec, role, default)


def _check_timeout(timeout: Optional[float]) -> Optional[float]:
    if timeout is None:
        return None
    if not timeout > 0:  # also NaN
        raise ValueError("a task timeout must be a positive number of seconds or None")
    if timeout >= NO_TIMEOUT_FROM:  # also infinity
        return None
    return timeout


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:
        return os.cpu_count() or 1


@atexit.register
def _shut_pools_down_at_exit() -> None:
    for pool in list(_live_pools):
        if pool._pid == os.getpid():
            pool._shutdown_at_exit()
