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
import os
import signal
from multiprocessing import util as mp_util
from typing import TYPE_CHECKING, List

from ._popen import CooperativePopen, open_pidfd
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
        opened: List[int] = []
        try:
            parent_r, child_w = os.pipe()  # the caller's sentinel; the child's exit code
            opened += (parent_r, child_w)
            child_r, parent_w = os.pipe()  # the child's parent_process().sentinel
            opened += (child_r, parent_w)
            data_r, data_w = os.pipe()
            opened += (data_r, data_w)
            passed = [data_r, child_r, child_w, *startup.handle_fds]
            args = child_command(
                "from gipc._startup_child import spawn_main; spawn_main()",
                SPAWN_FLAG,
                str(data_r),
                str(child_r),
                str(child_w),
                format_fds(startup.handle_fds),
            )
            pid = mp_util.spawnv_passfds(args[0], args, passed)
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        for fd in (data_r, child_r, child_w):
            os.close(fd)
        try:
            Feeder(data_w, startup.payload).start()  # owns data_w from here on
        except BaseException:
            # Not fed (no thread for data the pipe does not take): the child would exit on
            # its torn start-up with nobody to reap it. It goes now, and is reaped here.
            _kill_and_reap(pid)
            for fd in (parent_r, parent_w):
                os.close(fd)
            raise
        self._adopt(pid, parent_r, (parent_r, parent_w))
        self._exit_fd = open_pidfd(pid)
        _log.debug("started child %s (pid %d, spawn)", process_obj.name, pid)


def _kill_and_reap(pid: int) -> None:
    """Ends a child that was never handed to anyone: SIGKILL, then a wait that is short
    (the kernel's teardown of a new interpreter)."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ChildProcessError, ProcessLookupError):
        pass  # reaped by another's wait for any child (a SIGCHLD handler)
