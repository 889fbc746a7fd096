"""Start method "spawn": the child is a fresh interpreter.

Launched as ``multiprocessing``'s spawn launches one (``util.spawnv_passfds``: vfork and
exec where the Python supports it, every descriptor closed in the child except those named),
so it costs the same whatever the caller's size (from CPython 3.10: 3.9's _posixsubprocess
forks, which copies the caller's page tables), never forks a threaded caller's state, and
inherits exactly: the start-up data pipe, its two sentinels, and the descriptors of the
handles it was passed. The start-up data (``_startup.Feeder``) is then written while the
new interpreter imports its way up to reading it.

The child's command line::

    python [interpreter flags] -c 'import sys; sys.path[:] = [the caller's path];
        from gipc._startup_child import spawn_main; spawn_main()'
        --gipc-spawn DATA_FD PARENT_SENTINEL EXIT_FD HANDLE_FDS
"""

from __future__ import annotations

import logging
from multiprocessing import util as mp_util
from typing import TYPE_CHECKING, Optional

from . import _core
from ._popen import CooperativePopen
from ._startup import Feeder, StartupData, child_command, format_fds
from ._startup_child import SPAWN_FLAG

if TYPE_CHECKING:
    from ._process import _GProcess

_log = logging.getLogger("gipc")


class SpawnPopen(CooperativePopen):
    """A child that is a fresh interpreter: no fork of the caller's memory or threads, a
    start cost of its own (an interpreter start and the imports of the main module), and
    the target, arguments and handles pickled."""

    method = "spawn"

    def _launch(self, process_obj: "_GProcess") -> None:
        startup = StartupData(process_obj, self.method)
        # What this start owns: closed if it fails or is interrupted (an exception from a
        # signal handler can come as any call returns), and the child killed then (see
        # _abort_start).
        start_fds = _core.StartFds()
        pid: Optional[int] = None
        feeder: Optional[Feeder] = None
        try:
            parent_r, child_w = start_fds.pipe()  # the caller's sentinel; the exit code
            child_r, parent_w = start_fds.pipe()  # the child's parent_process().sentinel
            data_r, data_w = start_fds.pipe()
            passed = [data_r, child_r, child_w, *startup.handle_fds]
            args = child_command(
                "from gipc._startup_child import spawn_main; spawn_main()",
                SPAWN_FLAG,
                str(data_r),
                str(child_r),
                str(child_w),
                format_fds(startup.handle_fds),
            )
            # Signals are blocked from before the spawn until its pid is kept: a handler's
            # exception cannot come between the two and lose the child. (The child's mask
            # is reset by its start-up, as a forked child's is.)
            with _core.AllSignalsBlocked():
                pid = mp_util.spawnv_passfds(args[0], args, passed)
            for fd in (data_r, child_r, child_w):
                start_fds.close(fd)
            feeder = Feeder(data_w, startup.payload)  # owns data_w from here on
            start_fds.hand_on(data_w)
            feeder.start()
            self._adopt(pid, parent_r, (parent_r, parent_w))
            self._keep_exit_fd(start_fds, pid)
            _log.debug("started child %s (pid %d, spawn)", process_obj.name, pid)
        except BaseException:
            # Not fed (no thread for data the pipe does not take), or interrupted: a child
            # would exit on its torn start-up, or run with nobody to join it.
            if feeder is not None:
                start_fds.hand_on(data_w)  # the feeder's to close, once
                feeder.cancel()
            self._abort_start(pid, start_fds)
            raise
