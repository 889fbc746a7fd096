"""Which of the tasks sent ahead to a worker it may still start: the one piece of state the
parent and a worker process share (see the claim protocol in :mod:`gipc.pool._worker`)."""

from __future__ import annotations

import _multiprocessing  # type: ignore[import-not-found]  # (no stubs)
import itertools
import mmap
import os
from typing import Any, Optional


class TaskClaims:
    """Which of the tasks sent to one worker it may still start, shared by the parent and
    the worker (memory and a lock made before the fork, inherited by it).

    Tasks are numbered in the order they are sent (1, 2, ...). The worker *claims* each one
    before running it; the parent may *revoke* every task it has sent that is not claimed
    yet, to hand it to a worker that is free. Both happen under the lock, so a task is
    either run by this worker or handed on, never both and never neither; and the parent
    always knows which task the worker was running when it died.
    """

    def __init__(self) -> None:
        self._lock = _new_lock()
        self._memory = mmap.mmap(-1, 16)  # anonymous, shared with the forked worker
        #: [0]: the last task the worker claimed; [1]: tasks up to this one are revoked.
        self._words = memoryview(self._memory).cast("q")

    def claim(self, number: int) -> bool:
        """In the worker: whether it may run task ``number`` (False: it was revoked)."""
        words = self._words
        self._lock.acquire()
        try:
            if number <= words[1]:
                return False
            words[0] = number
            return True
        finally:
            self._lock.release()

    def try_revoke(self, through: int) -> Optional[int]:
        """In the parent: revokes every task up to ``through`` that the worker has not
        claimed, and returns the last one it did claim (those after it are revoked). None
        if the worker holds the lock just now; never waits for it."""
        if not self._lock.acquire(False):
            return None
        try:
            # Never lower: tasks revoked earlier may still be in the worker's pipe.
            if through > self._words[1]:
                self._words[1] = through
            return int(self._words[0])
        finally:
            self._lock.release()

    def started(self) -> int:
        """The last task the worker claimed (read once it is gone, or under the lock)."""
        return int(self._words[0])

    def close(self) -> None:
        self._words.release()
        self._memory.close()


_lock_names = itertools.count()


def _new_lock() -> Any:
    """An unnamed POSIX semaphore used as a lock, shared with the children forked after it.
    (multiprocessing's own Lock would also register a hook that every child then runs.)"""
    while True:
        name = f"/gipc-pool-{os.getpid()}-{next(_lock_names)}-{os.urandom(4).hex()}"
        try:
            # kind 1 is a semaphore; unlink=True removes the name at once: nothing to clean.
            return _multiprocessing.SemLock(1, 1, 1, name, True)
        except FileExistsError:
            continue
