"""Child processes: start them with a fresh gevent state, and watch them cooperatively.

The process object is a real ``multiprocessing.Process``; only how it forks and waits is
gipc's own (``_CooperativePopen``). That keeps gipc independent of multiprocessing's start
method setting (it always forks), and it watches each child on its own descriptor — a
pidfd on Linux, the exit sentinel pipe elsewhere — so it never reaps a process that is not
its own and never touches multiprocessing's behaviour for anybody else.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import weakref
from typing import Any, Callable, Dict, Iterable, Optional, Set, Tuple

import gevent
from gevent.hub import get_hub

from . import _handles
from ._handles import _GIPCDuplexHandle, _GIPCHandle
from ._hub import READ, fresh_hub_after_fork

#: Process monitors of this process's live children, so a forked child can close the
#: descriptors that watch its siblings.
_live_popens: "weakref.WeakSet[_CooperativePopen]" = weakref.WeakSet()


class _CooperativePopen:
    """Forks the child and waits for it without blocking the event loop.

    Implements the part of ``multiprocessing.popen_fork.Popen``'s interface that
    ``multiprocessing.Process`` relies on: ``pid``, ``sentinel``, ``returncode``, ``poll``,
    ``wait``, ``terminate``, ``kill`` and ``close``.
    """

    method = "fork"

    def __init__(self, process_obj: "_GProcess") -> None:
        self.returncode: Optional[int] = None
        self._exit_fd: Optional[int] = None
        self._parent_fds: Tuple[int, ...] = ()
        _flush_std_streams()
        self._launch(process_obj)

    def _launch(self, process_obj: "_GProcess") -> None:
        # Two pipes, as multiprocessing makes them: the parent's read end becomes readable
        # when the child is gone (`sentinel`); the child's read end does the same when the
        # parent is gone (`multiprocessing.parent_process().sentinel`).
        parent_r, child_w = os.pipe()
        child_r, parent_w = os.pipe()
        # Looked up at call time: under gevent.monkey this is gevent's fork, which registers
        # the child with gevent's own SIGCHLD handling, and os.waitpid is its matching wait.
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(parent_r)
                os.close(parent_w)
                code = process_obj._bootstrap(parent_sentinel=child_r)
            finally:
                os._exit(code)
        self.pid = pid
        os.close(child_w)
        os.close(child_r)
        self.sentinel = parent_r
        self._parent_fds = (parent_r, parent_w)
        self._exit_fd = _open_pidfd(pid)
        _live_popens.add(self)

    def poll(self, flag: int = os.WNOHANG) -> Optional[int]:
        """Reaps the child if it has exited; never blocks, whatever ``flag`` says."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                # Reaped by somebody else (a raw waitpid(-1) elsewhere in the program): the
                # child is gone, its status is not ours to know.
                pid, status = self.pid, 255 << 8
            if pid == 0:
                return None
            self.returncode = os.waitstatus_to_exitcode(status)
            self._release()
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Waits cooperatively for the child to exit, at most ``timeout`` seconds."""
        if self.poll() is not None:
            return self.returncode
        if timeout is not None and timeout <= 0:
            return None
        with gevent.Timeout(timeout, False):
            self._wait_until_reaped()
        return self.returncode

    def _wait_until_reaped(self) -> None:
        hub = get_hub()
        backoff = 0.0005
        while self.poll() is None:
            fd = self._exit_fd if self._exit_fd is not None else self.sentinel
            watcher = hub.loop.io(fd, READ)
            try:
                hub.wait(watcher)
            finally:
                watcher.close()
            if self.poll() is None:
                # The descriptor fired a moment before the exit status is ready (the sentinel
                # closes before the child is a zombie; gevent's own SIGCHLD bookkeeping may
                # lag the pidfd): look again shortly.
                gevent.sleep(backoff)
                backoff = min(backoff * 2, 0.05)

    def _send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self._send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self._send_signal(signal.SIGKILL)

    def close(self) -> None:
        self._release()

    def _release(self) -> None:
        """Closes every descriptor the parent holds for this child."""
        _live_popens.discard(self)
        fds, self._parent_fds = self._parent_fds, ()
        if self._exit_fd is not None:
            fds += (self._exit_fd,)
            self._exit_fd = None
        for fd in fds:
            try:
                os.close(fd)
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
    return fd


def _flush_std_streams() -> None:
    # Output buffered before the fork would otherwise be written twice.
    import sys

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

    @staticmethod
    def _Popen(process_obj: Any) -> _CooperativePopen:  # type: ignore[override]
        return _CooperativePopen(process_obj)

    def run(self) -> None:
        """In the child: reset the inherited state, then run the target."""
        _prepare_child(self._gipc_handles)
        super().run()

    def __repr__(self) -> str:
        return "<_GProcess" + super().__repr__()[len("<_GProcess") :]


def _collect_handles(obj: Any, found: Set[_GIPCHandle], depth: int = 0) -> None:
    """Finds the handles passed to a child: directly in ``args``/``kwargs`` or inside
    (nested) tuples, lists, sets and dict values."""
    if isinstance(obj, _GIPCHandle):
        found.add(obj)
    elif isinstance(obj, _GIPCDuplexHandle):
        found.update(obj._parts())
    elif depth < 4:
        if isinstance(obj, dict):
            obj = obj.values()
        elif not isinstance(obj, (tuple, list, set, frozenset)):
            return
        for item in obj:
            _collect_handles(item, found, depth + 1)


def _prepare_child(kept: Iterable[_GIPCHandle]) -> None:
    """Runs first thing in the child: a fresh gevent hub and loop, default signal
    dispositions, and only the gipc descriptors that were passed in."""
    fresh_hub_after_fork()
    _restore_default_signals()
    kept = set(kept)
    for handle in list(_handles._open_handles):
        if handle in kept:
            handle._after_fork_in_child()
        else:
            handle._release()
    for popen in list(_live_popens):
        # A sibling's monitor, inherited: it is the parent's to use.
        popen._release()


def _restore_default_signals() -> None:
    """Every signal back to its default action, except SIGPIPE, which keeps the inherited
    one (Python ignores it, so a vanished reader is a BrokenPipeError, not death)."""
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP, signal.SIGPIPE):
            continue
        try:
            signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError):  # signals reserved by the C library
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def start_process(
    target: Callable[..., Any],
    args: Tuple[Any, ...] = (),
    kwargs: Optional[Dict[str, Any]] = None,
    daemon: Optional[bool] = None,
    name: Optional[str] = None,
) -> _GProcess:
    """Start a child process that runs ``target(*args, **kwargs)`` and return its
    :class:`_GProcess` (a ``multiprocessing.Process``), already started.

    gipc handles found in ``args``/``kwargs`` (also inside tuples, lists, sets and dict
    values) are usable in the child and closed in the parent; every other gipc handle is
    closed in the child. The child starts with a fresh gevent hub and event loop and with
    default signal dispositions (SIGPIPE aside). The child is always forked, whatever
    multiprocessing's start method is set to.

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
    process.start()
    for handle in passed:
        handle._release()
    process._gipc_handles = ()
    return process
