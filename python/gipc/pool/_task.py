"""A task: the parent's record of one submitted call, and the messages it travels as.

On the wire a task is a head (``pickle.dumps`` of where its large ``bytes`` arguments
belong), the encoded call (pickled, or by the pool's encoder) with ``None`` in their places,
then those arguments as they are (see :mod:`gipc._large_payload`). An empty message
(:data:`STOP`) tells the worker to exit.
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from .. import _large_payload, _outcome
from .._handles import _GIPCReader
from .._large_payload import Slot
from .._outcome import Outcome

if TYPE_CHECKING:
    from ._future import Future

_HIGHEST = pickle.HIGHEST_PROTOCOL

#: The message that tells a worker to exit.
STOP = b""


class WorkItem:
    """One submitted call and its future, from the pool's queue until its future is done."""

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


# --- In the worker ---------------------------------------------------------------------------


class ReceivedTask:
    """A task as it came off the pipe, not decoded yet: it may turn out to be revoked."""

    __slots__ = ("slots", "body", "larges")

    def __init__(self, slots: List[Slot], body: bytes, larges: List[bytes]) -> None:
        self.slots = slots
        self.body = body
        self.larges = larges

    def run(self, loads: Callable[[bytes], Any] = pickle.loads) -> Outcome:
        """Decodes the call, puts the separately sent arguments in place, and runs it."""
        try:
            fn, args, kwargs = loads(self.body)
        except Exception as exc:
            return Outcome(exception=exc)
        args, kwargs = _large_payload.put_back(self.slots, self.larges, args, kwargs)
        return _outcome.call(fn, args, kwargs)


def receive_task(tasks: _GIPCReader) -> Optional[ReceivedTask]:
    """The next task's messages, or ``None`` when told to stop (or the parent is gone).
    Nothing is decoded yet but the head: the task may turn out to be revoked."""
    try:
        head = tasks.get()
        if head == STOP:
            return None
        slots = pickle.loads(head)
        body = tasks.get()
        larges = _large_payload.receive_larges(tasks, len(slots))
    except EOFError:
        return None
    return ReceivedTask(slots, body, larges)
