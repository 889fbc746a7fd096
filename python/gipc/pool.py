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
  ones are sent ahead while no other worker is idle, so it never waits for the parent
  between two tasks; a task's deadline runs from the moment the one before it finished.
  Sent-ahead tasks count as running (they cannot be cancelled).
* The worker claims each task before it runs it (see :class:`_Claims`). A worker about to
  idle takes back the tasks others were sent ahead and have not claimed, so none waits
  behind a long task while a worker is free; and when a worker dies the parent knows
  which task it was running.
* A worker that dies fails only the task it was running (:class:`WorkerCrashed`), once
  the outcomes it had sent have completed theirs; one that runs past the task's timeout
  is killed and fails it with :class:`TaskTimeout`. The tasks it never started go to
  another worker. Either way, and after ``max_tasks_per_child`` tasks, the worker is
  replaced when there is work; so is one that could not be started (a bounded number of
  times in a row).
"""

from __future__ import annotations

import _multiprocessing  # type: ignore[import-not-found]  # (no stubs)
import atexit
import collections
import concurrent.futures as cf
import itertools
import logging
import mmap
import os
import pickle
import sys
import threading
import time
import weakref
from concurrent.futures.process import BrokenProcessPool
from typing import (
    TYPE_CHECKING,
    TypeVar,
    Any,
    Callable,
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
import gevent.lock
import gevent.queue

from . import _large_payload, _outcome
from ._handles import (
    Decoder,
    Encoder,
    _GIPCReader,
    _GIPCWriter,
    _pickle_dumps,
    get_default_codec,
)
from ._handles import _resolve as _resolve_pipe_codec
from ._hub import yield_to_loop
from ._hub import clamp_timeout, remaining
from ._outcome import Outcome, OutcomeReceiver, describe_exit
from ._process import _GProcess, start_process
from .exceptions import GIPCError, GIPCTypeError

if TYPE_CHECKING:
    # For the type checker only (annotations are not evaluated at run time here), so 3.9
    # needs no typing_extensions at run time.
    from typing_extensions import ParamSpec

    _P = ParamSpec("_P")

_T = TypeVar("_T")

#: Worker start, loss and retirement, at debug level (see gipc's ``_process``).
_log = logging.getLogger("gipc")

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


# concurrent.futures.TimeoutError is the builtin from Python 3.11 on; before, it is its own
# class, and TaskTimeout should be caught by either spelling. (A version test, so that type
# checkers see the same bases.)
if sys.version_info >= (3, 11):
    _TimeoutBase = TimeoutError
else:

    class _TimeoutBase(cf.TimeoutError, TimeoutError):
        pass


class TaskTimeout(_TimeoutBase):
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
        return super().wait(_wait_timeout(timeout))  # type: ignore[no-any-return]


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
        """For the pool: complete the future with ``result`` and wake its waiters."""
        super().set_result(result)
        self._wake_waiters()

    def set_exception(self, exception: Optional[BaseException]) -> None:
        """For the pool: fail the future with ``exception`` and wake its waiters."""
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
        self._done_event.wait(_wait_timeout(timeout))


# --- Tasks on the wire ----------------------------------------------------------------------


def _encode_task(
    fn: Callable[..., Any],
    args: Tuple[Any, ...],
    kwargs: Dict[str, Any],
    dumps: Optional[Callable[[Any], Any]] = None,
) -> List[bytes]:
    """The messages of one task: which arguments travel on their own, the encoded call
    (pickled, or by the pool's ``dumps``), then those arguments (large ``bytes``, sent as
    they are). Raises what the encoder raises."""
    raw_slots, args, kwargs, raws = _large_payload.take_out(args, kwargs)
    if dumps is None:
        body = pickle.dumps((fn, args, kwargs), protocol=_HIGHEST)
    else:
        body = dumps((fn, args, kwargs))
    return [pickle.dumps(tuple(raw_slots), protocol=_HIGHEST), body, *raws]


#: Exceptions that interrupt the program rather than report a bug.
_INTERRUPTS = (KeyboardInterrupt, SystemExit)
#: How often to try to take back tasks from a worker that is claiming one just then.
_REVOKE_ATTEMPTS = 20

#: The message that tells a worker to exit.
_STOP = b""


class _Claims:
    """Which of the tasks sent to one worker it may still start, shared by the parent and
    the worker (memory and a lock made before the fork, inherited by it).

    Tasks are numbered in the order they are sent (1, 2, ...). The worker *claims* each one
    before running it; the parent may *revoke* every task it has sent that is not claimed
    yet, to hand it to a worker that is free. Both happen under the lock, so a task is
    either run by this worker or handed on, never both and never neither; and the parent
    always knows which task the worker was running when it died.
    """

    def __init__(self) -> None:
        self._lock = _new_lock()
        self._memory = mmap.mmap(-1, 16)  # anonymous, shared with the forked worker
        #: [0]: the last task the worker claimed; [1]: tasks up to this one are revoked.
        self._words = memoryview(self._memory).cast("q")

    def claim(self, number: int) -> bool:
        """In the worker: whether it may run task ``number`` (False: it was revoked)."""
        words = self._words
        self._lock.acquire()
        try:
            if number <= words[1]:
                return False
            words[0] = number
            return True
        finally:
            self._lock.release()

    def try_revoke(self, through: int) -> Optional[int]:
        """In the parent: revokes every task up to ``through`` that the worker has not
        claimed, and returns the last one it did claim (those after it are revoked). None
        if the worker holds the lock just now; never waits for it."""
        if not self._lock.acquire(False):
            return None
        try:
            # Never lower: tasks revoked earlier may still be in the worker's pipe.
            if through > self._words[1]:
                self._words[1] = through
            return int(self._words[0])
        finally:
            self._lock.release()

    def started(self) -> int:
        """The last task the worker claimed (read once it is gone, or under the lock)."""
        return int(self._words[0])

    def close(self) -> None:
        self._words.release()
        self._memory.close()


_lock_names = itertools.count()


def _new_lock() -> Any:
    """An unnamed POSIX semaphore used as a lock, shared with the children forked after it.
    (multiprocessing's own Lock would also register a hook that every child then runs.)"""
    while True:
        name = f"/gipc-pool-{os.getpid()}-{next(_lock_names)}-{os.urandom(4).hex()}"
        try:
            # kind 1 is a semaphore; unlink=True removes the name at once: nothing to clean.
            return _multiprocessing.SemLock(1, 1, 1, name, True)
        except FileExistsError:
            continue


def _receive_task(tasks: _GIPCReader) -> Optional[Tuple[List[Union[int, str]], bytes, List[bytes]]]:
    """In the worker: the next task's messages (which arguments travel on their own, the
    pickled call, those arguments), or ``None`` when told to stop (or the parent is gone).
    Nothing is unpickled yet: the task may turn out to be revoked."""
    try:
        head = tasks.get()
        if head == _STOP:
            return None
        raw_slots = pickle.loads(head)
        body = tasks.get()
        raws = _large_payload.receive_larges(tasks, len(raw_slots))
    except EOFError:
        return None
    return raw_slots, body, raws


def _run_task(
    raw_slots: List[Union[int, str]],
    body: bytes,
    raws: List[bytes],
    loads: Callable[[bytes], Any] = pickle.loads,
) -> Outcome:
    """In the worker: decodes the call, puts the separately sent arguments in place, and
    runs it."""
    try:
        fn, args, kwargs = loads(body)
    except Exception as exc:
        return Outcome(exception=exc)
    args, kwargs = _large_payload.put_back(raw_slots, raws, args, kwargs)
    return _outcome.call(fn, args, kwargs)


def _worker_main(
    tasks: _GIPCReader,
    outcomes: _GIPCWriter,
    claims: _Claims,
    initializer: Optional[Callable[..., Any]],
    initargs: Tuple[Any, ...],
    loads: Callable[[bytes], Any] = pickle.loads,
) -> None:
    """A worker's life: run the initializer and report how it went, then run tasks one at a
    time and report each outcome, until told to stop or the parent is gone. A task the
    parent revoked (handed to another worker) is skipped, with no outcome."""
    if initializer is not None:
        ready = _outcome.call(initializer, initargs, {})
    else:
        ready = Outcome()
    if not _outcome.send(outcomes, ready) or ready.exception is not None:
        return
    del ready
    number = 0
    while True:
        task = _receive_task(tasks)
        if task is None:
            return
        number += 1
        if not claims.claim(number):
            continue
        outcome = _run_task(*task, loads)
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
        future: "Future[Any]",
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
        #: before starting it, or one that handed it back, passes it on, and it must not be
        #: marked running again.
        self.started = False


class _Gone:
    """In a worker's reply queue: the worker is gone (``reason`` says how it was noticed)."""

    __slots__ = ("reason",)

    def __init__(self, reason: Optional[BaseException]) -> None:
        self.reason = reason


#: In a worker's reply queue: the process has exited (outcomes may still follow).
_EXITED = object()
#: In a worker's reply queue: every task it had been sent was handed to other workers.
_REVOKED = object()
#: `_await_reply`: the deadline passed.
_TIMED_OUT = object()
#: `_TaskQueue.get_nowait`: nothing in the queue right now.
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
#: Workers that could not be started (fork failed, or the process died before it was
#: ready) are replaced, after a pause that doubles each time from the first value up to the
#: second; this many failures in a row break the pool.
_START_RETRY_DELAY = 0.05
_START_RETRY_MAX_DELAY = 1.0
_MAX_START_FAILURES = 6
#: Task timeouts from this many seconds on (about 31 years) mean no timeout: libuv's timers
#: cannot represent much longer ones (nor infinity), and none will be reached anyway.
_NO_TIMEOUT_FROM = 1e9


class _TaskQueue:
    """The pool's work items in submission order, with stop marks (``None``). Tasks handed
    back by a worker, which were taken earlier, go back to the front."""

    def __init__(self) -> None:
        self._items: "collections.deque[Optional[_WorkItem]]" = collections.deque()
        self._count = gevent.lock.Semaphore(0)  # len(self._items), to wait on

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Optional[_WorkItem]) -> None:
        self._items.append(item)
        self._count.release()

    def put_front(self, items: List[_WorkItem]) -> None:
        self._items.extendleft(reversed(items))
        for _ in items:
            self._count.release()

    def get(self) -> Optional[_WorkItem]:
        self._count.acquire()
        return self._items.popleft()

    def get_nowait(self) -> Union[None, _WorkItem, object]:
        if not self._count.acquire(blocking=False):
            return _EMPTY
        return self._items.popleft()


class _Worker:
    """The parent's side of one worker process."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.process: Optional[_GProcess] = None
        self.tasks: Optional[_GIPCWriter] = None
        self.receiver: Optional[OutcomeReceiver] = None
        self.claims: Optional[_Claims] = None
        #: Outcomes, and news of the worker's end, in the order they were noticed.
        self.replies: "gevent.queue.Queue[Any]" = gevent.queue.Queue()
        #: How many _REVOKED marks are in ``replies``.
        self.revoked_marks = 0
        self.serving: Optional[gevent.Greenlet] = None
        self.reader: Optional[gevent.Greenlet] = None
        self.exit_watch: Optional[gevent.Greenlet] = None
        #: Tasks sent and not answered yet, oldest (the one running) first: the item, the
        #: bytes it took on the pipe, and its number (see _Claims).
        self.in_flight: "collections.deque[Tuple[_WorkItem, int, int]]" = collections.deque()
        self.bytes_in_flight = 0
        self.numbered = 0  # tasks numbered so far
        #: Taken for this worker but not sent yet (too large to send ahead just now).
        self.held: "collections.deque[_WorkItem]" = collections.deque()
        #: Taken and being encoded, not yet in ``in_flight``.
        self.sending: Optional[_WorkItem] = None
        #: When the oldest task in flight started running, as far as the parent can tell.
        self.head_since = 0.0
        #: Whether its last task took less than _QUICK_TASK: then tasks are sent ahead.
        self.quick = False
        self.tasks_sent = 0
        #: Has sent the outcome of its initializer: tasks can be sent to it.
        self.ready = False
        #: The process has exited (seen by the exit watch).
        self.exited = False
        #: Died or was killed while serving: what it held goes to another worker.
        self.lost = False

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0  # type: ignore[return-value]

    def gone(self) -> bool:
        """Whether the worker has died (checked before sending it a task)."""
        if self.replies.qsize() > self.revoked_marks:
            return True
        return self.process is None or self.process.exitcode is not None


_live_pools: "weakref.WeakSet[ProcessPool]" = weakref.WeakSet()


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
            millisecond may be sent ahead of the one it runs (default 8), while no
            other worker is idle. This more than doubles the throughput of tiny tasks.
            Tasks sent ahead and not started are taken back for a worker that becomes
            free; they can no longer be cancelled. ``0`` sends a worker one task at a
            time.
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
        #: None: pickle, called directly (the common case, and the fastest).
        self._dumps = None if dumps is _pickle_dumps else dumps
        self._loads: Callable[[bytes], Any] = _resolve_codec(decoder, "decoder", default_decoder)
        self._prefetch = prefetch
        self._max_workers = max_workers
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._max_tasks = max_tasks_per_child
        self._task_timeout = _check_timeout(task_timeout)
        # Work items in submission order; a None tells one worker to stop.
        self._queue = _TaskQueue()
        self._pending = 0  # work items in the queue
        self._idle = 0  # workers waiting on the queue
        self._starting = 0  # workers not yet ready for their first task
        self._start_failures = 0  # workers in a row that could not be started
        self._workers: Set[_Worker] = set()
        self._numbers = itertools.count(1)
        self._shutdown = False
        self._broken: Optional[str] = None
        self._broken_cause: Optional[BaseException] = None
        _live_pools.add(self)

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
    ) -> "Future[Any]":
        if self._broken is not None:
            raise self._broken_error()
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        future: Future[Any] = Future()
        self._queue.put(_WorkItem(future, fn, args, kwargs, timeout))
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

    def _drain(self) -> List[_WorkItem]:
        """Takes every work item out of the queue (dropping stop marks)."""
        items: List[_WorkItem] = []
        while True:
            item = self._queue.get_nowait()
            if item is _EMPTY:
                break
            if isinstance(item, _WorkItem):
                items.append(item)
        self._pending = 0
        return items

    def _requeue(self, items: List[_WorkItem]) -> None:
        """Puts back, ahead of everything else, tasks taken earlier that no worker started
        (a worker handed them back, or died first)."""
        if not items:
            return
        if self._broken is not None:
            for item in items:
                self._fail(item, self._broken_error())
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
        worker = _Worker(next(self._numbers))
        self._workers.add(worker)
        self._starting += 1
        worker.serving = gevent.spawn(self._serve, worker)

    def _next_item(self, wait: bool) -> Union[None, _WorkItem, object]:
        """The next work item from the queue; ``None`` for a stop mark; ``_EMPTY`` when
        ``wait`` is false and the queue is empty."""
        if not wait:
            item = self._queue.get_nowait()
        else:
            self._idle += 1
            try:
                item = self._queue.get()
            finally:
                self._idle -= 1
        if item is not None and item is not _EMPTY:
            self._pending -= 1
        return item

    def _serve(self, worker: _Worker) -> None:
        """The serving greenlet of one worker, from its start to its end: keeps the worker
        fed (one task, or several ahead once its tasks prove quick) and completes the
        futures from its outcomes, in order."""
        replace = True  # whether the pool may need a new worker when this one ends
        interrupted: Optional[BaseException] = None
        stopping = False  # took a stop mark from the queue
        try:
            try:
                ready = self._start(worker)
            finally:
                self._starting -= 1
            if not ready:
                return
            while True:
                stopping = self._feed(worker, take_new=not stopping) or stopping
                if worker.lost:
                    return
                if not worker.in_flight:
                    if stopping and not worker.held:
                        replace = False
                        return
                    if self._max_tasks is not None and worker.tasks_sent >= self._max_tasks:
                        return
                    continue
                if not self._finish_oldest(worker):
                    return
        except BaseException as exc:  # Ctrl-C landed here, killed (GreenletExit), or a bug
            interrupted = exc
            raise
        finally:
            worker.ready = False  # nothing more to take back from it
            if interrupted is not None and worker.in_flight and not worker.lost:
                # Settle what was sent, as if the worker had died: it is stopped, and only
                # the tasks it never started go elsewhere.
                self._end_worker(worker, None, interrupted)
            handoff = [] if worker.sending is None else [worker.sending]
            handoff += worker.held
            worker.sending = None
            worker.held.clear()
            self._retire(worker)
            self._workers.discard(worker)
            if interrupted is not None and not isinstance(interrupted, _INTERRUPTS):
                for item in handoff:
                    self._fail(
                        item,
                        self._broken_error()
                        if self._broken
                        else BrokenProcessPool("the pool stopped serving this task unexpectedly"),
                    )
                handoff = []
            self._requeue(handoff)
            if replace:
                if stopping:
                    # The stop mark this worker took was meant for whoever serves on.
                    self._queue.put(None)
                self._adjust_workers()

    def _start(self, worker: _Worker) -> bool:
        """Forks the worker and waits for its initializer. False if it could not be
        started: it is then replaced, unless that broke the pool."""
        if self._start_failures:
            delay = _START_RETRY_DELAY * 2 ** (self._start_failures - 1)
            gevent.sleep(min(delay, _START_RETRY_MAX_DELAY))
            if self._broken is not None:
                return False
        tasks_r, tasks_w = _large_payload.bytes_pipe()
        outcomes_r, outcomes_w = _large_payload.bytes_pipe()
        claims: Optional[_Claims] = None
        try:
            claims = _Claims()
            process = start_process(
                _worker_main,
                args=(
                    tasks_r,
                    outcomes_w,
                    claims,
                    self._initializer,
                    self._initargs,
                    self._loads,
                ),
                name=f"gipc-pool-worker-{worker.number}",
            )
        except BaseException as exc:
            for handle in (tasks_r, tasks_w, outcomes_r, outcomes_w):
                if not handle.closed:
                    handle._release()
            if claims is not None:
                claims.close()
            if isinstance(exc, Exception):
                self._start_failed(f"a worker process could not be started: {exc}", exc)
                return False
            raise
        worker.process = process
        worker.tasks = tasks_w
        worker.claims = claims
        worker.receiver = OutcomeReceiver(outcomes_r)
        worker.exit_watch = gevent.spawn(self._watch_exit, worker)
        worker.reader = gevent.spawn(self._read_outcomes, worker)
        reply = self._await_reply(worker, None)
        if isinstance(reply, Outcome):
            if reply.exception is None:
                self._start_failures = 0
                worker.ready = True
                _log.debug("pool worker %d started (pid %d)", worker.number, process.pid)
                return True
            self._set_broken(
                f"the initializer failed in worker process {process.pid}: "
                f"{type(reply.exception).__name__}: {reply.exception}",
                reply.exception,
            )
            return False
        if reply is _TIMED_OUT:  # cannot happen without a deadline; be safe
            process.kill()
        code = self._reap(worker)
        where = " (in the initializer)" if self._initializer is not None else ""
        self._start_failed(
            f"worker process {process.pid} {describe_exit(code)} while starting{where}", None
        )
        return False

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

    def _feed(self, worker: _Worker, take_new: bool) -> bool:
        """Sends the worker what it may take now: a task when it has none, more while its
        tasks are quick, no other worker is idle, and what is in flight stays small; from
        ``worker.held`` first, then (if ``take_new``) from the queue. Returns True when it
        took a stop mark. Sets ``worker.lost`` if the worker turns out to be gone."""
        held = worker.held
        while self._may_send_more(worker):
            if held:
                item = held.popleft()
            elif not take_new:
                break
            else:
                wait = not worker.in_flight
                if wait and not len(self._queue):
                    # About to idle: first take back what other workers were sent ahead
                    # (or hold) and have not started, so nothing waits behind a long task.
                    self._take_back_for(worker)
                got = self._next_item(wait=wait)
                if got is _EMPTY:
                    break
                if got is None:
                    return True
                item = got  # type: ignore[assignment]
            if not worker.in_flight and worker.gone():
                # It died while idle: the item was never sent, so it is not the item's
                # fault. Another worker takes it.
                held.appendleft(item)
                worker.lost = True
                break
            if not self._send(worker, item):
                break
        return False

    def _may_send_more(self, worker: _Worker) -> bool:
        if worker.lost:
            return False
        if self._max_tasks is not None and worker.tasks_sent >= self._max_tasks:
            return False
        count = len(worker.in_flight)
        if count == 0:
            return True
        # Never ahead to a busy worker while another one (or one starting) could take it.
        return (
            worker.quick
            and count <= self._prefetch
            and not self._idle
            and not self._starting
        )

    def _send(self, worker: _Worker, item: _WorkItem) -> bool:
        """Sends one item; False when feeding must stop (the item went back to
        ``worker.held`` to wait until nothing is in flight, or the worker is gone)."""
        future = item.future
        if not item.started:
            if future.cancelled() or not future.set_running_or_notify_cancel():
                return True
        item.started = True
        worker.sending = item
        try:
            messages = _encode_task(item.fn, item.args, item.kwargs, self._dumps)
        except Exception as exc:
            worker.sending = None
            future.set_exception(exc)
            return True
        size = sum(len(m) for m in messages)
        if worker.in_flight and worker.bytes_in_flight + size > _AHEAD_BYTES:
            # Sending it now might block, and this greenlet must stay free to watch the
            # running task's deadline: it goes once the worker has caught up.
            worker.sending = None
            worker.held.appendleft(item)
            return False
        assert worker.tasks is not None
        first = not worker.in_flight
        if first:
            worker.head_since = time.monotonic()
        # In flight (and numbered) before it is written: should the write be cut short,
        # the worker's claims still tell whether it started the task.
        worker.numbered += 1
        worker.in_flight.append((item, size, worker.numbered))
        worker.bytes_in_flight += size
        worker.tasks_sent += 1
        worker.sending = None
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
        if reply is not None:
            self._end_worker(worker, reply)
            return False
        return True

    def _finish_oldest(self, worker: _Worker) -> bool:
        """Waits for the outcome of the task the worker is running and completes its
        future; False if the worker is gone or was killed (it must be replaced)."""
        item = worker.in_flight[0][0]
        deadline = None if item.timeout is None else worker.head_since + item.timeout
        reply = self._await_reply(worker, deadline)
        if reply is _REVOKED:
            return True  # what it was sent went to other workers: look again
        if not isinstance(reply, Outcome):
            self._end_worker(worker, reply)
            return False
        _, size, _ = worker.in_flight.popleft()
        worker.bytes_in_flight -= size
        now = time.monotonic()
        worker.quick = now - worker.head_since < _QUICK_TASK
        worker.head_since = now
        self._complete(item, reply)
        return True

    @staticmethod
    def _complete(item: _WorkItem, outcome: Outcome) -> None:
        if outcome.exception is None:
            item.future.set_result(outcome.value)
        else:
            item.future.set_exception(outcome.exception)

    def _end_worker(
        self, worker: _Worker, reply: Any, interrupted: Optional[BaseException] = None
    ) -> None:
        """The worker is gone (``reply``: a _Gone), its oldest task timed out
        (``_TIMED_OUT``), or this greenlet was interrupted: stop and reap the worker, then
        settle every task in flight. Those whose outcome it had sent complete with it; the
        one it was running fails; those it never started stay in ``worker.held``, for
        another worker."""
        worker.lost = True
        process, claims = worker.process, worker.claims
        assert process is not None and claims is not None
        timed_out = worker.in_flight[0][0] if reply is _TIMED_OUT else None
        if isinstance(reply, _Gone) and isinstance(reply.reason, BaseException):
            if not isinstance(reply.reason, Exception):
                interrupted = reply.reason  # in the reader: the outcome it held is lost
            elif not isinstance(reply.reason, EOFError):
                # A torn message or a failed write: whatever the worker is doing, it is no
                # longer talking to us.
                process.kill()
        if timed_out is not None or interrupted is not None:
            process.kill()
        code = self._reap(worker)
        _log.debug(
            "pool worker %d (pid %d) lost: %s, exit code %s",
            worker.number,
            worker.pid,
            "task timed out" if timed_out is not None else "interrupted" if interrupted else "died",
            code,
        )
        for outcome in self._outcomes_left(worker):
            if not worker.in_flight:
                break
            item, size, _ = worker.in_flight.popleft()
            worker.bytes_in_flight -= size
            self._complete(item, outcome)
        started = claims.started()
        never_started = []
        for item, _, number in worker.in_flight:
            if number > started:
                never_started.append(item)
                continue
            name = _task_name(item.fn)
            error: BaseException
            if item is timed_out:
                assert item.timeout is not None
                error = TaskTimeout(item.timeout, worker.pid, name)
            elif interrupted is not None:
                error = BrokenProcessPool(
                    f"the outcome of {name} was lost: the pool was interrupted "
                    f"({type(interrupted).__name__}) while waiting for it from worker "
                    f"process {worker.pid}"
                )
                error.__cause__ = interrupted
            else:
                error = WorkerCrashed(worker.pid, code, name)
            self._fail(item, error)
        worker.in_flight.clear()
        worker.bytes_in_flight = 0
        worker.held.extendleft(reversed(never_started))

    def _outcomes_left(self, worker: _Worker) -> Iterator[Outcome]:
        """Once the worker has exited: the outcomes it sent that were not taken yet."""
        while True:
            reader = worker.reader
            try:
                if reader is None or reader.dead:
                    reply = worker.replies.get_nowait()
                else:
                    # Its writes are complete; only a process it forked holding the pipe
                    # open could keep the reader from reaching the end of them.
                    reply = worker.replies.get(timeout=_outcome.EXIT_GRACE)
            except gevent.queue.Empty:
                return
            if reply is _REVOKED:
                worker.revoked_marks -= 1
            elif isinstance(reply, Outcome):
                yield reply
            elif isinstance(reply, _Gone):
                return

    def _take_back_for(self, idle: _Worker) -> None:
        """``idle`` is about to wait for work: every task other workers hold or were sent
        ahead, and have not started, goes back to the front of the queue."""
        for worker in list(self._workers):
            if worker is idle or worker.lost or not worker.ready:
                continue
            if worker.held:
                self._requeue(list(worker.held))
                worker.held.clear()
            if len(worker.in_flight) > 1:
                self._revoke(worker)

    def _revoke(self, worker: _Worker) -> None:
        """Hands back the tasks sent to ``worker`` that it has not started."""
        claims = worker.claims
        assert claims is not None
        for _ in range(_REVOKE_ATTEMPTS):
            if worker.lost or len(worker.in_flight) < 2:
                return
            started = claims.try_revoke(worker.in_flight[-1][2])
            if started is not None:
                break
            # The worker is claiming a task this very moment.
            gevent.sleep(0.001)
        else:
            return
        kept: List[Tuple[_WorkItem, int, int]] = []
        taken: List[_WorkItem] = []
        for entry in worker.in_flight:
            if entry[2] <= started:
                kept.append(entry)
            else:
                taken.append(entry[0])
                worker.bytes_in_flight -= entry[1]
                worker.tasks_sent -= 1
        if not taken:
            return
        worker.in_flight.clear()
        worker.in_flight.extend(kept)
        if not kept:
            # Its serving greenlet waits for an outcome that will not come.
            worker.revoked_marks += 1
            worker.replies.put_nowait(_REVOKED)
        self._requeue(taken)

    def _await_reply(self, worker: _Worker, deadline: Optional[float]) -> Any:
        """The worker's next outcome, ``_TIMED_OUT``, ``_REVOKED``, or a ``_Gone``."""
        while True:
            try:
                if worker.exited:
                    # An outcome sent just before the end may still be on its way.
                    reply = worker.replies.get(timeout=_outcome.EXIT_GRACE)
                else:
                    reply = worker.replies.get(timeout=remaining(deadline))
            except gevent.queue.Empty:
                if worker.exited:
                    return _Gone(None)
                # Late by a hair? Use what has arrived rather than kill the worker for it.
                try:
                    reply = worker.replies.get_nowait()
                except gevent.queue.Empty:
                    return _TIMED_OUT
            if reply is _EXITED:
                worker.exited = True
                continue
            if reply is _REVOKED:
                worker.revoked_marks -= 1
            return reply

    def _read_outcomes(self, worker: _Worker) -> None:
        """Helper greenlet: outcomes off the pipe into the reply queue, then news of EOF."""
        receiver = worker.receiver
        assert receiver is not None
        try:
            while True:
                try:
                    outcome = receiver.receive()
                except Exception as exc:  # EOFError: the worker is gone; GIPCError: torn
                    worker.replies.put_nowait(_Gone(exc))
                    return
                worker.replies.put_nowait(outcome)
                del outcome
        except gevent.GreenletExit:
            raise
        except BaseException as exc:
            # Ctrl-C (or SystemExit) landed here, say while an outcome was unpickled: the
            # serving greenlet must know, or it would wait for ever. The interrupt then
            # goes on to the program (gevent passes it to the main greenlet).
            worker.replies.put_nowait(_Gone(exc))
            raise

    def _watch_exit(self, worker: _Worker) -> int:
        """Helper greenlet: tells the serving greenlet when the process has exited, and
        returns its exit code."""
        try:
            code = _outcome.wait_for_exit(worker.process)
        except gevent.GreenletExit:
            raise
        except BaseException:
            # Ctrl-C (see _read_outcomes): another greenlet watches on, and the interrupt
            # goes on to the program.
            worker.exit_watch = gevent.spawn(self._watch_exit, worker)
            raise
        worker.replies.put_nowait(_EXITED)
        return code

    def _reap(self, worker: _Worker) -> int:
        """Waits for the worker to exit (killing it if it takes longer than
        ``_STOP_GRACE``) and returns its exit code."""
        process, watch = worker.process, worker.exit_watch
        assert process is not None and watch is not None
        watch.join(_STOP_GRACE)
        if not watch.ready():
            process.kill()
            watch.join()
        if watch.successful():
            return watch.value  # type: ignore[no-any-return]
        # The watch was interrupted: wait here instead.
        with gevent.Timeout(_STOP_GRACE, False):
            return _outcome.wait_for_exit(process)
        process.kill()
        return _outcome.wait_for_exit(process)

    def _retire(self, worker: _Worker) -> None:
        """Stops the worker if it is still running, reaps it and closes everything the
        parent held for it."""
        process = worker.process
        if process is None:
            return
        _log.debug("retiring pool worker %d (pid %d)", worker.number, process.pid)
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
        gevent.killall([g for g in (worker.reader, worker.exit_watch) if g is not None])
        if worker.receiver is not None:
            worker.receiver.close()
        if worker.claims is not None:
            worker.claims.close()
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
        for worker in self._workers:
            for item in worker.held:
                self._fail(item, self._broken_error())
            worker.held.clear()
        for _ in range(len(self._workers)):
            self._queue.put(None)

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


def _wait_timeout(timeout: Optional[float]) -> Optional[float]:
    """A caller's timeout fit for gevent: ``None`` also for one too long for libuv."""
    if timeout is not None and timeout >= _NO_TIMEOUT_FROM:
        return None
    return clamp_timeout(timeout)


def _deadline(timeout: Optional[float]) -> Optional[float]:
    if timeout is None or timeout >= _NO_TIMEOUT_FROM:
        return None
    return time.monotonic() + timeout


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
    if timeout >= _NO_TIMEOUT_FROM:  # also infinity
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
        pool._shutdown_at_exit()
