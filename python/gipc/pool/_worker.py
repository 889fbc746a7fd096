"""The parent's side of one pool worker. A :class:`Worker` owns the whole life of one worker
process: it starts it, feeds it tasks, reads its outcomes, notices its end, settles what it
held, reaps it and retires it, from one serving greenlet (:meth:`Worker.serve`) and two
helpers (one reads outcomes off the pipe, one watches the process exit). The pool only
queues work items, sizes the set of workers and breaks or shuts down.

The invariants:

* **Where a task is.** A work item the worker took from the pool's queue is in exactly one
  of three places until it leaves the worker: ``sending`` (being encoded), ``held`` (taken
  but not sent: too large to send ahead just now, or never started by a worker that was
  lost), or ``in_flight`` (numbered and written to the pipe, oldest first). It leaves by
  its future completing or failing, or by going back to the *front* of the pool's queue.
  When the serving greenlet ends, whatever is left in ``sending`` and ``held`` goes back to
  the queue (or fails, if the pool is broken or the greenlet stopped on a bug), and
  ``in_flight`` has been settled (below): the worker keeps nothing.
* **Outcomes come in order.** A worker runs its tasks one at a time in the order they were
  sent, so each outcome belongs to the oldest task in flight, and that one's deadline
  runs from when the task before it finished (or from when it was sent).
* **The claim protocol** (:class:`~gipc.pool._claims.TaskClaims`). Both sides number the
  tasks in send order. The worker *claims* a task before it runs it; the parent may
  *revoke* every task it has sent that is not claimed yet. Each is one atomic update of a
  word shared with the worker, so a task is run by this worker or handed back, never both
  and never neither, and a task once claimed is never taken back. The last claim tells
  the parent which task was running when the worker died.
* **What is sent ahead.** A second task goes to a busy worker only while its tasks are
  quick, no other worker is idle or starting, at most ``prefetch`` are in flight, and all
  in flight fit in ``_AHEAD_BYTES`` (far below a pipe's buffer: a send ahead never blocks,
  so the serving greenlet is always free to watch the running task's deadline). A worker
  about to idle takes back from the others what they hold or were sent and have not
  claimed (:meth:`Worker.take_back_unstarted`).
* **What a crash fails.** When the worker is lost (it died, its task ran past its
  deadline, a message was torn, or an interrupt landed in one of its greenlets), it is
  killed if need be and reaped; the outcomes it sent are read to the end of the pipe and
  complete their tasks first. Then, of the tasks still in flight, the one it claimed fails
  (``TaskTimeout`` if its deadline passed, ``BrokenProcessPool`` if its outcome was lost to
  an interrupt, else ``WorkerCrashed``); the ones it never claimed are not failed but
  *re-sent*: they go to ``held`` and from there back to the front of the pool's queue, for
  another worker. So no task runs twice, and a crash fails no task but the one running.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, List, NamedTuple, Optional, Tuple

import gevent
import gevent.queue
from concurrent.futures.process import BrokenProcessPool

from .. import _large_payload, _outcome
from .._handles import _GIPCWriter, _NotPicklable
from .._hub import clamp_timeout, remaining
from .._outcome import Outcome, OutcomeReceiver, describe_exit
from .._process import _GProcess, start_process
from ..exceptions import GIPCError
from ._claims import TaskClaims
from ._errors import TaskTimeout, WorkerCrashed
from ._queue import EMPTY
from ._task import STOP, HandleTask, WorkItem, encode_task, encode_task_with_handles
from ._worker_child import worker_main

if TYPE_CHECKING:
    from ._pool import ProcessPool

#: Worker start, loss and retirement, at debug level (see gipc's ``_process``).
_log = logging.getLogger("gipc")

#: How long a stopping worker may take to exit before it is killed.
_STOP_GRACE = 10.0
#: A task that took less than this (seen from the parent) counts as quick.
_QUICK_TASK = 0.001
#: Tasks are sent ahead only while all in flight fit in this many bytes, far below a pipe's
#: buffer, so sending ahead never blocks.
_AHEAD_BYTES = 32 * 1024
#: Exceptions that interrupt the program rather than report a bug.
_INTERRUPTS = (KeyboardInterrupt, SystemExit)


class WorkerSettings(NamedTuple):
    """What every worker of a pool is started and fed with, fixed when the pool is made."""

    initializer: Optional[Callable[..., Any]]
    initargs: Tuple[Any, ...]
    #: How tasks are encoded; None: pickle, called directly (the common case, the fastest).
    dumps: Optional[Callable[[Any], Any]]
    loads: Callable[[bytes], Any]
    prefetch: int
    max_tasks: Optional[int]
    #: How worker processes are started (see ``gipc.start_process``).
    start_method: str = "fork"


class StartFailure(NamedTuple):
    """Why a worker is not ready for tasks."""

    message: str
    cause: Optional[BaseException]
    #: The initializer raised: the pool is broken (other failures are retried).
    breaks_pool: bool = False


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


class _InFlight(collections.deque[Tuple[WorkItem, int, int]]):
    """The tasks written to a worker's pipe and not answered yet, oldest (the one it runs)
    first, each with its number (see :class:`TaskClaims`) and the bytes it took on the pipe;
    the bytes in all of them are counted as they come and go. Changed only by the methods
    below, which keep the count and the numbering right. (A deque itself, so that ``len``
    and truth, asked several times per task, cost no Python call.)"""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self._numbered = 0  # tasks numbered so far: the worker numbers them alike

    def oldest(self) -> WorkItem:
        return self[0][0]

    def last_number(self) -> int:
        return self[-1][2]

    def last_numbered(self) -> int:
        """The number of the last task ever sent (0 before the first)."""
        return self._numbered

    def add(self, item: WorkItem, size: int) -> None:
        self._numbered += 1
        self.append((item, size, self._numbered))
        self.bytes += size

    def pop_oldest(self) -> WorkItem:
        item, size, _ = self.popleft()
        self.bytes -= size
        return item

    def take_unclaimed(self, last_claimed: int) -> List[WorkItem]:
        """Removes and returns, in order, the tasks numbered after ``last_claimed``."""
        taken: List[WorkItem] = []
        while self and self[-1][2] > last_claimed:
            item, size, _ = self.pop()
            self.bytes -= size
            taken.append(item)
        taken.reverse()
        return taken

    def take_all(self) -> List[WorkItem]:
        items = [entry[0] for entry in self]
        self.clear()
        self.bytes = 0
        return items


class Worker:
    """The parent's side of one worker process, from its start to its retirement.

    What it asks of its pool, and nothing more: to pace and judge its start
    (``_start_worker``), the next work item (``_next_item``), whether anything is queued
    (``_has_queued``) or another worker is idle or starting (``_others_may_take``), to take
    back for it what the other workers have not started (``_take_back_for``), to put tasks
    back at the front of the queue (``_requeue``), and to be told when it has ended
    (``_worker_ended``).
    """

    def __init__(self, pool: "ProcessPool", settings: WorkerSettings, number: int) -> None:
        self._pool = pool
        self._settings = settings
        self.number = number
        self.process: Optional[_GProcess] = None
        self._tasks: Optional[_GIPCWriter] = None
        self._receiver: Optional[OutcomeReceiver] = None
        self._claims: Optional[TaskClaims] = None
        #: Outcomes, and news of the worker's end, in the order they were noticed.
        self._replies: "gevent.queue.Queue[Any]" = gevent.queue.Queue()
        #: How many _REVOKED marks are in ``_replies``.
        self._revoked_marks = 0
        self._reader: Optional[gevent.Greenlet] = None
        self._exit_watch: Optional[gevent.Greenlet] = None
        self._in_flight = _InFlight()
        #: Taken for this worker and not sent yet (too large to send ahead just now), or
        #: sent and never started by it once it is lost: for another worker.
        self._held: "collections.deque[WorkItem]" = collections.deque()
        #: Taken and being encoded, not yet in ``_in_flight``.
        self._sending: Optional[WorkItem] = None
        #: When the oldest task in flight started running, as far as the parent can tell.
        self._head_since = 0.0
        #: Whether its last task took less than _QUICK_TASK: then tasks are sent ahead.
        self._quick = False
        self._tasks_sent = 0
        #: Has sent the outcome of its initializer: tasks can be sent to it.
        self.ready = False
        #: The process has exited (seen by the exit watch).
        self._exited = False
        #: Died or was killed while serving: what it held goes to another worker.
        self.lost = False
        self.serving: gevent.Greenlet = gevent.spawn(self.serve)

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0  # type: ignore[return-value]

    # -- Its life --

    def serve(self) -> None:
        """The serving greenlet, from the worker's start to its end: keeps the worker fed
        (one task, or several ahead once its tasks prove quick) and completes the futures
        from its outcomes, in order; then retires it and tells the pool."""
        replace = True  # whether the pool may need a new worker when this one ends
        interrupted: Optional[BaseException] = None
        stopping = False  # took a stop mark from the queue
        try:
            if not self._pool._start_worker(self):
                return
            while True:
                stopping = self._feed(take_new=not stopping) or stopping
                if self.lost:
                    return
                if not self._in_flight:
                    if stopping and not self._held:
                        replace = False
                        return
                    if self._used_up():
                        return
                    continue
                if not self._finish_oldest():
                    return
        except BaseException as exc:  # Ctrl-C landed here, killed (GreenletExit), or a bug
            interrupted = exc
            raise
        finally:
            self.ready = False  # nothing more to take back from it
            if interrupted is not None and self._in_flight and not self.lost:
                # Settle what was sent, as if the worker had died: it is stopped, and only
                # the tasks it never started go elsewhere.
                self._end(None, interrupted)
            handoff = [] if self._sending is None else [self._sending]
            handoff += self._held
            self._sending = None
            self._held.clear()
            self._retire()
            bug = interrupted is not None and not isinstance(interrupted, _INTERRUPTS)
            self._pool._worker_ended(self, handoff, bug=bug, replace=replace, stopping=stopping)

    def start(self) -> Optional[StartFailure]:
        """Forks the worker process and waits for its initializer's report. None once it is
        ready for tasks, else why it is not."""
        settings = self._settings
        tasks_r, tasks_w = _large_payload.bytes_pipe()
        outcomes_r, outcomes_w = _large_payload.bytes_pipe()
        claims: Optional[TaskClaims] = None
        try:
            claims = TaskClaims.for_start_method(settings.start_method)
            # The one place a worker process is started.
            process = start_process(
                worker_main,
                args=(
                    tasks_r,
                    outcomes_w,
                    claims,
                    settings.initializer,
                    settings.initargs,
                    settings.loads,
                ),
                name=f"gipc-pool-worker-{self.number}",
                start_method=settings.start_method,
            )
        except BaseException as exc:
            for handle in (tasks_r, tasks_w, outcomes_r, outcomes_w):
                if not handle.closed:
                    handle._release()
            if claims is not None:
                claims.close()
            if isinstance(exc, Exception):
                return StartFailure(f"a worker process could not be started: {exc}", exc)
            raise
        self.process = process
        self._tasks = tasks_w
        self._claims = claims
        self._receiver = OutcomeReceiver(outcomes_r)
        self._exit_watch = gevent.spawn(self._watch_exit)
        self._reader = gevent.spawn(self._read_outcomes)
        reply = self._await_reply(None)
        if isinstance(reply, Outcome):
            if reply.exception is None:
                self.ready = True
                _log.debug("pool worker %d started (pid %d)", self.number, process.pid)
                return None
            return StartFailure(
                f"the initializer failed in worker process {process.pid}: "
                f"{type(reply.exception).__name__}: {reply.exception}",
                reply.exception,
                breaks_pool=True,
            )
        if reply is _TIMED_OUT:  # cannot happen without a deadline; be safe
            process.kill()
        code = self._reap()
        where = " (in the initializer)" if settings.initializer is not None else ""
        return StartFailure(
            f"worker process {process.pid} {describe_exit(code)} while starting{where}", None
        )

    def _used_up(self) -> bool:
        """Has been sent ``max_tasks_per_child`` tasks: it is to be replaced."""
        max_tasks = self._settings.max_tasks
        return max_tasks is not None and self._tasks_sent >= max_tasks

    def _gone(self) -> bool:
        """Whether the worker has died (checked before sending it a task)."""
        if self._replies.qsize() > self._revoked_marks:
            return True
        return self.process is None or self.process.exitcode is not None

    # -- Feeding it --

    def _feed(self, take_new: bool) -> bool:
        """Sends the worker what it may take now: a task when it has none, more while its
        tasks are quick, no other worker is idle, and what is in flight stays small; from
        ``_held`` first, then (if ``take_new``) from the queue. Returns True when it took a
        stop mark. Sets ``lost`` if the worker turns out to be gone."""
        pool = self._pool
        held = self._held
        while self._may_send_more():
            if held:
                item = held.popleft()
            elif not take_new:
                break
            else:
                wait = not self._in_flight
                if wait and not pool._has_queued():
                    # About to idle: first take back what other workers were sent ahead
                    # (or hold) and have not started, so nothing waits behind a long task.
                    pool._take_back_for(self)
                got = pool._next_item(wait=wait)
                if got is EMPTY:
                    break
                if got is None:
                    return True
                item = got  # type: ignore[assignment]
            if not self._in_flight and self._gone():
                # It died while idle: the item was never sent, so it is not the item's
                # fault. Another worker takes it.
                held.appendleft(item)
                self.lost = True
                break
            if not self._send(item):
                break
        return False

    def _may_send_more(self) -> bool:
        if self.lost:
            return False
        settings = self._settings
        if settings.max_tasks is not None and self._tasks_sent >= settings.max_tasks:
            return False
        count = len(self._in_flight)
        if count == 0:
            return True
        if self._in_flight.oldest().carries_handles:
            return False  # nothing is sent ahead of a task with handles (see _send)
        # Never ahead to a busy worker while another one (or one starting) could take it.
        return self._quick and count <= settings.prefetch and not self._pool._others_may_take()

    def _send(self, item: WorkItem) -> bool:
        """Sends one item; False when feeding must stop (the item went back to ``_held`` to
        wait until nothing is in flight, or the worker is gone)."""
        future = item.future
        if not item.started:
            if future.cancelled() or not future.set_running_or_notify_cancel():
                return True
        item.started = True
        in_flight = self._in_flight
        if item.carries_handles and in_flight:
            # Known to hold handles (see below): not pickled again until it can go.
            self._held.appendleft(item)
            return False
        self._sending = item
        with_handles: Optional[HandleTask] = None
        messages: List[bytes] = []
        try:
            messages = encode_task(item.fn, item.args, item.kwargs, self._settings.dumps)
        except _NotPicklable as exc:
            # Its call holds gipc handles. Their descriptors cannot be taken back once sent,
            # so the task goes only to a worker with nothing else in flight (which is not
            # sent ahead to while it runs it, see _may_send_more): one that took it runs
            # it, unless it dies first.
            item.carries_handles = True
            if in_flight:
                self._sending = None
                self._held.appendleft(item)
                return False
            try:
                with_handles = self._encode_with_handles(item, exc)
            except Exception as error:
                self._sending = None
                future.set_exception(error)
                return True
        except Exception as exc:
            self._sending = None
            future.set_exception(exc)
            return True
        if with_handles is not None:
            size = with_handles.size()
        else:
            size = sum(len(m) for m in messages)
        if in_flight and in_flight.bytes + size > _AHEAD_BYTES:
            # Sending it now might block, and this greenlet must stay free to watch the
            # running task's deadline: it goes once the worker has caught up.
            self._sending = None
            self._held.appendleft(item)
            return False
        assert self._tasks is not None
        first = not in_flight
        if first:
            self._head_since = time.monotonic()
        # In flight (and numbered) before it is written: should the write be cut short,
        # the worker's claims still tell whether it started the task.
        in_flight.add(item, size)
        self._tasks_sent += 1
        self._sending = None
        timer = gevent.Timeout(clamp_timeout(item.timeout) if first else None)
        timer.start()
        try:
            if with_handles is None:
                self._tasks.put_many(messages)
            else:
                self._put_with_handles(item, with_handles)
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
            self._end(reply)
            return False
        return True

    def _encode_with_handles(self, item: WorkItem, refusal: _NotPicklable) -> HandleTask:
        """The messages of ``item``, whose call holds gipc handles (pickle refused them
        with ``refusal``). Raises ``GIPCError`` if they cannot go to this worker."""
        if self._settings.dumps is not None:
            raise GIPCError(
                f"{item.name()} holds gipc handles: they travel to a pool task only with "
                "the pool's default encoder (pickle), not a custom one"
            ) from refusal
        tasks = self._tasks
        assert tasks is not None
        tasks._check_carries_descriptors()
        return encode_task_with_handles(item.fn, item.args, item.kwargs, tasks)

    def _put_with_handles(self, item: WorkItem, task: HandleTask) -> None:
        """Writes a task whose call holds gipc handles: their descriptors go with it, and
        the parent's copies close as it goes (``item.handles_gone``). One that fails or is
        interrupted before that leaves them open, the caller's."""
        tasks = self._tasks
        assert tasks is not None
        sending = False
        try:
            tasks.put(task.head)
            # `with`, not acquire() then try: nothing may come between taking the lock and
            # the block that lets it go (an exception from a signal handler left it taken).
            with tasks._lock:
                sending = True
                try:
                    tasks._send_with_handles(task.payload, task.fds, task.held)
                finally:
                    item.handles_gone = any(handle.closed for handle in task.held)
        except BaseException:
            if not sending:
                task.let_go()
            raise
        if task.larges:
            tasks.put_many(task.larges)

    def take_back_unstarted(self) -> None:
        """Another worker is about to idle: what this one holds, and the tasks it was sent
        and has not claimed, go back to the front of the pool's queue."""
        if self.lost or not self.ready:
            return
        if self._held:
            self._pool._requeue(list(self._held))
            self._held.clear()
        if len(self._in_flight) > 1:
            self._revoke()

    def _revoke(self) -> None:
        """Hands back the tasks sent to it that it has not started."""
        claims = self._claims
        assert claims is not None
        if self.lost or len(self._in_flight) < 2:
            return
        started = claims.revoke(self._in_flight.last_number())
        taken = self._in_flight.take_unclaimed(started)
        if not taken:
            return
        self._tasks_sent -= len(taken)
        if not self._in_flight:
            # Its serving greenlet waits for an outcome that will not come.
            self._revoked_marks += 1
            self._replies.put_nowait(_REVOKED)
        self._pool._requeue(taken)

    # -- Reading its outcomes --

    def _finish_oldest(self) -> bool:
        """Waits for the outcome of the task the worker is running and completes its
        future; False if the worker is gone or was killed (it must be replaced)."""
        item = self._in_flight.oldest()
        deadline = None if item.timeout is None else self._head_since + item.timeout
        reply = self._await_reply(deadline)
        if reply is _REVOKED:
            return True  # what it was sent went to other workers: look again
        if not isinstance(reply, Outcome):
            self._end(reply)
            return False
        self._in_flight.pop_oldest()
        now = time.monotonic()
        self._quick = now - self._head_since < _QUICK_TASK
        self._head_since = now
        item.complete(reply)
        return True

    def _await_reply(self, deadline: Optional[float]) -> Any:
        """The worker's next outcome, ``_TIMED_OUT``, ``_REVOKED``, or a ``_Gone``."""
        while True:
            try:
                if self._exited:
                    # An outcome sent just before the end may still be on its way.
                    reply = self._replies.get(timeout=_outcome.EXIT_GRACE)
                else:
                    reply = self._replies.get(timeout=remaining(deadline))
            except gevent.queue.Empty:
                if self._exited:
                    return _Gone(None)
                # Late by a hair? Use what has arrived rather than kill the worker for it.
                try:
                    reply = self._replies.get_nowait()
                except gevent.queue.Empty:
                    return _TIMED_OUT
            if reply is _EXITED:
                self._exited = True
                continue
            if reply is _REVOKED:
                self._revoked_marks -= 1
            return reply

    def _read_outcomes(self) -> None:
        """Helper greenlet: outcomes off the pipe into the reply queue, then news of EOF."""
        receiver = self._receiver
        assert receiver is not None
        try:
            while True:
                try:
                    outcome = receiver.receive()
                except Exception as exc:  # EOFError: the worker is gone; GIPCError: torn
                    self._replies.put_nowait(_Gone(exc))
                    return
                self._replies.put_nowait(outcome)
                del outcome
        except gevent.GreenletExit:
            raise
        except BaseException as exc:
            # Ctrl-C (or SystemExit) landed here, say while an outcome was unpickled: the
            # serving greenlet must know, or it would wait for ever. The interrupt then
            # goes on to the program (gevent passes it to the main greenlet).
            self._replies.put_nowait(_Gone(exc))
            raise

    def _outcomes_left(self) -> Iterator[Outcome]:
        """Once the worker has exited: the outcomes it sent that were not taken yet."""
        while True:
            reader = self._reader
            try:
                if reader is None or reader.dead:
                    reply = self._replies.get_nowait()
                else:
                    # Its writes are complete; only a process it forked holding the pipe
                    # open could keep the reader from reaching the end of them.
                    reply = self._replies.get(timeout=_outcome.EXIT_GRACE)
            except gevent.queue.Empty:
                return
            if reply is _REVOKED:
                self._revoked_marks -= 1
            elif isinstance(reply, Outcome):
                yield reply
            elif isinstance(reply, _Gone):
                return

    # -- Its end --

    def _end(self, reply: Any, interrupted: Optional[BaseException] = None) -> None:
        """The worker is gone (``reply``: a _Gone), its oldest task timed out
        (``_TIMED_OUT``), or this greenlet was interrupted: stop and reap the worker, then
        settle every task in flight. Those whose outcome it had sent complete with it; the
        one it was running fails; those it never started go to ``_held``, for another
        worker."""
        self.lost = True
        process, claims = self.process, self._claims
        assert process is not None and claims is not None
        in_flight = self._in_flight
        timed_out = in_flight.oldest() if reply is _TIMED_OUT else None
        if isinstance(reply, _Gone) and isinstance(reply.reason, BaseException):
            if not isinstance(reply.reason, Exception):
                interrupted = reply.reason  # in the reader: the outcome it held is lost
            elif not isinstance(reply.reason, EOFError):
                # A torn message or a failed write: whatever the worker is doing, it is no
                # longer talking to us.
                process.kill()
        if timed_out is not None or interrupted is not None:
            process.kill()
        code = self._reap()
        _log.debug(
            "pool worker %d (pid %d) lost: %s, exit code %s",
            self.number,
            self.pid,
            "task timed out" if timed_out is not None else "interrupted" if interrupted else "died",
            code,
        )
        for outcome in self._outcomes_left():
            if not in_flight:
                break
            in_flight.pop_oldest().complete(outcome)
        never_started = in_flight.take_unclaimed(claims.started(in_flight.last_numbered()))
        for item in in_flight.take_all():
            name = item.name()
            error: BaseException
            if item is timed_out:
                assert item.timeout is not None
                error = TaskTimeout(item.timeout, self.pid, name)
            elif interrupted is not None:
                error = BrokenProcessPool(
                    f"the outcome of {name} was lost: the pool was interrupted "
                    f"({type(interrupted).__name__}) while waiting for it from worker "
                    f"process {self.pid}"
                )
                error.__cause__ = interrupted
            else:
                error = WorkerCrashed(self.pid, code, name)
            item.fail(error)
        # Those it never started go to another worker, but for one whose handles it had
        # been sent: they went with it.
        for item in never_started:
            if not item.handles_gone:
                continue
            if item is timed_out:  # its time ran out before the worker took it
                assert item.timeout is not None
                item.fail(TaskTimeout(item.timeout, self.pid, item.name()))
            else:
                item.fail(WorkerCrashed(self.pid, code, item.name(), handles_lost=True))
        self._held.extendleft(reversed([i for i in never_started if not i.handles_gone]))

    def _watch_exit(self) -> int:
        """Helper greenlet: tells the serving greenlet when the process has exited, and
        returns its exit code."""
        try:
            code = _outcome.wait_for_exit(self.process)
        except gevent.GreenletExit:
            raise
        except BaseException:
            # Ctrl-C (see _read_outcomes): another greenlet watches on, and the interrupt
            # goes on to the program.
            self._exit_watch = gevent.spawn(self._watch_exit)
            raise
        self._replies.put_nowait(_EXITED)
        return code

    def _reap(self) -> int:
        """Waits for the worker to exit (killing it if it takes longer than
        ``_STOP_GRACE``) and returns its exit code."""
        process, watch = self.process, self._exit_watch
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

    def _retire(self) -> None:
        """Stops the worker if it is still running, reaps it and closes everything the
        parent held for it."""
        process = self.process
        if process is None:
            return
        _log.debug("retiring pool worker %d (pid %d)", self.number, process.pid)
        tasks = self._tasks
        if tasks is not None and not tasks.closed:
            if process.exitcode is None:
                try:
                    with gevent.Timeout(_STOP_GRACE, False):
                        tasks.put(STOP)
                except (OSError, GIPCError):
                    pass
            try:
                tasks.close()
            except GIPCError:
                tasks._release()
        self._reap()
        gevent.killall([g for g in (self._reader, self._exit_watch) if g is not None])
        if self._receiver is not None:
            self._receiver.close()
        if self._claims is not None:
            self._claims.close()
        process.close()

    # -- For the pool --

    def fail_held(self, error: Callable[[], BaseException]) -> None:
        """The pool broke: what this worker holds fails (what it runs finishes)."""
        for item in self._held:
            item.fail(error())
        self._held.clear()
