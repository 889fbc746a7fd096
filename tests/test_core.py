"""The extension's contract (``gipc._core``, typed in ``_core.pyi``), exercised directly:
what the Python layer relies on, call by call. It never waits: every call answers at once."""

from __future__ import annotations

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
    assert len({_core.KIND_ENCODED, _core.KIND_BYTES, _core.KIND_BATCH}) == 3
    assert _core.MAX_PAYLOAD_LEN == (1 << 40) - 1
    assert _core.BULK_MIN == 16 << 10
    assert _core.REPLY_SPIN_US > 0
    assert isinstance(_core.__version__, str)


def test_nothing_to_read_is_none_not_a_wait(channel):
    reader, _ = channel
    assert reader.try_recv() is None
    assert reader.buffered == 0


def test_a_frame_round_trip(channel):
    reader, writer = channel
    assert writer.try_send(_core.KIND_ENCODED, b"payload") == _core.DONE
    assert not writer.pending and not writer.mid_frame
    assert reader.try_recv() == (_core.KIND_ENCODED, b"payload")
    assert reader.try_recv() is None


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
    assert reader.try_recv() is None


def test_a_full_channel_says_would_block_and_flushes_later(channel):
    reader, writer = channel
    status = writer.try_send(_core.KIND_ENCODED, bytes(8 << 20))
    while status == _core.YIELD:
        status = writer.try_flush()
    assert status == _core.WOULD_BLOCK
    assert writer.pending
    assert writer.wait_fileno() in writer.filenos()
    received = None
    while received is None or received is False:
        received = reader.try_recv()
        if received is None or received is False:
            status = writer.try_flush()
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
    assert reader.spin_us == 0
    reader.spin_us = 20
    assert reader.spin_us == 20
    assert reader.try_recv() is None  # spun, found nothing, answered


def test_unknown_transport():
    with pytest.raises(ValueError, match="transport"):
        _core.channel("carrier-pigeon")


def test_reset_signal_state_is_listed():
    # Resetting dispositions is for a forked child; here only its presence is checked (the
    # child tests run it).
    assert callable(_core.reset_signal_state)
