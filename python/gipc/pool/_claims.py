"""Which of the tasks sent ahead to a worker it may still start: the one piece of state the
parent and a worker process share (see the claim protocol in :mod:`gipc.pool._worker`)."""

from __future__ import annotations

import fcntl
import os
import tempfile
from typing import Any, List, Optional, Tuple

from .. import _child, _core
from .._transfer import DescriptorCarrier


class TaskClaims:
    """Which of the tasks sent to one worker it may still start, shared by the parent and
    the worker.

    Tasks are numbered in the order they are sent (1, 2, ...). The worker *claims* each one
    before running it; the parent may *revoke* every task it has sent that is not claimed
    yet, to hand it to a worker that is free. Each is one atomic compare-and-swap of a word
    both processes map (``_core.ClaimWord``, see ``gipc_wire::claims``), so a task is
    either run by this worker or handed on, never both and never neither; neither side
    waits for the other; and the parent always knows which task the worker was running
    when it died.

    How the word is shared depends on how the worker is started (``for_start_method``):
    this class for a forked worker (anonymous shared memory, mapped before the fork and
    inherited), ``FileTaskClaims`` for the others.
    """

    _SIZE = 8

    @staticmethod
    def for_start_method(method: str) -> "TaskClaims":
        return TaskClaims() if method == "fork" else FileTaskClaims()

    def __init__(self) -> None:
        self._word = _core.ClaimWord.anonymous()

    def claim(self, number: int) -> bool:
        """In the worker: whether it may run task ``number`` (False: it was revoked)."""
        return self._word.claim(number)

    def revoke(self, through: int) -> int:
        """In the parent: revokes every task up to ``through`` (the last one sent) that the
        worker has not claimed, and returns the last one it did claim (those after it are
        revoked)."""
        return self._word.revoke(through)

    def started(self, last_sent: int) -> int:
        """The last task the worker claimed; ``last_sent``: the last task sent to it."""
        return self._word.claimed(last_sent)

    def close(self) -> None:
        self._word.close()


class FileTaskClaims(TaskClaims, DescriptorCarrier):
    """``TaskClaims`` for a worker that is not a fork of the pool's process (start methods
    "forkserver" and "spawn"), which inherits no anonymous memory. The word lives in an
    unlinked file (``memfd_create`` where the system has it) that both processes map; its
    descriptor travels with the worker's start-up data (``gipc._transfer.HandlePickler``)."""

    def __init__(self, fd: Optional[int] = None) -> None:
        #: Made here (the pool's process) or rebuilt from a descriptor (the worker).
        self._made_here = fd is None
        if fd is None:
            fd = _unlinked_file(self._SIZE)
            # The worker's and ours only: closed in any child forked here meanwhile.
            _child.parent_only_fds.add(fd)
        self._fd = fd
        try:
            self._word = _core.ClaimWord.from_fd(fd)
        except BaseException:
            self._close_fd()
            raise

    def _export(self) -> Tuple[Any, List[int]]:
        return None, [self._fd]

    @classmethod
    def _rebuild(cls, state: Any, fds: List[int]) -> "FileTaskClaims":
        return cls(fds[0])

    def close(self) -> None:
        super().close()
        self._close_fd()

    def _close_fd(self) -> None:
        if self._made_here:
            _child.close_fd(self._fd)
        else:
            os.close(self._fd)


def _unlinked_file(size: int) -> int:
    """A descriptor of ``size`` bytes of zeroed memory-backed file with no name, sealed
    against shrinking where the system can (a worker holds the descriptor too, and a task
    that truncated the file would make the next claim or take-back a SIGBUS, in the
    worker and in the parent)."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        fd: int = memfd_create(
            "gipc-pool-claims", os.MFD_CLOEXEC | getattr(os, "MFD_ALLOW_SEALING", 0)
        )
    else:  # macOS: a temporary file, unlinked at once
        fd, path = tempfile.mkstemp(prefix="gipc-pool-claims-")
        os.unlink(path)
    try:
        os.ftruncate(fd, size)
        add_seals = getattr(fcntl, "F_ADD_SEALS", None)
        if memfd_create is not None and add_seals is not None:
            fcntl.fcntl(fd, add_seals, fcntl.F_SEAL_SHRINK)
    except BaseException:
        os.close(fd)
        raise
    return fd
