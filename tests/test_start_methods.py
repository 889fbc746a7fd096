"""Start methods: choosing one, and what holds for "spawn" and "forkserver" children beyond
what the rest of the suite checks for every method (run it with
``--start-methods=fork,spawn,forkserver``): refusals in the caller, the fork server's
life, and who may talk to it."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import textwrap
import threading
import time
from typing import Iterator

import gevent
import pytest

import gipc
from gipc import GIPCError, _forkserver
from gipc._process import resolve_start_method

from conftest import LINUX, child_pids
from helpers import Ticker, pipe_capacity, run_python, run_script, wait_gone

NON_FORK = ["spawn", "forkserver"]


def noop() -> None:
    pass


def exit_with(code: int) -> None:
    sys.exit(code)


def sleep_for(seconds: float) -> None:
    time.sleep(seconds)


def sleep_when_ready(path: str, seconds: float) -> None:
    with open(path, "w"):
        pass
    time.sleep(seconds)


def report_state(writer: "gipc.gipc._GIPCHandle") -> None:
    """What the child sees: its names, its parent, its signals and its descriptors."""
    import gevent.hub

    handlers = {
        name: signal.getsignal(getattr(signal, name)) for name in ("SIGINT", "SIGTERM", "SIGCHLD")
    }
    writer.put(
        {
            "name": multiprocessing.current_process().name,
            "parent_pid": multiprocessing.parent_process().pid,
            "main": sys.modules["__main__"].__name__,
            "handlers": {k: (v == signal.SIG_DFL) for k, v in handlers.items()},
            "blocked": sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])),
            "fds": _descriptors(),
            "own": sorted(writer._core.filenos()),
            "hub": gevent.hub._get_hub() is None,
        }
    )


def use_multiprocessing_objects(conn, sock, notes) -> None:
    conn.send("over the connection")
    sock.sendall(b"over the socket")
    notes.send(conn.recv() + 1)


class Box:
    def __init__(self, handle: object) -> None:
        self.handle = handle


def report_kept(box: Box, writer: "gipc.gipc._GIPCWriter") -> None:
    writer.put((type(box.handle).__name__, box.handle.closed))


def _descriptors() -> dict:
    """Descriptor -> what it is (Linux)."""
    found = {}
    if LINUX:
        for fd in os.listdir("/proc/self/fd"):
            try:
                found[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # the listing's own descriptor
                pass
    return found


class TestChoosing:
    @pytest.mark.parametrize("platform, expected", [("linux", "fork"), ("darwin", "spawn")])
    def test_default_is_fork_on_linux_and_spawn_on_macos(self, monkeypatch, platform, expected):
        monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: None)
        monkeypatch.setattr(sys, "platform", platform)
        assert resolve_start_method(None) == expected

    def test_follows_the_program_s_multiprocessing_setting(self, monkeypatch):
        monkeypatch.setattr(
            multiprocessing, "get_start_method", lambda allow_none=False: "forkserver"
        )
        assert resolve_start_method(None) == "forkserver"
        assert resolve_start_method("spawn") == "spawn"  # an explicit choice wins

    def test_asking_does_not_fix_multiprocessing_s_setting(self):
        result = run_python(
            """
            import multiprocessing, gipc
            p = gipc.start_process(print, args=())
            p.join()
            # multiprocessing's default context, as a context (its module-level functions
            # are its methods): asked, not fixed either.
            default = multiprocessing.context._default_context
            p = gipc.start_process(print, args=(), mp_context=default)
            p.join()
            multiprocessing.set_start_method("spawn")  # raises if the default got fixed
            print(multiprocessing.get_start_method())
            """
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[-1] == "spawn"

    def test_mp_context(self):
        assert resolve_start_method(None, multiprocessing.get_context("spawn")) == "spawn"
        assert resolve_start_method("spawn", multiprocessing.get_context("spawn")) == "spawn"
        with pytest.raises(ValueError, match="contradicts"):
            resolve_start_method("fork", multiprocessing.get_context("spawn"))
        with pytest.raises(TypeError, match="mp_context"):
            resolve_start_method(None, "spawn")

    @pytest.mark.parametrize("bad", ["thread", "", "FORK"])
    def test_unknown_method_is_refused(self, bad):
        with pytest.raises(ValueError, match="unknown start method"):
            gipc.start_process(noop, start_method=bad)

    def test_non_string_method_is_refused(self):
        with pytest.raises(TypeError, match="start_method must be a str"):
            gipc.start_process(noop, start_method=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", NON_FORK)
class TestNonForkChildren:
    def test_exit_codes(self, method):
        p = gipc.start_process(exit_with, args=(7,), start_method=method)
        p.join()
        assert p.exitcode == 7
        p = gipc.start_process(noop, start_method=method)
        p.join()
        assert p.exitcode == 0 and not p.is_alive()

    def test_large_start_up_data_reaches_the_child_while_the_caller_s_loop_waits(self, method):
        # More start-up data than a pipe holds (1 MiB of arguments), and a caller that
        # polls with time.sleep (no event loop runs meanwhile): the child gets its data
        # all the same, as with multiprocessing's spawn. (It was fed from the hub only.)
        p = gipc.start_process(exit_with_length, args=(b"x" * (1 << 20) + b"y" * 5,),
                               start_method=method)
        deadline = time.monotonic() + 30
        while p.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert p.exitcode == 5
        p.join()

    def test_a_start_whose_data_fits_the_pipe_starts_no_thread(self, method, monkeypatch):
        # The fork server's start holds back the last byte until the pid is known; that
        # byte waited in a thread of its own, one OS thread per start (CPU in the caller,
        # and a threaded caller for a fork started meanwhile).
        from gipc import _startup

        threads = []

        def counting(function, args):
            threads.append(function)
            return real(function, args)

        real = _startup._start_new_thread
        monkeypatch.setattr(_startup, "_start_new_thread", counting)
        for _ in range(3):
            p = gipc.start_process(exit_with_length, args=(b"x" * 1000,), start_method=method)
            p.join()
            assert p.exitcode == 1000 % 256
        assert threads == []

    def test_a_start_whose_feeding_thread_cannot_start_fails_cleanly(self, method,
                                                                     monkeypatch):
        # More start-up data than the pipe takes needs a thread; when the system refuses
        # one, start_process says so, and nothing is left behind: no open pipe, no child
        # waiting for ever for the rest of its data (the fixture checks descriptors and
        # children). The thread's descriptor stayed open, so the spawned child waited.
        from gipc import _startup

        def refuse(function, args):
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(_startup, "_start_new_thread", refuse)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            gipc.start_process(exit_with_length, args=(b"x" * (1 << 20),), start_method=method)
        monkeypatch.undo()
        p = gipc.start_process(exit_with_length, args=(b"x" * (1 << 20) + b"y",),
                               start_method=method)
        p.join(30)
        assert p.exitcode == 1  # the next start is unaffected

    @pytest.mark.parametrize("code, reported", [(256, 0), (-1, 255), (1000, 232)])
    def test_exit_codes_are_what_the_system_reports(self, method, code, reported):
        # As multiprocessing and a fork child report them: the low 8 bits.
        p = gipc.start_process(exit_with, args=(code,), start_method=method)
        p.join()
        assert p.exitcode == reported

    @pytest.mark.parametrize(
        "stop, expected",
        [("terminate", -signal.SIGTERM), ("kill", -signal.SIGKILL), ("interrupt", -signal.SIGINT)],
    )
    def test_signals_reach_the_child(self, method, stop, expected, tmp_path):
        ready = tmp_path / "ready"
        p = gipc.start_process(sleep_when_ready, args=(str(ready), 30), start_method=method)
        while not ready.exists():  # past the child's start-up, where dispositions are reset
            gevent.sleep(0.01)
        getattr(p, stop)()
        p.join(10)
        assert p.exitcode == expected

    def test_join_is_cooperative_and_times_out(self, method):
        p = gipc.start_process(sleep_for, args=(0.5,), start_method=method)
        ticks = []
        ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(20)])
        p.join(0.1)
        assert p.is_alive() and p.exitcode is None
        p.join()
        ticker.join()
        assert len(ticks) == 20 and p.exitcode == 0

    def test_unpicklable_target_is_refused_in_the_caller_by_name(self, method):
        with pytest.raises(gipc.GIPCTypeError, match="the target .*lambda"):
            gipc.start_process(lambda: None, start_method=method)
        with pytest.raises(TypeError, match="keyword argument 'lock'"):
            gipc.start_process(noop, kwargs={"lock": threading.Lock()}, start_method=method)
        assert not child_pids() - set(_forkserver_pid())

    def test_the_child_starts_clean(self, method):
        with gipc.pipe() as (r, w):
            p = gipc.start_process(report_state, args=(w,), name="kid", start_method=method)
            state = r.get()
            p.join()
        assert p.exitcode == 0
        assert state["name"] == "kid" and state["parent_pid"] == os.getpid()
        assert state["main"] == "__mp_main__" or state["main"] == "__main__"
        assert all(state["handlers"].values()), state["handlers"]
        assert state["blocked"] == []
        # No hub came with it (the fork server runs none): its own is made when it waits.
        assert state["hub"], "the child started with a hub"
        if LINUX:
            # Beside stdin/stdout/stderr, /dev/null (the new stdin) and the handle's: the
            # parent sentinel and the exit report, and nothing else of the caller's.
            channels = {
                fd: what
                for fd, what in state["fds"].items()
                if fd not in state["own"] and what.startswith(("pipe:", "socket:", "anon_inode:"))
            }
            assert len(channels) == 2, state["fds"]


    def test_the_child_finds_gipc_where_the_caller_found_it(self, method):
        # Neither gipc nor gevent is importable without the program's own sys.path entries
        # (-I -S: no PYTHONPATH, no site-packages; as for a vendored copy, an application
        # bundle): the child, whose command line imports gipc first, must search where the
        # caller did.
        roots = sorted({os.path.dirname(os.path.dirname(m.__file__)) for m in (gipc, gevent)})
        result = run_python(
            f"""
            import sys
            sys.path[:0] = {roots!r}
            import gipc, time
            p = gipc.start_process(time.sleep, args=(0,), start_method={method!r})
            p.join(30)
            print("exitcode", p.exitcode)
            """,
            flags=("-I", "-S"),
        )
        assert "exitcode 0" in result.stdout, result.stdout + result.stderr


    def test_multiprocessing_objects_travel_as_with_multiprocessing_spawn(self, method):
        # Connections and a socket: multiprocessing's reducers ship their descriptors to a
        # child being started (reduction.DupFd), as for Value, Array and queues; pickled
        # without them, a Connection was a bare descriptor number, written into whatever
        # the child had opened under it.
        import socket

        ctx = multiprocessing.get_context("spawn")
        gipc.start_process(noop, start_method=method).join()  # a fork server is up
        before = _descriptors()
        ours, theirs = ctx.Pipe()
        notes_r, notes_w = ctx.Pipe(duplex=False)
        sock_here, sock_there = socket.socketpair()
        p = gipc.start_process(
            use_multiprocessing_objects, args=(theirs, sock_there, notes_w), start_method=method
        )
        assert ours.poll(30) and ours.recv() == "over the connection"
        ours.send(41)
        assert notes_r.poll(30) and notes_r.recv() == 42
        sock_here.settimeout(30)
        assert sock_here.recv(100) == b"over the socket"
        p.join()
        assert p.exitcode == 0
        # As with multiprocessing: the caller's objects stay open (they are the caller's).
        assert not theirs.closed and not notes_w.closed and sock_there.fileno() >= 0
        for conn in (ours, theirs, notes_r, notes_w, sock_here, sock_there):
            conn.close()
        if LINUX:
            assert set(_descriptors()) == set(before)


@contextlib.contextmanager
def _own_server() -> Iterator[None]:
    """A fork server of the test's own: the running one is closed first, so the next start
    launches one with the test's settings (environment, preloads, hooks); closed, and
    gone, at the end, so the next test's server is started as usual."""
    _drop_server()
    try:
        yield
    finally:
        _drop_server()


def _drop_server() -> None:
    """Closes the running fork server (with any spare it offered) and reaps it: no zombie
    is left for a later test's ``os.wait()`` to find."""
    running = _forkserver.server_pid()
    _forkserver._close_at_exit()
    _forkserver._server = None
    if running is not None:
        wait_gone(running)


def _forkserver_pid():
    pid = _forkserver.server_pid()
    return [pid] if pid is not None else []


@pytest.mark.skipif(not LINUX, reason="reads /proc")
class TestForkServer:
    def test_one_server_serves_every_start(self):
        gipc.start_process(noop, start_method="forkserver").join()
        first = _forkserver.server_pid()
        gipc.start_process(noop, start_method="forkserver").join()
        assert first is not None and _forkserver.server_pid() == first

    def test_a_dead_server_is_replaced_on_next_use(self):
        gipc.start_process(noop, start_method="forkserver").join()
        old = _forkserver.server_pid()
        assert old is not None
        os.kill(old, signal.SIGKILL)
        wait_gone(old)  # dead for a while, not dying as the next start reaches it
        p = gipc.start_process(exit_with, args=(3,), start_method="forkserver")
        p.join()
        assert p.exitcode == 3
        assert _forkserver.server_pid() not in (None, old)

    def test_a_start_with_a_spare_known_in_advance_needs_no_word_from_the_server(self):
        """The server tells the caller about each spare it forks (pid, pidfd, a socket to
        it): a start hands the spare its request directly, and neither the start nor the
        join waits for the server (here: stopped)."""
        first = gipc.start_process(noop, start_method="forkserver")
        first.join()
        server = _forkserver.server_pid()
        assert server is not None
        _wait_spare(server, not_pids={first.pid})  # forked, and offered
        os.kill(server, signal.SIGSTOP)
        try:
            starting = gevent.spawn(gipc.start_process, exit_with, args=(5,),
                                    start_method="forkserver")
            p = starting.get(timeout=5)
            p.join(5)
            code = p.exitcode
        finally:
            os.kill(server, signal.SIGCONT)
        assert code == 5
        # Woken, the server hears of that start and that child's end at once: it carries
        # on (and forks the next spare).
        _wait_spare(server, not_pids={first.pid, p.pid})
        q = gipc.start_process(exit_with, args=(6,), start_method="forkserver")
        q.join(10)
        assert q.exitcode == 6
        assert _forkserver.server_pid() == server
        assert _state(server) is not None and _state(server)[0] != "Z"

    def test_a_child_killed_before_it_ran_reports_the_signal(self):
        """Handed its start by the caller, a spare killed before it could run anything
        (here: stopped, then killed) still reports the signal: the caller told the server
        the start's status socket, where REAPED goes (the child writes nothing)."""
        first = gipc.start_process(noop, start_method="forkserver")
        first.join()
        server = _forkserver.server_pid()
        assert server is not None
        spare = _wait_spare(server, not_pids={first.pid})
        os.kill(spare, signal.SIGSTOP)
        p = gipc.start_process(noop, start_method="forkserver")
        assert p.pid == spare  # handed to the offered spare
        p.kill()
        p.join(10)
        assert p.exitcode == -signal.SIGKILL

    def test_a_start_in_flight_fails_clearly_when_the_server_dies(self, monkeypatch):
        """A start that goes through the server (no spare known in advance)."""
        gipc.start_process(noop, start_method="forkserver").join()
        server = _forkserver.server_pid()
        assert server is not None
        monkeypatch.setattr(_forkserver._Server, "take_offer", lambda self, start: None)
        os.kill(server, signal.SIGSTOP)  # it cannot answer: the start below waits for it
        try:
            starting = gevent.spawn(gipc.start_process, noop, start_method="forkserver")
            gevent.sleep(0.2)
            assert not starting.ready()
            os.kill(server, signal.SIGKILL)
            with pytest.raises(GIPCError, match="fork server died"):
                starting.get(timeout=10)
        finally:
            try:
                os.kill(server, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p = gipc.start_process(noop, start_method="forkserver")  # a new one
        p.join()
        assert p.exitcode == 0
        wait_gone(server)

    def test_a_join_ends_on_the_child_s_own_word_without_the_server(self):
        """A child that exits normally is joined on its EXITED record and its pidfd, not the
        server's REAPED record (which waits for the server to wake): a stopped server does
        not hold the join. The child is slow to end after its record (a large address space
        to tear down), so a join woken by the record finds it still there."""
        with gipc.pipe() as (reader, writer):
            p = gipc.start_process(exit_big_when_told, args=(reader, 6), start_method="forkserver")
            server = _forkserver.server_pid()
            assert server is not None
            os.kill(server, signal.SIGSTOP)
            try:
                writer.put(None)
                waited = time.monotonic()
                p.join(5)
                waited = time.monotonic() - waited
            finally:
                os.kill(server, signal.SIGCONT)
        assert waited < 4, "the join waited for the stopped server"
        assert p.exitcode == 6

    def test_a_join_on_the_child_s_word_finds_its_descriptors_closed(self):
        """The join returns on the child's EXITED record, without waiting for the kernel
        to tear down its address space (slow for a child that grew: 256 MiB here), so the
        child closes every descriptor of its before it writes that record: a pipe it held
        and never closed reads as ended as soon as the join returns."""
        with gipc.pipe() as (told, tell), gipc.pipe() as (result, held):
            p = gipc.start_process(
                exit_big_when_told, args=(told, 0), kwargs={"hold": held},
                start_method="forkserver",
            )
            tell.put(None)
            p.join(10)
            assert p.exitcode == 0
            with pytest.raises(EOFError):
                result.get(timeout=0)

    def test_a_child_outlives_its_server_and_still_reports_its_exit(self):
        p = gipc.start_process(exit_with_after, args=(5, 0.5), start_method="forkserver")
        server = _forkserver.server_pid()
        assert server is not None
        os.kill(server, signal.SIGKILL)
        p.join(10)
        assert p.exitcode == 5
        wait_gone(server)

    def test_the_server_ends_with_its_caller(self):
        result = run_python(
            """
            import os, gevent, gipc
            from gipc import _forkserver
            gipc.start_process(print, start_method="forkserver").join()
            server = _forkserver.server_pid()
            def parent_of(pid):
                try:
                    with open(f"/proc/{pid}/stat") as stat:
                        return int(stat.read().rsplit(")", 1)[1].split()[1])
                except OSError:  # gone meanwhile
                    return None
            spares = []
            for _ in range(500):  # forked just after the start was handed over
                spares = [int(e) for e in os.listdir("/proc")
                          if e.isdigit() and parent_of(e) == server]
                if spares:
                    break
                gevent.sleep(0.01)
            print(server, *spares, flush=True)
            """
        )
        assert result.returncode == 0, result.stderr
        server, *spares = (int(pid) for pid in result.stdout.split()[-2:])
        wait_gone(server)
        assert len(spares) == 1
        _wait_ended(spares[0])  # the waiting spare child goes with it

    def test_each_start_finds_a_child_forked_ahead_holding_nothing_of_the_server(self):
        """The server forks the next child before it is asked for one (so a start does not
        wait for a fork); that spare child holds no descriptor of the server's but its end
        of the socket it waits on. One that dies meanwhile is replaced at the next start."""
        p = gipc.start_process(noop, start_method="forkserver")
        p.join()
        server = _forkserver.server_pid()
        assert server is not None
        spare = _wait_spare(server, not_pids={p.pid})
        channels = {}
        for fd in os.listdir(f"/proc/{spare}/fd"):
            try:
                target = os.readlink(f"/proc/{spare}/fd/{fd}")
            except OSError:
                continue
            if int(fd) > 2 and target.startswith(("socket:", "pipe:", "anon_inode:")):
                channels[int(fd)] = target
        assert len(channels) == 1 and next(iter(channels.values())).startswith("socket:"), (
            channels
        )
        os.kill(spare, signal.SIGKILL)
        _wait_ended(spare)
        q = gipc.start_process(exit_with, args=(4,), start_method="forkserver")
        q.join()
        assert q.exitcode == 4 and q.pid != spare
        assert _forkserver.server_pid() == server  # replaced the child, not the server

    def test_a_child_forked_for_a_start_that_dies_before_the_handover_is_replaced(
        self, monkeypatch
    ):
        """With no spare waiting, the server forks a child for the start; if that child
        dies before it is handed the start, the server forks another: the start succeeds,
        and the server is not taken for dead. The server's test hook kills the first such
        child and waits for its end before the handover."""
        monkeypatch.setenv("GIPC_FORKSERVER_TEST_DOOMED", "1")
        with _own_server():
            first = gipc.start_process(noop, start_method="forkserver")
            first.join()  # on its word: it may still be tearing down its address space
            server = _forkserver.server_pid()
            assert server is not None
            spare = _wait_spare(server, not_pids={first.pid})
            os.kill(spare, signal.SIGKILL)  # no spare: the next start forks its child
            _wait_ended(spare)
            p = gipc.start_process(exit_with, args=(7,), start_method="forkserver")
            p.join(10)
            assert p.exitcode == 7
            assert _forkserver.server_pid() == server

    def test_the_next_spare_is_forked_when_the_started_child_has_ended(self, monkeypatch):
        """Not while the child runs: the fork would compete with it and with the caller
        for the CPUs. (Here the fallback delay is long: only the child's end triggers it.)"""
        monkeypatch.setenv("GIPC_FORKSERVER_SPARE_DELAY", "60")
        with _own_server():
            with gipc.pipe() as (reader, writer):
                p = gipc.start_process(exit_big_when_told, args=(reader, 0),
                                       start_method="forkserver")
                server = _forkserver.server_pid()
                assert server is not None
                time.sleep(0.3)
                waiting = [pid for pid in _server_children(server) if pid != p.pid]
                assert waiting == [], "a spare was forked while the child ran"
                writer.put(None)
                p.join(10)
            assert p.exitcode == 0
            _wait_spare(server, not_pids={p.pid})

    def test_a_child_forked_for_its_start_holds_nothing_of_the_server(self, monkeypatch):
        """A start that finds no spare (another start just took it) gets a child forked
        there and then, while the server holds the request's descriptors and its spares':
        none of them goes on into the child (a pipe end the child closes must read EOF)."""
        monkeypatch.setenv("GIPC_FORKSERVER_SPARE_DELAY", "60")
        with _own_server():
            with gipc.pipe() as (hold_r, hold_w):
                taker = gipc.start_process(wait_for_word, args=(hold_r,),
                                           start_method="forkserver")
                with gipc.pipe() as (r, w):
                    p = gipc.start_process(report_state, args=(w,), start_method="forkserver")
                    state = r.get(timeout=30)
                    p.join(30)
                hold_w.put(None)
                taker.join(30)
            assert p.exitcode == 0 and taker.exitcode == 0
            channels = {
                fd: what
                for fd, what in state["fds"].items()
                if fd not in state["own"] and what.startswith(("pipe:", "socket:", "anon_inode:"))
            }
            assert len(channels) == 2, state["fds"]  # its parent sentinel, its status socket

    def test_a_signal_sent_before_the_child_reset_its_dispositions_waits_for_them(
        self, monkeypatch
    ):
        """The server ignores SIGINT; a child it forks has the server's dispositions until
        its start-up code puts the defaults back. It is forked with every signal blocked,
        so that an interrupt() in that window is delivered afterwards, to the default
        action. (A preloaded module makes every fork sleep 0.3 s: the window is open.)"""
        monkeypatch.setenv("GIPC_FORKSERVER_SPARE_DELAY", "60")
        monkeypatch.setattr(_forkserver, "_preload", ["slow_forked_start"])
        with _own_server():
            with gipc.pipe() as (hold_r, hold_w):
                taker = gipc.start_process(wait_for_word, args=(hold_r,),
                                           start_method="forkserver")
                p = gipc.start_process(sleep_for, args=(30,), start_method="forkserver")
                p.interrupt()
                p.join(30)
                hold_w.put(None)
                taker.join(30)
            assert p.exitcode == -signal.SIGINT

    def test_an_offer_closed_in_place_is_passed_over(self):
        """What an exception from a signal handler left in the caller's record of the
        server's offers, between closing an older offer and recording the new one (the
        code now replaces first, then closes): a closed offer. The next start raised
        ValueError (a descriptor of -1); it asks the server instead."""
        with _own_server():
            gipc.start_process(noop, start_method="forkserver").join()
            server = _forkserver._current_server()
            deadline = time.monotonic() + 10
            while server._offer is None and time.monotonic() < deadline:
                gevent.sleep(0.01)
                server.alive()  # reads the offers that came
            assert server._offer is not None, "no spare offered"
            server._offer.close()
            p = gipc.start_process(exit_with, args=(4,), start_method="forkserver")
            p.join(30)
            assert p.exitcode == 4

    @pytest.mark.parametrize("module", ["exiting_preload", "interrupting_preload"])
    def test_a_preload_that_ends_its_import_abruptly_is_skipped(self, monkeypatch, module):
        """"A module that fails to import is skipped": also one whose import raises
        SystemExit or KeyboardInterrupt. They ended the server, and every start after that
        (and after each restart) failed with "died before starting the child"."""
        monkeypatch.setattr(_forkserver, "_preload", [module])
        with _own_server():
            servers = set()
            for _ in range(2):
                p = gipc.start_process(exit_with, args=(5,), start_method="forkserver")
                p.join(30)
                assert p.exitcode == 5
                servers.add(_forkserver.server_pid())
            assert len(servers) == 1, "the server died and was started again"

    def test_a_server_closed_while_it_is_busy_is_killed_and_reaped(self, monkeypatch):
        """A closed server ends when it sees its socket closed; one that is busy
        meanwhile (a preload that takes a minute, ``stuck_server_start``) is killed after
        a grace and reaped: neither a server nor a zombie is left behind."""
        monkeypatch.setattr(_forkserver, "_preload", ["stuck_server_start"])
        with _own_server():
            server = _forkserver._current_server()
            server.close()
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{server.pid}") and time.monotonic() < deadline:
                gevent.sleep(0.05)  # (the reaping greenlet runs meanwhile)
            assert not os.path.exists(f"/proc/{server.pid}"), "the closed server is left"

    def test_the_caller_s_loop_runs_while_a_new_server_starts(self, monkeypatch):
        """The first start launches the server and never waits for it synchronously: with
        a server whose start takes a second longer (its preload, ``slow_server_start``),
        that start takes the second, and the caller's greenlets run all along."""
        monkeypatch.setattr(_forkserver, "_preload", ["slow_server_start"])
        with _own_server():
            ticker = Ticker()
            try:
                started = time.monotonic()
                p = gipc.start_process(noop, start_method="forkserver")
                p.join(30)
                took = time.monotonic() - started
            finally:
                ticker.stop()
            assert p.exitcode == 0
            assert took >= 1.0, "the server started before its preload was imported"
            # Blocked, the loop would not have run for a second.
            assert ticker.max_gap < 0.5 and ticker.ticks > 50, (ticker.max_gap, ticker.ticks)

    def test_offers_cut_short_by_the_descriptor_limit_leave_later_starts_whole(self):
        """At its limit of open descriptors, the caller receives the server's next offer
        without its descriptors (MSG_CTRUNC): that offer is dropped, and every start after
        the limit is raised again works, with no descriptor left behind. (The offers'
        descriptors went out of step with their messages: every other start failed.)"""
        result = run_python(
            """
            import os, resource, sys, gevent, gipc
            def start(code):
                p = gipc.start_process(sys.exit, args=(code,), start_method="forkserver")
                p.join(10)
                return p.exitcode
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            start(0)
            gevent.sleep(0.05)
            used = {int(fd) for fd in os.listdir("/proc/self/fd")}
            limit, free = 0, 0
            while free < 6:  # room for a start's own descriptors, not for the next offer
                free += limit not in used
                limit += 1
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
            start(5)
            gevent.sleep(0.05)  # the next offer arrives meanwhile, cut short
            try:
                start(5)
            except gipc.GIPCError:
                pass
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            codes, counts = [], set()
            for _ in range(4):
                gevent.sleep(0.05)
                codes.append(start(6))
                counts.add(len(os.listdir("/proc/self/fd")))
            print(codes, len(counts))
            """
        )
        assert result.stdout.strip().splitlines()[-1:] == ["[6, 6, 6, 6] 1"], (
            result.stdout + result.stderr
        )

    def test_threads_whose_first_starts_meet_share_one_server(self, monkeypatch):
        """Two OS threads start their first fork-server child at once: one server starts
        (a second would be lost, with its descriptor). The first start is held inside the
        server's start-up until the other thread has surely asked too."""
        real = _forkserver._Server
        made = []

        class SlowToStart(real):  # type: ignore[misc, valid-type]
            def __init__(self) -> None:
                made.append(self)
                time.sleep(0.3)
                super().__init__()

        _drop_server()  # this test starts from no server
        monkeypatch.setattr(_forkserver, "_Server", SlowToStart)
        codes = []

        def start(code: int) -> None:
            try:
                p = gipc.start_process(exit_with, args=(code,), start_method="forkserver")
                p.join()
                codes.append(p.exitcode)
            finally:
                gevent.get_hub().destroy(destroy_loop=True)  # the thread's own hub

        threads = [threading.Thread(target=start, args=(code,)) for code in (3, 4)]
        for thread in threads:
            thread.start()
            time.sleep(0.05)
        for thread in threads:
            thread.join(30)
        assert sorted(codes) == [3, 4]
        assert len(made) == 1

    def test_a_forked_child_does_not_share_its_parent_s_server(self):
        gipc.start_process(noop, start_method="forkserver").join()
        fd = _forkserver._server.sock.fileno()
        PARENT_SERVER_SOCKET[fd] = os.readlink(f"/proc/self/fd/{fd}")
        with gipc.pipe() as (r, w):
            p = gipc.start_process(start_via_server_and_report, args=(w,), start_method="fork")
            theirs, inherited_open = r.get()
            p.join()
        assert p.exitcode == 0
        assert theirs not in (None, _forkserver.server_pid())
        assert not inherited_open

    def test_a_child_has_the_caller_s_resource_limits_as_they_are_now(self, tmp_path):
        """The server keeps the limits its caller had when it started; a child it forks
        takes the caller's current ones, as a forked or spawned child has them."""
        script = tmp_path / "limits.py"
        script.write_text(
            textwrap.dedent(
                """
            import resource, gipc

            def report(writer):
                writer.put([resource.getrlimit(r) for r in
                            (resource.RLIMIT_NOFILE, resource.RLIMIT_CORE)])

            def child_limits():
                with gipc.pipe() as (r, w):
                    p = gipc.start_process(report, (w,), start_method="forkserver")
                    limits = r.get(timeout=20)
                    p.join(20)
                return limits

            if __name__ == "__main__":
                child_limits()  # the server starts with the limits as they are
                soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft - 7, hard))
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
                print(child_limits() == [(soft - 7, hard), (0, 0)])
            """
            )
        )
        result = run_script(str(script))
        assert result.stdout.strip() == "True", result.stdout + result.stderr

    def test_a_child_has_the_caller_s_umask_and_nice_value_as_they_are_now(self, tmp_path):
        """The same for the file mode creation mask and the nice value (the server kept
        those it started with; the nice value can only grow without privileges)."""
        script = tmp_path / "state.py"
        script.write_text(
            textwrap.dedent(
                """
            import os, gipc

            def report(writer):
                mask = os.umask(0)
                writer.put((mask, os.getpriority(os.PRIO_PROCESS, 0)))

            def child_state():
                with gipc.pipe() as (r, w):
                    p = gipc.start_process(report, (w,), start_method="forkserver")
                    state = r.get(timeout=20)
                    p.join(20)
                return state

            if __name__ == "__main__":
                os.umask(0o022)
                child_state()  # the server starts with these
                os.umask(0o077)
                nice = os.nice(2)
                print(child_state() == (0o077, nice), child_state(), nice)
            """
            )
        )
        result = run_script(str(script))
        assert result.stdout.split()[0] == "True", result.stdout + result.stderr

    def test_nobody_else_can_reach_the_server(self):
        """It has no address: none of its descriptors is a listening socket or a socket
        with a name (path or abstract) that another process could connect to, and its
        only socket's other end is this process's."""
        gipc.start_process(noop, start_method="forkserver").join()
        server = _forkserver.server_pid()
        assert server is not None
        inodes = set()
        for fd in os.listdir(f"/proc/{server}/fd"):
            try:
                target = os.readlink(f"/proc/{server}/fd/{fd}")
            except OSError:  # closed meanwhile (a spare's socket, once the spare reported)
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
        assert inodes, "the server holds its control socket"
        with open("/proc/net/unix") as table:
            next(table)
            for line in table:
                fields = line.split()
                if fields[6] in inodes:
                    flags, path = int(fields[3], 16), fields[7:]
                    assert not flags & 0x10000, "a listening socket"  # __SO_ACCEPTCON
                    assert path == [], f"a named socket: {path}"
        # An unrelated process of the same user tries what the file system offers: opening
        # each of the server's own descriptors through /proc (a socket cannot be opened
        # so) and writing a start request into whatever opens. The server starts nothing.
        # (Not its standard streams, which it shares with this process and the runner.)
        before = child_pids(of=server)
        attempt = run_python(
            f"""
            import os, pickle, struct
            from gipc._forkserver import _framed
            request = _framed(("start", b"", 0))
            results = []
            for fd in sorted(os.listdir("/proc/{server}/fd"), key=int):
                if int(fd) <= 2:
                    continue
                path = f"/proc/{server}/fd/{{fd}}"
                try:
                    target = os.readlink(path)
                    f = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                except OSError as exc:
                    results.append((fd, "refused"))
                    continue
                try:
                    os.write(f, request)
                    results.append((fd, "written: " + target))
                except OSError:
                    results.append((fd, "refused"))
                finally:
                    os.close(f)
            print(results)
            """
        )
        assert attempt.returncode == 0, attempt.stderr
        assert "written: socket" not in attempt.stdout, attempt.stdout
        assert "refused" in attempt.stdout, attempt.stdout  # its sockets, at least
        time.sleep(0.3)
        assert not child_pids(of=server) - before, "the server started something"
        assert _forkserver.server_pid() == server
        gipc.start_process(noop, start_method="forkserver").join()  # and serves on

    def test_a_start_interrupted_before_the_server_answered_leaves_its_spare_alone(
        self, monkeypatch
    ):
        """A start sent to the server before the caller read the server's latest offer may
        be answered with that offered spare. Interrupted (a timeout, a kill) before that
        answer, it must not let the next start hand the same spare its own request: the
        spare runs the one it reads first, and the other start's child never runs (its
        join hangs, or reports the other's exit). Here a preloaded module makes the server
        pause around the offer and every child it forks slow to read its request, and the
        next start's hand-over to the spare is late (in the wild: another CPU's timing)."""
        monkeypatch.setenv("GIPC_FORKSERVER_SPARE_DELAY", "60")
        monkeypatch.setattr(_forkserver, "_preload", ["slow_offers"])
        real_hand_over = _forkserver._Offer.hand_over

        def late_hand_over(offer, fds):  # type: ignore[no-untyped-def]
            gevent.sleep(0.6)  # the server answers the interrupted start meanwhile
            return real_hand_over(offer, fds)

        monkeypatch.setattr(_forkserver._Offer, "hand_over", late_hand_over)
        with _own_server():
            first = gipc.start_process(exit_unless_offers_slowed, start_method="forkserver")
            first.join(30)
            # A preload that fails is skipped silently: without the pause there is no window.
            assert first.exitcode == 0, "slow_offers did not patch the server's _offer"
            server = _forkserver.server_pid()
            assert server is not None
            # Forked once the first child ended; its offer comes after the server's pause.
            _wait_spare(server, not_pids={first.pid})
            interrupted = gevent.spawn(
                gipc.start_process, exit_with, args=(99,), start_method="forkserver"
            )
            gevent.sleep(0.05)  # its request is on its way, sent before the offer
            assert not interrupted.ready()
            deadline = time.monotonic() + 10
            while _forkserver._server._offer is None:  # the offer arrives
                assert time.monotonic() < deadline, "no offer came"
                assert _forkserver._server.alive()
                gevent.sleep(0.01)
            interrupted.kill()  # before the server (pausing) has answered it
            assert isinstance(interrupted.value, gevent.GreenletExit)
            p = gipc.start_process(exit_with, args=(7,), start_method="forkserver")
            p.join(30)
            assert p.exitcode == 7
            # The interrupted start's answer came: offers are used again.
            assert not _forkserver._server._asking

    def test_the_server_keeps_no_status_socket_for_a_child_that_has_ended(self, monkeypatch):
        """The caller's word that it handed a spare a start ("used", with the start's status
        socket) naming a child the server had handed a start itself and has reaped (what a
        spare given two requests leaves behind): the socket gets that child's REAPED record
        and its end at once, not a place in the server for ever."""
        monkeypatch.setattr(_forkserver._Server, "take_offer", lambda self, start: None)
        p = gipc.start_process(exit_with, args=(3,), start_method="forkserver")
        p.join(30)
        assert p.exitcode == 3
        wait_gone(p.pid)  # reaped by the server
        assert _said_used(p.pid) == [(_forkserver.REAPED, 3 << 8)]

    def test_a_second_word_for_a_running_child_leaves_both_joins_an_end(self, monkeypatch):
        """The same word naming a child the server handed a start itself, still running: a
        second status socket for one child. The child's own start still hears its end (it
        dies by a signal here: no word of its own, only the server's REAPED), and so does
        the second socket; the server keeps neither."""
        monkeypatch.setattr(_forkserver._Server, "take_offer", lambda self, start: None)
        p = gipc.start_process(sleep_for, args=(30,), start_method="forkserver")
        told = gevent.spawn(_said_used, p.pid)
        gevent.sleep(0.2)  # the server has the word
        p.kill()
        p.join(10)
        assert p.exitcode == -signal.SIGKILL
        assert told.get(timeout=10) == [(_forkserver.REAPED, signal.SIGKILL)]


#: Kept by exit_big_when_told until the process ends: its teardown takes a while.
_BALLAST = []


def exit_big_when_told(reader: "gipc.gipc._GIPCHandle", code: int, hold: object = None) -> None:
    reader.get()
    ballast = bytearray(256 << 20)
    ballast[::4096] = b"\x01" * len(range(0, len(ballast), 4096))  # every page resident
    _BALLAST.append(ballast)
    sys.exit(code)


def exit_with_length(blob: bytes) -> None:
    sys.exit(len(blob) % 256)


def wait_for_word(reader: "gipc.gipc._GIPCHandle") -> None:
    reader.get()


def exit_unless_offers_slowed() -> None:
    """In a child of a fork server that preloaded ``slow_offers``: exit code 0 if the
    server's offers go through that module's pause (its patch replaced the function the
    server's loop calls), else 1."""
    from gipc import _forkserver_main

    slow = sys.modules.get("slow_offers")
    sys.exit(0 if slow is not None and _forkserver_main._offer is slow._slow_offer else 1)


def exit_with_after(code: int, seconds: float) -> None:
    time.sleep(seconds)
    sys.exit(code)


def start_via_server_and_report(writer: "gipc.gipc._GIPCHandle") -> None:
    """In a forked child: the parent's server socket is not ours, and a start here gets a
    server of our own."""
    from gipc import _forkserver as fs

    assert fs._server is None  # forgotten at the fork
    inherited_open = any(
        os.readlink(f"/proc/self/fd/{fd}") == link for fd, link in PARENT_SERVER_SOCKET.items()
        if os.path.exists(f"/proc/self/fd/{fd}")
    )
    gipc.start_process(noop, start_method="forkserver").join()
    writer.put((fs.server_pid(), inherited_open))


#: Set by the test before it forks: the caller's control socket (descriptor -> inode).
PARENT_SERVER_SOCKET: dict = {}


def _state(pid: int) -> "tuple[str, int] | None":
    """(state letter, parent pid) of ``pid`` from /proc, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _said_used(pid: int) -> "list[tuple[int, int]]":
    """Tells this process's fork server that a start was handed its child ``pid`` (the
    caller's "used"), with a new status socket; the records that socket gets until the
    server closes it (failing after 10 seconds)."""
    ours, theirs = _forkserver._socketpair()
    try:
        _forkserver._server.send(("used", pid), [theirs.fileno()])
        theirs.close()
        received = b""
        deadline = time.monotonic() + 10
        ours.setblocking(False)
        while True:
            try:
                data = ours.recv(64)
            except BlockingIOError:
                assert time.monotonic() < deadline, f"the server keeps it: {received!r}"
                gevent.sleep(0.01)
                continue
            if not data:
                break
            received += data
        return [
            _forkserver._RECORD.unpack_from(received, offset)
            for offset in range(0, len(received), _forkserver._RECORD.size)
        ]
    finally:
        theirs.close()
        ours.close()


def _wait_spare(server: int, not_pids: "set[int]") -> int:
    """The fork server's waiting child (forked just after the last start was handed over)."""
    for _ in range(200):
        spares = [
            int(entry) for entry in os.listdir("/proc")
            if entry.isdigit() and int(entry) not in not_pids
            and (_state(int(entry)) or ("Z", 0))[1] == server
            and (_state(int(entry)) or ("Z", 0))[0] != "Z"
        ]
        if len(spares) == 1:
            return spares[0]
        assert len(spares) < 2, spares
        time.sleep(0.01)
    pytest.fail(f"the fork server {server} has no child waiting")


def _server_children(server: int) -> "list[int]":
    """The fork server's live children (not zombies)."""
    return [
        int(entry) for entry in os.listdir("/proc")
        if entry.isdigit() and (_state(int(entry)) or ("Z", 0))[1] == server
        and (_state(int(entry)) or ("Z", 0))[0] != "Z"
    ]


def _wait_ended(pid: int) -> None:
    """Gone, or a zombie (an orphan's reaper is not ours to wait for)."""
    for _ in range(200):
        state = _state(pid)
        if state is None or state[0] in ("Z", "X"):
            return
        time.sleep(0.05)
    pytest.fail(f"process {pid} is still running")


def start_grandchild_then_die(seconds: float) -> None:
    """Starts a forked grandchild that outlives us, then dies by a signal (no exit report
    written)."""
    gipc.start_process(time.sleep, args=(seconds,), start_method="fork")
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("method", ["fork", *NON_FORK])
@pytest.mark.parametrize("duplex", [False, True])
def test_a_handle_kept_as_an_attribute_is_closed_in_the_child_and_stays_here(method, duplex):
    # Only handles in args/kwargs (and containers in them) are passed; one kept inside
    # another object is closed in the child, as a forked child has it, and stays the
    # caller's, whatever the start method.
    if duplex:
        kept, other_end = gipc.pipe(duplex=True)
    else:
        other_end, kept = gipc.pipe()
    with gipc.pipe() as (r, w):
        p = gipc.start_process(report_kept, args=(Box(kept), w), start_method=method)
        assert r.get(timeout=30) == (type(kept).__name__, True)
        p.join()
    assert p.exitcode == 0 and not kept.closed
    kept.put("still ours")
    assert other_end.get(timeout=5) == "still ours"
    kept.close()
    other_end.close()


@pytest.mark.parametrize("method", ["fork", *NON_FORK])
def test_join_does_not_wait_for_a_grandchild_without_pidfd(method, monkeypatch):
    """Without a pidfd (macOS, old Linux) a child is watched on its sentinel: a grandchild
    must not hold the child's exit report open, or join() waits for the grandchild too."""
    from gipc import _popen

    monkeypatch.setattr(_popen, "start_pidfd", lambda start_fds, pid: None)  # fork, spawn
    monkeypatch.setattr(_popen, "open_pidfd", lambda pid: None)  # the fork server's spares
    started = time.monotonic()
    p = gipc.start_process(start_grandchild_then_die, args=(3,), start_method=method)
    p.join(10)
    assert p.exitcode == -signal.SIGKILL
    assert time.monotonic() - started < 2.5


MAIN_MODULE = """
import os, sys, gipc

def work(writer):
    writer.put((__name__, os.getpid()))

if __name__ == "__main__":
    with gipc.pipe() as (r, w):
        p = gipc.start_process(work, args=(w,), start_method=sys.argv[1])
        print(*r.get())
        p.join()
    sys.exit(p.exitcode)
"""


def _run_main(tmp_path, method, how):
    import subprocess

    package = tmp_path / "app"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "main.py").write_text(MAIN_MODULE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    if how == "module":
        command = [sys.executable, "-m", "app.main", method]
    else:
        command = [sys.executable, str(package / "main.py"), method]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env,
                          cwd=tmp_path)


@pytest.mark.parametrize("how", ["script", "module"])
@pytest.mark.parametrize("method", NON_FORK)
def test_the_main_module_is_imported_in_the_child_as_mp_main(tmp_path, method, how):
    result = _run_main(tmp_path, method, how)
    assert result.returncode == 0, result.stderr
    name, pid = result.stdout.split()
    assert name == "__mp_main__"


MAIN_SCRIPT_AS_SEEN = """
import multiprocessing, os, sys, gipc

VERSION = 1

def describe(writer):
    main = sys.modules["__main__"]
    seen = {k: repr(v) for k, v in vars(main).items() if k.startswith("__") and k != "__builtins__"}
    seen["__builtins__"] = type(vars(main)["__builtins__"]).__name__
    seen["same module"] = sys.modules["__mp_main__"] is main
    seen["VERSION"] = VERSION
    seen["opened the script"] = sys.main_script_opens.count(os.getpid())
    writer.send(seen)

if __name__ == "__main__":
    r, w = multiprocessing.Pipe(duplex=False)  # what both kinds of child take
    ours, method, *options = sys.argv[1].split("-")
    if "preload" not in options:
        # gipc's fork server imports the main module once, at its start, for its children
        # to find (test_the_fork_server_imports_the_main_module_once), and so does
        # multiprocessing's from CPython 3.13.8 and 3.14.1; here each child of either kind
        # imports it.
        gipc.set_forkserver_preload([])
        if ours == "mp" and method == "forkserver":
            multiprocessing.get_context("forkserver").set_forkserver_preload([])

    def start():
        if ours == "gipc":
            return gipc.start_process(describe, args=(w,), start_method=method)
        p = multiprocessing.get_context(method).Process(target=describe, args=(w,))
        p.start()
        return p

    p = start()
    first = r.recv()
    p.join()
    # The script changes on disk: the next child runs it as it is now, as with
    # multiprocessing (whose child reads the script at its start).
    with open(__file__) as f:
        source = f.read()
    if "samesize" in options:
        # As `cp -p`, `rsync -t` or a package manager may leave it: another script of the
        # same size and modification time.
        before = os.stat(__file__)
        with open(__file__, "w") as f:
            f.write(source.replace("VERSION = 1", "VERSION = 2"))
        os.utime(__file__, ns=(before.st_atime_ns, before.st_mtime_ns))
    else:
        with open(__file__, "w") as f:
            f.write(source.replace("VERSION = 1", "VERSION = 2  # edited"))
    p = start()
    second = r.recv()
    p.join()
    print(repr((first, second)))
"""

#: On the path first: every interpreter counts the opens of the main script (audit events).
OPEN_COUNTER = """
import os, sys
_script = os.environ.get("GIPC_TEST_MAIN_SCRIPT")
if _script:
    sys.main_script_opens = []  # by pid: a fork server's child inherits the server's
    def _count(event, args):
        if event == "open" and args and args[0] == _script:
            sys.main_script_opens.append(os.getpid())
    sys.addaudithook(_count)
"""


def _run_with_sitecustomize(script, sitecustomize, *args, env_extra=None, flags=()):
    """Runs ``script`` in a fresh interpreter (with ``flags``) that finds ``sitecustomize``
    (its source) first on its path, as every interpreter it starts does; its output
    evaluated as a Python literal, which must not be None (what the scripts print when their
    child died before it reported)."""
    import ast

    site = script.parent / "site"
    site.mkdir(parents=True)
    (site / "sitecustomize.py").write_text(sitecustomize)
    env = {"PYTHONPATH": os.pathsep.join([str(site), *sys.path]), **(env_extra or {})}
    result = run_script(str(script), *args, env_extra=env, flags=tuple(flags))
    assert result.returncode == 0, result.stderr
    value = ast.literal_eval(result.stdout.strip())
    assert value is not None, result.stderr
    return value


def _what_children_saw_of_main(script, how, flags=()):
    """MAIN_SCRIPT_AS_SEEN written to ``script`` and run as ``how`` ("mp-spawn",
    "gipc-forkserver", "gipc-spawn-samesize"...) by an interpreter with ``flags``: what
    each of its two children saw of the main module, and how often it opened the script."""
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(MAIN_SCRIPT_AS_SEEN)
    return _run_with_sitecustomize(script, OPEN_COUNTER, how, flags=flags,
                                   env_extra={"GIPC_TEST_MAIN_SCRIPT": str(script)})


@pytest.mark.parametrize("method", NON_FORK)
def test_a_child_runs_the_main_script_compiled_once_by_its_caller(tmp_path, method):
    """multiprocessing's spawn child reads and compiles the main script (a script has no
    .pyc: ~1 ms per 200 lines, per child); gipc's runs the code its caller compiled, as
    the script is when the child starts, and its ``__mp_main__`` is the module
    multiprocessing's child of the same method gets."""
    mp_first, mp_second = _what_children_saw_of_main(tmp_path / "mp" / "main.py", f"mp-{method}")
    first, second = _what_children_saw_of_main(tmp_path / "gipc" / "main.py", f"gipc-{method}")
    assert mp_first["opened the script"] > 0  # the counter sees multiprocessing's reads
    assert first["opened the script"] == second["opened the script"] == 0
    versions = (first["VERSION"], second["VERSION"])
    assert versions == (mp_first["VERSION"], mp_second["VERSION"]) == (1, 2)
    for seen in (mp_first, first):
        del seen["opened the script"], seen["VERSION"]
    assert first == {k: v.replace("/mp/", "/gipc/") if isinstance(v, str) else v
                     for k, v in mp_first.items()}


@pytest.mark.parametrize("method", NON_FORK)
def test_a_script_changed_to_one_of_the_same_size_and_time_is_run_as_it_is_now(tmp_path, method):
    """The caller's compiled script is used only for the very bytes it was compiled from:
    a copy that kept the size and modification time of the script it replaced is compiled
    anew."""
    first, second = _what_children_saw_of_main(tmp_path / "main.py", f"gipc-{method}-samesize")
    assert (first["VERSION"], second["VERSION"]) == (1, 2)
    assert first["opened the script"] == second["opened the script"] == 0


@pytest.mark.parametrize("method", NON_FORK)
def test_a_child_whose_interpreter_options_differ_compiles_the_script_itself(tmp_path, method):
    """Code compiled under the caller's options (-O, -X no_debug_ranges,
    int_max_str_digits...) is not run by a child started without them: an ``-X`` option
    multiprocessing does not pass on, here, and the child reads the script as
    multiprocessing's does."""
    first, second = _what_children_saw_of_main(
        tmp_path / "main.py", f"gipc-{method}", flags=["-X", "gipc_test_option"]
    )
    assert first["opened the script"] > 0 and second["opened the script"] > 0
    assert (first["VERSION"], second["VERSION"]) == (1, 2)


def test_a_main_script_that_is_not_a_regular_file_is_left_to_the_child(tmp_path):
    """A FIFO (or a device) as the main script: reading it in the caller would block its
    loop until someone writes; the child reads it itself, as multiprocessing's does."""
    from gipc import _startup

    fifo = tmp_path / "main.py"
    os.mkfifo(fifo)
    answer = []
    reader = threading.Thread(target=lambda: answer.append(_startup.main_code(str(fifo))),
                              daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # blocked in open(): let it go, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5)
        pytest.fail("main_code() waited on a FIFO")
    assert answer == [None]


def test_the_fork_server_imports_the_main_module_once(tmp_path):
    """The fork server imports the caller's main module at its start (the default preload,
    as multiprocessing documents for its own fork server, whose code before CPython 3.13.8
    and 3.14.1 looked for a key its preparation data does not have, and never did it): its
    children find it imported, as it was when the server started."""
    script = tmp_path / "main.py"
    first, second = _what_children_saw_of_main(script, "gipc-forkserver-preload")
    assert first["opened the script"] == second["opened the script"] == 0
    assert first["VERSION"] == second["VERSION"] == 1
    assert first["__name__"] == "'__mp_main__'" and first["__file__"] == repr(str(script))


SIGNALS_AS_SEEN = """
import multiprocessing, sys, gipc

def kernel_masks(conn):
    with open("/proc/self/status") as f:
        masks = {line.split(":")[0]: int(line.split(":")[1], 16) for line in f
                 if line.startswith(("SigBlk:", "SigIgn:", "SigCgt:"))}
    conn.send(masks)

if __name__ == "__main__":
    r, w = multiprocessing.Pipe(duplex=False)
    p = gipc.start_process(kernel_masks, args=(w,), start_method=sys.argv[1])
    print(r.recv() if r.poll(30) else None)  # None: the child died (its error is on stderr)
    p.join()
"""

#: A handler installed at start-up behind Python's table (faulthandler's, by sigaction),
#: and one ignored the same way, in every interpreter that has this on its path.
HANDLERS_AT_START_UP = """
import faulthandler, signal, ctypes
faulthandler.register(signal.SIGUSR2)
libc = ctypes.CDLL(None)
libc.signal.restype = ctypes.c_void_p
libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
libc.signal(signal.SIGURG, ctypes.c_void_p(1))  # SIG_IGN, unknown to Python's table
"""


@pytest.mark.skipif(not LINUX, reason="reads /proc")
@pytest.mark.parametrize("method", NON_FORK)
def test_handlers_installed_at_the_child_s_own_start_up_are_reset_too(tmp_path, method):
    """A sitecustomize (or a .pth file) runs in every interpreter, the spawned child's too,
    and may install C handlers Python's signal table never sees: the child still starts
    with every disposition at its default (SIGPIPE aside)."""
    script = tmp_path / "main.py"
    script.write_text(SIGNALS_AS_SEEN)
    masks = _run_with_sitecustomize(script, HANDLERS_AT_START_UP, method)
    glibc_reserved = (1 << 31) | (1 << 32)  # 32 and 33: nobody may change them
    assert masks["SigCgt"] & ~glibc_reserved == 0, f"{masks['SigCgt']:#x}"
    assert masks["SigIgn"] == 1 << (signal.SIGPIPE - 1), f"{masks['SigIgn']:#x}"
    assert masks["SigBlk"] == 0


PATCH_ALL = """
from gevent import monkey
monkey.patch_all()
"""

STARTS_UNDER_PATCH_ALL = """
import sys
import time
import gipc

def answer(writer, code):
    with writer:
        writer.put(("from", code))
    sys.exit(code)

def wait_long(writer):
    with writer:
        writer.put("waiting")
    time.sleep(60)

if __name__ == "__main__":
    seen = []
    for code in (3, 4, 5):
        with gipc.pipe() as (reader, writer):
            p = gipc.start_process(answer, (writer, code), start_method=sys.argv[1])
            seen.append(reader.get(timeout=20))
            p.join(20)
            seen.append(p.exitcode)
    # One killed by a signal says nothing itself: the server must reap it and tell.
    with gipc.pipe() as (reader, writer):
        p = gipc.start_process(wait_long, (writer,), start_method=sys.argv[1])
        seen.append(reader.get(timeout=20))
        p.terminate()
        p.join(20)
        seen.append(p.exitcode)
    print(seen)
"""


@pytest.mark.parametrize("method", NON_FORK)
def test_children_start_in_a_program_whose_sitecustomize_patches_everything(tmp_path, method):
    """A sitecustomize (or .pth file) that runs gevent.monkey.patch_all() runs in every
    interpreter, the fork server's too: the server still serves and reaps (it waits, and
    catches SIGCHLD, with the system's calls, not gevent's, whose hub it never runs; it
    died at start-up, then never reaped a child)."""
    script = tmp_path / "main.py"
    script.write_text(STARTS_UNDER_PATCH_ALL)
    seen = _run_with_sitecustomize(script, PATCH_ALL, method)
    assert seen == [("from", 3), 3, ("from", 4), 4, ("from", 5), 5, "waiting", -signal.SIGTERM]


@pytest.mark.parametrize("method", NON_FORK)
def test_a_main_module_without_the_guard_gets_multiprocessing_s_explanation(tmp_path, method):
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import gipc, time\n"
        "def work():\n    pass\n"
        f"p = gipc.start_process(work, start_method={method!r})\n"
        "p.join()\n"
        "print('exit', p.exitcode)\n"
    )
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=60, env=env, cwd=tmp_path)
    assert "if __name__ == '__main__':" in result.stderr
    assert "exit 1" in result.stdout
    # multiprocessing's own RuntimeError, not a GIPCTypeError saying that the process
    # object does not pickle, with that text inside.
    assert "RuntimeError: " in result.stderr
    assert "GIPCTypeError" not in result.stderr, result.stderr


GEVENT_ON_DEMAND = """
import os, sys, time, gipc

def exit_10_if_gevent_is_loaded():
    # ... and 11 if gipc's Rust extension is: a child that passes no handle needs neither.
    sys.exit(10 if "gevent" in sys.modules else 11 if "gipc._core" in sys.modules else 0)

def say_whether_gevent_is_loaded(writer):
    writer.put("gevent" in sys.modules)

def wait_for_a_message(reader, writer):
    writer.put("gevent" in sys.modules)
    writer.put((reader.get(), "gevent" in sys.modules))

EPOLL_WAITS = {"232", "281", "441"}  # x86-64 epoll_wait, epoll_pwait, epoll_pwait2

def waiting_in_its_loop(pid):
    # The child sleeps in its event loop's epoll_wait only if its get() had to wait: seen
    # as the kernel function it sleeps in, or (where that is hidden) the system call.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/wchan") as f:
            if "epoll" in f.read():
                return True
        try:
            with open(f"/proc/{pid}/syscall") as f:
                if f.read().split(" ", 1)[0] in EPOLL_WAITS:
                    return True
        except OSError:
            pass
        time.sleep(0.005)
    return False

if __name__ == "__main__":
    assert "gevent" not in sys.modules, "import gipc imported gevent"
    assert "gipc._core" not in sys.modules, "import gipc loaded the extension"
    p = gipc.start_process(exit_10_if_gevent_is_loaded, start_method="spawn")
    p.join()
    with gipc.pipe() as (r, w):
        q = gipc.start_process(say_whether_gevent_is_loaded, args=(w,), start_method="spawn")
        loaded_after_a_put = r.get()
        q.join()
    with gipc.pipe() as (to_child, w), gipc.pipe() as (r, from_child):
        c = gipc.start_process(wait_for_a_message, args=(to_child, from_child),
                               start_method="spawn")
        loaded_before_waiting = r.get()
        waited = waiting_in_its_loop(c.pid)
        w.put("hello")
        received, loaded_after_waiting = r.get()
        c.join()
    print(p.exitcode, loaded_after_a_put, q.exitcode, loaded_before_waiting, waited,
          received, loaded_after_waiting, c.exitcode)
"""


def test_a_spawned_child_imports_gevent_only_when_it_needs_it(tmp_path):
    """Most of a fresh interpreter's start-up is imports, and gevent is the largest: a
    spawned child imports it only when something must wait. A child whose target needs
    neither gevent nor a handle does without (and without gipc's extension); so does one
    handed a writer it puts to without waiting; a child handed a reader imports gevent as
    its get() first waits, and the wait works."""
    import subprocess

    script = tmp_path / "on_demand.py"
    script.write_text(GEVENT_ON_DEMAND)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=90, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "False", "0", "False", "True", "hello", "True", "0"], (
        result.stdout
    )


#: Set by the test in this process only: a forked worker sees it, a spawned or fork-server
#: worker (which imported this module afresh) does not.
MARKS: list = []


def where_am_i(_: int) -> tuple:
    return len(MARKS), os.getppid()


@pytest.mark.parametrize("method", ["fork", *NON_FORK])
def test_a_pool_starts_its_workers_with_its_start_method(method):
    MARKS.append(method)
    try:
        with gipc.ProcessPool(2, start_method=method) as pool:
            seen = set(pool.map(where_am_i, range(20)))
            assert sum(pool.map(abs, range(-100, 0))) == 5050
    finally:
        MARKS.clear()
    marks = {mark for mark, _ in seen}
    parents = {parent for _, parent in seen}
    assert marks == ({1} if method == "fork" else {0}), seen
    expected_parent = _forkserver.server_pid() if method == "forkserver" else os.getpid()
    assert parents == {expected_parent}, seen


@pytest.mark.parametrize("method", NON_FORK)
def test_a_pool_refuses_what_its_workers_could_not_receive(method):
    with pytest.raises(gipc.GIPCTypeError, match="initializer must be picklable"):
        gipc.ProcessPool(1, initializer=lambda: None, start_method=method)
    with pytest.raises(gipc.GIPCTypeError, match="decoder must be picklable"):
        gipc.ProcessPool(1, decoder=lambda b: b, start_method=method)
    with pytest.raises(ValueError, match="contradicts"):
        gipc.ProcessPool(1, start_method="fork", mp_context=multiprocessing.get_context("spawn"))


@pytest.mark.skipif(not LINUX, reason="F_GETPIPE_SZ")
class TestFeeder:
    """The start-up data writer, alone: what the pipe takes is written at once, the rest
    (or held-back bytes the pipe cannot take when released) by a thread."""

    @staticmethod
    def _pipe():
        """A pipe's two ends and its capacity."""
        r, w = os.pipe()
        try:
            return r, w, pipe_capacity(w)
        except BaseException:
            os.close(w)
            os.close(r)
            raise

    def _feed(self, monkeypatch, size_beyond_pipe: int, hold_back: int, fill_first: bool):
        from gipc import _startup

        threads = []
        real = _startup._start_new_thread

        def counting(function, args):
            threads.append(function)
            return real(function, args)

        monkeypatch.setattr(_startup, "_start_new_thread", counting)
        r, w, capacity = self._pipe()
        try:
            data = os.urandom(capacity + size_beyond_pipe)
            feeder = _startup.Feeder(w, data, hold_back=hold_back)
            feeder.start()
            started_before_release = len(threads)
            if not fill_first:
                first = os.read(r, capacity)  # room for the held-back bytes
            else:
                first = b""
            feeder.release()
            os.set_blocking(r, True)
            received = bytearray(first)
            while True:
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break  # the feeder closed its end: all written
                received += chunk
            return bytes(received) == data, started_before_release, len(threads)
        finally:
            os.close(r)

    def test_held_back_bytes_the_pipe_takes_at_release_need_no_thread(self, monkeypatch):
        assert self._feed(monkeypatch, 1, hold_back=1, fill_first=False) == (True, 0, 0)

    def test_held_back_bytes_a_full_pipe_refuses_at_release_go_from_a_thread(self, monkeypatch):
        # The pipe is full when release() comes: the last byte cannot wait in the caller
        # (it never waits for the child), so a thread writes it as the reader drains.
        assert self._feed(monkeypatch, 1, hold_back=1, fill_first=True) == (True, 0, 1)

    def test_more_than_the_pipe_takes_goes_from_a_thread_at_once(self, monkeypatch):
        assert self._feed(monkeypatch, 4096, hold_back=1, fill_first=True) == (True, 1, 1)

    def test_a_thread_that_fails_closes_the_pipe(self, monkeypatch):
        # Whatever goes wrong in the thread (here: no poll object), the descriptor is
        # closed: the child reads a torn start-up and exits, it does not wait for ever.
        from gipc import _startup

        done = threading.Event()
        failures = []
        real = _startup._start_new_thread

        def failing_poll():
            raise OSError("no poll here")

        def run_then_signal(function, args):
            def wrapped():
                try:
                    function(*args)
                except OSError as error:
                    failures.append(error)
                finally:
                    done.set()

            return real(wrapped, ())

        monkeypatch.setattr(_startup, "_original_poll", lambda: failing_poll)
        monkeypatch.setattr(_startup, "_start_new_thread", run_then_signal)
        r, w, capacity = self._pipe()
        try:
            feeder = _startup.Feeder(w, b"x" * (capacity * 2))
            feeder.start()
            assert done.wait(10)
            assert [str(e) for e in failures] == ["no poll here"]
            assert feeder.fd == -1
            while os.read(r, 1 << 16):
                pass  # what was written before; then EOF: the write end is closed
        finally:
            os.close(r)
