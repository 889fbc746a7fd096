"""gipc.ProcessPool: a cooperative concurrent.futures.Executor on gipc children."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import pickle
import signal
import sys
import threading
import time

import gevent
import gipc
import pytest
from gipc import RemoteTraceback, UnpicklableOutcome
from gipc.pool import (
    BrokenProcessPool,
    Future,
    ProcessPool,
    TaskTimeout,
    WorkerCrashed,
    _encode_task,
)
from helpers import Ticker, run_python, wait_gone

# --- Task functions (module level, so they pickle by reference) ---------------------------


def square(x):
    return x * x


def add(a, b):
    return a + b


def pid_of_worker(_=None):
    return os.getpid()


def sleep_and_return(seconds, value=None):
    time.sleep(seconds)
    return value


def sleep_and_pid(seconds):
    time.sleep(seconds)
    return os.getpid()


def fail(message):
    raise ValueError(message)


def exit_hard(code):
    os._exit(code)


def exit_soft(code):
    sys.exit(code)


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)


def segfault():
    import ctypes

    ctypes.string_at(0)


def digest(data, *, salt=b""):
    return len(data), hashlib.sha256(salt + data).hexdigest()


def make_bytes(n):
    return b"\x5a" * n


def return_lock():
    return threading.Lock()


_initialized = None


def set_initialized(value):
    global _initialized
    _initialized = value


def get_initialized(_=None):
    return _initialized


def failing_initializer():
    raise RuntimeError("initializer says no")


def touch(path):
    with open(path, "w"):
        pass


def child_in_task(x):
    p = gipc.start_process(square, args=(x,), capture=True)
    try:
        return p.result()
    finally:
        p.join()


def wait_until_running(future, timeout=20):
    deadline = time.monotonic() + timeout
    while not future.running():
        assert not future.done() and time.monotonic() < deadline
        gevent.sleep(0.005)


def _assert_remote_traceback(exc, *needles):
    cause = exc.__cause__
    assert isinstance(cause, RemoteTraceback)
    for needle in needles:
        assert needle in str(cause)


# --- Basics -------------------------------------------------------------------------------


def test_submit_and_result():
    with ProcessPool(2) as pool:
        future = pool.submit(add, 2, b=40)
        assert isinstance(future, Future) and isinstance(future, cf.Future)
        assert future.result(timeout=10) == 42
        assert future.done() and not future.cancelled()
        assert future.exception() is None


def test_exception_with_remote_traceback():
    with ProcessPool(1) as pool:
        future = pool.submit(fail, "nope")
        with pytest.raises(ValueError, match="nope") as info:
            future.result()
        _assert_remote_traceback(info.value, "Traceback (most recent call last)", "in fail")
        assert isinstance(future.exception(), ValueError)
        # The worker survives an exception in a task.
        assert pool.submit(square, 3).result() == 9


def test_workers_are_reused():
    with ProcessPool(1) as pool:
        pids = {pool.submit(pid_of_worker).result() for _ in range(5)}
    assert len(pids) == 1 and os.getpid() not in pids


def test_at_most_max_workers():
    with ProcessPool(2) as pool:
        pids = set(pool.map(sleep_and_pid, [0.1] * 6))
    assert 1 <= len(pids) <= 2


def test_map_keeps_order():
    with ProcessPool(3) as pool:
        assert list(pool.map(square, range(20))) == [x * x for x in range(20)]
        assert list(pool.map(add, range(5), range(10, 15))) == [10, 12, 14, 16, 18]
        assert list(pool.map(square, [])) == []


def test_map_with_chunks():
    with ProcessPool(2) as pool:
        assert list(pool.map(square, range(25), chunksize=4)) == [x * x for x in range(25)]
        with pytest.raises(ValueError):
            pool.map(square, range(3), chunksize=0)


def test_map_raises_the_task_exception_in_place():
    with ProcessPool(2) as pool:
        results = pool.map(fail, ["a", "b"])
        with pytest.raises(ValueError, match="a"):
            next(results)


def test_map_timeout():
    with ProcessPool(1) as pool:
        pool.submit(square, 1).result()  # the worker is up: only the tasks count
        results = pool.map(sleep_and_return, [0.01, 0.8], timeout=0.4)
        assert next(results) is None
        with pytest.raises(cf.TimeoutError):
            next(results)


def test_map_unordered_yields_in_completion_order():
    with ProcessPool(3) as pool:
        list(pool.map(sleep_and_return, [0.2] * 3))  # three workers up
        delays = [0.6, 0.3, 0.01]
        results = list(pool.map_unordered(sleep_and_return, delays, delays))
        assert results == [0.01, 0.3, 0.6]
        chunked = pool.map_unordered(square, range(30), chunksize=7)
        assert sorted(chunked) == [x * x for x in range(30)]


def test_leaving_map_early_cancels_the_rest():
    with ProcessPool(1) as pool:
        results = pool.map(sleep_and_return, [0.1] * 20, range(20))
        assert next(results) == 0
        results.close()
    # Shutting down did not wait for 19 more tasks of 0.1 s each (at most the running one).


def test_map_unordered_timeout():
    with ProcessPool(1) as pool:
        with pytest.raises(cf.TimeoutError):
            list(pool.map_unordered(sleep_and_return, [0.6], timeout=0.1))


def test_initializer():
    with ProcessPool(2, initializer=set_initialized, initargs=("ready",)) as pool:
        assert set(pool.map(get_initialized, range(4))) == {"ready"}


@pytest.mark.fork_only  # a promise of the fork start method only (documented)
def test_initializer_need_not_be_picklable():
    # It reaches the workers by fork, not through a pipe.
    with ProcessPool(1, initializer=lambda: set_initialized("from a lambda")) as pool:
        assert pool.submit(get_initialized).result() == "from a lambda"


def test_done_callbacks():
    seen = []
    with ProcessPool(1) as pool:
        future = pool.submit(square, 9)
        future.add_done_callback(lambda f: seen.append(f.result()))
        future.result()
        failing = pool.submit(fail, "cb")
        failing.add_done_callback(lambda f: seen.append(type(f.exception()).__name__))
        cf.wait([failing])
    assert seen == [81, "ValueError"]


def test_initializer_failure_breaks_the_pool():
    pool = ProcessPool(1, initializer=failing_initializer)
    try:
        futures = [pool.submit(square, i) for i in range(3)]
        for future in futures:
            with pytest.raises(BrokenProcessPool, match="initializer"):
                future.result(timeout=10)
        with pytest.raises(BrokenProcessPool) as info:
            pool.submit(square, 1)
        assert isinstance(info.value.__cause__, RuntimeError)
    finally:
        pool.shutdown()


def test_max_tasks_per_child_recycles_workers():
    with ProcessPool(1, max_tasks_per_child=2) as pool:
        pids = [pool.submit(pid_of_worker).result() for _ in range(6)]
    assert len(set(pids)) == 3
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[4] == pids[5]


def test_task_can_start_its_own_gipc_child():
    with ProcessPool(1) as pool:
        assert pool.submit(child_in_task, 7).result(timeout=20) == 49


# --- Crashes and timeouts -----------------------------------------------------------------


@pytest.mark.parametrize(
    "task, args, exitcode",
    [
        (exit_hard, (3,), 3),
        (exit_soft, (5,), 5),
        (kill_self, (), -signal.SIGKILL),
        (segfault, (), -signal.SIGSEGV),
    ],
    ids=["os._exit", "sys.exit", "SIGKILL", "segfault"],
)
def test_crash_fails_only_its_task(task, args, exitcode):
    with ProcessPool(2) as pool:
        slow = pool.submit(sleep_and_return, 0.4, "survivor")
        wait_until_running(slow)  # on its own worker, first
        doomed = pool.submit(task, *args)
        with pytest.raises(WorkerCrashed) as info:
            doomed.result(timeout=20)
        err = info.value
        assert isinstance(err, BrokenProcessPool)
        assert err.exitcode == exitcode
        assert str(err.pid) in str(err) and task.__name__ in str(err)
        assert slow.result(timeout=20) == "survivor"
        # The pool replaced the worker and keeps serving.
        assert list(pool.map(square, range(6))) == [0, 1, 4, 9, 16, 25]
        assert err.pid not in set(pool.map(pid_of_worker, range(4)))


def test_worker_killed_while_idle_does_not_fail_the_next_task():
    with ProcessPool(1) as pool:
        pid = pool.submit(pid_of_worker).result()
        os.kill(pid, signal.SIGKILL)
        gevent.sleep(0.1)
        assert pool.submit(square, 4).result(timeout=20) == 16
        assert pool.submit(pid_of_worker).result() != pid


def test_submit_with_timeout():
    with ProcessPool(2) as pool:
        other = pool.submit(sleep_and_return, 0.3, "fine")
        started = time.monotonic()
        slow = pool.submit_with_timeout(0.3, sleep_and_pid, 30)
        with pytest.raises(TaskTimeout) as info:
            slow.result(timeout=20)
        assert time.monotonic() - started < 5
        err = info.value
        assert isinstance(err, TimeoutError) and isinstance(err, cf.TimeoutError)
        assert err.timeout == 0.3 and "sleep_and_pid" in str(err)
        assert other.result() == "fine"
        assert err.pid not in set(pool.map(pid_of_worker, range(4)))
        assert pool.submit_with_timeout(5, square, 5).result() == 25


def test_pool_task_timeout_option():
    with ProcessPool(1, task_timeout=0.3) as pool:
        with pytest.raises(TaskTimeout):
            pool.submit(sleep_and_return, 30).result(timeout=20)
        assert pool.submit(square, 6).result() == 36
        # A per-task limit overrides the pool's, None lifting it.
        assert pool.submit_with_timeout(None, sleep_and_return, 0.5, "ok").result() == "ok"
    with pytest.raises(ValueError):
        ProcessPool(1, task_timeout=0)


def test_result_timeout_leaves_the_task_running():
    with ProcessPool(1) as pool:
        future = pool.submit(sleep_and_return, 0.4, "eventually")
        wait_until_running(future)
        with pytest.raises(cf.TimeoutError):
            future.result(timeout=0.05)
        assert future.running()
        assert future.result(timeout=10) == "eventually"


def test_exception_types_pickle():
    crashed = pickle.loads(pickle.dumps(WorkerCrashed(12, -9, "task f()")))
    assert (crashed.pid, crashed.exitcode) == (12, -9) and "SIGKILL" in str(crashed)
    timed_out = pickle.loads(pickle.dumps(TaskTimeout(1.5, 12, "task f()")))
    assert (timed_out.timeout, timed_out.pid) == (1.5, 12)


# --- Pickling -----------------------------------------------------------------------------


def test_unpicklable_argument_fails_its_task_only():
    with ProcessPool(1) as pool:
        future = pool.submit(square, threading.Lock())
        with pytest.raises(TypeError, match="pickle"):
            future.result(timeout=10)
        assert pool.submit(square, 2).result() == 4


def test_unpicklable_result():
    with ProcessPool(1) as pool:
        with pytest.raises(UnpicklableOutcome, match=r"_thread\.lock"):
            pool.submit(return_lock).result(timeout=10)
        assert pool.submit(square, 2).result() == 4


def test_large_arguments_and_results():
    data = os.urandom(8 << 20)
    with ProcessPool(2) as pool:
        first = pool.submit(digest, data)
        second = pool.submit(digest, data, salt=data[:64 << 10])
        assert first.result(timeout=30) == (len(data), hashlib.sha256(data).hexdigest())
        salted = hashlib.sha256(data[:64 << 10] + data).hexdigest()
        assert second.result(timeout=30) == (len(data), salted)
        result = pool.submit(make_bytes, 8 << 20).result(timeout=30)
        assert type(result) is bytes and len(result) == 8 << 20 and result[-1:] == b"\x5a"


def test_large_bytes_are_sent_as_they_are():
    # The transport sends `bytes` without copying; the task encoding must hand it the very
    # object, not a pickle containing a copy.
    data = b"\x00" * (1 << 20)
    messages = _encode_task(digest, (data,), {"salt": data})
    assert messages[2] is data and messages[3] is data
    assert all(len(m) < 1024 for m in messages[:2])


# --- Cancellation and shutdown -------------------------------------------------------------


def test_cancel_a_task_not_started(tmp_path):
    marker = tmp_path / "ran"
    with ProcessPool(1) as pool:
        blocker = pool.submit(sleep_and_return, 0.3, "first")
        wait_until_running(blocker)
        queued = pool.submit(touch, str(marker))
        assert queued.cancel()
        assert queued.cancelled() and queued.done()
        with pytest.raises(cf.CancelledError):
            queued.result()
        # Waiters learn of the cancellation at once.
        done, _ = cf.wait([queued], timeout=0)
        assert done == {queued}
        assert not blocker.cancel()  # already running
        assert blocker.result() == "first"
    assert not marker.exists()


def test_shutdown_waits_for_pending_tasks():
    pool = ProcessPool(2)
    futures = [pool.submit(sleep_and_return, 0.05, i) for i in range(8)]
    pool.shutdown(wait=True)
    assert [f.result(timeout=0) for f in futures] == list(range(8))
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(square, 1)
    pool.shutdown()  # again: harmless


def test_shutdown_cancel_futures():
    pool = ProcessPool(1)
    running = pool.submit(sleep_and_return, 0.3, "kept")
    wait_until_running(running)
    queued = [pool.submit(square, i) for i in range(5)]
    pool.shutdown(wait=True, cancel_futures=True)
    assert running.result(timeout=0) == "kept"
    assert all(f.cancelled() for f in queued)


def test_shutdown_without_waiting():
    pool = ProcessPool(2)
    futures = [pool.submit(sleep_and_return, 0.1, i) for i in range(4)]
    started = time.monotonic()
    pool.shutdown(wait=False)
    assert time.monotonic() - started < 0.05
    assert [f.result(timeout=10) for f in futures] == [0, 1, 2, 3]
    pool.shutdown(wait=True)  # reaps what is left


@pytest.mark.parametrize("ending", ["", "pool.shutdown(wait=False)"])
def test_pool_left_running_at_interpreter_exit(ending):
    # Shut down at exit, before multiprocessing's own exit handler joins every child.
    result = run_python(
        f"""
        import time, gipc
        pool = gipc.ProcessPool(2)
        print(pool.submit(abs, -3).result())
        pool.submit(time.sleep, 0.2)
        pool.submit(abs, -4)
        {ending}
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3"
    assert result.stderr == ""


def test_unused_pool_starts_no_process():
    before = set(multiprocessing_children())
    with ProcessPool(4):
        assert set(multiprocessing_children()) == before


def multiprocessing_children():
    import multiprocessing

    return [p.pid for p in multiprocessing.active_children()]


def test_context_manager_leaves_nothing_behind(start_method):
    with ProcessPool(3) as pool:
        pids = set(pool.map(sleep_and_pid, [0.05] * 6))
    if start_method == "forkserver":
        # The fork server's children, not ours: each worker's join returned on its last
        # word (code run, every descriptor closed), and the server reaps it right after.
        for pid in pids:
            wait_gone(pid)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    # (the autouse fixture also checks for descriptors and children left behind)


def test_bad_arguments():
    with pytest.raises(ValueError):
        ProcessPool(0)
    with pytest.raises(ValueError):
        ProcessPool(1, max_tasks_per_child=0)
    with pytest.raises(TypeError):
        ProcessPool(1, initializer=42)  # type: ignore[arg-type]


# --- Cooperation --------------------------------------------------------------------------


def _check_ticker(ticker, seconds):
    # Had the hub been blocked during the wait, there would be a gap as long as the wait
    # and hardly any ticks. The margins allow for a loaded machine.
    assert ticker.ticks >= seconds / ticker.interval * 0.3, ticker.ticks
    assert ticker.max_gap < seconds * 0.5, ticker.max_gap


def test_future_result_is_cooperative():
    with ProcessPool(1) as pool:
        ticker = Ticker(interval=0.01)
        try:
            assert pool.submit(sleep_and_return, 0.8, "x").result() == "x"
        finally:
            ticker.stop()
    _check_ticker(ticker, 0.8)


def test_concurrent_futures_wait_is_cooperative():
    with ProcessPool(2) as pool:
        futures = [pool.submit(sleep_and_return, 0.8, i) for i in range(2)]
        ticker = Ticker(interval=0.01)
        try:
            done, not_done = cf.wait(futures, timeout=20)
        finally:
            ticker.stop()
        assert done == set(futures) and not not_done
        _check_ticker(ticker, 0.8)

        first = pool.submit(sleep_and_return, 0.05, "fast")
        second = pool.submit(sleep_and_return, 0.6, "slow")
        done, not_done = cf.wait([first, second], return_when=cf.FIRST_COMPLETED)
        assert done == {first} and not_done == {second}
        failing = pool.submit(fail, "early")
        done, not_done = cf.wait([failing, second], return_when=cf.FIRST_EXCEPTION)
        assert failing in done
        done, not_done = cf.wait([second], timeout=0.01)
        assert not_done == {second} or second.done()


def test_as_completed_is_cooperative():
    with ProcessPool(3) as pool:
        list(pool.map(sleep_and_return, [0.2] * 3))  # three workers up
        futures = [pool.submit(sleep_and_return, d, d) for d in (0.8, 0.4, 0.05)]
        ticker = Ticker(interval=0.01)
        try:
            order = [f.result() for f in cf.as_completed(futures, timeout=20)]
        finally:
            ticker.stop()
        assert order == [0.05, 0.4, 0.8]
        _check_ticker(ticker, 0.8)
        slow = pool.submit(sleep_and_return, 0.5)
        with pytest.raises(cf.TimeoutError):
            for _ in cf.as_completed([slow], timeout=0.1):
                pass


def test_map_is_cooperative():
    with ProcessPool(2) as pool:
        ticker = Ticker(interval=0.01)
        try:
            assert list(pool.map(sleep_and_return, [0.4] * 4, range(4))) == [0, 1, 2, 3]
        finally:
            ticker.stop()
    _check_ticker(ticker, 0.8)


def test_many_greenlets_share_a_pool():
    with ProcessPool(2) as pool:
        greenlets = [gevent.spawn(lambda i=i: pool.submit(square, i).result()) for i in range(40)]
        gevent.joinall(greenlets, raise_error=True)
        assert [g.value for g in greenlets] == [i * i for i in range(40)]


def test_several_greenlets_wait_on_one_future():
    with ProcessPool(1) as pool:
        future = pool.submit(sleep_and_return, 0.3, "shared")
        waiters = [gevent.spawn(future.result, 20) for _ in range(3)]
        exceptions = [gevent.spawn(future.exception, 20) for _ in range(2)]
        gevent.joinall(waiters + exceptions, raise_error=True)
        assert [g.value for g in waiters] == ["shared"] * 3
        assert [g.value for g in exceptions] == [None, None]


def test_futures_are_light_for_the_garbage_collector():
    """A map() of 10,000 tasks makes 10,000 futures at once. With the stdlib's Future (11
    objects the collector tracks, 8 of them its Condition) that filled the heap enough for
    two full collections of ~20 ms each in the middle of map(), a stall of the event loop
    that no yielding can prevent. This pins the fix: a few tracked objects per future."""
    import gc

    def tracked_per_future(make):
        futures = []
        gc.collect()
        before = len(gc.get_objects())
        futures.extend(make() for _ in range(1000))
        return (len(gc.get_objects()) - before) / len(futures), futures

    ours, futures = tracked_per_future(Future)
    stdlib, _ = tracked_per_future(cf.Future)
    # 3 on CPython 3.11+, 4 before (where an instance's __dict__ is an object of its own);
    # the stdlib's is 11-12.
    assert ours <= 4.5 and ours * 2 < stdlib, (ours, stdlib)
    futures[0].set_result(1)
    assert futures[0].result() == 1 and futures[1].cancel() and futures[1].cancelled()


# --- Sending ahead (prefetch) -------------------------------------------------------------


def record_run(path, value):
    with open(path, "a") as f:
        f.write(f"{value}\n")
    return value


def record_then_crash(path, value):
    record_run(path, value)
    os._exit(3)


def record_then_sleep(path, value, seconds):
    record_run(path, value)
    time.sleep(seconds)
    return value


def _runs(path):
    return [int(line) for line in path.read_text().split()]


@pytest.fixture
def every_task_quick(monkeypatch):
    """Every task counts as quick, so sending ahead starts after the first one whatever
    the machine's load (the real threshold is a millisecond)."""
    import gipc.pool._worker

    monkeypatch.setattr(gipc.pool._worker, "_QUICK_TASK", 1e9)


def test_prefetch_argument():
    for bad in (-1, 1.5, "8", None, True):
        with pytest.raises(ValueError):
            ProcessPool(1, prefetch=bad)
    with ProcessPool(1, prefetch=0) as pool:
        assert list(pool.map(square, range(50))) == [x * x for x in range(50)]


def test_quick_tasks_are_sent_ahead(every_task_quick):
    with ProcessPool(1, prefetch=3) as pool:
        assert pool.submit(square, 2).result(timeout=20) == 4
        slow = pool.submit(sleep_and_return, 0.5, "slow")
        behind = [pool.submit(square, i) for i in range(5)]
        wait_until_running(slow)
        gevent.sleep(0.1)
        # Three went out behind the slow one (and so count as running); the rest wait in
        # the pool's queue, where they can still be cancelled.
        assert [f.running() for f in behind] == [True] * 3 + [False] * 2
        assert behind[4].cancel()
        assert [f.result(timeout=20) for f in behind[:4]] == [0, 1, 4, 9]
        assert slow.result() == "slow"
        assert list(pool.map(square, range(2000))) == [x * x for x in range(2000)]


def test_without_prefetch_a_long_task_holds_nothing_back(every_task_quick):
    with ProcessPool(2, prefetch=0) as pool:
        list(pool.map(square, range(20)))
        slow = pool.submit(sleep_and_return, 1.5, "slow")
        wait_until_running(slow)
        quick = [pool.submit(square, i) for i in range(10)]
        done, not_done = cf.wait(quick, timeout=20)
        assert not not_done
        assert not slow.done(), "a quick task waited behind the slow one"
        assert slow.result(timeout=20) == "slow"


def test_after_shutdown_a_free_worker_takes_back_what_was_sent_ahead(every_task_quick):
    """A worker that becomes free after shutdown() takes back the tasks sent ahead to a
    busy one before it takes its stop mark (it exited, and they waited behind the long
    task: the end of a `with ProcessPool()` block could wait hours with a worker idle)."""
    pool = ProcessPool(2, prefetch=8)
    try:
        assert list(pool.map(square, range(10))) == [x * x for x in range(10)]
        # Busy long enough for the rest to be sent while it runs, on a loaded machine too
        # (at 0.5 s it once finished first in a run beside a signal storm).
        other = pool.submit(sleep_and_pid, 1.5)
        wait_until_running(other)
        # The idle worker takes the long task, then (the other one busy) these behind it.
        long = pool.submit(sleep_and_pid, 8)
        quick = [pool.submit(pid_of_worker) for _ in range(4)]
        for future in [long, *quick]:
            wait_until_running(future)
        pool.shutdown(wait=False)
        done, _ = cf.wait(quick, timeout=5)
        assert done == set(quick), "tasks sent ahead waited behind the long task"
        assert {f.result() for f in quick} == {other.result()}
        assert long.result(timeout=20) != other.result()
    finally:
        pool.shutdown(wait=True)


def test_shutdown_waiting_from_a_done_callback_raises_and_the_pool_still_ends(caplog):
    """A done-callback runs in a greenlet that serves a worker: it cannot wait for the
    pool's end (two such callbacks waited for each other for ever). As with
    concurrent.futures, shutdown(wait=True) there raises RuntimeError (logged with the
    callback), the shutdown goes on, and every result arrives."""
    pool = ProcessPool(2)
    futures = [pool.submit(sleep_and_return, 0.2, i) for i in range(2)]
    errors = []

    def shut_down(_):
        try:
            pool.shutdown(wait=True)
        except RuntimeError as error:
            errors.append(error)
            raise

    for future in futures:
        future.add_done_callback(shut_down)
    with gevent.Timeout(20):
        assert [f.result() for f in futures] == [0, 1]
        pool.shutdown(wait=True)
    assert len(errors) == 2 and all("done-callbacks" in str(e) for e in errors)
    assert not pool._workers
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(square, 2)


def _use_a_pool_and_leave_it_running():
    pool = ProcessPool(2)
    assert pool.submit(square, 3).result(timeout=20) == 9


def test_a_pool_left_running_in_a_child_is_shut_down_when_the_child_ends():
    """A child runs multiprocessing's exit handler, not atexit's: it joined the pool's
    workers, which no one told to stop, and the child never ended."""
    child = gipc.start_process(_use_a_pool_and_leave_it_running)
    child.join(30)
    try:
        assert child.exitcode == 0
    finally:
        if child.exitcode is None:
            child.kill()
            child.join()


def test_result_waiters_wake_before_done_callbacks_run():
    """As in concurrent.futures: a callback that waits does not hold back the greenlets
    waiting in result() (they waited until every callback had returned)."""
    with ProcessPool(1) as pool:
        future = pool.submit(sleep_and_return, 0.1, "done")
        released = gevent.event.Event()
        future.add_done_callback(lambda _: released.wait(20))
        waiter = gevent.spawn(future.result)
        assert waiter.get(timeout=10) == "done"
        released.set()


def test_crash_fails_its_task_and_those_sent_behind_it_run_once(tmp_path, every_task_quick):
    path = tmp_path / "runs"
    with ProcessPool(1) as pool:
        assert pool.submit(square, 3).result(timeout=20) == 9
        futures = [
            pool.submit(record_run, path, 1),
            pool.submit(record_then_crash, path, 2),
            pool.submit(record_run, path, 3),
            pool.submit(record_run, path, 4),
        ]
        assert futures[0].result(timeout=20) == 1
        with pytest.raises(WorkerCrashed) as info:
            futures[1].result(timeout=20)
        assert info.value.exitcode == 3 and "record_then_crash" in str(info.value)
        assert [f.result(timeout=20) for f in futures[2:]] == [3, 4]
    assert _runs(path) == [1, 2, 3, 4]


def test_timeout_fails_its_task_and_those_sent_behind_it_run_once(tmp_path, every_task_quick):
    path = tmp_path / "runs"
    with ProcessPool(1) as pool:
        assert pool.submit(square, 3).result(timeout=20) == 9
        hung = pool.submit_with_timeout(0.5, record_then_sleep, path, 1, 60)
        behind = [pool.submit(record_run, path, 2), pool.submit(record_run, path, 3)]
        with pytest.raises(TaskTimeout):
            hung.result(timeout=20)
        assert [f.result(timeout=20) for f in behind] == [2, 3]
    assert _runs(path) == [1, 2, 3]


def test_a_task_sent_ahead_gets_its_whole_timeout_once_it_starts(every_task_quick):
    with ProcessPool(1) as pool:
        assert pool.submit(square, 3).result(timeout=20) == 9
        first = pool.submit(sleep_and_return, 1.5, "first")
        # Sent ahead at once, but its 1 s runs from when the first one has finished.
        second = pool.submit_with_timeout(1.0, sleep_and_return, 0.1, "second")
        assert first.result(timeout=20) == "first"
        assert second.result(timeout=20) == "second"
