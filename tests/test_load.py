"""Load: a million messages through one pipe, many greenlets on both ends of one pipe, a
thousand children, and a soak test whose memory must stay flat.

The long ones are marked ``slow`` (CI runs them too). The whole file is meant to finish in
well under four minutes on two cores with the default soak duration.

Set ``GIPC_FIGURES=/path/file.jsonl`` to have each test append the figures it measured
(docs/reliability.md quotes them); ``GIPC_SOAK_SECONDS`` sets the soak's duration (60).
"""

from __future__ import annotations

import gc
import json
import os
import random
import time
import zlib

import gevent
import pytest

import gipc

from conftest import LINUX, child_pids, fork_server_traces, open_fds

pytestmark = pytest.mark.skipif(not LINUX, reason="measures memory and children in /proc")

MIB = 1 << 20
SOAK_SECONDS = float(os.environ.get("GIPC_SOAK_SECONDS", "60"))


def record(test: str, **figures) -> None:
    """Appends one line of figures to $GIPC_FIGURES, if set."""
    path = os.environ.get("GIPC_FIGURES")
    if path:
        figures["test"] = test
        figures["loop"] = type(gevent.get_hub().loop).__module__
        with open(path, "a") as f:
            f.write(json.dumps(figures) + "\n")


def rss_kib(pid: "int | str" = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --- a million small messages, then another million in batches ------------------------------------

#: Small payloads of 0..120 bytes; message `seq` carries BLOBS[seq % 16].
BLOBS = [bytes((seq * 31 + i) % 256 for i in range(seq * 8)) for seq in range(16)]
PLAIN = 1_000_000  # sent one by one with put(), read one by one with get()
TOTAL = 2_000_000  # ...and as many again with put_many(), read with get_many()


def checksum(seq: int, crc: int) -> int:
    return zlib.crc32(BLOBS[seq % 16], zlib.crc32(seq.to_bytes(4, "little"), crc))


def verify_sequence(reader, report) -> None:
    """Reads (seq, blob) messages until None; checks order and content; reports back."""
    expect, crc, problem = 0, 0, None

    def check(item) -> bool:
        nonlocal expect, crc, problem
        if item is None:
            return False
        seq, blob = item
        if problem is None and (seq != expect or blob != BLOBS[seq % 16]):
            problem = f"message {expect} expected, got {seq} ({len(blob)} bytes)"
        crc = checksum(seq, crc)
        expect += 1
        return True

    while expect < PLAIN and check(reader.get()):
        pass
    going = True
    while going:
        for item in reader.get_many(5000):
            if not check(item):
                going = False
                break
    report.put({"received": expect, "crc": crc, "problem": problem})


@pytest.mark.slow
def test_millions_of_small_messages_arrive_once_and_in_order():
    expected_crc = 0
    for seq in range(TOTAL):
        expected_crc = checksum(seq, expected_crc)
    rng = random.Random(5)
    with gipc.pipe() as (r, w), gipc.pipe() as (report_r, report_w):
        p = gipc.start_process(verify_sequence, args=(r, report_w))
        t0 = time.perf_counter()
        for seq in range(PLAIN):
            w.put((seq, BLOBS[seq % 16]))
        t_plain = time.perf_counter() - t0
        seq = PLAIN
        while seq < TOTAL:
            n = min(rng.randint(1, 4000), TOTAL - seq)
            w.put_many([(s, BLOBS[s % 16]) for s in range(seq, seq + n)])
            seq += n
        w.put(None)
        report = report_r.get()
        elapsed = time.perf_counter() - t0
        p.join()
    assert p.exitcode == 0
    assert report == {"received": TOTAL, "crc": expected_crc, "problem": None}
    record("million", messages=TOTAL, plain_put=PLAIN, put_many=TOTAL - PLAIN,
           seconds=round(elapsed, 2), plain_rate=round(PLAIN / t_plain),
           rate=round(TOTAL / elapsed))


# --- 64 writers and 8 readers on one pipe --------------------------------------------------------

WRITERS, READERS, PER_WRITER = 64, 8, 500


def payload_for(writer: int, seq: int) -> bytes:
    if seq % 40 == 7:  # now and then a large one, so puts block mid-frame and queue up
        size = 64 * 1024 + (writer * 7919 + seq * 104729) % MIB
    else:
        size = (writer * 31 + seq * 17) % 2000
    return bytes([(writer + seq) % 256]) * size


def write_concurrently(writer) -> int:
    """64 greenlets share one writer; every 10th turn a writer uses put_many."""

    def one(wid: int) -> None:
        seq = 0
        while seq < PER_WRITER:
            if seq % 10 == 3 and seq + 3 <= PER_WRITER:
                writer.put_many([(wid, s, payload_for(wid, s)) for s in range(seq, seq + 3)])
                seq += 3
            else:
                writer.put((wid, seq, payload_for(wid, seq)))
                seq += 1

    greenlets = [gevent.spawn(one, wid) for wid in range(WRITERS)]
    gevent.joinall(greenlets, raise_error=True)
    for _ in range(READERS):
        writer.put(None)
    return WRITERS * PER_WRITER


def read_concurrently(reader) -> dict:
    """8 greenlets share one reader; returns what arrived, checked."""
    arrivals = []
    corrupt = []

    def one() -> None:
        while True:
            item = reader.get()
            if item is None:
                return
            wid, seq, payload = item
            if payload != payload_for(wid, seq):
                corrupt.append((wid, seq))
            arrivals.append((wid, seq))  # no switch between get() and here: pipe order

    gevent.joinall([gevent.spawn(one) for _ in range(READERS)], raise_error=True)
    last = {}
    out_of_order = 0
    for wid, seq in arrivals:
        if seq <= last.get(wid, -1):
            out_of_order += 1
        last[wid] = seq
    expected = {(w, s) for w in range(WRITERS) for s in range(PER_WRITER)}
    got = set(arrivals)
    return {
        "received": len(arrivals),
        "duplicates": len(arrivals) - len(got),
        "missing": len(expected - got),
        "unexpected": len(got - expected),
        "corrupt": len(corrupt),
        "out_of_order": out_of_order,
    }


def child_reads(reader, report) -> None:
    report.put(read_concurrently(reader))


def child_writes(writer) -> None:
    write_concurrently(writer)


CLEAN = {"received": WRITERS * PER_WRITER, "duplicates": 0, "missing": 0, "unexpected": 0,
         "corrupt": 0, "out_of_order": 0}


@pytest.mark.parametrize("writers_in", ["parent", "child"])
def test_64_writer_and_8_reader_greenlets_share_one_pipe(writers_in):
    t0 = time.perf_counter()
    with gipc.pipe() as (r, w):
        if writers_in == "parent":
            with gipc.pipe() as (report_r, report_w):
                p = gipc.start_process(child_reads, args=(r, report_w))
                sent = write_concurrently(w)
                summary = report_r.get()
        else:
            p = gipc.start_process(child_writes, args=(w,))
            summary = read_concurrently(r)
            sent = WRITERS * PER_WRITER
        p.join()
    elapsed = time.perf_counter() - t0
    assert p.exitcode == 0
    assert sent == WRITERS * PER_WRITER
    assert summary == CLEAN
    record("64x8", writers_in=writers_in, messages=sent, seconds=round(elapsed, 2))


# --- a thousand children -------------------------------------------------------------------------


def exit_with(code: int) -> None:
    os._exit(code)


def reply(writer, value: int) -> None:
    writer.put(value * value)


def our_children() -> set:
    """This process's children but gipc's fork server, which an earlier test with that
    start method may have started: it lives as long as the test process."""
    return child_pids() - set(fork_server_traces())


def settled_rss() -> int:
    gc.collect()
    return rss_kib()


@pytest.mark.slow
def test_a_thousand_children_one_after_another():
    fds = open_fds()
    warm_up, total = 100, 1000
    t0 = time.perf_counter()
    for i in range(total):
        if i == warm_up:
            rss_warm = settled_rss()
        p = gipc.start_process(exit_with, args=(i % 7,))
        p.join()
        assert p.exitcode == i % 7
        p.close()
    elapsed = time.perf_counter() - t0
    rss_end = settled_rss()
    assert our_children() == set()
    assert open_fds() == fds
    grew = rss_end - rss_warm
    assert grew < 8 * 1024, f"RSS grew by {grew} KiB over {total - warm_up} children"
    record("1000-sequential", children=total, seconds=round(elapsed, 2),
           per_child_ms=round(elapsed / total * 1000, 2), rss_growth_kib=grew)


@pytest.mark.slow
def test_fifty_children_at_once_round_after_round():
    fds = open_fds()
    rounds, width = 10, 50
    rss = []
    t0 = time.perf_counter()
    for round_ in range(rounds):
        pipes = [gipc.pipe() for _ in range(width)]
        procs = [gipc.start_process(reply, args=(w, i)) for i, (r, w) in enumerate(pipes)]
        assert len(child_pids()) >= 1
        answers = [r.get() for r, _ in pipes]
        for p in procs:
            p.join()
        assert answers == [i * i for i in range(width)]
        assert [p.exitcode for p in procs] == [0] * width
        for r, _ in pipes:
            r.close()
        del pipes, procs
        assert our_children() == set()
        assert open_fds() == fds, f"round {round_} left descriptors open"
        rss.append(settled_rss())
    elapsed = time.perf_counter() - t0
    grew = rss[-1] - rss[1]
    assert grew < 8 * 1024, f"RSS after each round (KiB): {rss}"
    record("50-at-once", children=rounds * width, rounds=rounds, seconds=round(elapsed, 2),
           rss_growth_kib=grew)


# --- soak -----------------------------------------------------------------------------------------


def echo(handle) -> None:
    while True:
        item = handle.get()
        if item is None:
            return
        if isinstance(item, list) and item and item[0] == "batch":
            handle.put_many(item[1])
        else:
            handle.put(item)


@pytest.mark.slow
@pytest.mark.timeout(max(120, int(SOAK_SECONDS * 2 + 60)))
def test_soak_memory_stays_flat():
    """Sustained mixed traffic through a duplex pipe to an echo child for GIPC_SOAK_SECONDS;
    the RSS of both processes at the end is compared with the RSS after a warm-up."""
    warm_up = max(2.0, SOAK_SECONDS * 0.2)
    big = bytes(range(256)) * (4096 * 4)  # 4 MiB
    medium = {"key": list(range(2000)), "text": "x" * 50_000}
    moved = 0
    volume = 0
    rounds = 0
    with gipc.pipe(duplex=True) as (mine, theirs):
        p = gipc.start_process(echo, args=(theirs,))
        t0 = time.monotonic()
        deadline = t0 + SOAK_SECONDS
        rss_warm = None
        while time.monotonic() < deadline:
            if rss_warm is None and time.monotonic() - t0 >= warm_up:
                gc.collect()
                rss_warm = (rss_kib(), rss_kib(p.pid))
            phase = rounds % 4
            if phase == 0:  # many small messages, one at a time
                for i in range(2000):
                    mine.put(i)
                    assert mine.get() == i
                moved += 4000
                volume += 4000 * 8
            elif phase == 1:  # batches both ways
                batch = [("item", i) for i in range(5000)]
                mine.put(["batch", batch])
                assert mine.get_many(5000) == batch
                moved += 1 + 5000
                volume += 2 * 5000 * 20
            elif phase == 2:  # large bytes, copied once each way
                mine.put(big)
                assert mine.get() == big
                moved += 2
                volume += 2 * len(big)
            else:  # medium pickled objects
                for _ in range(20):
                    mine.put(medium)
                    assert mine.get() == medium
                moved += 40
                volume += 40 * 60_000
            rounds += 1
        gc.collect()
        rss_end = (rss_kib(), rss_kib(p.pid))
        mine.put(None)
        p.join()
    elapsed = time.monotonic() - t0
    assert p.exitcode == 0
    assert rss_warm is not None, "the soak ended before its warm-up"
    tolerance = 16 * 1024  # KiB
    growth = (rss_end[0] - rss_warm[0], rss_end[1] - rss_warm[1])
    record("soak", seconds=round(elapsed, 1), messages=moved, mib=round(volume / MIB),
           rss_parent_kib=[rss_warm[0], rss_end[0]], rss_child_kib=[rss_warm[1], rss_end[1]])
    assert growth[0] < tolerance and growth[1] < tolerance, (
        f"RSS grew by {growth} KiB (parent, child) between warm-up and end")
