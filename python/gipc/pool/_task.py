"""A task: the parent's record of one submitted call, and the messages it travels as.

On the wire a task is a head (``pickle.dumps`` of where its large ``bytes`` arguments
belong), the encoded call (pickled, or by the pool's encoder) with ``None`` in their places,
then those arguments as they are (see :mod:`gipc._large_payload`). An empty message
(:data:`STOP`) tells the worker to exit.

A call that holds gipc handles travels as a message with handles (see
:mod:`gipc._transfer`): its head starts with :data:`WITH_HANDLES`, and the call is a
``KIND_HANDLES`` frame whose descriptors go with it (``SCM_RIGHTS``), decoded as it is read.
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from .. import _large_payload, _outcome
from .._handles import _GIPCHandle, _GIPCReader, _GIPCWriter
from .._large_payload import Slot
from .._outcome import Outcome

if TYPE_CHECKING:
    from ._future import Future

_HIGHEST = pickle.HIGHEST_PROTOCOL

#: The message that tells a worker to exit.
STOP = b""
#: First in a head whose call carries gipc handles (a slot is never None).
WITH_HANDLES = None


class WorkItem:
    """One submitted call and its future, from the pool's queue until its future is done."""

    __slots__ = (
        "future", "fn", "args", "kwargs", "timeout", "started", "carries_handles", "handles_gone"
    )

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
        #: Its call holds gipc handles: it goes only to an idle worker, and nothing is sent
        #: ahead of it (see ``Worker._send``).
        self.carries_handles = False
        #: Those handles went to a worker (the parent's copies are closed): it cannot be
        #: sent to another one.
        self.handles_gone = False

    def name(self) -> str:
        """``task fn()`` for error messages."""
        return task_name(self.fn)

    def complete(self, outcome: Outcome) -> None:
        """Completes the future with what the worker reported."""
        if outcome.exception is None:
            self.future.set_result(outcome.value)
        else:
            self.future.set_exception(outcome.exception)

    def fail(self, error: BaseException) -> None:
        """Fails the future with ``error`` unless it is done already (or cancelled)."""
        future = self.future
        if future.done():
            return
        if future.running() or future.set_running_or_notify_cancel():
            future.set_exception(error)


def task_name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return f"task {name}()" if name else "the task"


# --- In the parent ---------------------------------------------------------------------------


def encode_task(
    fn: Callable[..., Any],
    args: Tuple[Any, ...],
    kwargs: Dict[str, Any],
    dumps: Optional[Callable[[Any], Any]] = None,
) -> List[bytes]:
    """The messages of one task: which arguments travel on their own, the encoded call
    (pickled, or by the pool's ``dumps``), then those arguments (large ``bytes``, sent as
    they are). Raises what the encoder raises."""
    slots, args, kwargs, larges = _large_payload.take_out(args, kwargs)
    if dumps is None:
        body = pickle.dumps((fn, args, kwargs), protocol=_HIGHEST)
    else:
        body = dumps((fn, args, kwargs))
    return [pickle.dumps(tuple(slots), protocol=_HIGHEST), body, *larges]


class HandleTask(NamedTuple):
    """The messages of a task whose call holds gipc handles (:func:`encode_task_with_handles`):
    the head, the call as a ``KIND_HANDLES`` payload with its descriptors and the handles it
    holds (locked until :meth:`gipc._handles._GIPCWriter._send_with_handles` lets them
    go), then the large arguments."""

    head: bytes
    payload: bytes
    fds: List[int]
    held: List[_GIPCHandle]
    larges: List[bytes]

    def size(self) -> int:
        return len(self.head) + len(self.payload) + sum(len(m) for m in self.larges)

    def let_go(self) -> None:
        """Unlocks the handles it holds, open: for a task that is not sent after all."""
        for handle in self.held:
            handle._lock.release()


def encode_task_with_handles(
    fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any], sender: _GIPCWriter
) -> HandleTask:
    """The messages of a task whose call holds gipc handles, to be put on ``sender``.
    Raises what pickling it raises (``GIPCClosed``, ``GIPCLocked``, ``GIPCError`` for a
    handle that cannot travel; none is then held)."""
    from .._transfer import dumps_message

    slots, args, kwargs, larges = _large_payload.take_out(args, kwargs)
    payload, _, fds, held = dumps_message((fn, args, kwargs), sender)
    head = pickle.dumps((WITH_HANDLES, *slots), protocol=_HIGHEST)
    return HandleTask(head, payload, fds, held, larges)


# --- In the worker ---------------------------------------------------------------------------


class ReceivedTask:
    """A task as it came off the pipe, not decoded yet: it may turn out to be revoked."""

    __slots__ = ("slots", "body", "larges", "with_handles")

    def __init__(
        self, slots: List[Slot], body: Any, larges: List[bytes], with_handles: bool = False
    ) -> None:
        self.slots = slots
        #: The encoded call; from a message with handles, the call itself, or the Outcome
        #: of its failed decoding.
        self.body = body
        self.larges = larges
        #: Its call carries handles and is not read yet (see :meth:`read_call`).
        self.with_handles = with_handles

    def read_call(self, tasks: _GIPCReader) -> bool:
        """A task with handles, once claimed: reads its call, decoding it as it comes (its
        descriptors are taken then), and its large arguments. A call that cannot be
        decoded (a function or class this worker does not know, say) is the task's
        outcome, as for any task. False if the parent is gone."""
        try:
            try:
                self.body = tasks.get()
            except EOFError:
                raise
            except Exception as exc:  # read whole, not decoded: the stream is in step
                self.body = Outcome(exception=exc)
            self.larges = _large_payload.receive_larges(tasks, len(self.slots))
        except EOFError:
            return False
        self.with_handles = False
        return True

    def run(self, loads: Callable[[bytes], Any] = pickle.loads) -> Outcome:
        """Decodes the call, puts the separately sent arguments in place, and runs it."""
        body = self.body
        self.body = None  # the task's handles close when the call is done with them
        if body.__class__ is Outcome:
            return body
        try:
            fn, args, kwargs = body if body.__class__ is tuple else loads(body)
        except Exception as exc:
            return Outcome(exception=exc)
        del body
        args, kwargs = _large_payload.put_back(self.slots, self.larges, args, kwargs)
        return _outcome.call(fn, args, kwargs)


def receive_task(tasks: _GIPCReader) -> Optional[ReceivedTask]:
    """The next task's messages, or ``None`` when told to stop (or the parent is gone).
    Nothing is decoded yet but the head: the task may turn out to be revoked. Of a task
    with handles only the head is read: its call, decoded as it is read (the descriptors
    are taken then), is read once the task is claimed (``read_call``)."""
    try:
        head = tasks.get()
        if head == STOP:
            return None
        slots = pickle.loads(head)
        if slots and slots[0] is WITH_HANDLES:
            return ReceivedTask(list(slots[1:]), None, [], with_handles=True)
        body = tasks.get()
        larges = _large_payload.receive_larges(tasks, len(slots))
    except EOFError:
        return None
    return ReceivedTask(slots, body, larges)
