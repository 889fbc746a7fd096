"""Handles rebuilt from their descriptors elsewhere (what spawn and fork-server children
get): the core's transfer state and adoption of descriptors, and the handle pickler."""

from __future__ import annotations

import os
import pickle

import pytest

import gipc
from gipc import GIPCError, _core
from gipc._transfer import DescriptorCarrier, dumps_with_handles, loads_with_handles


def moved(obj):
    """``obj`` pickled with its handles, rebuilt on copies of their descriptors (as a
    receiving process gets them); the originals are closed."""
    data, handles, fds = dumps_with_handles(obj)
    copies = [os.dup(fd) for fd in fds]
    for handle in handles:
        parts = handle._parts() if isinstance(handle, gipc.DuplexHandle) else (handle,)
        for part in parts:
            if not part.closed:
                part.close()
    return loads_with_handles(data, copies)


@pytest.mark.parametrize("transport", ["hybrid", "socket", "pipe"])
def test_a_moved_pair_carries_on_with_what_was_in_flight(monkeypatch, transport):
    monkeypatch.setattr(gipc._handles, "TRANSPORT", transport)
    r, w = gipc.pipe()
    w.put_many(["one", "two", "three"])
    w.put(b"x" * 100_000)  # a bulk payload, still in the kernel
    assert r.get() == "one"  # "two" and "three" are in the reader's backlog now
    r2, w2 = moved((r, w))
    assert [r2.get(), r2.get(), len(r2.get())] == ["two", "three", 100_000]
    w2.put({"more": 1})
    assert r2.get() == {"more": 1}
    r2.close()
    w2.close()


def test_a_partly_buffered_frame_moves_too():
    r, w = gipc.pipe(encoder=None, decoder=None)
    w.put(b"a" * 10)
    w.put(b"b" * 10)
    r._core.try_recv()  # reads both frames into the buffer, returns the first
    state = r._core.transfer_state()
    assert state[0] == "hybrid" and len(state[1]) > 10
    r2, w2 = moved((r, w))
    assert r2.get() == b"b" * 10
    r2.close()
    w2.close()


def test_duplex_handles_and_the_same_handle_twice():
    a, b = gipc.pipe(duplex=True)
    moved_a, again = moved((a, a))
    assert moved_a is again
    moved_a.put("ping")
    assert b.get() == "ping"
    b.put("pong")
    assert moved_a.get() == "pong"
    moved_a.close()
    b.close()


def test_custom_codecs_travel_if_they_pickle():
    r, w = gipc.pipe(encoder=str.encode, decoder=bytes.decode)
    r2, w2 = moved((r, w))
    w2.put("text")
    assert r2.get() == "text"
    r2.close()
    w2.close()
    r, w = gipc.pipe(encoder=lambda o: b"", decoder=None)
    with pytest.raises(GIPCError, match="codec .*cannot be pickled"):
        dumps_with_handles(w)
    r.close()
    w.close()


def test_closed_and_busy_handles_are_refused():
    r, w = gipc.pipe()
    r.close()
    with pytest.raises(gipc.GIPCClosed):
        dumps_with_handles(r)
    w.close()


def test_plain_pickle_of_a_handle_says_how_to_pass_it():
    with gipc.pipe() as (r, w):
        with pytest.raises(gipc.GIPCTypeError, match="start_process"):
            pickle.dumps(r)
        with pytest.raises(TypeError):
            pickle.dumps([w])


def test_descriptors_nobody_took_are_closed_also_on_error():
    r, w = gipc.pipe()
    data, _, fds = dumps_with_handles(r)
    copies = [os.dup(fd) for fd in fds]
    extra = os.dup(copies[0])
    loads_with_handles(data, copies + [extra]).close()
    with pytest.raises(OSError):
        os.fstat(extra)
    bad = [os.dup(fd) for fd in reversed(fds)]  # socket where the pipe goes: refused
    with pytest.raises(ValueError, match="channel has a Fifo"):
        loads_with_handles(data, bad)
    for fd in bad:
        with pytest.raises(OSError):
            os.fstat(fd)
    r.close()
    w.close()


class TestCore:
    def test_from_fds_checks_what_it_takes(self):
        r, w = _core.channel("hybrid")
        with pytest.raises(ValueError, match="2 descriptor"):
            _core.reader_from_fds("hybrid", [r.filenos()[0]])
        with pytest.raises(ValueError, match="unknown transport"):
            _core.writer_from_fds("carrier pigeon", w.filenos())
        with pytest.raises(ValueError, match="not descriptors"):
            _core.writer_from_fds("pipe", [-1])
        with pytest.raises(ValueError, match="Bad file descriptor|EBADF|os error 9"):
            _core.writer_from_fds("pipe", [10_000])
        with pytest.raises(ValueError, match="more than a reader holds"):
            _core.reader_from_fds("pipe", [r.fileno()], b"x" * (1 << 20))
        assert not r.closed and not w.closed  # refusals take nothing over
        r.close()
        w.close()

    def test_a_writer_with_queued_frames_cannot_move(self):
        r, w = _core.channel("pipe")
        while w.try_send(_core.KIND_BYTES, b"x" * 65536) == _core.DONE:
            pass
        with pytest.raises(gipc.GIPCError, match="not entirely written"):
            w.transfer_state()
        r.close()
        w.close()

    def test_a_reader_mid_payload_cannot_move(self):
        r, w = _core.channel("pipe")
        w.try_send(_core.KIND_BYTES, b"y" * (1 << 20))
        while r.try_recv() is not None:  # part of it read, the rest still coming
            pass
        with pytest.raises(gipc.GIPCError, match="partly received"):
            r.transfer_state()
        r.close()
        w.close()


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
