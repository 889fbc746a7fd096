#!/usr/bin/env python
"""Side-by-side benchmark: our gipc vs upstream gipc 1.8.0 vs hand-rolled
gevent IPC (multiprocessing.Pipe, os.pipe) vs a C ceiling.

    python benches/bench.py [--upstream-python PATH] [--runs 5] [--quick]
                            [--json out.json] [--plot docs/throughput.png]
                            [--only small,pingpong,...] [--impl ours,upstream,...]

Every (implementation, case, run) is one subprocess with a hard timeout:
Python implementations run benches/workloads.py, the C ceiling runs
benches/ceiling.c compiled here with `cc -O2`.  See benches/README.md.
"""

import argparse
import datetime
import json
import os
import pickle
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOADS_PY = os.path.join(HERE, "workloads.py")
CEILING_C = os.path.join(HERE, "ceiling.c")

KiB = 1024
MiB = 1024 * 1024

# name -> (column title, kind)
IMPLS = [
    ("ours", "ours", "py"),
    ("upstream", "upstream", "py"),
    ("mp", "mp.Pipe", "py"),
    ("ospipe", "os.pipe", "py"),
    ("c_pipe", "C pipe", "c"),
    ("c_pipe1m", "C pipe1M", "c"),
    ("c_unix", "C unix", "c"),
]
IMPL_TITLES = {k: t for k, t, _ in IMPLS}
C_IMPLS = [k for k, _, kind in IMPLS if kind == "c"]
C_TRANSPORT = {"c_pipe": "pipe", "c_pipe1m": "pipe1m", "c_unix": "unix"}
PY_IMPL_ARG = {"ours": "gipc", "upstream": "gipc", "mp": "mp",
               "ospipe": "ospipe"}

GROUPS = ["small", "batch", "pingpong", "bulk", "spawn", "stall", "sweep"]

# 64 MiB messages a stream row sends, untimed, before its clock starts.
BIG_WARMUP = 2

# Default pause before each measurement of a "cold" case (the first 64 MiB
# message into a fresh child, the 64 MiB stalls). A process that starts right
# after another one freed a lot of memory gets memory that the machine still
# holds; after a pause, on a VM with free page reporting, it gets blocks the
# host has taken back, which cost several times more to fault in. Without the
# pause the figure depends on which row ran just before (docs/performance.md).
SETTLE_S = 4.0

# metric -> (unit, higher_is_better, formatter)
METRICS = {
    "msgs_per_s": ("k msg/s", True, lambda v: "%.1fk" % (v / 1e3)),
    "mb_per_s": ("MB/s", True, lambda v: "%.0f" % v),
    "rtt_median_us": ("us", False, lambda v: "%.1f" % v),
    "rtt_p99_us": ("us", False, lambda v: "%.1f" % v),
    "spawn_ms": ("ms", False, lambda v: "%.2f" % v),
    "spawn_child_faults": ("faults", False, lambda v: "%.0f" % v),
    "stall_ms": ("ms", False, lambda v: "%.1f" % v),
    "rss_send_x": ("x payload", False, lambda v: "%.2fx" % v),
    "rss_recv_x": ("x payload", False, lambda v: "%.2fx" % v),
}


def size_name(n):
    if n >= MiB and n % MiB == 0:
        return "%d MiB" % (n // MiB)
    if n >= KiB and n % KiB == 0:
        return "%d KiB" % (n // KiB)
    return "%d B" % n


def size_key(n):
    return size_name(n).replace(" ", "").replace("iB", "").lower()


_PICKLE_OVERHEAD_CACHE = {}


def pickled_len(obj_or_size):
    """Length of the pickled message (what a pickling transport moves);
    the C ceiling moves exactly that many bytes per message."""
    if isinstance(obj_or_size, int):
        size = obj_or_size
        if size > MiB:
            return size + pickled_len(MiB) - MiB
        if size not in _PICKLE_OVERHEAD_CACHE:
            _PICKLE_OVERHEAD_CACHE[size] = len(
                pickle.dumps(b"\x5a" * size, pickle.HIGHEST_PROTOCOL))
        return _PICKLE_OVERHEAD_CACHE[size]
    return len(pickle.dumps(obj_or_size, pickle.HIGHEST_PROTOCOL))


class Case(object):
    def __init__(self, key, group, label, workload, params, metrics,
                 c=None, sweep=None, c_impls=None, upstream_ref=None,
                 settle=False):
        self.key, self.group, self.label = key, group, label
        self.workload, self.params, self.metrics = workload, params, metrics
        self.c = c            # argv tail for the ceiling binary, or None
        self.sweep = sweep    # (encoding, size) if part of the size sweep
        self.c_impls = c_impls if c_impls is not None else C_IMPLS
        # Case whose upstream numbers the ours/upstream ratio uses (batch:
        # upstream has no put_many, so compare with its plain put()).
        self.upstream_ref = upstream_ref
        # Pause --settle seconds before each measurement: the machine's free
        # memory is then in the same state for every implementation (see
        # SETTLE_S).
        self.settle = settle

    def to_json(self):
        return dict(group=self.group, label=self.label,
                    workload=self.workload, params=self.params,
                    metrics=self.metrics, ceiling_args=self.c,
                    sweep=self.sweep, settle=self.settle)


def build_cases(quick):
    q = quick
    cases = []
    n_small = 20000 if q else 200000
    small_bytes = pickled_len(b"\x5a" * 100)
    small_dict = pickled_len({"id": 123456, "name": "x" * 20, "ok": True})
    cases.append(Case(
        "small-pickled", "small", "small 100 B bytes, pickled", "small",
        dict(count=n_small, size=100), ["msgs_per_s"],
        c=["stream", small_bytes, n_small]))
    cases.append(Case(
        "small-dict", "small", "small dict, pickled", "small",
        dict(count=n_small, payload="dict"), ["msgs_per_s"],
        c=["stream", small_dict, n_small]))
    cases.append(Case(
        "small-raw", "small", "small 100 B raw", "small",
        dict(count=n_small, size=100, raw=True), ["msgs_per_s"],
        c=["stream", 100, n_small]))
    cases.append(Case(
        "small-batch", "batch", "small 100 B pickled, put_many x1000",
        "batch", dict(count=n_small, size=100, batch=1000), ["msgs_per_s"],
        c=["stream", small_bytes, n_small], upstream_ref="small-pickled"))

    n_pp, warm_pp = (2000, 200) if q else (20000, 1000)
    cases.append(Case(
        "pingpong", "pingpong", "ping-pong 100 B pickled, duplex",
        "pingpong", dict(count=n_pp, warmup=warm_pp, size=100),
        ["rtt_median_us", "rtt_p99_us"],
        c=["pingpong", small_bytes, n_pp, warm_pp]))

    bulk_total = 32 * MiB if q else 384 * MiB
    for size in (64 * KiB, MiB):
        count = max(1, bulk_total // size)
        for enc in ("pickled", "raw"):
            csize = pickled_len(size) if enc == "pickled" else size
            cases.append(Case(
                "bulk-%s-%s" % (enc, size_key(size)), "bulk",
                "bulk %s %s" % (size_name(size), enc), "bulk",
                dict(count=count, size=size, raw=(enc == "raw")),
                ["mb_per_s"], c=["stream", csize, count],
                sweep=(enc, size)))
    # 64 MiB: a stream in progress (the receiver has had BIG_WARMUP messages
    # already) and the first message into a fresh child, measured apart: the
    # first costs page faults on fresh memory that a stream no longer pays,
    # and how much depends on the machine's state (docs/performance.md).
    big = 64 * MiB
    n_stream = 4 if q else 8
    for enc in ("pickled", "raw"):
        csize = pickled_len(big) if enc == "pickled" else big
        cases.append(Case(
            "bulk-%s-64m" % enc, "bulk",
            "bulk 64 MiB %s, stream (%d after %d)" % (enc, n_stream,
                                                      BIG_WARMUP),
            "bulk", dict(count=n_stream, warmup=BIG_WARMUP, size=big,
                         raw=(enc == "raw")),
            ["mb_per_s", "rss_send_x", "rss_recv_x"],
            c=["stream", csize, n_stream, BIG_WARMUP], sweep=(enc, big)))
    cases.append(Case(
        "bulk-pickled-64m-cold", "bulk",
        "bulk 64 MiB pickled, cold: 1st msg into a fresh child",
        "bulk", dict(count=1, size=big, raw=False), ["mb_per_s"],
        c=["stream", pickled_len(big), 1], settle=True))

    n_sp = 30 if q else 200
    cases.append(Case(
        "spawn", "spawn", "spawn+join no-op child", "spawn",
        dict(count=n_sp, warmup=5), ["spawn_ms", "spawn_child_faults"],
        c=["spawn", n_sp, 5], c_impls=["c_pipe"]))

    n_big = 1 if q else 8
    n_st_small = 10000 if q else 100000
    cases.append(Case(
        "stall-send-64m", "stall", "stall: parent sends %dx64 MiB" % n_big,
        "stall", dict(mode="send", size=64 * MiB, count=n_big),
        ["stall_ms"], c_impls=[], settle=True))
    cases.append(Case(
        "stall-recv-64m", "stall", "stall: parent recvs %dx64 MiB" % n_big,
        "stall", dict(mode="recv", size=64 * MiB, count=n_big),
        ["stall_ms"], c_impls=[], settle=True))
    cases.append(Case(
        "stall-recv-small", "stall",
        "stall: parent recvs %dk x 100 B" % (n_st_small // 1000),
        "stall", dict(mode="recv", size=100, count=n_st_small),
        ["stall_ms"], c_impls=[]))

    sweep_total = 16 * MiB if q else 256 * MiB
    sweep_cap = 10000 if q else 100000
    for size in (KiB, 16 * KiB, 256 * KiB, 4 * MiB):
        count = max(4, min(sweep_cap, sweep_total // size))
        for enc in ("pickled", "raw"):
            csize = pickled_len(size) if enc == "pickled" else size
            cases.append(Case(
                "sweep-%s-%s" % (enc, size_key(size)), "sweep",
                "sweep %s %s" % (size_name(size), enc), "bulk",
                dict(count=count, size=size, raw=(enc == "raw")),
                ["mb_per_s"], c=["stream", csize, count],
                sweep=(enc, size)))
    return cases


# --------------------------------------------------------------------------
# Running subprocesses
# --------------------------------------------------------------------------

def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def run_cmd(cmd, timeout, env=None):
    """Run one measurement in its own session/process group.  Returns a dict
    with ok/status.  On timeout the whole group is killed."""
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True, env=env)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = p.communicate()
        return dict(ok=False, status="timeout", wall_s=time.time() - t0,
                    stderr=err.decode(errors="replace")[-2000:])
    leftover = False
    if _group_alive(p.pid):
        time.sleep(0.3)
        if _group_alive(p.pid):
            leftover = True
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    res = None
    for line in reversed(out.decode(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                res = json.loads(line)
                break
            except ValueError:
                pass
    if res is None:
        res = dict(ok=False, error="no JSON result (exit code %s)"
                   % p.returncode)
    res["wall_s"] = time.time() - t0
    if p.returncode != 0 and res.get("ok"):
        res.update(ok=False, error="exit code %s" % p.returncode)
    if not res.get("ok"):
        res.setdefault("status", "error")
        res["stderr"] = err.decode(errors="replace")[-2000:]
    elif res.get("na"):
        res["status"] = "n/a"
    else:
        res["status"] = "ok"
    if leftover:
        res["leftover_processes_killed"] = True
    return res


def py_env(impl):
    env = dict(os.environ)
    if impl == "upstream":
        # Never let a PYTHONPATH that points at our package leak into the
        # upstream interpreter.
        env.pop("PYTHONPATH", None)
    return env


def compile_ceiling(tmpdir):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None, "no C compiler (cc) found"
    exe = os.path.join(tmpdir, "ceiling")
    r = subprocess.run([cc, "-O2", "-o", exe, CEILING_C],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        return None, "cc failed: " + r.stdout.decode(errors="replace")
    try:
        ver = subprocess.run([cc, "--version"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL).stdout.decode()
        ver = ver.splitlines()[0] if ver else cc
    except OSError:
        ver = cc
    return exe, ver


# --------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------

def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def machine_info():
    info = {}
    try:
        info["uname"] = subprocess.run(
            ["uname", "-a"], stdout=subprocess.PIPE).stdout.decode().strip()
    except OSError:
        info["uname"] = " ".join(platform.uname())
    cpu = None
    txt = _read("/proc/cpuinfo") or ""
    for line in txt.splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    info["cpu_model"] = cpu or platform.processor()
    info["cpu_count"] = os.cpu_count()
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    info["pipe_max_size"] = _read("/proc/sys/fs/pipe-max-size")
    info["transparent_hugepage"] = _read(
        "/sys/kernel/mm/transparent_hugepage/enabled")
    info["driver_python"] = sys.version.split()[0]
    info["driver_executable"] = sys.executable
    info["GEVENT_LOOP"] = os.environ.get("GEVENT_LOOP")
    return info


# --------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------

def median_or_none(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def summarize(cell_runs, metrics):
    """cell_runs: list of per-run result dicts for one (case, impl)."""
    statuses = [r.get("status") for r in cell_runs]
    oks = [r for r in cell_runs if r.get("status") == "ok"]
    out = dict(runs=[r.get("metrics") if r.get("status") == "ok"
                     else {"status": r.get("status")} for r in cell_runs])
    if not cell_runs:
        out["status"] = "skipped"
    elif oks:
        out["status"] = "ok" if len(oks) == len(cell_runs) else \
            "partial %d/%d" % (len(oks), len(cell_runs))
    elif all(s == "n/a" for s in statuses):
        out["status"] = "n/a"
    elif "timeout" in statuses:
        out["status"] = "timeout"
    else:
        out["status"] = statuses[0] or "error"
    errs = [r.get("error") for r in cell_runs if r.get("error")]
    if errs:
        out["errors"] = errs[:2]
    med = {}
    for m in metrics:
        med[m] = median_or_none([r["metrics"].get(m) for r in oks])
    out["median"] = med
    return out


def best_ceiling_run(case, run_results, run_idx, metric):
    """Best C mode value within one run (max for throughput, min for
    times), and which mode it was."""
    higher = METRICS[metric][1]
    best = None
    for impl in case.c_impls:
        runs = run_results.get(impl) or []
        if run_idx >= len(runs) or runs[run_idx].get("status") != "ok":
            continue
        v = runs[run_idx]["metrics"].get(metric)
        if v is None:
            continue
        if best is None or (v > best[0] if higher else v < best[0]):
            best = (v, impl)
    return best


def compute_ratios(case, raw, nruns, upstream_raw=None):
    """Ratios computed inside each run, then the median across runs."""
    ratios = {}
    ours = raw.get("ours") or []
    for m in case.metrics:
        entry = {}

        def ok_metrics(runs, i):
            if i < len(runs) and runs[i].get("status") == "ok":
                return runs[i]["metrics"]
            return None

        up = (upstream_raw if upstream_raw is not None else raw).get(
            "upstream") or []
        vals = []
        for i in range(nruns):
            a, b = ok_metrics(ours, i), ok_metrics(up, i)
            if a and b and a.get(m) is not None and b.get(m):
                vals.append(a[m] / b[m])
        if vals:
            entry["ours/upstream"] = dict(runs=vals,
                                          median=statistics.median(vals))
            if upstream_raw is not None:
                entry["ours/upstream"]["upstream_case"] = case.upstream_ref
        if not m.startswith("rss_"):
            vals, used = [], []
            for i in range(nruns):
                a = ok_metrics(ours, i)
                best = best_ceiling_run(case, raw, i, m)
                if a and a.get(m) is not None and best and best[0]:
                    vals.append(a[m] / best[0])
                    used.append(best[1])
            if vals:
                entry["ours/ceiling"] = dict(
                    runs=vals, median=statistics.median(vals),
                    ceiling_impl_per_run=used)
        if entry:
            ratios[m] = entry
    return ratios


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------

def cell_text(summary, metric):
    if summary is None:
        return "-"
    v = summary["median"].get(metric)
    st = summary["status"]
    if v is None:
        return {"n/a": "n/a", "skipped": "-", "ok": "-"}.get(st, st.split()[0])
    txt = METRICS[metric][2](v)
    if st.startswith("partial"):
        txt += "*"
    return txt


def print_table(cases, results, ratios, impls, out=sys.stdout):
    cols = [IMPL_TITLES[i] for i in impls] + ["ours/upst", "ours/ceil"]
    lw = 44
    w = 10
    head = "%-*s" % (lw, "workload (metric)") + "".join(
        "%*s" % (w, c) for c in cols)
    print(head, file=out)
    print("-" * len(head), file=out)
    group = None
    for case in cases:
        if case.group != group:
            if group is not None:
                print("", file=out)
            group = case.group
        for m in case.metrics:
            unit, higher, _ = METRICS[m]
            tag = {"rtt_median_us": "median", "rtt_p99_us": "p99",
                   "spawn_child_faults": "child page faults",
                   "rss_send_x": "sender peak RSS",
                   "rss_recv_x": "receiver peak RSS"}.get(m, "")
            label = "%s%s (%s)" % (case.label, ", " + tag if tag else "",
                                   unit)
            if len(label) > lw - 1:
                label = label[:lw - 2] + "~"
            row = "%-*s" % (lw, label)
            for impl in impls:
                s = results[case.key].get(impl)
                if impl in C_IMPLS and impl not in case.c_impls:
                    row += "%*s" % (w, "-")
                elif impl in C_IMPLS and m.startswith("rss_"):
                    row += "%*s" % (w, "-")
                else:
                    row += "%*s" % (w, cell_text(s, m))
            r = ratios[case.key].get(m, {})
            for k in ("ours/upstream", "ours/ceiling"):
                row += "%*s" % (w, ("%.2f" % r[k]["median"]) if k in r
                                else "-")
            print(row, file=out)


NOTES = [
    "Cells are medians over runs; '*' = some runs failed; 'timeout'/'error' "
    "= every run failed that way; 'n/a' = not applicable (e.g. no "
    "put_many/get_many).",
    "Ratios are computed inside each run (same run, same machine state), "
    "then the median across runs is shown.  ours/ceil compares with the "
    "best of the C modes in that run.  For msg/s and MB/s higher is "
    "better (ratio > 1 = ours faster); for us/ms/RSS lower is better "
    "(ratio < 1 = ours better).",
    "MB/s = 10^6 payload bytes per second, measured in the parent from the "
    "first put to the child's 'done' on a separate control pipe (child "
    "start-up excluded).",
    "Peak RSS (64 MiB rows) = (peak RSS during the transfer - RSS just "
    "before it) / payload size, peak reset via /proc/self/clear_refs.  "
    "Sender: the payload object is created BEFORE the baseline, so 0.00x "
    "means no copy beyond the payload itself (in-band pickling: 1x).  "
    "Receiver: the received object itself counts, so 1.00x is the minimum.",
    "The put_many row's ours/upst compares with upstream's plain put() of "
    "the same messages (small 100 B pickled row), upstream having no batch "
    "API.",
    "Child page faults (spawn) = minor page faults of each child, read from "
    "getrusage(RUSAGE_CHILDREN) around each spawn+join (median): after a fork "
    "every page a process writes to is copied first, at a few microseconds "
    "each on small VMs.",
    "Stall = the longest time an I/O event waited for the parent's event "
    "loop during the transfer (benches/stallmeter.py: a timerfd firing every "
    "0.25 ms, watched by the loop like a socket; ~0.05 ms is ideal).",
    "mp.Pipe = multiprocessing.Pipe() (socketpair), gevent wait_read/"
    "wait_write then blocking send/recv; its spawn = fork-context "
    "multiprocessing.Process + wait on sentinel.  os.pipe = os.pipe() + "
    "gevent.os.nb_read/nb_write + 8-byte length prefix; its spawn = "
    "gevent.os.fork_gevent + wait_read on a pipe the child holds + "
    "os.waitpid.  Their transfer children are started "
    "with gipc.start_process of the 'ours' interpreter.",
    "C columns: benches/ceiling.c (cc -O2), fork, parent write()s, child "
    "read()s, 8-byte header per message; pipe1M = F_SETPIPE_SZ 1 MiB, "
    "unix = AF_UNIX SOCK_STREAM socketpair.  C spawn = fork/_exit/waitpid.  "
    "It bounds one write/read per message; batching (put_many) or other "
    "mechanisms can exceed it.",
]


def make_plot(path, cases, results, impls):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed for %s; skipping plot."
              % sys.executable, file=sys.stderr)
        return False
    encs = ["pickled", "raw"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    styles = {"ours": ("tab:red", "o", "-"),
              "upstream": ("tab:blue", "s", "-"),
              "mp": ("tab:green", "^", "-"),
              "ospipe": ("tab:orange", "v", "-"),
              "c_pipe": ("black", "x", "--"),
              "c_pipe1m": ("dimgray", "+", "--"),
              "c_unix": ("silver", "d", "--")}
    any_data = False
    for ax, enc in zip(axes, encs):
        for impl in impls:
            pts = []
            for case in cases:
                if not case.sweep or case.sweep[0] != enc:
                    continue
                s = results[case.key].get(impl)
                if s and s["median"].get("mb_per_s"):
                    pts.append((case.sweep[1], s["median"]["mb_per_s"]))
            if not pts:
                continue
            any_data = True
            pts.sort()
            color, marker, ls = styles.get(impl, (None, "o", "-"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls,
                    marker=marker, color=color, label=IMPL_TITLES[impl])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title("parent -> child throughput, %s payload" % enc)
        ax.set_xlabel("message size (bytes)")
        ax.grid(True, which="both", alpha=0.3)
        ticks = [KiB, 16 * KiB, 64 * KiB, 256 * KiB, MiB, 4 * MiB, 64 * MiB]
        ax.set_xticks(ticks)
        ax.set_xticklabels([size_name(t) for t in ticks], rotation=30)
    axes[0].set_ylabel("MB/s (median)")
    axes[0].legend(loc="best", fontsize="small")
    fig.tight_layout()
    if not any_data:
        print("--plot: no sweep data; skipping plot.", file=sys.stderr)
        plt.close(fig)
        return False
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--upstream-python", metavar="PATH",
                    help="interpreter with gipc==1.8.0 + gevent installed "
                         "(e.g. /tmp/upstream-venv/bin/python); without it "
                         "the upstream column is skipped")
    ap.add_argument("--ours-python", metavar="PATH", default=sys.executable,
                    help="interpreter that imports our gipc; also runs the "
                         "mp.Pipe/os.pipe baselines (default: this one, %s)"
                         % sys.executable)
    ap.add_argument("--runs", type=int, default=None,
                    help="runs per measurement (default 5)")
    ap.add_argument("--quick", action="store_true",
                    help="smaller message counts (whole run ~8 min, 5 of them "
                         "--settle pauses)")
    ap.add_argument("--json", metavar="PATH", help="write results as JSON")
    ap.add_argument("--plot", metavar="PATH",
                    help="throughput vs message size PNG (needs matplotlib)")
    ap.add_argument("--only", metavar="LIST",
                    help="comma-separated workload groups (%s) or case keys"
                         " / key prefixes" % ",".join(GROUPS))
    ap.add_argument("--impl", metavar="LIST",
                    help="comma-separated implementations: %s (or 'c' for "
                         "all C modes, 'py' for all Python ones)"
                         % ",".join(k for k, _, _ in IMPLS))
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="hard timeout per subprocess measurement, s "
                         "(default 120)")
    ap.add_argument("--settle", type=float, default=SETTLE_S,
                    help="pause before each measurement of a cold case, s "
                         "(default %.1f; 0: none)" % SETTLE_S)
    ap.add_argument("--list", action="store_true",
                    help="list the cases and exit")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="print every measurement")
    return ap.parse_args(argv)


def select_impls(spec):
    if not spec:
        return [k for k, _, _ in IMPLS]
    want = set()
    for tok in spec.split(","):
        tok = tok.strip()
        if tok == "c":
            want.update(C_IMPLS)
        elif tok == "py":
            want.update(PY_IMPL_ARG)
        elif tok in IMPL_TITLES:
            want.add(tok)
        elif tok:
            raise SystemExit("unknown implementation %r (choose from %s)"
                             % (tok, ", ".join(IMPL_TITLES)))
    return [k for k, _, _ in IMPLS if k in want]


def select_cases(cases, spec):
    if not spec:
        return cases
    toks = [t.strip() for t in spec.split(",") if t.strip()]
    for t in toks:
        if t not in GROUPS and not any(c.key.startswith(t) for c in cases):
            raise SystemExit("unknown workload %r (groups: %s; --list shows "
                             "case keys)" % (t, ", ".join(GROUPS)))
    return [c for c in cases
            if any(c.group == t or c.key.startswith(t) for t in toks)]


def fmt_result(case, impl, res):
    if res.get("status") != "ok":
        msg = res.get("status", "?")
        if res.get("error"):
            msg += ": " + res["error"].strip().splitlines()[-1][:100]
        return msg
    m = res["metrics"]
    return "  ".join("%s=%s" % (k, METRICS[k][2](m[k]))
                     for k in case.metrics if m.get(k) is not None)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    runs = args.runs if args.runs is not None else 5
    if runs < 1:
        raise SystemExit("--runs must be >= 1")
    cases = select_cases(build_cases(args.quick), args.only)
    impls = select_impls(args.impl)
    if args.list:
        for c in cases:
            print("%-22s %-8s %s  %s" % (c.key, c.group, c.label,
                                         json.dumps(c.params)))
        return 0

    started = time.time()
    loadavg_at_start = _read("/proc/loadavg")
    log = sys.stderr
    notes = []
    tmpdir = tempfile.mkdtemp(prefix="gipc-bench-")
    try:
        # ---- implementations ------------------------------------------------
        pythons = {}
        impl_info = {}
        for impl in list(impls):
            if impl in PY_IMPL_ARG:
                py = args.upstream_python if impl == "upstream" \
                    else args.ours_python
                if impl == "upstream" and not py:
                    notes.append("upstream column skipped: no "
                                 "--upstream-python given")
                    impls.remove(impl)
                    continue
                pythons[impl] = py
        probes = {}
        for impl, py in pythons.items():
            if py in probes:
                continue
            probes[py] = run_cmd([py, WORKLOADS_PY, "--probe"], 60,
                                 env=py_env(impl))
        for impl, py in pythons.items():
            pr = probes[py]
            impl_info[impl] = dict(kind="python", python=py,
                                   probe=pr.get("info") if pr.get("ok")
                                   else pr)
            if not pr.get("ok"):
                print("WARNING: probe of %s failed: %s" % (
                    py, (pr.get("error") or pr.get("stderr") or "")[-400:]),
                    file=log)
        ceiling_exe = None
        if any(i in C_IMPLS for i in impls):
            ceiling_exe, cc_info = compile_ceiling(tmpdir)
            for impl in C_IMPLS:
                if impl in impls:
                    impl_info[impl] = dict(kind="c", compiler=cc_info,
                                           transport=C_TRANSPORT[impl],
                                           flags="-O2")
            if ceiling_exe is None:
                notes.append("C ceiling unavailable: " + cc_info)
                print("WARNING: " + cc_info, file=log)

        def gipc_info(impl):
            pr = impl_info.get(impl, {}).get("probe") or {}
            return pr.get("gipc") if isinstance(pr, dict) else None

        ours_g = gipc_info("ours")
        up_g = gipc_info("upstream")
        if "ours" in impls:
            if not ours_g:
                notes.append("ours: gipc is not importable by %s"
                             % args.ours_python)
            elif (ours_g.get("version") or
                  ours_g.get("dist_version")) == "1.8.0":
                notes.append("ours resolves to gipc %s at %s, which looks "
                             "like UPSTREAM 1.8.0 (stand-in?)" % (
                                 ours_g.get("version"), ours_g.get("path")))
        if "upstream" in impls and up_g and \
                up_g.get("dist_version") not in (None, "1.8.0"):
            notes.append("upstream interpreter has gipc %s, not 1.8.0"
                         % up_g.get("dist_version"))
        for impl in ("ours", "upstream"):
            pr = impl_info.get(impl, {}).get("probe") or {}
            loop = pr.get("loop") if isinstance(pr, dict) else None
            if loop and "libev" not in loop:
                notes.append("%s runs on gevent loop %s (not libev)"
                             % (impl, loop))
        try:
            load1 = float((loadavg_at_start or "0").split()[0])
        except ValueError:
            load1 = 0.0
        if load1 > 0.5:
            notes.append("1-min load average was %.2f at start: other work "
                         "is running, numbers will be noisy" % load1)
        for n in notes:
            print("NOTE: " + n, file=log)

        batch_ok = {"ours": bool(ours_g and ours_g.get("batch_api")),
                    "upstream": bool(up_g and up_g.get("batch_api"))}

        # ---- measurements ---------------------------------------------------
        raw = {c.key: {i: [] for i in impls} for c in cases}
        timed_out = set()
        for run in range(runs):
            for case in cases:
                for impl in impls:
                    cell = raw[case.key][impl]
                    if impl in C_IMPLS:
                        if impl not in case.c_impls or not case.c:
                            continue
                        if ceiling_exe is None:
                            cell.append(dict(status="error", ok=False,
                                             error="no C compiler"))
                            continue
                        cmd = [ceiling_exe, case.c[0]]
                        if case.c[0] != "spawn":
                            cmd.append(C_TRANSPORT[impl])
                        cmd += [str(a) for a in case.c[1:]]
                        env = None
                    else:
                        if case.workload == "batch" and (
                                impl in ("mp", "ospipe") or
                                (impl in batch_ok and not batch_ok[impl])):
                            cell.append(dict(status="n/a", ok=True,
                                             metrics={}))
                            continue
                        cmd = [pythons[impl], WORKLOADS_PY,
                               PY_IMPL_ARG[impl], case.workload, "--params",
                               json.dumps(case.params)]
                        env = py_env(impl)
                    if (case.key, impl) in timed_out:
                        cell.append(dict(status="timeout", ok=False,
                                         skipped=True))
                        continue
                    if case.settle and args.settle > 0:
                        time.sleep(args.settle)
                    res = run_cmd(cmd, args.timeout, env=env)
                    if res.get("status") == "timeout":
                        timed_out.add((case.key, impl))
                    if res.get("leftover_processes_killed"):
                        notes.append("leftover processes killed after %s/%s "
                                     "run %d" % (case.key, impl, run + 1))
                    res["run"] = run
                    cell.append(res)
                    if args.verbose or res.get("status") not in ("ok", "n/a"):
                        print("[run %d/%d] %-20s %-9s %s" % (
                            run + 1, runs, case.key, impl,
                            fmt_result(case, impl, res)), file=log)
            print("[run %d/%d done, %.0f s elapsed]"
                  % (run + 1, runs, time.time() - started), file=log)

        # ---- aggregate ------------------------------------------------------
        results, ratios = {}, {}
        for case in cases:
            results[case.key] = {}
            for impl in impls:
                cell = raw[case.key][impl]
                if impl in C_IMPLS and (impl not in case.c_impls
                                        or not case.c):
                    continue
                results[case.key][impl] = summarize(cell, case.metrics)
            ref = raw.get(case.upstream_ref) if case.upstream_ref else None
            ratios[case.key] = compute_ratios(case, raw[case.key], runs, ref)

        elapsed = time.time() - started
        print("", file=sys.stdout)
        print("gipc side-by-side benchmark  (%d run%s%s, %.0f s)" % (
            runs, "" if runs == 1 else "s", ", --quick" if args.quick else "",
            elapsed))
        for impl in impls:
            inf = impl_info.get(impl, {})
            if inf.get("kind") == "python":
                pr = inf.get("probe") or {}
                g = pr.get("gipc") or {}
                print("  %-9s python %s, gevent %s, loop %s%s" % (
                    IMPL_TITLES[impl], pr.get("python"), pr.get("gevent"),
                    pr.get("loop"),
                    (", gipc %s (%s)" % (g.get("version"), g.get("path")))
                    if impl in ("ours", "upstream") else ""))
        m = machine_info()
        m["loadavg_at_start"] = loadavg_at_start
        m["loadavg_at_end"] = _read("/proc/loadavg")
        print("  machine: %s, %s cores; %s" % (m["cpu_model"], m["cpu_count"],
                                               m["uname"]))
        print("")
        print_table(cases, results, ratios, impls)
        print("")
        for n in NOTES:
            print("- " + n)
        for n in notes:
            print("! " + n)

        doc = dict(
            schema=1,
            started=datetime.datetime.fromtimestamp(started).isoformat(),
            elapsed_s=elapsed,
            command=" ".join(shlex.quote(a) for a in
                             [sys.executable] + sys.argv),
            argv=sys.argv,
            machine=m,
            config=dict(runs=runs, quick=args.quick, timeout_s=args.timeout,
                        settle_s=args.settle,
                        only=args.only, impl=args.impl),
            implementations=impl_info,
            notes=NOTES + notes,
            cases={},
            sweep={},
        )
        for case in cases:
            d = case.to_json()
            d["results"] = {}
            for impl in impls:
                if impl not in results[case.key]:
                    continue
                s = dict(results[case.key][impl])
                s["raw"] = [
                    {k: v for k, v in r.items()
                     if k in ("status", "metrics", "error", "wall_s", "info",
                              "stderr", "leftover_processes_killed")}
                    for r in raw[case.key][impl]]
                d["results"][impl] = s
            d["ratios"] = ratios[case.key]
            doc["cases"][case.key] = d
            if case.sweep:
                enc, size = case.sweep
                for impl, s in results[case.key].items():
                    v = s["median"].get("mb_per_s")
                    if v is not None:
                        doc["sweep"].setdefault(enc, {}).setdefault(
                            impl, []).append([size, v])
        for enc in doc["sweep"].values():
            for pts in enc.values():
                pts.sort()
        if args.json:
            d = os.path.dirname(os.path.abspath(args.json))
            os.makedirs(d, exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1, sort_keys=False)
            print("\nJSON written to %s" % args.json)
        if args.plot:
            if make_plot(args.plot, cases, results, impls):
                print("plot written to %s" % args.plot)
        return 0
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
