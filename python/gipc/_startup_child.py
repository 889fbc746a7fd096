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
    from typing import List, Sequence

#: The flag after ``-c`` on a spawned child's command line (see ``_popen_spawn``).
SPAWN_FLAG = "--gipc-spawn"

#: Key of the preparation data that says the process pickle refers to gipc handles (a
#: handle that travels, or a closed one) or to descriptors beside it: the child then
#: unpickles it with ``_transfer.HandleUnpickler``.
REFERENCES_KEY = "gipc_references"


def spawn_main() -> None:
    """The spawned interpreter's entry point: default signals, then the process."""
    flag, data_fd, parent_sentinel, exit_fd, handle_fds = sys.argv[1:6]
    if flag != SPAWN_FLAG:
        raise SystemExit(f"gipc: not started as a spawned child ({sys.argv!r})")
    del sys.argv[1:6]
    _child.restore_default_signals()
    _child.parent_only_fds.add(int(exit_fd))  # no grandchild of ours holds our exit report
    code = 1
    try:
        code = run_child(int(data_fd), parse_fds(handle_fds), int(parent_sentinel), forked=False)
    finally:
        try:
            os.write(int(exit_fd), _child.EXIT_CODE.pack(code))
        except OSError:
            pass
    sys.exit(code)


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
        current._inheriting = True  # type: ignore[attr-defined]
        try:
            prep = pickle.load(stream)
            references = prep.pop(REFERENCES_KEY, False)
            mp_spawn.prepare(prep)
            if handle_fds or references:
                from ._transfer import HandleUnpickler

                process = HandleUnpickler(stream, handle_fds).load()
            else:
                # Nothing to rebuild (the caller says so: REFERENCES_KEY). Without handles,
                # gevent is imported only if the target needs it.
                process = pickle.load(stream)
        except EOFError:
            # Torn: the caller gave up on this start (interrupted while it waited for the
            # fork server to say the child's pid). Nothing to run, nothing to say.
            return 1
        finally:
            del current._inheriting  # type: ignore[attr-defined]

    def bootstrap() -> int:
        code: int = process._bootstrap(parent_sentinel=parent_sentinel)
        return code

    return _child.run_forked(bootstrap) if forked else bootstrap()


def parse_fds(text: str) -> List[int]:
    """The descriptor list of a child's command line ("3,4,5"; "" for none)."""
    return [int(fd) for fd in text.split(",") if fd]
