"""What a child that is not a fork of its caller (start methods "spawn" and "forkserver")
is sent, and what it does with it.

In the caller: ``StartupData`` pickles what ``multiprocessing.spawn`` calls the preparation
data (``sys.path``, working directory, the main module to import as ``__mp_main__``...)
and then the process object itself, whose gipc handles become references to descriptors
that travel beside the data (``_transfer.HandlePickler``). Whatever cannot be pickled is
refused here, in the caller, with an error that names it. ``Feeder`` then writes the bytes
into a pipe as the child reads them (what does not fit at once, from a thread of its own):
the caller never waits for a child to read its start-up data, and needs no running loop.

In the child: ``_startup_child.run_child`` reads both pickles, prepares the interpreter as
``multiprocessing``'s spawn does, rebuilds the handles on the descriptors it was given,
and runs ``Process._bootstrap``.
"""

from __future__ import annotations

import io
import marshal
import os
import pickle
import reprlib
import select
import sys
from stat import S_ISREG
from multiprocessing import context as mp_context
from multiprocessing import process as mp_process
from multiprocessing import spawn as mp_spawn
from multiprocessing import util as mp_util
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Set

from . import _child
from ._startup_child import (
    MAIN_CODE_KEY,
    REFERENCES_KEY,
    CALLER_STATE_KEY,
    RLIMITS_KEY,
    caller_rlimits,
    caller_state,
    code_key,
    frame_startup_data,
    magic_number,
)
from ._handles import _allocate_lock, _original_poll, _start_new_thread
from ._transfer import HandlePickler, InheritedFd
from .exceptions import GIPCTypeError

if TYPE_CHECKING:
    from ._process import _GProcess


def preparation_data(name: str) -> Dict[str, Any]:
    """``multiprocessing.spawn.get_preparation_data``, less one side effect: it asks
    ``get_start_method()``, which fixes multiprocessing's start method for the rest of the
    program (a later ``set_start_method()`` then fails). Here the method is sent only if
    the program chose one."""
    data: Dict[str, Any] = dict(
        log_to_stderr=mp_util._log_to_stderr,  # type: ignore[attr-defined]
        authkey=mp_process.current_process().authkey,
        name=name,
        sys_path=[mp_process.ORIGINAL_DIR if p == "" else p for p in sys.path],  # type: ignore[attr-defined]
        sys_argv=sys.argv,
        orig_dir=mp_process.ORIGINAL_DIR,  # type: ignore[attr-defined]
        dir=os.getcwd(),
    )
    if mp_util._logger is not None:  # type: ignore[attr-defined]
        data["log_level"] = mp_util._logger.getEffectiveLevel()  # type: ignore[attr-defined]
    method = mp_context._default_context.get_start_method(allow_none=True)
    if method is not None:
        data["start_method"] = method
    main_module = sys.modules["__main__"]
    main_name = getattr(getattr(main_module, "__spec__", None), "name", None)
    if main_name is not None:
        data["init_main_from_name"] = main_name
    else:
        main_path = getattr(main_module, "__file__", None)
        if main_path is not None:
            if not os.path.isabs(main_path) and mp_process.ORIGINAL_DIR is not None:  # type: ignore[attr-defined]
                main_path = os.path.join(mp_process.ORIGINAL_DIR, main_path)  # type: ignore[attr-defined]
            data["init_main_from_path"] = os.path.normpath(main_path)
    return data


#: Largest main script whose code the caller compiles for its children (see ``main_code``):
#: compiling takes 0.1-0.35 ms per KiB, once per version of the script, in the caller's loop.
_MAX_MAIN_SOURCE = 24 * 1024

#: Largest compiled main script sent to a child: beyond it, the start-up data would no longer
#: fit the pipe at once (a thread would write it), and the child had better compile it.
_MAX_MAIN_CODE = 32 * 1024

#: path -> (the source compiled, its code marshalled or None).
_main_codes: Dict[str, "tuple[bytes, Optional[bytes]]"] = {}


def main_code(path: Optional[str]) -> Optional["tuple[Any, bytes]"]:
    """The main script at ``path`` compiled, for a child to run as ``__mp_main__``: (what
    the code was compiled for, ``code_key()``; the code marshalled), or None (no such
    script, not a regular file, too large, not source, or it does not compile: the child
    then reads it itself, as multiprocessing's does).

    multiprocessing's spawn child reads and compiles the main script each time (a script
    has no .pyc), ~1 ms for a 200-line script. Here the caller reads the script at each
    start (a few microseconds for 24 KiB), and compiles it only when its bytes changed:
    a child runs the script as it is when the child starts, whatever its modification time
    says (a copy that kept the old one, a switched symlink)."""
    if path is None:
        return None
    try:
        stat = os.stat(path)
        # A FIFO or a device would block the caller's loop, or read differently each time.
        if not S_ISREG(stat.st_mode) or stat.st_size > _MAX_MAIN_SOURCE:
            return None
        with io.open_code(path) as stream:
            source = stream.read(_MAX_MAIN_SOURCE + 1)
    except (OSError, ValueError):  # ValueError: a NUL in the path
        return None
    if len(source) > _MAX_MAIN_SOURCE:
        return None  # grew meanwhile
    cached = _main_codes.get(path)
    if cached is None or cached[0] != source:
        cached = (source, _compile_main(path, source))
        _main_codes[path] = cached
    return None if cached[1] is None else (code_key(), cached[1])


def _compile_main(path: str, source: bytes) -> Optional[bytes]:
    """``runpy.run_path``'s compile of a script, marshalled (None where it would not
    compile source: bytecode, an error, code too large to send)."""
    if source[:4] == magic_number():
        return None  # a .pyc, which the child loads as it is
    try:
        # As runpy compiles it: no compiler flags of this module's (its __future__ import).
        code = marshal.dumps(compile(source, path, "exec", dont_inherit=True))
    except Exception:  # SyntaxError, ValueError (a NUL byte), a warning made an error...
        return None  # left to the child, which says so as multiprocessing's would
    return code if len(code) <= _MAX_MAIN_CODE else None


#: Longest ``-c`` code a child's command line carries with the caller's ``sys.path`` in
#: it (Linux takes 128 KiB per argument); a longer path is left to the start-up data.
_MAX_CODE = 64 * 1024


def child_command(entry: str, *argv: str) -> List[Any]:
    """The command line of a new interpreter (a spawned child, the fork server) that runs
    the Python statement ``entry`` with ``argv`` after ``-c``: this interpreter, its flags,
    and first of all the caller's ``sys.path``, so that gipc (and gevent, for the server)
    are imported from where the caller found them: a ``sys.path`` changed at run time (a
    vendored copy, an application bundle), a relative entry, ``PYTHONPATH`` under ``-I``.
    The executable comes first, as multiprocessing gives it (bytes or str).
    multiprocessing's spawn needs none of this, its child imports only the standard library
    before it reads the caller's path; ours imports gipc first."""
    path = [mp_process.ORIGINAL_DIR if p == "" else p for p in sys.path]  # type: ignore[attr-defined]
    code = f"import sys; sys.path[:] = {path!r}; {entry}"
    if len(code) > _MAX_CODE:
        code = entry
    return [
        mp_spawn.get_executable(),
        *mp_util._args_from_interpreter_flags(),  # type: ignore[attr-defined]
        "-c",
        code,
        *argv,
    ]


class StartupPickler(HandlePickler, ForkingPickler):
    """The process object's pickler: gipc handles as references (the passed ones travel,
    any other is a closed handle in the child, as a forked child has it), and
    multiprocessing's own reducers (a ``Connection``, a socket, shared memory), whose
    descriptors travel beside the handles' (see :class:`_ChildStart`)."""


class _ChildStart:
    """What multiprocessing asks of "the popen of the child being started" while its data is
    pickled (``context.get_spawning_popen()``): that there is one (an authentication key
    pickles only then), and the two names ``reduction.DupFd`` uses: a descriptor an
    argument holds (a ``Connection``, a queue's pipe, the memory of ``Value``/``Array``)
    goes to the child beside the handles' and stays open here, as with multiprocessing's
    spawn."""

    DupFd = InheritedFd

    def __init__(self) -> None:
        #: The pickler at work, which ships the descriptors.
        self.pickler: Optional[HandlePickler] = None

    def duplicate_for_child(self, fd: int) -> int:
        if self.pickler is None:
            raise RuntimeError("no child start is being pickled")
        return self.pickler.add_descriptor(fd)


class StartupData:
    """The bytes a new child reads first, and the descriptors that go with them (the
    passed handles' and multiprocessing objects', in the order the pickle refers to them)."""

    def __init__(
        self, process: "_GProcess", method: str, main_imported_by_server: bool = False
    ) -> None:
        # Inside a child that is importing its main module: the classic missing
        # `if __name__ == "__main__":`, explained by multiprocessing's own RuntimeError
        # (inside the try below it would be taken for an argument that does not pickle).
        mp_spawn._check_not_importing_main()  # type: ignore[attr-defined]
        passed = set(process._gipc_handles)
        body = io.BytesIO()
        pickler = StartupPickler(body, pickle.HIGHEST_PROTOCOL, passed)
        start = _ChildStart()
        # multiprocessing pickles an authentication key (in the preparation data, and the
        # process's own in its `_config`) only for a child being started: it asks who is
        # starting one.
        mp_context.set_spawning_popen(start)  # type: ignore[arg-type]
        try:
            start.pickler = pickler
            pickler.dump(process)
            prep = preparation_data(process.name)
            if pickler.met_references:
                prep[REFERENCES_KEY] = True
            # A fork server that imported the main module gives its children that one.
            code = None if main_imported_by_server else main_code(prep.get("init_main_from_path"))
            if code is not None:
                prep[MAIN_CODE_KEY] = code
            if method == "forkserver":
                # Its child is forked from the server, which has our limits as they were
                # when it started: it takes those we have now.
                prep[RLIMITS_KEY] = caller_rlimits()
                prep[CALLER_STATE_KEY] = caller_state()
            head = pickle.dumps(prep, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise GIPCTypeError(
                f"cannot start a child with start method {method!r}: "
                f"{_culprit(process, start, passed)} must be picklable, and is not ({exc})"
            ) from exc
        finally:
            mp_context.set_spawning_popen(None)
        self.payload = frame_startup_data(head, body.getvalue())
        self.handle_fds: List[int] = list(pickler.fds)


def _culprit(process: "_GProcess", start: _ChildStart, passed: Set[Any]) -> str:
    """Names what could not be pickled: the target, an argument, or a keyword argument."""
    target = process._target  # type: ignore[attr-defined]
    candidates = [(f"the target {target!r}", target)]
    candidates += [(f"argument {i} ({_short_repr(a)})", a) for i, a in enumerate(process._args)]  # type: ignore[attr-defined]
    candidates += [
        (f"keyword argument {k!r} ({_short_repr(v)})", v)
        for k, v in process._kwargs.items()  # type: ignore[attr-defined]
    ]
    for what, obj in candidates:
        try:
            start.pickler = StartupPickler(io.BytesIO(), pickle.HIGHEST_PROTOCOL, passed)
            start.pickler.dump(obj)
        except Exception:
            return what
    return "the process object"


def _short_repr(obj: Any) -> str:
    """At most 60 characters of ``obj``'s repr, never an error: the repr of an argument
    nested deeper than the recursion limit (which is often why it did not pickle) would
    raise RecursionError, and hide the error that names it."""
    try:
        text = reprlib.repr(obj)  # bounded depth and length
    except Exception:
        text = f"<{type(obj).__name__} object>"
    return f"{text:.60}"


class Feeder:
    """Writes ``data`` into the non-blocking descriptor ``fd`` as the child reads it, then
    closes ``fd``; the caller never waits for the child. What the pipe takes at once is
    written at once (start-up data up to the pipe's 64 KiB: the common case, no thread);
    the rest by a thread of its own, which needs nothing of the caller (no running hub: a
    program that polls ``is_alive()`` with ``time.sleep``, or that starts a child in one
    thread and joins it in another, gets its child started as with multiprocessing) and
    holds the GIL only between writes. A reader that goes away (the child died) ends it
    quietly: the child's exit code tells that story.

    ``hold_back`` bytes at the end wait for ``release()`` (which writes them at once when
    the pipe takes them, no thread either): the child can read all but the last of its
    start-up data before the caller knows it exists, and cannot run anything until then;
    ``cancel()`` instead leaves it a torn start-up (it exits quietly)."""

    #: Longest wait for the pipe between two looks at ``cancel()``, in milliseconds.
    _POLL_MS = 100

    def __init__(self, fd: int, data: bytes, hold_back: int = 0) -> None:
        self.fd = fd
        self.view = memoryview(data)
        self.held = hold_back
        self._cancelled = False
        self._thread_started = False
        #: Guards ``held``, ``_cancelled`` and the descriptor's closing between the caller
        #: and the thread; ``_wake`` is released to wake a thread that waits for release().
        self._lock = _allocate_lock()
        self._wake = _allocate_lock()
        self._wake.acquire()
        _child.parent_only_fds.add(fd)
        os.set_blocking(fd, False)

    def start(self) -> None:
        with self._lock:
            if self.fd < 0 or self._thread_started:
                return
            if self._write_available() or len(self.view) <= self.held:
                return  # done, or only the held-back bytes wait: release() writes them
            self._thread_started = True
        self._start_thread()

    def release(self) -> None:
        """Lets the held-back bytes go: written at once when the pipe takes them (the
        common case: no thread), else by the thread."""
        with self._lock:
            self.held = 0
            if self._thread_started:
                wake = True
            elif self.fd < 0 or self._write_available():
                return
            else:
                wake = False
                self._thread_started = True
        if wake:
            self._wake_thread()
        else:
            self._start_thread()

    def _start_thread(self) -> None:
        """Starts the thread, which owns the descriptor from now on. If it cannot start
        (the system refuses a thread), the descriptor is closed, not left to a thread that
        does not exist: the child reads a torn start-up and exits, instead of waiting for
        ever for the rest."""
        try:
            _start_new_thread(self._run, ())
        except BaseException:
            with self._lock:
                self._close()
            raise

    def cancel(self) -> None:
        """Stops writing and closes the descriptor (the thread's, if one writes: it closes
        it itself, never under a write of its own)."""
        with self._lock:
            self._cancelled = True
            if not self._thread_started:
                self._close()
                return
        self._wake_thread()

    def _wake_thread(self) -> None:
        try:
            self._wake.release()
        except RuntimeError:  # awake already
            pass

    def _write_available(self) -> bool:
        """Writes what the pipe takes now, without waiting; True once finished (all written,
        or the reader is gone), with the descriptor closed. Called with ``_lock`` held."""
        try:
            while len(self.view) > self.held:
                written = os.write(self.fd, self.view[: len(self.view) - self.held])
                self.view = self.view[written:]
        except BlockingIOError:
            return False
        except OSError:  # EPIPE: the child is gone
            self.view = memoryview(b"")
        if self.view:
            return False  # only the held-back bytes are left
        self._close()
        return True

    def _run(self) -> None:
        """The thread: writes as the pipe takes it (its own descriptor from now on: only
        it writes, and it closes it), waits for release() before the held-back bytes."""
        try:
            poller = _original_poll()()  # select.poll, gevent.monkey undone
            poller.register(self.fd, select.POLLOUT)
            while True:
                with self._lock:
                    if self._cancelled:
                        return
                    end = len(self.view) - self.held
                if end <= 0:
                    if not self.view:
                        return  # all written
                    self._wake.acquire()  # until release() or cancel()
                    continue
                try:
                    written = os.write(self.fd, self.view[:end])
                except BlockingIOError:
                    poller.poll(self._POLL_MS)
                    continue
                except OSError:  # EPIPE: the child is gone
                    return
                self.view = self.view[written:]
        finally:
            with self._lock:
                self._close()

    def _close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            self.view = memoryview(b"")
            _child.close_fd(fd)


def format_fds(fds: Sequence[int]) -> str:
    return ",".join(str(fd) for fd in fds)

