"""What runs inside a pool's worker process: its initializer, then one task after another."""

from __future__ import annotations

import pickle
from typing import Any, Callable, Optional, Tuple

from .. import _outcome
from .._handles import _GIPCReader, _GIPCWriter
from .._outcome import Outcome
from ._claims import TaskClaims
from ._task import receive_task


def worker_main(
    tasks: _GIPCReader,
    outcomes: _GIPCWriter,
    claims: TaskClaims,
    initializer: Optional[Callable[..., Any]],
    initargs: Tuple[Any, ...],
    loads: Callable[[bytes], Any] = pickle.loads,
) -> None:
    """A worker's life: run the initializer and report how it went, then run tasks one at a
    time and report each outcome, until told to stop or the parent is gone. A task the
    parent revoked (handed to another worker) is skipped, with no outcome: each task is
    numbered in the order it arrives, as the parent numbered it when it sent it, and is run
    only if the worker could claim that number first."""
    # Its parent's task messages may carry gipc handles (the tasks pipe has no codec, so
    # its reader would refuse them).
    tasks._takes_handles = True
    if initializer is not None:
        ready = _outcome.call(initializer, initargs, {})
    else:
        ready = Outcome()
    if not _outcome.send(outcomes, ready) or ready.exception is not None:
        return
    del ready
    number = 0
    while True:
        task = receive_task(tasks)
        if task is None:
            return
        number += 1
        claimed = claims.claim(number)
        # A task with handles is claimed before its call is read: its descriptors are
        # taken as it is read, and the parent never takes such a task back (a claim
        # cannot fail). Read either way, so the stream stays in step.
        if task.with_handles and not task.read_call(tasks):
            return
        if not claimed:
            continue
        outcome = task.run(loads)
        del task
        if not _outcome.send(outcomes, outcome):
            return
        # Drop the value (and an exception's frames) before waiting for the next task.
        del outcome
