#!/usr/bin/env python
"""Waiting on foreign futures from a gevent program: gipc.as_completed against
concurrent.futures.as_completed, while 10,000 futures complete on other threads.

    python benches/futures_bench.py [--runs 3] [--tasks 10000] [--no-dask] [--json out.json]

Sources of futures:
  thread   a plain OS thread calls set_result() on 10,000 futures as fast as it can, once
           the collection has started: what is left is the cost of the wait itself;
  threads  concurrent.futures.ThreadPoolExecutor(2) runs 10,000 tasks returning x + 1;
  dask     Client.get_executor() of a dask.distributed LocalCluster with 2 worker processes
           (on 127.0.0.1) runs the same tasks; its scheduler runs in this process, as with
           any LocalCluster;
  dask-remote  the same cluster started in another process, as a remote scheduler would
           be: this process only runs the Dask client.
Waiters: gipc.as_completed (cooperative) and concurrent.futures.as_completed (blocks the
thread, hence the hub). Each measurement runs twice. The first is timed: "us/future" is the
wall time over the number of futures, from the first submission (for "thread": from the
start of the completions) to the last future collected. For "thread" that is the per-future
cost of the wait; for the executors it is dominated by their own throughput, on which the
waiter has little say. The second runs with the stall meter (``stallmeter.py``: how long an
I/O event waited for the loop; its own cost, ~10% of a CPU, stays out of the timed run):
the loop's longest stall during the collection ("stall ms") and, apart, during the
submissions that come before it ("submit stall": the program's own work, 100 submit() calls
between two turns of the loop, whatever the waiter); "services" is how often the meter's
event was served in the collection (a loop blocked throughout serves it once, at the end).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import subprocess
import sys
import threading
import time
from functools import partial
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import gevent
from stallmeter import StallMeter

import gipc
from gipc._hub import yield_to_loop

WAITERS: Dict[str, Callable[[Iterable["cf.Future[Any]"]], Iterator["cf.Future[Any]"]]] = {
    "gipc.as_completed": gipc.as_completed,
    "cf.as_completed": cf.as_completed,
}


def inc(x: int) -> int:
    return x + 1


def collect(futures: List["cf.Future[Any]"], waiter: str, meter: Optional[StallMeter],
            started: float) -> Dict[str, float]:
    """Collects ``futures`` with ``waiter``: the wall time per future, or (with a meter, which
    has seen the submissions) the longest stalls of the submissions and of the collection."""
    submit_stall = 0.0
    if meter is not None:
        submit_stall = meter.worst[0]
        meter.reset()
    n = sum(1 for f in WAITERS[waiter](futures) if f.result() is not None)
    seconds = time.perf_counter() - started
    assert n == len(futures)
    if meter is None:
        return {"us_per_future": seconds / n * 1e6}
    stall = meter.stop()[0]  # a loop blocked until now is counted by this last look
    return {
        "submit_stall_ms": submit_stall * 1e3,
        "longest_stall_ms": stall * 1e3,
        "services": meter.services,
    }


def from_a_thread(tasks: int, waiter: str, metered: bool) -> Dict[str, float]:
    futures: List["cf.Future[Any]"] = [cf.Future() for _ in range(tasks)]
    start = threading.Event()

    def complete() -> None:
        start.wait()
        for i, f in enumerate(futures):
            f.set_result(i + 1)

    thread = threading.Thread(target=complete)
    thread.start()
    try:
        meter = StallMeter.settled() if metered else None
        started = time.perf_counter()
        start.set()
        return collect(futures, waiter, meter, started)
    finally:
        thread.join()


def from_executor(executor: cf.Executor, tasks: int, waiter: str,
                  metered: bool) -> Dict[str, float]:
    meter = StallMeter.settled() if metered else None
    started = time.perf_counter()
    futures = []
    for i in range(tasks):
        futures.append(executor.submit(inc, i))
        if i % 100 == 0:
            # Submitting 10,000 tasks takes a while: let the loop run (gevent.sleep(0)
            # would not run what is due on the loop).
            yield_to_loop()
    yield_to_loop()  # the meter serves its event: the submissions' stalls are counted
    return collect(futures, waiter, meter, started)


def timed_then_metered(run: Callable[[bool], Dict[str, float]]) -> Dict[str, float]:
    """``run(metered)`` twice: timed without the meter, then with it for the stalls."""
    return {**run(False), **run(True)}


CLUSTER_PROCESS = """
import logging, sys
from dask.distributed import LocalCluster
with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                  dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR) as cluster:
    print(cluster.scheduler_address, flush=True)
    sys.stdin.read()
"""


def cluster_args() -> Dict[str, Any]:
    import logging

    return dict(
        n_workers=2,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        silence_logs=logging.ERROR,
    )


def on_dask(address: Any, tasks: int, runs: int,
            record: Callable[[str, str, Dict[str, float]], None], source: str) -> None:
    from dask.distributed import Client

    with Client(address) as client, client.get_executor() as executor:
        from_executor(executor, 200, "gipc.as_completed", False)  # warm-up
        for _ in range(runs):
            for waiter in WAITERS:
                record(source, waiter,
                       timed_then_metered(partial(from_executor, executor, tasks, waiter)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--no-dask", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()

    results: Dict[str, List[Dict[str, float]]] = {}

    def record(source: str, waiter: str, figures: Dict[str, float]) -> None:
        results.setdefault(f"{source} / {waiter}", []).append(figures)

    for _ in range(args.runs):
        for waiter in WAITERS:
            record("thread", waiter,
                   timed_then_metered(partial(from_a_thread, args.tasks, waiter)))
    with cf.ThreadPoolExecutor(2) as threads:
        for _ in range(args.runs):
            for waiter in WAITERS:
                record("threads", waiter,
                       timed_then_metered(partial(from_executor, threads, args.tasks, waiter)))
    if not args.no_dask:
        from dask.distributed import LocalCluster

        with LocalCluster(**cluster_args()) as cluster:
            on_dask(cluster, args.tasks, args.runs, record, "dask")
        with subprocess.Popen(
            [sys.executable, "-c", CLUSTER_PROCESS],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as cluster_process:
            assert cluster_process.stdout is not None and cluster_process.stdin
            address = cluster_process.stdout.readline().strip()
            try:
                on_dask(address, args.tasks, args.runs, record, "dask-remote")
            finally:
                cluster_process.stdin.close()

    print(f"{args.tasks} futures, median of {args.runs} runs, Python "
          f"{sys.version.split()[0]}, gevent loop {type(gevent.get_hub().loop).__module__}")
    print(f"{'source / waiter':<36} {'us/future':>10} {'stall ms':>9} {'services':>9} "
          f"{'submit stall ms':>16}")
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        submit = f"{med['submit_stall_ms']:.1f}" if not name.startswith("thread /") else "-"
        print(f"{name:<36} {med['us_per_future']:>10.1f} {med['longest_stall_ms']:>9.1f} "
              f"{med['services']:>9.0f} {submit:>16}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
