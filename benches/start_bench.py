"""Start + join of a no-op child per start method, with the caller at several sizes.

For each amount of extra touched memory in the caller (default 0, 1, 2 and 4 GiB), each
start method starts and joins a no-op child ``--runs`` times (after one warm-up start, so a
fork server is already up; the cases take turns, one start of each per round), and reports
the median time and, for gipc, the caller's longest event-loop stall over as many more
starts: the longest time an I/O event waited for the caller's loop (``stallmeter.py``: a
kernel timer firing every 0.25 ms, watched by the loop as a socket would be), with the CPU
time the caller's thread used within that stall and the time it spent runnable but waiting
for a CPU (Linux's schedstat run_delay): a fork's stall is all the caller's CPU; the
others' are mostly the wait, the kernel having queued the woken caller behind the child.
For spawn, also a child that is handed a pipe and writes to it once: the common case, in
which a spawned gipc child imports gevent too. multiprocessing's own ``spawn`` and
``forkserver`` ``Process`` run beside them (their ``start()`` and ``join()`` block the
caller: their stall is the whole time, not shown). The first row starts nothing: its stall
is the loop's own lateness on this machine at that moment, the floor under every other
row's stall.

    python benches/start_bench.py [--sizes 0,1,2,4] [--runs 20] [--pause 5] [--json out.json]

Figures, not pass/fail: the targets (issue 12) are read off the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import statistics
import time
from typing import Callable, Dict, List, Optional

from stallmeter import StallMeter


def noop() -> None:
    pass


def _touched(gib: float) -> bytearray:
    size = int(gib * (1 << 30))
    buf = bytearray(size)
    if size:
        buf[::4096] = b"\x01" * len(range(0, size, 4096))  # every page written: resident
    return buf


def _gipc_case(method: str) -> Callable[[], None]:
    import gipc

    def run() -> None:
        p = gipc.start_process(noop, start_method=method)
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"{method} child exited with {p.exitcode}")

    return run


def say_done(writer: object) -> None:
    writer.put(None)  # type: ignore[attr-defined]


def send_done(conn: object) -> None:
    conn.send(None)  # type: ignore[attr-defined]


def _gipc_pipe_case(method: str) -> Callable[[], None]:
    """A child handed one pipe, which it uses once: the common case, where a spawned child
    also imports gevent (a handle needs it)."""
    import gipc

    def run() -> None:
        with gipc.pipe() as (reader, writer):
            p = gipc.start_process(say_done, args=(writer,), start_method=method)
            reader.get()
            p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"{method} child exited with {p.exitcode}")

    return run


def _mp_pipe_case(method: str) -> Callable[[], None]:
    ctx = multiprocessing.get_context(method)

    def run() -> None:
        receiver, sender = ctx.Pipe(duplex=False)
        p = ctx.Process(target=send_done, args=(sender,))
        p.start()
        sender.close()
        receiver.recv()
        receiver.close()
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"mp {method} child exited with {p.exitcode}")

    return run


def _mp_case(method: str) -> Callable[[], None]:
    ctx = multiprocessing.get_context(method)

    def run() -> None:
        p = ctx.Process(target=noop)
        p.start()
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"mp {method} child exited with {p.exitcode}")

    return run


def measure(
    cases: Dict[str, "tuple[Callable[[], None], bool]"], runs: int, pause: float
) -> Dict[str, Dict[str, Optional[float]]]:
    """Per case: the median of ``runs`` timed starts, each after ``pause`` seconds of idle
    caller, then (for gipc) the longest stall over as many more starts with the stall meter
    running (its own wake-ups would otherwise be counted in the times). The timed starts
    take turns, one of each case per round in an order that rotates, so that a drift of
    the machine's speed (other tenants, a CPU's clock) falls on every case alike, not on
    whichever ran in the slow minute."""
    import gevent

    names = list(cases)
    for run, _ in cases.values():
        run()  # warm-up: imports, a fork server's start
    times: Dict[str, List[float]] = {name: [] for name in names}
    for round_ in range(runs):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            if pause:
                gevent.sleep(pause)  # idle CPUs (costlier to wake) as between a service's starts
            started = time.perf_counter()
            cases[name][0]()
            times[name].append(time.perf_counter() - started)
    results: Dict[str, Dict[str, Optional[float]]] = {}
    for name, (run, stall) in cases.items():
        stalls: List["tuple[float, float, float]"] = []
        for _ in range(runs if stall else 0):
            meter = StallMeter.settled()
            run()
            stalls.append(meter.stop())
        worst = max(stalls) if stalls else None
        results[name] = {
            "ms": statistics.median(times[name]) * 1e3,
            "stall_ms": worst[0] * 1e3 if worst else None,
            "stall_cpu_ms": worst[1] * 1e3 if worst else None,
            "stall_queued_ms": worst[2] * 1e3 if worst else None,
        }
    return results


def _idle_case() -> Callable[[], None]:
    """No start at all: a 2 ms sleep, about as long as a fork server's start + join. Its
    stall is the floor of the stall column on this machine at this moment (the loop's own
    lateness: a virtual CPU not given back at once, other tenants), against which the other
    rows' stalls are read."""
    import gevent

    def run() -> None:
        gevent.sleep(0.002)

    return run


CASES = {
    "no start (2 ms sleep)": (_idle_case, True),
    "gipc fork": (lambda: _gipc_case("fork"), True),
    "gipc forkserver": (lambda: _gipc_case("forkserver"), True),
    "gipc spawn": (lambda: _gipc_case("spawn"), True),
    "mp forkserver": (lambda: _mp_case("forkserver"), False),
    "mp spawn": (lambda: _mp_case("spawn"), False),
    "gipc spawn + pipe": (lambda: _gipc_pipe_case("spawn"), True),
    "mp spawn + Pipe": (lambda: _mp_pipe_case("spawn"), False),
}


def _compile_gipc() -> None:
    """Bytecode for gipc's modules, as an installed wheel has it: with
    PYTHONDONTWRITEBYTECODE set (as in some development shells) and gipc run from its
    source tree, every spawned child would compile gipc from source (~10 ms)."""
    import compileall
    import os

    import gipc

    compileall.compile_dir(os.path.dirname(gipc.__file__), quiet=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,1,2,4", help="GiB of extra touched memory")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument("--pause", type=float, default=5.0,
                        help="ms of idle caller before each timed start (0: back to back)")
    parser.add_argument("--json")
    args = parser.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    _compile_gipc()
    sizes = [float(s) for s in args.sizes.split(",")]
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(CASES)
    cases = {name: (CASES[name][0](), CASES[name][1]) for name in names}
    results: Dict[str, Dict[str, Dict[str, Optional[float]]]] = {}
    for gib in sizes:
        ballast = _touched(gib)
        for name, result in measure(cases, args.runs, args.pause / 1e3).items():
            results.setdefault(name, {})[str(gib)] = result
        del ballast
    title = (
        "start + join: median ms (longest stall ms / the caller's CPU in it / its wait "
        "for a CPU in it)"
    )
    header = f"| {title} | " + " | ".join(f"{g:g} GiB" for g in sizes) + " |"
    print(header)
    print("|" + "---|" * (len(sizes) + 1))
    for name in names:
        cells = []
        for gib in sizes:
            r = results[name][str(gib)]
            cell = f"{r['ms']:.1f}"
            if r["stall_ms"] is not None:
                cell += (
                    f" ({r['stall_ms']:.1f} / {r['stall_cpu_ms']:.2f}"
                    f" / {r['stall_queued_ms']:.2f})"
                )
            cells.append(cell)
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"started": started, "sizes": sizes, "runs": args.runs,
                       "results": results}, out, indent=1)


if __name__ == "__main__":
    main()
