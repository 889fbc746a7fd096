"""gipc 1.x programs run unchanged: the behaviours that replaying real 1.x usage found
different (bytes-like messages, the module-wide default codec, the codec error type, closing
a handle while a greenlet reads it, handles shared between OS threads, Python 3.14's
``Process.interrupt()``)."""

from __future__ import annotations

import array
import ctypes
import io
import marshal
import pickle
import signal
import sys
import threading
import time
import types
from typing import Any, Dict, Iterator, List

import gevent
import gevent.lock
import pytest

import gipc
import gipc.gipc
from gipc import GIPCClosed, GIPCError, GIPCLocked

# --- 1. bytes-like messages -------------------------------------------------------------


def echo_raw_frames(handle: Any) -> None:
    """An actor that answers every raw frame with a bytearray (as actor frameworks do)."""
    for frame in handle:
        reply = bytearray(b"re:")
        reply += frame
        handle.put(reply)


class TestBytesLike:
    @pytest.mark.parametrize(
        "payload, expected",
        [
            (bytearray(b"frame"), b"frame"),
            (memoryview(b"a view"), b"a view"),
            (memoryview(b"0123456789")[2:6], b"2345"),
            (array.array("i", [1, 2]), array.array("i", [1, 2]).tobytes()),
            ((ctypes.c_uint8 * 3)(7, 8, 9), bytes([7, 8, 9])),
            (memoryview(array.array("d", [1.5, 2.5])), array.array("d", [1.5, 2.5]).tobytes()),
            (bytearray(), b""),
        ],
        ids=["bytearray", "memoryview", "slice", "array", "ctypes", "doubles", "empty"],
    )
    def test_raw_pipe_takes_any_contiguous_buffer(self, payload, expected):
        with gipc.pipe(encoder=None, decoder=None) as (r, w):
            w.put(payload)
            got = r.get()
            assert type(got) is bytes and got == expected

    def test_large_buffers_through_a_child_both_ways(self):
        # Large enough for the bulk lane and for several partial writes.
        big = bytearray(range(256)) * (3 << 12)
        with gipc.pipe(duplex=True, encoder=None, decoder=None) as (mine, theirs):
            p = gipc.start_process(echo_raw_frames, (theirs,))
            mine.put(big)
            mine.put(memoryview(big)[:100])
            assert mine.get() == b"re:" + bytes(big)
            assert mine.get() == b"re:" + bytes(big[:100])
        p.join(10)
        assert p.exitcode == 0

    def test_put_many_takes_buffers_too(self):
        with gipc.pipe(encoder=None, decoder=None) as (r, w):
            w.put_many([bytearray(b"1"), memoryview(b"22"), b"333"])
            assert r.get_many() == [b"1", b"22", b"333"]

    def test_encoder_may_return_a_bytearray(self):
        with gipc.pipe(encoder=lambda o: bytearray(o.encode()), decoder=bytes.decode) as (r, w):
            w.put("text")
            assert r.get() == "text"

    def test_default_codecs_keep_bytearray_a_bytearray(self):
        with gipc.pipe() as (r, w):
            w.put(bytearray(b"x"))
            got = r.get()
            assert type(got) is bytearray and got == b"x"

    @pytest.mark.parametrize(
        "bad", ["str", 12, None, [1], memoryview(b"abcdef")[::2]],
        ids=["str", "int", "None", "list", "strided"],
    )
    def test_non_buffers_and_strided_views_are_refused_by_name(self, bad):
        with gipc.pipe(encoder=None, decoder=None) as (r, w):
            with pytest.raises(TypeError, match=type(bad).__name__) as info:
                w.put(bad)
            assert isinstance(info.value, GIPCError)
            with pytest.raises(TypeError, match=type(bad).__name__):
                w.put_many([b"fine", bad])
            w.put(b"the pipe is still usable")
            assert r.get() == b"the pipe is still usable"

    def test_encoder_returning_a_non_buffer_is_refused_by_name(self):
        with gipc.pipe(encoder=lambda o: 42, decoder=None) as (r, w):
            with pytest.raises(TypeError, match="encoder must return.*int"):
                w.put("x")

    def test_buffer_is_written_in_place_not_copied(self):
        # Nothing reads while the payload is sent, so put() waits mid-message; the
        # bytearray is exported to the core meanwhile and cannot be resized under it.
        payload = bytearray(4 << 20)
        with gipc.pipe(encoder=None, decoder=None) as (r, w):
            g = gevent.spawn(w.put, payload)
            gevent.sleep(0.01)
            assert not g.ready()
            with pytest.raises(BufferError):
                payload.extend(b"more")
            assert r.get() == bytes(4 << 20)
            g.get(timeout=10)
        payload.extend(b"more")  # released once written


# --- 2. the module-wide default codec ------------------------------------------------------


def _make_function(code: bytes, name: str) -> Any:
    return types.FunctionType(marshal.loads(code), globals(), name)


class _FunctionPickler(pickle.Pickler):
    """A pickler that ships lambdas by their code, like function-aware picklers do."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.FunctionType) and obj.__name__ == "<lambda>":
            return _make_function, (marshal.dumps(obj.__code__), obj.__name__)
        return NotImplemented


def dumps_functions(obj: Any) -> bytes:
    buffer = io.BytesIO()
    _FunctionPickler(buffer, pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def apply_shipped_functions(tasks: Any, results: Any) -> None:
    for fn, arg in tasks:
        results.put(fn(arg))


@pytest.fixture
def restore_default_codec() -> Iterator[None]:
    saved = gipc.gipc._default_encoder, gipc.gipc._default_decoder
    yield
    gipc.gipc._default_encoder, gipc.gipc._default_decoder = saved


@pytest.mark.usefixtures("restore_default_codec")
class TestDefaultCodec:
    def ship_lambdas(self) -> List[Any]:
        with gipc.pipe() as (task_r, task_w), gipc.pipe() as (res_r, res_w):
            p = gipc.start_process(apply_shipped_functions, (task_r, res_w))
            task_w.put((lambda x: x * 2, 21))
            task_w.put((lambda s: s.upper(), "ok"))
            task_w.close()
            results = [res_r.get(), res_r.get()]
        p.join(10)
        assert p.exitcode == 0
        return results

    def test_without_it_lambdas_do_not_pickle(self):
        with gipc.pipe() as (r, w):
            with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
                w.put(lambda: None)

    def test_assigning_the_1x_module_globals_changes_every_later_pipe(self):
        gipc.gipc._default_encoder = dumps_functions
        assert self.ship_lambdas() == [42, "OK"]

    def test_set_default_codec_is_the_documented_way(self):
        gipc.set_default_codec(dumps_functions, pickle.loads)
        assert gipc.get_default_codec() == (dumps_functions, pickle.loads)
        assert gipc.gipc._default_encoder is dumps_functions  # what 1.x code reads
        assert self.ship_lambdas() == [42, "OK"]
        gipc.set_default_codec()  # back to pickle
        assert gipc.get_default_codec() == (gipc.gipc._default_encoder, pickle.loads)
        with gipc.pipe() as (r, w):
            with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
                w.put(lambda: None)

    def test_existing_pipes_keep_their_codec(self):
        with gipc.pipe() as (r, w):
            gipc.set_default_codec(lambda o: b"X" + pickle.dumps(o), lambda b: b)
            w.put(1)
            assert r.get() == 1

    def test_custom_default_reaches_the_wire(self):
        gipc.set_default_codec(lambda o: b"X" + pickle.dumps(o), lambda b: pickle.loads(b[1:]))
        with gipc.pipe() as (r, w), gipc.pipe(decoder=None) as (raw_r, raw_w):
            w.put({"a": 1})
            assert r.get() == {"a": 1}
            raw_w.put("y")
            assert raw_r.get().startswith(b"X")

    def test_bad_default_is_refused(self):
        with pytest.raises(TypeError) as info:
            gipc.set_default_codec(encoder="pickle")  # type: ignore[arg-type]
        assert isinstance(info.value, GIPCError)


# --- 3. the codec error type --------------------------------------------------------------


class TestCodecErrors:
    @pytest.mark.parametrize(
        "kwargs, python_error",
        [
            ({"encoder": 1}, TypeError),
            ({"decoder": object()}, TypeError),
            ({"encoder": "json"}, ValueError),
            ({"decoder": "bogus"}, ValueError),
        ],
    )
    def test_caught_as_gipc_error_and_as_the_python_error(self, kwargs, python_error):
        for caught in (GIPCError, python_error):
            with pytest.raises(caught):
                gipc.pipe(**kwargs)
        with pytest.raises(python_error) as info:
            gipc.pipe(**kwargs)
        assert isinstance(info.value, GIPCError)


# --- 4. closing while a greenlet reads ----------------------------------------------------


def read_until_end(handle: Any) -> None:
    for _ in handle:
        pass


def reading_greenlet(handle: Any) -> gevent.Greenlet:
    g = gevent.spawn(handle.get)
    gevent.sleep(0.01)
    assert not g.ready()
    return g


def state(handle: Any) -> Dict[str, bool]:
    return {"reader": handle._reader.closed, "writer": handle._writer.closed}


class TestCloseWhileReading:
    def test_duplex_close_closes_the_writer_and_refuses_the_reader(self):
        h1, h2 = gipc.pipe(duplex=True)
        g = reading_greenlet(h1)
        with pytest.raises(GIPCLocked, match="reading half"):
            h1.close()
        assert state(h1) == {"reader": False, "writer": True}
        assert not h1.closed
        with pytest.raises(EOFError):  # the peer sees the end of the stream
            h2.get()
        g.kill()
        h1.close()  # closes what was left
        assert h1.closed
        with pytest.raises(GIPCClosed):
            h1.close()
        h2.close()

    def test_duplex_close_while_writing_closes_the_reader(self):
        # gipc 1.x left the reading half open here; every part not in use is closed.
        h1, h2 = gipc.pipe(duplex=True, encoder=None, decoder=None)
        g = gevent.spawn(h1.put, bytes(8 << 20))
        gevent.sleep(0.01)
        assert not g.ready()
        with pytest.raises(GIPCLocked, match="writing half"):
            h1.close()
        assert state(h1) == {"reader": True, "writer": False}
        assert len(h2.get()) == 8 << 20
        g.get(timeout=10)
        h1.close()
        h2.close()

    def test_pair_exit_closes_everything_not_in_use(self):
        with pytest.raises(GIPCLocked):
            with gipc.pipe(duplex=True) as (h1, h2):
                g = reading_greenlet(h1)
        assert state(h1) == {"reader": False, "writer": True}
        assert h2.closed
        g.kill()
        h1.close()

    def test_simplex_pair_exit_closes_the_writer(self):
        with pytest.raises(GIPCLocked):
            with gipc.pipe() as (r, w):
                g = reading_greenlet(r)
        assert w.closed and not r.closed
        with pytest.raises(EOFError):
            g.get()
        r.close()

    def test_handle_context_exit(self):
        h1, h2 = gipc.pipe(duplex=True)
        with pytest.raises(GIPCLocked):
            with h1:
                g = reading_greenlet(h1)
        assert state(h1) == {"reader": False, "writer": True}
        g.kill()
        h1.close()
        h2.close()

    def test_exit_on_error_keeps_the_error_and_still_closes_the_rest(self):
        with pytest.raises(ZeroDivisionError):
            with gipc.pipe(duplex=True) as (h1, h2):
                g = reading_greenlet(h1)
                raise ZeroDivisionError
        assert state(h1) == {"reader": False, "writer": True} and h2.closed
        g.kill()
        h1.close()

    def test_child_waiting_for_the_end_exits_and_join_returns(self):
        # The 1.x program shape: a child serves until its peer goes away, while a
        # greenlet of the parent still waits for a reply on the same handle.
        with pytest.raises(GIPCLocked):
            with gipc.pipe(duplex=True) as (mine, theirs):
                p = gipc.start_process(read_until_end, (theirs,))
                g = reading_greenlet(mine)
        p.join(10)
        assert p.exitcode == 0
        with pytest.raises(EOFError):  # the child's end closed when it exited
            g.get(timeout=10)
        mine.close()


# --- 5. one handle, several OS threads ------------------------------------------------------


def count_messages(reader: Any, expected: int) -> Dict[int, List[int]]:
    seen: Dict[int, List[int]] = {}
    for _ in range(expected):
        thread_no, i, padding = reader.get()
        assert padding == b"p" * 50
        seen.setdefault(thread_no, []).append(i)
    return seen


def run_threads(target: Any, count: int) -> None:
    errors: List[BaseException] = []

    def guarded(n: int) -> None:
        try:
            target(n)
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)
        finally:
            # Each thread got a hub and loop of its own; gevent leaves them to the program.
            gevent.get_hub().destroy(destroy_loop=True)

    threads = [threading.Thread(target=guarded, args=(n,), daemon=True) for n in range(count)]
    for t in threads:
        t.start()
    # Waits cooperatively: greenlets of this thread may be the threads' peers.
    deadline = time.monotonic() + 60
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        gevent.sleep(0.01)
    assert not [t for t in threads if t.is_alive()], "a thread is stuck (deadlock)"
    assert not errors, errors


class TestThreads:
    THREADS = 8
    PUTS = 1000

    def test_eight_threads_put_on_one_writer(self):
        with gipc.pipe() as (r, w):
            p = gipc.start_process(count_messages, (r, self.THREADS * self.PUTS), capture=True)

            def put_many(n: int) -> None:
                for i in range(self.PUTS):
                    w.put((n, i, b"p" * 50))

            run_threads(put_many, self.THREADS)
            seen = p.result(60)
        p.join(10)
        assert sorted(seen) == list(range(self.THREADS))
        for n in range(self.THREADS):
            assert seen[n] == list(range(self.PUTS)), "one thread's messages out of order"

    def test_threads_and_greenlets_share_one_reader(self):
        total = self.THREADS * 200
        got: List[Any] = []
        with gipc.pipe() as (r, w):
            writer = gevent.spawn(lambda: [w.put(i) for i in range(total)])

            def take(n: int) -> None:
                for _ in range(100):
                    got.append(r.get())

            greenlets = [gevent.spawn(take, n) for n in range(self.THREADS)]
            run_threads(take, self.THREADS)
            gevent.joinall(greenlets, raise_error=True, timeout=60)
            writer.get(timeout=60)
        assert sorted(got) == list(range(total))

    def test_a_reader_that_waited_for_the_lock_looks_again(self):
        # get() found nothing to read and went for the lock; another consumer held it (as a
        # greenlet queued ahead, or another thread, may), and meanwhile took the pipe's
        # contents into the reader's buffer. The first get() must look at the buffer again,
        # not wait for the descriptor, which nothing will make readable again.
        with gipc.pipe() as (r, w):
            queue = r._lock._queues.setdefault(threading.get_ident(), gevent.lock.Semaphore())
            queue.acquire()  # the consumer ahead
            g = gevent.spawn(r.get)
            gevent.sleep(0.01)
            assert not g.ready()
            w.put("first")
            w.put("second")
            kind, payload = r._core.try_recv()  # that consumer reads; both are buffered now
            assert pickle.loads(payload) == "first"
            queue.release()
            assert g.get(timeout=5) == "second"

    def test_close_from_another_thread_while_one_reads(self):
        r, w = gipc.pipe()
        started = threading.Event()
        outcome: List[BaseException] = []

        def read() -> None:
            started.set()
            try:
                r.get()
            except BaseException as e:
                outcome.append(e)
            finally:
                gevent.get_hub().destroy(destroy_loop=True)

        t = threading.Thread(target=read, daemon=True)
        t.start()
        started.wait(10)
        gevent.sleep(0.05)
        with pytest.raises(GIPCLocked):
            r.close()
        w.close()  # the reading thread sees the end of the stream
        t.join(10)
        assert not t.is_alive()
        assert isinstance(outcome[0], EOFError)
        r.close()


# --- 6. Process.interrupt() (Python 3.14) -------------------------------------------------


def report_then_sleep(ready: Any) -> None:
    ready.put("running")
    gevent.sleep(60)


def running_child() -> Any:
    # Signalled only once the child runs its target: a signal in the start-up window is
    # test_process's subject, not this one's.
    with gipc.pipe() as (r, w):
        p = gipc.start_process(report_then_sleep, (w,))
        assert r.get() == "running"
    return p


class TestInterrupt:
    def test_popen_interrupt_sends_sigint(self):
        p = running_child()
        p._popen.interrupt()
        p.join(10)
        assert p.exitcode == -signal.SIGINT

    def test_process_interrupt(self):
        # Process.interrupt() is new in 3.14 (it calls the popen's); gipc has it on every
        # version.
        p = running_child()
        p.interrupt()
        p.join(10)
        assert p.exitcode == -signal.SIGINT
        p.interrupt()  # an exited child: nothing to do, as terminate()
        p.close()
        with pytest.raises(ValueError):
            p.interrupt()

    @pytest.mark.skipif(sys.version_info < (3, 14), reason="multiprocessing's own interrupt()")
    def test_multiprocessing_interrupt_reaches_gipc(self):
        import multiprocessing

        p = running_child()
        multiprocessing.Process.interrupt(p)
        p.join(10)
        assert p.exitcode == -signal.SIGINT


# --- 2b. the default codec and the pool ---------------------------------------------------


@pytest.mark.usefixtures("restore_default_codec")
class TestPoolCodec:
    def test_pool_takes_its_own_codec(self):
        with gipc.ProcessPool(1, encoder=dumps_functions) as pool:
            assert pool.submit(lambda x: x + 1, 41).result(10) == 42
            assert list(pool.map(lambda s: s * 2, ["a", "b"])) == ["aa", "bb"]

    def test_pool_follows_the_process_default(self):
        gipc.set_default_codec(dumps_functions, pickle.loads)
        with gipc.ProcessPool(1) as pool:
            gipc.set_default_codec()  # a pool keeps what was set when it was made
            assert pool.submit(lambda: "shipped").result(10) == "shipped"

    def test_without_it_a_lambda_fails_its_future_only(self):
        with gipc.ProcessPool(1) as pool:
            with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
                pool.submit(lambda: None).result(10)
            assert pool.submit(abs, -3).result(10) == 3

    @pytest.mark.parametrize(
        "kwargs", [{"encoder": None}, {"decoder": 3}, {"encoder": "json"}]
    )
    def test_bad_codecs_are_refused(self, kwargs):
        with pytest.raises(GIPCError):
            gipc.ProcessPool(1, **kwargs)
