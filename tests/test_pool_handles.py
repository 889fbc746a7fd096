"""gipc handles handed to ProcessPool tasks: their descriptors go with the task to the
worker that runs it, and the caller's copies close, as with start_process."""

from __future__ import annotations

import os
import pickle
import signal
import time

import gevent
import gipc
import pytest
from gipc import GIPCClosed, GIPCError
from gipc.pool import ProcessPool, TaskTimeout, WorkerCrashed

# --- Task functions (module level, so they pickle by reference) ---------------------------


def echo_over(reader, writer):
    """Reads one message from the caller and sends it back with the worker's pid."""
    message = reader.get(timeout=10)
    writer.put((message, os.getpid()))
    return os.getpid()


def echo_duplex(channel):
    with channel:
        channel.put(channel.get(timeout=10) * 2)
    return os.getpid()


def worker_fds(_=None):
    # A worker makes its hub (an epoll and an eventfd) when it first waits: make it now, or
    # the hub's descriptors could be counted as the task's.
    gevent.get_hub()
    return sorted(int(fd) for fd in os.listdir("/proc/self/fd"))


def ignore(*handles):
    return len(handles)


def pid_after(seconds):
    time.sleep(seconds)
    return os.getpid()


def nested(box):
    [(_, writer)] = box["pairs"]
    writer.put("from a nested handle")
    writer.close()
    return "done"


def big_and_handle(data, writer):
    writer.put(len(data))
    writer.close()
    return data[-3:]


def _raise_value_error(message):
    raise ValueError(message)


def _sleep_then_none(seconds):
    time.sleep(seconds)


class FailsWhenUnpickled:
    def __reduce__(self):
        return _raise_value_error, ("cannot be rebuilt here",)


class SlowToUnpickle:
    def __init__(self, seconds):
        self.seconds = seconds

    def __reduce__(self):
        return _sleep_then_none, (self.seconds,)


class DiesWhenUnpickled:
    """Kills the worker as the task's call is decoded: before the worker claims the task."""

    def __reduce__(self):
        return os._exit, (7,)


def never_runs(_handle, _bomb):
    raise AssertionError("the worker should have died decoding this task")


# --- Tests ------------------------------------------------------------------------------


def test_a_pipe_made_after_the_pool_started_is_handed_to_a_task_and_used_both_ways():
    with ProcessPool(max_workers=1) as pool:
        pid = pool.submit(os.getpid).result()  # the worker runs before the pipes exist
        with gipc.pipe() as (to_task, from_caller), gipc.pipe() as (from_task, to_caller):
            future = pool.submit(echo_over, to_task, to_caller)
            from_caller.put("ping")
            assert from_task.get(timeout=10) == ("ping", pid)
            assert future.result(timeout=10) == pid
            # The caller's copies of what went to the task are closed.
            assert to_task.closed and to_caller.closed


def test_a_duplex_handle_goes_to_a_task():
    with ProcessPool(max_workers=1) as pool:
        with gipc.pipe(duplex=True) as (mine, theirs):
            future = pool.submit(echo_duplex, theirs)
            mine.put(21)
            assert mine.get(timeout=10) == 42
            assert theirs.closed
            future.result(timeout=10)


def test_handles_nested_in_an_argument_and_large_bytes_beside_them_arrive():
    with ProcessPool(max_workers=1) as pool:
        with gipc.pipe() as (reader, writer):
            assert pool.submit(nested, {"pairs": [(1, writer)]}).result(timeout=10) == "done"
            assert reader.get(timeout=10) == "from a nested handle"
        with gipc.pipe() as (reader, writer):
            data = os.urandom(300_000)  # travels as a message of its own, after the call
            assert pool.submit(big_and_handle, data, writer=writer).result(10) == data[-3:]
            assert reader.get(timeout=10) == len(data)


def test_a_worker_keeps_no_descriptor_of_a_task_s_handles_once_it_is_done():
    with ProcessPool(max_workers=1) as pool:
        before = pool.submit(worker_fds).result(timeout=10)
        for _ in range(5):
            with gipc.pipe() as (reader, writer):
                assert pool.submit(ignore, reader, writer).result(timeout=10) == 2
        after = pool.submit(worker_fds).result(timeout=10)
        assert after == before


def test_many_handle_tasks_among_quick_tasks_sent_ahead_all_complete():
    # Quick tasks are sent ahead to busy workers; a task with handles waits for an idle one
    # and nothing is sent ahead of it. None is lost, none waits for ever.
    with ProcessPool(max_workers=2, prefetch=8) as pool:
        quick = [pool.submit(abs, -i) for i in range(200)]
        pairs = [gipc.pipe() for _ in range(30)]
        replies = [gipc.pipe() for _ in range(30)]
        tasks = [
            pool.submit(echo_over, reader, reply_writer)
            for (reader, _), (_, reply_writer) in zip(pairs, replies)
        ]
        quick += [pool.submit(abs, -i) for i in range(200)]
        for i, (_, writer) in enumerate(pairs):
            writer.put(i)
        pids = {f.result(timeout=20) for f in tasks}
        for i, (reply_reader, _) in enumerate(replies):
            assert reply_reader.get(timeout=10)[0] == i
        assert [f.result(timeout=10) for f in quick] == list(range(200)) * 2
        assert len(pids) <= 2
        for (_, writer), (reply_reader, _) in zip(pairs, replies):
            writer.close()
            reply_reader.close()


def test_a_handle_task_goes_to_the_idle_worker_not_behind_a_long_task():
    with ProcessPool(max_workers=2) as pool:
        list(pool.map(pid_after, [0.2, 0.2]))  # both workers are up
        slow = pool.submit(pid_after, 2.0)
        gevent.sleep(0.2)  # running now, on one worker
        with gipc.pipe() as (reader, writer), gipc.pipe() as (back_r, back_w):
            future = pool.submit(echo_over, reader, back_w)
            writer.put("x")
            assert back_r.get(timeout=1.5)[0] == "x"
            assert not slow.done()
            assert future.result(timeout=10) != slow.result(timeout=10)


def test_a_handle_task_waits_for_its_worker_to_finish_the_one_it_runs():
    with ProcessPool(max_workers=1) as pool:
        slow = pool.submit(pid_after, 0.3)
        with gipc.pipe() as (reader, writer), gipc.pipe() as (back_r, back_w):
            future = pool.submit(echo_over, reader, back_w)
            after = pool.submit(pid_after, 0)
            writer.put("y")
            assert back_r.get(timeout=10) == ("y", slow.result(timeout=10))
            assert future.result(timeout=10) == after.result(timeout=10)


def test_a_closed_handle_fails_its_task_only():
    with ProcessPool(max_workers=1) as pool:
        pid = pool.submit(os.getpid).result()
        reader, writer = gipc.pipe()
        reader.close()
        with pytest.raises(GIPCClosed):
            pool.submit(echo_over, reader, writer).result(timeout=10)
        assert not writer.closed  # nothing went: the caller keeps what it passed
        writer.close()
        assert pool.submit(os.getpid).result(timeout=10) == pid  # the same worker serves on


def test_a_pool_with_its_own_encoder_refuses_handles_and_leaves_them_open():
    with ProcessPool(max_workers=1, encoder=pickle.dumps, decoder=pickle.loads) as pool:
        with gipc.pipe() as (reader, writer):
            with pytest.raises(GIPCError, match="default encoder"):
                pool.submit(echo_over, reader, writer).result(timeout=10)
            assert not reader.closed and not writer.closed
            assert pool.submit(abs, -3).result(timeout=10) == 3


def test_a_pipe_transport_worker_refuses_handles_with_a_clear_error(monkeypatch):
    # The pool's own pipes are made with the transport in force when a worker starts.
    monkeypatch.setattr(gipc._handles, "TRANSPORT", "pipe")
    with ProcessPool(max_workers=1) as pool:
        with gipc.pipe() as (reader, writer):
            with pytest.raises(GIPCError, match="'pipe' channel"):
                pool.submit(echo_over, reader, writer).result(timeout=10)
            assert not reader.closed and not writer.closed
            assert pool.submit(abs, -3).result(timeout=10) == 3


def claim_only_the_first_task():
    """A pool initializer: the worker claims its first task, then waits at its next claim
    (for a minute): a task sent to it after the first is never started."""
    from gipc.pool import _claims

    real = _claims.TaskClaims.claim
    claimed = []

    def claim(self, number):
        if claimed:
            time.sleep(60)
        claimed.append(number)
        return real(self, number)

    _claims.TaskClaims.claim = claim


def test_a_worker_that_dies_before_starting_a_handle_task_fails_it_instead_of_resending():
    # The worker takes the task off the pipe (its handles have gone) and stops before its
    # claim; it is killed there. The task cannot go to another worker, whose handles are
    # gone: it fails with WorkerCrashed. The pool serves on.
    with ProcessPool(max_workers=1, initializer=claim_only_the_first_task) as pool:
        pid = pool.submit(os.getpid).result()
        with gipc.pipe() as (reader, writer):
            future = pool.submit(ignore, writer)
            while not writer.closed:  # it went with the task
                gevent.sleep(0.01)
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(WorkerCrashed) as raised:
                future.result(timeout=10)
            assert raised.value.handles_lost and raised.value.pid == pid
            assert raised.value.exitcode == -signal.SIGKILL
            assert "cannot go to another worker" in str(raised.value)
            with pytest.raises(EOFError):
                reader.get(timeout=10)  # the writer died with the worker
        # The next worker claims its first task: it runs.
        assert pool.submit(os.getpid).result(timeout=10) != pid


def test_a_handle_task_whose_call_the_worker_cannot_decode_fails_with_that_error():
    # As for any task: the error from decoding the call, and the same worker serves on.
    with ProcessPool(max_workers=1) as pool:
        pid = pool.submit(os.getpid).result()
        with gipc.pipe() as (reader, writer):
            future = pool.submit(ignore, writer, FailsWhenUnpickled())
            with pytest.raises(ValueError, match="cannot be rebuilt here"):
                future.result(timeout=10)
            assert writer.closed
            with pytest.raises(EOFError):
                reader.get(timeout=10)  # the worker closed the handle it could not use
        assert pool.submit(os.getpid).result(timeout=10) == pid


def test_a_worker_that_dies_decoding_a_handle_task_fails_it_as_its_running_task():
    with ProcessPool(max_workers=1) as pool:
        pid = pool.submit(os.getpid).result()
        with gipc.pipe() as (reader, writer):
            future = pool.submit(never_runs, writer, DiesWhenUnpickled())
            with pytest.raises(WorkerCrashed) as raised:
                future.result(timeout=10)
            assert not raised.value.handles_lost and raised.value.exitcode == 7
        assert pool.submit(os.getpid).result(timeout=10) != pid


def test_a_handle_task_that_runs_out_of_time_while_decoding_fails_with_task_timeout():
    with ProcessPool(max_workers=1) as pool:
        pool.submit(os.getpid).result()
        with gipc.pipe() as (reader, writer):
            future = pool.submit_with_timeout(0.3, never_runs, writer, SlowToUnpickle(5))
            with pytest.raises(TaskTimeout):
                future.result(timeout=10)


def test_worker_crashed_with_lost_handles_pickles():
    error = WorkerCrashed(12, -9, "task f()", handles_lost=True)
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) and again.handles_lost
