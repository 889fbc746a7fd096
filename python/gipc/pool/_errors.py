"""What a pool task fails with when its worker, not its own code, ended it."""

from __future__ import annotations

import concurrent.futures as cf
import sys
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Tuple

from .._outcome import describe_exit


class WorkerCrashed(BrokenProcessPool):
    """The worker running the task died (a signal such as SIGKILL or SIGSEGV,
    ``os._exit()``, ``sys.exit()``). Only that task fails; the pool replaces the worker
    and keeps serving. ``exitcode`` is ``-N`` for signal N; ``pid`` is the worker's.

    ``handles_lost``: the worker died before it started the task, which is not run by
    another worker as others are because the gipc handles in its call had gone to it."""

    def __init__(
        self, pid: int, exitcode: int, task: str = "the task", handles_lost: bool = False
    ) -> None:
        if handles_lost:
            message = (
                f"worker process {pid} {describe_exit(exitcode)} before it started {task}, "
                "whose gipc handles had been sent to it: the task cannot go to another worker"
            )
        else:
            message = f"worker process {pid} {describe_exit(exitcode)} while running {task}"
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.task = task
        self.handles_lost = handles_lost

    def __reduce__(self) -> Tuple[Any, ...]:
        return type(self), (self.pid, self.exitcode, self.task, self.handles_lost)


# concurrent.futures.TimeoutError is the builtin from Python 3.11 on; before, it is its own
# class, and TaskTimeout should be caught by either spelling. (A version test, so that type
# checkers see the same bases.)
if sys.version_info >= (3, 11):
    _TimeoutBase = TimeoutError
else:

    class _TimeoutBase(cf.TimeoutError, TimeoutError):
        pass


class TaskTimeout(_TimeoutBase):
    """The task ran longer than its timeout; the worker running it was killed (and is
    replaced). Distinct from the ``TimeoutError`` that ``Future.result(timeout)`` raises when
    the *caller's* wait runs out, which leaves the task running."""

    def __init__(self, timeout: float, pid: int, task: str = "the task") -> None:
        super().__init__(
            f"{task} ran longer than its timeout of {timeout:g} s; "
            f"worker process {pid} was killed"
        )
        self.timeout = timeout
        self.pid = pid
        self.task = task

    def __reduce__(self) -> Tuple[Any, ...]:
        return type(self), (self.timeout, self.pid, self.task)
