"""Watching a child cooperatively, and the fork launcher.

``multiprocessing.Process.start()`` asks its ``_Popen`` for an object that starts the child
and then answers ``poll``/``wait``/``terminate``/``kill``/``close`` for it. gipc's
``CooperativePopen`` is that object with every wait turned into a wait on gevent's hub; the
subclasses differ only in how the child is launched (``_launch``) and, for a child that is
not this process's own, how its end is learned (``_try_reap``):

* ``ForkPopen`` (here): ``fork()`` of the caller; ``_child`` runs in the copy;
* ``SpawnPopen`` (``_popen_spawn``): a fresh interpreter, inheriting only its descriptors;
* ``ForkServerPopen`` (``_forkserver``): forked by gipc's fork server.

Each child is watched on one descriptor (a pidfd on Linux, else its exit sentinel), by one
io watcher whose callbacks run in the hub, however many greenlets join it; a child that is
not ours is never reaped here.

**Threads.** ``multiprocessing`` polls every child of the process from whichever thread
starts a process or asks ``active_children()`` (``process._cleanup()``), and any thread
may call ``is_alive()``, ``join()`` or ``close()``. So a popen is polled from any thread,
under its lock: the exit is learned (and the child reaped) exactly once. Its watchers
belong to the hub that made them (the first to wait for the child) and are used and
closed in that hub's thread only; so are the descriptors they watch. A thread that learns
of the exit elsewhere hands the clean-up to that hub's loop (thread-safely); a join from
another thread polls on its own hub. If that thread has ended (or destroyed its hub), the
next thread to poll, join or close the child cleans up, or the ending thread itself when
the exit was already known.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import weakref
from typing import TYPE_CHECKING, Any, Iterable, List, Optional, Tuple

import gevent
import gevent.event
from gevent.hub import get_hub
from gevent.monkey import get_original

from . import _child, _core, _handles
from ._hub import (
    READ,
    Mailbox,
    clamp_timeout,
    deadline_after,
    io_watcher,
    mailbox_here,
    run_soon,
    seconds_left,
    timer_watcher,
)

if TYPE_CHECKING:
    from ._handles import _GIPCHandle
    from ._process import _GProcess

#: gipc's lifecycle records (debug level; silent unless the program configures logging).
_log = logging.getLogger("gipc")

#: What a child writes to its sentinel pipe just before it exits.
EXIT_CODE = _child.EXIT_CODE

#: What ForkPopen blocks across the fork (the system ignores SIGKILL and SIGSTOP there).
_ALL_SIGNALS = signal.valid_signals()

#: Process monitors of this process's live children, so a forked child can close the
#: descriptors that watch its siblings.
live_popens: "weakref.WeakSet[CooperativePopen]" = weakref.WeakSet()

#: The OS thread's own, whatever gevent.monkey made of threads (see _handles).
_allocate_lock = _handles._allocate_lock
_thread_local: Any = get_original("_thread", "_local")()


def _fork_for_this_loop() -> Any:
    """``os.fork`` as this program sees it, looked up at call time: under gevent.monkey,
    gevent's fork, which registers the child with gevent's own SIGCHLD handling (its
    ``os.waitpid`` is the matching wait). That needs a child watcher, which only a default
    loop has: on a gipc child's own loop on libuv, gevent's fork raises ``TypeError``, and the
    system's is used (gipc learns of its children's ends itself, see ``_try_reap``)."""
    fork = os.fork
    if fork is not _original_fork and not get_hub().loop.default:
        return _original_fork
    return fork


_original_fork: Any = get_original("os", "fork")


class _ThreadMark:
    """One per OS thread, held by a thread-local: a weak reference to it dies, and its
    callback runs in that thread, as the thread ends."""

    __slots__ = ("__weakref__",)


def _thread_mark() -> _ThreadMark:
    try:
        mark: _ThreadMark = _thread_local.mark
    except AttributeError:
        mark = _thread_local.mark = _ThreadMark()
    return mark


def _close_watchers(watchers: Iterable[Any]) -> None:
    for watcher in watchers:
        if watcher is not None:
            try:
                watcher.close()
            except Exception:  # its loop was destroyed: nothing left to close
                pass


class CooperativePopen:
    """Starts a child (``_launch``, per start method) and waits for it without blocking
    the event loop.

    Implements the part of ``multiprocessing.popen_fork.Popen``'s interface that
    ``multiprocessing.Process`` relies on: ``pid``, ``sentinel``, ``returncode``, ``poll``,
    ``wait``, ``interrupt`` (3.14), ``terminate``, ``kill`` and ``close``.
    """

    method = ""
    pid: int
    sentinel: int

    def __init__(self, process_obj: "_GProcess") -> None:
        self.returncode: Optional[int] = None
        #: The descriptor that becomes readable when the child is gone: a pidfd, or None
        #: to watch ``sentinel``.
        self._exit_fd: Optional[int] = None
        #: Descriptors closed by ``_release`` (registered in ``_child.parent_only_fds``).
        self._parent_fds: Tuple[int, ...] = ()
        #: Held, by any thread, while the child is reaped, a signal is sent to it, or its
        #: watchers and descriptors are made or taken for closing: never across a switch.
        self._lock = _allocate_lock()
        #: The hub whose loop has this child's watchers (the first to wait for it; None
        #: until then), and a weak reference to its thread's mark (dead once that thread
        #: has ended).
        self._hub: Any = None
        self._hub_thread: "Optional[weakref.ref[_ThreadMark]]" = None
        #: ``_hub``'s mailbox: how another thread has the clean-up done there.
        self._mailbox: Optional[Mailbox] = None
        self._exit_watcher: Any = None
        self._retry_timer: Any = None
        self._retry_delay = 0.001  # libuv timers have millisecond resolution
        #: Joins waiting in ``_hub``'s thread: the exit watcher runs only while one does.
        self._waiting = 0
        #: Set in ``_hub``'s thread once the child is reaped: its waiting joins return.
        self._exited = gevent.event.Event()
        self._parent_pid = os.getpid()
        flush_std_streams()
        self._launch(process_obj)

    def _launch(self, process_obj: "_GProcess") -> None:
        raise NotImplementedError

    def _abort_start(self, pid: Optional[int], start_fds: _core.StartFds) -> None:
        """Undoes a start that failed or was interrupted (an exception from a signal
        handler can come as any call returns): the caller gets the exception and never a
        process object to join, so the child, if there is one, is killed and reaped here,
        and every descriptor made for it is closed once: those the start still owns
        (``start_fds``) and those ``_adopt`` registered."""
        live_popens.discard(self)
        registered = self._parent_fds
        self._parent_fds = ()
        exit_fd, self._exit_fd = self._exit_fd, None
        if exit_fd is not None:
            registered += (exit_fd,)
        for fd in registered:
            start_fds.hand_on(fd)  # closed below, once
        for fd in registered:
            _child.parent_only_fds.discard(fd)
            try:
                os.close(fd)
            except OSError:
                pass
        for fd in start_fds.owned_fds:
            _child.parent_only_fds.discard(fd)  # a Feeder registers its own at once
        start_fds.close_all()
        if pid:
            kill_and_reap(pid)

    def _keep_exit_fd(self, start_fds: _core.StartFds, pid: int) -> None:
        """The last step of a start: a pidfd for the child, the descriptor that tells that
        it is gone (None where there is none: then ``sentinel``). The start owns it until
        it is registered; then it is the process object's."""
        fd = start_pidfd(start_fds, pid)
        self._exit_fd = fd
        if fd is not None:
            _child.parent_only_fds.add(fd)
            start_fds.hand_on(fd)

    def _adopt(self, pid: int, sentinel: int, parent_fds: Tuple[int, ...]) -> None:
        """Once the child runs: its pid, the descriptor that is readable once it is gone,
        and every descriptor the parent keeps for it (registered at once: no switch
        between opening and registering)."""
        self.pid = pid
        self.sentinel = sentinel
        self._parent_fds = parent_fds
        _child.parent_only_fds.update(parent_fds)
        live_popens.add(self)

    def poll(self, flag: int = os.WNOHANG) -> Optional[int]:
        """Reaps the child if it has exited; never blocks, whatever ``flag`` says. Any
        thread may ask (multiprocessing polls every child from the thread that starts
        another): one reaps, and the clean-up is done where it may be (``_release``)."""
        if self.returncode is None:
            with self._lock:
                if self.returncode is not None:
                    return self.returncode
                code = self._try_reap()
                if code is None:
                    return None
                self.returncode = code
            _log.debug("child pid %d exited with code %d", self.pid, code)
            self._release()  # whoever reaped it, every waiting join() returns
        return self.returncode

    def _try_reap(self) -> Optional[int]:
        """The child's exit code if it has ended, else None; never blocks. Called with the
        lock held."""
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            # Reaped by somebody else (gevent's SIGCHLD handling, or a waitpid(-1)
            # elsewhere in the program). The child wrote its exit code to the sentinel
            # before exiting, unless a signal killed it: then 255 is all we can say.
            pid, status = self.pid, self._reported_exit_status()
        if pid == 0:
            return None
        return os.waitstatus_to_exitcode(status)

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Waits cooperatively for the child to exit, at most ``timeout`` seconds."""
        if self.poll() is not None:
            if self._hub is not None:
                # Reaped by another thread, which queued the clean-up on the watchers' hub:
                # done now if that is this thread's (a join returns with them closed).
                with self._lock:
                    mine = self._watchers_home()[1]
                if mine:
                    self._release()
            return self.returncode
        if timeout is not None and timeout <= 0:
            return None
        with self._lock:
            if self.returncode is not None:
                return self.returncode
            watching = self._watch_here()
            exited = self._exited
        if not watching:
            return self._wait_by_polling(timeout)
        self._waiting += 1
        try:
            exited.wait(clamp_timeout(timeout))
        finally:
            self._waiting -= 1
            if not self._waiting and self.returncode is None:
                # Nobody waits any more: a started watcher would hold the hub (gevent's
                # libuv loop will not even be destroyed before it fires).
                self._pause_watching()
        return self.returncode

    def _pause_watching(self) -> None:
        timer, self._retry_timer = self._retry_timer, None
        if timer is not None:
            timer.close()
        if self._exit_watcher is not None:
            self._exit_watcher.stop()

    # One io watcher on the exit descriptor per child, however many greenlets join it; its
    # callbacks run in the hub and reap the child (no greenlet of its own: fewer switches,
    # and fewer pages written in the parent while the child exits). It belongs to the hub
    # of the thread that first waits; a join in another thread polls (``_wait_by_polling``).

    def _watch_here(self) -> bool:
        """With the lock held and the child not reaped: makes sure this thread's hub
        watches the child; False if another live thread's hub does."""
        home, mine = self._watchers_home()
        if home is not None:
            return False
        if not mine:
            # None yet, or the hub that had them or its thread is gone: this thread's hub
            # takes over (the watchers of a loop that nobody runs any more are closed here;
            # those of a destroyed hub went with it).
            hub = self._hub
            orphans = (self._exit_watcher, self._retry_timer)
            self._exit_watcher = self._retry_timer = None
            if hub is not None and hub.loop is not None:
                _close_watchers(orphans)
            self._hub = get_hub()
            self._hub_thread = weakref.ref(_thread_mark(), self._on_hub_thread_exit)
            self._mailbox = mailbox_here()
            self._exited = gevent.event.Event()
            self._waiting = 0
            self._retry_delay = 0.001
        if self._exit_watcher is None:
            self._watch_exit()
        elif not self._exit_watcher.active and self._retry_timer is None:
            self._exit_watcher.start(self._on_exit_readable)  # paused, or about to retry
        return True

    def _watchers_home(self) -> Tuple[Optional[Mailbox], bool]:
        """With the lock held: where the watchers, and the descriptors they watch, may be
        closed. ``(mailbox, False)``: only in the thread of another live hub, whose mailbox
        that is. ``(None, True)``: here, this thread's hub has them. ``(None, False)``: here
        too, as nobody else runs their loop (there are none; their thread has ended; their
        hub was destroyed)."""
        hub = self._hub
        if hub is None or hub.loop is None or self._hub_thread is None:
            return None, False
        owner = self._hub_thread()
        if owner is None:  # that thread has ended
            return None, False
        if owner is _thread_mark():
            return None, True
        return self._mailbox, False

    def _wait_by_polling(self, timeout: Optional[float]) -> Optional[int]:
        """A join in a thread other than the one whose hub watches the child: polls on this
        thread's hub, from every millisecond to every 50 ms."""
        deadline = deadline_after(timeout)
        delay = 0.001
        while self.poll() is None:
            left = seconds_left(deadline)
            if left is not None and left <= 0:
                return None
            gevent.sleep(delay if left is None else max(min(delay, left), 0.001))
            delay = min(delay * 2, 0.05)
        return self.returncode

    def _on_hub_thread_exit(self, mark: "weakref.ref[_ThreadMark]") -> None:
        """Runs in the thread of the hub that has the watchers, as that thread ends. An exit
        another thread learned of had its clean-up queued on this loop, which will not run
        again: done now. (A child still running is cleaned up by whoever polls it next.)"""
        if os.getpid() != self._parent_pid or self._hub_thread is not mark:
            return  # a forked child's copy (the child forgets it), or no longer its hub
        if self.returncode is not None:
            try:
                self._release()
            except Exception:  # nobody to tell, as the thread ends
                pass

    def _watch_exit(self) -> None:
        fd = self._exit_fd if self._exit_fd is not None else self.sentinel
        self._exit_watcher = io_watcher(fd, READ)
        self._exit_watcher.start(self._on_exit_readable)

    def _on_exit_readable(self) -> None:
        # Reaping closes the descriptor and its watcher: not inside the watcher's callback.
        if self._exit_watcher is not None:
            self._exit_watcher.stop()
        run_soon(self._reap_or_retry)

    def _reap_or_retry(self) -> None:
        if self.poll() is not None or not self._waiting or self._retry_timer is not None:
            return
        # The descriptor fired a moment before the exit status is ready (the sentinel closes
        # before the child is a zombie; gevent's own SIGCHLD bookkeeping may lag the pidfd):
        # look again shortly.
        self._retry_timer = timer_watcher(self._retry_delay)
        self._retry_delay = min(self._retry_delay * 2, 0.05)
        self._retry_timer.start(self._on_retry_due)

    def _on_retry_due(self) -> None:
        run_soon(self._retry)

    def _retry(self) -> None:
        timer, self._retry_timer = self._retry_timer, None
        if timer is not None:
            timer.close()
        if self.poll() is None and self._exit_watcher is not None and self._waiting:
            self._exit_watcher.start(self._on_exit_readable)

    def _send_signal(self, sig: int) -> None:
        if self.poll() is not None:
            return
        with self._lock:  # not after another thread reaped it (its pid may be reused)
            if self.returncode is None:
                self._signal(sig)

    def _signal(self, sig: int) -> None:
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
                data = os.read(self.sentinel, EXIT_CODE.size)
            except OSError:
                data = b""
            if len(data) == EXIT_CODE.size:
                (code,) = EXIT_CODE.unpack(data)
        return (code & 0xFF) << 8

    def _release(self, in_child: bool = False) -> None:
        """Closes every descriptor the parent holds for this child, and its watchers, once:
        in the thread of the hub that has the watchers (asked to from any other thread,
        through that hub's mailbox), or here if no live hub of another thread has them. Then
        the joins waiting in that hub return. In a forked child both are only forgotten:
        the watchers belong to the parent's loop, and the descriptors are closed with
        every other of ``_child.parent_only_fds`` (and the lock may have been held by
        another thread of the parent at the fork: not taken)."""
        live_popens.discard(self)
        if in_child:
            self._exit_watcher = self._retry_timer = self._hub = self._hub_thread = None
            self._mailbox = None
            self._parent_fds = ()
            self._exit_fd = None
            return
        with self._lock:
            home, mine = self._watchers_home()
            if home is None:
                watchers, fds = self._take()
        if home is not None:
            if home.post(self._release):
                return
            with self._lock:  # that hub was destroyed meanwhile: its watchers with it
                self._exit_watcher = self._retry_timer = None
                watchers, fds = self._take()
                watchers = ()
        _close_watchers(watchers)
        for fd in fds:
            try:
                _child.close_fd(fd)
            except OSError:
                pass
        if mine:
            self._exited.set()

    def _take(self) -> Tuple[Tuple[Any, ...], Tuple[int, ...]]:
        """With the lock held: the watchers to close here (none of a destroyed hub's) and
        the descriptors, both forgotten, so that they are closed exactly once."""
        hub = self._hub
        watchers: Tuple[Any, ...] = (self._exit_watcher, self._retry_timer)
        if hub is not None and hub.loop is None:
            watchers = ()
        self._exit_watcher = self._retry_timer = self._hub = self._hub_thread = None
        self._mailbox = None
        fds, self._parent_fds = self._parent_fds, ()
        if self._exit_fd is not None:
            fds += (self._exit_fd,)
            self._exit_fd = None
        return watchers, fds


class ForkPopen(CooperativePopen):
    """A child forked from the caller: quick while the caller is small, no pickling, and
    every object of the caller at hand; but the caller's event loop waits while its page
    tables are copied (~37 ms per GiB), and forking a process that runs threads is unsafe."""

    method = "fork"

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
            fork = _fork_for_this_loop()
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, _ALL_SIGNALS)
            try:
                pid = fork()
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
                    or live_popens.data  # type: ignore[attr-defined]
                    or _child.parent_only_fds
                ):
                    release_inherited(process_obj._gipc_handles)
                # Our own exit report is no grandchild's to hold: one that outlived us
                # would keep the sentinel from telling our parent that we are gone.
                _child.parent_only_fds.add(child_w)
                code = _child.exit_status(start.run())  # resets the signals, unblocks them
            except BaseException:  # gipc's own start-up failed: say why before exiting
                import traceback

                traceback.print_exc()
            finally:
                # Also tell the parent through the sentinel: if someone else in the parent
                # reaps us (gevent's SIGCHLD handling reaps every child once
                # gevent.subprocess was used), the exit code is not lost.
                try:
                    os.write(child_w, EXIT_CODE.pack(code))
                finally:
                    os._exit(code)
        start.forget()
        os.close(child_w)
        os.close(child_r)
        self._adopt(pid, parent_r, (parent_r, parent_w))
        self._exit_fd = open_pidfd(pid)
        _log.debug("started child %s (pid %d, fork)", process_obj.name, pid)


def kill_and_reap(pid: int) -> None:
    """Ends a child that was never handed to anyone: SIGKILL, then a wait that is short
    (the kernel's teardown of the process)."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ChildProcessError, ProcessLookupError):
        pass  # reaped by another's wait for any child (a SIGCHLD handler)


def start_pidfd(start_fds: _core.StartFds, pid: int) -> Optional[int]:
    """A pidfd for the child ``pid``, owned by its start until the process object takes it
    (None where the system has none: then the sentinel is watched)."""
    return start_fds.pidfd(pid)


def open_pidfd(pid: int) -> Optional[int]:
    """A pidfd for ``pid`` (registered as parent-only), or None where there is none."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        fd: int = pidfd_open(pid)
    except OSError:  # ENOSYS before Linux 5.3, or the child is already reaped
        return None
    _child.parent_only_fds.add(fd)
    return fd


def flush_std_streams() -> None:
    # Output buffered before the fork would otherwise be written twice.
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (AttributeError, ValueError):
            pass


def release_inherited(kept: Iterable["_GIPCHandle"]) -> None:
    """Runs first thing in a forked child: only the gipc descriptors that were passed in
    stay open. (Called only when a registry is not empty, checked on the WeakSets'
    underlying sets: a WeakSet's own methods are Python code, and every object they touch
    is a page copied into the child.)"""
    kept = set(kept)
    for handle in list(_handles._open_handles):
        handle._after_fork_in_child(keep=handle in kept)
    for popen in list(live_popens):
        # A sibling's monitor, inherited: it is the parent's to use.
        popen._release(in_child=True)
    _child.close_parent_only_fds()
