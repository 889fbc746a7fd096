"""Which of the tasks sent ahead to a worker it may still start: the one piece of state the
parent and a worker process share (see the claim protocol in :mod:`gipc.pool._worker`)."""

from __future__ import annotations

import _multiprocessing  # type: ignore[import-not-found]  # (no stubs)
import errno
import fcntl
import mmap
import os
import tempfile
from typing import Any, List, Optional, Tuple

from .. import _child
from .._transfer import DescriptorCarrier


class TaskClaims:
    """Which of the tasks sent to one worker it may still start, shared by the parent and
    the worker.

    Tasks are numbered in the order they are sent (1, 2, ...). The worker *claims* each one
    before running it; the parent may *revoke* every task it has sent that is not claimed
    yet, to hand it to a worker that is free. Both happen under the lock, so a task is
    either run by this worker or handed on, never both and never neither; and the parent
    always knows which task the worker was running when it died.

    Two words of shared memory and a lock; how they are shared depends on how the worker is
    started (``for_start_method``): this class for a forked worker (anonymous memory and an
    unnamed semaphore, made before the fork and inherited), ``FileTaskClaims`` for the
    others.
    """

    _SIZE = 16

    @staticmethod
    def for_start_method(method: str) -> "TaskClaims":
        return TaskClaims() if method == "fork" else FileTaskClaims()

    def __init__(self) -> None:
        self._semaphore = _new_lock()
        self._memory = mmap.mmap(-1, self._SIZE)  # anonymous, shared with the forked worker
        #: [0]: the last task the worker claimed; [1]: tasks up to this one are revoked.
        self._words = memoryview(self._memory).cast("q")

    def _lock(self, blocking: bool) -> bool:
        return bool(self._semaphore.acquire(blocking))

    def _unlock(self) -> None:
        self._semaphore.release()

    def claim(self, number: int) -> bool:
        """In the worker: whether it may run task ``number`` (False: it was revoked)."""
        words = self._words
        self._lock(True)
        try:
            if number <= words[1]:
                return False
            words[0] = number
            return True
        finally:
            self._unlock()

    def try_revoke(self, through: int) -> Optional[int]:
        """In the parent: revokes every task up to ``through`` that the worker has not
        claimed, and returns the last one it did claim (those after it are revoked). None
        if the worker holds the lock just now; never waits for it."""
        if not self._lock(False):
            return None
        try:
            # Never lower: tasks revoked earlier may still be in the worker's pipe.
            if through > self._words[1]:
                self._words[1] = through
            return int(self._words[0])
        finally:
            self._unlock()

    def started(self) -> int:
        """The last task the worker claimed (read once it is gone, or under the lock)."""
        return int(self._words[0])

    def close(self) -> None:
        self._words.release()
        self._memory.close()


class FileTaskClaims(TaskClaims, DescriptorCarrier):
    """``TaskClaims`` for a worker that is not a fork of the pool's process (start methods
    "forkserver" and "spawn"), which inherits neither anonymous memory nor an unnamed
    semaphore. The two words live in an unlinked file (``memfd_create`` where the system has
    it) that both processes map, and the lock is a POSIX record lock on it (``lockf``: held
    per process, so the parent and the worker exclude each other, never themselves). The
    descriptor travels with the worker's start-up data (``gipc._transfer.HandlePickler``)."""

    def __init__(self, fd: Optional[int] = None) -> None:
        #: Made here (the pool's process) or rebuilt from a descriptor (the worker).
        self._made_here = fd is None
        if fd is None:
            fd = _unlinked_file(self._SIZE)
            # The worker's and ours only: closed in any child forked here meanwhile.
            _child.parent_only_fds.add(fd)
        self._fd = fd
        self._memory = mmap.mmap(fd, self._SIZE)
        self._words = memoryview(self._memory).cast("q")

    def _export(self) -> Tuple[Any, List[int]]:
        return None, [self._fd]

    @classmethod
    def _rebuild(cls, state: Any, fds: List[int]) -> "FileTaskClaims":
        return cls(fds[0])

    def _lock(self, blocking: bool) -> bool:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if not blocking and exc.errno in (errno.EAGAIN, errno.EACCES):  # the other's
                return False
            raise
        return True

    def _unlock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        super().close()
        if self._made_here:
            _child.close_fd(self._fd)
        else:
            os.close(self._fd)


def _unlinked_file(size: int) -> int:
    """A descriptor of ``size`` bytes of zeroed memory-backed file with no name."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        fd: int = memfd_create("gipc-pool-claims", os.MFD_CLOEXEC)
    else:  # macOS: a temporary file, unlinked at once
        fd, path = tempfile.mkstemp(prefix="gipc-pool-claims-")
        os.unlink(path)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _new_lock() -> Any:
    """An unnamed POSIX semaphore used as a lock, shared with the children forked after it.
    (multiprocessing's own Lock would also register a hook that every child then runs.)"""
    while True:
        # Short (macOS allows 30 characters) and random; a clash is retried.
        name = f"/gipc-{os.urandom(6).hex()}"
        try:
            # kind 1 is a semaphore; unlink=True removes the name at once: nothing to clean.
            return _multiprocessing.SemLock(1, 1, 1, name, True)
        except FileExistsError:
            continue
