"""A process pool that cooperates with gevent: a ``concurrent.futures.Executor`` whose workers
are gipc children, fed over gipc pipes.

Every wait (``Future.result``, ``Future.exception``, ``concurrent.futures.wait`` and
``as_completed`` on this pool's futures, ``map``, ``shutdown(wait=True)``) is a cooperative
wait: other greenlets run meanwhile. Bookkeeping is done by greenlets in the parent, three
per worker, so the pool must be used from the thread (and hub) that created it.

How the work moves:

* Each worker is a child started with :func:`gipc.start_process`, with two pipes that carry
  raw bytes: tasks in, outcomes out (see :mod:`gipc._outcome`). A task is a small header
  (which arguments travel separately), the pickled call, then every large ``bytes``
  argument as its own message; a large ``bytes`` return value comes back the same way
  (:mod:`gipc._large_payload`). The transport writes and reads ``bytes`` in place, so those
  are never copied into a pickle.
* A greenlet per worker ("serving") takes the next task from the pool's queue, sends it and
  waits for what comes back: the outcome, the worker's end, or the task's deadline. Two
  helpers feed that wait: one reads outcomes off the pipe, one watches the process exit.
  Once a worker's tasks prove quick (under a millisecond), up to ``prefetch`` (8) more small
  ones are sent ahead while no other worker is idle, so it never waits for the parent
  between two tasks; a task's deadline runs from the moment the one before it finished.
  Sent-ahead tasks count as running (they cannot be cancelled).
* The worker claims each task before it runs it. A worker about to idle takes back the
  tasks others were sent ahead and have not claimed, so none waits behind a long task while
  a worker is free; and when a worker dies the parent knows which task it was running.
* A worker that dies fails only the task it was running (:class:`WorkerCrashed`), once
  the outcomes it had sent have completed theirs; one that runs past the task's timeout
  is killed and fails it with :class:`TaskTimeout`. The tasks it never started go to
  another worker. Either way, and after ``max_tasks_per_child`` tasks, the worker is
  replaced when there is work; so is one that could not be started (a bounded number of
  times in a row).

Where each part lives:

* ``_pool``: :class:`ProcessPool`, the queue (``_queue``), how many workers, shutdown, the
  broken state;
* ``_worker``: the parent's side of one worker, its whole life, and the pool's invariants
  (which task is where, what a crash fails, what is re-sent, the claim protocol);
* ``_worker_child``: what runs in a worker process; ``_claims``: the state it shares with
  the parent; ``_task``: a task and its form on the wire;
* ``_future``: :class:`Future`; ``_errors``: :class:`WorkerCrashed`, :class:`TaskTimeout`.
"""

from concurrent.futures.process import BrokenProcessPool

from ._claims import TaskClaims as _Claims  # noqa: F401  (tests/test_pool_faults.py)
from ._errors import TaskTimeout, WorkerCrashed
from ._future import Future
from ._pool import DEFAULT_PREFETCH as DEFAULT_PREFETCH  # public before the split, unlisted
from ._pool import ProcessPool
from ._task import encode_task as _encode_task  # noqa: F401  (tests/test_pool.py)

__all__ = [
    "BrokenProcessPool",
    "Future",
    "ProcessPool",
    "TaskTimeout",
    "WorkerCrashed",
]

# The public classes print and pickle by the path users import them from, as they did
# when the pool was one module.
for _public in (Future, ProcessPool, TaskTimeout, WorkerCrashed):
    _public.__module__ = __name__
del _public
