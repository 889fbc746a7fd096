#!/usr/bin/env python
"""One benchmark measurement, run in a fresh process.

Usage:
    python benches/workloads.py IMPL WORKLOAD [--params JSON]
    python benches/workloads.py --probe

IMPL is one of:
    gipc    -- whatever ``gipc`` the running interpreter imports (ours, or
               upstream 1.8.0 when run by the upstream virtualenv's python)
    mp      -- multiprocessing.Pipe() + gevent.socket.wait_read/wait_write
    ospipe  -- os.pipe() + gevent.os.nb_read/nb_write + 8-byte length prefix

WORKLOAD is one of: small, batch, pingpong, bulk, spawn, stall (see
WORKLOADS at the bottom).  Parameters come as a JSON object.

Prints exactly one JSON line on stdout: {"ok": true, "metrics": {...},
"info": {...}} or {"ok": false, "error": "..."}.  bench.py drives this.

Every child is started with gipc.start_process (when gipc is importable; a
fork + sentinel-pipe stand-in otherwise, recorded as info.starter) and is
joined before this process exits.
"""

import fcntl
import json
import os
import pickle
import platform
import resource
import struct
import sys
import time
import traceback

import gevent
import gevent.os
import gevent.socket

from stallmeter import StallMeter

try:
    import gipc
except ImportError:  # mp/ospipe still work; gipc impl will fail loudly.
    gipc = None

PICKLE_PROTO = pickle.HIGHEST_PROTOCOL
HDR = struct.Struct("!Q")
perf = time.perf_counter


# --------------------------------------------------------------------------
# Small helpers: peak RSS, control channel, process starter
# --------------------------------------------------------------------------

def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def rss_baseline():
    """Reset the peak-RSS counter (Linux clear_refs 5) and return
    (baseline_kib, method).  Falls back to the current high-water mark."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS"), "clear_refs"
    except OSError:
        return _status_kib("VmHWM"), "hwm-no-reset"


def rss_peak_kib():
    return _status_kib("VmHWM")


def set_nonblocking(fd, on=True):
    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
    fl = (fl | os.O_NONBLOCK) if on else (fl & ~os.O_NONBLOCK)
    fcntl.fcntl(fd, fcntl.F_SETFL, fl)


class Control(object):
    """Parent side of the neutral child->parent control pipe (JSON lines).
    Identical for every implementation so it does not bias anything."""

    def __init__(self, fd):
        self.fd = fd
        set_nonblocking(fd)
        self.buf = b""

    def recv(self):
        while b"\n" not in self.buf:
            chunk = gevent.os.nb_read(self.fd, 65536)
            if not chunk:
                raise RuntimeError("child closed control pipe (crashed?)")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        msg = json.loads(line.decode())
        if "error" in msg:
            raise RuntimeError("child failed:\n" + msg["error"])
        return msg

    def close(self):
        os.close(self.fd)


def ctl_send(fd, **msg):
    data = (json.dumps(msg) + "\n").encode()
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _reap(pid):
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:  # reaped by someone else (libev SIGCHLD)
        return None
    return os.waitstatus_to_exitcode(status)


class _ForkProcess(object):
    """Used only when gipc cannot be imported (baselines still runnable).

    Cooperative wait without child watchers: the child holds the write end
    of a pipe, which reads EOF once the child has exited.  (gevent.fork()
    plus gevent.os.waitpid() was tried first; it hung once in ~200
    spawns under gevent 26.9/libev.)"""

    def __init__(self, target, args=()):
        r, w = os.pipe()
        self.pid = gevent.os.fork_gevent()
        if self.pid == 0:
            code = 0
            try:
                os.close(r)
                target(*args)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        self._sentinel = r
        self.exitcode = None

    def join(self, timeout=None):
        if self._sentinel is not None:
            gevent.socket.wait_read(self._sentinel)
            os.close(self._sentinel)
            self._sentinel = None
            self.exitcode = _reap(self.pid)


def start_child(target, args):
    if gipc is not None:
        return gipc.start_process(target, args=args)
    return _ForkProcess(target, args)


# --------------------------------------------------------------------------
# Implementations.  Each provides:
#   channel(kind, raw) -> (parent_end, child_end, close_in_child, close_in_parent)
#   wrap(end, raw)     -> object with put(obj), get(), close()
# kind: "p2c" (parent writes), "c2p" (child writes), "duplex".
# --------------------------------------------------------------------------

class GipcImpl(object):
    name = "gipc"

    def channel(self, kind, raw):
        enc = dict(encoder=None, decoder=None) if raw else {}
        if kind == "duplex":
            a, b = gipc.pipe(duplex=True, **enc)
            return a, b, [], []
        r, w = gipc.pipe(**enc)
        if kind == "p2c":
            return w, r, [], []
        return r, w, [], []

    def wrap(self, end, raw):
        return end



class MpEnd(object):
    """The gevent tutorial pattern: wait for readiness, then do the
    (blocking) Connection call."""

    def __init__(self, conn, raw):
        self.conn = conn
        self.fd = conn.fileno()
        if raw:
            self._send, self._recv = conn.send_bytes, conn.recv_bytes
        else:
            self._send, self._recv = conn.send, conn.recv

    def put(self, obj):
        gevent.socket.wait_write(self.fd)
        self._send(obj)

    def get(self):
        gevent.socket.wait_read(self.fd)
        return self._recv()

    def close(self):
        self.conn.close()


class MpImpl(object):
    name = "mp"

    def channel(self, kind, raw):
        import multiprocessing
        a, b = multiprocessing.Pipe()  # duplex: an AF_UNIX socketpair
        return a, b, [a], [b]

    def wrap(self, end, raw):
        return MpEnd(end, raw)



class OsEnd(object):
    """os.pipe() with gevent.os.nb_read/nb_write and a '!Q' length prefix.

    Writer: small frames go out as one write (header + payload), large
    ones as header write + payload writes from a memoryview (no copy).
    Reader: buffered for small frames; large frames are assembled into a
    preallocated bytearray.
    """

    SMALL = 65536
    READ_CHUNK = 262144

    def __init__(self, rfd, wfd, raw):
        self.rfd, self.wfd, self.raw = rfd, wfd, raw
        for fd in (rfd, wfd):
            if fd is not None:
                set_nonblocking(fd)
        self.buf = bytearray()

    def _write_all(self, data):
        view = memoryview(data)
        while view:
            n = gevent.os.nb_write(self.wfd, view)
            view = view[n:]

    def put(self, obj):
        data = obj if self.raw else pickle.dumps(obj, PICKLE_PROTO)
        n = len(data)
        if n <= self.SMALL:
            self._write_all(HDR.pack(n) + data)
        else:
            self._write_all(HDR.pack(n))
            self._write_all(data)

    def _fill(self):
        chunk = gevent.os.nb_read(self.rfd, self.SMALL)
        if not chunk:
            raise EOFError("os.pipe closed")
        self.buf += chunk

    def get(self):
        buf = self.buf
        while len(buf) < 8:
            self._fill()
        n, = HDR.unpack_from(buf)
        if n <= self.SMALL:
            while len(buf) < 8 + n:
                self._fill()
            data = bytes(buf[8:8 + n])
            del buf[:8 + n]
        else:
            data = bytearray(n)
            have = min(len(buf) - 8, n)
            data[:have] = buf[8:8 + have]
            del buf[:8 + have]
            pos = have
            while pos < n:
                chunk = gevent.os.nb_read(self.rfd,
                                          min(n - pos, self.READ_CHUNK))
                if not chunk:
                    raise EOFError("os.pipe closed mid-message")
                k = len(chunk)
                data[pos:pos + k] = chunk
                pos += k
                del chunk
        return data if self.raw else pickle.loads(data)

    def close(self):
        for fd in (self.rfd, self.wfd):
            if fd is not None:
                os.close(fd)
        self.rfd = self.wfd = None


class OsPipeImpl(object):
    name = "ospipe"

    def channel(self, kind, raw):
        if kind == "p2c":
            r, w = os.pipe()
            return (None, w), (r, None), [w], [r]
        if kind == "c2p":
            r, w = os.pipe()
            return (r, None), (None, w), [r], [w]
        r1, w1 = os.pipe()  # parent -> child
        r2, w2 = os.pipe()  # child -> parent
        return (r2, w1), (r1, w2), [r2, w1], [r1, w2]

    def wrap(self, end, raw):
        return OsEnd(end[0], end[1], raw)



IMPLS = {"gipc": GipcImpl, "mp": MpImpl, "ospipe": OsPipeImpl}


def _close_any(objs):
    for o in objs:
        try:
            if isinstance(o, int):
                os.close(o)
            else:
                o.close()
        except Exception:
            pass


# --------------------------------------------------------------------------
# Generic parent/child runner
# --------------------------------------------------------------------------

def _child_main(impl_name, role, child_end, close_here, ctl_r, ctl_w,
                params):
    """Entry point of every benchmark child (module-level: picklable)."""
    try:
        os.close(ctl_r)
        _close_any(close_here)
        impl = IMPLS[impl_name]()
        end = impl.wrap(child_end, params.get("raw", False))
        stats = CHILD_ROLES[role](end, params, lambda **m: ctl_send(ctl_w, **m))
        end.close()
        ctl_send(ctl_w, done=True, **(stats or {}))
    except BaseException:
        try:
            ctl_send(ctl_w, error=traceback.format_exc())
        finally:
            os._exit(1)
    finally:
        try:
            os.close(ctl_w)
        except OSError:
            pass


class Session(object):
    """Start one child running CHILD_ROLES[role] over a fresh channel."""

    def __init__(self, impl, role, kind, params):
        self.impl = impl
        raw = params.get("raw", False)
        pend, cend, close_in_child, close_in_parent = impl.channel(kind, raw)
        ctl_r, ctl_w = os.pipe()
        self.proc = start_child(
            _child_main,
            (impl.name, role, cend, close_in_child, ctl_r, ctl_w, params))
        os.close(ctl_w)
        _close_any(close_in_parent)
        self.ctl = Control(ctl_r)
        self.end = impl.wrap(pend, raw)
        self.raw_end = pend

    def finish(self, timeout=60):
        try:
            self.end.close()
        except Exception:
            pass
        self.ctl.close()
        self.proc.join(timeout)
        code = self.proc.exitcode
        if code != 0:
            raise RuntimeError("child exit code %r" % (code,))


def payload_bytes(size):
    return b"\x5a" * size


# ---- child roles ----------------------------------------------------------

def role_recv(end, p, ctl):
    count = p["count"]
    base, method = rss_baseline()
    ctl(ready=True)
    total = 0
    if p.get("batch"):
        got = 0
        bs = p["batch"]
        while got < count:
            msgs = end.get_many(bs)
            got += len(msgs)
            for m in msgs:
                total += len(m)
            del msgs
        n = got
    else:
        kind = p.get("payload", "bytes")
        warm = p.get("warmup", 0)
        for i in range(warm + count):
            if warm and i == warm:
                ctl(warm=True)  # the parent starts its clock now
            m = end.get()
            total += len(m) if kind != "dict" else 1
            del m
        n = warm + count
    peak = rss_peak_kib()
    return dict(received=n, bytes=total, rss_base_kib=base,
                rss_peak_kib=peak, rss_method=method)


def role_send(end, p, ctl):
    count = p["count"]
    data = payload_bytes(p["size"])
    ctl(ready=True)
    for _ in range(count):
        end.put(data)
    return dict(sent=count)


def role_echo(end, p, ctl):
    ctl(ready=True)
    for _ in range(p["count"]):
        end.put(end.get())
    return {}


CHILD_ROLES = {"recv": role_recv, "send": role_send, "echo": role_echo}


# ---- parent-side workloads -------------------------------------------------

def w_small(impl, p):
    """Parent -> child, `count` small messages; msgs/s."""
    kind = p.get("payload", "bytes")
    count = p["count"]
    s = Session(impl, "recv", "p2c", p)
    put = s.end.put
    s.ctl.recv()  # ready
    t0 = perf()
    if kind == "dict":
        for i in range(count):
            put({"id": i, "name": "x" * 20, "ok": True})
    else:
        data = payload_bytes(p["size"])
        for _ in range(count):
            put(data)
    st = s.ctl.recv()
    dt = perf() - t0
    s.finish()
    _check(st["received"] == count, "received %r of %r" %
           (st["received"], count))
    return dict(msgs_per_s=count / dt, seconds=dt)


def w_batch(impl, p):
    """Like small/bytes but with put_many/get_many (n/a without them)."""
    if impl.name != "gipc":
        return None
    r, w = gipc.pipe()
    has = hasattr(w, "put_many") and hasattr(r, "get_many")
    r.close()
    w.close()
    if not has:
        return None
    count, bs = p["count"], p["batch"]
    s = Session(impl, "recv", "p2c", p)
    s.ctl.recv()
    batch = [payload_bytes(p["size"])] * bs
    t0 = perf()
    sent = 0
    while sent < count:
        k = min(bs, count - sent)
        s.end.put_many(batch if k == bs else batch[:k])
        sent += k
    st = s.ctl.recv()
    dt = perf() - t0
    s.finish()
    _check(st["received"] == count, "received %r" % st["received"])
    return dict(msgs_per_s=count / dt, seconds=dt)


def w_pingpong(impl, p):
    warm, count = p["warmup"], p["count"]
    q = dict(p, count=warm + count)
    s = Session(impl, "echo", "duplex", q)
    end = s.end
    data = payload_bytes(p["size"])
    s.ctl.recv()
    for _ in range(warm):
        end.put(data)
        end.get()
    samples = []
    add = samples.append
    pc = time.perf_counter_ns
    for _ in range(count):
        t0 = pc()
        end.put(data)
        end.get()
        add(pc() - t0)
    s.ctl.recv()
    s.finish()
    samples.sort()
    n = len(samples)
    return dict(rtt_median_us=samples[n // 2] / 1000.0,
                rtt_p99_us=samples[min(n - 1, int(n * 0.99))] / 1000.0,
                rtt_min_us=samples[0] / 1000.0)


def w_bulk(impl, p):
    """Parent -> child, `count` payloads of `size` bytes; MB/s + peak RSS.

    With `warmup`, that many payloads go first, untimed: the clock starts once
    the child has them (a stream in progress, not a fresh receiver)."""
    size, count, warm = p["size"], p["count"], p.get("warmup", 0)
    s = Session(impl, "recv", "p2c", p)
    data = payload_bytes(size)  # after fork, BEFORE the sender's baseline
    s.ctl.recv()
    base, method = rss_baseline()
    if warm:
        for _ in range(warm):
            s.end.put(data)
        s.ctl.recv()  # the child has the warm-up payloads
    t0 = perf()
    for _ in range(count):
        s.end.put(data)
    st = s.ctl.recv()
    dt = perf() - t0
    peak = rss_peak_kib()
    s.finish()
    _check(st["bytes"] == size * (warm + count),
           "received %r bytes, expected %r" % (st["bytes"],
                                               size * (warm + count)))
    return dict(
        mb_per_s=size * count / dt / 1e6, seconds=dt,
        rss_send_x=(peak - base) * 1024.0 / size,
        rss_recv_x=(st["rss_peak_kib"] - st["rss_base_kib"]) * 1024.0 / size,
        rss_method=method + "/" + st["rss_method"])


def _noop():
    pass


def w_spawn(impl, p):
    count, warm = p["count"], p.get("warmup", 3)
    times = []
    if impl.name == "gipc":
        def one():
            pr = gipc.start_process(_noop)
            pr.join()
            _check(pr.exitcode == 0, "exitcode %r" % pr.exitcode)
    elif impl.name == "mp":
        import multiprocessing
        ctx = multiprocessing.get_context("fork")

        def one():
            pr = ctx.Process(target=_noop)
            pr.start()
            gevent.socket.wait_read(pr.sentinel)
            # Reap explicitly: importing upstream gipc replaces
            # multiprocessing's Popen.poll with a no-op, so Process.join()
            # would neither reap the child nor set exitcode.  The child has
            # already exited (sentinel is readable), so this does not block
            # for long.
            _, status = os.waitpid(pr.pid, 0)
            _check(os.waitstatus_to_exitcode(status) == 0, "bad exit")
    else:
        def one():
            pr = _ForkProcess(_noop)
            pr.join()
            _check(pr.exitcode in (0, None), "exitcode %r" % pr.exitcode)
    # Page faults the children took (their minor faults, counted once they are reaped):
    # after a fork every page a process writes to is copied first, and on small VMs each
    # copy costs microseconds, so this count explains much of the time.
    faults = []
    for i in range(warm + count):
        f0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
        t0 = perf()
        one()
        dt = perf() - t0
        if i >= warm:
            times.append(dt)
            faults.append(
                resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - f0)
    times.sort()
    faults.sort()
    return dict(spawn_ms=times[len(times) // 2] * 1e3,
                spawn_min_ms=times[0] * 1e3,
                spawn_child_faults=faults[len(faults) // 2])


def w_stall(impl, p):
    """The parent's longest event-loop stall (benches/stallmeter.py: how long an I/O event
    waited for its loop) while it sends big messages (mode=send), receives big ones
    (recv_big) or receives many small ones (recv_small)."""
    mode, size, count = p["mode"], p["size"], p["count"]
    if mode == "send":
        s = Session(impl, "recv", "p2c", p)
        data = payload_bytes(size)
    else:
        s = Session(impl, "send", "c2p", p)
    s.ctl.recv()
    meter = StallMeter.settled()
    t0 = perf()
    total = 0
    if mode == "send":
        for _ in range(count):
            s.end.put(data)
    else:
        for _ in range(count):
            m = s.end.get()
            total += len(m)
            del m
    st = s.ctl.recv()
    dt = perf() - t0
    stall, cpu, queued = meter.stop()
    s.finish()
    if mode == "send":
        total = st["bytes"]
    _check(total == size * count, "moved %r bytes, expected %r" %
           (total, size * count))
    return dict(stall_ms=stall * 1e3, stall_cpu_ms=cpu * 1e3,
                stall_queued_ms=queued * 1e3, meter=meter.kind,
                services=meter.services, seconds=dt)


WORKLOADS = {
    "small": w_small,
    "batch": w_batch,
    "pingpong": w_pingpong,
    "bulk": w_bulk,
    "spawn": w_spawn,
    "stall": w_stall,
}


def _check(cond, msg):
    if not cond:
        raise AssertionError(msg)


# --------------------------------------------------------------------------

def loop_name():
    loop = gevent.get_hub().loop
    return "%s.%s" % (type(loop).__module__, type(loop).__name__)


def probe():
    info = dict(
        python=sys.version.split()[0],
        executable=sys.executable,
        implementation=platform.python_implementation(),
        gevent=gevent.__version__,
        loop=loop_name(),
        GEVENT_LOOP=os.environ.get("GEVENT_LOOP"),
        gipc=None,
    )
    if gipc is not None:
        r, w = gipc.pipe()
        info["gipc"] = dict(
            version=getattr(gipc, "__version__", None),
            path=getattr(gipc, "__file__", None),
            batch_api=hasattr(w, "put_many") and hasattr(r, "get_many"))
        r.close()
        w.close()
        try:
            from importlib import metadata
            info["gipc"]["dist_version"] = metadata.version("gipc")
        except Exception:
            pass
    return info


def main(argv):
    if argv[1:2] == ["--probe"]:
        print(json.dumps(dict(ok=True, info=probe())))
        return 0
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    impl_name, wl = argv[1], argv[2]
    params = {}
    if len(argv) > 4 and argv[3] == "--params":
        params = json.loads(argv[4])
    out = dict(impl=impl_name, workload=wl, params=params)
    try:
        if impl_name == "gipc" and gipc is None:
            raise RuntimeError("gipc is not importable by %s" %
                               sys.executable)
        impl = IMPLS[impl_name]()
        # Start the hub's loop once before anything forks (gevent's child
        # watchers can miss a SIGCHLD that arrives before the loop ever ran).
        gevent.sleep(0)
        metrics = WORKLOADS[wl](impl, params)
        out.update(ok=True, metrics=metrics,
                   info=dict(loop=loop_name(),
                             starter="gipc.start_process" if gipc
                             else "fork+sentinel"))
        if metrics is None:
            out.update(ok=True, na=True, metrics={})
    except BaseException:
        out.update(ok=False, error=traceback.format_exc())
    sys.stdout.flush()
    print(json.dumps(out))
    sys.stdout.flush()
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
