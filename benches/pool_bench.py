#!/usr/bin/env python
"""Process pools driven from a gevent program: gipc.ProcessPool against
concurrent.futures.ProcessPoolExecutor and multiprocessing.Pool.

    python benches/pool_bench.py [--runs 3] [--workers 2] [--json out.json]
    python benches/pool_bench.py --start-methods [--runs 3]   # gipc's workers by method

Workloads, each after a warm-up that starts every worker:
  tiny   10,000 tasks returning x + 1, through map() (chunksize 1): tasks per second;
  bulk   200 tasks that each take a 1 MiB bytes and return it: MB/s moved (in + out);
  mixed  short and long tasks after a run of quick ones (map of 200 tiny tasks), in
         seconds: four 0.3 s tasks at once (0.6 s on 2 workers when none waits behind
         another while a worker is free), then 200 tasks of which 1 in 4 sleeps 20 ms
         (0.5 s on 2 workers at best).
For tiny and bulk, the parent's longest event-loop stall is recorded over a second pass of
the same tasks (``stallmeter.py``: how long an I/O event waited for the loop; the meter's
own cost stays out of the timed pass): the stdlib pools block the event loop while the main
greenlet waits on them. Beside it, the longest garbage collection in that pass: a full one
walks every object alive (the pending tasks of the map among them) and stalls the loop
whatever the pool.

Each (implementation, workload, run) runs in a fresh interpreter, so no pool's state leaks
into another's figures. Ratios are computed inside each run, then the median is shown.

``--start-methods`` compares gipc.ProcessPool's workers started by fork, by gipc's fork
server and by spawn instead (tiny and bulk, after the warm-up, so worker start-up is not
counted): one pool of each in one process, and ``--runs`` rounds in which every pool runs
each workload once, the pools taking turns at going first; ratios to the fork pool's rate
in the same round. (This VM's speed flips between two states within seconds, 25k to 55k
tiny tasks a second for the same pool: runs in fresh interpreters, minutes apart, gave
medians of 0.71 to 0.97 for the same code. Use 30 rounds or more.)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Iterator, List

TINY_TASKS = 10_000
BULK_TASKS = 200
BULK_SIZE = 1 << 20
IMPLS = ["gipc", "cf", "mp"]


def tiny(x: int) -> int:
    return x + 1


def echo(payload: bytes) -> bytes:
    return payload


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def mostly_tiny(x: int) -> int:
    if x % 4 == 0:
        time.sleep(0.02)
    return x + 1


def _close(impl: str, pool: object) -> None:
    """Shuts a pool down and waits for its workers, as each implementation does it."""
    if impl == "mp":
        pool.close()  # type: ignore[attr-defined]
        pool.join()  # type: ignore[attr-defined]
    else:
        pool.shutdown(wait=True)  # type: ignore[attr-defined]


@contextlib.contextmanager
def _longest_collection() -> Iterator[List[float]]:
    """The longest garbage collection of the interpreter's while the block runs, in seconds
    (``[0]`` of what it yields, read after the block): a full one, over every object alive,
    is a stall of the event loop that no pool's code can split."""
    longest = [0.0]
    began = [0.0]

    def timed(phase: str, info: dict) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            longest[0] = max(longest[0], time.perf_counter() - began[0])

    gc.callbacks.append(timed)
    try:
        yield longest
    finally:
        gc.callbacks.remove(timed)


def measure(impl: str, workload: str, workers: int) -> dict:
    from stallmeter import StallMeter

    if impl.startswith("gipc"):
        import gipc

        method = impl.partition(":")[2] or None
        pool = gipc.ProcessPool(max_workers=workers, start_method=method)
        run_map = lambda fn, items: list(pool.map(fn, items))  # noqa: E731
    elif impl == "cf":
        import concurrent.futures as cf
        import multiprocessing

        pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        run_map = lambda fn, items: list(pool.map(fn, items))  # noqa: E731
    else:
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(workers)
        run_map = lambda fn, items: pool.map(fn, items, chunksize=1)  # noqa: E731

    run_map(tiny, range(4 * workers))  # every worker started and warm
    if workload == "mixed":
        out = {}
        for key, fn, items in (("four_long_s", nap, [0.3] * 4),
                               ("mixed_s", mostly_tiny, list(range(200)))):
            run_map(tiny, range(200))  # tasks have proved quick
            start = time.perf_counter()
            results = run_map(fn, items)
            out[key] = time.perf_counter() - start
            assert len(results) == len(items)
        _close(impl, pool)
        return out
    if workload == "tiny":
        items, fn, moved = list(range(TINY_TASKS)), tiny, None
    else:
        payload = b"\x5a" * BULK_SIZE
        items, fn, moved = [payload] * BULK_TASKS, echo, 2 * BULK_SIZE * BULK_TASKS
    start = time.perf_counter()
    results = run_map(fn, items)
    elapsed = time.perf_counter() - start
    assert len(results) == len(items)
    del results  # the second pass starts with the heap the first one had
    # The stall over a second pass with the meter running: its own wake-ups (~10% of a
    # CPU) would slow a cooperative pool's timed pass, and not a blocking one's.
    with _longest_collection() as collections:
        meter = StallMeter.settled()
        run_map(fn, items)
        stall = meter.stop()[0]
    _close(impl, pool)
    out = {"seconds": elapsed, "stall_ms": stall * 1e3, "gc_ms": collections[0] * 1e3}
    if moved is None:
        out["tasks_per_s"] = len(items) / elapsed
    else:
        out["mb_per_s"] = moved / elapsed / 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("--one", nargs=2, metavar=("IMPL", "WORKLOAD"), help=argparse.SUPPRESS)
    parser.add_argument("--start-methods", action="store_true")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], args.workers)))
        return
    if args.start_methods:
        compare_start_methods(args)
        return
    runs = run_all(args, ("tiny", "bulk", "mixed"), IMPLS)

    def med(workload: str, impl: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[(workload, impl)])

    def ratio(workload: str, other: str, key: str) -> float:
        return statistics.median(
            a[key] / b[key] for a, b in zip(runs[(workload, "gipc")], runs[(workload, other)]))

    rows = [("tiny", "tasks_per_s", "10,000 tiny tasks (tasks/s)"),
            ("tiny", "stall_ms", "  longest event-loop stall (ms)"),
            ("tiny", "gc_ms", "  longest garbage collection (ms)"),
            ("bulk", "mb_per_s", "200 x 1 MiB in and out (MB/s)"),
            ("bulk", "stall_ms", "  longest event-loop stall (ms)"),
            ("bulk", "gc_ms", "  longest garbage collection (ms)"),
            ("mixed", "four_long_s", "4 x 0.3 s after quick tasks (s)"),
            ("mixed", "mixed_s", "200 tasks, 1 in 4 takes 20 ms (s)")]
    print(f"\nprocess pools from a gevent program: {args.workers} workers, median of "
          f"{args.runs} runs, {os.uname().sysname} {os.cpu_count()} cores, "
          f"Python {sys.version.split()[0]}")
    print(f"{'workload':34} {'gipc.ProcessPool':>17} {'ProcessPoolExec.':>17} "
          f"{'mp.Pool':>10} {'gipc/cf':>8} {'gipc/mp':>8}")
    table = []
    for workload, key, label in rows:
        values = [med(workload, impl, key) for impl in IMPLS]
        ratios = [ratio(workload, "cf", key), ratio(workload, "mp", key)]
        table.append({"workload": workload, "metric": key, "median": dict(zip(IMPLS, values)),
                      "ratio_vs": {"cf": ratios[0], "mp": ratios[1]}})
        print(f"{label:34} {values[0]:17.1f} {values[1]:17.1f} {values[2]:10.1f} "
              f"{ratios[0]:8.2f} {ratios[1]:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": sys.argv, "table": table,
                       "runs": {f"{w}/{i}": v for (w, i), v in runs.items()}}, f, indent=1)


def run_all(args: argparse.Namespace, workloads: tuple, impls: list) -> dict:
    """Every (workload, implementation) ``args.runs`` times, each in a fresh interpreter:
    (workload, impl) -> the list of its results."""
    runs: dict = {}
    for run in range(args.runs):
        for workload in workloads:
            # The implementations take turns at going first: this VM's speed drifts within
            # seconds, and would otherwise favour whichever always runs in the same place.
            turn = run % len(impls)
            for impl in impls[turn:] + impls[:turn]:
                proc = subprocess.run(
                    [sys.executable, __file__, "--workers", str(args.workers), "--one", impl,
                     workload], capture_output=True, text=True, timeout=300)
                if proc.returncode != 0:
                    raise SystemExit(f"{impl} {workload} failed:\n{proc.stderr}")
                runs.setdefault((workload, impl), []).append(json.loads(proc.stdout))
        print(f"[run {run + 1}/{args.runs} done]", file=sys.stderr)
    return runs


def compare_start_methods(args: argparse.Namespace) -> None:
    import gipc

    methods = ["fork", "forkserver", "spawn"]
    pools = {m: gipc.ProcessPool(max_workers=args.workers, start_method=m) for m in methods}
    payload = b"\x5a" * BULK_SIZE
    workloads = {
        "tiny": (tiny, list(range(TINY_TASKS)), lambda seconds: TINY_TASKS / seconds),
        "bulk": (echo, [payload] * BULK_TASKS,
                 lambda seconds: 2 * BULK_SIZE * BULK_TASKS / seconds / 1e6),
    }
    for pool in pools.values():  # every worker started and warm
        list(pool.map(tiny, range(4 * args.workers)))
        list(pool.map(echo, [payload] * (2 * args.workers)))
    rates: dict = {(w, m): [] for w in workloads for m in methods}
    for run in range(args.runs):
        turn = run % len(methods)
        for workload, (fn, items, rate) in workloads.items():
            for method in methods[turn:] + methods[:turn]:
                start = time.perf_counter()
                results = list(pools[method].map(fn, items))
                rates[(workload, method)].append(rate(time.perf_counter() - start))
                assert len(results) == len(items)
                del results
        print(f"[round {run + 1}/{args.runs} done]", file=sys.stderr)
    for pool in pools.values():
        pool.shutdown()
    print(f"\ngipc.ProcessPool by start method: {args.workers} workers, {args.runs} rounds "
          "(median; ratio: to the fork pool in the same round, median (range))")
    print(f"{'workload':30} " + " ".join(f"{m:>11}" for m in methods)
          + f"  {'forkserver/fork':>20} {'spawn/fork':>20}")
    table = []
    for workload, key, label in (("tiny", "tasks_per_s", "10,000 tiny tasks (tasks/s)"),
                                 ("bulk", "mb_per_s", "200 x 1 MiB in and out (MB/s)")):
        values = [statistics.median(rates[(workload, m)]) for m in methods]
        ratios = {m: [a / b for a, b in zip(rates[(workload, m)], rates[(workload, "fork")])]
                  for m in methods[1:]}
        table.append({"workload": workload, "metric": key, "median": dict(zip(methods, values)),
                      "ratio_to_fork": {m: statistics.median(r) for m, r in ratios.items()},
                      "ratios": ratios})
        shown = [f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})"
                 for r in ratios.values()]
        print(f"{label:30} " + " ".join(f"{v:11.1f}" for v in values)
              + "  " + " ".join(f"{x:>20}" for x in shown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": sys.argv, "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
