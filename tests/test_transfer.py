"""Handles that move to another process as descriptors: pickled with ``HandlePickler``
(``dumps_with_handles``), rebuilt from the descriptors that came beside the pickle
(``loads_with_handles``), whatever numbers they have there. What spawn and fork-server
children, and handles put on a pipe, are built on."""

from __future__ import annotations

import array
import io
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import textwrap

import gevent
import pytest

import gipc
from gipc import _handles
from gipc import GIPCClosed, GIPCError, GIPCLocked
from gipc._handles import _GIPCDuplexHandle, _GIPCReader, _GIPCWriter
from gipc._transfer import (
    DescriptorCarrier,
    HandlePickler,
    dumps_with_handles,
    loads_with_handles,
)

from helpers import raw_header

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(gipc.__file__)))
BIG = bytes(range(256)) * (12 << 12)  # 12 MiB: the bulk lane on a hybrid channel


def encode_upper(obj):
    return str(obj).upper().encode()


def decode_tagged(data):
    return ("decoded", data)


def is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def moved(obj):
    """``obj`` as another process would get it: pickled, its handles rebuilt from copies
    of their descriptors (new numbers), the originals closed as a sender closes them."""
    data, handles, fds = dumps_with_handles(obj)
    copies = [os.dup(fd) for fd in fds]
    for handle in handles:
        handle.close()
    return loads_with_handles(data, copies)


class TestWithinOneProcess:
    def test_messages_flow_both_ways_and_none_is_lost(self):
        r, w = gipc.pipe()
        w.put("read here")
        w.put("buffered, not yet read")
        w.put_many(["batch 1", "batch 2", "batch 3"])
        assert r.get() == "read here"
        assert r.get() == "buffered, not yet read"
        assert r.get() == "batch 1"  # the rest of the batch waits in the reader's backlog
        state = moved({"reader": r, "writer": w, "other": [1, 2]})
        r2, w2 = state["reader"], state["writer"]
        assert r.closed and w.closed and state["other"] == [1, 2]
        assert type(r2) is _GIPCReader and type(w2) is _GIPCWriter
        assert [r2.get(), r2.get()] == ["batch 2", "batch 3"]

        def send_big():
            w2.put(BIG)
            w2.put("after")

        g = gevent.spawn(send_big)
        assert r2.get() == BIG
        assert r2.get() == "after"
        g.get()
        w2.close()
        with pytest.raises(EOFError):
            r2.get()
        r2.close()

    def test_a_message_read_halfway_is_completed_by_the_new_reader(self):
        r, w = gipc.pipe(encoder=None, decoder=None)
        w.put(b"whole")
        # Half a frame: the header and part of the payload; the reader has taken it in.
        header = raw_header(5, gipc._core.KIND_ENCODED)
        frame = header + b"hal"
        os.write(w._core.fileno(), frame)
        assert r.get() == b"whole"
        with gevent.Timeout(0.05, False):
            r.get()
        assert r._core.buffered == len(frame)
        r2 = moved(r)
        os.write(w._core.fileno(), b"f!")
        assert r2.get() == b"half!"
        r2.close()
        w.close()

    def test_the_same_duplex_handle_twice_is_one_handle_there(self):
        a, b = gipc.pipe(duplex=True)
        got = moved([a, {"again": a}, (a,)])
        assert isinstance(got[0], _GIPCDuplexHandle)
        assert got[0] is got[1]["again"] is got[2][0]
        # The reply spin of a duplex reader moved with it.
        assert got[0]._reader._core.spin_us == b._reader._core.spin_us > 0
        assert not got[0]._reader._core.spin_streams_only  # on every wait, as it was
        b.put("to a")
        assert got[0].get() == "to a"
        g = gevent.spawn(got[0].put, BIG)
        assert b.get() == BIG
        g.get()
        got[0].close()
        b.close()

    def test_the_pickler_lists_handles_once_and_their_descriptors_in_order(self):
        (r, w), (a, b) = gipc.pipe(), gipc.pipe(duplex=True)
        with r, w, a, b:
            pickler = HandlePickler(io.BytesIO())
            pickler.dump([w, a, w, {"a": a}, r])
            assert pickler.handles == [w, a, r]
            expected = (
                w._core.filenos()
                + a._reader._core.filenos()
                + a._writer._core.filenos()
                + r._core.filenos()
            )
            assert pickler.fds == expected

    def test_codecs_and_limits_travel_with_the_handle(self):
        r, w = gipc.pipe(encoder=encode_upper, decoder=decode_tagged, max_message_size=1000)
        got = moved((r, w))
        r2, w2 = got
        assert r2.max_message_size == 1000
        w2.put("abc")
        assert r2.get() == ("decoded", b"ABC")
        r2.close()
        w2.close()

    def test_default_codecs_keep_their_fast_paths(self):
        r, w = gipc.pipe()
        r2, w2 = moved((r, w))
        assert r2._default_codecs and w2._default_codecs
        w2.put(b"raw bytes")  # sent unpickled: only the default codecs accept that
        w2.put_many([1, 2])
        assert [r2.get(), r2.get(), r2.get()] == [b"raw bytes", 1, 2]
        r2.close()
        w2.close()

    def test_raw_pipes_travel(self):
        r, w = gipc.pipe(encoder=None, decoder=None)
        r2, w2 = moved((r, w))
        w2.put(bytearray(b"xyz"))
        assert r2.get() == b"xyz"
        r2.close()
        w2.close()


class TestRefusals:
    def test_plain_pickle_refuses_a_handle_and_says_how_it_travels(self):
        (r, w), (a, b) = gipc.pipe(), gipc.pipe(duplex=True)
        with r, w, a, b:
            for handle in (r, w, a, [{"deep": b}]):
                with pytest.raises(TypeError, match="start_process") as info:
                    pickle.dumps(handle)
                assert isinstance(info.value, GIPCError)

    def test_an_unpicklable_codec_is_named(self):
        r, w = gipc.pipe(encoder=lambda o: b"x", decoder=decode_tagged)
        with r, w:
            with pytest.raises(GIPCError, match=r"encoder <function .*<lambda>"):
                dumps_with_handles(w)
            assert repr(w) in str(pytest.raises(GIPCError, dumps_with_handles, w).value)
            assert not w.closed

    def test_closed_and_busy_handles_refuse(self):
        with gipc.pipe() as (r, w):
            r.close()
            with pytest.raises(GIPCClosed):
                dumps_with_handles([r])
        with gipc.pipe() as (r, w):
            g = gevent.spawn(w.put, BIG)
            gevent.sleep(0.01)  # now inside put(), holding the lock
            with pytest.raises(GIPCLocked):
                dumps_with_handles({"w": w})
            g.kill()

    def test_a_writer_with_unwritten_messages_refuses(self):
        r, w = gipc.pipe()
        with r, w:
            # More than the channel holds: the rest stays queued until someone reads.
            g = gevent.spawn(w.put, BIG)
            gevent.sleep(0.01)
            g.kill()
            with pytest.raises(GIPCError, match="not entirely written"):
                dumps_with_handles(w)

    def test_unused_descriptors_are_closed(self):
        r, w = gipc.pipe()
        data, handles, fds = dumps_with_handles(r)
        extra = os.dup(0)
        copies = [os.dup(fd) for fd in fds] + [extra]
        r2 = loads_with_handles(data, copies)
        assert not is_open(extra)
        assert all(is_open(fd) for fd in copies[:-1])
        for handle in (r, w, r2):
            handle.close()

    def test_a_failed_load_closes_every_descriptor(self):
        (r, w), (a, b) = gipc.pipe(), gipc.pipe(duplex=True)
        data, handles, fds = dumps_with_handles([r, a])
        # The duplex handle's descriptors are swapped: its reader is built, its writer not.
        copies = [os.dup(fd) for fd in fds]
        n = len(r._core.filenos())
        half = len(a._reader._core.filenos())
        copies[n:] = copies[n + half :] + copies[n : n + half]
        with pytest.raises(GIPCError):
            loads_with_handles(data, copies)
        assert not any(is_open(fd) for fd in copies)
        # Corrupt data: nothing taken, everything closed.
        copies = [os.dup(fd) for fd in fds]
        with pytest.raises(pickle.UnpicklingError):
            loads_with_handles(data[:-3] + b"xx.", copies)
        assert not any(is_open(fd) for fd in copies)
        for handle in (r, w, a, b):
            handle.close()


CHILD = textwrap.dedent(
    """
    import os, sys
    from gipc._transfer import loads_with_handles
    data = bytes.fromhex(sys.argv[1])
    fds = [int(fd) for fd in sys.argv[2].split(",")]
    handles = loads_with_handles(data, fds)
    reader, writer = handles["to_child"], handles["from_child"]
    taken = reader._core.filenos() + writer._core.filenos()
    for message in reader:
        writer.put(("echo", message))
    reader.close()
    writer.put(("took", taken))
    writer.close()
    still_open = []
    for fd in taken:
        try:
            os.fstat(fd)
            still_open.append(fd)
        except OSError:
            pass
    sys.exit(len(still_open))
    """
)


def _child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PYTHON_DIR, env.get("PYTHONPATH")]))
    return env


@pytest.mark.parametrize("launch", ["subprocess", "posix_spawn"])
def test_handles_work_in_a_fresh_interpreter(launch):
    to_child_r, to_child_w = gipc.pipe()
    from_child_r, from_child_w = gipc.pipe()
    to_child_w.put("buffered by the parent")
    to_child_w.put("read by the parent")
    to_child_w.put("left in the parent's buffer")
    assert to_child_r.get() == "buffered by the parent"
    assert to_child_r.get() == "read by the parent"
    data, handles, fds = dumps_with_handles({"to_child": to_child_r, "from_child": from_child_w})
    if launch == "subprocess":
        # Same numbers in the child.
        child_fds = fds
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, data.hex(), ",".join(map(str, fds))],
            pass_fds=fds,
            env=_child_env(),
        )
        wait = proc.wait
    else:
        # New numbers in the child, as SCM_RIGHTS gives them.
        child_fds = [100 + i for i in range(len(fds))]
        actions = [(os.POSIX_SPAWN_DUP2, fd, new) for fd, new in zip(fds, child_fds)]
        pid = os.posix_spawn(
            sys.executable,
            [sys.executable, "-c", CHILD, data.hex(), ",".join(map(str, child_fds))],
            _child_env(),
            file_actions=actions,
        )

        def wait():
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    for handle in handles:
        handle.close()
    try:
        assert from_child_r.get() == ("echo", "left in the parent's buffer")
        to_child_w.put(BIG)
        assert from_child_r.get() == ("echo", BIG)
        to_child_w.close()
        assert from_child_r.get() == ("took", child_fds)
        with pytest.raises(EOFError):
            from_child_r.get()
    finally:
        code = wait()
        for handle in (to_child_w, from_child_r):
            if not handle.closed:
                handle.close()
    assert code == 0, f"{code} descriptors were left open in the child"


# Handles put on a pipe: their descriptors travel with the message (SCM_RIGHTS).


@pytest.fixture(params=["hybrid", "socket"])
def transport(request, monkeypatch):
    """Pipes made in the test use this transport (both can carry descriptors)."""
    monkeypatch.setattr(_handles, "TRANSPORT", request.param)
    return request.param


def open_fd_count():
    return len(os.listdir("/proc/self/fd"))


def _serve_handed_pipes(control):
    """In a child: take a duplex handle and a writer from ``control``, both created by the
    parent after this child started, and use them."""
    duplex = control.get()
    duplex.put(("pong", duplex.get()))
    duplex.put(duplex.get())  # a large message back
    writer = control.get()["writer"]
    writer.put("from the child, on a pipe it was handed")
    writer.close()
    duplex.close()
    control.put("done")


class TestHandlesInMessages:
    def test_a_pipe_made_after_the_child_started_is_handed_over_and_used_both_ways(
        self, transport
    ):
        with gipc.pipe(duplex=True) as (control, control_child):
            p = gipc.start_process(_serve_handed_pipes, args=(control_child,))
            a, b = gipc.pipe(duplex=True)
            control.put(b)
            assert b.closed  # the sender's copy closes once sent, as start_process does
            a.put("ping")
            assert a.get() == ("pong", "ping")
            a.put(BIG)
            assert a.get() == BIG
            r, w = gipc.pipe()
            control.put({"writer": w})
            assert w.closed
            assert r.get() == "from the child, on a pipe it was handed"
            with pytest.raises(EOFError):
                r.get()
            assert control.get() == "done"
            p.join()
            assert p.exitcode == 0
            r.close()
            a.close()

    def test_handles_nested_in_a_message_arrive_working(self, transport):
        with gipc.pipe() as (r, w):
            x_r, x_w = gipc.pipe()
            x_w.put("already buffered")
            w.put(["text", {"reader": x_r, "writer": x_w}, 3])
            text, handles, three = r.get()
            assert (text, three) == ("text", 3)
            assert x_r.closed and x_w.closed
            assert handles["reader"].get() == "already buffered"
            handles["writer"].put("again")
            assert handles["reader"].get() == "again"
            handles["reader"].close()
            handles["writer"].close()

    def test_messages_without_handles_around_one_with_them_keep_their_order(self, transport):
        with gipc.pipe() as (r, w):
            x_r, x_w = gipc.pipe()
            w.put("before")
            w.put(x_w)
            w.put(b"after")
            assert r.get() == "before"
            moved_writer = r.get()
            assert r.get() == b"after"
            moved_writer.put(1)
            assert x_r.get() == 1
            moved_writer.close()
            x_r.close()

    def test_descriptors_of_a_message_never_read_are_closed_with_the_reader(self, transport):
        before = open_fd_count()
        r, w = gipc.pipe()
        x_r, x_w = gipc.pipe()
        w.put("first")
        w.put((x_r, x_w))
        assert r.get() == "first"  # the next message may be taken in, its descriptors too
        r.close()
        w.close()
        assert open_fd_count() == before

    def test_descriptors_of_a_message_that_cannot_be_decoded_are_closed(self, transport):
        with gipc.pipe() as (r, w):
            before = open_fd_count()
            x_r, x_w = gipc.pipe()
            w.put([x_r, FailsToLoad(), x_w])
            with pytest.raises(RuntimeError, match="cannot load"):
                r.get()
            assert open_fd_count() == before  # the senders' copies closed too
            w.put("the pipe goes on")
            assert r.get() == "the pipe goes on"

    def test_a_reader_with_other_codecs_refuses_handles_and_closes_them(self, transport):
        with gipc.pipe(encoder=None, decoder=None) as (raw_r, raw_w):
            before = open_fd_count()
            x_r, x_w = gipc.pipe()
            # What a default-codec writer would send, on a raw pipe: refused at the reader.
            data, handles, fds = dumps_with_handles(x_r)
            payload = len(fds).to_bytes(4, "little") + data
            raw_w._core.try_send_fds(gipc._core.KIND_HANDLES, payload, fds)
            x_r.close()
            x_w.close()
            with pytest.raises(GIPCError, match="default pickle codecs"):
                raw_r.get()
            assert open_fd_count() == before

    def test_a_pipe_only_channel_refuses_at_put_and_sends_nothing(self, monkeypatch):
        monkeypatch.setattr(_handles, "TRANSPORT", "pipe")
        with gipc.pipe() as (r, w), gipc.pipe() as (x_r, x_w):
            with pytest.raises(GIPCError, match="'pipe' channel"):
                w.put({"h": x_w})
            assert not x_w.closed
            with pytest.raises(gevent.Timeout):
                r.get(timeout=0.05)
            w.put("still usable")
            assert r.get() == "still usable"

    def test_a_writer_cannot_travel_on_itself(self, transport):
        with gipc.pipe() as (r, w):
            with pytest.raises(GIPCLocked):
                w.put(w)
            assert not w.closed
            w.put("fine")
            assert r.get() == "fine"

    def test_custom_codecs_say_handles_do_not_travel_there(self, transport):
        with gipc.pipe(encoder=pickle.dumps, decoder=pickle.loads) as (r, w):
            with pytest.raises(TypeError, match="start_process"):
                w.put(r)


def _fail_to_load():
    raise RuntimeError("cannot load this")


class FailsToLoad:
    def __reduce__(self):
        return (_fail_to_load, ())


class Carrier(DescriptorCarrier):
    """A test object that travels with a descriptor of its own."""

    def __init__(self, fd: int, label: str) -> None:
        self.fd, self.label = fd, label

    def _export(self):
        return self.label, [self.fd]

    @classmethod
    def _rebuild(cls, state, fds):
        return cls(fds[0], state)


def test_gipc_objects_can_carry_descriptors_of_their_own():
    r, w = os.pipe()
    with gipc.pipe() as (hr, hw):
        carrier = Carrier(w, "claims")
        data, handles, fds = dumps_with_handles({"c": carrier, "again": carrier, "h": hw})
        assert handles == [hw] and w in fds and len(fds) == 3
        copies = [os.dup(fd) for fd in fds]
        got = loads_with_handles(data, copies)
        assert got["c"] is got["again"] and got["c"].label == "claims"
        os.write(got["c"].fd, b"!")
        assert os.read(r, 1) == b"!"
        os.close(got["c"].fd)
        got["h"].close()
    os.close(r)
    os.close(w)


def test_put_many_carries_handles_too():
    with gipc.pipe() as (r, w), gipc.pipe() as (inner_r, inner_w):
        w.put_many(["before", inner_w, "after"])
        assert inner_w.closed  # handed over, as put() does
        assert r.get() == "before"
        moved_w = r.get()
        assert r.get() == "after"
        moved_w.put("through the moved writer")
        assert inner_r.get() == "through the moved writer"
        moved_w.close()


# A message with handles that reaches a process at its descriptor limit.

LARGE_AFTER_LOSS = b"x" * 100_000  # the bulk lane on a hybrid channel


def _receive_at_the_descriptor_limit(r, out):
    """In a child: take one message with handles while this process is at its descriptor
    limit (RLIMIT_NOFILE: the kernel cannot install the descriptors and drops them), then,
    with room again, the messages behind it; report what came to ``out``."""
    import resource

    r.get(timeout=10)  # warm up: the hub and its loop exist before the limit is lowered
    before = open_fd_count()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Room for a few new descriptors only (and for those below the limit now free).
    resource.setrlimit(resource.RLIMIT_NOFILE, (before + 4, hard))
    out.put("at the limit")
    try:
        first = ("returned", repr(r.get(timeout=10)))
    except BaseException as error:  # whatever it is, the parent says what went wrong
        first = ("raised", type(error).__name__, str(error))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    after_loss = open_fd_count()
    later = []
    try:
        for _ in range(3):
            message = r.get(timeout=5)
            later.append(message == LARGE_AFTER_LOSS or message)
        writer = r.get(timeout=5)
        writer.put("through a handle that came after the loss")
        writer.close()
    except BaseException as error:  # a second error, or a wedged channel (Timeout)
        later.append(("raised", type(error).__name__, str(error)))
    out.put({"first": first, "fds": (before, after_loss, open_fd_count()), "later": later})


class TestDescriptorsFromAPeerThatIsNotGipc:
    def test_a_count_of_descriptors_no_writer_sends_fails_that_message_alone(self):
        # The count is the peer's word: 2**32 - 1 descriptors would be a 16 GiB
        # allocation, which aborted the process where address space is limited (RLIMIT_AS
        # here). A GIPCError for that message; the next is read.
        script = textwrap.dedent(
            """
            import os, resource, struct
            resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
            import gipc
            from gipc import GIPCError
            r, w = gipc.pipe()
            payload = struct.pack("<I", 0xFFFFFFFF) + b"junk"
            header = struct.pack("<Q", (0x6770 << 48) | (3 << 40) | len(payload))
            os.write(w._core.filenos()[0], header + payload)
            w.put("next")
            try:
                r.get(timeout=5)
            except GIPCError as error:
                print("GIPCError:", error)
            print(r.get(timeout=5))
            """
        )
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert "carries 4294967295 descriptors, more than a gipc writer sends" in done.stdout
        assert done.stdout.rstrip().endswith("next")

    def test_a_reader_that_refuses_handles_closes_descriptors_sent_with_any_message(
        self, transport
    ):
        # A peer attaches descriptors to ordinary messages on a pipe whose codecs are not
        # pickle (its peer may be untrusted): they close as they come, instead of filling
        # this process's descriptor table until the reader closes.
        def encode(o):
            return json.dumps(o).encode()

        def decode(b):
            return json.loads(b)

        before = open_fd_count()
        with gipc.pipe(encoder=encode, decoder=decode) as (r, w):
            channel = open_fd_count()
            frame_fd, socket_fd = w._core.filenos()[0], w._core.filenos()[-1]
            peer = socket.socket(fileno=os.dup(socket_fd))
            peer.setblocking(True)
            extra = [os.open(os.devnull, os.O_RDONLY) for _ in range(50)]
            payload = encode("x" * 20000)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", extra))]
            for _ in range(5):
                if transport == "hybrid":  # the payload on the socket (bulk) lane
                    os.write(frame_fd, raw_header(len(payload), bulk_lane=True))
                    peer.sendmsg([payload], rights)
                else:  # a single socket carries headers and payloads
                    peer.sendmsg([raw_header(len(payload)) + payload], rights)
            for fd in extra:
                os.close(fd)
            peer.close()
            for _ in range(5):
                assert r.get(timeout=5) == "x" * 20000
            assert open_fd_count() == channel
            r._core.transfer_state()  # nothing held back: the reader could move
        assert open_fd_count() == before

    def test_a_reader_that_takes_handles_says_so_to_the_core(self, transport):
        with gipc.pipe() as (r, w):
            assert r._takes_handles and r._core.takes_descriptors
        with gipc.pipe(encoder=None, decoder=None) as (r, w):
            assert not r._takes_handles and not r._core.takes_descriptors
            r._takes_handles = True  # what a pool worker does for its tasks pipe
            assert r._core.takes_descriptors


class TestDescriptorsTheKernelDropped:
    def test_the_message_fails_once_and_every_later_message_arrives(self, transport):
        with gipc.pipe() as (r, w), gipc.pipe() as (out_r, out_w), gipc.pipe() as (x_r, x_w):
            p = gipc.start_process(_receive_at_the_descriptor_limit, args=(r, out_w))
            try:
                w.put("warm-up")
                assert out_r.get(timeout=30) == "at the limit"
                pairs = [gipc.pipe() for _ in range(40)]
                w.put([end for pair in pairs for end in pair])
                w.put("small 1")
                w.put(LARGE_AFTER_LOSS)
                w.put("small 2")
                w.put(x_w)
                report = out_r.get(timeout=60)
                assert report["later"] == ["small 1", True, "small 2"], report
                assert x_r.get(timeout=10) == "through a handle that came after the loss"
            finally:
                p.join(timeout=30)
        assert p.exitcode == 0
        # One clear error, naming the likely cause.
        outcome, name, text = report["first"]
        assert (outcome, name) == ("raised", "GIPCError"), report["first"]
        assert "RLIMIT_NOFILE" in text and "lost" in text, text
        per_handle = 2 if transport == "hybrid" else 1  # hybrid: a pipe and a socket
        came, sent = re.search(r"(\d+) of its (\d+) came", text).groups()
        assert int(sent) == 80 * per_handle and int(came) < int(sent), text
        # The message is consumed and the stream in step: the next ones arrive, small and
        # large, and a handle behind them works (checked above, before the child is gone).
        # The descriptors that did come are closed; none leaked.
        before, after_loss, at_end = report["fds"]
        assert after_loss == before and at_end == before, report["fds"]


# Handles in a message while its put waits or is interrupted: held by that put (other
# greenlets wait to use them, cannot close them) until the message's first bytes go out,
# closed from then on whatever happens to the put, left to the sender if nothing went.

FILLER = b"f" * 8192  # below the bulk lane's threshold: fills the frame lane


def jam_through_another_writer(w):
    """Fills ``w``'s channel through a second writer of it (as another process sharing it
    would), so ``w`` has nothing queued but a put on it must wait. Returns the greenlet that
    keeps writing FILLER (it finishes once the reader takes ``count`` of them) and
    ``count``. Its last message may stay partly written: nothing may be written on ``w``
    before that greenlet is done."""
    other = _GIPCWriter(
        gipc._core.writer_from_fds(w._core.transport, [os.dup(fd) for fd in w._core.filenos()]),
        None,
        True,
    )
    count = (64 << 20) // len(FILLER)  # more than any pipe or socket buffer holds

    def write_all():
        for _ in range(count):
            other.put(FILLER)
        other.close()

    jammer = gevent.spawn(write_all)
    gevent.sleep(0.05)
    assert not jammer.ready(), "the channel took everything: nothing to wait for"
    return jammer, count


def jam_own_queue(w):
    """Fills ``w``'s channel with its own messages until one stays queued, not all written
    (what a put interrupted mid-message leaves): the next put waits for its rest. Returns
    that put's greenlet (none) and the count of FILLER messages."""
    count = 0
    while True:
        status = w._core.try_send(gipc._core.KIND_BYTES, FILLER)
        count += 1
        while status == gipc._core.YIELD:
            status = w._core.try_flush()
        if status == gipc._core.WOULD_BLOCK:
            return None, count


def drain_filler(r, count):
    for _ in range(count):
        assert r.get(timeout=5) == FILLER


class TestHandlesInAMessageThatWaits:
    def test_handles_are_held_while_put_waits_and_closed_once_sent(self, transport):
        with gipc.pipe() as (r, w):
            x_r, x_w = gipc.pipe()
            x_w.put("m1")
            x_w.put("m2")
            assert x_r.get() == "m1"  # "m2" may now sit in x_r's buffer: it travels
            _, count = jam_own_queue(w)  # the put waits to write the rest first
            sender = gevent.spawn(w.put, ("handles", x_r, x_w))
            gevent.sleep(0.05)
            assert not sender.ready() and not x_r.closed and not x_w.closed
            # Held by the waiting put: closing is refused, I/O waits behind it.
            with pytest.raises(GIPCLocked):
                x_r.close()
            with pytest.raises(GIPCLocked):
                x_w.close()
            with gipc.pipe() as (_, elsewhere):
                with pytest.raises(GIPCLocked, match="in a message"):
                    elsewhere.put(x_r)  # nor can another message take it
            local_get = gevent.spawn(x_r.get)
            local_put = gevent.spawn(x_w.put, "from the sender's side")
            gevent.sleep(0.05)
            assert not local_get.ready() and not local_put.ready()
            drain_filler(r, count)
            tag, moved_r, moved_w = r.get(timeout=5)
            sender.join(timeout=5)
            assert sender.successful() and tag == "handles"
            assert x_r.closed and x_w.closed
            # Those that waited find them gone, and took nothing.
            local_get.join(timeout=5)
            local_put.join(timeout=5)
            assert isinstance(local_get.exception, GIPCClosed)
            assert isinstance(local_put.exception, GIPCClosed)
            assert moved_r.get(timeout=1) == "m2"  # delivered once, here only
            moved_w.put("m3")
            assert moved_r.get(timeout=1) == "m3"
            moved_r.close()
            moved_w.close()

    def test_handles_close_when_the_first_bytes_go_not_after_the_last(self, transport):
        with gipc.pipe() as (r, w):
            x_r, x_w = gipc.pipe()
            x_w.put("m1")
            x_w.put("m2")
            assert x_r.get() == "m1"
            sender = gevent.spawn(w.put, (x_r, BIG))  # more than the channel holds
            gevent.sleep(0.05)
            assert not sender.ready()
            assert x_r.closed  # on its way: the sender cannot take "m2" any more
            with pytest.raises(GIPCClosed):
                x_r.get(timeout=0.1)
            moved_r, blob = r.get(timeout=5)
            sender.join(timeout=5)
            assert sender.successful() and blob == BIG
            assert moved_r.get(timeout=1) == "m2"
            moved_r.close()
            x_w.close()

    def test_a_put_interrupted_after_the_first_bytes_hands_the_handles_over(self, transport):
        with gipc.pipe() as (r, w):
            x_r, x_w = gipc.pipe()
            with pytest.raises(gevent.Timeout):
                with gevent.Timeout(0.05):
                    w.put((x_r, BIG))  # more than the channel holds: cannot finish
            assert x_r.closed  # its descriptors went with the first bytes
            after = gevent.spawn(w.put, "next")  # writes the rest first
            moved_r, blob = r.get(timeout=5)
            assert blob == BIG and r.get(timeout=5) == "next"
            after.join(timeout=5)
            x_w.put("a")
            x_w.put("b")
            assert moved_r.get(timeout=1) == "a"  # the only reader of that pipe
            assert moved_r.get(timeout=1) == "b"
            moved_r.close()
            x_w.close()

    @pytest.mark.parametrize("jam", [jam_through_another_writer, jam_own_queue])
    def test_a_put_interrupted_before_any_byte_sends_nothing_and_keeps_the_handles(
        self, transport, jam
    ):
        with gipc.pipe() as (r, w), gipc.pipe() as (x_r, x_w):
            jammer, count = jam(w)
            with pytest.raises(gevent.Timeout):
                with gevent.Timeout(0.05):
                    w.put(("handles", x_r, x_w))
            assert not x_r.closed and not x_w.closed
            x_w.put("still the sender's")
            assert x_r.get(timeout=1) == "still the sender's"
            if jammer is None:
                # Writes the rest of what jam_own_queue left in w, then "after".
                after = gevent.spawn(w.put, "after")
                drain_filler(r, count)
            else:
                # The other writer's last message first: two writers of one channel are
                # atomic with respect to each other only for small enough writes.
                drain_filler(r, count)
                jammer.join(timeout=5)
                assert jammer.successful()
                after = gevent.spawn(w.put, "after")
            assert r.get(timeout=5) == "after"  # the interrupted message never comes
            with pytest.raises(gevent.Timeout):
                r.get(timeout=0.05)
            after.join(timeout=5)

    def test_a_failed_put_leaves_the_handles_usable(self, transport):
        with gipc.pipe() as (r, w), gipc.pipe() as (x_r, x_w):
            r.close()
            with pytest.raises(BrokenPipeError):
                w.put([x_r, x_w])
            assert not x_r.closed and not x_w.closed
            x_w.put("fine")
            assert x_r.get(timeout=1) == "fine"

    def test_the_reader_of_the_very_pipe_cannot_travel_on_it(self, monkeypatch):
        # Told apart by the frame lane, an OS pipe: "hybrid" (the default) only. The two
        # ends of a "socket" channel's socket pair do not say they belong together.
        monkeypatch.setattr(_handles, "TRANSPORT", "hybrid")
        with gipc.pipe() as (r, w):
            with pytest.raises(GIPCError, match="reader of that very pipe"):
                w.put(["text", r])
            assert not r.closed
            with pytest.raises(gevent.Timeout):
                r.get(timeout=0.05)  # nothing was sent
            w.put("fine")
            assert r.get() == "fine"
        with gipc.pipe(duplex=True) as (a, b):
            with pytest.raises(GIPCError, match="very pipe"):
                a.put(b)  # b reads what a writes
            assert not b.closed
            a.put("fine")
            assert b.get() == "fine"

    def test_errors_of_put_speak_of_a_message_not_a_child(self, transport):
        with gipc.pipe() as (r, w), gipc.pipe() as (x_r, x_w):
            gone, _ = gipc.pipe()
            gone.close()
            _.close()
            with pytest.raises(GIPCClosed, match="in a message") as closed:
                w.put(gone)
            assert "child" not in str(closed.value)
            writing = gevent.spawn(x_w.put, BIG)
            gevent.sleep(0.05)  # inside put(), holding x_w's lock
            with pytest.raises(GIPCLocked, match="in a message") as locked:
                w.put({"w": x_w})
            assert "child" not in str(locked.value)
            with pytest.raises(GIPCLocked, match="on itself"):
                w.put(w)
            assert x_r.get(timeout=5) == BIG
            writing.join(timeout=5)
            with pytest.raises(gevent.Timeout):
                r.get(timeout=0.05)  # none of them sent anything


def test_a_message_with_more_descriptors_than_one_message_carries_is_refused_whole():
    # 130 writers of the default transport: 260 descriptors, above Linux's 253 per message.
    pairs = [gipc.pipe() for _ in range(130)]
    try:
        with gipc.pipe() as (r, w):
            with pytest.raises(GIPCError, match="more than one message carries"):
                w.put([writer for _, writer in pairs])
            w.put("next")
            assert r.get(timeout=5) == "next"  # nothing of the refused one was sent
        for reader, writer in pairs:  # still the caller's, and working
            writer.put(1)
            assert reader.get(timeout=5) == 1
    finally:
        for reader, writer in pairs:
            reader.close()
            writer.close()
