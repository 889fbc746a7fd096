"""Handles that travel as descriptors: pickled into a reference, rebuilt elsewhere.

A forked child inherits its handles as they are. A child that is not a fork of its caller
(start methods "spawn" and "forkserver") gets the descriptors instead, inherited or sent
with ``SCM_RIGHTS``, beside a pickle in which each handle is a reference: its class, its
codec, the positions of its descriptors in the list that travels with the pickle, and the
bytes its reader had received but not yet returned (so no message is lost on the way).

``HandlePickler`` makes such a pickle and collects the handles and descriptors;
``HandleUnpickler`` rebuilds the handles on the descriptors the receiver got, in the same
order (same numbers or not). A handle pickled without them raises a ``GIPCError`` that
says how to pass it instead.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

from . import _core
from ._handles import (
    _FailedMessage,
    _GIPCDuplexHandle,
    _GIPCHandle,
    _GIPCReader,
    _GIPCWriter,
    _pickle_dumps,
    _pickle_loads,
)
from .exceptions import GIPCError

_DEFAULT = "default"  # a codec that is gipc's own pickle, on both sides

AnyHandle = Union[_GIPCHandle, _GIPCDuplexHandle]


def _portable_codec(handle: _GIPCHandle, codec: Any, default: Any) -> Any:
    """The codec as it goes into the reference; refused, by name, if it cannot pickle."""
    if codec is default:
        return _DEFAULT
    if codec is None:
        return None
    try:
        pickle.dumps(codec, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise GIPCError(
            f"cannot pass {handle!r} to another process: its codec {codec!r} cannot be "
            f"pickled ({exc}); use a module-level function"
        ) from exc
    return codec


class DescriptorCarrier:
    """Base of gipc's own objects that travel with descriptors (as handles do), e.g. the
    memory a pool shares with a worker. ``_export`` says what goes (a picklable state and
    the descriptors, which stay the sender's); the class's ``_rebuild`` makes it again from
    the state and the receiver's descriptors (taking them over)."""

    def _export(self) -> Tuple[Any, List[int]]:
        raise NotImplementedError

    @classmethod
    def _rebuild(cls, state: Any, fds: List[int]) -> Any:
        raise NotImplementedError


class HandlePickler(pickle.Pickler):
    """A pickler that turns every gipc handle into a reference to descriptors.

    After ``dump``: ``handles`` lists each handle found (once, in order) and ``fds`` the
    descriptors to send beside the pickle, in the order the references name them. Each
    handle is checked as ``start_process`` checks it (open, not in use).
    """

    def __init__(self, file: Any, protocol: Optional[int] = pickle.HIGHEST_PROTOCOL) -> None:
        super().__init__(file, protocol)
        self.handles: List[AnyHandle] = []
        self.fds: List[int] = []
        self._references: Dict[int, Tuple[Any, ...]] = {}

    def persistent_id(self, obj: Any) -> Optional[Tuple[Any, ...]]:
        cls = obj.__class__
        if cls is not _GIPCReader and cls is not _GIPCWriter and cls is not _GIPCDuplexHandle:
            if isinstance(obj, DescriptorCarrier):
                return self._carried(obj)
            return None
        reference = self._references.get(id(obj))
        if reference is None:
            reference = self._reference(obj)
            self._references[id(obj)] = reference
            self.handles.append(obj)
        return reference

    def _carried(self, obj: DescriptorCarrier) -> Tuple[Any, ...]:
        reference = self._references.get(id(obj))
        if reference is None:
            state, fds = obj._export()
            positions = list(range(len(self.fds), len(self.fds) + len(fds)))
            reference = ("carried", -1 - len(self._references), type(obj), state, positions)
            self.fds.extend(fds)
            self._references[id(obj)] = reference
        return reference

    def _reference(self, obj: AnyHandle) -> Tuple[Any, ...]:
        index = len(self.handles)
        if isinstance(obj, _GIPCDuplexHandle):
            # Its parts are saved by reference in turn (nested persistent ids).
            return ("duplex", index, obj._reader, obj._writer)
        obj._check_passable()
        fds = obj._core.filenos()
        positions = list(range(len(self.fds), len(self.fds) + len(fds)))
        if isinstance(obj, _GIPCReader):
            transport, unread = obj._core.transfer_state()
            if any(item.__class__ is _FailedMessage for item in obj._backlog):
                raise GIPCError(f"cannot pass {obj!r}: a message it received failed to decode")
            codec = _portable_codec(obj, obj._decoder, _pickle_loads)
            state: Tuple[Any, ...] = (
                "reader",
                index,
                transport,
                positions,
                codec,
                obj._default_codecs,
                obj._core.max_message_size,
                obj._core.spin_us,
                unread,
                list(obj._backlog),
            )
        else:
            assert isinstance(obj, _GIPCWriter)
            transport = obj._core.transfer_state()
            codec = _portable_codec(obj, obj._encoder, _pickle_dumps)
            state = ("writer", index, transport, positions, codec, obj._default_codecs)
        self.fds.extend(fds)
        return state


class HandleUnpickler(pickle.Unpickler):
    """Rebuilds the handles of a ``HandlePickler`` pickle on ``fds`` (the descriptors that
    came with it, in order). ``used`` tells which of them the handles took over; closing
    the rest is the caller's job (``loads_with_handles`` does it)."""

    def __init__(self, file: Any, fds: Sequence[int]) -> None:
        super().__init__(file)
        self.fds = list(fds)
        self.used: Set[int] = set()
        self._rebuilt: Dict[int, AnyHandle] = {}

    def persistent_load(self, reference: Any) -> Any:
        try:
            kind, index = reference[0], reference[1]
        except (TypeError, IndexError, KeyError):
            raise pickle.UnpicklingError(f"unknown reference {reference!r}") from None
        rebuilt = self._rebuilt.get(index)
        if rebuilt is None:
            rebuilt = self._rebuild(kind, reference)
            self._rebuilt[index] = rebuilt
        return rebuilt

    def _take(self, positions: Sequence[int]) -> List[int]:
        if any(p in self.used or not 0 <= p < len(self.fds) for p in positions):
            raise pickle.UnpicklingError(f"descriptor positions {positions} are not available")
        return [self.fds[p] for p in positions]

    def _rebuild(self, kind: str, reference: Tuple[Any, ...]) -> AnyHandle:
        if kind == "carried":
            _, _, cls, state, positions = reference
            if not (isinstance(cls, type) and issubclass(cls, DescriptorCarrier)):
                raise pickle.UnpicklingError(f"{cls!r} does not travel with descriptors")
            fds = self._take(positions)
            carried = cls._rebuild(state, fds)
            self.used.update(positions)
            return carried  # type: ignore[no-any-return]
        if kind == "duplex":
            _, _, reader, writer = reference
            return _GIPCDuplexHandle(reader, writer)
        if kind == "reader":
            (_, _, transport, positions, codec, default_codecs, max_size, spin_us, unread,
             backlog) = reference
            fds = self._take(positions)
            core = _core.reader_from_fds(transport, fds, unread, max_size)
            self.used.update(positions)
            core.spin_us = spin_us
            reader = _GIPCReader(core, _pickle_loads if codec == _DEFAULT else codec,
                                 default_codecs)
            reader._backlog.extend(backlog)
            return reader
        if kind == "writer":
            _, _, transport, positions, codec, default_codecs = reference
            fds = self._take(positions)
            wcore = _core.writer_from_fds(transport, fds)
            self.used.update(positions)
            return _GIPCWriter(wcore, _pickle_dumps if codec == _DEFAULT else codec,
                               default_codecs)
        raise pickle.UnpicklingError(f"unknown reference kind {kind!r}")


def dumps_with_handles(obj: Any) -> Tuple[bytes, List[AnyHandle], List[int]]:
    """``obj`` pickled with its handles as references; the handles; the descriptors to send."""
    buffer = io.BytesIO()
    pickler = HandlePickler(buffer)
    pickler.dump(obj)
    return buffer.getvalue(), pickler.handles, pickler.fds


def loads_with_handles(data: bytes, fds: Sequence[int]) -> Any:
    """The object of a ``dumps_with_handles`` pickle, its handles rebuilt on ``fds`` (which
    this takes over: every descriptor no handle took is closed, also on error)."""
    unpickler = HandleUnpickler(io.BytesIO(data), fds)
    try:
        return unpickler.load()
    finally:
        for position, fd in enumerate(fds):
            if position not in unpickler.used:
                try:
                    os.close(fd)
                except OSError:
                    pass
