"""start_process and the process object: API, cooperation, the child's fresh state, handle
hand-over, descriptor hygiene, start methods and monkey-patching."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import tempfile
import time

import gevent
import pytest

import gipc
from gipc import GIPCClosed, GIPCLocked
from gipc.gipc import _GProcess

from conftest import LINUX, child_pids, open_fds
from helpers import Ticker, fd_targets, run_python


def noop() -> None:
    pass


def exit_with(code: int) -> None:
    sys.exit(code)


def raise_error() -> None:
    raise RuntimeError("child failed")


def sleep_for(seconds: float) -> None:
    time.sleep(seconds)


def echo_twice(reader, writer) -> None:
    writer.put(reader.get() * 2)


class TestProcessObject:
    def test_is_a_started_multiprocessing_process(self):
        p = gipc.start_process(noop, name="worker-1", daemon=True)
        assert isinstance(p, multiprocessing.Process) and isinstance(p, _GProcess)
        assert p.name == "worker-1" and p.daemon is True and p.pid > 0
        p.join()
        assert p.exitcode == 0 and not p.is_alive()
        p.close()

    def test_defaults(self):
        p = gipc.start_process(noop)
        p.join()
        assert p.daemon is False and p.name.startswith("_GProcess")

    @pytest.mark.parametrize("target, args, code", [(exit_with, (3,), 3), (raise_error, (), 1)])
    def test_exit_codes(self, target, args, code, capfd):
        p = gipc.start_process(target, args=args)
        p.join()
        assert p.exitcode == code

    @pytest.mark.parametrize("method, signum", [("terminate", signal.SIGTERM),
                                                 ("kill", signal.SIGKILL)])
    def test_exitcode_is_minus_signal(self, method, signum):
        p = gipc.start_process(sleep_for, args=(30,))
        assert p.is_alive()
        getattr(p, method)()
        p.join()
        assert p.exitcode == -signum

    def test_join_timeout_returns_with_child_alive(self):
        p = gipc.start_process(sleep_for, args=(30,))
        t0 = time.monotonic()
        p.join(0.1)
        assert time.monotonic() - t0 < 5
        assert p.is_alive() and p.exitcode is None
        p.kill()
        p.join()

    def test_a_nan_timeout_is_refused_whether_the_child_runs_or_ended(self):
        p = gipc.start_process(sleep_for, args=(30,))
        with pytest.raises(ValueError, match="NaN"):
            p.join(float("nan"))
        p.kill()
        p.join()
        with pytest.raises(ValueError, match="NaN"):
            p.join(float("nan"))
        assert p.exitcode == -signal.SIGKILL

    def test_join_is_cooperative(self):
        ticker = Ticker(0.01)
        try:
            p = gipc.start_process(sleep_for, args=(1.0,))
            p.join()
            assert ticker.ticks >= 30, ticker.ticks
        finally:
            ticker.stop()

    def test_several_greenlets_join_one_child(self):
        p = gipc.start_process(sleep_for, args=(0.2,))
        joiners = [gevent.spawn(p.join) for _ in range(5)]
        gevent.joinall(joiners, raise_error=True)
        assert p.exitcode == 0

    @pytest.mark.not_with_start_method(
        "forkserver",
        reason="waits with waitid() on the child, which is the fork server's, not ours",
    )
    def test_a_waiting_join_returns_when_another_greenlet_reaps_the_child(self):
        # is_alive() reaps an exited child (and closes its exit descriptor) while a join()
        # is waiting on that descriptor: the join must return all the same.
        p = gipc.start_process(sleep_for, args=(0.2,))
        joiner = gevent.spawn(p.join)
        gevent.sleep(0.05)  # the joiner is waiting now
        # Block (the hub cannot run) until the child has exited, without reaping it...
        os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
        assert not p.is_alive()  # ...then reap it here, before the joiner's watcher can
        joiner.join(timeout=5)
        assert joiner.dead and joiner.successful()
        assert p.exitcode == 0

    def test_close(self):
        p = gipc.start_process(sleep_for, args=(30,))
        with pytest.raises(ValueError):
            p.close()
        p.kill()
        p.join()
        p.close()
        with pytest.raises(ValueError):
            p.is_alive()

    @pytest.mark.parametrize(
        "kwargs, match",
        [({"target": noop, "args": [1]}, "args must be a tuple"),
         ({"target": noop, "kwargs": [("a", 1)]}, "kwargs must be a dict"),
         ({"target": 42}, "target must be callable")],
    )
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises(TypeError, match=match):
            gipc.start_process(**kwargs)

    def test_args_and_kwargs_reach_the_target(self):
        with gipc.pipe() as (r, w):
            p = gipc.start_process(put_args_and_c, args=(1, 2), kwargs={"c": 3, "w": w})
            assert r.get() == (1, 2, 3)
            p.join()


class TestExitWatching:
    @pytest.mark.skipif(not LINUX, reason="reads /proc")
    def test_no_descriptor_or_zombie_after_join(self):
        before = open_fds()
        p = gipc.start_process(noop)
        assert len(open_fds()) > len(before)
        p.join()
        assert open_fds() == before
        assert p.pid not in child_pids()

    def test_exit_of_other_children_is_not_stolen(self):
        # A plain multiprocessing child in the same process keeps its exit code.
        ctx = multiprocessing.get_context("fork")
        plain = ctx.Process(target=exit_with, args=(7,))
        plain.start()
        ours = gipc.start_process(exit_with, args=(5,))
        ours.join()
        plain.join()
        assert (plain.exitcode, ours.exitcode) == (7, 5)

    def test_many_children_at_once(self):
        procs = [gipc.start_process(exit_with, args=(i % 7,)) for i in range(30)]
        for i, p in enumerate(procs):
            p.join()
            assert p.exitcode == i % 7


def report_child_state(writer, parent_pid, marker) -> None:
    # The kernel's view of the dispositions as the target starts (using gevent below lets the
    # new loop install its own SIGCHLD handler, as it does in any gevent program).
    masks = kernel_signal_masks() if LINUX else {}
    # Give any greenlet or timer cloned from the parent every chance to run here.
    gevent.sleep(0.2)
    names = ("SIGINT", "SIGTERM", "SIGUSR1", "SIGHUP", "SIGCHLD", "SIGPIPE")
    dispositions = {name: signal.getsignal(getattr(signal, name)) for name in names}
    writer.put({
        "dispositions": {k: int(v) if isinstance(v, int) else repr(v)
                         for k, v in dispositions.items()},
        "marker_written": os.path.exists(marker),
        "ppid": os.getppid() == parent_pid,
        "fds": fd_targets(os.getpid()) if LINUX else [],
        "kernel_masks": masks,
    })


def kernel_signal_masks() -> dict:
    """The kernel's view of this process's dispositions: caught and ignored signal sets."""
    masks = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("SigCgt", "SigIgn"):
                masks[key] = int(value.strip(), 16)
    return masks


def child_state() -> dict:
    """What a freshly started child reports about itself (see report_child_state)."""
    with gipc.pipe() as (r, w):
        p = gipc.start_process(report_child_state, args=(w, os.getpid(), "/nonexistent"))
        state = r.get()
        p.join()
    return state


class TestChildState:
    @pytest.mark.fork_only  # what a forked child copies; its parent is the caller
    def test_cloned_greenlets_and_timers_never_run_in_the_child(self):
        marker = tempfile.mktemp(prefix="gipc-clone-")
        parent = os.getpid()

        def haunt():
            while True:
                gevent.sleep(0.01)
                if os.getpid() != parent:
                    open(marker, "w").close()

        def timer_callback():
            if os.getpid() != parent:
                open(marker, "w").close()

        ghost = gevent.spawn(haunt)
        timer = gevent.get_hub().loop.timer(0.05)
        timer.start(timer_callback)
        try:
            with gipc.pipe() as (r, w):
                p = gipc.start_process(report_child_state, args=(w, parent, marker))
                state = r.get()
                p.join()
            assert state["ppid"] and not state["marker_written"]
        finally:
            ghost.kill()
            timer.close()
            if os.path.exists(marker):
                os.unlink(marker)

    def test_signal_dispositions_are_default_except_sigpipe(self):
        previous = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGHUP)}
        signal.signal(signal.SIGUSR1, lambda *a: None)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            state = child_state()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        got = state["dispositions"]
        for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGHUP", "SIGCHLD"):
            assert got[name] == int(signal.SIG_DFL), (name, got)
        assert got["SIGPIPE"] == int(signal.getsignal(signal.SIGPIPE))

    @pytest.mark.skipif(not LINUX, reason="reads /proc")
    def test_handlers_installed_behind_pythons_back_are_reset_too(self):
        # gevent installs its signal watchers with sigaction, invisible to signal.getsignal().
        watcher = gevent.signal_handler(signal.SIGUSR2, lambda: None)
        try:
            state = child_state()
        finally:
            watcher.cancel()
        masks = state["kernel_masks"]
        # glibc reserves signals 32 and 33 for itself (thread cancellation, setxid): no
        # program can change their disposition.
        glibc_reserved = (1 << 31) | (1 << 32)
        caught = masks["SigCgt"] & ~glibc_reserved
        assert caught == 0, f"caught signals left in the child: {caught:#x}"
        assert masks["SigIgn"] == 1 << (signal.SIGPIPE - 1), f"{masks['SigIgn']:#x}"

    @pytest.mark.skipif(not LINUX, reason="reads /proc")
    def test_child_holds_only_the_handles_passed_to_it(self):
        def descriptors_of(handle):
            # Every lane's descriptor (a pipe and, by default, a socket beside it).
            return {os.readlink(f"/proc/self/fd/{fd}") for fd in handle._core.filenos()}

        with gipc.pipe() as (r, w), gipc.pipe() as (other_r, other_w):
            others = descriptors_of(other_r) | descriptors_of(other_w)
            passed = descriptors_of(w)
            p = gipc.start_process(report_child_state, args=(w, os.getpid(), "/nonexistent"))
            assert w.closed, "a handle passed to the child is closed in the parent"
            state = r.get()
            p.join()
        assert passed <= set(state["fds"])
        assert not others & set(state["fds"])


# Targets of the hand-over tests (module level: spawn and forkserver pickle them).


def put_args_and_c(a, b, *, c, w) -> None:
    w.put((a, b, c))


def increment_back(h) -> None:
    h.put(h.get() + 1)


def forward_nested(pair, mapping) -> None:
    pair[0].put(mapping["in"].get())


def descend(depth, writer) -> None:
    if depth == 3:
        writer.put(("bottom", os.getpid()))
        return
    p = gipc.start_process(descend, args=(depth + 1, writer))
    p.join()
    sys.exit(p.exitcode)


class TestHandleHandOver:
    def test_simplex_ends_work_in_the_child_and_close_in_the_parent(self):
        with gipc.pipe() as (r1, w1), gipc.pipe() as (r2, w2):
            p = gipc.start_process(echo_twice, args=(r1, w2))
            assert r1.closed and w2.closed
            with pytest.raises(GIPCClosed):
                r1.get()
            w1.put(21)
            assert r2.get() == 42
            p.join()
            assert p.exitcode == 0

    def test_duplex_handle(self):
        with gipc.pipe(duplex=True) as (mine, theirs):
            p = gipc.start_process(increment_back, args=(theirs,))
            assert theirs.closed
            mine.put(1)
            assert mine.get() == 2
            p.join()

    def test_handles_nested_in_containers(self):
        with gipc.pipe() as (r1, w1), gipc.pipe() as (r2, w2):
            p = gipc.start_process(forward_nested, args=([w2],), kwargs={"mapping": {"in": r1}})
            assert w2.closed and r1.closed
            w1.put("nested")
            assert r2.get() == "nested"
            p.join()

    def test_closed_handle_cannot_be_passed(self):
        r, w = gipc.pipe()
        r.close()
        with pytest.raises(GIPCClosed):
            gipc.start_process(noop, args=(r,))
        w.close()

    def test_handle_in_use_cannot_be_passed(self):
        with gipc.pipe() as (r, w):
            g = gevent.spawn(r.get)
            gevent.sleep(0.01)
            with pytest.raises(GIPCLocked):
                gipc.start_process(noop, args=(r,))
            w.put("free")
            g.join()

    def test_children_of_children(self):
        with gipc.pipe() as (r, w):
            p = gipc.start_process(descend, args=(1, w))
            tag, pid = r.get()
            p.join()
        assert tag == "bottom" and pid != os.getpid() and p.exitcode == 0


SCRIPT_CHILD_ROUND_TRIP = """
import sys, multiprocessing, gevent, gipc

def child(r, w):
    w.put(r.get() + 1)

if __name__ == "__main__":
    {setup}
    with gipc.pipe() as (r, w), gipc.pipe() as (r2, w2):
        p = gipc.start_process(child, args=(r, w2))
        w.put(41)
        assert r2.get() == 42
        p.join()
        assert p.exitcode == 0
        p2 = gipc.start_process(sys.exit, args=(9,))
        p2.join()
        assert p2.exitcode == 9, p2.exitcode
    print("ok")
"""


@pytest.mark.parametrize(
    "setup",
    [
        "multiprocessing.set_start_method('spawn')",
        "multiprocessing.set_start_method('forkserver')",
        "from gevent import monkey; monkey.patch_all()",
        "from gevent import monkey; monkey.patch_all(); multiprocessing.set_start_method('spawn')",
        "from gevent import monkey; monkey.patch_all(); "
        "multiprocessing.set_start_method('forkserver')",
        "pass",
    ],
    ids=["spawn", "forkserver", "patch_all", "patch_all-spawn", "patch_all-forkserver", "plain"],
)
def test_independent_of_start_method_and_monkey_patching(setup, tmp_path):
    script = tmp_path / "scenario.py"
    script.write_text(SCRIPT_CHILD_ROUND_TRIP.replace("{setup}", setup))
    import subprocess

    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_works_when_started_from_a_greenlet():
    def spawn_and_join():
        with gipc.pipe() as (r1, w1), gipc.pipe() as (r2, w2):
            p = gipc.start_process(echo_twice, args=(r1, w2))
            w1.put(4)
            assert r2.get() == 8
            p.join()
            return p.exitcode

    assert gevent.spawn(spawn_and_join).get() == 0


def test_daemon_children_are_terminated_at_parent_exit():
    result = run_python(
        """
        import time, gipc
        p = gipc.start_process(time.sleep, args=(60,), daemon=True)
        print(p.pid, flush=True)
        """
    )
    assert result.returncode == 0, result.stderr
    pid = int(result.stdout.strip())
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail(f"daemon child {pid} outlived its parent")


def test_child_forked_from_a_greenlet_never_resumes_the_parents_code():
    # The child runs in the greenlet that forked it; the main greenlet, suspended at fork
    # time, must stay suspended there. If it resumed, the child would run this test's code
    # past this point, which the marker file would show.
    marker = tempfile.mktemp(prefix="gipc-escape-")
    parent = os.getpid()

    def start_and_join():
        p = gipc.start_process(noop)
        p.join()
        return p.exitcode

    try:
        assert gevent.spawn(start_and_join).get() == 0
        gevent.sleep(0.1)
    finally:
        if os.getpid() != parent:
            open(marker, "w").close()
            os._exit(0)
    assert not os.path.exists(marker)


# ---------------------------------------------------------------------------------------
# Several OS threads: multiprocessing polls every child from whichever thread starts one or
# asks active_children() (multiprocessing.process._cleanup()), and any thread may call
# is_alive(), join() or close(). A child's watchers belong to the hub of the thread that
# waits for it: they, and the descriptors they watch, are closed there, exactly once.


def exit_when_told(reader, code: int) -> None:
    reader.get()
    sys.exit(code)


def block_until_exited(p) -> None:
    """Blocks this thread (its hub does not run, so its watchers do not fire) until the
    child has exited, without reaping it."""
    if p._popen.method == "forkserver":
        import select

        # The status socket: the child's EXITED record is the first thing it says.
        assert select.select([p.sentinel], [], [], 30)[0]
    else:
        os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)


class ClosedFds:
    """Records, by thread, every descriptor gipc closes as a child's (``_child.close_fd``)."""

    def __init__(self, monkeypatch) -> None:
        import threading

        from gipc import _child

        self.closed: list = []
        real = _child.close_fd

        def close_fd(fd: int) -> None:
            self.closed.append((threading.get_ident(), fd))
            real(fd)

        monkeypatch.setattr(_child, "close_fd", close_fd)

    def of(self, fds) -> list:
        return [(who, fd) for who, fd in self.closed if fd in fds]


class LoopEdits:
    """Records, on libuv, each thread that queued a callback on a loop
    (``_setup_for_run_callback``, which edits the loop's handle queue: unsafe from any
    thread but the loop's own). libev's loop is a C type, not patchable: nothing recorded."""

    def __init__(self, monkeypatch) -> None:
        import threading

        self.calls: list = []
        try:
            from gevent.libuv.loop import loop as uv_loop
        except ImportError:
            return
        real = uv_loop._setup_for_run_callback

        def setup(loop) -> None:
            self.calls.append((loop, threading.get_ident()))
            real(loop)

        monkeypatch.setattr(uv_loop, "_setup_for_run_callback", setup)

    def from_other_threads(self, loop, owner: int) -> list:
        return [who for edited, who in self.calls if edited is loop and who != owner]


def popen_fds(p) -> set:
    popen = p._popen
    return set(popen._parent_fds) | ({popen._exit_fd} - {None})


def run_in_thread(work) -> list:
    """Runs ``work`` in a new OS thread (whose hub, if it made one, is destroyed as it
    ends); returns what it raised, if anything."""
    import threading

    from gevent._hub_local import get_hub_if_exists

    errors: list = []

    def main() -> None:
        try:
            work()
        except BaseException as exc:  # noqa: B036 - reported to the test
            errors.append(exc)
        finally:
            hub = get_hub_if_exists()
            if hub is not None:
                hub.destroy(destroy_loop=True)

    thread = threading.Thread(target=main)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    return errors


@pytest.mark.parametrize("other", ["cleanup", "start", "join", "close"])
def test_another_thread_that_sees_the_exit_leaves_the_watchers_to_their_thread(
    other, monkeypatch, capfd
):
    import threading

    closed = ClosedFds(monkeypatch)
    edits = LoopEdits(monkeypatch)
    with gipc.pipe() as (r, w):
        p = gipc.start_process(exit_when_told, args=(r, 5))
        p.join(0.01)  # this thread's hub watches the child now
        assert p.is_alive()
        popen = p._popen
        watcher = popen._exit_watcher
        assert watcher is not None
        fds = popen_fds(p)
        w.put("go")
    block_until_exited(p)
    seen: dict = {}

    def elsewhere() -> None:
        if other == "cleanup":
            multiprocessing.process._cleanup()  # what Process.start() does first
        elif other == "start":
            q = gipc.start_process(noop)
            q.join(30)
            seen["started"] = q.exitcode
        elif other == "join":
            p.join(30)
        seen["alive"] = p.is_alive()
        seen["exitcode"] = p.exitcode
        seen["active"] = p in multiprocessing.active_children()
        if other == "close":
            p.close()

    assert run_in_thread(elsewhere) == []
    expected = {"alive": False, "exitcode": 5, "active": False}
    if other == "start":
        expected["started"] = 0
    assert seen == expected
    # The watcher and the descriptors are this thread's: untouched over there.
    assert popen._exit_watcher is watcher
    assert closed.of(fds) == []
    for fd in fds:
        os.fstat(fd)
    if other == "close":
        for _ in range(500):  # the clean-up was queued on this thread's loop
            if popen._hub is None:
                break
            gevent.sleep(0.01)
    else:
        p.join(10)
        assert p.exitcode == 5 and not p.is_alive()
    assert popen._exit_watcher is None
    me = threading.get_ident()
    assert sorted(closed.of(fds)) == sorted((me, fd) for fd in fds)  # each once, here
    # Nor did the other thread queue that clean-up by editing this loop from there (which
    # crashed a threaded program on libuv; gipc posts to the loop's mailbox instead).
    assert edits.from_other_threads(gevent.get_hub().loop, me) == []
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "failed with" not in err, err


@pytest.mark.parametrize(
    "destroy_hub",
    [True, pytest.param(False, marks=pytest.mark.allow_leaks)],  # gevent's loop stays open
    ids=["hub-destroyed", "hub-left"],
)
@pytest.mark.parametrize("exited", [False, True], ids=["running", "exited"])
def test_a_child_whose_watching_thread_ended_is_cleaned_up(
    exited, destroy_hub, monkeypatch, capfd
):
    import threading

    from gevent._hub_local import get_hub_if_exists

    closed = ClosedFds(monkeypatch)
    box: dict = {}
    watching, finish = threading.Event(), threading.Event()

    def watcher_thread() -> None:
        try:
            p = gipc.start_process(exit_when_told, args=(box["r"], 6))
            p.join(0.01)  # this thread's hub watches the child
            box["p"], box["fds"] = p, popen_fds(p)
            box["watcher"] = p._popen._exit_watcher
            watching.set()
            finish.wait(60)
        finally:
            watching.set()
            hub = get_hub_if_exists()
            if destroy_hub and hub is not None:
                hub.destroy(destroy_loop=True)

    with gipc.pipe() as (r, w):
        box["r"] = r
        thread = threading.Thread(target=watcher_thread)
        thread.start()
        assert watching.wait(60) and "p" in box and box["watcher"] is not None
        p, fds = box["p"], box["fds"]
        if exited:
            # Another thread learns of the exit first: the clean-up is queued on the
            # watching thread's loop, which will not run again.
            w.put("go")
            block_until_exited(p)
            assert p not in multiprocessing.active_children()  # polls it: exited
            assert p.exitcode == 6
            assert closed.of(fds) == []
        finish.set()
        thread.join(60)
        assert not thread.is_alive()
        if exited:
            # The thread closed them as it ended.
            assert sorted(fd for _, fd in closed.of(fds)) == sorted(fds)
        else:
            w.put("go")
        p.join(10)  # a join here adopts the child if need be
        assert p.exitcode == 6 and not p.is_alive()
    assert p._popen._exit_watcher is None and p._popen._hub is None
    assert sorted(fd for _, fd in closed.of(fds)) == sorted(fds)  # each once
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "failed with" not in err, err


def test_a_join_that_timed_out_leaves_no_watcher_running():
    # A started watcher holds the hub: gevent's libuv loop, for one, is not destroyed
    # before it fires (a thread that destroys its hub would wait for the child).
    p = gipc.start_process(sleep_for, args=(30,))
    p.join(0.01)
    watcher = p._popen._exit_watcher
    assert p.is_alive() and watcher is not None and not watcher.active
    joiner = gevent.spawn(p.join)
    gevent.sleep(0.05)
    assert watcher.active  # while a join waits
    p.kill()
    joiner.join(10)
    assert joiner.dead and p.exitcode == -signal.SIGKILL


STRESS_THREADS = """
import multiprocessing, sys, threading
import gevent
from gevent._hub_local import get_hub_if_exists
import gipc

METHOD, THREADS, STARTS = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def worker(k, errors, done):
    try:
        for i in range(STARTS):
            code = (k * STARTS + i) % 250
            p = gipc.start_process(sys.exit, args=(code,), start_method=METHOD)
            if i % 3 == 0:
                multiprocessing.active_children()
            p.join(30)
            if p.exitcode != code:
                errors.append((k, i, p.exitcode, code))
            done.append(1)
    except BaseException as exc:
        errors.append((k, repr(exc)))
    finally:
        hub = get_hub_if_exists()
        if hub is not None:
            hub.destroy(destroy_loop=True)

if __name__ == "__main__":
    # gevent's libuv loop crashes (uv_default_loop() raced) when threads make their first
    # hubs at once before any other hub exists: not what this tests.
    gevent.get_hub()
    errors, done = [], []
    threads = [threading.Thread(target=worker, args=(k, errors, done)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    print(sum(t.is_alive() for t in threads), len(done), errors[:5], flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("method, starts", [("fork", 40), ("forkserver", 40), ("spawn", 8)])
def test_threads_start_and_join_children_at_once(method, starts, tmp_path):
    """Four OS threads, each with its own hub, start and join children at once (and
    multiprocessing polls every thread's children at each start): no crash, no hub error,
    no torn start-up data, and every exit code right."""
    script = tmp_path / "threads.py"  # a file: spawned children import the main module
    script.write_text(STRESS_THREADS)
    import subprocess

    result = subprocess.run(
        [sys.executable, str(script), method, "4", str(starts)],
        capture_output=True, text=True, timeout=110,
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    assert result.stdout.split("\n")[0] == f"0 {4 * starts} []", result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "failed with" not in result.stderr, (
        result.stderr[-3000:]
    )
