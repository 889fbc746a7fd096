"""Pipe handles: the Python face of the Rust reader and writer.

Fast path first: a ``put`` or ``get`` that the descriptor can serve at once makes a single call
into Rust and never touches the lock, because nothing can switch greenlets in between. Only
an operation that must wait takes the handle's lock, so waiting greenlets queue up and a
message is never interleaved with another.
"""

from __future__ import annotations

import collections
import functools
import os
import pickle
import weakref
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple, Union

import gevent
from gevent.lock import Semaphore

from . import _core
from ._hub import READ, WRITE, wait_for, yield_to_loop
from .exceptions import GIPCClosed, GIPCError, GIPCLocked

DONE = _core.DONE
WOULD_BLOCK = _core.WOULD_BLOCK
KIND_ENCODED = _core.KIND_ENCODED
KIND_BYTES = _core.KIND_BYTES
KIND_BATCH = _core.KIND_BATCH

#: Largest message a reader accepts unless told otherwise (``pipe(max_message_size=...)``).
DEFAULT_MAX_MESSAGE_SIZE = 4 << 30

#: What carries the bytes: "hybrid" (frames through a pipe, payloads of 16 KiB or more
#: through an AF_UNIX socket pair beside it), "socket" or "pipe". The API is the same; the
#: default is whichever the benchmark shows faster. Overridable for comparisons.
TRANSPORT = os.environ.get("GIPC_TRANSPORT", "hybrid")

Encoder = Union[str, None, Callable[[Any], bytes]]
Decoder = Union[str, None, Callable[[bytes], Any]]

_PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL
_pickle_dumps = functools.partial(pickle.dumps, protocol=_PICKLE_PROTOCOL)
_pickle_loads = pickle.loads
#: Called directly on the hot path: a partial and a method call cost ~0.15 us per message.
_dumps = pickle.dumps

#: Marks "no try_recv() made yet" (None and False are results of one).
_NOT_POLLED = object()

#: Every open handle of this process, so a forked child can close those it was not given.
_open_handles: "weakref.WeakSet[_GIPCHandle]" = weakref.WeakSet()


class _GIPCHandle:
    """What read and write handles have in common: closing, context management and the
    cooperative wait on the descriptor."""

    _EVENTS = 0

    def __init__(self, core: Any) -> None:
        self._core = core
        self._lock = Semaphore()
        self._watcher: Any = None
        self._watcher_hub: Any = None
        self._watcher_fd = -1
        self._closed = False
        _open_handles.add(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the underlying file descriptor and de-register the handle from further use.
        Called on context exit.

        Raises:
            GIPCClosed: the handle was closed already.
            GIPCLocked: another greenlet is inside ``put``/``get`` on this handle.
        """
        if self._closed:
            raise GIPCClosed(f"{self!r} is closed already")
        if self._lock.locked():
            raise GIPCLocked(f"cannot close {self!r}: another greenlet is using it")
        self._release()

    def _release(self) -> None:
        """Closes without the checks; for gipc's own bookkeeping."""
        self._closed = True
        _open_handles.discard(self)
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        self._core.close()

    def _after_fork_in_child(self, keep: bool) -> None:
        """Adopts (``keep``) or closes a handle inherited by a forked child. Either way the
        cached watcher belongs to the parent's loop, which the child has discarded: it is
        dropped, not closed (closing it would touch that dead loop)."""
        self._watcher = None
        self._watcher_hub = None
        if keep:
            self._lock = Semaphore()
        else:
            self._release()

    def _wait(self) -> None:
        hub = gevent.get_hub()
        # A channel with a bulk lane waits on that descriptor while a large payload is on
        # its way, and on the frame lane otherwise.
        fd = self._core.wait_fileno()
        if self._watcher_hub is not hub or self._watcher_fd != fd:
            if self._watcher is not None and self._watcher_hub is hub:
                self._watcher.close()
            self._watcher = hub.loop.io(fd, self._EVENTS)
            self._watcher_hub = hub
            self._watcher_fd = fd
        wait_for(self._watcher)

    def _check_passable(self) -> None:
        if self._closed:
            raise GIPCClosed(f"cannot pass {self!r} to a child: it is closed")
        if self._lock.locked():
            raise GIPCLocked(f"cannot pass {self!r} to a child: a greenlet is using it")

    def __enter__(self) -> "_GIPCHandle":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        _close_on_exit([self], exc_type is not None)

    def __repr__(self) -> str:
        if self._closed:
            return f"<{type(self).__name__} closed>"
        return f"<{type(self).__name__} fd={self._core.fileno()}>"


class _GIPCReader(_GIPCHandle):
    """The read end of a pipe. Created by :func:`gipc.pipe`."""

    _EVENTS = READ

    def __init__(
        self, core: Any, decoder: Optional[Callable[[bytes], Any]], default_codecs: bool
    ) -> None:
        super().__init__(core)
        self._decoder = decoder
        # Unpickled bytes and pickled batches are only accepted when this pipe uses pickle
        # anyway: the kind comes from the peer, and must not bypass a safe decoder.
        self._default_codecs = default_codecs
        # Messages that arrived in one batch frame and were not returned yet.
        self._backlog: "collections.deque[Any]" = collections.deque()

    @property
    def max_message_size(self) -> int:
        """The largest message this reader accepts; a larger one raises ``GIPCError``."""
        return self._core.max_message_size  # type: ignore[no-any-return]

    @max_message_size.setter
    def max_message_size(self, value: int) -> None:
        self._core.max_message_size = value

    def get(self, timeout: Union[None, float, gevent.Timeout] = None) -> Any:
        """Receive, decode and return the next message, blocking gevent-cooperatively until
        one is available.

        Args:
            timeout: ``None`` (wait as long as it takes), a started ``gevent.Timeout``, or a
                number of seconds. When it expires ``gevent.Timeout`` is raised; a message
                that was partly received stays buffered and the next ``get`` completes it.

        Raises:
            EOFError: every write end is closed and no message is left.
            GIPCError: a torn or corrupt message, or one above ``max_message_size``.
            GIPCClosed: the handle is closed.
            gevent.Timeout: the timeout expired.
        """
        if timeout is None or isinstance(timeout, gevent.Timeout):
            if not self._lock.locked():
                if self._backlog and not self._closed:
                    return self._backlog.popleft()
                frame = self._core.try_recv()
                if frame.__class__ is tuple:
                    if frame[0] == KIND_ENCODED and self._decoder is _pickle_loads:
                        return _pickle_loads(frame[1])  # the common case, inlined
                    return self._decode(frame)
                # Must wait: nothing can have switched greenlets since the lock was seen
                # free, so take it and carry on from this result.
                with self._lock:
                    return self._receive(frame)
            with self._lock:
                return self._receive()
        with gevent.Timeout(timeout):
            with self._lock:
                return self._receive()

    def get_many(self, max_items: int = 1000) -> List[Any]:
        """Return the next message and, without waiting further, up to ``max_items - 1`` more
        that have already arrived. Blocks cooperatively only for the first one."""
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        with self._lock:
            items = [self._receive()]
            backlog, core = self._backlog, self._core
            while len(items) < max_items:
                if backlog:
                    items.append(backlog.popleft())
                    continue
                frame = core.try_recv()
                if frame.__class__ is not tuple:
                    break
                items.append(self._decode(frame))
            return items

    def __iter__(self) -> Iterator[Any]:
        """Yield messages until the writer closes the pipe (``EOFError`` ends the loop)."""
        while True:
            try:
                yield self.get()
            except EOFError:
                return

    def _receive(self, frame: Any = _NOT_POLLED) -> Any:
        """Waits as long as it takes for the next message; ``frame`` is what the caller's
        own ``try_recv()`` returned, if it made one."""
        if frame is _NOT_POLLED:
            if self._closed:
                raise GIPCClosed(f"{self!r} is closed")
            if self._backlog:
                return self._backlog.popleft()
            frame = self._core.try_recv()
        core = self._core
        while True:
            if frame is None:
                self._wait()
            elif frame is False:
                yield_to_loop()
            else:
                return self._decode(frame)
            frame = core.try_recv()

    def _decode(self, frame: Tuple[int, bytes]) -> Any:
        kind, payload = frame
        if kind == KIND_ENCODED:
            decoder = self._decoder
            return payload if decoder is None else decoder(payload)
        if not self._default_codecs:
            raise GIPCError(
                f"refused a frame of kind {kind}: only pipes with the default pickle codecs "
                "carry it (is the writer another kind of pipe, or untrusted?)"
            )
        if kind == KIND_BYTES:
            return payload
        items = _pickle_loads(payload)  # KIND_BATCH
        self._backlog.extend(items[1:])
        return items[0]


class _GIPCWriter(_GIPCHandle):
    """The write end of a pipe. Created by :func:`gipc.pipe`."""

    _EVENTS = WRITE

    def __init__(
        self, core: Any, encoder: Optional[Callable[[Any], bytes]], default_codecs: bool
    ) -> None:
        super().__init__(core)
        self._encoder = encoder
        self._checked_encoder = encoder is not None and encoder is not _pickle_dumps
        # Both ends use pickle: `bytes` can skip pickling and batches can be one pickle.
        self._default_codecs = default_codecs

    def put(self, o: Any) -> None:
        """Encode ``o`` and write it to the pipe, blocking gevent-cooperatively until all of
        it is written.

        Raises:
            TypeError: the pipe has no encoder and ``o`` is not ``bytes``, or the encoder
                did not return ``bytes``.
            BrokenPipeError: no reader is left.
            GIPCClosed: the handle is closed.
        """
        if not self._default_codecs:
            kind, payload = KIND_ENCODED, self._encode(o)
        elif o.__class__ is bytes:
            kind, payload = KIND_BYTES, o
        else:
            kind, payload = KIND_ENCODED, _dumps(o, _PICKLE_PROTOCOL)
        if self._lock.locked():
            with self._lock:
                self._finish(self._core.try_send(kind, payload))
            return
        status = self._core.try_send(kind, payload)
        if status != DONE:
            with self._lock:
                self._finish(status)

    def put_many(self, items: Iterable[Any]) -> None:
        """Write several messages at once; the reader gets them one by one, in order, from
        ``get`` (or several at a time from ``get_many``). With the default pickle codecs the
        whole batch is pickled in one call and sent as one frame, which is many times faster
        than a ``put`` per message."""
        items = list(items)
        if not items:
            return
        with self._lock:
            if self._default_codecs:
                status = self._core.try_send(KIND_BATCH, _pickle_dumps(items))
            else:
                status = self._core.try_send_many(
                    KIND_ENCODED, [self._encode(o) for o in items]
                )
            self._finish(status)

    def _encode(self, o: Any) -> bytes:
        encoder = self._encoder
        if encoder is None:
            if not isinstance(o, bytes):
                raise TypeError(
                    f"this pipe has no encoder: put() takes bytes, not {type(o).__name__}"
                )
            return o
        payload = encoder(o)
        if self._checked_encoder and not isinstance(payload, bytes):
            raise TypeError(
                f"the encoder must return bytes, it returned {type(payload).__name__}"
            )
        return payload

    def _finish(self, status: int) -> None:
        core = self._core
        while status != DONE:
            if status == WOULD_BLOCK:
                self._wait()
            else:
                yield_to_loop()
            status = core.try_flush()


class _GIPCDuplexHandle:
    """One end of a bidirectional channel created by ``pipe(duplex=True)``: ``put``, ``get``
    and ``close`` act on its own writer and reader."""

    def __init__(self, reader: _GIPCReader, writer: _GIPCWriter) -> None:
        self._reader = reader
        self._writer = writer

    @property
    def closed(self) -> bool:
        return self._reader.closed and self._writer.closed

    def put(self, o: Any) -> None:
        self._writer.put(o)

    def put_many(self, items: Iterable[Any]) -> None:
        self._writer.put_many(items)

    def get(self, timeout: Union[None, float, gevent.Timeout] = None) -> Any:
        return self._reader.get(timeout)

    def get_many(self, max_items: int = 1000) -> List[Any]:
        return self._reader.get_many(max_items)

    def close(self) -> None:
        """Close both directions. Raises ``GIPCLocked`` (closing nothing) if either is in use,
        ``GIPCClosed`` if both are closed already."""
        if self.closed:
            raise GIPCClosed(f"{self!r} is closed already")
        for handle in (self._reader, self._writer):
            if handle._lock.locked():
                raise GIPCLocked(f"cannot close {self!r}: another greenlet is using it")
        for handle in (self._reader, self._writer):
            if not handle.closed:
                handle._release()

    def _parts(self) -> Tuple[_GIPCReader, _GIPCWriter]:
        return self._reader, self._writer

    def __enter__(self) -> "_GIPCDuplexHandle":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        _close_on_exit([self], exc_type is not None)

    def __repr__(self) -> str:
        if self.closed:
            return "<_GIPCDuplexHandle closed>"
        return f"<_GIPCDuplexHandle reader={self._reader!r} writer={self._writer!r}>"


AnyHandle = Union[_GIPCHandle, _GIPCDuplexHandle]


def _close_on_exit(handles: Iterable[AnyHandle], exiting_on_error: bool) -> None:
    """Closes what is still open when a ``with`` block ends. A handle already closed (by the
    user, or because it was passed to a child) is skipped. When the block ended with an
    exception, a failure to close must not replace it, so it is dropped."""
    for handle in handles:
        if handle.closed:
            continue
        try:
            handle.close()
        except Exception:
            if not exiting_on_error:
                raise


class _PairContext(Tuple[AnyHandle, AnyHandle]):
    """The pair returned by :func:`pipe`: a plain 2-tuple that is also a context manager
    closing both handles on exit."""

    def __enter__(self) -> "_PairContext":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        _close_on_exit(self, exc_type is not None)


def _resolve(codec: Any, role: str, default: Callable[..., Any]) -> Any:
    if codec is None:
        return None
    if isinstance(codec, str):
        if codec == "default":
            return default
        raise ValueError(f"unknown {role} {codec!r}: use 'default', None or a callable")
    if callable(codec):
        return codec
    raise TypeError(f"{role} must be 'default', None or a callable, not {type(codec).__name__}")


def pipe(
    duplex: bool = False,
    encoder: Encoder = "default",
    decoder: Decoder = "default",
    *,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> _PairContext:
    """Create a message channel between greenlets and/or processes started with
    :func:`gipc.start_process`, and return its two handles.

    Args:
        duplex: ``False``: return ``(reader, writer)``. ``True``: return two
            :class:`_GIPCDuplexHandle` that both ``put`` and ``get``.
        encoder: ``'default'`` (pickle, highest protocol), ``None`` (``put`` takes ``bytes``
            only) or a callable returning ``bytes``.
        decoder: ``'default'`` (pickle), ``None`` (``get`` returns ``bytes``) or a callable
            taking ``bytes``.
        max_message_size: the largest message a reader accepts (default 4 GiB); a larger
            one raises ``GIPCError`` before anything is allocated.

    Bad arguments are rejected before any file descriptor is created.
    """
    enc = _resolve(encoder, "encoder", _pickle_dumps)
    dec = _resolve(decoder, "decoder", _pickle_loads)
    if not isinstance(max_message_size, int) or max_message_size < 0:
        raise ValueError("max_message_size must be a non-negative int")
    default_codecs = enc is _pickle_dumps and dec is _pickle_loads

    def one_way() -> Tuple[_GIPCReader, _GIPCWriter]:
        read_core, write_core = _core.channel(TRANSPORT, max_message_size)
        return (
            _GIPCReader(read_core, dec, default_codecs),
            _GIPCWriter(write_core, enc, default_codecs),
        )

    if not duplex:
        return _PairContext(one_way())
    reader1, writer1 = one_way()
    reader2, writer2 = one_way()
    # A duplex handle is mostly used for request and reply: its get() looks again for a
    # few microseconds before sleeping in the event loop, which catches a prompt reply
    # without two wake-ups through the kernel (and backs off when that does not pay).
    reader1._core.spin_us = reader2._core.spin_us = _core.REPLY_SPIN_US
    return _PairContext(
        (_GIPCDuplexHandle(reader1, writer2), _GIPCDuplexHandle(reader2, writer1))
    )
