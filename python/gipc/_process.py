"""Child processes: the process object, and how to start one.

The process object is a real ``multiprocessing.Process``; how its child is launched and
waited for is gipc's own: a ``_popen.CooperativePopen`` per start method ("fork",
"forkserver", "spawn"; see ``_popen``), chosen by ``start_process(start_method=...)``.
Each child is watched on its own descriptor, so gipc never reaps a process that is not its
own and never touches multiprocessing's behaviour for anybody else.

A spawned child imports this module to unpickle its process object, before it knows what
its target needs. So what only a parent uses (gevent, handles, outcomes, the launchers) is
imported where it is used: a child whose target needs no gevent starts without importing
it, which is most of a fresh interpreter's start-up cost.
"""

from __future__ import annotations

import multiprocessing

# Registers multiprocessing's atexit hook, which terminates daemonic children and joins the
# others when the parent exits normally; gipc's children take part like any other.
import multiprocessing.util  # noqa: F401
import sys
from .exceptions import GIPCError

# typing is not imported at run time: a spawned child imports this module before
# anything else of gipc's, and typing would be ~5% of its start-up (see _startup_child).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, Iterable, Optional, Set, Tuple, Type

    from ._handles import _GIPCHandle, _GIPCWriter
    from ._outcome import CapturedOutcome
    from ._popen import CooperativePopen

#: The start methods gipc offers (multiprocessing's names).
START_METHODS = ("fork", "forkserver", "spawn")


def resolve_start_method(start_method: Optional[str], mp_context: Any = None) -> str:
    """The start method a child gets: ``start_method``, else that of ``mp_context`` (a
    ``multiprocessing`` context), else the one the program set with
    ``multiprocessing.set_start_method()``, else "fork" on Linux and "spawn" on macOS
    (where forking breaks system libraries). Asking never fixes multiprocessing's setting.
    """
    from_context = None
    if mp_context is not None:
        get = getattr(mp_context, "get_start_method", None)
        if get is None:
            raise TypeError(
                "mp_context must be a multiprocessing context (multiprocessing."
                f"get_context(...)), not {type(mp_context).__name__}"
            )
        # allow_none: multiprocessing's default context (the module's own functions) would
        # otherwise fix its start method for the rest of the program; None then means
        # what no context says, below.
        from_context = get(allow_none=True)
    if start_method is not None and from_context is not None and start_method != from_context:
        raise ValueError(
            f"start_method={start_method!r} contradicts mp_context's {from_context!r}"
        )
    method = start_method if start_method is not None else from_context
    if method is None:
        method = multiprocessing.get_start_method(allow_none=True)
    if method is None:
        method = "spawn" if sys.platform == "darwin" else "fork"
    if method not in START_METHODS:
        if isinstance(method, str):
            raise ValueError(
                f"unknown start method {method!r}: use one of {', '.join(START_METHODS)}"
            )
        raise TypeError(f"start_method must be a str, not {type(method).__name__}")
    return method


def _popen_class(method: str) -> Type[CooperativePopen]:
    if method == "fork":
        from ._popen import ForkPopen

        return ForkPopen
    if method == "spawn":
        from ._popen_spawn import SpawnPopen

        return SpawnPopen
    from ._forkserver import ForkServerPopen

    return ForkServerPopen


class _GProcess(multiprocessing.Process):
    """A ``multiprocessing.Process`` whose ``join``, ``is_alive``, ``exitcode`` and
    ``close`` cooperate with gevent, and whose child starts with a fresh gevent hub.

    Created and started by :func:`gipc.start_process`.
    """

    _gipc_handles: Tuple[_GIPCHandle, ...] = ()
    #: How the child is launched (see ``resolve_start_method``).
    _gipc_start_method = "fork"

    #: In the child only, with ``capture=True``: where the outcome goes.
    _outcome_writer: Optional[_GIPCWriter] = None
    #: In the parent, with ``capture=True``: the outcome, until and after it arrives.
    _captured: Optional[CapturedOutcome] = None

    @staticmethod
    def _Popen(process_obj: Any) -> CooperativePopen:  # type: ignore[override]
        return _popen_class(process_obj._gipc_start_method)(process_obj)

    def run(self) -> None:
        """In the child: run the target (and report its outcome when the parent asked for
        it)."""
        writer = self._outcome_writer
        if writer is None:
            super().run()
            return
        from ._outcome import run_and_report  # loaded already: the writer needed it

        target, args, kwargs = self._target, self._args, self._kwargs  # type: ignore[attr-defined]
        run_and_report(writer, target, args, kwargs)

    def result(self, timeout: Optional[float] = None) -> Any:
        """Wait cooperatively for the target's outcome in the child, then return its return
        value or raise the exception it raised. Only for a process started with
        ``start_process(..., capture=True)``.

        A re-raised exception has the child's formatted traceback attached as its
        ``__cause__`` (a :class:`gipc.RemoteTraceback`). The outcome is read once and kept:
        later calls return (or raise) the same again, also after ``join()``/``close()``.

        Args:
            timeout: ``None`` (wait as long as it takes) or a number of seconds.

        Raises:
            TimeoutError: no outcome within ``timeout``; the child keeps running and a later
                call can still collect it.
            gipc.ChildDied: the child ended without an outcome (killed by a signal,
                ``os._exit()``, ``sys.exit()``); ``.exitcode`` says how.
            gipc.UnpicklableOutcome: the return value or exception could not be pickled
                (the message names its type).
            GIPCError: the process was started without ``capture=True``.
            ValueError: the process object was closed before the outcome was collected.
        """
        captured = self._captured
        if captured is None:
            raise GIPCError(
                f"{self!r} was started without capture=True: it reports no outcome "
                "(use start_process(..., capture=True) to get one)"
            )
        if captured.outcome is None:
            self._check_closed()  # type: ignore[attr-defined]
            if not captured.collect(self, timeout):
                raise TimeoutError(f"{self!r} reported no outcome within {timeout} s")
        assert captured.outcome is not None
        return captured.outcome.unwrap()

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait cooperatively for the child to exit, at most ``timeout`` seconds.

        With ``capture=True`` the outcome is read (and kept for ``result()``) while waiting:
        a child whose outcome is larger than the pipe's buffer cannot exit before someone
        reads it, so a plain join would wait for ever.
        """
        if timeout is not None and timeout != timeout:
            # Refused whatever the state of the child (a child that had ended returned at
            # once, one still running raised).
            raise ValueError("a timeout cannot be NaN")
        captured = self._captured
        if captured is not None and captured.receiver is not None:
            self._check_closed()  # type: ignore[attr-defined]
            timeout = captured.collect_for_join(self, timeout)
        super().join(timeout)

    def interrupt(self) -> None:
        """Send the child SIGINT (``multiprocessing.Process.interrupt()`` of Python 3.14,
        here on every version)."""
        self._check_closed()  # type: ignore[attr-defined]
        popen = self._popen  # type: ignore[attr-defined]
        if popen is None:
            raise ValueError("process not started")
        popen.interrupt()

    def close(self) -> None:
        """Release the resources of an exited process (``multiprocessing.Process.close``),
        including the outcome pipe. An outcome not collected by then is lost."""
        super().close()
        if self._captured is not None:
            self._captured.close_receiver()

    def __repr__(self) -> str:
        return "<_GProcess" + super().__repr__()[len("<_GProcess") :]


def _collect_handles(obj: Any, found: Set[_GIPCHandle]) -> None:
    """Finds the handles passed to a child: directly in ``args``/``kwargs`` or inside
    tuples, lists, sets and dicts (keys and values) nested to any depth. Iterative, and
    each container is looked into once: neither deep nesting nor a container that holds
    itself can stop the search (a handle missed would be closed in the child and left
    open in the parent, silently)."""
    from ._handles import _GIPCDuplexHandle, _GIPCHandle

    pending = [obj]
    seen: Set[int] = set()
    while pending:
        obj = pending.pop()
        if isinstance(obj, _GIPCHandle):
            found.add(obj)
        elif isinstance(obj, _GIPCDuplexHandle):
            found.update(obj._parts())
        elif isinstance(obj, (tuple, list, set, frozenset, dict)):
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(obj, dict):
                pending.extend(obj.keys())
                pending.extend(obj.values())
            else:
                pending.extend(obj)


def start_process(
    target: Callable[..., Any],
    args: Tuple[Any, ...] = (),
    kwargs: Optional[Dict[str, Any]] = None,
    daemon: Optional[bool] = None,
    name: Optional[str] = None,
    *,
    capture: bool = False,
    start_method: Optional[str] = None,
    mp_context: Any = None,
) -> _GProcess:
    """Start a child process that runs ``target(*args, **kwargs)`` and return its
    :class:`_GProcess` (a ``multiprocessing.Process``), already started.

    gipc handles found in ``args``/``kwargs`` (also inside tuples, lists, sets and dicts,
    keys and values) are usable in the child and closed in the parent; every other gipc handle is
    closed in the child. The child starts with a fresh gevent hub and event loop and with
    default signal dispositions (SIGPIPE aside).

    ``start_method`` says how the child is launched: "fork" (a copy of the caller: quick,
    nothing pickled, but the caller's event loop waits while its memory map is copied, and
    forking a caller that runs threads is unsafe), "forkserver" (forked by gipc's fork
    server: a start cost that does not grow with the caller) or "spawn" (a fresh
    interpreter). For the last two, ``target``, ``args`` and ``kwargs`` must pickle (a
    module-level function, not a lambda or closure), and the main module is imported in
    the child under ``__mp_main__`` (so it needs ``if __name__ == "__main__":``). ``None``:
    ``mp_context``'s method if given (a ``multiprocessing`` context), else the one set with
    ``multiprocessing.set_start_method()``, else "fork" on Linux and "spawn" on macOS.

    With ``capture=True`` the child reports the target's outcome, its return value or the
    exception it raised, and ``process.result(timeout=None)`` returns or re-raises it in
    the parent (with the child's traceback as ``__cause__``). The cost: one more pipe (two
    descriptors, the parent's closed once the outcome is read or the process joined or
    closed) and one message, in which the return value or exception is pickled. The exit
    code is unchanged: 0, or 1 after an exception. Without it, nothing is sent back.

    Raises:
        TypeError: ``target`` is not callable, ``args`` not a tuple or ``kwargs`` not a dict.
        ValueError: an unknown ``start_method``, or one that contradicts ``mp_context``.
        GIPCTypeError: "forkserver"/"spawn" and something passed cannot be pickled (the
            message names it).
        GIPCClosed, GIPCLocked: a handle passed in is closed, or in use by a greenlet.
        GIPCError: the fork server died before it started the child.
    """
    if kwargs is None:
        kwargs = {}
    if not callable(target):
        raise TypeError(f"target must be callable, not {type(target).__name__}")
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple, not {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict, not {type(kwargs).__name__}")
    method = resolve_start_method(start_method, mp_context)
    passed: Set[_GIPCHandle] = set()
    _collect_handles(args, passed)
    _collect_handles(kwargs, passed)
    for handle in passed:
        handle._check_passable()
    process = _GProcess(target=target, name=name, args=args, kwargs=kwargs, daemon=daemon)
    process._gipc_handles = tuple(passed)
    process._gipc_start_method = method
    if capture:
        from ._outcome import CapturedOutcome, OutcomeReceiver, outcome_pipe

        outcome_reader, outcome_writer = outcome_pipe()
        process._gipc_handles += (outcome_writer,)
        process._outcome_writer = outcome_writer
        try:
            process.start()
        except BaseException:
            outcome_reader._release()
            outcome_writer._release()
            raise
        outcome_writer._release()
        process._outcome_writer = None
        process._captured = CapturedOutcome(OutcomeReceiver(outcome_reader))
    else:
        process.start()
    if passed:
        import logging  # loaded already, by the handles

        logging.getLogger("gipc").debug(
            "handed %s to child pid %d, closed here", _describe(passed), process.pid
        )
    for handle in passed:
        handle._release()
    process._gipc_handles = ()
    return process


def _describe(handles: Iterable[_GIPCHandle]) -> str:
    return ", ".join(sorted(repr(handle) for handle in handles))
