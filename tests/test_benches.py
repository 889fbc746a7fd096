"""The benchmarks still run and print their tables, each in its smallest form. Figures are
not checked (timings belong to benchmarks, not to tests): what is checked is that a
benchmark the docs quote can be run again by a reader."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

import gevent
import pytest
from helpers import run_script


def run_bench(*args: str) -> str:
    result = run_script(*args, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_start_bench_prints_its_table() -> None:
    out = run_bench(
        "benches/start_bench.py", "--sizes", "0", "--runs", "1", "--pause", "0",
        "--only", "gipc fork,gipc forkserver,gipc spawn",
    )
    rows = [line for line in out.splitlines() if line.startswith("| gipc ")]
    assert len(rows) == 3, out
    for row in rows:
        # median (longest stall / the caller's CPU in it / its wait for a CPU in it)
        cell = row.split("|")[2]
        assert cell.count("/") == 2 and "(" in cell, row


def test_bench_runs_a_quick_case_of_each_kind() -> None:
    out = run_bench(
        "benches/bench.py", "--quick", "--runs", "1", "--settle", "0", "--impl", "ours",
        "--only", "small-pickled,pingpong,bulk-raw-64k,stall-recv-small,spawn",
    )
    for label in ("small 100 B bytes, pickled", "ping-pong 100 B pickled", "bulk 64 KiB raw",
                  "stall: parent recvs", "spawn+join no-op child"):
        lines = [line for line in out.splitlines() if line.startswith(label)]
        assert lines and not any(word in lines[0] for word in ("error", "timeout")), out


def test_pool_bench_compares_start_methods() -> None:
    out = run_bench("benches/pool_bench.py", "--start-methods", "--runs", "1")
    for label in ("10,000 tiny tasks", "200 x 1 MiB"):
        [line] = [line for line in out.splitlines() if line.startswith(label)]
        assert line.count("(") == 3, line  # a ratio and its range for the two methods


def _stallmeter() -> Any:
    path = Path(__file__).resolve().parent.parent / "benches" / "stallmeter.py"
    spec = importlib.util.spec_from_file_location("stallmeter", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timerfd is Linux's")
def test_the_stall_meter_sees_the_loop_blocked_and_leaves_nothing_open() -> None:
    """The meter behind every stall figure: a loop blocked for 30 ms is a stall of at least
    30 ms less one interval (only a slower machine can make it longer), counted even when
    the meter is stopped before the loop has run again (as after a pool's blocking map),
    and the meter's timer descriptor is closed when it stops."""
    stallmeter = _stallmeter()
    before = sorted(os.listdir("/proc/self/fd"))
    meter = stallmeter.StallMeter()
    assert meter.kind == "timerfd"
    gevent.sleep(0.005)
    meter.reset()
    gevent.sleep(0.005)
    assert meter.services > 0  # served through the loop while it runs
    time.sleep(0.03)  # not gevent's: the loop cannot run meanwhile
    stall, cpu, queued = meter.stop()
    assert stall >= 0.03 - meter.interval, stall
    assert cpu >= 0 and queued >= 0
    assert meter.stop() == (stall, cpu, queued)  # once: a second stop closes nothing more
    assert sorted(os.listdir("/proc/self/fd")) == before
