"""gipc.ProcessPool when things go wrong around its workers (issue 11): a worker lost
between two sends, tasks held behind a long one while a worker is free, an interrupt in
the pool's own greenlets, a worker lost while starting, timeouts gevent cannot represent.

Every window is opened on purpose: tasks wait for files the test creates, the hub is held
(no greenlet runs) while a worker dies, fork fails or the child is killed from an at-fork
hook. Where tasks must run at the same time, they wait for each other, with a generous
bound, rather than being timed."""

from __future__ import annotations

import errno
import os
import signal
import time

import gevent
import gipc.pool
import gipc.pool._pool
import gipc.pool._worker
import pytest
from gipc.pool import BrokenProcessPool, ProcessPool, WorkerCrashed
from helpers import run_python

# --- Task functions (module level, so they pickle by reference) ---------------------------

#: How long a task waits for a file the test (or another task) is to create.
PATIENCE = 15.0


def square(x):
    return x * x


def pid_of_worker(_=None):
    return os.getpid()


def wait_for(path, patience=PATIENCE):
    deadline = time.monotonic() + patience
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def record(path, value):
    with open(path, "a") as f:
        f.write(f"{value}\n")


def record_run(path, value):
    record(path, value)
    return value


def wait_then_record(gate, path, value):
    assert wait_for(gate)
    return record_run(path, value)


def record_then_die(path, value):
    record(path, value)
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)


def meet(directory, me, partner):
    """Says it runs, then waits until ``partner`` runs too: True if they met."""
    open(os.path.join(directory, str(me)), "w").close()
    return wait_for(os.path.join(directory, str(partner)))


def touch(path):
    open(path, "w").close()


def count_files(paths):
    """Waits until every one of ``paths`` exists; returns how many did."""
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline and not all(os.path.exists(p) for p in paths):
        time.sleep(0.002)
    return sum(os.path.exists(p) for p in paths)


def runs(path):
    return [int(line) for line in path.read_text().split()]


def wait_until_running(future, timeout=20):
    deadline = time.monotonic() + timeout
    while not future.running():
        assert not future.done() and time.monotonic() < deadline
        gevent.sleep(0.005)


def process_state(pid):
    """'Z' for a zombie, None once reaped, else the state letter (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):  # gone before the open, or the read
        return None
    return stat[stat.rfind(b")") + 2 :].split()[0].decode()


@pytest.fixture
def every_task_quick(monkeypatch):
    """Every task counts as quick, so tasks are sent ahead whatever the machine's load."""
    monkeypatch.setattr(gipc.pool._worker, "_QUICK_TASK", 1e9)


# --- 1. A worker lost while tasks were sent ahead to it -----------------------------------


def test_a_worker_lost_between_two_sends_settles_what_it_ran(tmp_path, every_task_quick):
    path, gate = tmp_path / "runs", tmp_path / "go"
    with ProcessPool(1) as pool:
        pid = pool.submit(pid_of_worker).result(timeout=20)
        futures = [
            pool.submit(wait_then_record, str(gate), path, 1),
            pool.submit(record_run, path, 2),
            pool.submit(record_then_die, path, 3),
        ]
        for future in futures:
            wait_until_running(future)  # all three sent
        # Hold the hub (no greenlet runs, no outcome is read) while the worker runs all
        # three and dies; then the next send finds it gone, with two outcomes unread.
        gate.touch()
        deadline = time.monotonic() + 20
        while process_state(pid) not in ("Z", None):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        futures.append(pool.submit(record_run, path, 4))
        assert [f.result(timeout=20) for f in futures[:2]] == [1, 2]
        with pytest.raises(WorkerCrashed) as info:
            futures[2].result(timeout=20)
        assert info.value.exitcode == -signal.SIGKILL and "record_then_die" in str(info.value)
        assert futures[3].result(timeout=20) == 4
    assert runs(path) == [1, 2, 3, 4]  # each once: the crashing one killed one worker


# --- 2. No task waits on a busy worker while another is free ------------------------------


def test_tasks_after_quick_ones_spread_over_idle_workers(tmp_path):
    with ProcessPool(2) as pool:
        assert list(pool.map(square, range(200))) == [x * x for x in range(200)]
        # Each waits for its partner to run: two sent to one worker would never meet.
        futures = [pool.submit(meet, str(tmp_path), i, i ^ 1) for i in range(4)]
        assert [f.result(timeout=60) for f in futures] == [True] * 4


def test_tasks_sent_behind_a_long_one_go_to_a_worker_that_is_free(tmp_path, every_task_quick):
    with ProcessPool(2) as pool:
        assert list(pool.map(square, range(20))) == [x * x for x in range(20)]
        # Both workers busy, so what comes next is sent ahead to the first one free.
        gates = [pool.submit(wait_for, str(tmp_path / f"gate{i}")) for i in range(2)]
        for future in gates:
            wait_until_running(future)
        marks = [str(tmp_path / f"mark{i}") for i in range(8)]
        long = pool.submit(count_files, marks)  # runs until the quick ones have run
        quick = [pool.submit(touch, mark) for mark in marks]
        touch(str(tmp_path / "gate0"))
        assert gates[0].result(timeout=20) is True
        wait_until_running(long)
        for future in quick:
            wait_until_running(future)  # sent ahead, behind the long one
        # The other worker gets free: what waits behind the long task moves to it.
        touch(str(tmp_path / "gate1"))
        assert long.result(timeout=60) == len(marks)
        assert [f.result(timeout=20) for f in quick] == [None] * len(marks)
        assert gates[1].result(timeout=20) is True


def test_tasks_handed_back_run_once_and_in_order(tmp_path, every_task_quick):
    path = tmp_path / "runs"
    with ProcessPool(3) as pool:
        list(pool.map(square, range(30)))
        futures = [pool.submit(record_run, path, i) for i in range(300)]
        assert [f.result(timeout=60) for f in futures] == list(range(300))
    assert sorted(runs(path)) == list(range(300))


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="sealing needs a memfd")
def test_a_claims_file_too_short_is_refused_and_the_pool_s_cannot_shrink():
    # A mapping past a file's end is a SIGBUS at the first access, in the worker and in
    # the parent: a file too short is refused, and the pool's is sealed against a task
    # (whose worker holds its descriptor) truncating it.
    from gipc import _core
    from gipc.pool._claims import FileTaskClaims

    short = os.memfd_create("short", os.MFD_CLOEXEC)
    try:
        with pytest.raises(OSError):
            _core.ClaimWord.from_fd(short)
    finally:
        os.close(short)
    claims = FileTaskClaims()
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(claims._fd, 0)
        assert claims.claim(1)
    finally:
        claims.close()


def test_claims_decide_each_task_once():
    claims = gipc.pool._Claims()
    try:
        assert claims.claim(1) and claims.claim(2)
        assert claims.revoke(5) == 2  # 3, 4 and 5 go elsewhere
        # A later revocation through an earlier task must not give them back.
        assert claims.revoke(3) == 2
        assert not claims.claim(3) and not claims.claim(4) and not claims.claim(5)
        assert claims.claim(6) and claims.started(6) == 6
    finally:
        claims.close()


# --- 3. Ctrl-C in the pool's greenlets ----------------------------------------------------


def _interrupt():
    raise KeyboardInterrupt


class InterruptWhenUnpickled:
    """Pickles fine in the worker; unpickling it in the parent raises KeyboardInterrupt,
    as a Ctrl-C landing in the greenlet that reads outcomes would."""

    def __reduce__(self):
        return _interrupt, ()


def return_interrupting():
    return InterruptWhenUnpickled()


def test_an_interrupt_while_an_outcome_is_received_does_not_wedge_the_pool(
    tmp_path, every_task_quick
):
    path = tmp_path / "runs"
    pool = ProcessPool(1)
    try:
        assert pool.submit(square, 2).result(timeout=20) == 4
        interrupted = pool.submit(return_interrupting)
        behind = [pool.submit(record_run, path, i) for i in range(3)]
        with pytest.raises(KeyboardInterrupt):
            # gevent hands the interrupt on to the main greenlet.
            interrupted.result(timeout=20)
        with pytest.raises(BrokenProcessPool, match="KeyboardInterrupt") as info:
            interrupted.result(timeout=20)
        assert isinstance(info.value.__cause__, KeyboardInterrupt)
        for i, future in enumerate(behind):
            # Sent ahead: it ran (its outcome may be lost with the reader) or it goes to a
            # new worker; it completes either way.
            try:
                assert future.result(timeout=20) == i
            except BrokenProcessPool as exc:
                assert "KeyboardInterrupt" in str(exc)
        assert pool.submit(square, 3).result(timeout=20) == 9
    finally:
        with gevent.Timeout(60):
            pool.shutdown()
    done = runs(path) if path.exists() else []
    assert sorted(done) == sorted(set(done))  # none ran twice


def test_an_interrupt_in_the_serving_greenlet_settles_what_was_sent(tmp_path, every_task_quick):
    path = tmp_path / "runs"
    pool = ProcessPool(1)
    try:
        assert pool.submit(square, 2).result(timeout=20) == 4
        first = pool.submit(square, 3)
        fired = []

        def interrupt_once(_):  # runs in the greenlet that completed the future
            if not fired:
                fired.append(None)
                raise KeyboardInterrupt

        first.add_done_callback(interrupt_once)
        behind = [pool.submit(record_run, path, i) for i in range(4)]
        with pytest.raises(KeyboardInterrupt):
            # gevent hands the interrupt on to the main greenlet when it next waits: here
            # right after result(), whose waiters are woken before the callbacks run (as
            # concurrent.futures does).
            assert first.result(timeout=20) == 9
            gevent.sleep(5)
        assert first.result(timeout=20) == 9
        failed = []
        for i, future in enumerate(behind):
            try:
                assert future.result(timeout=20) == i
            except BrokenProcessPool as exc:
                # Only the one the worker was running when it was stopped.
                assert "KeyboardInterrupt" in str(exc)
                failed.append(i)
        assert len(failed) <= 1
        assert pool.submit(square, 5).result(timeout=20) == 25
    finally:
        with gevent.Timeout(60):
            pool.shutdown()
    done = runs(path)
    assert len(done) == len(set(done))  # none ran twice
    assert {0, 1, 2, 3} - set(failed) <= set(done)


def test_an_interrupt_in_the_pool_does_not_keep_the_program_from_exiting():
    result = run_python(
        """
        import gipc

        def interrupt():
            raise KeyboardInterrupt

        class Interrupting:
            def __reduce__(self):
                return interrupt, ()

        def make():
            return Interrupting()

        pool = gipc.ProcessPool(1)
        future = pool.submit(make)
        pool.submit(abs, -4)
        future.result()
        """,
        timeout=60,
    )
    assert result.returncode != 0
    assert "KeyboardInterrupt" in result.stderr


# --- 4. Workers lost while starting -------------------------------------------------------


def _failing_launcher(monkeypatch, failures):
    """Makes the next ``failures`` child starts (any start method) fail as a fork that
    hit its process limit does; returns the list of attempts."""
    from gipc import _process

    real = _process._popen_class
    attempts = []

    def launcher(method):
        cls = real(method)

        def launch(process_obj):
            attempts.append(method)
            if len(attempts) <= failures:
                raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
            return cls(process_obj)

        return launch

    monkeypatch.setattr(_process, "_popen_class", launcher)
    return attempts


@pytest.mark.fork_only  # the fork launcher's own clean-up when fork() itself fails
def test_a_failed_fork_is_retried(monkeypatch):
    real_fork = os.fork
    calls = []

    def fork_failing_once():
        calls.append(None)
        if len(calls) == 1:
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        return real_fork()

    monkeypatch.setattr(os, "fork", fork_failing_once)
    with ProcessPool(1) as pool:
        assert pool.submit(square, 3).result(timeout=20) == 9
        assert pool.submit(square, 4).result(timeout=20) == 16
    assert len(calls) == 2


def test_a_failed_start_is_retried(monkeypatch):
    attempts = _failing_launcher(monkeypatch, 1)
    with ProcessPool(1) as pool:
        assert pool.submit(square, 3).result(timeout=20) == 9
        assert pool.submit(square, 4).result(timeout=20) == 16
    assert len(attempts) == 2


_kill_next_child = False
_hook_installed = False


def _kill_child_after_fork():
    if _kill_next_child:
        os.kill(os.getpid(), signal.SIGKILL)


def _after_fork_in_parent():
    global _kill_next_child
    _kill_next_child = False  # only the first child after the test asked


@pytest.mark.fork_only  # the window is opened by an at-fork hook in the caller
def test_a_worker_killed_while_starting_is_replaced():
    global _kill_next_child, _hook_installed
    if not _hook_installed:  # at-fork hooks cannot be removed: install one, switched
        os.register_at_fork(
            after_in_child=_kill_child_after_fork, after_in_parent=_after_fork_in_parent
        )
        _hook_installed = True
    _kill_next_child = True
    try:
        with ProcessPool(1) as pool:
            assert pool.submit(square, 3).result(timeout=20) == 9
            assert not _kill_next_child  # a child was forked, and killed
    finally:
        _kill_next_child = False


def test_too_many_start_failures_in_a_row_break_the_pool(monkeypatch):
    monkeypatch.setattr(gipc.pool._pool, "_START_RETRY_DELAY", 0.001)
    _failing_launcher(monkeypatch, 1_000)
    pool = ProcessPool(2)
    try:
        future = pool.submit(square, 2)
        with pytest.raises(BrokenProcessPool, match="in a row could not be started") as info:
            future.result(timeout=20)
        assert isinstance(info.value.__cause__, OSError)
        with pytest.raises(BrokenProcessPool):
            pool.submit(square, 1)
    finally:
        pool.shutdown()


# --- 5. Timeouts gevent's loops cannot represent ------------------------------------------


@pytest.mark.parametrize("huge", [float("inf"), 1e17, 1e300])
def test_a_huge_task_timeout_means_none(huge):
    with ProcessPool(1, task_timeout=huge) as pool:
        assert pool.submit(square, 3).result(timeout=20) == 9
        assert pool.submit_with_timeout(huge, square, 4).result(timeout=20) == 16


def test_a_nan_task_timeout_is_refused():
    with pytest.raises(ValueError):
        ProcessPool(1, task_timeout=float("nan"))
    with ProcessPool(1) as pool:
        with pytest.raises(ValueError):
            pool.submit_with_timeout(float("nan"), square, 2)


@pytest.mark.parametrize("huge", [float("inf"), 1e300])
def test_a_huge_wait_means_no_limit(huge):
    import concurrent.futures as cf

    with ProcessPool(1) as pool:
        assert pool.submit(square, 3).result(timeout=huge) == 9
        assert pool.submit(square, 3).exception(timeout=huge) is None
        assert list(pool.map(square, range(3), timeout=huge)) == [0, 1, 4]
        assert sorted(pool.map_unordered(square, range(3), timeout=huge)) == [0, 1, 4]
        done, _ = cf.wait([pool.submit(square, 5)], timeout=huge)
        assert [f.result() for f in done] == [25]
