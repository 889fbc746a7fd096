"""gipc's cooperative waits against a real Dask cluster: a ``LocalCluster`` of two worker
processes on the loopback interface, driven through ``Client.get_executor()``, the
``concurrent.futures.Executor`` that Dask offers.

The cluster is started once for the module (it takes seconds). Its scheduler and its
workers' nannies run in this process, and keep open the connections that the worker
processes make to them, as and when the workers see fit: a test's own leak check
(tests/conftest.py) would take those for the test's. So the tests that use the cluster are
marked ``allow_leaks``, and the cluster fixture makes the same check for all of them at
once: when it has closed the cluster, every descriptor and child process opened since it
started (by Dask or by gipc) must be gone.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing.resource_tracker
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple

import gevent
import pytest

import gipc
from conftest import _settle, child_pids, open_fds
from helpers import Ticker

distributed = pytest.importorskip(
    "distributed", reason="dask.distributed is not installed (requirements-test.txt pins it)"
)

TASKS = 1000

# --- What runs on the workers (pickled by reference: the workers import this module) ------


def square(x: int) -> int:
    return x * x


def fail(i: int) -> None:
    raise ValueError(f"task {i} failed on purpose")


def gated(gate: str, value: int) -> int:
    """Returns ``value`` once the test creates the file ``gate`` (or after a minute)."""
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.005)
    return value


# --- The cluster --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    fds_before = open_fds()
    children_before = child_pids()
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        local_directory=str(tmp_path_factory.mktemp("dask")),
        silence_logs=logging.CRITICAL,
    )
    client = distributed.Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
        # Spawning the workers started multiprocessing's resource tracker, a process meant
        # to live as long as this one (and to clean up after it). Stopped now, it cleans up
        # now, and leaves no child behind for the tests that follow.
        tracker = multiprocessing.resource_tracker._resource_tracker
        if getattr(tracker, "_pid", None) in child_pids() - children_before:
            tracker._stop()
        leftovers: Dict[str, Any] = {}

        def cluster_gone() -> bool:
            leftovers.clear()
            leftovers.update(
                children=child_pids() - children_before,
                fds={
                    fd: what
                    for fd, what in open_fds().items()
                    # 0-2: pytest's capture swaps them between setup and teardown.
                    if fd > 2 and fds_before.get(fd) != what
                },
            )
            return not any(leftovers.values())

        assert _settle(cluster_gone, attempts=250), f"the cluster left behind: {leftovers}"


@pytest.fixture
def executor(client: Any) -> Iterator[cf.Executor]:
    with client.get_executor() as executor:
        yield executor


# --- One program, two executors -----------------------------------------------------------


class Report(NamedTuple):
    results: List[int]
    ticks: int
    longest_gap: float
    seconds: float


def program(executor: cf.Executor, n: int = TASKS) -> Report:
    """A gevent program that farms out ``n`` tasks to ``executor`` and collects them as they
    complete, while a greenlet ticks every millisecond."""
    ticker = Ticker(0.001)
    try:
        futures = []
        for i in range(n):
            futures.append(executor.submit(square, i))
            if i % 50 == 0:
                gevent.sleep(0.001)  # submitting is work too: let the others run meanwhile
        # The gap is measured from the first tick after the submissions on; the ticks are
        # counted over the whole program (a fast executor may have finished every task by
        # the time the collection starts, leaving it a millisecond or two).
        gevent.sleep(0.002)
        ticker.max_gap = 0.0
        started = time.perf_counter()
        results = [f.result() for f in gipc.as_completed(futures)]
        seconds = time.perf_counter() - started
        return Report(sorted(results), ticker.ticks, ticker.max_gap, seconds)
    finally:
        ticker.stop()


def check(report: Report) -> None:
    assert report.results == [i * i for i in range(TASKS)]
    # The loop kept going: a generous bound for a loaded 2-core machine (benches/
    # futures_bench.py measures the real figure).
    assert report.ticks >= 10, report
    assert report.longest_gap < 1.0, report


@pytest.mark.allow_leaks
def test_a_thousand_dask_tasks_collected_cooperatively(executor: cf.Executor) -> None:
    check(program(executor))


def test_the_same_program_on_the_process_pool() -> None:
    with gipc.ProcessPool(2) as pool:
        check(program(pool))


# --- Failures, timeouts, cancellation -----------------------------------------------------


@pytest.mark.allow_leaks
def test_dask_task_exceptions_are_reraised_with_their_messages(executor: cf.Executor) -> None:
    failing = [executor.submit(fail, i) for i in range(3)]
    fine = executor.submit(square, 7)
    done, _ = gipc.wait([*failing, fine], return_when=gipc.FIRST_EXCEPTION)
    assert done & set(failing)
    for f in gipc.as_completed(failing):
        with pytest.raises(ValueError, match=r"task \d failed on purpose"):
            f.result()
    with pytest.raises(ValueError, match="task 2 failed on purpose"):
        gipc.result(failing[2])
    assert gipc.result(fine) == 49


@pytest.mark.allow_leaks
def test_timeouts_fire_while_dask_tasks_run(executor: cf.Executor, tmp_path: Path) -> None:
    gate = tmp_path / "open"
    ticker = Ticker(0.001)
    running = [executor.submit(gated, str(gate), i) for i in range(2)]
    queued = executor.submit(gated, str(gate), 2)
    try:
        it = gipc.as_completed(running, timeout=0.2)
        with pytest.raises(cf.TimeoutError, match=r"2 \(of 2\) futures unfinished"):
            next(it)
        assert ticker.ticks >= 10, ticker.ticks
        assert gipc.wait(running, timeout=0.05).not_done == set(running)
        with pytest.raises(cf.TimeoutError):
            gipc.result(running[0], timeout=0.05)
        # Cancelling the concurrent.futures side also cancels the Dask task.
        assert queued.cancel()
        done, _ = gipc.wait([queued, *running], return_when=gipc.FIRST_COMPLETED)
        assert done == {queued}
        with pytest.raises(cf.CancelledError):
            gipc.result(queued)
    finally:
        gate.touch()
        ticker.stop()
    assert sorted(f.result() for f in gipc.as_completed(running, timeout=60)) == [0, 1]
