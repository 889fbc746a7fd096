"""Faults: processes killed mid-transfer, torn and corrupt frames, oversized announcements,
bad payloads, untrusted input, the parent interrupted by a signal, forking while other OS
threads run, and a peer process that ends while a greenlet waits on it.

Every scenario must end with a clear error, promptly (never a hang), and without leaking a
descriptor or a child (the autouse fixture in conftest.py checks the last two).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import linecache
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc

import gevent
import gevent.os
import gevent.socket
import pytest

import gipc
from gipc import GIPCError
from gipc import _handles

from conftest import child_pids, fork_server_traces, open_fds
from helpers import ROOT, raw_header, run_python

KIND_ENCODED, KIND_BYTES, KIND_BATCH = 0, 1, 2
MIB = 1 << 20

#: Seconds within which a fault must surface as an error. Generous for a loaded CI machine;
#: the measured delays are a few milliseconds (docs/reliability.md).
PROMPT = 5.0


def raw_frame(payload: bytes, kind: int = KIND_ENCODED) -> bytes:
    return raw_header(len(payload), kind) + payload


def write_raw(writer, data: bytes) -> None:
    """Writes bytes to a writer's descriptor behind gipc's back (a peer that is not gipc)."""
    fd = writer._core.fileno()
    view = memoryview(data)
    while view:
        # The descriptor is non-blocking and may be smaller than `data`: wait for room.
        view = view[gevent.os.nb_write(fd, view):]


@pytest.fixture(params=["hybrid", "socket", "pipe"])
def transport(request, monkeypatch):
    """Runs a test over every transport."""
    monkeypatch.setattr(_handles, "TRANSPORT", request.param)
    return request.param


def record(test: str, **figures) -> None:
    """Appends one line of figures to $GIPC_FIGURES, if set (see test_load.py)."""
    path = os.environ.get("GIPC_FIGURES")
    if path:
        figures.update(test=test, loop=type(gevent.get_hub().loop).__module__)
        with open(path, "a") as f:
            f.write(json.dumps(figures) + "\n")


def wait_until(predicate, timeout: float = PROMPT, interval: float = 0.001) -> None:
    with gevent.Timeout(timeout, AssertionError("condition not reached in time")):
        while not predicate():
            gevent.sleep(interval)


def outcome(fn, *args):
    """Runs ``fn(*args)`` and returns ``(exception or None, when it ended)``: a greenlet
    that fails is printed by gevent, and the repr of a 64 MiB argument takes a second."""
    try:
        fn(*args)
    except Exception as exc:
        return exc, time.monotonic()
    return None, time.monotonic()


# --- a child killed with SIGKILL in the middle of a 64 MiB message ----------------------------


def receive_then_freeze(reader, status) -> None:
    """Receives by hand, one bounded step at a time, until part of the message has arrived;
    then says so and stops itself, so the parent kills it while the message is provably half
    received. Each step is one time slice (a few reads of at most a socket buffer), so 64 MiB
    cannot complete in one step, however the machine schedules us; a polling greenlet beside
    a background get() could be starved on a loaded machine until the whole message was in."""
    while True:
        gevent.socket.wait_read(reader._core.wait_fileno())
        frame = reader._core.try_recv()
        if frame.__class__ is tuple:
            status.put("complete")
            return
        if reader._core.buffered > 0:
            break
    status.put(("receiving", reader._core.buffered))
    os.kill(os.getpid(), signal.SIGSTOP)


def send_then_freeze(writer, status) -> None:
    """Starts sending 64 MiB to a parent that does not read yet; once the frame is partly
    written (the put is blocked), says so and stops itself."""
    payload = b"\x01" * (64 * MIB)
    putter = gevent.spawn(writer.put, payload)
    while not writer._core.mid_frame:
        gevent.sleep(0.001)
        if putter.ready():
            status.put("complete")
            return
    status.put("sending")
    os.kill(os.getpid(), signal.SIGSTOP)


class TestKilledMidMessage:
    def test_receiver_killed_while_receiving_64_mib(self, transport):
        with gipc.pipe() as (r, w), gipc.pipe() as (status_r, status_w):
            p = gipc.start_process(receive_then_freeze, args=(r, status_w))
            putter = gevent.spawn(outcome, w.put, b"\x02" * (64 * MIB))
            state = status_r.get(timeout=30)
            assert state[0] == "receiving" and 0 < state[1] < 64 * MIB, state
            wait_until(lambda: w._core.mid_frame)
            t0 = time.monotonic()
            os.kill(p.pid, signal.SIGKILL)
            error, when = putter.get(timeout=PROMPT)
            assert isinstance(error, BrokenPipeError), error
            delay = when - t0
            assert delay < PROMPT
            record("killed-receiver", transport=transport, received_before_kill=state[1],
                   ms_to_error=round(delay * 1000, 2))
            p.join()
            assert p.exitcode == -signal.SIGKILL
            with pytest.raises(BrokenPipeError):
                w.put("anyone?")

    def test_sender_killed_while_sending_64_mib(self, transport):
        with gipc.pipe() as (r, w), gipc.pipe() as (status_r, status_w):
            p = gipc.start_process(send_then_freeze, args=(w, status_w))
            assert status_r.get(timeout=30) == "sending"
            getter = gevent.spawn(outcome, r.get)
            wait_until(lambda: r._core.buffered > 0)
            assert not getter.ready()
            t0 = time.monotonic()
            os.kill(p.pid, signal.SIGKILL)
            error, when = getter.get(timeout=PROMPT)
            assert isinstance(error, GIPCError), error
            assert f"of {64 * MIB} payload bytes" in str(error) and "torn" in str(error)
            delay = when - t0
            assert delay < PROMPT
            record("killed-sender", transport=transport, ms_to_error=round(delay * 1000, 2))
            p.join()
            assert p.exitcode == -signal.SIGKILL
            with pytest.raises(GIPCError, match="torn"):
                r.get(timeout=PROMPT)


# --- torn, corrupt and oversized frames --------------------------------------------------------


def write_then_die(writer, data: bytes) -> None:
    """A writer process that dies halfway through a frame."""
    writer.put("intact")
    write_raw(writer, data)
    os._exit(0)


TORN = {
    "in-header": (raw_header(100)[:5], "after 5 of the 8 header bytes"),
    "small-payload": (raw_header(100) + b"x" * 10, "after 10 of 100 payload bytes"),
    "large-payload": (raw_header(MIB) + b"x" * 100_000, f"after 100000 of {MIB} payload"),
    "after-header": (raw_header(MIB), f"after 0 of {MIB} payload bytes"),
}


class TestBadFrames:
    @pytest.mark.parametrize("case", sorted(TORN))
    def test_writer_process_dies_mid_frame(self, case, transport):
        data, message = TORN[case]
        with gipc.pipe() as (r, w):
            p = gipc.start_process(write_then_die, args=(w, data))
            assert r.get(timeout=PROMPT) == "intact"
            with pytest.raises(GIPCError, match=f"message torn.*{message}"):
                r.get(timeout=PROMPT)
            # The stream stays broken, and says so again rather than hanging.
            with pytest.raises(GIPCError, match="torn"):
                r.get(timeout=PROMPT)
            p.join()

    @pytest.mark.parametrize(
        "header, what",
        [
            (b"\xff" * 8, "corrupt frame header"),
            ((0x1234 << 48 | 5).to_bytes(8, "little"), "corrupt frame header"),
            (raw_header(5, kind=7), "unknown payload kind 7"),
            (raw_header(5, kind=255), "unknown payload kind 255"),
        ],
        ids=["all-ones", "wrong-magic", "kind-7", "kind-255"],
    )
    def test_corrupt_header_is_refused_for_good(self, header, what):
        with gipc.pipe() as (r, w):
            w.put("before")
            write_raw(w, header + b"hello" + raw_frame(pickle.dumps("after")))
            assert r.get() == "before"
            for _ in range(3):
                with pytest.raises(GIPCError, match=what):
                    r.get(timeout=PROMPT)

    @pytest.mark.parametrize(
        "max_size, announced",
        [(MIB, 512 * MIB), (0, 1), (100, 101), (4 << 30, (1 << 40) - 1)],
        ids=["512MiB-over-1MiB", "1-over-0", "101-over-100", "1TiB-over-default"],
    )
    def test_oversized_announcement_allocates_nothing(self, max_size, announced):
        with gipc.pipe(max_message_size=max_size) as (r, w):
            write_raw(w, raw_header(announced))
            tracemalloc.start()
            try:
                with pytest.raises(GIPCError, match="exceeds this reader's max_message_size"):
                    r.get(timeout=PROMPT)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak < 256 * 1024, f"{peak} bytes allocated for a refused message"
            with pytest.raises(GIPCError, match="max_message_size"):
                r.get(timeout=PROMPT)

    def test_allocation_measurement_sees_an_accepted_announcement(self):
        # The control for the test above: an announcement the reader accepts is allocated in
        # full before the payload arrives, and tracemalloc sees that allocation.
        with gipc.pipe(max_message_size=64 * MIB) as (r, w):
            write_raw(w, raw_header(48 * MIB))
            w.close()
            tracemalloc.start()
            try:
                with pytest.raises(GIPCError, match="torn"):
                    r.get(timeout=PROMPT)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak >= 48 * MIB

    def test_peak_rss_of_a_reader_refusing_a_terabyte(self):
        # The same, measured as the kernel sees it, in a fresh process (the figure is in
        # docs/reliability.md): the reader's peak RSS does not move.
        result = run_python(
            """
            import json, os, resource, gipc
            def peak_kib():
                return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            with gipc.pipe() as (r, w):
                w.put(b"warm-up")
                r.get()
                before = peak_kib()
                os.write(w._core.fileno(), ((0x6770 << 48) | (1 << 40) - 1).to_bytes(8, "little"))
                try:
                    r.get()
                except gipc.GIPCError as exc:
                    error = str(exc)
                print(json.dumps({"grew_kib": peak_kib() - before, "error": error}))
            """
        )
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert "max_message_size" in report["error"]
        assert report["grew_kib"] < 4096, report


# --- payloads the decoder cannot decode --------------------------------------------------------


class Rejected(Exception):
    pass


# The codec of a pipe whose writer goes to a child: at module level, so that it pickles
# (start methods spawn and forkserver).
def json_encode(obj) -> bytes:
    return json.dumps(obj).encode()


def json_decode_rejecting_bad(data: bytes):
    if data.startswith(b"bad"):
        raise Rejected(data)
    return json.loads(data)


def send_bad_then_good(writer, bad_frames) -> None:
    for frame in bad_frames:
        write_raw(writer, frame)
    writer.put({"still": "usable"})


class TestBadPayloads:
    @pytest.mark.parametrize(
        "frame, error",
        [
            (raw_frame(b"not a pickle"), pickle.UnpicklingError),
            (raw_frame(b"\x80\x05K"), pickle.UnpicklingError),  # truncated pickle
            (raw_frame(b"garbage", kind=KIND_BATCH), pickle.UnpicklingError),
            (raw_frame(b""), EOFError),  # pickle's own error for empty input
        ],
        ids=["text", "truncated", "bad-batch", "empty"],
    )
    def test_pickle_decoder_error_then_next_message(self, frame, error):
        with gipc.pipe() as (r, w):
            write_raw(w, frame)
            w.put("next")
            with pytest.raises(error):
                r.get()
            assert r.get() == "next"

    def test_custom_decoder_error_propagates_across_processes(self):
        with gipc.pipe(encoder=json_encode, decoder=json_decode_rejecting_bad) as (r, w):
            frames = [raw_frame(b"bad one"), raw_frame(b"bad two")]
            p = gipc.start_process(send_bad_then_good, args=(w, frames))
            for expected in (b"bad one", b"bad two"):
                with pytest.raises(Rejected) as info:
                    r.get(timeout=PROMPT)
                assert info.value.args == (expected,)
            assert r.get(timeout=PROMPT) == {"still": "usable"}
            p.join()
            assert p.exitcode == 0


# --- untrusted input: a safe codec ---------------------------------------------------------------


def json_encoder(obj) -> bytes:
    """The safe encoder shown in docs/reliability.md."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


def json_decoder(data: bytes):
    """The safe decoder shown in docs/reliability.md: data only, never code."""
    return json.loads(data.decode("utf-8"))


def safe_pipe(**kwargs):
    return gipc.pipe(encoder=json_encoder, decoder=json_decoder,
                     max_message_size=kwargs.pop("max_message_size", 16 * MIB), **kwargs)


class RunsCode:
    """Unpickling this creates a directory: stands for arbitrary code an attacker runs."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def json_round_trip_child(reader, writer) -> None:
    for item in reader:
        writer.put(item)


class TestUntrustedInput:
    JSON_VALUES = [None, True, 0, -(2**70), 1.5, "", "ünïcødé", [], {}, [1, [2, [3]]],
                   {"a": {"b": [None, False, "x" * 100_000]}}]

    def test_json_pair_round_trips_across_processes(self):
        with safe_pipe() as (r, w), safe_pipe() as (back_r, back_w):
            p = gipc.start_process(json_round_trip_child, args=(r, back_w))
            for value in self.JSON_VALUES:
                w.put(value)
                assert back_r.get(timeout=PROMPT) == value
            w.put_many(self.JSON_VALUES)
            assert [back_r.get(timeout=PROMPT) for _ in self.JSON_VALUES] == self.JSON_VALUES
            w.close()
            p.join()
            assert p.exitcode == 0

    @pytest.mark.parametrize("obj", [{1, 2}, b"bytes", float("nan"), object()],
                             ids=["set", "bytes", "nan", "object"])
    def test_json_encoder_refuses_what_json_cannot_carry(self, obj):
        with safe_pipe() as (r, w):
            with pytest.raises((TypeError, ValueError)):
                w.put(obj)
            w.put("nothing was sent before this")
            assert r.get() == "nothing was sent before this"

    @pytest.mark.parametrize(
        "payload",
        [pickle.dumps({"a": 1}), b"\xff\xfe not utf-8", b"{unquoted: 1}", b"", b"[1, 2"],
        ids=["pickle", "not-utf8", "not-json", "empty", "truncated"],
    )
    def test_json_decoder_rejects_non_json(self, payload):
        with safe_pipe() as (r, w):
            write_raw(w, raw_frame(payload))
            w.put(["next"])
            with pytest.raises(ValueError):  # JSONDecodeError and UnicodeDecodeError alike
                r.get()
            assert r.get() == ["next"]

    def test_json_decoder_never_runs_code_from_the_stream(self, tmp_path):
        marker = str(tmp_path / "pwned")
        with safe_pipe() as (r, w):
            write_raw(w, raw_frame(pickle.dumps(RunsCode(marker))))
            with pytest.raises(ValueError):
                r.get()
        assert not os.path.exists(marker)

    def test_default_pickle_decoder_runs_code_from_the_stream(self, tmp_path):
        # Why docs/reliability.md says the default codec is for trusted peers only.
        marker = str(tmp_path / "pwned")
        with gipc.pipe() as (r, w):
            write_raw(w, raw_frame(pickle.dumps(RunsCode(marker))))
            r.get()
        assert os.path.isdir(marker)

    @pytest.mark.parametrize(
        "codec, kind",
        [("json", KIND_BATCH), ("json", KIND_BYTES), ("raw", KIND_BATCH)],
        ids=["json-batch", "json-bytes", "raw-batch"],  # raw + KIND_BYTES is just bytes
    )
    def test_frame_kind_cannot_bypass_the_readers_decoder(self, codec, kind, tmp_path):
        marker = str(tmp_path / "pwned")
        pair = safe_pipe() if codec == "json" else gipc.pipe(encoder=None, decoder=None)
        with pair as (r, w):
            write_raw(w, raw_frame(pickle.dumps([RunsCode(marker), "x"]), kind=kind))
            try:
                got = r.get()
            except (GIPCError, ValueError):
                got = None
            assert not os.path.exists(marker), "the peer ran code in this process"
            assert got is None, f"a {codec} reader returned {got!r} without its decoder"


# --- the parent interrupted by a signal --------------------------------------------------------


def process_state(pid: int) -> str:
    """'gone', 'zombie' or 'alive' (a zombie is as good as gone: it runs no code)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return "gone"
    return "zombie" if stat[stat.rfind(")") + 2] in "ZX" else "alive"


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_state(pid) != "alive":
            return True
        time.sleep(0.02)
    return False


class Scenario:
    """A script run in a fresh interpreter in its own session, with stdout/stderr in files
    (its orphaned children would keep a captured pipe open). Children it reports are killed
    when the test ends, whatever happened."""

    def __init__(self, tmp_path, code: str) -> None:
        self.dir = tmp_path
        self.pids_file = tmp_path / "pids"
        script = tmp_path / "scenario.py"
        script.write_text(textwrap.dedent(code))
        self.out = open(tmp_path / "stdout", "w")
        self.err = open(tmp_path / "stderr", "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path)], stdout=self.out, stderr=self.err,
            cwd=ROOT, start_new_session=True,
        )
        self.pids: dict = {}

    def wait_ready(self, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pids_file.exists():
                text = self.pids_file.read_text()
                if text.endswith("\n"):
                    self.pids = json.loads(text)
                    return self.pids
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        raise AssertionError(f"scenario never got ready: {self.stderr()}")

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        self.err.flush()
        return (self.dir / "stderr").read_text()

    def marker(self, name: str) -> bool:
        return (self.dir / name).exists()

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in self.pids.values():
            if process_state(pid) == "alive":
                os.kill(pid, signal.SIGKILL)
        self.out.close()
        self.err.close()


@pytest.fixture
def scenario(tmp_path):
    made = []

    def make(code: str) -> Scenario:
        made.append(Scenario(tmp_path, code))
        return made[-1]

    yield make
    for s in made:
        s.cleanup()


INTERRUPTED_PARENT = """
import json, os, signal, sys, time, gevent, gipc
# A process started in the background by a shell without job control (as CI may run this
# suite) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
signal.signal(signal.SIGINT, signal.default_int_handler)
{setup}
out = sys.argv[1]

def wait_for_eof(reader, name):
    try:
        reader.get()
    except EOFError:
        open(os.path.join(out, name), "w").close()

with gipc.pipe() as (r, w), gipc.pipe() as (never_r, never_w):
    child = gipc.start_process(wait_for_eof, args=(r, "child-saw-eof"))
    daemon = gipc.start_process(time.sleep, args=(60,), daemon=True)

    def ready():
        # Written from a greenlet, so only once the main one is blocked in get().
        with open(os.path.join(out, "pids"), "w") as f:
            f.write(json.dumps({{"child": child.pid, "daemon": daemon.pid}}) + "\\n")

    gevent.spawn_later(0.05, ready)
    try:
        never_r.get()  # blocked here when the signal comes
    finally:
        open(os.path.join(out, "finally-ran"), "w").close()
"""


class TestParentInterrupted:
    def test_sigint_raises_keyboardinterrupt_in_the_parent(self, scenario):
        s = scenario(INTERRUPTED_PARENT.format(setup=""))
        pids = s.wait_ready()
        os.kill(s.proc.pid, signal.SIGINT)
        # An uncaught KeyboardInterrupt ends CPython by SIGINT once cleanup has run.
        assert s.wait() == -signal.SIGINT
        assert "KeyboardInterrupt" in s.stderr()
        assert s.marker("finally-ran")
        # The `with` blocks closed the parent's ends: the child sees EOF and finishes.
        assert wait_gone(pids["child"]) and s.marker("child-saw-eof")

    def test_ctrl_c_reaches_the_whole_process_group(self, scenario):
        # Children keep the default SIGINT action: a terminal's Ctrl-C ends them too.
        s = scenario(INTERRUPTED_PARENT.format(setup=""))
        pids = s.wait_ready()
        os.killpg(s.proc.pid, signal.SIGINT)
        assert s.wait() == -signal.SIGINT
        assert "KeyboardInterrupt" in s.stderr()
        assert wait_gone(pids["child"]) and wait_gone(pids["daemon"])
        assert not s.marker("child-saw-eof"), "the child should have died of SIGINT itself"

    def test_sigterm_kills_the_parent_and_children_see_eof(self, scenario):
        s = scenario(INTERRUPTED_PARENT.format(setup=""))
        pids = s.wait_ready()
        os.kill(s.proc.pid, signal.SIGTERM)
        assert s.wait() == -signal.SIGTERM
        assert not s.marker("finally-ran"), "SIGTERM's default action runs no Python code"
        # The kernel closed the dead parent's descriptors: the child learns of it by EOF.
        assert wait_gone(pids["child"]) and s.marker("child-saw-eof")
        # Nothing ran in the parent to stop the daemon child: it is orphaned, still alive.
        assert process_state(pids["daemon"]) == "alive"

    def test_sigterm_turned_into_exit_runs_cleanup(self, scenario):
        s = scenario(INTERRUPTED_PARENT.format(
            setup="signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))"))
        pids = s.wait_ready()
        os.kill(s.proc.pid, signal.SIGTERM)
        assert s.wait() == 143
        assert s.marker("finally-ran")
        assert wait_gone(pids["child"]) and s.marker("child-saw-eof")


NORMAL_EXIT = """
import json, os, sys, time, gipc
out = sys.argv[1]

def finish_later(path):
    time.sleep(1.0)
    open(path, "w").close()

daemon = gipc.start_process(time.sleep, args=(60,), daemon=True)
child = gipc.start_process(finish_later, args=(os.path.join(out, "child-finished"),))
with open(os.path.join(out, "pids"), "w") as f:
    f.write(json.dumps({"child": child.pid, "daemon": daemon.pid}) + "\\n")
"""


class TestParentExitsNormally:
    """multiprocessing's atexit hook terminates daemon children and joins the others; gipc's
    process objects are meant to take part in it like any multiprocessing.Process."""

    def test_daemon_children_are_terminated(self, scenario):
        s = scenario(NORMAL_EXIT)
        assert s.wait() == 0, s.stderr()
        pids = s.wait_ready()
        assert wait_gone(pids["daemon"], timeout=5)

    def test_non_daemon_children_are_joined(self, scenario):
        s = scenario(NORMAL_EXIT)
        assert s.wait() == 0, s.stderr()
        assert s.marker("child-finished"), "the parent exited before its child finished"
        pids = s.wait_ready()
        assert wait_gone(pids["child"], timeout=5)

    def test_gipc_takes_part_once_the_atexit_hook_is_registered(self, scenario):
        # The proposed fix, applied by the program itself: with the hook in place, gipc's
        # process objects are terminated and joined by it (cooperatively, at exit).
        s = scenario(NORMAL_EXIT.replace("import json,", "import multiprocessing.util, json,"))
        assert s.wait() == 0, s.stderr()
        pids = s.wait_ready()
        assert s.marker("child-finished"), "the parent exited before its child finished"
        assert wait_gone(pids["daemon"], timeout=5) and wait_gone(pids["child"], timeout=5)


# --- forking while other OS threads run ---------------------------------------------------------


def report(writer, fn, *args) -> None:
    try:
        writer.put(("ok", fn(*args)))
    except BaseException as exc:  # noqa: B036 - reported, not swallowed
        writer.put(("error", repr(exc)))


def run_in_child(fn, *args, timeout: float = 20.0):
    """Runs ``fn(*args)`` in a gipc child and returns what it returned. A child that hangs
    (a deadlock on an inherited lock) is killed and reported as such."""
    with gipc.pipe() as (r, w):
        p = gipc.start_process(report, args=(w, fn) + args)
        try:
            status, value = r.get(timeout=timeout)
        except gevent.Timeout:
            p.kill()
            p.join()
            return "hung"
        p.join()
        assert p.exitcode == 0
        assert status == "ok", value
        return value


def use_child_threadpool():
    return gevent.get_hub().threadpool.apply(sum, ([1, 2, 3],)), threading.active_count()


def log_through(logger_name: str):
    logging.getLogger(logger_name).warning("logged in the child")
    return True


def try_lock(lock):
    return lock.acquire(timeout=0.5)


class TestForkWithThreads:
    def test_gevent_threadpool_busy_in_a_blocking_call(self):
        pool = gevent.get_hub().threadpool
        busy = [pool.spawn(time.sleep, 1.0) for _ in range(2)]
        t0 = time.monotonic()
        total, threads = run_in_child(use_child_threadpool)
        assert time.monotonic() - t0 < 1.0, "the fork waited for the threadpool"
        assert total == 6
        # Only the forking thread exists in the child (plus the fresh pool's own worker).
        assert threads <= 2
        gevent.joinall(busy, raise_error=True)

    def test_logging_handler_lock_held_by_another_thread(self):
        # CPython re-creates every logging handler's lock in a forked child
        # (os.register_at_fork), so a lock held elsewhere at fork time does not deadlock
        # the child. See docs/reliability.md for what this does not cover.
        stream = open(os.devnull, "w")
        handler = logging.StreamHandler(stream)
        logger = logging.getLogger("gipc.tests.fork-lock")
        logger.addHandler(handler)
        logger.propagate = False
        held, release = threading.Event(), threading.Event()

        def hold():
            handler.acquire()
            held.set()
            release.wait(30)
            handler.release()

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            held.wait(10)
            assert run_in_child(log_through, logger.name) is True
        finally:
            release.set()
            holder.join()
            logger.removeHandler(handler)
            stream.close()

    @pytest.mark.fork_only
    @pytest.mark.skipif(not hasattr(logging, "_lock"), reason="logging's module lock is private")
    def test_fork_waits_for_loggings_module_lock(self):
        held, release = threading.Event(), threading.Event()

        def hold():
            with logging._lock:
                held.set()
                release.wait(0.3)

        holder = threading.Thread(target=hold)
        holder.start()
        held.wait(10)
        t0 = time.monotonic()
        p = gipc.start_process(log_through, args=("gipc.tests.module-lock",))
        waited = time.monotonic() - t0
        release.set()
        holder.join()
        p.join()
        assert p.exitcode == 0
        assert waited >= 0.2, "fork is expected to wait until the module lock is free"

    @pytest.mark.fork_only
    def test_plain_lock_held_by_another_thread_stays_locked_in_the_child(self):
        # No such rescue for an application's own lock: the child inherits it locked, and
        # the thread that would release it does not exist there.
        lock = threading.Lock()
        held, release = threading.Event(), threading.Event()

        def hold():
            with lock:
                held.set()
                release.wait(30)

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            held.wait(10)
            assert run_in_child(try_lock, lock) is False
        finally:
            release.set()
            holder.join()

    @pytest.mark.fork_only
    @pytest.mark.skipif(sys.version_info < (3, 12), reason="the warning is new in 3.12")
    def test_python_warns_about_forking_a_threaded_process(self):
        release = threading.Event()
        holder = threading.Thread(target=release.wait, args=(30,))
        holder.start()
        try:
            with pytest.warns(DeprecationWarning, match="multi-threaded, use of fork"):
                p = gipc.start_process(int)
            p.join()
        finally:
            release.set()
            holder.join()


# --- the peer process ends while a greenlet waits on it -----------------------------------------


def end(how: str) -> None:
    if how == "exit":
        sys.exit(0)
    if how == "os._exit":
        os._exit(0)
    os.kill(os.getpid(), signal.SIGKILL)


def hold_then_end(handle, how: str, delay: float) -> None:
    time.sleep(delay)
    end(how)


def grandchild_waits(handle, op: str, report_w) -> None:
    try:
        if op == "get":
            handle.get()
        else:
            handle.put(b"\x03" * (16 * MIB))
        report_w.put("no error")
    except Exception as exc:
        report_w.put(type(exc).__name__)


def middle_starts_waiter_then_ends(op: str, how: str, report_w) -> None:
    with gipc.pipe() as (r, w):
        mine, theirs = (w, r) if op == "get" else (r, w)
        gipc.start_process(grandchild_waits, args=(theirs, op, report_w))
        time.sleep(0.3)  # the grandchild is blocked by now
        end(how)


HOW = ["exit", "os._exit", "SIGKILL"]


class TestPeerEndsWhileWaiting:
    @pytest.mark.parametrize("how", HOW)
    def test_parent_blocked_in_get_when_the_writer_process_ends(self, how, transport):
        with gipc.pipe() as (r, w):
            p = gipc.start_process(hold_then_end, args=(w, how, 0.2))
            t0 = time.monotonic()
            with pytest.raises(EOFError):
                r.get(timeout=PROMPT + 0.2)
            assert time.monotonic() - t0 < PROMPT
            p.join()

    @pytest.mark.parametrize("how", HOW)
    def test_parent_blocked_in_put_when_the_reader_process_ends(self, how, transport):
        with gipc.pipe() as (r, w):
            p = gipc.start_process(hold_then_end, args=(r, how, 0.2))
            t0 = time.monotonic()
            with pytest.raises(BrokenPipeError):
                with gevent.Timeout(PROMPT + 0.2):
                    w.put(b"\x04" * (16 * MIB))
            assert time.monotonic() - t0 < PROMPT
            p.join()

    @pytest.mark.parametrize("how", HOW)
    @pytest.mark.parametrize("op, error", [("get", "EOFError"), ("put", "BrokenPipeError")])
    def test_child_blocked_when_its_parent_process_ends(self, op, error, how, transport):
        with gipc.pipe() as (report_r, report_w):
            middle = gipc.start_process(middle_starts_waiter_then_ends,
                                        args=(op, how, report_w))
            assert report_r.get(timeout=PROMPT + 0.3) == error
            middle.join()


class Interrupted(BaseException):
    """Stands for the exception a signal handler raises (Ctrl-C's ``KeyboardInterrupt``)."""


def _gipc_line_tracer(on_line, only=None):
    """A tracer that calls ``on_line(frame)`` at each line of gipc's Python code where a signal
    handler's exception could land, except ``try:`` lines and the second visit of a
    ``with`` line, which is
    Python leaving the block: from CPython 3.11 on no signal is handled between that and the
    ``__exit__`` call (on 3.9 and 3.10 one can be, bpo-29988; no library code can prevent
    that), and a tracer that raised there would skip ``__exit__`` as no signal can."""
    seen = {}

    def tracer(frame, event, arg):
        filename = frame.f_code.co_filename
        if (
            event == "line"
            and f"{os.sep}gipc{os.sep}" in filename
            and (only is None or filename.endswith(tuple(os.sep + name for name in only)))
        ):
            lines = seen.setdefault(id(frame), set())
            again = frame.f_lineno in lines
            lines.add(frame.f_lineno)
            source = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            # A `try:` line is a no-op instruction: no handler runs there (and on 3.11 an
            # exception raised there by a tracer skips the enclosing handlers).
            if not (again and source.startswith("with ")) and source != "try:":
                on_line(frame)
        return tracer

    return tracer


def _line_of(frame):
    """Where ``frame`` is: its file's name, line number and code."""
    code = frame.f_code
    source = linecache.getline(code.co_filename, frame.f_lineno).strip()
    return f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {source}"


def _lines_in_gipc(call, only=None, where=None):
    """How many lines of gipc's Python code ``call()`` runs (as the tracer counts them;
    ``only``: of those modules' files); each is added to the set ``where`` if given."""
    count = 0

    def on_line(frame):
        nonlocal count
        count += 1
        if where is not None:
            where.add(_line_of(frame))

    sys.settrace(_gipc_line_tracer(on_line, only))
    try:
        call()
    finally:
        sys.settrace(None)
    return count


def _interrupt_where(should_raise, call, only=None, where=None):
    """Runs ``call()`` with ``Interrupted`` raised at the first line of gipc's Python code
    it runs (``only``: of those modules' files) for which ``should_raise(frame)`` is true,
    as a signal handler's exception would be; True if it was raised (and then, if
    ``where`` is a list, that line is appended to it: its file, number and code)."""
    raised = False

    def on_line(frame):
        nonlocal raised
        if should_raise(frame):
            raised = True
            if where is not None:
                where.append(_line_of(frame))
            raise Interrupted

    sys.settrace(_gipc_line_tracer(on_line, only))
    try:
        call()
    except Interrupted:
        pass
    finally:
        sys.settrace(None)
    return raised


def _interrupt_at_line(n, call, only=None, where=None):
    """``_interrupt_where`` at the ``n``-th line ``call()`` runs."""
    seen = 0

    def nth(_frame):
        nonlocal seen
        seen += 1
        return seen == n

    return _interrupt_where(nth, call, only, where)


def _interrupt_at(location, call, only=None, where=None):
    """``_interrupt_where`` at the first visit of one line, known by ``_line_of``: for
    lines that a call reaches or not depending on timing, which counting misses."""
    return _interrupt_where(lambda frame: _line_of(frame) == location, call, only, where)


class TestInterruptedBetweenAnyTwoLines:
    """An exception from a signal handler can come between any two lines of Python. Raised
    at each line of gipc's code in turn (a tracer stands for the handler): the handle is
    never left locked with no greenlet in it (it was, when the lock's own state changed in
    Python: every later get/put on it waited for ever), and it goes on working. (The
    message being received when the exception came may be lost, as with any Python code
    that is interrupted between taking a value and handing it on.)"""

    SCENARIOS = ["get with a timeout", "get that waits", "put that waits"]

    def _scenario(self, name, r, w):
        """The call to interrupt, after setting the scene (greenlets it starts go to
        ``self._readers``, to be killed)."""
        if name == "get with a timeout":
            w.put("m")
            return lambda: r.get(timeout=5)
        if name == "get that waits":
            self._readers.append(gevent.spawn_later(0.01, w.put, "m"))
            return r.get
        # A full pipe: the put queues its message and waits for the reader.
        while w._core.try_send(gipc._core.KIND_BYTES, b"x" * 4096) == gipc._core.DONE:
            pass
        reader = gevent.spawn_later(0.01, lambda: [r.get() for _ in range(40)])
        self._readers.append(reader)
        return lambda: w.put(b"y" * 4096)

    @pytest.mark.parametrize("name", SCENARIOS)
    def test_the_handle_stays_usable(self, name):
        self._readers = []
        with gipc.pipe() as (r, w):
            lines = _lines_in_gipc(self._scenario(name, r, w))
            gevent.killall(self._readers)
        assert lines > 5, f"{name}: {lines} lines of gipc code: not the path meant"
        for n in range(1, lines + 1):
            self._readers = []
            r, w = gipc.pipe()
            try:
                call = self._scenario(name, r, w)
                raised = _interrupt_at_line(n, call)
                for reader in self._readers:
                    reader.kill()
                assert not r._lock.locked() and not w._lock.locked(), (
                    f"{name}, interrupted at line {n} of {lines}: left locked"
                )
                for handle in (r, w):
                    for queue in handle._lock._queues.values():
                        assert queue.counter == 1, f"{name}, line {n}: a greenlet queue held"
                if not raised:
                    continue
                # Still usable both ways (what was interrupted may be lost, not stuck; an
                # interrupted put's message is queued, and goes out before the next).
                def drain(reader):
                    got = reader.get()
                    while got != "after":
                        assert got in ("m", b"x" * 4096, b"y" * 4096), got
                        got = reader.get()

                with gevent.Timeout(5):
                    draining = gevent.spawn(drain, r)
                    w.put("after")
                    draining.get()
            finally:
                r.close()
                w.close()


def wait_for_word(reader) -> None:
    reader.get()


class TestChildWaitsInterruptedBetweenAnyTwoLines:
    """``is_alive()`` and ``join()`` interrupted at each line of gipc's code in turn (as by
    a signal handler's exception, which a program that catches Ctrl-C and goes on gets):
    gipc never closes a descriptor that is not its own, and still reports the child's exit.
    With the fork server, a socket object made around the status socket's bare number closed
    it when the interrupted call dropped it: ``join()`` then said the running child had
    exited (255), and gipc's clean-up later closed whatever had reused the number."""

    @pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
    def test_no_descriptor_closed_behind_its_owners_back(self, method):
        taken = []  # opened after each interruption: gets any number gipc let go of
        try:
            with gipc.pipe() as (r, w):
                p = gipc.start_process(wait_for_word, (r,), start_method=method)
                for call in (p.is_alive, lambda: p.join(0.001)):
                    lines = _lines_in_gipc(call)
                    assert lines > 2, f"{method}: {lines} lines of gipc code"
                    for n in range(1, lines + 1):
                        _interrupt_at_line(n, call)
                        gc.collect()  # what an interrupted call dropped goes now
                        taken.append(os.open(os.devnull, os.O_RDONLY))
                assert p.is_alive()
                w.put("go")
                p.join(10)
            assert p.exitcode == 0
            for fd in taken:
                os.fstat(fd)  # EBADF: gipc closed it
        finally:
            for fd in taken:
                try:
                    os.close(fd)
                except OSError:
                    pass


class TestStartsInterruptedBetweenAnyTwoLines:
    """``start_process()`` interrupted at each line of its launcher in turn: a start that
    raises leaves no child, running or zombie, and no descriptor (the autouse check), and
    a start that was not interrupted gives a child that runs. Spawn lost the pid of a child
    it had started when the exception came after the spawn: a zombie, or a child blocked
    for ever on its start-up data with six descriptors left open in the parent. The fork
    server's start leaked its pipes, status socket and pidfd (the server's child blocked
    for ever on its last byte of start-up data), could lose an offered spare for good (no
    spare offered again), or leave the server "asking" for good (no offer used again)."""

    # Spawn only: the fork launcher's version of this fix (StartFds, AllSignalsBlocked) was
    # taken back on 2026-12-02 after CI's threaded-fork stress test hung on libuv with it
    # (4 runs in 150 beside a CI run; the old code none). See that day's note.
    @pytest.mark.parametrize("method, launcher", [("spawn", ("_popen_spawn.py", "_popen.py"))])
    def test_nothing_is_left_of_an_interrupted_start(self, method, launcher):
        started = []

        def start():
            started.append(gipc.start_process(os.getpid, start_method=method))

        start()  # the launcher's module is imported now, not while lines are counted
        started.pop().join()
        lines = _lines_in_gipc(start, only=launcher)
        started.pop().join()
        assert lines > 10, f"{method}: {lines} lines of {launcher}"
        interrupted = 0
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())
        for n in range(1, lines + 1):
            if _interrupt_at_line(n, start, only=launcher):
                interrupted += 1
                assert not started, f"{method}, line {n}: raised, yet a process came back"
            else:
                started.pop().join(10)
            # The start blocks every signal across its fork or spawn: never left blocked
            # (a test after this one hung when it was).
            assert signal.pthread_sigmask(signal.SIG_BLOCK, ()) == mask, f"line {n}"
        assert interrupted == lines
        p = gipc.start_process(os.getpid, start_method=method)
        p.join(10)
        assert p.exitcode == 0

    # The fork server's start runs in the caller up to the child's pid: handed to a spare
    # the server offered (the offer read by the start itself), or, with no offer to be had,
    # asked of the server. Its children are the server's: what is left of an interrupted
    # start is looked for among them, and in the caller's descriptors, after each line.
    @pytest.mark.parametrize("path", ["offered spare", "server"])
    def test_nothing_is_left_of_an_interrupted_fork_server_start(self, path):
        from gipc import _forkserver

        start = _ForkServerStarts.start
        start()  # the server runs, and every module is imported, before lines are counted
        _ForkServerStarts.started.pop().join(10)
        server = _forkserver._server
        held = _ForkServerStarts.hold_offer(server) if path == "server" else None
        try:
            fds_before = set(open_fds()) - _ForkServerStarts._server_holds(server)
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())
            # How many lines a start runs varies a little (the server's answer may take
            # one more look at the status socket, shifting the lines after it): every
            # line that every start went through is interrupted, in one sweep or the next.
            seen = []
            for _ in range(3):
                assert _ForkServerStarts.fresh_offer(server, held), "the server offered no spare"
                seen.append(set())
                _lines_in_gipc(start, only=_ForkServerStarts.LAUNCHER, where=seen[-1])
                _ForkServerStarts.started.pop().join(10)
            assert len(seen[0]) > 50, f"{path}: {len(seen[0])} lines"
            to_interrupt = set.intersection(*seen)
            failures = []
            for _ in range(5):
                to_interrupt -= _ForkServerStarts.sweep(server, held, fds_before, mask, failures)
                if failures or not to_interrupt:
                    break
            # A line that a start reaches only when the server's answer is late (a wait for
            # it) can be stepped over by every count: aimed at where it is, until reached,
            # with each start's answer made late (on timing alone, 20 starts aimed at such a
            # line did not always reach it: CI, 2026-12-02, Python 3.10).
            with _ForkServerStarts.late_answers():
                for location in sorted(to_interrupt):
                    for _ in range(20):
                        if failures:
                            break
                        where = []
                        _ForkServerStarts.attempt(
                            server, held, fds_before, mask, failures, location,
                            functools.partial(
                                _interrupt_at,
                                location,
                                _ForkServerStarts.start,
                                _ForkServerStarts.LAUNCHER,
                                where,
                            ),
                        )
                        if where:
                            to_interrupt.discard(location)
                            break
            assert not failures, f"{path}:\n" + "\n".join(failures)
            assert not to_interrupt, f"{path}: never interrupted at {sorted(to_interrupt)}"
            assert _forkserver._server is server, "the server was dropped"
            p = gipc.start_process(os.getpid, start_method="forkserver")
            p.join(10)
            assert p.exitcode == 0
        finally:
            if held is not None:
                _ForkServerStarts.end_spare(held)


class _ForkServerStarts:
    """The interrupted fork-server start test's steps, and what it looks at in the
    caller's ``_Server``. (It also reads the ``_Server`` of before 2026-12-02, where
    ``_asking`` was a count and ``_inbox_fds`` a list: it ran, and failed, on that code.)"""

    LAUNCHER = ("_forkserver.py", "_popen.py")
    #: What ``start()`` started.
    started = []

    @staticmethod
    @contextlib.contextmanager
    def late_answers():
        """Each start's first look at the server's answer finds nothing, as when the
        answer is late: the start then goes through the lines that wait for it."""
        from gipc import _forkserver

        real = _forkserver.ForkServerPopen._read_answer
        looked = {}  # id -> the Popen, kept alive so that no other one takes its id

        def late_once(popen, start):
            if id(popen) not in looked:
                looked[id(popen)] = popen
                return None
            return real(popen, start)

        _forkserver.ForkServerPopen._read_answer = late_once
        try:
            yield
        finally:
            _forkserver.ForkServerPopen._read_answer = real
            looked.clear()

    @staticmethod
    def start():
        _ForkServerStarts.started.append(gipc.start_process(os.getpid, start_method="forkserver"))

    @staticmethod
    def sweep(server, held, fds_before, mask, failures):
        """Starts interrupted at their first line, their second, and so on, until starts
        run through (five in a row); notes in ``failures`` what each left. Returns where
        they were interrupted."""
        interrupted_at = set()
        n, finished_in_a_row = 0, 0
        while finished_in_a_row < 5 and n < 1000:
            n += 1
            where = []
            raised, fatal = _ForkServerStarts.attempt(
                server, held, fds_before, mask, failures, f"line {n}",
                functools.partial(
                    _interrupt_at_line,
                    n, _ForkServerStarts.start, _ForkServerStarts.LAUNCHER, where,
                ),
            )
            if fatal:
                break
            if raised:
                finished_in_a_row = 0
                interrupted_at.update(where)
            else:
                finished_in_a_row += 1
        return interrupted_at

    @staticmethod
    def attempt(server, held, fds_before, mask, failures, label, interrupt):
        """One start, interrupted where ``interrupt()`` says (it returns whether it
        raised); notes in ``failures`` what it left (a process that came back although it
        raised, a descriptor, a child, the server dropped, the mask changed). Returns
        whether it raised, and whether the test cannot go on (no spare offered, the server
        dropped)."""
        if not _ForkServerStarts.fresh_offer(server, held):
            failures.append(f"{label}: the server offered no spare")
            return False, True
        raised = interrupt()
        if raised and _ForkServerStarts.started:
            failures.append(f"{label}: raised, yet a process came back")
        while _ForkServerStarts.started:
            _ForkServerStarts.started.pop().join(10)
        at = f"{label} ({'interrupted' if raised else 'not reached'})"
        if server.dead:
            failures.append(f"{at}: the server was dropped")
            return raised, True
        problem = _ForkServerStarts.left_behind(server, fds_before, held)
        if problem:
            failures.append(f"{at}: {problem}")
            _ForkServerStarts.clear_away(server, fds_before, held)  # the next line's own
        if signal.pthread_sigmask(signal.SIG_BLOCK, ()) != mask:
            failures.append(f"{at}: the signal mask changed")
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return raised, False

    @staticmethod
    def fresh_offer(server, held):
        """Every start of the test begins alike. With a spare held out, the server has
        nothing to offer. Otherwise the server's offer of its next spare waits, unread,
        for the start to read: one read already (an interrupted start took it no further)
        is ended, and the server forks and offers another. False if no offer came."""
        if held is not None:
            return True
        server.alive()  # reads what it sent, and what an interrupted read left
        if server._offer is not None:
            offer, server._offer = server._offer, None
            _ForkServerStarts.end_spare(offer)
        try:
            gevent.socket.wait_read(server.sock.fileno(), timeout=PROMPT)
        except gevent.socket.timeout:
            return False
        return True

    @staticmethod
    def hold_offer(server):
        """Takes the spare the server offers out of the caller's reach: the server keeps it
        for the caller (it forks no other), so every start goes to the server itself."""
        deadline = time.monotonic() + PROMPT
        while server._offer is None or server._offer.pidfd < 0:
            assert time.monotonic() < deadline, "the server offered no spare"
            gevent.sleep(0.005)
            server.alive()  # reads what it sent
        held, server._offer = server._offer, None
        return held

    @staticmethod
    def end_spare(offer):
        """Ends an offered spare taken out of the server object (the server then forks
        and offers the next)."""
        try:
            signal.pidfd_send_signal(offer.pidfd, signal.SIGKILL)
        except OSError:  # gone already (ESRCH), or its offer closed (EBADF)
            pass
        offer.close()

    @staticmethod
    def _offered_pids(server):
        """The spares the server offered that nobody took: the offer read, and those in
        its messages not read yet (peeked at: read, they would spare the next start the
        lines that read them)."""
        from gipc import _forkserver

        pids = {server._offer.pid} if server._offer is not None else set()
        try:
            unread = bytes(server._inbox) + server.sock.recv(65536, socket.MSG_PEEK)
        except BlockingIOError:
            unread = bytes(server._inbox)
        size = _forkserver._LENGTH.size
        while len(unread) >= size:
            (length,) = _forkserver._LENGTH.unpack_from(unread)
            if len(unread) < size + length:
                break
            body = pickle.loads(unread[size : size + length])
            unread = unread[size + length :]
            if body[0] == "spare":
                pids.add(body[1])
        return pids

    @staticmethod
    def _server_holds(server):
        """The caller's descriptors that are the server object's: its own, the offer's,
        and those come with messages not read yet."""
        held = set(fork_server_traces())
        if server._offer is not None:
            held.update((server._offer.pidfd, server._offer.sock))
        inbox = server._inbox_fds
        held.update(getattr(inbox, "owned_fds", inbox))
        return held

    @staticmethod
    def _traces(server, fds_before, held):
        """Descriptors opened since ``fds_before`` that the server object does not hold;
        the server's children that are neither an offered spare nor the one held out;
        the starts it counts as asking."""
        fds = set(open_fds()) - fds_before - _ForkServerStarts._server_holds(server)
        spares = _ForkServerStarts._offered_pids(server) | ({held.pid} if held else set())
        children = child_pids(of=server.pid) - spares
        asking = server._asking if isinstance(server._asking, int) else len(server._asking)
        return fds, children, asking

    @staticmethod
    def left_behind(server, fds_before, held):
        """What an ended start left, once the hub has run a while (the clean-up of an
        interrupted start may wait for the server's answer). None if nothing."""
        deadline = time.monotonic() + PROMPT
        while True:
            fds, children, asking = _ForkServerStarts._traces(server, fds_before, held)
            if not (fds or children or asking):
                return None
            if time.monotonic() > deadline:
                return f"descriptors {sorted(fds)}, children {sorted(children)}, asking {asking}"
            gevent.sleep(0.01)

    @staticmethod
    def clear_away(server, fds_before, held):
        """Undoes what a start left (so that each line's start is judged on its own)."""
        fds, children, _asking = _ForkServerStarts._traces(server, fds_before, held)
        for fd in fds:
            os.close(fd)
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if isinstance(server._asking, int):
            server._asking = 0
        else:
            server._asking.clear()
