"""The pool's queue: work items waiting for a worker, in submission order."""

from __future__ import annotations

import collections
from typing import List, Optional, Union

import gevent.lock

from ._task import WorkItem

#: `TaskQueue.get_nowait`: nothing in the queue right now.
EMPTY = object()


class TaskQueue:
    """The pool's work items in submission order, with stop marks (``None``: one worker is
    to stop). Tasks handed back by a worker, which were taken earlier, go back to the
    front."""

    def __init__(self) -> None:
        self._items: "collections.deque[Optional[WorkItem]]" = collections.deque()
        self._count = gevent.lock.Semaphore(0)  # len(self._items), to wait on

    def __len__(self) -> int:
        return len(self._items)

    def has_tasks(self) -> bool:
        """Whether a task waits (stop marks, always behind the tasks, do not count)."""
        return bool(self._items) and self._items[0] is not None

    def put(self, item: Optional[WorkItem]) -> None:
        self._items.append(item)
        self._count.release()

    def put_front(self, items: List[WorkItem]) -> None:
        self._items.extendleft(reversed(items))
        for _ in items:
            self._count.release()

    def get(self) -> Optional[WorkItem]:
        self._count.acquire()
        return self._items.popleft()

    def get_nowait(self) -> Union[None, WorkItem, object]:
        if not self._count.acquire(blocking=False):
            return EMPTY
        return self._items.popleft()
