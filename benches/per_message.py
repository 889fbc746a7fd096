#!/usr/bin/env python
"""Where the time of one small message goes: micro-timings for docs/performance.md.

Usage:
    python benches/per_message.py same        # one process: put K, then get K, repeated
    python benches/per_message.py two [dict]  # parent puts, a child gets: CPU per side

``same`` times each layer on a same-process pipe (the handle, the bare ``_core`` calls, a
plain ``os.write``/``os.read`` of the same frame, pickle alone), in ns per message; the
"best" column is the fastest round, the least disturbed by other tenants. ``two`` streams
messages to a child, as ``bench.py``'s small rows do, and prints each side's CPU time per
message and its context switches (voluntary: went to sleep; involuntary: preempted).
"""

import os
import pickle
import resource
import sys
import time

import gipc

DATA = b"\x5a" * 100
DICT = {"id": 1, "name": "x" * 20, "ok": True}


def timed(name, put, get, msg, k=500, rounds=400):
    """``k`` messages of 108 bytes fit in a default 64 KiB pipe: put never waits."""
    for _ in range(3):
        for _ in range(k):
            put(msg)
        for _ in range(k):
            get()
    tp = tg = 0.0
    best_p = best_g = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(k):
            put(msg)
        t1 = time.perf_counter()
        for _ in range(k):
            get()
        t2 = time.perf_counter()
        best_p, best_g = min(best_p, (t1 - t0) / k), min(best_g, (t2 - t1) / k)
        tp, tg = tp + t1 - t0, tg + t2 - t1
    n = k * rounds
    print(f"{name:28s} put {tp / n * 1e9:6.0f} ns (best {best_p * 1e9:4.0f})   "
          f"get {tg / n * 1e9:6.0f} ns (best {best_g * 1e9:4.0f})")


def same():
    r, w = gipc.pipe()
    timed("handle put/get, bytes", w.put, r.get, DATA)
    timed("handle put/get, dict", w.put, r.get, DICT)
    timed("_core try_send/try_recv", lambda m: w._core.try_send(1, m), r._core.try_recv, DATA)
    rr, rw = gipc.pipe(encoder=None, decoder=None)
    timed("handle put/get, raw", rw.put, rr.get, DATA)
    a, b = os.pipe()
    timed("os.write/os.read, 108 B", lambda m: os.write(b, m), lambda: os.read(a, 108),
          b"\0" * 8 + DATA)
    for fd in (a, b):
        os.close(fd)
    for handle in (r, w, rr, rw):
        handle.close()
    pickled = pickle.dumps(DICT, pickle.HIGHEST_PROTOCOL)
    n = 200_000
    t0 = time.perf_counter()
    for _ in range(n):
        pickle.dumps(DICT, pickle.HIGHEST_PROTOCOL)
    t1 = time.perf_counter()
    for _ in range(n):
        pickle.loads(pickled)
    t2 = time.perf_counter()
    print(f"pickle of the dict: dumps {(t1 - t0) / n * 1e9:.0f} ns, "
          f"loads {(t2 - t1) / n * 1e9:.0f} ns")


def _cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_nvcsw, r.ru_nivcsw


def _reader(r, ctl, n):
    ctl.put("ready")
    c0 = _cpu()
    for _ in range(n):
        r.get()
    ctl.put([b - a for a, b in zip(c0, _cpu())])


def two(kind, n=400_000):
    r, w = gipc.pipe()
    cr, cw = gipc.pipe()
    p = gipc.start_process(_reader, (r, cw, n))
    assert cr.get() == "ready"
    put = w.put
    c0 = _cpu()
    t0 = time.perf_counter()
    if kind == "dict":
        for i in range(n):
            put({"id": i, "name": "x" * 20, "ok": True})
    else:
        for _ in range(n):
            put(DATA)
    wc = [b - a for a, b in zip(c0, _cpu())]
    rc = cr.get()
    t1 = time.perf_counter()
    p.join()
    for handle in (w, cr):
        handle.close()
    print(f"{kind}: {n / (t1 - t0) / 1e3:.0f}k msg/s | writer CPU user {wc[0] / n * 1e9:.0f} + "
          f"sys {wc[1] / n * 1e9:.0f} ns/msg, switches {wc[2]}/{wc[3]} | reader CPU user "
          f"{rc[0] / n * 1e9:.0f} + sys {rc[1] / n * 1e9:.0f} ns/msg, switches {rc[2]}/{rc[3]}")


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "same"
    if mode == "same":
        same()
    else:
        two(sys.argv[2] if len(sys.argv) > 2 else "bytes")
