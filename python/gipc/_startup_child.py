"""The child's half of ``_startup``, for a child that is not a fork of its caller (start
methods "spawn" and "forkserver"): read the start-up data, get the interpreter ready as
multiprocessing's spawn does, run the process. And the entry point of a spawned
interpreter (``spawn_main``).

Imported by every spawned child before it knows what its target needs: it imports no
gevent (``_transfer`` and ``_handles`` only if handles arrived, and they import gevent only
to wait), so a child whose target needs neither starts in about the time
multiprocessing's own spawn takes.
"""

from __future__ import annotations

import _signal
import io
import os
import pickle
import sys
from multiprocessing import process as mp_process
from multiprocessing import spawn as mp_spawn
from . import _child

# typing is not imported at run time: a spawned child imports this module before
# anything else of gipc's, and typing would be ~5% of its start-up (see _startup_child).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Sequence, Tuple

#: The flag after ``-c`` on a spawned child's command line (see ``_popen_spawn``).
SPAWN_FLAG = "--gipc-spawn"

#: Key of the preparation data that says the process pickle refers to gipc handles (a
#: handle that travels, or a closed one) or to descriptors beside it: the child then
#: unpickles it with ``_transfer.HandleUnpickler``.
REFERENCES_KEY = "gipc_references"

#: Key of the preparation data that carries the main script compiled by the caller
#: (``_startup.main_code``): (``code_key()`` of the caller, marshalled code).
MAIN_CODE_KEY = "gipc_main_code"

#: Key of the preparation data that carries the caller's resource limits, for a fork
#: server's child (which has the server's, as they were when it started): {resource:
#: (soft, hard)}.
RLIMITS_KEY = "gipc_rlimits"


def caller_rlimits() -> Dict[int, Tuple[int, int]]:
    """This process's resource limits (``RLIMIT_*``), for its fork server's children."""
    import resource

    global _rlimit_numbers
    if _rlimit_numbers is None:
        _rlimit_numbers = sorted(
            {getattr(resource, name) for name in dir(resource) if name.startswith("RLIMIT_")}
        )
    limits = {}
    for number in _rlimit_numbers:
        try:
            limits[number] = resource.getrlimit(number)
        except (OSError, ValueError):
            continue
    return limits


_rlimit_numbers: Optional[List[int]] = None


def take_rlimits(limits: Dict[int, Tuple[int, int]]) -> None:
    """In a fork server's child: the caller's resource limits instead of the server's,
    as a forked or spawned child has them. One this process may not set (a hard limit the
    caller raised, being root, after the server started) stays the server's."""
    import resource

    for number, wanted in limits.items():
        try:
            if resource.getrlimit(number) != wanted:
                resource.setrlimit(number, wanted)
        except (OSError, ValueError):
            continue


#: Key of the preparation data that carries the caller's file mode creation mask and nice
#: value, for a fork server's child (which has the server's, as they were when it
#: started): {"umask": mask or None, "nice": value or None}.
CALLER_STATE_KEY = "gipc_caller_state"


def caller_state() -> Dict[str, Optional[int]]:
    """This process's umask and nice value, for its fork server's children. The umask is
    read from /proc (``os.umask`` can only read it by changing it, which another thread
    would see); None where there is none."""
    umask: Optional[int] = None
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    umask = int(line.split()[1], 8)
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        nice: Optional[int] = os.getpriority(os.PRIO_PROCESS, 0)
    except (OSError, AttributeError):
        nice = None
    return {"umask": umask, "nice": nice}


def take_caller_state(state: Dict[str, Optional[int]]) -> None:
    """In a fork server's child: the caller's umask and nice value instead of the
    server's, as a forked or spawned child has them. A nice value this process may not
    take (lower than the server's, without the privilege) stays the server's."""
    umask = state.get("umask")
    if umask is not None:
        os.umask(umask)
    nice = state.get("nice")
    if nice is not None:
        try:
            if os.getpriority(os.PRIO_PROCESS, 0) != nice:
                os.setpriority(os.PRIO_PROCESS, 0, nice)
        except OSError:
            pass


def magic_number() -> bytes:
    """The magic number of this interpreter's bytecode."""
    from importlib.util import MAGIC_NUMBER

    return MAGIC_NUMBER


def code_key() -> Any:
    """What code compiled by this interpreter depends on: its bytecode's magic number, its
    flags (``-O``, ``int_max_str_digits``...) and ``-X`` options (``no_debug_ranges``...).
    A child whose own differ (another executable set with ``multiprocessing.set_executable``,
    a flag multiprocessing does not pass on) compiles its main script itself."""
    return (magic_number(), tuple(sys.flags), sorted(sys._xoptions.items()))


def spawn_main() -> None:
    """The spawned interpreter's entry point: default signals, then the process."""
    flag, data_fd, parent_sentinel, exit_fd, handle_fds = sys.argv[1:6]
    if flag != SPAWN_FLAG:
        raise SystemExit(f"gipc: not started as a spawned child ({sys.argv!r})")
    del sys.argv[1:6]
    restore_default_signals_after_exec()
    _child.parent_only_fds.add(int(exit_fd))  # no grandchild of ours holds our exit report
    code = 1
    try:
        code = _child.exit_status(
            run_child(int(data_fd), parse_fds(handle_fds), int(parent_sentinel), forked=False)
        )
    finally:
        try:
            os.write(int(exit_fd), _child.EXIT_CODE.pack(code))
        except OSError:
            pass
    sys.exit(code)


def restore_default_signals_after_exec() -> None:
    """``_child.restore_default_signals`` for a fresh interpreter, without the Rust extension
    where the system says which dispositions are not the default (Linux), so that a
    spawned child whose target passes no handle never loads it (~0.4 ms).

    ``exec`` has set every caught signal back to its default action and kept the ignored
    ones ignored; since then Python's start-up and whatever ran before this (a
    sitecustomize, a ``.pth`` file, faulthandler) may have installed handlers, with
    ``signal.signal`` or behind Python's back. The kernel's own masks (``SigCgt`` and
    ``SigIgn`` of ``/proc/self/status``) name them all; a signal Python's table holds a
    handler for while the kernel says default (reset behind Python's back) is set too, so
    that ``signal.getsignal()`` tells the truth. Each such signal goes back to its default
    action, except
    SIGPIPE, which keeps the disposition Python gives it; then the signals blocked across
    the spawn are unblocked: one that came meanwhile meets its default action. Elsewhere,
    the Rust reset, as for a forked child."""
    changed = _kernel_dispositions()
    if changed is None:
        _child.restore_default_signals()
        return
    keep = {_signal.SIGKILL, _signal.SIGSTOP, _signal.SIGPIPE}
    for signum in range(1, _signal.NSIG):
        if signum in keep:
            continue
        if not (changed >> (signum - 1)) & 1:
            try:
                if _signal.getsignal(signum) == _signal.SIG_DFL:
                    continue
            except (OSError, ValueError):
                continue
        try:
            _signal.signal(signum, _signal.SIG_DFL)
        except (OSError, ValueError, RuntimeError):  # glibc's own 32 and 33: not settable
            pass
    _signal.pthread_sigmask(_signal.SIG_SETMASK, ())


def _kernel_dispositions() -> Optional[int]:
    """The signals this process catches or ignores, as the kernel says (bit n - 1 for
    signal n), or None where it does not say (no /proc)."""
    found = {}
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith((b"SigIgn:", b"SigCgt:")):
                    found[line[:7]] = int(line[7:], 16)
    except (OSError, ValueError):
        return None
    if len(found) != 2:
        return None
    return found[b"SigIgn:"] | found[b"SigCgt:"]


def run_child(
    data_fd: int, handle_fds: Sequence[int], parent_sentinel: int, forked: bool
) -> int:
    """In the child: reads the start-up data from ``data_fd``, gets the interpreter ready
    as multiprocessing's spawn does (the main module imported as ``__mp_main__``), rebuilds
    the handles on ``handle_fds``, and runs the process. Returns its exit code. ``forked``:
    a fork server's child, which ends with ``os._exit`` (its atexit functions are run here,
    as multiprocessing's forkserver does), not a fresh interpreter that exits normally."""
    current = mp_process.current_process()
    with os.fdopen(data_fd, "rb", closefd=True) as stream:
        data = read_startup_data(stream)
    if data is None:
        # Torn: the caller gave up on this start (interrupted while it waited for the
        # fork server to say the child's pid). Nothing to run, nothing to say.
        return 1
    current._inheriting = True  # type: ignore[attr-defined]
    try:
        prep = pickle.loads(data[0])
        references = prep.pop(REFERENCES_KEY, False)
        main_code = prep.pop(MAIN_CODE_KEY, None)
        limits = prep.pop(RLIMITS_KEY, None)
        if limits is not None:
            take_rlimits(limits)
        state = prep.pop(CALLER_STATE_KEY, None)
        if state is not None:
            take_caller_state(state)
        main_path = None if main_code is None else prep.pop("init_main_from_path", None)
        mp_spawn.prepare(prep)  # the main module last, as prepare() does it
        if main_path is not None:
            import_main_from_code(main_path, main_code)
        if handle_fds or references:
            from ._transfer import HandleUnpickler

            process = HandleUnpickler(io.BytesIO(data[1]), handle_fds).load()
        else:
            # Nothing to rebuild (the caller says so: REFERENCES_KEY). Without handles,
            # gevent is imported only if the target needs it.
            process = pickle.loads(data[1])
    finally:
        del current._inheriting  # type: ignore[attr-defined]

    def bootstrap() -> int:
        code: int = process._bootstrap(parent_sentinel=parent_sentinel)
        return code

    return _child.run_forked(bootstrap) if forked else bootstrap()


def import_main_from_code(path: str, main_code: Tuple[Any, bytes]) -> None:
    """``multiprocessing.spawn``'s import of the main script as ``__mp_main__``
    (``_fixup_main_from_path``, the same in 3.9 to 3.13), with the code the caller compiled
    (``_startup.main_code``) instead of the script read and compiled again here."""
    key, blob = main_code
    if key != code_key():
        mp_spawn._fixup_main_from_path(path)  # type: ignore[attr-defined]
        return
    current_main = sys.modules["__main__"]
    if os.path.splitext(os.path.basename(path))[0] == "ipython":
        return
    if getattr(current_main, "__file__", None) == path:
        return  # already the main module (a fork server that preloaded it)
    import marshal
    import runpy
    import types

    mp_spawn.old_main_modules.append(current_main)
    main_module = types.ModuleType("__mp_main__")
    # What runpy.run_path(path, run_name="__mp_main__") does with a script, minus reading
    # and compiling it.
    content = runpy._run_module_code(  # type: ignore[attr-defined]
        marshal.loads(blob), None, "__mp_main__", pkg_name="", script_name=path
    )
    main_module.__dict__.update(content)
    sys.modules["__main__"] = sys.modules["__mp_main__"] = main_module


#: Bytes of each length before the two pickles of the start-up data (little-endian).
LENGTH_BYTES = 8


def frame_startup_data(head: bytes, body: bytes) -> bytes:
    """The start-up data as it travels: each pickle after its length, so that the child
    tells a start its caller abandoned (the data cut short) from a pickle that fails."""
    head_size = len(head).to_bytes(LENGTH_BYTES, "little")
    body_size = len(body).to_bytes(LENGTH_BYTES, "little")
    return b"".join((head_size, head, body_size, body))


def read_startup_data(stream: Any) -> Optional[Tuple[bytes, bytes]]:
    """The two pickles of the start-up data, or None if it ends early."""
    parts = []
    for _ in range(2):
        header = stream.read(LENGTH_BYTES)
        if len(header) < LENGTH_BYTES:
            return None
        size = int.from_bytes(header, "little")
        part = stream.read(size)
        if len(part) < size:
            return None
        parts.append(part)
    return parts[0], parts[1]


def parse_fds(text: str) -> List[int]:
    """The descriptor list of a child's command line ("3,4,5"; "" for none)."""
    return [int(fd) for fd in text.split(",") if fd]
