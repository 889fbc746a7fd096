"""gipc.wait, gipc.as_completed and gipc.result: cooperative waits on any executor's futures.

Futures here are mostly plain ``concurrent.futures.Future`` objects completed by a real OS
thread (what any foreign executor does). Where a test must show that the loop kept running
during a wait, the completing thread waits for a greenlet to tick first: a wait that blocked
the loop would never see its future complete (the thread gives up after a while and the
test fails instead of hanging).
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from typing import Any, Callable, Iterator, List

import gevent
import pytest

import gipc
from helpers import Ticker, run_python

#: How long a completing thread waits for proof that the loop runs before giving up.
PATIENCE = 10.0


@pytest.fixture
def ticker() -> Iterator[Ticker]:
    t = Ticker()
    yield t
    t.stop()


def later(action: Callable[[], object], after_ticks: int = 5) -> threading.Thread:
    """Runs ``action`` on a new OS thread once a greenlet has ticked ``after_ticks`` times,
    that is, only if the event loop runs meanwhile."""
    loop_ran = threading.Event()

    def count() -> None:
        for _ in range(after_ticks):
            gevent.sleep(0.001)
        loop_ran.set()

    def run() -> None:
        loop_ran.wait(PATIENCE)
        action()

    gevent.spawn(count)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def finish(*futures: "cf.Future[Any]", value: Any = None) -> Callable[[], None]:
    def action() -> None:
        for f in futures:
            f.set_result(value)

    return action


def futures(n: int) -> List["cf.Future[Any]"]:
    return [cf.Future() for _ in range(n)]


def fail(exc: BaseException) -> "cf.Future[Any]":
    f: "cf.Future[Any]" = cf.Future()
    f.set_exception(exc)
    return f


def done(value: Any) -> "cf.Future[Any]":
    f: "cf.Future[Any]" = cf.Future()
    f.set_result(value)
    return f


def square(x: int) -> int:
    return x * x


# --- wait ---------------------------------------------------------------------------------


def test_wait_all_completed_lets_other_greenlets_run(ticker: Ticker) -> None:
    fs = futures(3)
    thread = later(finish(*fs, value=1), after_ticks=20)
    result = gipc.wait(fs)
    assert result.done == set(fs) and result.not_done == set()
    assert ticker.ticks >= 20
    thread.join()


def test_wait_first_completed_returns_with_the_first() -> None:
    first, *rest = futures(3)
    thread = later(finish(first))
    done_, not_done = gipc.wait([first, *rest], return_when=gipc.FIRST_COMPLETED)
    assert done_ == {first} and not_done == set(rest)
    thread.join()


def test_wait_first_exception_returns_with_the_first_failure() -> None:
    ok, bad, slow = futures(3)

    def action() -> None:
        ok.set_result(1)
        bad.set_exception(ValueError("bad"))

    thread = later(action)
    done_, not_done = gipc.wait([ok, bad, slow], return_when=gipc.FIRST_EXCEPTION)
    assert bad in done_ and not_done == {slow}
    thread.join()


def test_wait_first_exception_without_failures_waits_for_all() -> None:
    fs = futures(2)
    thread = later(finish(*fs))
    done_, not_done = gipc.wait(fs, return_when=gipc.FIRST_EXCEPTION)
    assert done_ == set(fs) and not not_done
    thread.join()


def test_wait_on_futures_done_already_returns_at_once() -> None:
    fs = [done(1), fail(ValueError()), done(3)]
    assert gipc.wait(fs, timeout=0).done == set(fs)
    assert gipc.wait(fs, return_when=gipc.FIRST_EXCEPTION).done == set(fs)
    assert gipc.wait([]).done == set()


def test_wait_timeout_returns_what_is_done() -> None:
    quick = done(1)
    never: "cf.Future[Any]" = cf.Future()
    started = time.monotonic()
    done_, not_done = gipc.wait([quick, never], timeout=0.05)
    assert time.monotonic() - started >= 0.04
    assert done_ == {quick} and not_done == {never}
    assert gipc.wait([quick, never], timeout=0).not_done == {never}


def test_wait_rejects_an_unknown_condition() -> None:
    with pytest.raises(ValueError):
        gipc.wait([done(1)], return_when="WHENEVER")


def test_a_cancelled_future_counts_as_done() -> None:
    cancelled: "cf.Future[Any]" = cf.Future()
    never: "cf.Future[Any]" = cf.Future()
    thread = later(cancelled.cancel)
    done_, not_done = gipc.wait([cancelled, never], return_when=gipc.FIRST_COMPLETED)
    assert done_ == {cancelled} and not_done == {never}
    with pytest.raises(cf.CancelledError):
        gipc.result(cancelled)
    # Cancelled is not failed: FIRST_EXCEPTION goes on waiting for the others.
    assert gipc.wait([cancelled, never], 0.01, gipc.FIRST_EXCEPTION).not_done == {never}
    thread.join()


# --- as_completed -------------------------------------------------------------------------


def test_as_completed_yields_in_completion_order(ticker: Ticker) -> None:
    a, b, c = futures(3)
    early = done(0)
    order = [early]
    step = threading.Event()

    def action() -> None:
        # One at a time, each only after the consumer took the one before.
        for f in (c, a, b):
            step.clear()
            f.set_result(1)
            step.wait(PATIENCE)

    thread = later(action, after_ticks=2)
    seen = []
    for f in gipc.as_completed([a, b, c, early, a]):  # a given twice, yielded once
        seen.append(f)
        step.set()
    assert seen == order + [c, a, b]
    assert ticker.ticks >= 2
    thread.join()


def test_as_completed_gives_the_loop_turns_while_handing_out_finished_futures() -> None:
    ticker = Ticker()
    gevent.sleep(0.005)
    fs = [done(i) for i in range(2000)]
    ticks = ticker.ticks
    for _ in gipc.as_completed(fs):
        time.sleep(0.0001)  # the caller's work on each result, blocking as work does
    # All were done: without its turns the loop would not have run once in 0.2 s or more.
    assert ticker.ticks - ticks >= 10, ticker.ticks - ticks
    ticker.stop()


def test_as_completed_timeout_raises_after_yielding_what_finished() -> None:
    quick = done(1)
    never = futures(2)
    it = gipc.as_completed([quick, *never], timeout=0.05)
    assert next(it) is quick
    with pytest.raises(cf.TimeoutError, match=r"2 \(of 3\) futures unfinished"):
        next(it)


def test_as_completed_yields_cancelled_and_failed_futures() -> None:
    cancelled, failed = futures(2)

    def action() -> None:
        cancelled.cancel()
        failed.set_exception(KeyError("which"))

    thread = later(action)
    seen = list(gipc.as_completed([cancelled, failed]))
    assert set(seen) == {cancelled, failed}
    with pytest.raises(KeyError, match="which"):
        gipc.result(failed)
    thread.join()


def test_leaving_as_completed_early_is_harmless() -> None:
    fs = futures(3)
    it = gipc.as_completed([done(0), *fs])
    next(it)
    it.close()
    # The callbacks stay on the futures (stdlib futures cannot drop them): completing
    # the futures afterwards, from another thread, must do nothing.
    thread = threading.Thread(target=finish(*fs))
    thread.start()
    thread.join()
    gevent.sleep(0.01)
    assert gipc.wait(fs).done == set(fs)


def test_a_killed_waiter_leaves_its_futures_harmless() -> None:
    f: "cf.Future[Any]" = cf.Future()
    waiting = gevent.spawn(gipc.result, f)
    gevent.sleep(0.01)
    waiting.kill()
    thread = threading.Thread(target=f.set_result, args=(7,))
    thread.start()
    thread.join()
    gevent.sleep(0.01)
    assert gipc.result(f) == 7


# --- result -------------------------------------------------------------------------------


def test_result_returns_or_raises(ticker: Ticker) -> None:
    f: "cf.Future[Any]" = cf.Future()
    thread = later(finish(f, value="ok"), after_ticks=10)
    assert gipc.result(f) == "ok"
    assert ticker.ticks >= 10
    thread.join()
    error = ValueError("the message")
    assert gipc.result(done(3)) == 3
    with pytest.raises(ValueError, match="the message") as info:
        gipc.result(fail(error))
    assert info.value is error


def test_result_timeout() -> None:
    f: "cf.Future[Any]" = cf.Future()
    with pytest.raises(cf.TimeoutError):
        gipc.result(f, timeout=0.02)
    with pytest.raises(cf.TimeoutError):
        gipc.result(f, timeout=0)
    f.set_result(1)
    assert gipc.result(f, timeout=0) == 1


def test_a_gevent_timeout_around_a_wait_interrupts_it() -> None:
    never: "cf.Future[Any]" = cf.Future()
    with pytest.raises(gevent.Timeout):
        with gevent.Timeout(0.02):
            gipc.result(never)
    with pytest.raises(gevent.Timeout):
        with gevent.Timeout(0.02):
            gipc.wait(iter([never]), timeout=PATIENCE)
    never.set_result(1)
    assert gipc.result(never) == 1


# --- executors ----------------------------------------------------------------------------


def test_thread_pool_futures(ticker: Ticker) -> None:
    gate = threading.Event()
    with cf.ThreadPoolExecutor(4) as executor:
        fs = [executor.submit(lambda i=i: gate.wait(PATIENCE) and i) for i in range(8)]
        later(gate.set, after_ticks=10)
        assert sorted(f.result() for f in gipc.as_completed(fs)) == list(range(8))
        assert ticker.ticks >= 10
        boom = executor.submit(lambda: 1 // 0)
        assert gipc.wait([boom, *fs], return_when=gipc.FIRST_EXCEPTION).done >= {boom}
        with pytest.raises(ZeroDivisionError):
            gipc.result(boom)


def _stop_multiprocessings_helpers() -> None:
    """multiprocessing's own fork server and resource tracker (started by a
    ProcessPoolExecutor under the start methods forkserver and spawn) live on after it: no
    child of this test may (see conftest.py)."""
    from multiprocessing import forkserver, resource_tracker

    forkserver._forkserver._stop()  # type: ignore[attr-defined]
    resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]


def test_a_mix_of_executors() -> None:
    try:
        with gipc.ProcessPool(1) as pool, cf.ThreadPoolExecutor(1) as threads, \
                cf.ProcessPoolExecutor(1) as processes:
            fs = [
                pool.submit(square, 2),
                threads.submit(square, 3),
                processes.submit(square, 4),
                pool.submit(square, 5),
            ]
            assert sorted(f.result() for f in gipc.as_completed(fs)) == [4, 9, 16, 25]
            assert gipc.wait(fs).not_done == set()
            assert [gipc.result(f) for f in fs] == [4, 9, 16, 25]
    finally:
        _stop_multiprocessings_helpers()


def test_own_futures_keep_their_cooperative_wait(ticker: Ticker) -> None:
    with gipc.ProcessPool(1) as pool:
        f = pool.submit(time.sleep, 0.1)
        assert gipc.result(f) is None
        # Waited on the pool future's own gevent event, not through a done-callback.
        assert f._done_callbacks == []
    assert ticker.ticks > 10


# --- how it waits -------------------------------------------------------------------------


def _loop_iterations_during(wait: Callable[[], object]) -> int:
    iterations = 0

    def count() -> None:
        nonlocal iterations
        iterations += 1

    # A check watcher runs once after every poll of the loop (prepare ones are not on libuv).
    watcher = gevent.get_hub().loop.check()
    watcher.start(count)
    try:
        wait()
    finally:
        watcher.close()
    return iterations


def test_a_wait_neither_polls_nor_starts_threads() -> None:
    f: "cf.Future[Any]" = cf.Future()
    threads: List[int] = []

    def waiting() -> None:
        with pytest.raises(cf.TimeoutError):
            gipc.result(f, timeout=0.3)

    def look() -> None:
        gevent.sleep(0.1)
        threads.append(threading.active_count())

    looking = gevent.spawn(look)
    before = threading.active_count()
    # A poll every millisecond would be ~300 iterations; a sleeping loop makes a handful.
    assert _loop_iterations_during(waiting) < 30
    looking.join()
    assert threads == [before]


@pytest.mark.parametrize("n", [1, 200])
def test_many_completions_from_many_threads(n: int) -> None:
    fs = futures(n)
    threads = [threading.Thread(target=f.set_result, args=(i,)) for i, f in enumerate(fs)]
    for t in threads:
        t.start()
    assert sorted(f.result() for f in gipc.as_completed(fs)) == list(range(n))
    for t in threads:
        t.join()


def test_wait_from_a_second_thread_with_its_own_hub() -> None:
    f: "cf.Future[Any]" = cf.Future()
    got: List[Any] = []

    waiting = threading.Event()

    def elsewhere() -> None:
        waiting.set()
        got.append(gipc.result(f, timeout=PATIENCE))
        gevent.get_hub().destroy(destroy_loop=True)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    # Completed from this thread, likely while the other one waits (done before is right too).
    waiting.wait(PATIENCE)
    time.sleep(0.05)
    f.set_result("there")
    thread.join()
    assert got == ["there"]


PATCHED_PROGRAM = """
    from gevent import monkey
    monkey.patch_all()
    import concurrent.futures as cf, threading, time
    import gevent, gipc

    ticks = 0
    def tick():
        global ticks
        while True:
            gevent.sleep(0.001)
            ticks += 1
    gevent.spawn(tick)

    # Under patch_all a ThreadPoolExecutor's threads are greenlets...
    with cf.ThreadPoolExecutor(4) as executor:
        fs = [executor.submit(time.sleep, 0.05) for _ in range(8)]
        fs.append(executor.submit(lambda: 1 // 0))
        assert len(list(gipc.as_completed(fs))) == 9
        assert gipc.wait(fs, return_when=gipc.FIRST_EXCEPTION).done == set(fs)
    # ...and gevent's threadpool runs real threads.
    real = cf.Future()
    gevent.get_hub().threadpool.spawn(lambda: (time.sleep(0.1), real.set_result("real")))
    before = ticks
    assert gipc.result(real) == "real"
    assert ticks - before > 10, ticks - before
    with gipc.ProcessPool(1) as pool:
        assert gipc.result(pool.submit(abs, -3)) == 3
    never = cf.Future()
    try:
        gipc.result(never, timeout=0.02)
    except cf.TimeoutError:
        print("all good")
"""


def test_under_monkey_patching() -> None:
    result = run_python(PATCHED_PROGRAM)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all good" in result.stdout
