"""The outcome of code run in a child (its return value, or the exception it raised) and how
it travels back to the parent.

Used by ``start_process(..., capture=True)`` with ``_GProcess.result()``, and by the workers
of :class:`gipc.pool.ProcessPool`. Both ends of an outcome pipe belong to gipc, so the pipe
carries raw bytes (no codec) and the pickling happens here. A value or exception that cannot
be pickled is then caught in the child, where its type is still known, and replaced by an
error the parent can explain, rather than failing inside ``put`` with nothing sent back.

One outcome on the wire is one of:

* ``dumps((VALUE, value))``: a return value, pickled inline;
* ``dumps((VALUE_RAW,))`` followed by the value itself as a second message: a large ``bytes``
  return value, which travels apart from the pickle (see :mod:`gipc._large_payload`);
* ``dumps((ERROR, exception, traceback_text, pid))``: the code raised.
"""

from __future__ import annotations

import os
import pickle
import signal
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

import gevent
from gevent.lock import Semaphore

from . import _large_payload
from ._handles import _GIPCReader, _GIPCWriter
from ._hub import clamp_timeout, deadline_after, remaining
from .exceptions import GIPCError

VALUE = 0
VALUE_RAW = 1
ERROR = 2

#: After a child is seen to exit, how long to keep reading for an outcome it sent just
#: before. Everything it wrote is in the kernel by then, so this is only ever waited out in
#: full when a descendant of the child still holds the pipe's write end open.
EXIT_GRACE = 0.5

_HIGHEST = pickle.HIGHEST_PROTOCOL
_RAW_HEADER = pickle.dumps((VALUE_RAW,), protocol=_HIGHEST)


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a child, as text.

    Attached as ``__cause__`` to the exception re-raised in the parent, so a printed
    traceback shows where in the child it happened, followed by where the parent got it.
    """

    def __init__(self, text: str, pid: Optional[int] = None) -> None:
        super().__init__(text, pid)
        self.text = text
        self.pid = pid

    def __str__(self) -> str:
        where = "a child process" if self.pid is None else f"child process {self.pid}"
        return f"traceback in {where}:\n\n{self.text.rstrip()}\n"


class ChildDied(GIPCError):
    """The child ended without reporting an outcome: it was killed by a signal, called
    ``os._exit()`` or ``sys.exit()``, or crashed. ``exitcode`` is its exit code as
    ``multiprocessing`` reports it (``-N`` for signal N); ``pid`` is its process id."""

    def __init__(self, pid: int, exitcode: int) -> None:
        super().__init__(
            f"child process {pid} {describe_exit(exitcode)} before reporting an outcome"
        )
        self.pid = pid
        self.exitcode = exitcode

    def __reduce__(self) -> Tuple[Any, ...]:
        return type(self), (self.pid, self.exitcode)


class UnpicklableOutcome(GIPCError):
    """The child's return value or exception could not be sent to the parent: it cannot be
    pickled, or (for exceptions) cannot be rebuilt from its pickle. The message names the
    type and the pickling error; ``__cause__`` carries the child's traceback."""


class Outcome:
    """A return value or an exception; ``unwrap()`` returns the one or raises the other."""

    __slots__ = ("value", "exception")

    def __init__(self, value: Any = None, exception: Optional[BaseException] = None) -> None:
        self.value = value
        self.exception = exception

    def unwrap(self) -> Any:
        if self.exception is not None:
            raise self.exception
        return self.value


def describe_exit(exitcode: int) -> str:
    """``"exited with code 3"`` or ``"was killed by SIGKILL (signal 9)"``."""
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "an unknown signal"
        return f"was killed by {name} (signal {-exitcode})"
    return f"exited with code {exitcode}"


def outcome_pipe() -> Tuple[_GIPCReader, _GIPCWriter]:
    """The pipe an outcome travels on: ``bytes`` as they are, the pickling done here."""
    return _large_payload.bytes_pipe()


# --- In the child -------------------------------------------------------------------------


def call(fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Outcome:
    """Runs ``fn(*args, **kwargs)`` and captures what came of it.

    ``SystemExit`` is not an outcome: it propagates, so the child ends with the exit code it
    asked for and the parent learns that code (as ``ChildDied``) instead of receiving an
    exception that would end the parent too.
    """
    try:
        return Outcome(value=fn(*args, **kwargs))
    except SystemExit:
        raise
    except BaseException as exc:
        return Outcome(exception=exc)


def encode(outcome: Outcome, pid: int) -> List[bytes]:
    """The messages that carry ``outcome``. Never raises for an unpicklable value or
    exception: those become an :class:`UnpicklableOutcome` that says what failed."""
    exc = outcome.exception
    if exc is None:
        value = outcome.value
        if _large_payload.is_large(value):
            return [_RAW_HEADER, value]
        try:
            return [pickle.dumps((VALUE, value), protocol=_HIGHEST)]
        except Exception as err:
            exc = UnpicklableOutcome(
                f"the return value, of type {_type_name(value)}, cannot be pickled: "
                f"{_describe(err)}"
            )
            tb_text = _format(err)
    else:
        # Without the frame of `call`: the remote traceback starts where the caller's
        # code does.
        tb = exc.__traceback__
        if tb is not None and tb.tb_frame.f_code is call.__code__:
            tb = tb.tb_next
        tb_text = "".join(traceback.format_exception(type(exc), exc, tb))
    try:
        data = pickle.dumps((ERROR, exc, tb_text, pid), protocol=_HIGHEST)
        # Many exception types pickle fine but cannot be rebuilt from the pickle (an
        # __init__ with other arguments than `args`): better found out here than in the
        # parent, where nothing would be left to say what the exception was.
        pickle.loads(data)
    except Exception as err:
        replacement = UnpicklableOutcome(
            f"the exception {_type_name(exc)}: {_safe_str(exc)} cannot be pickled: "
            f"{_describe(err)}"
        )
        data = pickle.dumps((ERROR, replacement, tb_text, pid), protocol=_HIGHEST)
    return [data]


def send(writer: _GIPCWriter, outcome: Outcome) -> bool:
    """Sends ``outcome``; False when the parent is no longer listening."""
    messages = encode(outcome, os.getpid())
    try:
        if len(messages) == 1:
            writer.put(messages[0])
        else:
            writer.put_many(messages)
    except (OSError, GIPCError):  # the parent closed its end, or is gone
        return False
    return True


def run_and_report(
    writer: _GIPCWriter,
    target: Callable[..., Any],
    args: Tuple[Any, ...],
    kwargs: Dict[str, Any],
) -> None:
    """The body of a ``capture=True`` child: run the target, send its outcome, then behave
    as ``multiprocessing`` would without capture, so an exception is re-raised (it is
    printed and the exit code is 1). Closing the writer right after sending lets the
    parent's read complete even if the child lingers on in its exit handlers."""
    outcome = call(target, args, kwargs)
    send(writer, outcome)
    writer.close()
    if outcome.exception is not None:
        raise outcome.exception


# --- In the parent ------------------------------------------------------------------------


class OutcomeReceiver:
    """Reads outcomes from an outcome pipe. A read interrupted between the two messages of a
    raw value resumes where it stopped, so ``receive`` may be abandoned (killed, timed out)
    and called again."""

    def __init__(self, reader: _GIPCReader) -> None:
        self._reader = reader
        self._raw_pending = False

    @property
    def closed(self) -> bool:
        return self._reader.closed

    def receive(self) -> Outcome:
        """The next outcome, waiting cooperatively for it.

        Raises:
            EOFError: the child closed the pipe (it is gone) and sent nothing more.
            GIPCError: a torn message (the child died while writing it).
        """
        if not self._raw_pending:
            data = self._reader.get()
            try:
                message = pickle.loads(data)
            except Exception as err:
                return Outcome(
                    exception=UnpicklableOutcome(
                        f"the child's outcome cannot be unpickled: {_describe(err)}"
                    )
                )
            tag = message[0]
            if tag == VALUE:
                return Outcome(value=message[1])
            if tag == ERROR:
                _, exc, tb_text, pid = message
                exc.__cause__ = RemoteTraceback(tb_text, pid)
                exc.__suppress_context__ = True
                return Outcome(exception=exc)
            self._raw_pending = True
        (value,) = _large_payload.receive_larges(self._reader, 1)
        self._raw_pending = False
        return Outcome(value=value)

    def close(self) -> None:
        """Closes the read end. One still in use by a greenlet is left for it to finish
        with (and to the garbage collector)."""
        if not self._reader.closed:
            try:
                self._reader.close()
            except GIPCError:
                pass


def await_outcome(
    receiver: OutcomeReceiver,
    process: Any,
    timeout: Optional[float],
    keep: Callable[[Outcome], None],
) -> Optional[Outcome]:
    """Waits cooperatively, at most ``timeout`` seconds, until the child ``process`` has
    reported an outcome or ended without one (then the outcome is a :class:`ChildDied`).
    Returns ``None`` when the time is up first.

    An outcome read from the pipe is handed to ``keep`` by the greenlet that read it, the
    moment it is complete: the read is left to a greenlet of its own, which this wait kills
    when it gives up (or is itself killed), and such a kill lands only when that greenlet
    next switches, which may be after the read has finished. What it read then would be
    lost with its return value, and the stream left at its end. (Killed mid-read, the
    reader keeps what it has, and the next call goes on from there.)

    The end of the child is watched separately from the pipe: a descendant that inherited
    the pipe's write end would otherwise hide it, and a child killed halfway through a
    message leaves nothing to read but that half.
    """
    deadline = deadline_after(timeout)
    getter = gevent.spawn(_receive_or_error, receiver, keep)
    exited = gevent.spawn(wait_for_exit, process)
    try:
        gevent.wait([getter, exited], timeout=remaining(deadline), count=1)
        if not getter.ready():
            if not exited.ready():
                return None
            left = remaining(deadline)
            if left is not None and left < EXIT_GRACE:  # the deadline comes first
                getter.join(left)
                if not getter.ready():
                    return None
            else:
                getter.join(EXIT_GRACE)
        received = getter.value if getter.ready() else None
        if isinstance(received, Outcome):
            return received
        if received is not None and not isinstance(received, (EOFError, GIPCError, OSError)):
            raise received
        exited.join(remaining(deadline))
        if not exited.ready():
            return None
        if exited.exception is not None:
            raise exited.exception
        return Outcome(exception=ChildDied(process.pid, exited.value))
    finally:
        gevent.killall([getter, exited])


def _receive_or_error(receiver: OutcomeReceiver, keep: Callable[[Outcome], None]) -> Any:
    # Returned, not raised: gevent would print an exception raised in a greenlet.
    try:
        outcome = receiver.receive()
    except Exception as exc:
        return exc
    keep(outcome)  # before anything can switch away (see await_outcome)
    return outcome


def wait_for_exit(process: Any) -> int:
    """Waits cooperatively until ``process`` (a started ``_GProcess``) has ended and been
    reaped; returns its exit code. The process's own monitor does the waiting (one watcher
    per child, however many wait); it wakes every waiter whoever reaps the child."""
    popen = process._popen
    popen.wait(None)
    return popen.returncode  # type: ignore[no-any-return]


def _type_name(obj: Any) -> str:
    cls = type(obj)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {_safe_str(err)}"


def _safe_str(obj: Any) -> str:
    try:
        text = str(obj)
    except Exception:
        return f"<unprintable {type(obj).__name__}>"
    return text if len(text) <= 500 else text[:500] + "..."


def _format(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


class CapturedOutcome:
    """A ``capture=True`` child's outcome as its parent sees it: coming (``receiver`` is
    the pipe's read end), then known (``outcome``), whoever asked first. One greenlet at a
    time reads; the others wait for what it finds. Once it is known (or the process is
    closed), the read end is closed: it has nothing more to give."""

    def __init__(self, receiver: OutcomeReceiver) -> None:
        self.receiver: Optional[OutcomeReceiver] = receiver
        self.outcome: Optional[Outcome] = None
        self._lock = Semaphore()

    def collect(self, process: Any, timeout: Optional[float]) -> bool:
        """Reads the outcome (or finds that the child died without one), at most
        ``timeout`` seconds; True once it is known."""
        if self.outcome is not None or self.receiver is None:
            self._known()
            return self.outcome is not None
        deadline = deadline_after(timeout)
        if not self._lock.acquire(timeout=clamp_timeout(timeout)):
            return False
        try:
            receiver = self.receiver
            if self.outcome is None and receiver is not None:
                outcome = await_outcome(receiver, process, remaining(deadline), self.keep)
                if outcome is not None:
                    self.keep(outcome)
            return self.outcome is not None
        finally:
            self._known()
            self._lock.release()

    def collect_for_join(self, process: Any, timeout: Optional[float]) -> Optional[float]:
        """``join()``'s first step: a child whose outcome is larger than the pipe's buffer
        cannot exit before someone reads it, so the outcome is read (at most ``timeout``
        seconds) before the exit is waited for. Returns what is left of ``timeout``."""
        deadline = deadline_after(timeout)
        self.collect(process, timeout)
        return remaining(deadline)

    def keep(self, outcome: Outcome) -> None:
        """Called by whichever greenlet reads the outcome, as soon as it has it: kept here,
        it survives a timeout or kill of the wait that asked for it."""
        if self.outcome is None:
            self.outcome = outcome

    def _known(self) -> None:
        if self.outcome is not None:
            self.close_receiver()

    def close_receiver(self) -> None:
        receiver, self.receiver = self.receiver, None
        if receiver is not None:
            receiver.close()
