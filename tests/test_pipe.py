"""The pipe API: handles, codecs, errors, timeouts, locking and context managers, within one
process (greenlet to greenlet). Cross-process behaviour is in test_process.py."""

from __future__ import annotations

import gc
import inspect
import json
import os
import pickle
import sys
import time
import weakref

import gevent
import gevent.event
import pytest

import gipc
from gipc import GIPCClosed, GIPCError, GIPCLocked, _core
from gipc.gipc import _GIPCDuplexHandle, _GIPCHandle, _GIPCReader, _GIPCWriter

from conftest import open_fds
from helpers import Ticker, raw_header, run_python


def decode_unless_bad(b: bytes) -> bytes:
    if b == b"bad":
        raise ValueError("cannot decode")
    return b


class Tagged(bytes):
    """A bytes subclass: must not take the unpickled fast path meant for exact bytes."""


class TestCreation:
    def test_simplex_pair(self):
        pair = gipc.pipe()
        reader, writer = pair
        assert isinstance(pair, tuple) and len(pair) == 2
        assert type(reader) is _GIPCReader and type(writer) is _GIPCWriter
        assert isinstance(reader, _GIPCHandle) and isinstance(writer, _GIPCHandle)
        reader.close()
        writer.close()

    def test_duplex_pair(self):
        with gipc.pipe(duplex=True) as (h1, h2):
            assert type(h1) is _GIPCDuplexHandle and type(h2) is _GIPCDuplexHandle
            h1.put(1)
            assert h2.get() == 1
            h2.put(2)
            assert h1.get() == 2

    def test_documented_names_are_importable(self):
        import gipc.gipc as module

        for name in ("_GIPCHandle", "_GIPCReader", "_GIPCWriter", "_GIPCDuplexHandle",
                     "_GProcess", "GIPCError", "GIPCClosed", "GIPCLocked"):
            assert hasattr(module, name)
        assert issubclass(GIPCClosed, GIPCError) and issubclass(GIPCLocked, GIPCError)

    @pytest.mark.parametrize(
        "kwargs, error",
        [
            ({"encoder": 1}, TypeError),
            ({"decoder": 1.5}, TypeError),
            ({"encoder": "json"}, ValueError),
            ({"decoder": "pickle"}, ValueError),
            ({"max_message_size": -1}, ValueError),
        ],
    )
    def test_bad_arguments_are_rejected_before_any_descriptor_exists(self, kwargs, error):
        before = open_fds()
        with pytest.raises(error):
            gipc.pipe(**kwargs)
        assert open_fds() == before


class TestCodecs:
    @pytest.mark.parametrize(
        "obj",
        [None, 0, -1, 2**100, 1.5, "text", "ünïcode", b"", b"bytes", bytearray(b"ba"),
         [1, [2, 3]], {"a": (1, 2)}, {1, 2}, ValueError("boom")],
        ids=repr,
    )
    def test_default_codec_round_trips(self, obj):
        with gipc.pipe() as (r, w):
            w.put(obj)
            got = r.get()
        if isinstance(obj, Exception):
            assert type(got) is ValueError and got.args == obj.args
        else:
            assert got == obj and type(got) is type(obj)

    def test_bytes_subclass_keeps_its_type(self):
        with gipc.pipe() as (r, w):
            w.put(Tagged(b"x"))
            assert type(r.get()) is Tagged

    def test_raw_mode_takes_bytes_like_and_returns_bytes(self):
        # gipc 1.x took anything with the buffer protocol here; the reader gets bytes.
        with gipc.pipe(encoder=None, decoder=None) as (r, w):
            w.put(b"raw")
            assert r.get() == b"raw"
            for bad in ("str", 1, None, [1, 2], memoryview(b"abcd")[::2]):
                with pytest.raises(TypeError) as info:
                    w.put(bad)
                assert isinstance(info.value, gipc.GIPCError)
                assert type(bad).__name__ in str(info.value)
            w.put(b"still fine")
            assert r.get() == b"still fine"

    def test_json_callables(self):
        enc = lambda o: json.dumps(o).encode("ascii")  # noqa: E731
        dec = lambda b: json.loads(b.decode("ascii"))  # noqa: E731
        with gipc.pipe(encoder=enc, decoder=dec) as (r, w):
            w.put({"a": [1, 2]})
            assert r.get() == {"a": [1, 2]}
            w.put(b"raw bytes go through the encoder too".decode())
            assert r.get() == "raw bytes go through the encoder too"

    def test_encoder_must_return_bytes(self):
        with gipc.pipe(encoder=lambda o: str(o)) as (r, w):
            with pytest.raises(TypeError, match="encoder must return bytes"):
                w.put(1)

    def test_decoder_error_leaves_the_pipe_usable(self):
        with gipc.pipe(encoder=None, decoder=decode_unless_bad) as (r, w):
            w.put(b"bad")
            w.put(b"good")
            with pytest.raises(ValueError, match="cannot decode"):
                r.get()
            assert r.get() == b"good"

    def test_pickling_error_sends_nothing(self):
        with gipc.pipe() as (r, w):
            with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
                w.put(lambda: None)
            w.put("next")
            assert r.get() == "next"

    @pytest.mark.parametrize("kind", [_core.KIND_BYTES, _core.KIND_BATCH])
    @pytest.mark.parametrize("decoder", [None, decode_unless_bad], ids=["raw", "callable"])
    def test_frames_only_pickle_pipes_carry_are_refused_elsewhere(self, kind, decoder):
        # The kind comes from the peer: unpickled bytes and pickled batches must not
        # bypass a pipe's own decoder, on get()'s fast path included.
        with gipc.pipe(encoder=None, decoder=decoder) as (r, w):
            assert w._core.try_send(kind, pickle.dumps([b"x"])) == _core.DONE
            with pytest.raises(GIPCError, match=f"refused a frame of kind {kind}"):
                r.get()


    @pytest.mark.parametrize("batch", [{"a": 1}, (1, 2), [], b"xy"], ids=repr)
    def test_a_batch_frame_that_is_not_a_non_empty_list_is_refused(self, batch):
        # put_many() sends a non-empty list; a peer that sends anything else gets a clear
        # error (not a TypeError or IndexError from unpacking it), and the pipe goes on.
        with gipc.pipe() as (r, w):
            assert w._core.try_send(_core.KIND_BATCH, pickle.dumps(batch)) == _core.DONE
            w.put("next")
            with pytest.raises(GIPCError, match="refused a batch frame holding"):
                r.get()
            assert r.get() == "next"

    def test_a_decoder_that_reads_its_own_handle_is_refused_not_left_waiting_for_itself(self):
        # A decoder that calls get() on its own reader: the inner get takes the handle and
        # the next message, whose decoding calls get() again, which would wait for the
        # inner get, i.e. for ever. (The inner gets have timeout=2: without the refusal, one
        # times out instead, and gevent's Timeout is what this test sees.)
        def decoder(payload):
            if payload == b"recurse":
                return payload, reader.get(timeout=2)
            return payload

        with gipc.pipe(encoder=None, decoder=decoder) as (reader, w):
            w.put(b"recurse")
            w.put(b"recurse")
            w.put(b"next")
            with pytest.raises(GIPCLocked, match="already using the handle"):
                reader.get()
            # Both messages went to decoders that failed, as any decoder's error takes its
            # message; the handle is free again, and the stream goes on.
            assert reader.get() == b"next"


class TestPutPaths:
    """``put`` runs in ``_core`` for the common cases, in Python for the rest."""

    @staticmethod
    def python_calls(call):
        """The names of the Python functions ``call()`` runs (as ``sys.setprofile`` sees
        them)."""
        names = []

        def profile(frame, event, arg):
            if event == "call":
                names.append(frame.f_code.co_name)

        sys.setprofile(profile)
        try:
            call()
        finally:
            sys.setprofile(None)
        return names

    @pytest.mark.parametrize("codecs", ["pickle", "raw"])
    def test_the_common_case_runs_no_python_code(self, codecs):
        kwargs = {} if codecs == "pickle" else {"encoder": None, "decoder": None}
        with gipc.pipe(**kwargs) as (r, w):
            assert self.python_calls(lambda: w.put(b"x")) == ["<lambda>"]
            if codecs == "pickle":
                assert self.python_calls(lambda: w.put({"a": 1})) == ["<lambda>"]
            assert r.get() == b"x"
            if codecs == "pickle":
                assert r.get() == {"a": 1}

    def test_the_other_cases_take_the_python_way(self):
        with gipc.pipe(encoder=None, decoder=None) as (r, w):
            assert "_put_python" in self.python_calls(lambda: w.put(bytearray(b"ba")))
            assert r.get() == b"ba"
        with gipc.pipe(encoder=str.encode, decoder=bytes.decode) as (r, w):
            assert "_put_python" in self.python_calls(lambda: w.put("text"))
            assert r.get() == "text"
        with gipc.pipe() as (r, w):

            def hold():  # as another greenlet waiting inside put does
                with w._lock:
                    gevent.sleep(0.02)

            holder = gevent.spawn(hold)
            gevent.sleep(0)
            calls = self.python_calls(lambda: w.put({"a": 1}))
            assert "_put_locked" in calls and "_put_python" not in calls  # pickled once
            holder.get()
            assert r.get() == {"a": 1}

    def test_a_put_that_must_wait_finishes_in_order(self):
        with gipc.pipe() as (r, w):
            messages = [bytes([i]) * 1000 for i in range(200)]  # more than a pipe holds
            first = gevent.spawn(lambda: [w.put(m) for m in messages])
            gevent.sleep(0.01)
            assert w._lock.locked()  # waiting for room, under the lock
            after = gevent.spawn(w.put, b"after")  # must queue behind, through the lock
            gevent.sleep(0)
            assert [r.get() for _ in messages] == messages
            assert r.get() == b"after"
            first.get()
            after.get()

    def test_the_lock_is_looked_at_after_pickling(self):
        """As in Python: pickling may run code that lets another greenlet start I/O."""
        with gipc.pipe() as (r, w):
            stop = gevent.event.Event()

            def hold():
                with w._lock:
                    stop.wait()

            class Switches:
                def __reduce__(self):
                    gevent.spawn(hold)
                    gevent.sleep(0)  # it takes the lock now
                    assert w._lock.locked()
                    gevent.spawn_later(0.01, stop.set)
                    return (str, ("switched",))

            calls = self.python_calls(lambda: w.put(Switches()))
            assert "_put_locked" in calls
            assert r.get() == "switched"

    def test_arguments_are_those_of_the_python_method(self):
        with gipc.pipe() as (r, w):
            w.put(o=b"named")
            assert r.get() == b"named"
            for args, kwargs in [((), {}), ((1, 2), {}), ((), {"x": 1}), ((1,), {"o": 2})]:
                with pytest.raises(TypeError):
                    w.put(*args, **kwargs)
            assert "Encode ``o``" in w.put.__doc__
            assert str(inspect.signature(w.put)) == "(o)"
            w.close()
            with pytest.raises(GIPCClosed):
                w.put(b"x")


class TestGetPaths:
    """``get`` runs in ``_core`` for the common cases, in Python for the rest."""

    python_calls = staticmethod(TestPutPaths.python_calls)

    @pytest.mark.parametrize("codecs", ["pickle", "raw"])
    def test_the_common_case_runs_no_python_code(self, codecs):
        kwargs = {} if codecs == "pickle" else {"encoder": None, "decoder": None}
        with gipc.pipe(**kwargs) as (r, w):
            w.put(b"x")
            if codecs == "pickle":
                w.put({"a": 1})
            got = []
            assert self.python_calls(lambda: got.append(r.get())) == ["<lambda>"]
            if codecs == "pickle":
                assert self.python_calls(lambda: got.append(r.get())) == ["<lambda>"]
                assert got == [b"x", {"a": 1}]
            else:
                assert got == [b"x"]

    def test_the_other_cases_take_the_python_way(self):
        with gipc.pipe(encoder=str.encode, decoder=bytes.decode) as (r, w):
            w.put("text")
            got = []
            assert "_decode" in self.python_calls(lambda: got.append(r.get()))
            assert got == ["text"]
        with gipc.pipe() as (r, w):
            w.put(b"timed")
            calls = self.python_calls(lambda: got.append(r.get(5)))
            assert "_get_python" in calls and got[-1] == b"timed"
            w.put_many([1, 2, 3])
            assert r.get() == 1  # the batch: 2 and 3 wait in the backlog
            calls = self.python_calls(lambda: got.append(r.get()))
            assert "_next_from_backlog" in calls and got[-1] == 2
            assert r.get() == 3

            def hold():  # as another greenlet waiting inside get does
                with r._lock:
                    gevent.sleep(0.02)

            w.put(b"behind")
            holder = gevent.spawn(hold)
            gevent.sleep(0)
            calls = self.python_calls(lambda: got.append(r.get()))
            assert "_get_python" in calls and got[-1] == b"behind"
            holder.get()
            gevent.spawn_later(0.01, w.put, b"later")
            calls = self.python_calls(lambda: got.append(r.get()))
            assert "_get_waiting" in calls and got[-1] == b"later"

    def test_a_reader_in_a_reference_cycle_is_collected(self):
        # The end of a stream: get_many returns what came and parks the EOFError in the
        # backlog, whose traceback holds get_many's frame and so the reader: a cycle
        # through the object get is installed from, which the collector must see.
        r, w = gipc.pipe()
        w.put(1)
        w.put(2)
        w.close()
        assert r.get_many(10) == [1, 2]
        assert r._backlog  # the parked error
        fds = r._core.filenos()
        ref = weakref.ref(r)
        del r, w
        gc.collect()
        assert ref() is None
        for fd in fds:
            with pytest.raises(OSError):
                os.fstat(fd)  # closed when the reader went

    def test_arguments_are_those_of_the_python_method(self):
        with gipc.pipe() as (r, w):
            for i in range(4):
                w.put(i)
            assert r.get(None) == 0
            assert r.get(timeout=None) == 1
            assert r.get(timeout=5) == 2
            with gevent.Timeout(5) as started:
                assert r.get(started) == 3
            for args, kwargs, says in [
                ((1, 2), {}, "takes from 1 to 2 positional arguments but 3 were given"),
                ((), {"x": 1}, "unexpected keyword argument 'x'"),
                ((1,), {"timeout": 2}, "multiple values for argument 'timeout'"),
                ((), {"timeout": 1, "x": 2}, "unexpected keyword argument 'x'"),
            ]:
                with pytest.raises(TypeError, match=says):
                    r.get(*args, **kwargs)
            with pytest.raises(gevent.Timeout):
                r.get(timeout=0.01)
            assert "Receive, decode" in r.get.__doc__
            assert str(inspect.signature(r.get)) == "(timeout=None)"
            r.close()
            with pytest.raises(GIPCClosed):
                r.get()


class TestBatches:
    @pytest.mark.parametrize("codecs", ["default", "raw", "custom"])
    def test_put_many_preserves_order_and_mixes_with_put(self, codecs):
        if codecs == "default":
            kwargs, items = {}, [{"i": i} for i in range(500)]
        elif codecs == "raw":
            kwargs, items = {"encoder": None, "decoder": None}, [b"%d" % i for i in range(500)]
        else:
            kwargs = {"encoder": lambda o: str(o).encode(), "decoder": lambda b: int(b)}
            items = list(range(500))
        with gipc.pipe(**kwargs) as (r, w):
            w.put(items[0])
            w.put_many(items[1:300])
            w.put_many([])
            w.put_many(iter(items[300:]))
            got = [r.get() for _ in range(5)]
            while len(got) < len(items):
                got.extend(r.get_many(64))
            assert got == items

    def test_get_many_returns_what_is_there_without_waiting_for_more(self):
        with gipc.pipe() as (r, w):
            w.put(1)
            w.put(2)
            assert r.get_many(10) == [1, 2]
            with pytest.raises(ValueError):
                r.get_many(0)

    def test_get_many_loses_nothing_when_a_later_message_fails_to_decode(self):
        with gipc.pipe(encoder=None, decoder=decode_unless_bad) as (r, w):
            for m in (b"1", b"2", b"bad", b"3"):
                w.put(m)
            assert r.get_many(10) == [b"1", b"2"]  # what decoded is delivered...
            with pytest.raises(ValueError, match="cannot decode"):
                r.get_many(10)  # ...then the failure, once...
            assert r.get_many(10) == [b"3"]  # ...then what followed it

    def test_get_then_get_after_a_deferred_failure(self):
        with gipc.pipe(encoder=None, decoder=decode_unless_bad) as (r, w):
            w.put_many([b"1", b"bad", b"2"])
            assert r.get_many() == [b"1"]
            with pytest.raises(ValueError):
                r.get()
            assert r.get() == b"2"

    def test_get_many_delivers_what_came_before_the_end_of_stream(self):
        r, w = gipc.pipe()
        w.put("a")
        w.put("b")
        w.close()
        assert r.get_many(10) == ["a", "b"]
        with pytest.raises(EOFError):
            r.get_many(10)
        r.close()

    def test_get_many_delivers_what_came_before_a_torn_message(self):
        r, w = gipc.pipe(encoder=None, decoder=None)
        w.put(b"whole")
        # A header announcing 100 bytes, 3 of them sent, then the writer is gone.
        os.write(w._core.fileno(), raw_header(100) + b"abc")
        w.close()
        assert r.get_many(10) == [b"whole"]
        with pytest.raises(GIPCError):
            r.get_many(10)
        r.close()

    def test_put_many_raw_rejects_a_non_bytes_item_and_sends_nothing(self):
        with gipc.pipe(encoder=None, decoder=None) as (r, w):
            with pytest.raises(TypeError):
                w.put_many([b"a", "b"])
            w.put(b"c")
            assert r.get() == b"c"

    def test_reader_iterates_until_eof(self):
        r, w = gipc.pipe()
        with r:
            with w:
                w.put_many(range(10))
            assert list(r) == list(range(10))


class TestTimeouts:
    def test_started_timeout_instance(self):
        with gipc.pipe() as (r, w):
            t = gevent.Timeout.start_new(0.05)
            try:
                with pytest.raises(gevent.Timeout) as info:
                    r.get(timeout=t)
                assert info.value is t
            finally:
                t.close()

    @pytest.mark.parametrize("seconds", [float("inf"), 1e19, 1e17, 1e9])
    def test_a_timeout_too_long_for_a_timer_is_none(self, seconds):
        # libuv's timers cannot hold these (get raised OverflowError there); join(), the
        # pool and gipc.wait already took them as no timeout at all.
        with gipc.pipe() as (r, w), gipc.pipe(duplex=True) as (a, b):
            gevent.spawn_later(0.02, w.put, "later")
            gevent.spawn_later(0.02, b.put, "later too")
            assert r.get(timeout=seconds) == "later"
            assert a.get(timeout=seconds) == "later too"

    def test_a_nan_timeout_is_refused(self):
        # A NaN timer never fires, and on libev the loop then slept for ever while another
        # timer was pending: get() hung though a message came. Run apart, so that a hang
        # fails the test instead of stopping the suite.
        result = run_python(
            """
            import gevent, gipc
            r, w = gipc.pipe()
            gevent.spawn_later(0.05, w.put, "came")
            try:
                r.get(timeout=float("nan"))
            except ValueError as e:
                print("refused:", e)
            print(r.get(timeout=5))
            """,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split("\n")[:2] == ["refused: a timeout cannot be NaN", "came"]

    def test_a_started_timeout_is_cancelled_once_a_message_arrives(self):
        # 1.x: the timeout "is canceled when the first byte of a new message arrives". Left
        # pending, it fired later in whatever the greenlet did next.
        # A cancelled Timeout stays the caller's to close (it could be started again), and
        # on libuv one collected unclosed leaves a freed handle in the loop (conftest).
        with gipc.pipe() as (r, w):
            w.put("there already")
            with gevent.Timeout.start_new(0.1) as t:
                assert r.get(timeout=t) == "there already"
                assert not t.pending
            with gevent.Timeout.start_new(0.1) as t:
                gevent.spawn_later(0.02, w.put, "comes while get waits")
                assert r.get(timeout=t) == "comes while get waits"
                assert not t.pending
            w.put_many(["a", "b"])
            assert r.get() == "a"  # "b" waits in the reader's backlog
            t = gevent.Timeout.start_new(0.1)
            try:
                assert r.get(timeout=t) == "b"
                assert not t.pending
                gevent.sleep(0.15)  # nothing fires in the greenlet's own code
            finally:
                t.close()

    def test_a_started_timeout_is_cancelled_by_the_first_bytes_of_a_message(self):
        # The rest of the message comes after the timeout's time: get() still returns it.
        with gipc.pipe() as (r, w):
            payload = pickle.dumps("slow to come")
            frame_fd = w._core.filenos()[0]
            header = raw_header(len(payload), _core.KIND_ENCODED)
            os.write(frame_fd, header + payload[:5])

            def receive():
                # fires in the greenlet that started it
                with gevent.Timeout.start_new(0.05) as t:
                    return r.get(timeout=t)

            getting = gevent.spawn(receive)
            gevent.sleep(0.15)
            assert not getting.ready()
            os.write(frame_fd, payload[5:])
            assert getting.get(timeout=5) == "slow to come"

    def test_a_started_timeout_stays_the_callers_when_no_message_came(self):
        r, w = gipc.pipe()
        w.close()
        t = gevent.Timeout.start_new(5)
        try:
            with pytest.raises(EOFError):
                r.get(timeout=t)
            assert t.pending  # no byte came: not get()'s to cancel
        finally:
            t.close()
            r.close()

    def test_silent_timeout_idiom(self):
        with gipc.pipe() as (r, w):
            with gevent.Timeout(0.05, False) as t:
                r.get(timeout=t)
                pytest.fail("get returned")

    def test_number_of_seconds(self):
        with gipc.pipe() as (r, w):
            with pytest.raises(gevent.Timeout):
                r.get(timeout=0.05)
            w.put("later")
            assert r.get(timeout=1) == "later"

    def test_partial_message_survives_a_timeout(self):
        with gipc.pipe(encoder=None, decoder=None) as (r, w):
            fd = w._core.fileno()
            # Above the reader's copy-out size (32 KiB), and within the default pipe size: the
            # rest goes in with one write to the non-blocking pipe.
            payload = b"p" * 60_000
            os.write(fd, raw_header(len(payload)) + payload[:1000])
            with pytest.raises(gevent.Timeout):
                r.get(timeout=0.05)
            gevent.spawn(os.write, fd, payload[1000:]).join()
            assert r.get(timeout=1) == payload


class TestClosing:
    def test_use_after_close_and_double_close(self):
        r, w = gipc.pipe()
        r.close()
        w.close()
        assert r.closed and w.closed
        with pytest.raises(GIPCClosed):
            r.get()
        with pytest.raises(GIPCClosed):
            w.put(1)
        with pytest.raises(GIPCClosed):
            r.close()
        with pytest.raises(GIPCClosed):
            w.close()

    def test_closed_reader_with_batched_messages_left(self):
        r, w = gipc.pipe()
        w.put_many([1, 2, 3])
        assert r.get() == 1
        r.close()
        w.close()
        with pytest.raises(GIPCClosed):
            r.get()

    def test_close_while_another_greenlet_reads_is_refused(self):
        with gipc.pipe() as (r, w):
            g = gevent.spawn(r.get)
            gevent.sleep(0.01)
            with pytest.raises(GIPCLocked):
                r.close()
            w.put("unblock")
            assert g.get() == "unblock"

    def test_close_while_another_greenlet_writes_is_refused(self):
        with gipc.pipe(encoder=None, decoder=None) as (r, w):
            big = b"x" * (32 << 20)  # larger than any socket or pipe buffer
            g = gevent.spawn(w.put, big)
            gevent.sleep(0.01)
            assert not g.ready()
            with pytest.raises(GIPCLocked):
                w.close()
            assert r.get() == big
            g.get()

    def test_duplex_close(self):
        h1, h2 = gipc.pipe(duplex=True)
        h1.close()
        assert h1.closed
        with pytest.raises(GIPCClosed):
            h1.close()
        with pytest.raises(GIPCClosed):
            h1.put(1)
        h2.close()


class TestContextManagers:
    def test_pair_context_closes_both(self):
        with gipc.pipe() as (r, w):
            pass
        assert r.closed and w.closed

    def test_handle_context_closes_it(self):
        r, w = gipc.pipe()
        with r:
            with w as same:
                assert same is w
            assert w.closed and not r.closed
        assert r.closed

    def test_handles_closed_inside_the_block_are_skipped(self):
        with gipc.pipe() as (r, w):
            r.close()
        assert w.closed

    def test_exception_in_block_is_never_hidden(self):
        with pytest.raises(ZeroDivisionError):
            with gipc.pipe() as (r, w):
                g = gevent.spawn(r.get)
                gevent.sleep(0.01)  # r is now locked: closing it will fail
                try:
                    raise ZeroDivisionError
                finally:
                    w.put("release")  # lets g finish after the with block
        g.join()
        assert g.value == "release"
        r.close()

    def test_close_failure_surfaces_when_block_ended_normally(self):
        with pytest.raises(GIPCLocked):
            with gipc.pipe() as (r, w):
                g = gevent.spawn(r.get)
                gevent.sleep(0.01)
        w.put("release") if not w.closed else None
        g.join()
        r.close()


class TestEndOfStream:
    def test_eof_after_writer_closes(self):
        r, w = gipc.pipe()
        w.put("last")
        w.close()
        assert r.get() == "last"
        with pytest.raises(EOFError):
            r.get()
        with pytest.raises(EOFError):
            r.get()
        r.close()

    def test_eof_wakes_a_waiting_reader(self):
        r, w = gipc.pipe()
        g = gevent.spawn(r.get)
        gevent.sleep(0.01)
        w.close()
        with pytest.raises(EOFError):
            g.get(timeout=5)
        r.close()

    def test_torn_message(self):
        r, w = gipc.pipe(encoder=None, decoder=None)
        os.write(w._core.fileno(), raw_header(1000) + b"x" * 10)
        w.close()
        with pytest.raises(GIPCError, match="torn"):
            r.get()
        r.close()

    def test_corrupt_header(self):
        r, w = gipc.pipe()
        os.write(w._core.fileno(), b"\xff" * 16)
        with pytest.raises(GIPCError, match="corrupt"):
            r.get()
        with pytest.raises(GIPCError, match="corrupt"):
            r.get()
        r.close()
        w.close()

    def test_message_above_max_message_size(self):
        with gipc.pipe(max_message_size=100) as (r, w):
            assert r.max_message_size == 100
            w.put(b"x" * 50)
            assert r.get() == b"x" * 50
            w.put(b"x" * 101)
            with pytest.raises(GIPCError, match="max_message_size"):
                r.get()

    def test_announced_terabyte_is_refused_without_allocating(self):
        with gipc.pipe() as (r, w):
            os.write(w._core.fileno(), raw_header((1 << 40) - 1))
            with pytest.raises(GIPCError, match="max_message_size"):
                r.get()

    def test_put_without_reader_is_broken_pipe(self):
        r, w = gipc.pipe()
        r.close()
        with pytest.raises(BrokenPipeError):
            w.put("nobody listens")
        w.close()


class TestConcurrency:
    def test_concurrent_puts_never_interleave(self):
        with gipc.pipe(encoder=None, decoder=None) as (r, w):
            size = 3 << 20  # each put blocks several times

            def writer(tag: int) -> None:
                for _ in range(3):
                    w.put(bytes([tag]) * size)

            writers = [gevent.spawn(writer, t) for t in range(1, 7)]
            seen = []
            for _ in range(18):
                msg = r.get()
                assert len(msg) == size and msg == msg[:1] * size
                seen.append(msg[0])
            gevent.joinall(writers, raise_error=True)
            assert sorted(seen) == sorted(list(range(1, 7)) * 3)

    def test_many_greenlets_share_one_reader(self):
        with gipc.pipe() as (r, w):
            got = []

            def reader() -> None:
                while True:
                    item = r.get()
                    if item is None:
                        return
                    got.append(item)

            readers = [gevent.spawn(reader) for _ in range(8)]
            for i in range(2000):
                w.put(i)
            for _ in readers:
                w.put(None)
            gevent.joinall(readers, raise_error=True)
            assert sorted(got) == list(range(2000))

    def test_waiting_get_does_not_block_the_loop(self):
        ticker = Ticker(0.005)
        try:
            with gipc.pipe() as (r, w):
                gevent.spawn_later(0.3, w.put, "done")
                assert r.get() == "done"
            assert ticker.ticks >= 10
        finally:
            ticker.stop()

    def test_big_transfer_between_greenlets_lets_others_run(self):
        ticker = Ticker(0.001)
        try:
            with gipc.pipe() as (r, w):
                payload = b"y" * (64 << 20)
                g = gevent.spawn(w.put, payload)
                assert r.get() == payload
                g.get()
            assert ticker.ticks > 0
        finally:
            ticker.stop()

    def test_a_yield_lets_timers_that_fell_due_run_first(self):
        # A reader or writer that used up its time slice yields; a timer that fell due
        # during the slice must run before the busy greenlet's next slice, on either loop
        # (the loop's cached clock and libev's newest-first order once let the busy
        # greenlet go again first, doubling every stall).
        import time

        from gipc._hub import yield_to_loop

        ticks = []

        def ticker() -> None:
            while True:
                gevent.sleep(0.001)
                ticks.append(1)

        g = gevent.spawn(ticker)
        try:
            gevent.sleep(0.01)
            for _ in range(20):
                seen = len(ticks)
                busy_until = time.perf_counter() + 0.003  # a slice: the ticker falls due
                while time.perf_counter() < busy_until:
                    pass
                yield_to_loop()
                assert len(ticks) > seen
        finally:
            g.kill()


@pytest.mark.slow
def test_message_larger_than_two_gib():
    size = (2 << 30) + 17
    with gipc.pipe(encoder=None, decoder=None) as (r, w):
        payload = b"\x01" * size
        g = gevent.spawn(w.put, payload)
        got = r.get()
        g.get()
        assert len(got) == size and got[-1] == 1 and got == payload


def aside_threads() -> list:
    """The names of gipc's threads reading a payload aside in this process (Linux)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as comm:
                names.append(comm.read().strip())
        except OSError:
            pass
    return [name for name in names if name.startswith("gipc-read")]


def write_all(fd: int, data: bytes) -> None:
    """Writes ``data`` to the non-blocking ``fd`` behind gipc's back, waiting cooperatively."""
    import gevent.socket

    view = memoryview(data)
    while view:
        gevent.socket.wait_write(fd)
        try:
            n = os.write(fd, view[: 1 << 20])
        except BlockingIOError:
            continue
        view = view[n:]


def _recv_without_waiting(reader) -> object:
    """``try_recv()``'s first answer that is not YIELD. A spin is cut short by the time
    slice (0.5 ms of the loop's time, spin included): the caller yields, then looks again,
    as ``get()`` does. The test is that no answer is WOULD_BLOCK: nothing was waited for."""
    while True:
        frame = reader._core.try_recv()
        if frame != _core.YIELD:
            return frame


def _put_paced(writer, count: int, pause: float) -> None:
    """``count`` messages (their numbers), ``pause`` seconds apart, waited on the CPU."""
    for i in range(count):
        until = time.perf_counter() + pause
        while time.perf_counter() < until:
            pass
        writer.put(i)


def _put_after(writer, delay: float, message) -> None:
    gevent.sleep(delay)
    writer.put(message)


class TestReplySpin:
    """A duplex handle's get() looks again for a few microseconds before it sleeps in the
    event loop (a prompt reply then costs no wake-up); a one-way reader does so only in the
    middle of a stream, never for messages that come one at a time."""

    def test_duplex_readers_spin_on_every_wait_one_way_readers_only_in_a_stream(self):
        from gipc import _core

        assert _core.REPLY_SPIN_US > 0
        with gipc.pipe() as (r, w), gipc.pipe(duplex=True) as (a, b):
            assert r._core.spin_us == _core.REPLY_SPIN_US and r._core.spin_streams_only
            for reader in (a._reader, b._reader):
                assert reader._core.spin_us == _core.REPLY_SPIN_US
                assert not reader._core.spin_streams_only

    def test_a_one_way_reader_spins_only_in_the_middle_of_a_stream(self):
        with gipc.pipe() as (r, w):
            r._core.spin_us = 5_000_000  # a spin, if there is one, cannot be missed
            started = time.monotonic()
            assert r._core.try_recv() == _core.WOULD_BLOCK  # nothing yet: no spin
            w.put(1)
            assert r.get() == 1
            assert r._core.try_recv() == _core.WOULD_BLOCK  # one message a time: no spin
            assert time.monotonic() - started < 2.5
            w.put(2)
            w.put(3)
            assert r.get() == 2 and r.get() == 3
            # Two messages without a wait between them: a stream, whose next message is
            # waited for on the CPU (here caught by the spin, not by a wait).
            p = gipc.start_process(_put_after, args=(w, 0.02, "late"))
            frame = _recv_without_waiting(r)
            p.join()
            assert isinstance(frame, tuple), frame
            assert pickle.loads(frame[1]) == "late"

    def test_a_spin_catches_a_message_that_arrives_during_it(self):
        with gipc.pipe() as (r, w):
            r._core.spin_streams_only = False  # spins on every wait, as a duplex reader
            r._core.spin_us = 0
            assert r._core.try_recv() == _core.WOULD_BLOCK  # no spin: says "wait" at once
            p = gipc.start_process(_put_after, args=(w, 0.02, "late"))
            # A spin far longer than the child needs: the message is caught by the spin,
            # not by a wait (try_recv never waits).
            r._core.spin_us = 5_000_000
            frame = _recv_without_waiting(r)
            p.join()
            assert isinstance(frame, tuple), frame
            assert pickle.loads(frame[1]) == "late"

    def test_a_reader_that_keeps_up_by_spinning_still_yields(self, monkeypatch):
        """A stream whose reader keeps up, catching each message with a spin, still gives
        the event loop its turns: looking again on the CPU is not a wait. (Each look that
        found nothing once started a new time slice, and such a stream never yielded: a
        100,000-message stream stalled the loop for 30-50 ms.)"""
        from gipc import _handles

        turns = []  # the loop's turns: a yield, or a real wait (when the writer lags)
        real_yield = _handles._yield_to_loop
        real_wait = _handles._GIPCHandle._wait

        def counting_yield() -> None:
            turns.append("yield")
            real_yield()

        def counting_wait(handle) -> None:
            turns.append("wait")
            real_wait(handle)

        monkeypatch.setattr(_handles, "_yield_to_loop", counting_yield)
        monkeypatch.setattr(_handles._GIPCHandle, "_wait", counting_wait)
        with gipc.pipe() as (r, w):
            # 20 us between two messages: the reader is ahead, and spins for each (on a
            # loaded machine the writer lags at times, and the reader waits instead).
            p = gipc.start_process(_put_paced, args=(w, 5000, 20e-6))
            for i in range(5000):
                assert r.get() == i
            p.join()
        assert p.exitcode == 0
        # ~0.1 s of stream in 0.5 ms slices: about 200 turns (before the fix, none: every
        # message was caught by a spin, and a spin never ended the slice).
        assert len(turns) >= 10, turns

    def test_a_stream_reader_spinning_on_poll_still_ends_its_time_slice(self):
        """A stream's reader spins on poll, not on reads, but its spin still counts
        against the time slice: a spin set far longer than the slice answers YIELD once the
        slice is used up, rather than holding the event loop until the message comes.
        (When only the poll ran, a 5 s spin held the loop until the message, 0.3 s later.)"""
        with gipc.pipe() as (r, w):
            r._core.spin_us = 5_000_000
            for i in range(3):
                w.put(i)
            assert [r.get() for _ in range(3)] == [0, 1, 2]  # two without a wait: a stream
            p = gipc.start_process(_put_after, args=(w, 0.3, "late"))
            assert r._core.try_recv() == _core.YIELD
            assert r.get() == "late"
            p.join()
        assert p.exitcode == 0

    def test_spinning_get_keeps_its_timeout_and_end_of_stream(self):
        with gipc.pipe(duplex=True) as (a, b):
            with pytest.raises(gevent.Timeout):
                a.get(timeout=0.05)
            b.put("after a timeout")
            assert a.get() == "after a timeout"
            b.close()
            with pytest.raises(EOFError):
                a.get()


def _echo(handle, count: int) -> None:
    for _ in range(count):
        handle.put(handle.get())


class TestLanes:
    """By default a channel has two lanes: frames through a pipe, payloads of BULK_MIN bytes
    or more through a socket pair beside it. Whatever lane a payload takes, messages arrive
    whole and in order."""

    # Around the bulk threshold, tiny ones between large ones, and one far above a buffer.
    SIZES = [0, 1, _core.BULK_MIN - 1, _core.BULK_MIN, 5, _core.BULK_MIN + 1, 100, 3 << 20, 7,
             1 << 20, 2, 64 << 10]

    def test_default_channels_have_a_bulk_lane(self):
        from gipc import _handles

        with gipc.pipe() as (r, w):
            lanes = 2 if _handles.TRANSPORT == "hybrid" else 1
            assert len(r._core.filenos()) == len(w._core.filenos()) == lanes
            assert r._core.filenos()[0] == r._core.fileno()
            assert r._core.wait_fileno() == r._core.fileno()  # nothing on its way yet

    @pytest.mark.parametrize("codec", ["pickle", "raw"])
    def test_mixed_sizes_arrive_whole_and_in_order_through_a_child(self, codec):
        kw = {} if codec == "pickle" else dict(encoder=None, decoder=None)
        messages = [bytes([i % 251]) * n for i, n in enumerate(self.SIZES)]
        with gipc.pipe(duplex=True, **kw) as (mine, theirs):
            p = gipc.start_process(_echo, args=(theirs, len(messages)))
            sender = gevent.spawn(lambda: [mine.put(m) for m in messages])
            got = [mine.get() for _ in messages]
            sender.get()
            p.join()
        assert p.exitcode == 0
        assert [len(m) for m in got] == self.SIZES
        assert got == messages

    def test_a_bulk_payload_is_waited_for_on_the_bulk_lane(self):
        from gipc import _handles

        if _handles.TRANSPORT != "hybrid":
            pytest.skip("only channels with a bulk lane")
        with gipc.pipe(encoder=None, decoder=None) as (r, w):
            # A reader that reads every payload on the loop's thread (see the next test).
            r._core.read_aside = False
            big = b"b" * (8 << 20)  # more than the socket buffer: the writer must wait
            putter = gevent.spawn(w.put, big)
            gevent.sleep(0.01)
            assert w._core.mid_frame
            assert w._core.wait_fileno() == w._core.filenos()[1]
            # One bounded step: the header, then as much payload as has arrived.
            assert r._core.try_recv() in (_core.WOULD_BLOCK, _core.YIELD)
            assert r._core.wait_fileno() == r._core.filenos()[1]
            assert r.get(timeout=30) == big  # waiting on the frame lane would never end
            putter.get()
            assert r._core.wait_fileno() == r._core.fileno()
            assert w._core.wait_fileno() == w._core.fileno()

    @pytest.mark.parametrize("transport", ["hybrid", "pipe", "socket"])
    def test_a_large_payload_is_read_aside_while_the_loop_runs(self, transport, monkeypatch):
        from gipc import _handles

        monkeypatch.setattr(_handles, "TRANSPORT", transport)
        with gipc.pipe(encoder=None, decoder=None) as (r, w):
            assert r._core.read_aside
            lanes = set(r._core.filenos())
            big = bytes(range(256)) * (48 << 12)  # 48 MiB: more than any lane holds
            putter = gevent.spawn(w.put, big)
            gevent.sleep(0.01)
            assert w._core.mid_frame
            ticker = Ticker()
            seen = {}
            real_wait = r._wait

            def wait() -> None:
                fd = r._core.wait_fileno()
                if r._core.reading_aside:
                    seen["fd"] = fd
                    seen["ticks"] = ticker.ticks
                real_wait()

            monkeypatch.setattr(r, "_wait", wait)
            got = r.get(timeout=30)
            ticker.stop()
            putter.get(timeout=30)
            assert got == big
            # It was read by a thread: waited for on a descriptor of neither lane, while the
            # loop kept serving the ticker.
            assert "fd" in seen and seen["fd"] not in lanes, seen
            assert ticker.ticks > seen["ticks"], "the loop ran while the thread read"
            assert not r._core.reading_aside
            assert r._core.wait_fileno() == r._core.fileno()
            # The channel goes on: a small message, then another large one.
            w.put(b"small")
            assert r.get(timeout=5) == b"small"
            putter = gevent.spawn(w.put, big)
            assert r.get(timeout=30) == big
            putter.get(timeout=30)

    @pytest.mark.parametrize("interruption", ["timeout", "kill"])
    def test_a_wait_that_ends_early_leaves_the_thread_reading_and_loses_nothing(
        self, interruption
    ):
        with gipc.pipe() as (r, w):  # default codecs: a KIND_BYTES frame is a bytes object
            big = bytes(range(256)) * (48 << 12)
            # Written behind gipc's back, in two parts with a pause between: a frame on the
            # frame lane, then 16 MiB of its payload.
            frame = raw_header(len(big), kind=_core.KIND_BYTES)
            fd = w._core.fileno()
            first = frame + big[: 16 << 20]

            writer = gevent.spawn(write_all, fd, first)
            getter = gevent.spawn(r.get, timeout=None if interruption == "kill" else 0.3)
            for _ in range(1000):
                if r._core.reading_aside:
                    break
                gevent.sleep(0.005)
            assert r._core.reading_aside
            writer.join(30)
            if interruption == "kill":
                gevent.sleep(0.2)
                getter.kill()
            else:
                getter.join(30)
                assert isinstance(getter.exception, gevent.Timeout), getter.exception
            # Nobody waits now, and the thread goes on reading what comes.
            assert r._core.reading_aside
            writer = gevent.spawn(write_all, fd, big[16 << 20 : 32 << 20])
            writer.join(30)
            for _ in range(2000):
                if r._core.buffered == 8 + (32 << 20):
                    break
                gevent.sleep(0.005)
            assert r._core.buffered == 8 + (32 << 20)
            # The rest, then the message whole.
            writer = gevent.spawn(write_all, fd, big[32 << 20 :])
            assert r.get(timeout=30) == big
            writer.join(30)
            assert not r._core.reading_aside

    def test_polling_with_a_zero_timeout_receives_a_large_message(self):
        """get(timeout=0) in a loop ("do not wait") makes progress: the thread reading the
        payload is not stopped when each poll's wait ends (stopped, it had often read
        nothing: 4,109 polls in 5 s left a 48 MiB message at 19.8 MiB)."""
        big = bytes(range(256)) * (48 << 12)
        with gipc.pipe() as (r, w):
            p = gipc.start_process(_put_after, args=(w, 0, big))
            got, polls = None, 0
            while got is None and polls < 20_000:
                polls += 1
                try:
                    got = r.get(timeout=0)
                except gevent.Timeout:
                    gevent.sleep(0.001)
            p.join(30)
        assert got == big, (polls, r._core.buffered)

    @pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
    def test_a_fork_while_a_thread_reads_aside_halts_it_first(self, monkeypatch):
        """A child started while another greenlet receives a large payload: gipc's reading
        thread is stopped before the fork (no fork of a multi-threaded process because of
        gipc, no child copied from the middle of a read), and both go on."""

        at_fork: list = []
        watching = [True]  # a fork hook stays for good: this one does nothing after the test
        os.register_at_fork(
            after_in_parent=lambda: watching[0] and at_fork.append(aside_threads())
        )
        with gipc.pipe() as (r, w):
            big = bytes(range(256)) * (48 << 12)
            frame = raw_header(len(big), kind=_core.KIND_BYTES)
            fd = w._core.fileno()

            writer = gevent.spawn(write_all, fd, frame + big[: 16 << 20])
            getter = gevent.spawn(r.get)
            for _ in range(1000):
                if aside_threads():
                    break
                gevent.sleep(0.005)
            assert aside_threads(), "a thread reads the payload"
            writer.join(30)
            at_fork.clear()
            try:
                # A fork of this process, whatever start method the suite runs with.
                p = gipc.start_process(os.getpid, start_method="fork")
            finally:
                watching[0] = False
            assert at_fork and at_fork[0] == [], at_fork
            p.join(30)
            assert p.exitcode == 0
            writer = gevent.spawn(write_all, fd, big[16 << 20 :])
            assert getter.get(timeout=30) == big
            writer.join(30)

    @pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
    def test_a_child_forked_while_a_thread_still_reads_aside_gets_an_error(self):
        """The fork hook could not stop a reader's thread (another OS thread was using that
        reader): in the child, whose copy has no thread, the stream is lost, said so, and
        never resumed at a wrong offset."""
        from gipc import _handles

        with gipc.pipe() as (r, w):
            big = bytes(range(256)) * (48 << 12)
            fd = w._core.fileno()
            writer = gevent.spawn(
                write_all, fd, raw_header(len(big), kind=_core.KIND_BYTES) + big[: 1 << 20]
            )
            getter = gevent.spawn(r.get)
            for _ in range(1000):
                if aside_threads():
                    break
                gevent.sleep(0.005)
            assert aside_threads()
            writer.join(30)
            for ref in [ref for ref in _handles._reading_aside if ref() is r]:
                _handles._reading_aside.discard(ref)  # as if the hook could not reach it
            answers = {}
            for action in ("receive", "close"):
                child_r, child_w = os.pipe()
                pid = os.fork()
                if pid == 0:  # pragma: no cover - the child reports through the pipe
                    try:
                        if action == "receive":
                            r._core.try_recv()
                        else:
                            # Its copy of the thread's eventfd, shared with the parent: it
                            # must not signal it.
                            r._core.close()
                        answer = b"no error"
                    except gipc.GIPCError as error:
                        answer = str(error).encode()
                    except BaseException as error:  # noqa: B036 - reported to the parent
                        answer = repr(error).encode()
                    os.write(child_w, answer)
                    os._exit(0)
                os.close(child_w)
                answers[action] = os.read(child_r, 1000).decode()
                os.close(child_r)
                os.waitpid(pid, 0)
            assert "forked while a thread read a message" in answers["receive"], answers
            assert answers["close"] == "no error", answers
            # The parent's thread was left alone: it still waits for the rest, and its
            # eventfd was not made readable.
            import select

            poller = select.poll()
            poller.register(r._core.wait_fileno(), select.POLLIN)
            assert poller.poll(0) == [] and aside_threads()
            # The parent goes on.
            writer = gevent.spawn(write_all, fd, big[1 << 20 :])
            assert getter.get(timeout=30) == big
            writer.join(30)

    def test_a_bulk_payload_survives_a_timeout_and_a_torn_one_is_an_error(self):
        from gipc import _handles

        if _handles.TRANSPORT != "hybrid":
            pytest.skip("only channels with a bulk lane")
        bulk_flag = 0x80
        with gipc.pipe(encoder=None, decoder=None) as (r, w):
            frame_fd, bulk_fd = w._core.filenos()
            payload = b"q" * 100_000
            # Written behind gipc's back: a header saying "on the bulk lane", half the payload.
            os.write(frame_fd, raw_header(len(payload), kind=bulk_flag))
            os.write(bulk_fd, payload[:50_000])
            with pytest.raises(gevent.Timeout):
                r.get(timeout=0.05)
            assert r._core.buffered == 8 + 50_000  # the header, and the bytes so far
            gevent.spawn(os.write, bulk_fd, payload[50_000:]).join()
            assert r.get(timeout=1) == payload
            # Then one that never completes: the writer goes away mid-payload.
            os.write(frame_fd, raw_header(10, kind=bulk_flag))
            os.write(bulk_fd, b"12345")
            w.close()
            with pytest.raises(GIPCError, match="torn"):
                r.get(timeout=5)
