"""Child processes: start them with a fresh gevent state, and watch them cooperatively.

The process object is a real ``multiprocessing.Process``; only how it forks and waits is
gipc's own (``_CooperativePopen``), and how the child starts (``_child``: what
multiprocessing's fork child does, with fewer copied pages). That keeps gipc independent of
multiprocessing's start method setting (it always forks), and it watches each child on its
own descriptor — a pidfd on Linux, the exit sentinel pipe elsewhere — so it never reaps a
process that is not its own and never touches multiprocessing's behaviour for anybody else.
"""

from __future__ import annotations

import logging
import multiprocessing

# Registers multiprocessing's atexit hook, which terminates daemonic children and joins the
# others when the parent exits normally; gipc's children take part like any other.
import multiprocessing.util  # noqa: F401
import os
import signal
import struct
import sys
import time
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import gevent
import gevent.event
from gevent.hub import get_hub
from gevent.lock import Semaphore

from . import _child, _handles, _outcome
from ._handles import _GIPCDuplexHandle, _GIPCHandle, _GIPCWriter
from ._hub import READ, clamp_timeout
from ._outcome import Outcome, OutcomeReceiver
from .exceptions import GIPCError

#: gipc's lifecycle records (debug level; silent unless the program configures logging).
_log = logging.getLogger("gipc")

#: What a child writes to its sentinel pipe just before it exits.
_EXIT_CODE = struct.Struct("<i")

#: What start_process blocks across the fork (the system ignores SIGKILL and SIGSTOP there).
_ALL_SIGNALS = signal.valid_signals()

#: Process monitors of this process's live children, so a forked child can close the
#: descriptors that watch its siblings.
_live_popens: "weakref.WeakSet[_CooperativePopen]" = weakref.WeakSet()


class _CooperativePopen:
    """Forks the child and waits for it without blocking the event loop.

    Implements the part of ``multiprocessing.popen_fork.Popen``'s interface that
    ``multiprocessing.Process`` relies on: ``pid``, ``sentinel``, ``returncode``, ``poll``,
    ``wait``, ``interrupt`` (3.14), ``terminate``, ``kill`` and ``close``.
    """

    method = "fork"

    def __init__(self, process_obj: "_GProcess") -> None:
        self.returncode: Optional[int] = None
        self._exit_fd: Optional[int] = None
        self._parent_fds: Tuple[int, ...] = ()
        self._exit_watcher: Any = None
        self._retry_timer: Any = None
        self._retry_delay = 0.001  # libuv timers have millisecond resolution
        self._exited = gevent.event.Event()
        _flush_std_streams()
        self._launch(process_obj)

    def _launch(self, process_obj: "_GProcess") -> None:
        # Two pipes, as multiprocessing makes them: the parent's read end becomes readable
        # when the child is gone (`sentinel`); the child's read end does the same when the
        # parent is gone (`multiprocessing.parent_process().sentinel`).
        start = _child.ChildStart(process_obj)
        parent_pid = os.getpid()
        pipe_fds: List[int] = []
        try:
            parent_r, child_w = os.pipe()
            pipe_fds += (parent_r, child_w)
            child_r, parent_w = os.pipe()
            pipe_fds += (child_r, parent_w)
            start.ready(child_r)
            # Every signal stays blocked from before the fork (and the at-fork hooks) until
            # the child has reset the dispositions it inherited: a signal that comes early,
            # a Ctrl-C or a terminate() right after start_process returns, then meets the
            # default action. Unblocked earlier, it would run the parent's Python handler
            # in the child, in gipc's start-up code, which would swallow its exception and
            # carry on.
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, _ALL_SIGNALS)
            try:
                # Looked up at call time: under gevent.monkey this is gevent's fork, which
                # registers the child with gevent's own SIGCHLD handling, and os.waitpid is
                # its matching wait.
                pid = os.fork()
            finally:
                if os.getpid() == parent_pid:
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        except BaseException:
            start.forget()
            for fd in pipe_fds:
                os.close(fd)
            raise
        if pid == 0:
            code = 1
            try:
                os.close(parent_r)
                os.close(parent_w)
                if (
                    _handles._open_handles.data  # type: ignore[attr-defined]
                    or _live_popens.data  # type: ignore[attr-defined]
                    or _child.parent_only_fds
                ):
                    _release_inherited(process_obj._gipc_handles)
                code = start.run()  # resets the signals, then unblocks them
            except BaseException:  # gipc's own start-up failed: say why before exiting
                import traceback

                traceback.print_exc()
            finally:
                # Also tell the parent through the sentinel: if someone else in the parent
                # reaps us (gevent's SIGCHLD handling reaps every child once
                # gevent.subprocess was used), the exit code is not lost.
                try:
                    os.write(child_w, _EXIT_CODE.pack(code))
                finally:
                    os._exit(code)
        start.forget()
        self.pid = pid
        os.close(child_w)
        os.close(child_r)
        self.sentinel = parent_r
        self._parent_fds = (parent_r, parent_w)
        _child.parent_only_fds.update(self._parent_fds)
        self._exit_fd = _open_pidfd(pid)
        _live_popens.add(self)
        _log.debug("started child %s (pid %d)", process_obj.name, pid)

    def poll(self, flag: int = os.WNOHANG) -> Optional[int]:
        """Reaps the child if it has exited; never blocks, whatever ``flag`` says."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                # Reaped by somebody else (gevent's SIGCHLD handling, or a waitpid(-1)
                # elsewhere in the program). The child wrote its exit code to the sentinel
                # before exiting, unless a signal killed it: then 255 is all we can say.
                pid, status = self.pid, self._reported_exit_status()
            if pid == 0:
                return None
            self.returncode = os.waitstatus_to_exitcode(status)
            _log.debug("child pid %d exited with code %d", self.pid, self.returncode)
            self._release()
            self._exited.set()  # whoever reaped it, every waiting join() returns
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Waits cooperatively for the child to exit, at most ``timeout`` seconds."""
        if self.poll() is not None:
            return self.returncode
        if timeout is not None and timeout <= 0:
            return None
        if self._exit_watcher is None:
            self._watch_exit()
        self._exited.wait(clamp_timeout(timeout))
        return self.returncode

    # One io watcher on the exit descriptor per child, however many greenlets join it; its
    # callbacks run in the hub and reap the child (no greenlet of its own: fewer switches,
    # and fewer pages written in the parent while the child exits).

    def _watch_exit(self) -> None:
        fd = self._exit_fd if self._exit_fd is not None else self.sentinel
        self._exit_watcher = get_hub().loop.io(fd, READ)
        self._exit_watcher.start(self._on_exit_readable)

    def _on_exit_readable(self) -> None:
        # Reaping closes the descriptor and its watcher: not inside the watcher's callback.
        self._exit_watcher.stop()
        get_hub().loop.run_callback(self._reap_or_retry)

    def _reap_or_retry(self) -> None:
        if self.poll() is not None:
            return
        # The descriptor fired a moment before the exit status is ready (the sentinel closes
        # before the child is a zombie; gevent's own SIGCHLD bookkeeping may lag the pidfd):
        # look again shortly.
        self._retry_timer = get_hub().loop.timer(self._retry_delay)
        self._retry_delay = min(self._retry_delay * 2, 0.05)
        self._retry_timer.start(self._on_retry_due)

    def _on_retry_due(self) -> None:
        get_hub().loop.run_callback(self._retry)

    def _retry(self) -> None:
        timer, self._retry_timer = self._retry_timer, None
        if timer is not None:
            timer.close()
        if self.poll() is None and self._exit_watcher is not None:
            self._exit_watcher.start(self._on_exit_readable)

    def _send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def interrupt(self) -> None:
        """SIGINT, for ``Process.interrupt()`` (new in Python 3.14, offered by gipc on every
        version). The child starts with default dispositions, so unless it installs a
        handler this ends it with ``exitcode == -SIGINT``."""
        self._send_signal(signal.SIGINT)

    def terminate(self) -> None:
        self._send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self._send_signal(signal.SIGKILL)

    def close(self) -> None:
        self._release()

    def _reported_exit_status(self) -> int:
        """The wait status matching the exit code the child wrote before ``_exit``."""
        code = 255
        if self._parent_fds:
            try:
                # Non-blocking: a grandchild may still hold the write end open.
                os.set_blocking(self.sentinel, False)
                data = os.read(self.sentinel, _EXIT_CODE.size)
            except OSError:
                data = b""
            if len(data) == _EXIT_CODE.size:
                (code,) = _EXIT_CODE.unpack(data)
        return (code & 0xFF) << 8

    def _release(self, in_child: bool = False) -> None:
        """Closes every descriptor the parent holds for this child, and its watchers. In a
        forked child both are only forgotten: the watchers belong to the parent's loop, and
        the descriptors are closed with every other of ``_child.parent_only_fds``."""
        _live_popens.discard(self)
        watchers = (self._exit_watcher, self._retry_timer)
        self._exit_watcher = self._retry_timer = None
        if not in_child:
            for watcher in watchers:
                if watcher is not None:
                    watcher.close()
        fds, self._parent_fds = self._parent_fds, ()
        if self._exit_fd is not None:
            fds += (self._exit_fd,)
            self._exit_fd = None
        if in_child:
            return
        for fd in fds:
            try:
                _child.close_fd(fd)
            except OSError:
                pass


def _open_pidfd(pid: int) -> Optional[int]:
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        fd: int = pidfd_open(pid)
    except OSError:  # ENOSYS before Linux 5.3, or the child is already reaped
        return None
    _child.parent_only_fds.add(fd)
    return fd


def _flush_std_streams() -> None:
    # Output buffered before the fork would otherwise be written twice.
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (AttributeError, ValueError):
            pass


class _GProcess(multiprocessing.Process):
    """A ``multiprocessing.Process`` whose ``join``, ``is_alive``, ``exitcode`` and
    ``close`` cooperate with gevent, and whose child starts with a fresh gevent hub.

    Created and started by :func:`gipc.start_process`.
    """

    _gipc_handles: Tuple[_GIPCHandle, ...] = ()

    # Outcome capture (``start_process(..., capture=True)``). The class attributes are the
    # state of a process started without it.
    #: Whether the child reports its outcome.
    _capture = False
    #: In the child only: where the outcome goes.
    _outcome_writer: Optional[_GIPCWriter] = None
    #: In the parent, until the outcome has arrived: where it comes from.
    _outcome_receiver: Optional[OutcomeReceiver] = None
    #: In the parent, once it has arrived (or the child died without one).
    _outcome: Optional[Outcome] = None
    #: One greenlet at a time reads the outcome; others wait for what it finds.
    _outcome_lock: Optional[Semaphore] = None

    @staticmethod
    def _Popen(process_obj: Any) -> _CooperativePopen:  # type: ignore[override]
        return _CooperativePopen(process_obj)

    def run(self) -> None:
        """In the child: run the target (and report its outcome when the parent asked for
        it)."""
        writer = self._outcome_writer
        if writer is None:
            super().run()
            return
        target, args, kwargs = self._target, self._args, self._kwargs  # type: ignore[attr-defined]
        _outcome.run_and_report(writer, target, args, kwargs)

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
        if self._outcome is None:
            if not self._capture:
                raise GIPCError(
                    f"{self!r} was started without capture=True: it reports no outcome "
                    "(use start_process(..., capture=True) to get one)"
                )
            self._check_closed()  # type: ignore[attr-defined]
            if not self._collect_outcome(timeout):
                raise TimeoutError(f"{self!r} reported no outcome within {timeout} s")
        assert self._outcome is not None
        return self._outcome.unwrap()

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait cooperatively for the child to exit, at most ``timeout`` seconds.

        With ``capture=True`` the outcome is read (and kept for ``result()``) while waiting:
        a child whose outcome is larger than the pipe's buffer cannot exit before someone
        reads it, so a plain join would wait for ever.
        """
        if self._outcome_receiver is not None and self._outcome is None:
            self._check_closed()  # type: ignore[attr-defined]
            started = time.monotonic()
            self._collect_outcome(timeout)
            if timeout is not None:
                timeout = clamp_timeout(timeout - (time.monotonic() - started))
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
        receiver, self._outcome_receiver = self._outcome_receiver, None
        if receiver is not None:
            receiver.close()

    def _collect_outcome(self, timeout: Optional[float]) -> bool:
        """Reads the outcome (or finds that the child died without one), at most
        ``timeout`` seconds; True once it is known. The read end is closed then."""
        lock = self._outcome_lock
        if self._outcome is not None or lock is None:
            self._close_outcome_receiver()
            return self._outcome is not None
        started = time.monotonic()
        if not lock.acquire(timeout=clamp_timeout(timeout)):
            return False
        try:
            receiver = self._outcome_receiver
            if self._outcome is None and receiver is not None:
                if timeout is not None:
                    timeout = max(timeout - (time.monotonic() - started), 0.0)
                outcome = _outcome.await_outcome(receiver, self, timeout, self._keep_outcome)
                if outcome is not None:
                    self._keep_outcome(outcome)
            return self._outcome is not None
        finally:
            self._close_outcome_receiver()
            lock.release()

    def _keep_outcome(self, outcome: Outcome) -> None:
        """Called by whichever greenlet reads the outcome, as soon as it has it: kept here,
        it survives a timeout or kill of the wait that asked for it."""
        if self._outcome is None:
            self._outcome = outcome

    def _close_outcome_receiver(self) -> None:
        """Once the outcome is known, the read end has nothing more to give."""
        if self._outcome is not None:
            receiver, self._outcome_receiver = self._outcome_receiver, None
            if receiver is not None:
                receiver.close()

    def __repr__(self) -> str:
        return "<_GProcess" + super().__repr__()[len("<_GProcess") :]


def _collect_handles(obj: Any, found: Set[_GIPCHandle]) -> None:
    """Finds the handles passed to a child: directly in ``args``/``kwargs`` or inside
    tuples, lists, sets and dicts (keys and values) nested to any depth. Iterative, and
    each container is looked into once: neither deep nesting nor a container that holds
    itself can stop the search (a handle missed would be closed in the child and left
    open in the parent, silently)."""
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


def _release_inherited(kept: Iterable[_GIPCHandle]) -> None:
    """Runs first thing in the child: only the gipc descriptors that were passed in stay
    open. (Called only when a registry is not empty, checked on the WeakSets' underlying
    sets: a WeakSet's own methods are Python code, and every object they touch is a page
    copied into the child.)"""
    kept = set(kept)
    for handle in list(_handles._open_handles):
        handle._after_fork_in_child(keep=handle in kept)
    for popen in list(_live_popens):
        # A sibling's monitor, inherited: it is the parent's to use.
        popen._release(in_child=True)
    _child.close_parent_only_fds()


def start_process(
    target: Callable[..., Any],
    args: Tuple[Any, ...] = (),
    kwargs: Optional[Dict[str, Any]] = None,
    daemon: Optional[bool] = None,
    name: Optional[str] = None,
    *,
    capture: bool = False,
) -> _GProcess:
    """Start a child process that runs ``target(*args, **kwargs)`` and return its
    :class:`_GProcess` (a ``multiprocessing.Process``), already started.

    gipc handles found in ``args``/``kwargs`` (also inside tuples, lists, sets and dict
    values) are usable in the child and closed in the parent; every other gipc handle is
    closed in the child. The child starts with a fresh gevent hub and event loop and with
    default signal dispositions (SIGPIPE aside). The child is always forked, whatever
    multiprocessing's start method is set to.

    With ``capture=True`` the child reports the target's outcome, its return value or the
    exception it raised, and ``process.result(timeout=None)`` returns or re-raises it in
    the parent (with the child's traceback as ``__cause__``). The cost: one more pipe (two
    descriptors, the parent's closed once the outcome is read or the process joined or
    closed) and one message, in which the return value or exception is pickled. The exit
    code is unchanged: 0, or 1 after an exception. Without it, nothing is sent back.

    Raises:
        TypeError: ``target`` is not callable, ``args`` not a tuple or ``kwargs`` not a dict.
        GIPCClosed, GIPCLocked: a handle passed in is closed, or in use by a greenlet.
    """
    if kwargs is None:
        kwargs = {}
    if not callable(target):
        raise TypeError(f"target must be callable, not {type(target).__name__}")
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple, not {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict, not {type(kwargs).__name__}")
    passed: Set[_GIPCHandle] = set()
    _collect_handles(args, passed)
    _collect_handles(kwargs, passed)
    for handle in passed:
        handle._check_passable()
    process = _GProcess(target=target, name=name, args=args, kwargs=kwargs, daemon=daemon)
    process._gipc_handles = tuple(passed)
    if capture:
        outcome_reader, outcome_writer = _outcome.outcome_pipe()
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
        process._capture = True
        process._outcome_receiver = OutcomeReceiver(outcome_reader)
        process._outcome_lock = Semaphore()
    else:
        process.start()
    if passed:
        _log.debug("handed %s to child pid %d, closed here", _describe(passed), process.pid)
    for handle in passed:
        handle._release()
    process._gipc_handles = ()
    return process


def _describe(handles: Iterable[_GIPCHandle]) -> str:
    return ", ".join(sorted(repr(handle) for handle in handles))
