"""The extension's contract (``gipc._core``, typed in ``_core.pyi``), exercised directly:
what the Python layer relies on, call by call. It never waits: every call answers at once."""

from __future__ import annotations

import errno
import os

import pytest

from gipc import GIPCClosed, GIPCError, _core

TRANSPORTS = ["hybrid", "socket", "pipe"]


@pytest.fixture(params=TRANSPORTS)
def channel(request):
    reader, writer = _core.channel(request.param)
    yield reader, writer
    reader.close()
    writer.close()


def test_constants():
    assert {_core.DONE, _core.WOULD_BLOCK, _core.YIELD} == {0, 1, 2}
    assert len({_core.KIND_ENCODED, _core.KIND_BYTES, _core.KIND_BATCH, _core.KIND_HANDLES}) == 4
    assert _core.BULK_MIN == 16 << 10
    assert _core.REPLY_SPIN_US > 0
    assert isinstance(_core.__version__, str)


def test_send_and_receive_answer_with_the_same_constants(channel):
    reader, writer = channel
    assert reader.try_recv() == _core.WOULD_BLOCK
    assert writer.try_send(_core.KIND_BYTES, b"x") == _core.DONE
    assert reader.try_recv() == (_core.KIND_BYTES, b"x")
    # A receive that has used its time slice answers YIELD, as a send does.
    assert writer.try_send_many(_core.KIND_BYTES, [b"y"] * 200_000) in set(range(3))
    answers = []
    for _ in range(1_000_000):
        got = reader.try_recv()
        if got.__class__ is tuple:
            continue
        answers.append(got)
        if got == _core.YIELD:
            break
        writer.try_flush()  # the channel is empty: let the writer go on
    assert _core.YIELD in answers and set(answers) <= {_core.WOULD_BLOCK, _core.YIELD}


def test_nothing_to_read_is_would_block_not_a_wait(channel):
    reader, _ = channel
    assert reader.try_recv() == _core.WOULD_BLOCK
    assert reader.buffered == 0


def test_a_frame_round_trip(channel):
    reader, writer = channel
    assert writer.try_send(_core.KIND_ENCODED, b"payload") == _core.DONE
    assert not writer.mid_frame
    assert reader.try_recv() == (_core.KIND_ENCODED, b"payload")
    assert reader.try_recv() == _core.WOULD_BLOCK


def test_batches_and_buffers(channel):
    reader, writer = channel
    assert writer.try_send_many(_core.KIND_BYTES, [b"a", bytearray(b"bb"), memoryview(b"c")]) == 0
    got = [reader.try_recv() for _ in range(3)]
    assert got == [(_core.KIND_BYTES, b"a"), (_core.KIND_BYTES, b"bb"), (_core.KIND_BYTES, b"c")]


def test_bad_kind_and_bad_payload_queue_nothing(channel):
    reader, writer = channel
    with pytest.raises(ValueError, match="unknown kind"):
        writer.try_send(200, b"x")
    with pytest.raises(TypeError, match="str"):
        writer.try_send(_core.KIND_ENCODED, "text")
    with pytest.raises(TypeError):
        writer.try_send_many(_core.KIND_ENCODED, [b"ok", 3])
    assert reader.try_recv() == _core.WOULD_BLOCK


def test_try_send_checks_its_arguments(channel):
    reader, writer = channel
    for args in [(), (_core.KIND_BYTES,), (_core.KIND_BYTES, b"x", b"y")]:
        with pytest.raises(TypeError, match="two positional arguments"):
            writer.try_send(*args)
    with pytest.raises(TypeError, match="two positional arguments"):
        writer.try_send(_core.KIND_BYTES, payload=b"x")  # type: ignore[call-arg]
    with pytest.raises(OverflowError):
        writer.try_send(300, b"x")
    with pytest.raises(TypeError, match="doesn't apply"):
        type(writer).try_send(reader, _core.KIND_BYTES, b"x")  # type: ignore[arg-type]
    assert reader.try_recv() == _core.WOULD_BLOCK
    writer.close()
    with pytest.raises(GIPCClosed):
        writer.try_send(_core.KIND_BYTES, b"x")


def test_a_full_channel_says_would_block_and_flushes_later(channel):
    reader, writer = channel
    status = writer.try_send(_core.KIND_ENCODED, bytes(8 << 20))
    while status == _core.YIELD:
        status = writer.try_flush()
    assert status == _core.WOULD_BLOCK
    assert writer.wait_fileno() in writer.filenos()
    received = reader.try_recv()
    while received.__class__ is not tuple:
        assert received in (_core.WOULD_BLOCK, _core.YIELD)
        status = writer.try_flush()
        received = reader.try_recv()
    assert received == (_core.KIND_ENCODED, bytes(8 << 20))


def test_descriptors(channel):
    reader, writer = channel
    assert reader.filenos()[0] == reader.fileno()
    assert writer.filenos()[0] == writer.fileno()
    assert len(reader.filenos()) == len(writer.filenos()) in (1, 2)
    assert reader.wait_fileno() == reader.fileno()
    for fd in reader.filenos() + writer.filenos():
        assert os.get_blocking(fd) is False
        assert os.get_inheritable(fd) is False


def test_close_and_use_after_close(channel):
    reader, writer = channel
    assert writer.close() is True
    assert writer.close() is False and writer.closed
    with pytest.raises(EOFError):
        reader.try_recv()
    assert reader.close() is True and reader.closed
    with pytest.raises(GIPCClosed):
        reader.try_recv()
    with pytest.raises(GIPCClosed):
        writer.try_send(_core.KIND_ENCODED, b"x")
    with pytest.raises(GIPCClosed):
        reader.fileno()


def test_max_message_size_is_checked_before_allocating(channel):
    reader, writer = channel
    reader.max_message_size = 10
    assert reader.max_message_size == 10
    writer.try_send(_core.KIND_ENCODED, b"x" * 11)
    with pytest.raises(GIPCError, match="max_message_size"):
        reader.try_recv()


def test_spin_setting(channel):
    reader, _ = channel
    assert reader.spin_us == _core.REPLY_SPIN_US and reader.spin_streams_only
    reader.spin_us = 20
    assert reader.spin_us == 20 and reader.spin_streams_only  # the kind of spin stays
    reader.spin_streams_only = False
    assert reader.try_recv() == _core.WOULD_BLOCK  # spun, found nothing, answered
    reader.spin_us = 0
    assert reader.spin_us == 0 and not reader.spin_streams_only


def test_unknown_transport():
    with pytest.raises(ValueError, match="transport"):
        _core.channel("carrier-pigeon")


def test_reset_signal_state_is_listed():
    # Resetting dispositions is for a forked child; here only its presence is checked (the
    # child tests run it).
    assert callable(_core.reset_signal_state)


def _receive(reader):
    """The next message, polling (the channel is local: whatever is sent is there)."""
    for _ in range(100_000):
        got = reader.try_recv()
        if got.__class__ is tuple:
            return got
    raise AssertionError("no message")


def _moved_reader(reader, **kwargs):
    """``reader`` rebuilt from copies of its descriptors, as another process would; the
    original is closed."""
    transport, buffered = reader.transfer_state()
    copies = [os.dup(fd) for fd in reader.filenos()]
    reader.close()
    return _core.reader_from_fds(transport, copies, buffered, **kwargs)


def _moved_writer(writer):
    transport = writer.transfer_state()
    copies = [os.dup(fd) for fd in writer.filenos()]
    writer.close()
    return _core.writer_from_fds(transport, copies)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_end_moved_to_new_descriptors_loses_no_message(transport):
    reader, writer = _core.channel(transport)
    big = bytes(range(256)) * 4096  # 1 MiB: the bulk lane of a hybrid channel
    sent = [writer.try_send(_core.KIND_BYTES, p) for p in (b"first", b"second", big, b"last")]
    if all(status == _core.DONE for status in sent):
        writer = _moved_writer(writer)
    assert _receive(reader) == (_core.KIND_BYTES, b"first")
    # "second" (and maybe more) is in the reader's buffer now, not in the pipe.
    assert reader.buffered > 0
    assert reader.transfer_state()[0] == transport
    reader = _moved_reader(reader, max_message_size=2 << 20)
    assert reader.max_message_size == 2 << 20
    got = [_receive(reader)]
    while len(got) < 3:
        writer.try_flush()
        got.append(_receive(reader))
    assert got == [(_core.KIND_BYTES, p) for p in (b"second", big, b"last")]
    writer = _moved_writer(writer)
    writer.try_send(_core.KIND_ENCODED, b"after")
    assert _receive(reader) == (_core.KIND_ENCODED, b"after")
    writer.close()
    with pytest.raises(EOFError):
        _receive(reader)
    reader.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("cut", [3, 8, 11])
def test_a_frame_split_across_the_hand_over_arrives_whole(transport, cut):
    # The frame's bytes as they travel: sent on a pipe-only channel and read raw.
    raw_reader, raw_writer = _core.channel("pipe")
    raw_writer.try_send(_core.KIND_ENCODED, b"split-me")
    frame = os.read(raw_reader.fileno(), 100)
    raw_reader.close()
    raw_writer.close()
    assert len(frame) == 16
    reader, writer = _core.channel(transport)
    os.write(writer.fileno(), frame[:cut])
    assert reader.try_recv() == _core.WOULD_BLOCK
    assert reader.buffered == cut
    reader = _moved_reader(reader)
    os.write(writer.fileno(), frame[cut:])
    assert _receive(reader) == (_core.KIND_ENCODED, b"split-me")
    reader.close()
    writer.close()


def test_a_reader_mid_bulk_payload_cannot_move_and_keeps_working():
    reader, writer = _core.channel("hybrid")
    payload = bytes(8 << 20)
    status = writer.try_send(_core.KIND_BYTES, payload)
    for _ in range(20):
        if reader.try_recv() == _core.WOULD_BLOCK and reader.buffered > 0:
            break
        status = writer.try_flush()
    assert reader.wait_fileno() == reader.filenos()[1] and reader.buffered > 0
    with pytest.raises(GIPCError, match="bulk lane"):
        reader.transfer_state()
    assert not reader.closed
    received = _core.WOULD_BLOCK
    while received.__class__ is not tuple:
        if status != _core.DONE:
            status = writer.try_flush()
        received = reader.try_recv()
    assert received == (_core.KIND_BYTES, payload)
    reader.close()
    writer.close()


def test_a_writer_with_queued_frames_cannot_move(channel):
    reader, writer = channel
    status = writer.try_send(_core.KIND_ENCODED, bytes(8 << 20))
    while status == _core.YIELD:
        status = writer.try_flush()
    assert status == _core.WOULD_BLOCK
    with pytest.raises(GIPCError, match="not entirely written"):
        writer.transfer_state()
    assert not writer.closed


def test_closed_ends_have_no_state(channel):
    reader, writer = channel
    reader.close()
    writer.close()
    with pytest.raises(GIPCClosed):
        reader.transfer_state()
    with pytest.raises(GIPCClosed):
        writer.transfer_state()


def test_adopted_descriptors_are_nonblocking_cloexec_and_closed_by_close():
    r, w = os.pipe()
    os.set_inheritable(r, True)
    reader = _core.reader_from_fds("pipe", [r])
    writer = _core.writer_from_fds("pipe", [w])
    for fd in (r, w):
        assert os.get_blocking(fd) is False and os.get_inheritable(fd) is False
    assert reader.filenos() == [r] and writer.filenos() == [w]
    writer.try_send(_core.KIND_BYTES, b"x")
    assert _receive(reader) == (_core.KIND_BYTES, b"x")
    reader.close()
    writer.close()
    for fd in (r, w):
        with pytest.raises(OSError):
            os.fstat(fd)


def _still_open(fds):
    for fd in fds:
        os.fstat(fd)
        assert os.get_blocking(fd) is True  # untouched
        os.close(fd)


def test_descriptors_that_do_not_fit_are_refused_and_left_open():
    import socket

    from gipc.exceptions import GIPCValueError

    r, w = os.pipe()
    with pytest.raises(GIPCValueError, match="read end"):
        _core.reader_from_fds("pipe", [w])
    with pytest.raises(GIPCValueError, match="write end"):
        _core.writer_from_fds("pipe", [r])
    with pytest.raises(GIPCValueError, match="2 descriptor"):
        _core.reader_from_fds("hybrid", [r])
    with pytest.raises(GIPCValueError, match="AF_UNIX"):
        _core.reader_from_fds("socket", [r])
    with pytest.raises(GIPCValueError, match="AF_UNIX"):
        _core.reader_from_fds("hybrid", [r, w])
    with pytest.raises(GIPCValueError, match="same"):
        _core.reader_from_fds("hybrid", [r, r])
    with pytest.raises(ValueError, match="transport"):
        _core.reader_from_fds("carrier-pigeon", [r])
    inet = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with inet, a, b:
        for fd in (inet.fileno(), a.fileno()):
            with pytest.raises(GIPCValueError, match="AF_UNIX stream"):
                _core.reader_from_fds("socket", [fd])
        with pytest.raises(GIPCValueError, match="a pipe"):
            _core.reader_from_fds("pipe", [a.fileno()])
    # A descriptor that is not open: EBADF, and the open one beside it is not taken.
    s1, s2 = socket.socketpair()
    bad = os.dup(w)
    os.close(bad)
    with pytest.raises(OSError) as info:
        _core.reader_from_fds("hybrid", [r, bad])
    assert info.value.errno == errno.EBADF
    s1.close()
    s2.close()
    _still_open([r, w])


@pytest.mark.parametrize("transport", ["hybrid", "socket"])
def test_descriptors_travel_with_a_handles_frame(transport):
    reader, writer = _core.channel(transport)
    assert reader.transport == writer.transport == transport
    r, w = os.pipe()
    payload = (2).to_bytes(4, "little") + b"rest"
    assert writer.try_send_fds(_core.KIND_HANDLES, payload, [r, w]) == _core.DONE
    os.close(r)  # the frame took copies: the originals are the caller's to close
    os.close(w)
    kind, data, fds = _receive(reader)
    assert (kind, data, len(fds)) == (_core.KIND_HANDLES, payload, 2)
    os.write(fds[1], b"!")
    assert os.read(fds[0], 1) == b"!"
    assert all(os.get_inheritable(fd) is False for fd in fds)
    for fd in fds:
        os.close(fd)
    # Received and never returned: closed with the reader.
    channel_fds = len(reader.filenos()) + len(writer.filenos())
    before = len(os.listdir("/proc/self/fd"))
    writer.try_send(_core.KIND_ENCODED, b"first")
    writer.try_send_fds(_core.KIND_HANDLES, (1).to_bytes(4, "little"), [0])
    if transport == "socket":
        # One read takes in both frames, and the descriptor with them.
        assert _receive(reader) == (_core.KIND_ENCODED, b"first")
        assert len(os.listdir("/proc/self/fd")) == before + 1
        with pytest.raises(GIPCError, match="not yet returned"):
            reader.transfer_state()
    reader.close()
    writer.close()
    assert len(os.listdir("/proc/self/fd")) == before - channel_fds


def test_a_handles_frame_must_announce_its_descriptors_and_needs_a_socket(channel):
    reader, writer = channel
    if writer.transport == "pipe":
        with pytest.raises(GIPCError, match="'pipe' channel"):
            writer.try_send_fds(_core.KIND_HANDLES, (1).to_bytes(4, "little"), [0])
    else:
        with pytest.raises(ValueError, match="count"):
            writer.try_send_fds(_core.KIND_HANDLES, (2).to_bytes(4, "little"), [0])
        with pytest.raises(ValueError):
            writer.try_send_fds(_core.KIND_ENCODED, (1).to_bytes(4, "little"), [0])
    assert reader.try_recv() == _core.WOULD_BLOCK
