"""Handles and other gipc objects that move to another process: pickled as references to
their descriptors, which travel beside the pickle (to a child at its start, or in a message
with ``SCM_RIGHTS``).

A handle in a pickle is a persistent reference, ``(_HANDLE_TAG, number, description)``:
the description (its kind, codec, limits, the bytes its reader had received and not
returned, and its descriptors as indices into the list that travels beside the pickle)
the first time the handle is met, ``None`` after that, so a handle met twice is one handle
on the other side. Indices, not numbers: a child started with ``pass_fds`` sees the same
numbers, one that receives them with SCM_RIGHTS new ones.

Imported only where something travels: by ``_startup`` and ``_startup_child``, and by a
handle's ``put``/``get`` of a message with handles in it.
"""

from __future__ import annotations

import io
import os
import pickle
import stat
import struct
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from . import _core
from ._handles import (
    _PICKLE_PROTOCOL,
    AnyHandle,
    _GIPCDuplexHandle,
    _GIPCHandle,
    _GIPCReader,
    _GIPCWriter,
    _pickle_dumps,
    _pickle_loads,
)
from .exceptions import GIPCError, GIPCLocked

_HANDLE_TAG = "gipc.handle"
#: The most descriptors one message carries (Linux's SCM_MAX_FD; ``_core`` checks it too).
MAX_MESSAGE_FDS = 253
#: A KIND_HANDLES payload starts with the count of its descriptors (see `_core`).
_FD_COUNT = struct.Struct("<I")
#: Stands for the default pickle codec in a description: the other side's own
#: ``_pickle_dumps`` is then used, so the pipe keeps its fast paths (``_default_codecs``).
_PICKLE_CODEC = "pickle"
_PASSABLE = (_GIPCReader, _GIPCWriter, _GIPCDuplexHandle)


#: Another gipc object that travels with descriptors: ``(_CARRIED_TAG, number, (class,
#: state, indices))`` the first time, ``(_CARRIED_TAG, number, None)`` after.
_CARRIED_TAG = "gipc.carried"


class DescriptorCarrier:
    """Base of gipc's own objects (other than handles) that travel with descriptors of
    their own, such as the memory a pool shares with a worker. ``_export`` says what goes:
    a picklable state and the descriptors (which stay the sender's); the class's
    ``_rebuild`` makes the object again from the state and the receiver's descriptors,
    which it takes over."""

    def _export(self) -> Tuple[Any, List[int]]:
        raise NotImplementedError

    @classmethod
    def _rebuild(cls, state: Any, fds: List[int]) -> Any:
        raise NotImplementedError


class HandlePickler(pickle.Pickler):
    """A pickler that turns every gipc handle in the object (at any depth) into a reference.

    After ``dump()``, ``handles`` lists the handles met (each once, in order; a duplex
    handle as itself) and ``fds`` the descriptors to ship beside the pickle, in order. The
    handles are not closed: the caller closes them once the descriptors are sent, and must
    not use them meanwhile (a reader's buffered messages travel in the pickle).

    ``sender``: the writer that will ``put`` the message (``None``: the handles go to a
    child). Then each reader and writer met is also held, its lock taken as it is
    described, and listed in ``held``: no other greenlet uses it until the caller releases
    it (see ``_GIPCWriter._put_with_handles``). The caller releases ``held`` after a failed
    ``dump`` too.

    Raises (from ``dump``): ``GIPCClosed``/``GIPCLocked`` for a closed handle or one a
    greenlet is using (the ``sender`` itself included), ``GIPCError`` for one that cannot
    move now or whose codec cannot be pickled, or the reader of the ``sender``'s own pipe.
    """

    def __init__(
        self,
        file: Any,
        protocol: int = _PICKLE_PROTOCOL,
        passed: "Optional[Set[_GIPCHandle]]" = None,
        *,
        sender: Optional[_GIPCWriter] = None,
    ) -> None:
        super().__init__(file, protocol)
        self.handles: List[AnyHandle] = []
        self.fds: List[int] = []
        self.sender = sender
        self.held: List[_GIPCHandle] = []
        #: What errors say was tried with a handle, formatted with it (the first for those
        #: about its codec).
        self._action = "pass {} to another process" if sender is None else _IN_A_MESSAGE
        self._short_action = "pass {}" if sender is None else _IN_A_MESSAGE
        #: id() of each handle (duplex handles and their parts) met -> its number.
        self._numbers: Dict[int, int] = {}
        #: If given, the only handles that travel (a duplex handle by its two parts): any
        #: other is a closed handle on the other side, as a forked child has it.
        self._passed = passed

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _PASSABLE):
            if self._passed is not None and not self._travels(obj):
                return self._closed_reference(obj)
            return self._reference(obj, top=True)
        if isinstance(obj, DescriptorCarrier):
            return self._carried(obj)
        return None

    def add_descriptor(self, fd: int) -> int:
        """Ships ``fd`` (which stays open here) beside the pickle; returns its index
        there, for an :class:`InheritedFd`."""
        self.fds.append(fd)
        return len(self.fds) - 1

    def _travels(self, handle: AnyHandle) -> bool:
        assert self._passed is not None
        if isinstance(handle, _GIPCDuplexHandle):
            return all(part in self._passed for part in handle._parts())
        return handle in self._passed

    def _closed_reference(self, handle: AnyHandle) -> Tuple[str, int, Any]:
        number = self._numbers.get(id(handle))
        if number is not None:
            return (_HANDLE_TAG, number, None)
        number = self._numbers[id(handle)] = len(self._numbers)
        return (_HANDLE_TAG, number, ("closed", type(handle).__name__))

    @property
    def met_references(self) -> bool:
        """Whether the pickle refers to handles (closed ones included) or carried objects."""
        return bool(self._numbers)

    def _carried(self, obj: DescriptorCarrier) -> Tuple[str, int, Any]:
        number = self._numbers.get(id(obj))
        if number is not None:
            return (_CARRIED_TAG, number, None)
        number = self._numbers[id(obj)] = len(self._numbers)
        state, fds = obj._export()
        start = len(self.fds)
        self.fds.extend(fds)
        return (_CARRIED_TAG, number, (type(obj), state, list(range(start, len(self.fds)))))

    def _reference(self, handle: AnyHandle, top: bool) -> Tuple[str, int, Any]:
        number = self._numbers.get(id(handle))
        if number is not None:
            return (_HANDLE_TAG, number, None)
        number = self._numbers[id(handle)] = len(self._numbers)
        if top:
            self.handles.append(handle)
        description: Tuple[Any, ...]
        if isinstance(handle, _GIPCDuplexHandle):
            reader, writer = handle._parts()
            description = (
                "duplex",
                self._reference(reader, top=False),
                self._reference(writer, top=False),
            )
        elif isinstance(handle, _GIPCReader):
            description = self._describe_reader(handle)
        else:
            assert isinstance(handle, _GIPCWriter)
            description = self._describe_writer(handle)
        return (_HANDLE_TAG, number, description)

    def _claim(self, handle: _GIPCHandle) -> None:
        """Checks that ``handle`` can travel now; for a message, also holds it."""
        sender = self.sender
        if sender is None:
            handle._check_passable()
            return
        if handle is sender:
            raise GIPCLocked(f"cannot send {handle!r} in a message on itself")
        handle._check_passable(_IN_A_MESSAGE)
        if isinstance(handle, _GIPCReader) and _same_pipe(handle, sender):
            raise GIPCError(
                f"cannot send {handle!r} in a message on {sender!r}: it is the reader of that "
                "very pipe, so nothing could ever read the message"
            )
        if not handle._lock.try_acquire():
            # Taken since the check, by another OS thread.
            raise GIPCLocked(f"cannot {_IN_A_MESSAGE.format(repr(handle))}: a greenlet is using it")
        self.held.append(handle)

    def _describe_reader(self, reader: _GIPCReader) -> Tuple[Any, ...]:
        self._claim(reader)
        decoder = _codec_state(reader, "decoder", reader._decoder, _pickle_loads, self._action)
        try:
            transport, buffered = reader._core.transfer_state()
        except GIPCError as error:
            raise GIPCError(f"cannot {self._short_action.format(repr(reader))}: {error}") from None
        return (
            "reader",
            self._ship(reader),
            transport,
            buffered,
            decoder,
            reader._default_codecs,
            reader._core.max_message_size,
            (reader._core.spin_us, reader._core.spin_streams_only),
            list(reader._backlog),
        )

    def _describe_writer(self, writer: _GIPCWriter) -> Tuple[Any, ...]:
        self._claim(writer)
        encoder = _codec_state(writer, "encoder", writer._encoder, _pickle_dumps, self._action)
        try:
            transport = writer._core.transfer_state()
        except GIPCError as error:
            raise GIPCError(f"cannot {self._short_action.format(repr(writer))}: {error}") from None
        return ("writer", self._ship(writer), transport, encoder, writer._default_codecs)

    def _ship(self, handle: _GIPCHandle) -> List[int]:
        """Adds the handle's descriptors to ``fds``; returns their indices there."""
        start = len(self.fds)
        self.fds.extend(handle._core.filenos())
        return list(range(start, len(self.fds)))


#: How errors about a handle in a message say what was tried (``_check_passable``).
_IN_A_MESSAGE = "send {} in a message"


def _same_pipe(reader: _GIPCReader, writer: _GIPCWriter) -> bool:
    """Whether ``reader`` reads what ``writer`` writes. Known where the frame lane is an OS
    pipe (the "hybrid" and "pipe" transports): both ends of one pipe are one inode, in any
    process. The two ends of a socket pair are not, so on the "socket" transport this says
    False."""
    try:
        a = os.fstat(reader._core.fileno())
        b = os.fstat(writer._core.fileno())
    except (OSError, GIPCError):
        return False
    return stat.S_ISFIFO(a.st_mode) and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _codec_state(handle: _GIPCHandle, role: str, codec: Any, default: Any, action: str) -> Any:
    """How a handle's encoder or decoder travels: ``None``, the default pickle codec's
    marker, or the callable itself once it is known to pickle. ``action`` says, for the
    error, what was tried with the handle."""
    if codec is None:
        return None
    if codec is default:
        return _PICKLE_CODEC
    try:
        pickle.dumps(codec, _PICKLE_PROTOCOL)
    except Exception as error:
        raise GIPCError(
            f"cannot {action.format(repr(handle))}: its {role} {codec!r} cannot be "
            f"pickled ({type(error).__name__}: {error}); use a module-level function"
        ) from None
    return codec


class HandleUnpickler(pickle.Unpickler):
    """Loads what :class:`HandlePickler` wrote, rebuilding each handle from ``fds``: the
    descriptors that travelled beside the pickle, in the order of the pickler's ``fds``
    (whatever their numbers are here). Each handle built owns its descriptors; ``taken``
    says which indices of ``fds`` were taken, ``built`` lists the handles made (duplex
    parts included), so a caller can clean up after a failure."""

    def __init__(self, file: Any, fds: Sequence[int]) -> None:
        super().__init__(file)
        self.fds = list(fds)
        self.taken: Set[int] = set()
        self.built: List[_GIPCHandle] = []
        self._handles: Dict[int, AnyHandle] = {}
        self._carried: Dict[int, Any] = {}

    def load(self) -> Any:
        _loading.append(self)
        try:
            return super().load()
        finally:
            _loading.pop()

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 3 and pid[0] == _CARRIED_TAG:
            return self._load_carried(pid[1], pid[2])
        if not (isinstance(pid, tuple) and len(pid) == 3 and pid[0] == _HANDLE_TAG):
            raise pickle.UnpicklingError(f"unknown persistent reference {pid!r}")
        _, number, description = pid
        if description is None:
            try:
                return self._handles[number]
            except KeyError:
                raise pickle.UnpicklingError(
                    f"handle {number} is referenced before it is described"
                ) from None
        handle = self._build(description)
        self._handles[number] = handle
        return handle

    def _build(self, description: Tuple[Any, ...]) -> AnyHandle:
        kind = description[0]
        if kind == "closed":
            return _closed_handle(description[1])
        if kind == "duplex":
            reader = self.persistent_load(description[1])
            writer = self.persistent_load(description[2])
            return _GIPCDuplexHandle(reader, writer)
        if kind == "reader":
            _, indices, transport, buffered, decoder, default_codecs, limit, spin, backlog = (
                description
            )
            read_core = _core.reader_from_fds(transport, self._take(indices), buffered, limit)
            self.taken.update(indices)
            read_core.spin_us, read_core.spin_streams_only = spin
            reader = _GIPCReader(
                read_core, _pickle_loads if decoder == _PICKLE_CODEC else decoder, default_codecs
            )
            reader._backlog.extend(backlog)
            self.built.append(reader)
            return reader
        if kind == "writer":
            _, indices, transport, encoder, default_codecs = description
            write_core = _core.writer_from_fds(transport, self._take(indices))
            self.taken.update(indices)
            writer = _GIPCWriter(
                write_core, _pickle_dumps if encoder == _PICKLE_CODEC else encoder, default_codecs
            )
            self.built.append(writer)
            return writer
        raise pickle.UnpicklingError(f"unknown kind of handle {kind!r}")

    def _load_carried(self, number: int, description: Any) -> Any:
        if description is None:
            try:
                return self._carried[number]
            except KeyError:
                raise pickle.UnpicklingError(
                    f"object {number} is referenced before it is described"
                ) from None
        cls, state, indices = description
        if not (isinstance(cls, type) and issubclass(cls, DescriptorCarrier)):
            raise pickle.UnpicklingError(f"{cls!r} does not travel with descriptors")
        carried = cls._rebuild(state, self._take(indices))
        self.taken.update(indices)
        self._carried[number] = carried
        return carried

    def _take(self, indices: List[int]) -> List[int]:
        if any(i in self.taken or not 0 <= i < len(self.fds) for i in indices):
            raise pickle.UnpicklingError(
                f"handle descriptors {indices} are missing or taken already "
                f"({len(self.fds)} descriptors came)"
            )
        return [self.fds[i] for i in indices]


def _closed_handle(class_name: str) -> AnyHandle:
    """A closed handle of the class named (of a pair made and closed at once)."""
    from ._handles import pipe

    if class_name == "_GIPCDuplexHandle":
        duplex = pipe(duplex=True)[0]
        for part in duplex._parts():
            part._release()
        return duplex
    reader, writer = pipe()
    reader._release()
    writer._release()
    if class_name == "_GIPCReader":
        return reader
    if class_name == "_GIPCWriter":
        return writer
    raise pickle.UnpicklingError(f"unknown kind of handle {class_name!r}")


#: The unpickler rebuilding a child's process object, for :class:`InheritedFd`.
_loading: List["HandleUnpickler"] = []


class InheritedFd:
    """A descriptor that multiprocessing's reducers (``reduction.DupFd``: a
    ``Connection``, a queue's pipe, the memory behind ``Value``/``Array``) ship to a
    child being started, by its index among the descriptors beside the pickle: what
    ``duplicate_for_child`` gave them (see ``_startup``)."""

    def __init__(self, index: int) -> None:
        self.index = index

    def detach(self) -> int:
        """This process's descriptor, now owned by the caller (called while the process
        object is unpickled)."""
        if not _loading:
            raise RuntimeError("a descriptor of a child's start-up data used outside its start")
        unpickler = _loading[-1]
        (fd,) = unpickler._take([self.index])
        unpickler.taken.add(self.index)
        return fd


def dumps_with_handles(obj: Any) -> Tuple[bytes, List[AnyHandle], List[int]]:
    """Pickles ``obj``, gipc handles in it included: returns the pickle, the handles met and
    the descriptors to send beside it (see :class:`HandlePickler`)."""
    file = io.BytesIO()
    pickler = HandlePickler(file)
    pickler.dump(obj)
    return file.getvalue(), pickler.handles, pickler.fds


def loads_with_handles(data: Any, fds: Sequence[int]) -> Any:
    """Unpickles what :func:`dumps_with_handles` made, with ``fds`` the descriptors that
    came beside it (this process's numbers for them, in the sender's order). Every
    descriptor of ``fds`` no handle took is closed, on success and on error alike; on error
    the handles already built are closed too."""
    unpickler = HandleUnpickler(io.BytesIO(data), fds)
    try:
        return unpickler.load()
    except BaseException:
        for handle in unpickler.built:
            if not handle.closed:
                handle._release()
        raise
    finally:
        for index, fd in enumerate(unpickler.fds):
            if index not in unpickler.taken:
                try:
                    os.close(fd)
                except OSError:
                    pass


def dumps_message(
    obj: Any, sender: _GIPCWriter
) -> Tuple[bytes, List[AnyHandle], List[int], List[_GIPCHandle]]:
    """A ``KIND_HANDLES`` payload for ``obj``, to be put on ``sender``: the count of its
    descriptors, then the pickle (see ``_core``); with the handles met, the descriptors to
    send beside it, and the readers and writers now held (locked) for the caller, who
    releases them (see :class:`HandlePickler`). On error none is held."""
    file = io.BytesIO()
    pickler = HandlePickler(file, sender=sender)
    try:
        pickler.dump(obj)
        if len(pickler.fds) > MAX_MESSAGE_FDS:
            raise GIPCError(
                f"cannot send {len(pickler.handles)} handles in one message: their "
                f"{len(pickler.fds)} descriptors are more than one message carries "
                f"({MAX_MESSAGE_FDS}, Linux's SCM_MAX_FD; a handle of the default 'hybrid' "
                "transport has two): send them in several messages"
            )
    except BaseException:
        for handle in pickler.held:
            handle._lock.release()
        raise
    data = file.getvalue()
    return _FD_COUNT.pack(len(pickler.fds)) + data, pickler.handles, pickler.fds, pickler.held


def loads_message(payload: bytes, fds: Sequence[int]) -> Any:
    """The object of a ``KIND_HANDLES`` payload, ``fds`` the descriptors that came with it
    (taken by the handles rebuilt, or closed: see :func:`loads_with_handles`)."""
    return loads_with_handles(memoryview(payload)[_FD_COUNT.size :], fds)
