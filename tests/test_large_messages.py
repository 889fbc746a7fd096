"""Large messages arrive whole and in order whatever pages the receiver gives their buffers:
a payload of 8 MiB or more is read into a buffer that asks for huge pages, and the receiver
may withdraw that request halfway through the buffer (crates/wire/src/memory.rs). The data
carry a pattern that differs per message and per position, so a byte in the wrong place,
or a stretch left unwritten, shows."""

from __future__ import annotations

import gevent
import pytest

import gipc
from gipc import _handles

MiB = 1 << 20


def pattern(seed: int, size: int) -> bytes:
    """`size` bytes that differ from the pattern of every other seed at every 251st byte."""
    block = bytes((seed * 7 + i) % 251 for i in range(251))
    return (block * (size // len(block) + 1))[:size]


@pytest.fixture(params=["hybrid", "socket", "pipe"])
def transport(request, monkeypatch):
    """Runs a test over every transport."""
    monkeypatch.setattr(_handles, "TRANSPORT", request.param)
    return request.param


@pytest.mark.parametrize("raw", [False, True], ids=["pickled", "raw"])
def test_a_stream_of_large_messages_arrives_whole(transport, raw):
    codec = {"encoder": None, "decoder": None} if raw else {}
    # Sizes around the huge-page threshold and 2 MiB boundaries, back to back (a stream: the
    # second and later buffers follow the first within the receiver's window).
    sizes = [8 * MiB, 8 * MiB + 1, 21 * MiB - 7, 3 * MiB]
    with gipc.pipe(**codec) as (reader, writer):

        def send() -> None:
            for seed, size in enumerate(sizes):
                writer.put(pattern(seed, size))

        sender = gevent.spawn(send)
        for seed, size in enumerate(sizes):
            got = reader.get()
            assert len(got) == size
            assert got == pattern(seed, size), "message %d differs" % seed
        sender.get(timeout=30)


def test_a_large_message_into_a_fresh_child_arrives_whole():
    with gipc.pipe(duplex=True) as (here, there):
        child = gipc.start_process(_check_in_child, args=(there, 3))
        here.put(pattern(3, 24 * MiB + 5))
        assert here.get() == (24 * MiB + 5, True)
        child.join()
    assert child.exitcode == 0


def _check_in_child(handle, seed: int) -> None:
    data = handle.get()
    handle.put((len(data), data == pattern(seed, len(data))))
