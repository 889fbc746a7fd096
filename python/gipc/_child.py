"""What a forked child does between ``fork()`` and ``os._exit()``.

First a fresh gevent state (see ``_hub.fresh_hub_after_fork``) and default signal
dispositions, then what multiprocessing's own fork child does around the target: the child
is a real ``multiprocessing`` child (``current_process()``, ``parent_process()``, stdin on
``/dev/null``, after-fork hooks, finalizers and exit code as multiprocessing defines them).

Why not simply call ``Process._bootstrap()``: on a fork every page the child writes to is
copied first, and each copy costs a page fault (several microseconds on a virtual machine).
Python code writes to every object it touches (reference counts), so a child's start-up cost
is close to the number of distinct objects it touches. The steps below are multiprocessing's
(3.9 to 3.13), minus work that has nothing to do (the import statement at the top of
``_bootstrap``, running an empty after-fork registry, running ``util._exit_function`` with
no finalizer and no child registered, ``threading._shutdown`` with no other thread and no
exit callback), and with the objects the child will install (its ``parent_process()``, its
new ``sys.stdin`` on ``/dev/null``, ...) made by the parent just before the fork, where
making them copies no page. Together with the lean signal reset and the lazy hub (see
``_hub``) that is about half of the page faults of gipc's own part of a no-op child.
``tests/test_child.py`` compares the result with multiprocessing's own fork child.
"""

from __future__ import annotations

import _signal
import io
import itertools
import multiprocessing.process as mp_process
import multiprocessing.util as mp_util
import os
import struct
import sys
import threading

# typing is not imported at run time: a spawned child imports this module before
# anything else of gipc's, and typing would be ~5% of its start-up (see _startup_child).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Optional, Set

#: How a child that is not its caller's own (spawned, or forked by the fork server) reports
#: its exit code: over a pipe, as this struct (see ``_popen.CooperativePopen``).
EXIT_CODE = struct.Struct("<i")

#: Every bare descriptor gipc holds in this process for its own bookkeeping (the exit
#: sentinels and pidfds that watch its children, and the extra ones opened while a greenlet
#: waits for a child to end), so that a forked child closes each one: a child must hold no
#: descriptor that watches its siblings. (Handles have their own registry, as some are
#: handed over.) Whoever opens such a descriptor registers it at once, with no switch in
#: between, and unregisters it as it closes it.
parent_only_fds: Set[int] = set()


def close_parent_only_fds() -> None:
    """In a forked child: closes every descriptor of ``parent_only_fds``."""
    for fd in parent_only_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    parent_only_fds.clear()


def close_fd(fd: int) -> None:
    """Closes a descriptor of ``parent_only_fds`` (in the process that opened it)."""
    parent_only_fds.discard(fd)
    os.close(fd)


#: From 3.13, a fork child runs the atexit functions registered in it, multiprocessing's
#: exit function among them (3.12 and older call that function from ``_bootstrap`` and run
#: no atexit function in the child).
_ATEXIT_IN_CHILD = sys.version_info >= (3, 13)

#: The Pythons whose multiprocessing fork child the lean start-up below was written from, and
#: is compared with (tests/test_child.py). On any other, whose multiprocessing may have
#: changed, a child runs multiprocessing's own ``Process._bootstrap`` instead (after the fresh
#: gevent state and the signal reset): a few hundred more copied pages, the same behaviour.
#: ``GIPC_CHILD_BOOTSTRAP=stock`` forces that path (the tests run it on every version).
_LEAN_PYTHONS = ((3, 9), (3, 13))
STOCK_BOOTSTRAP = (
    not _LEAN_PYTHONS[0] <= sys.version_info[:2] <= _LEAN_PYTHONS[1]
    or os.environ.get("GIPC_CHILD_BOOTSTRAP") == "stock"
)

#: The encoding of the child's new stdin: multiprocessing names it from 3.10 on (the
#: locale's before).
_STDIN_ENCODING = "utf-8" if sys.version_info >= (3, 10) else None


class ChildStart:
    """What a child needs to start, made in the parent just before the fork.

    Made before the sentinel pipes, then ``ready()`` once they exist; ``run()`` is then
    called in the child, ``forget()`` in the parent (after the fork, or if it fails).
    """

    def __init__(self, process: Any) -> None:
        # Imported here, not at the top: a spawned child imports this module too, and needs
        # no gevent unless its target does (see ``_startup_child``).
        from ._hub import fresh_hub_after_fork, resolve_hub_settings

        resolve_hub_settings()
        self.fresh_hub_after_fork = fresh_hub_after_fork
        self.process = process
        self.parent_process: Any = None
        self.replaced_process: Any = None
        self.process_counter = itertools.count(1)
        self.children: Set[Any] = set()
        # The child's sys.stdin: multiprocessing opens /dev/null in the child, on the lowest
        # free descriptor, and wraps it in a text file. Opened here before the sentinel pipes
        # (so the descriptor number is the same), it is inherited; the parent closes its copy.
        self.devnull_fd = -1
        self.stdin: Optional[io.TextIOWrapper] = None
        self.parent_sentinel = -1
        if STOCK_BOOTSTRAP:
            return  # multiprocessing's _bootstrap makes all of it in the child
        try:
            self.devnull_fd = os.open(os.devnull, os.O_RDONLY)
            self.stdin = open(self.devnull_fd, encoding=_STDIN_ENCODING, closefd=False)
        except (OSError, ValueError):
            self.forget()

    def ready(self, parent_sentinel: int) -> None:
        """The child's ``multiprocessing.parent_process()``, watching ``parent_sentinel``."""
        process = self.process
        self.parent_sentinel = parent_sentinel
        self.parent_process = mp_process._ParentProcess(  # type: ignore[attr-defined]
            process._parent_name, process._parent_pid, parent_sentinel
        )

    def forget(self) -> None:
        """In the parent, once forked: close the parent's copy of the child's stdin."""
        fd, self.devnull_fd = self.devnull_fd, -1
        self.stdin = None
        if fd >= 0:
            os.close(fd)

    def run(self) -> int:
        """In the child: a fresh gevent state and default signals, then ``process`` runs as
        in multiprocessing's fork child. Returns the exit code."""
        self.fresh_hub_after_fork()
        restore_default_signals()
        return run_forked(self._stock_bootstrap if STOCK_BOOTSTRAP else self._bootstrap)

    def _stock_bootstrap(self) -> int:
        """multiprocessing's own child start-up, for a Python the lean one was not written
        from (see ``STOCK_BOOTSTRAP``)."""
        code: int = self.process._bootstrap(parent_sentinel=self.parent_sentinel)
        return code

    def _bootstrap(self) -> int:
        """``multiprocessing.process.BaseProcess._bootstrap``, step by step."""
        process = self.process
        try:
            if process._start_method is not None:
                from multiprocessing import context

                context._force_start_method(process._start_method)
            mp_process._process_counter = self.process_counter  # type: ignore[attr-defined]
            mp_process._children = self.children  # type: ignore[attr-defined]
            self._stdin_to_devnull()
            # multiprocessing lets the parent's process object go once the after-fork hooks
            # have run; it has no finalizer, and deallocating it would only copy more pages.
            self.replaced_process = mp_process._current_process  # type: ignore[attr-defined]
            mp_process._current_process = process  # type: ignore[attr-defined]
            mp_process._parent_process = self.parent_process  # type: ignore[attr-defined]
            if threading._HAVE_THREAD_NATIVE_ID:  # type: ignore[attr-defined]
                threading.main_thread()._set_native_id()  # type: ignore[attr-defined]
            mp_util._finalizer_registry.clear()  # type: ignore[attr-defined]
            # (The registry's own dict: a WeakValueDictionary's len() is Python code.)
            if mp_util._afterfork_registry.data:  # type: ignore[attr-defined]
                mp_util._run_after_forkers()  # type: ignore[attr-defined]
            if mp_util._logger is not None:  # type: ignore[attr-defined]
                mp_util.info("child process calling self.run()")
            if _ATEXIT_IN_CHILD:
                process.run()
            else:
                try:
                    process.run()
                finally:
                    _exit_function()
            exitcode = 0
        except SystemExit as e:
            if e.code is None:
                exitcode = 0
            elif isinstance(e.code, int):
                exitcode = e.code
            else:
                sys.stderr.write(str(e.code) + "\n")
                exitcode = 1
        except BaseException:
            exitcode = 1
            import traceback

            sys.stderr.write(f"Process {process.name}:\n")
            traceback.print_exc()
        finally:
            # Waits for the threads the target started and runs threading's exit callbacks;
            # with neither, it has nothing to do. (threading.active_count() is the same
            # count, behind a lock.)
            if (
                len(threading._active) + len(threading._limbo) > 1  # type: ignore[attr-defined]
                or threading._threading_atexits  # type: ignore[attr-defined]
            ):
                threading._shutdown()  # type: ignore[attr-defined]
            if mp_util._logger is not None:  # type: ignore[attr-defined]
                mp_util.info("process exiting with exitcode %d" % exitcode)
            mp_util._flush_std_streams()  # type: ignore[attr-defined]
        return exitcode

    def _stdin_to_devnull(self) -> None:
        """``multiprocessing.util._close_stdin``, with the file made in the parent."""
        stdin = sys.stdin
        if stdin is None:
            self._close_devnull()
            return
        try:
            stdin.close()
        except (OSError, ValueError):
            pass
        if self.stdin is not None:
            sys.stdin = self.stdin
            return
        try:  # the parent could not make it: as multiprocessing does
            fd = os.open(os.devnull, os.O_RDONLY)
            try:
                sys.stdin = open(fd, encoding=_STDIN_ENCODING, closefd=False)
            except BaseException:
                os.close(fd)
                raise
        except (OSError, ValueError):
            pass

    def _close_devnull(self) -> None:
        if self.devnull_fd >= 0:
            os.close(self.devnull_fd)


def exit_status(code: int) -> int:
    """What the system reports of ``_exit(code)``: its low 8 bits (``sys.exit(256)`` is 0,
    ``sys.exit(-1)`` 255), and ``os._exit`` takes no int beyond a C int."""
    return code & 0xFF


def run_forked(bootstrap: Callable[[], int]) -> int:
    """Runs ``bootstrap`` (a process's start-up and target) in a forked child, around the
    atexit functions as multiprocessing's fork and forkserver children do on this Python."""
    if _ATEXIT_IN_CHILD:
        import atexit

        atexit._clear()
        atexit.register(mp_util._exit_function)  # type: ignore[attr-defined]
        try:
            return bootstrap()
        finally:
            atexit._run_exitfuncs()
    return bootstrap()


def restore_default_signals() -> None:
    """Every signal back to its default action and unblocked, except SIGPIPE, which keeps
    the inherited disposition (Python ignores it, so a vanished reader is a BrokenPipeError,
    not death).

    ``start_process`` forks with every signal blocked, and the core unblocks them only once
    every disposition is the default: a signal that arrived since the fork is delivered
    then, to its default action, not to a handler inherited from the parent."""
    # Not imported at the top: a spawned child does without the extension (_startup_child).
    # A forked child finds it loaded by its parent: a dict lookup, not a from-import, whose
    # fromlist handling runs importlib's Python code, copying pages on a fork.
    core: Any = sys.modules.get(f"{__package__}._core")
    if core is None:
        from . import _core as core

    # Every disposition at the C level, including handlers an event loop installed behind
    # Python's back (one system call per signal, in Rust)...
    for signum in core.reset_signal_state():
        # ...then Python's own table, so signal.getsignal() tells the truth, for just the
        # signals whose disposition changed. `_signal` is what `signal` wraps, minus the enum
        # conversions, whose code would be copied page by page into the child.
        try:
            _signal.signal(signum, _signal.SIG_DFL)
        except (OSError, ValueError):  # not a signal Python manages
            pass


def _exit_function() -> None:
    """``multiprocessing.util._exit_function`` when it has something to do: finalizers to
    run, children to join or terminate, or multiprocessing's log to write to."""
    if (
        mp_util._finalizer_registry  # type: ignore[attr-defined]
        or mp_process._children  # type: ignore[attr-defined]
        or mp_util._logger is not None  # type: ignore[attr-defined]
    ):
        mp_util._exit_function()  # type: ignore[attr-defined]
