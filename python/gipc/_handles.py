"""Pipe handles: the Python face of the Rust reader and writer.

Fast path first: a ``put`` or ``get`` that the descriptor can serve at once makes a single call
into Rust and never touches the lock, because nothing can switch greenlets in between. Only
an operation that must wait takes the handle's lock, so waiting greenlets queue up and a
message is never interleaved with another.

gevent is imported by the first operation that waits (or takes a timeout), not by this
module: a spawned child handed a pipe it only writes a few messages to starts without it
(~15 ms of ~60), and so does one that closes its handles unused. ``logging`` likewise.
"""

from __future__ import annotations

import _thread
import collections
import functools
import os
import pickle
import sys
import weakref
from typing import (
    Any,
    Callable,
    Iterable,
    Iterator,
    List,
    Literal,
    Optional,
    Set,
    TYPE_CHECKING,
    Tuple,
    TypeVar,
    Union,
    overload,
)

if TYPE_CHECKING:
    import gevent

from . import _core
from .exceptions import GIPCClosed, GIPCError, GIPCLocked, GIPCTypeError, GIPCValueError

DONE = _core.DONE
WOULD_BLOCK = _core.WOULD_BLOCK
YIELD = _core.YIELD
KIND_ENCODED = _core.KIND_ENCODED
KIND_BYTES = _core.KIND_BYTES
KIND_BATCH = _core.KIND_BATCH
KIND_HANDLES = _core.KIND_HANDLES

#: Largest message a reader accepts unless told otherwise (``pipe(max_message_size=...)``).
DEFAULT_MAX_MESSAGE_SIZE = 4 << 30

#: What carries the bytes: "hybrid" (frames through a pipe, payloads of 16 KiB or more
#: through an AF_UNIX socket pair beside it), "socket" or "pipe". The API is the same; the
#: default is whichever the benchmark shows faster. Overridable for comparisons.
TRANSPORT = os.environ.get("GIPC_TRANSPORT", "hybrid")

#: What an encoder returns: ``bytes`` or any other object with a contiguous buffer
#: (``bytearray``, ``memoryview``, ``array.array``, a NumPy array...), written as it is.
#: (``Any`` at run time: ``Buffer`` is a protocol of Python 3.12's.)
if TYPE_CHECKING:
    if sys.version_info >= (3, 12):
        from collections.abc import Buffer as BytesLike
    else:
        from typing_extensions import Buffer as BytesLike
else:
    BytesLike = Any
#: ``'default'`` (the codec ``set_default_codec`` chose, pickle unless changed), ``None``
#: (raw bytes) or a callable.
Encoder = Union[Literal["default"], None, Callable[[Any], BytesLike]]
Decoder = Union[Literal["default"], None, Callable[[bytes], Any]]

_PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL
_pickle_dumps = functools.partial(pickle.dumps, protocol=_PICKLE_PROTOCOL)
_pickle_loads = pickle.loads
#: Called directly on the hot path: a partial and a method call cost ~0.15 us per message.
_dumps = pickle.dumps

#: Marks "no try_recv() made yet" (WOULD_BLOCK and YIELD are results of one).
_NOT_POLLED = object()


def _debug(message: str, *args: Any) -> None:
    """Logs at DEBUG on the "gipc" logger, if logging is in use: a process that never
    imported ``logging`` has configured no handler, so there is nobody to tell."""
    logging = sys.modules.get("logging")
    if logging is not None:
        log = logging.getLogger("gipc")
        if log.isEnabledFor(logging.DEBUG):
            log.debug(message, *args)


#: libev/libuv event masks (gipc._hub's READ and WRITE, which imports gevent).
READ = 1
WRITE = 2


def _gevent() -> Any:
    """The gevent package, imported on first need."""
    import gevent

    return gevent


def _yield_to_loop() -> None:
    """Lets the event loop run once (gipc._hub.yield_to_loop, imported on first need)."""
    from ._hub import yield_to_loop

    yield_to_loop()

def _original_poll() -> Any:
    """``select.poll``, gevent.monkey's patching undone (gevent's would yield to the hub)."""
    if "gevent.monkey" in sys.modules:
        from gevent.monkey import get_original

        return get_original("select", "poll")
    import select

    return select.poll

#: Every open handle of this process, so a forked child can close those it was not given.
_open_handles: "weakref.WeakSet[_GIPCHandle]" = weakref.WeakSet()

#: Readers that may have a thread reading a payload aside: a weak reference to every live
#: reader (the fork hook skips those without one). A plain set, which ``list()`` copies in
#: one C call: iterating a WeakSet could meet another OS thread adding a reader ("set
#: changed size during iteration").
_reading_aside: "Set[weakref.ref[_GIPCReader]]" = set()


def _halt_aside_reads() -> None:
    """Before this process forks: stops every thread reading a payload aside, keeping what
    it read (a waiting greenlet wakes, and the next ``get()`` goes on with a new thread
    after the fork). A child then never starts from a process in the middle of such a read,
    and the fork is not one of a multi-threaded process (CPython 3.12+ warns of those)
    because of gipc's own threads."""
    for ref in list(_reading_aside):
        reader = ref()
        if reader is None:
            continue
        try:
            if reader._core.reading_aside:
                reader._core.halt_aside()
        except Exception:  # in use by another OS thread right now: its thread goes on
            pass


os.register_at_fork(before=_halt_aside_reads)

# The real thread primitives, also under gevent.monkey (whose patched ones are per greenlet).
# Before gevent.monkey is imported nothing is patched yet, and these references stay the
# originals whatever it patches later.
if "gevent.monkey" in sys.modules:
    from gevent.monkey import get_original

    _allocate_lock = get_original("_thread", "allocate_lock")
    _thread_ident = get_original("_thread", "get_ident")
    _start_new_thread = get_original("_thread", "start_new_thread")
else:
    _allocate_lock = _thread.allocate_lock
    _thread_ident = _thread.get_ident
    _start_new_thread = _thread.start_new_thread


def _HandleLock() -> "_core.HandleLock":
    """Who may do I/O on one handle: one greenlet at a time, of whichever OS thread (see
    ``HandleLock`` in ``src/lock.rs``: every change of its state is one call, so that an
    exception a signal handler raises cannot leave it taken with no greenlet in it)."""
    return _core.HandleLock(_getcurrent, _thread_ident, _new_semaphore, _cooperative_sleep)


def _getcurrent() -> Any:
    from greenlet import getcurrent

    return getcurrent()


def _new_semaphore() -> Any:
    from gevent.lock import Semaphore

    return Semaphore()


def _cooperative_sleep(seconds: float) -> None:
    from gevent import sleep

    sleep(seconds)


class _NotPicklable(GIPCTypeError):
    """A handle met by a plain pickler. Private: ``put`` catches it to pickle the message
    again with :class:`HandlePickler`; anyone else sees a ``GIPCTypeError`` (a
    ``TypeError``) that says how a handle travels."""


def _refuse_pickling(handle: Any) -> Any:
    raise _NotPicklable(
        f"{handle!r} cannot be pickled: a gipc handle travels to another process only by "
        "being passed to gipc.start_process() (in args or kwargs), put on a gipc pipe, or "
        "passed to a gipc.ProcessPool task (with the pool's default encoder)"
    )


class _FailedMessage:
    """Stands in a reader's backlog for a message that could not be received or decoded
    after others had been (``get_many``): the caller gets those first, then this error."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


_Handle = TypeVar("_Handle", bound="_GIPCHandle")


class _GIPCHandle:
    """What read and write handles have in common: closing, context management and the
    cooperative wait on the descriptor."""

    _EVENTS = 0

    def __init__(self, core: Union[_core.Reader, _core.Writer]) -> None:
        self._core = core
        self._lock = _HandleLock()
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
        _debug("closing %r", self)
        self._release()

    def _release(self) -> None:
        """Closes without the checks; for gipc's own bookkeeping."""
        self._closed = True
        _open_handles.discard(self)
        watcher, hub = self._watcher, self._watcher_hub
        self._watcher = self._watcher_hub = None
        # A watcher belongs to its hub's thread and loop: closed from there only (another
        # thread's is left to that thread's loop; a destroyed loop's is already gone).
        if watcher is not None:
            from gevent._hub_local import get_hub_if_exists

            if hub is get_hub_if_exists() and hub.loop is not None:
                watcher.close()
        self._core.close()

    def _after_fork_in_child(self, keep: bool) -> None:
        """Adopts (``keep``) or closes a handle inherited by a forked child. Either way the
        cached watcher belongs to the parent's loop, which the child has discarded: it is
        dropped, not closed (closing it would touch that dead loop)."""
        self._watcher = None
        self._watcher_hub = None
        if keep:
            self._lock = _HandleLock()
            self._lock_changed()
        else:
            self._release()

    def _lock_changed(self) -> None:
        """The handle has a new lock (in a forked child)."""

    def _wait(self) -> None:
        # A channel with a bulk lane waits on that descriptor while a large payload is on
        # its way, and on the frame lane otherwise.
        self._wait_for(self._core.wait_fileno())

    def _wait_for(self, fd: int) -> None:
        from gevent import get_hub

        from ._hub import io_watcher, wait_for

        hub = get_hub()
        home = self._watcher_hub
        if home is not hub and home is not None and home.loop is not None:
            # The cached watcher is another thread's (the handle is shared between
            # threads): this thread waits on one of its own, made and closed here.
            watcher = io_watcher(fd, self._EVENTS, hub)
            try:
                wait_for(watcher)
            finally:
                watcher.close()
            return
        if home is not hub or self._watcher_fd != fd:
            if self._watcher is not None and home is hub:
                self._watcher.close()
            self._watcher = io_watcher(fd, self._EVENTS, hub)
            self._watcher_hub = hub
            self._watcher_fd = fd
        wait_for(self._watcher)

    def _check_passable(self, action: str = "pass {} to a child") -> None:
        """Raises unless the handle can travel now; ``action`` (formatted with the handle)
        says where to, for the error."""
        if self._closed:
            raise GIPCClosed(f"cannot {action.format(repr(self))}: it is closed")
        if self._lock.locked():
            raise GIPCLocked(f"cannot {action.format(repr(self))}: a greenlet is using it")

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _refuse_pickling(self)

    def __enter__(self: _Handle) -> _Handle:
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
        self, core: _core.Reader, decoder: Optional[Callable[[bytes], Any]], default_codecs: bool
    ) -> None:
        super().__init__(core)
        self._core: _core.Reader = core
        self._decoder = decoder
        # Unpickled bytes and pickled batches are only accepted when this pipe uses pickle
        # anyway: the kind comes from the peer, and must not bypass a safe decoder.
        self._default_codecs = default_codecs
        self._takes_handles = default_codecs
        # Messages that arrived in one batch frame and were not returned yet.
        self._backlog: "collections.deque[Any]" = collections.deque()
        # The rest of a payload of 8 MiB or more is read on a thread while get() waits, so
        # that its page faults (milliseconds each on some VMs) do not stop the event loop.
        # Known to the fork hook from the start: it sees every such thread, whenever and
        # however it started (no per-wait cost).
        core.read_aside = True
        _reading_aside.add(weakref.ref(self, _reading_aside.discard))
        self._lock_changed()

    @property
    def _takes_handles(self) -> bool:
        """Whether messages with gipc handles in them are accepted (they are unpickled):
        with the default codecs, or where gipc set it for a pipe of its own whose writer it
        trusts (a pool worker's tasks). A reader that refuses them also closes, as they
        come, descriptors a peer attaches to any other message."""
        return self._core.takes_descriptors

    @_takes_handles.setter
    def _takes_handles(self, value: bool) -> None:
        self._core.takes_descriptors = value

    def _lock_changed(self) -> None:
        decoder = (
            "pickle" if self._decoder is _pickle_loads else "raw" if self._decoder is None
            else "other"
        )
        #: What ``get`` (in ``_core``, see below the class) needs, looked up once.
        self._get_path = _core.GetPath(
            self._core, self._lock, self._backlog, decoder, self._default_codecs,
            _pickle_loads,
        )

    @property
    def max_message_size(self) -> int:
        """The largest message this reader accepts; a larger one raises ``GIPCError``."""
        return self._core.max_message_size

    @max_message_size.setter
    def max_message_size(self, value: int) -> None:
        self._core.max_message_size = value

    def get(self, timeout: Union[None, float, gevent.Timeout] = None) -> Any:
        """Receive, decode and return the next message, blocking gevent-cooperatively until
        one is available.

        Args:
            timeout: ``None`` (wait as long as it takes), a started ``gevent.Timeout``
                (cancelled once the first bytes of a message are in, as in gipc 1.x; still
                the caller's to close), or a number of seconds. When it expires
                ``gevent.Timeout`` is raised; a message that was partly received stays
                buffered and the next ``get`` completes it.

        Raises:
            EOFError: every write end is closed and no message is left.
            GIPCError: a torn or corrupt message, or one above ``max_message_size``; or
                one with handles whose descriptors the kernel dropped (this process at its
                ``RLIMIT_NOFILE``): that message only, the next ``get`` goes on.
            GIPCClosed: the handle is closed.
            gevent.Timeout: the timeout expired.
            ValueError: ``timeout`` is NaN (one of 10⁹ s or more, infinity included, is
                none).
        """
        return self._get_python(timeout)  # replaced below the class, by _core's

    def _get_python(self, timeout: Union[None, float, gevent.Timeout] = None) -> Any:
        """``get`` in Python. ``get`` itself runs in ``_core`` (installed below the class:
        it saves the Python frame, ~15% of a 100-byte get); it comes here for a timeout,
        another greenlet's I/O on the handle or a backlog."""
        # A timeout of any kind needs gevent; None does not (until it must wait).
        if timeout is not None and isinstance(timeout, _gevent().Timeout):
            # The caller's own, started: 1.x's contract is that get() cancels it when the
            # first bytes of a message arrive, so that it cannot fire later, in whatever
            # the caller does next.
            with self._lock:
                return self._receive(cancel=timeout)
        if timeout is not None:
            from ._hub import clamp_timeout

            # What join() and the pool take too: NaN is refused (a gevent timer of NaN never
            # fires, and libev's loop then never wakes for it), and a timeout too long for
            # libuv's timers (infinity, 1e17: OverflowError there) is none.
            timeout = clamp_timeout(timeout)
        if timeout is None:
            if not self._lock.locked():
                if self._backlog and not self._closed:
                    return self._next_from_backlog()
                frame = self._core.try_recv()
                if frame.__class__ is tuple:
                    # The common cases of _decode, inlined (a method call is ~25% of a
                    # 100-byte get).
                    kind = frame[0]
                    if kind == KIND_ENCODED:
                        decoder = self._decoder
                        if decoder is _pickle_loads:
                            return _pickle_loads(frame[1])
                        if decoder is None:
                            return frame[1]
                    elif kind == KIND_BYTES and self._default_codecs:
                        return frame[1]
                    return self._decode(frame)
                return self._get_waiting(frame)
            with self._lock:
                return self._receive()
        with _gevent().Timeout(timeout):
            with self._lock:
                return self._receive()

    def _wait_for(self, fd: int) -> None:
        core = self._core
        if not core.reading_aside:
            super()._wait_for(fd)
            return
        # A thread reads the payload (started by wait_fileno): its descriptor is new for
        # each payload, so it gets a watcher for this wait only. A wait that ends early (a
        # timeout, a killed greenlet) leaves the thread reading: the next get() goes on
        # waiting for it (a get(timeout=0) poll makes progress at full speed), and close,
        # a transfer or a fork stop it first.
        from gevent import get_hub

        from ._hub import io_watcher, wait_for

        watcher = io_watcher(fd, READ, get_hub())
        try:
            wait_for(watcher)
        finally:
            watcher.close()

    def _get_waiting(self, frame: Any) -> Any:
        """``get`` after a look at the descriptors found no message (``frame`` is what
        ``try_recv`` said): waits for it under the lock. Unless taking the lock meant
        waiting too (another greenlet or thread got there first: that look may be stale,
        the message it waits for taken into the buffer since), carries on from that look."""
        with self._lock as waited:
            return self._receive() if waited else self._receive(frame)

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
                    if backlog[0].__class__ is _FailedMessage:
                        break  # raised by the next call, after these are delivered
                    items.append(backlog.popleft())
                    continue
                try:
                    frame = core.try_recv()
                    if frame.__class__ is not tuple:
                        break
                    items.append(self._decode(frame))
                except Exception as error:
                    # The messages in hand are the caller's: return them, and the error
                    # (a torn or undecodable message, the end of the stream) comes next.
                    backlog.append(_FailedMessage(error))
                    break
            return items

    def __iter__(self) -> Iterator[Any]:
        """Yield messages until the writer closes the pipe (``EOFError`` ends the loop)."""
        while True:
            try:
                yield self.get()
            except EOFError:
                return

    def _receive(self, frame: Any = _NOT_POLLED, cancel: Optional[gevent.Timeout] = None) -> Any:
        """Waits as long as it takes for the next message; ``frame`` is what the caller's
        own ``try_recv()`` returned, if it made one. ``cancel``: a timeout to cancel once
        bytes of a message have arrived."""
        if frame is _NOT_POLLED:
            if self._closed:
                raise GIPCClosed(f"{self!r} is closed")
            if self._backlog:
                if cancel is not None:
                    cancel.cancel()
                return self._next_from_backlog()
            frame = self._core.try_recv()
        core = self._core
        while True:
            if frame.__class__ is tuple:
                if cancel is not None:
                    cancel.cancel()
                return self._decode(frame)
            if cancel is not None and core.buffered:
                cancel.cancel()  # the first bytes of the next message are here
                cancel = None
            if frame == WOULD_BLOCK:
                self._wait()
            else:
                _yield_to_loop()
            frame = core.try_recv()

    def _next_from_backlog(self) -> Any:
        item = self._backlog.popleft()
        if item.__class__ is _FailedMessage:
            raise item.error
        return item

    def _decode(self, frame: Tuple[Any, ...]) -> Any:
        kind = frame[0]
        payload = frame[1]
        if kind == KIND_ENCODED:
            decoder = self._decoder
            return payload if decoder is None else decoder(payload)
        if kind == KIND_HANDLES:
            return self._decode_handles(payload, frame[2])
        if not self._default_codecs:
            raise GIPCError(
                f"refused a frame of kind {kind}: only pipes with the default pickle codecs "
                "carry it (is the writer another kind of pipe, or untrusted?)"
            )
        if kind == KIND_BYTES:
            return payload
        items = _pickle_loads(payload)  # KIND_BATCH
        if items.__class__ is not list or not items:
            # put_many sends a non-empty list; anything else is not from a gipc writer.
            raise GIPCError(
                f"refused a batch frame holding {type(items).__name__}"
                f"{' (empty)' if items == [] else ''}: put_many() sends a non-empty list "
                "(is the writer another kind of pipe, or untrusted?)"
            )
        self._backlog.extend(items[1:])
        return items[0]


    def _decode_handles(self, payload: bytes, fds: List[int]) -> Any:
        """A message with handles in it, ``fds`` their descriptors, which are this
        reader's to close: each is taken by a rebuilt handle or closed, whatever happens."""
        if not self._takes_handles:
            for fd in fds:
                os.close(fd)
            raise GIPCError(
                "refused a message carrying gipc handles: only pipes with the default pickle "
                "codecs carry them (their descriptors are closed)"
            )
        from ._transfer import loads_message

        return loads_message(payload, fds)


class _GIPCWriter(_GIPCHandle):
    """The write end of a pipe. Created by :func:`gipc.pipe`."""

    _EVENTS = WRITE

    def __init__(
        self, core: _core.Writer, encoder: Optional[Callable[[Any], bytes]], default_codecs: bool
    ) -> None:
        super().__init__(core)
        self._core: _core.Writer = core
        self._encoder = encoder
        # Both ends use pickle: `bytes` can skip pickling and batches can be one pickle.
        self._default_codecs = default_codecs
        self._lock_changed()

    def _lock_changed(self) -> None:
        codecs = "pickle" if self._default_codecs else "raw" if self._encoder is None else "other"
        #: What ``put`` (in ``_core``, see below the class) needs, looked up once.
        self._fast = _core.PutPath(
            self._core, self._lock, codecs, _dumps, _PICKLE_PROTOCOL, _NotPicklable
        )

    def put(self, o: Any) -> None:
        """Encode ``o`` and write it to the pipe, blocking gevent-cooperatively until all of
        it is written.

        With ``encoder=None``, ``o`` is ``bytes`` or any object with a contiguous buffer
        (``bytearray``, ``memoryview``, ``array.array``, a NumPy array...), written without
        a copy: do not change it until ``put`` returns. The reader gets ``bytes``.

        Raises:
            TypeError: the pipe has no encoder and ``o`` is not bytes-like, or the encoder
                did not return a bytes-like object (both also ``GIPCError``).
            BrokenPipeError: no reader is left.
            GIPCClosed: the handle is closed, or a handle in ``o`` is.
            GIPCLocked: a handle in ``o`` is in use by another greenlet, or is this writer.
            GIPCError: a handle in ``o`` cannot travel (see the README: handles in messages).
        """
        self._put_python(o)  # replaced below the class, by _core's

    def _put_python(self, o: Any) -> None:
        """``put`` in Python. ``put`` itself runs in ``_core`` (installed below the class:
        it saves the Python frame, ~10% of a 100-byte put); it comes here for whatever is
        not the common case."""
        if not self._default_codecs:
            kind, payload = KIND_ENCODED, self._encode(o)
        elif o.__class__ is bytes:
            kind, payload = KIND_BYTES, o
        else:
            try:
                kind, payload = KIND_ENCODED, _dumps(o, _PICKLE_PROTOCOL)
            except _NotPicklable:
                # Handles in the message: pickled again, their descriptors sent with it.
                return self._put_with_handles(o)
        if self._lock.locked():
            self._put_locked(kind, payload)
            return
        status = self._core.try_send(kind, payload)
        if status != DONE:
            self._put_unfinished(status)

    def _put_locked(self, kind: int, payload: BytesLike) -> None:
        """``put`` of a frame while another greenlet does I/O on the handle: behind it."""
        with self._lock:
            self._finish(self._core.try_send(kind, payload))

    def _put_unfinished(self, status: int) -> None:
        """Finishes a ``put`` whose message is queued, under the lock."""
        with self._lock as waited:
            if waited:
                # Others wrote meanwhile, and may have flushed this message with theirs.
                status = self._core.try_flush()
            self._finish(status)

    def _put_with_handles(self, o: Any) -> None:
        """``put(o)`` where ``o`` holds gipc handles: their descriptors travel with the
        message (``SCM_RIGHTS`` on the channel's socket lane), the reader gets working
        handles, and this process's copies are closed, as ``start_process`` closes what it
        passes to a child.

        The handles are held from the moment they are pickled (each one's lock taken, see
        ``dumps_message``): another greenlet's ``get``/``put`` on one waits, its ``close``
        raises ``GIPCLocked``. The message is queued only once nothing else is queued and
        every lane of the channel takes bytes, so that its first bytes go out at once. From
        then on it is on its way (the core holds copies of the descriptors, which go with
        the first bytes of its payload): the handles are closed, and only then let go, so a
        greenlet waiting for one finds it closed. A ``put`` that fails or is interrupted
        before that lets them go open, and sends nothing."""
        self._check_carries_descriptors()
        from ._transfer import dumps_message

        with self._lock:
            payload, _, fds, held = dumps_message(o, self)
            self._send_with_handles(payload, fds, held)

    def _check_carries_descriptors(self) -> None:
        """Raises ``GIPCError`` if this channel cannot carry descriptors."""
        if self._core.transport == "pipe":
            raise GIPCError(
                f"cannot put gipc handles on {self!r}: a 'pipe' channel has no socket to "
                "carry their descriptors (use the 'hybrid' or 'socket' transport)"
            )

    def _send_with_handles(
        self, payload: bytes, fds: List[int], held: List[_GIPCHandle]
    ) -> None:
        """The sending half of :meth:`_put_with_handles`, under ``self._lock``: the
        ``KIND_HANDLES`` frame ``payload`` with descriptors ``fds``, from
        ``dumps_message``; the handles ``held`` are closed if it went, and let go."""
        core = self._core
        sent = False
        try:
            # What an interrupted put left queued goes first: then this message is
            # the front frame, and ``mid_frame`` says whether any of it went out.
            self._finish(core.try_flush())
            self._wait_writable()
            try:
                status = core.try_send_fds(KIND_HANDLES, payload, fds)
            except BaseException:
                # A write that failed (no reader left) wrote nothing: the frame
                # stays queued, unreachable, and the handles stay the caller's.
                sent = core.mid_frame
                raise
            sent = True
            # A YIELD before the first write (this slice was used up) starts a fresh
            # slice, whose first write is always made: make it now, not after a turn
            # of the loop in which the put could be interrupted.
            while status == YIELD and not core.mid_frame:
                status = core.try_flush()
            # A WOULD_BLOCK with nothing written (another process filled the channel
            # since we looked) leaves the frame queued: it goes before the next
            # message, whatever happens to this put, so it counts as sent.
        finally:
            for handle in held:
                if sent and not handle.closed:
                    handle._release()
                handle._lock.release()
        self._finish(status)

    def _wait_writable(self) -> None:
        """Waits until each lane of the channel takes bytes (or has an error, which the next
        write reports)."""
        import select

        fds = self._core.filenos()
        while True:
            poll = _original_poll()()
            for fd in fds:
                poll.register(fd, select.POLLOUT)
            ready = {fd for fd, events in poll.poll(0) if events}
            blocked = [fd for fd in fds if fd not in ready]
            if not blocked:
                return
            from gevent import get_hub

            from ._hub import io_watcher, wait_for

            watcher = io_watcher(blocked[0], WRITE, get_hub())
            try:
                wait_for(watcher)
            finally:
                watcher.close()

    def put_many(self, items: Iterable[Any]) -> None:
        """Write several messages at once; the reader gets them one by one, in order, from
        ``get`` (or several at a time from ``get_many``). With the default pickle codecs the
        whole batch is pickled in one call and sent as one frame, which is many times faster
        than a ``put`` per message."""
        items = list(items)
        if not items:
            return
        if self._default_codecs:
            try:
                batch = _pickle_dumps(items)
            except _NotPicklable:
                # Handles in the batch: their descriptors travel with single messages.
                for item in items:
                    self.put(item)
                return
            with self._lock:
                self._finish(self._core.try_send(KIND_BATCH, batch))
            return
        with self._lock:
            self._finish(
                self._core.try_send_many(KIND_ENCODED, [self._encode(o) for o in items])
            )

    def _encode(self, o: Any) -> BytesLike:
        encoder = self._encoder
        if encoder is None:
            if o.__class__ is not bytes:
                _check_bytes_like(o, "this pipe has no encoder: put() takes")
            checked: BytesLike = o
            return checked
        payload = encoder(o)
        if payload.__class__ is not bytes:
            _check_bytes_like(payload, "the encoder must return")
        return payload

    def _finish(self, status: int) -> None:
        core = self._core
        while status != DONE:
            if status == WOULD_BLOCK:
                self._wait()
            else:
                _yield_to_loop()
            status = core.try_flush()


# ``put``'s common cases (no other greenlet doing I/O on the handle, pickle or no codecs, a
# message written at once) in Rust, without a Python frame; the rest in ``_put_python``.
_core.install_put(_GIPCWriter)
# ``get``'s common cases (no timeout, no other greenlet doing I/O on the handle, no backlog,
# a message there at once, pickle or no decoder) likewise; the rest in ``_get_python``.
_core.install_get(_GIPCReader)


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
        """Send ``o`` to the other end; see :meth:`_GIPCWriter.put`."""
        self._writer.put(o)

    def put_many(self, items: Iterable[Any]) -> None:
        """Send several messages at once; see :meth:`_GIPCWriter.put_many`."""
        self._writer.put_many(items)

    def get(self, timeout: Union[None, float, gevent.Timeout] = None) -> Any:
        """Receive the next message from the other end; see :meth:`_GIPCReader.get`."""
        return self._reader.get(timeout)

    def get_many(self, max_items: int = 1000) -> List[Any]:
        """Receive the next messages; see :meth:`_GIPCReader.get_many`."""
        return self._reader.get_many(max_items)

    def __iter__(self) -> Iterator[Any]:
        """Yield messages until the peer closes its sending half."""
        return iter(self._reader)

    def close(self) -> None:
        """Close both directions, the sending one first (so the peer sees the end of the
        stream even while this end still reads).

        A direction another greenlet is using (inside ``get`` or ``put``) stays open and
        ``GIPCLocked`` is raised once every other part is closed, as gipc 1.x does; a later
        ``close()`` closes what is left. ``GIPCClosed`` if both are closed already.
        """
        if self.closed:
            raise GIPCClosed(f"{self!r} is closed already")
        busy: List[_GIPCHandle] = []
        for handle in (self._writer, self._reader):
            if handle.closed:
                continue
            if handle._lock.locked():
                busy.append(handle)
            else:
                _debug("closing %r of a duplex handle", handle)
                handle._release()
        if busy:
            raise GIPCLocked(
                f"cannot close {_describe_parts(busy)} of {self!r}: another greenlet is "
                "using it (the rest is closed)"
            )

    def _parts(self) -> Tuple[_GIPCReader, _GIPCWriter]:
        return self._reader, self._writer

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _refuse_pickling(self)

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
    """Closes what is still open when a ``with`` block ends: every part that no greenlet is
    using, whatever happens to the others. A handle already closed (by the user, or because
    it was passed to a child) is skipped. Then the first failure (``GIPCLocked``) is raised,
    unless the block ended with an exception: that one must not be replaced."""
    failure: Optional[Exception] = None
    for handle in handles:
        if handle.closed:
            continue
        try:
            handle.close()
        except Exception as error:
            if failure is None:
                failure = error
    if failure is not None and not exiting_on_error:
        raise failure


def _describe_parts(parts: Iterable[_GIPCHandle]) -> str:
    names = {_GIPCReader: "the reading half", _GIPCWriter: "the writing half"}
    return " and ".join(names.get(type(part), repr(part)) for part in parts)


def _check_bytes_like(payload: Any, what: str) -> None:
    """Raises ``GIPCTypeError`` unless ``payload`` exposes one contiguous buffer, which the
    core then writes as it is (``bytes`` never gets here: it is checked for first)."""
    try:
        view = memoryview(payload)
    except TypeError:
        raise GIPCTypeError(
            f"{what} bytes or a bytes-like object, not {type(payload).__name__}"
        ) from None
    with view:
        if not view.c_contiguous:
            raise GIPCTypeError(
                f"{what} bytes or a contiguous buffer; this {type(payload).__name__} is not "
                "contiguous (copy it with bytes() first)"
            )


_First = TypeVar("_First", bound=AnyHandle)
_Second = TypeVar("_Second", bound=AnyHandle)


class _PairContext(Tuple[_First, _Second]):
    """The pair returned by :func:`pipe`: a plain 2-tuple that is also a context manager
    closing both handles on exit. Typed by what it holds: ``(reader, writer)`` or two duplex
    handles."""

    def __enter__(self) -> "_PairContext[_First, _Second]":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        _close_on_exit(self, exc_type is not None)


def get_default_codec() -> Tuple[Callable[[Any], BytesLike], Callable[[bytes], Any]]:
    """The ``(encoder, decoder)`` that ``'default'`` stands for in :func:`pipe` (and in
    :class:`gipc.ProcessPool`): pickle, unless :func:`set_default_codec` said otherwise.

    The pair lives where gipc 1.x kept it, as ``gipc.gipc._default_encoder`` and
    ``_default_decoder``, and programs that assign those directly are honoured too.
    """
    legacy = sys.modules.get("gipc.gipc")
    if legacy is None:  # only while the package itself is being imported
        return _pickle_dumps, _pickle_loads
    return legacy._default_encoder, legacy._default_decoder


def set_default_codec(
    encoder: Optional[Callable[[Any], BytesLike]] = None,
    decoder: Optional[Callable[[bytes], Any]] = None,
) -> None:
    """Make ``encoder`` and ``decoder`` what ``'default'`` means, process-wide, for pipes
    and pools created from now on (those that exist keep theirs; forked children inherit
    the setting). ``None``, for either, restores pickle.

    Typical use: a pickler that also serialises lambdas and local functions, e.g.
    ``gipc.set_default_codec(cloudpickle.dumps, cloudpickle.loads)``. Both ends of a pipe
    must agree, so set it before creating pipes that children share.

    Raises:
        GIPCTypeError: either is neither ``None`` nor callable.
    """
    for role, codec in (("encoder", encoder), ("decoder", decoder)):
        if codec is not None and not callable(codec):
            raise GIPCTypeError(f"the default {role} must be callable or None, not "
                                f"{type(codec).__name__}")
    from . import gipc as legacy

    legacy._default_encoder = _pickle_dumps if encoder is None else encoder
    legacy._default_decoder = _pickle_loads if decoder is None else decoder


def _resolve(codec: Any, role: str, default: Callable[..., Any]) -> Any:
    if codec is None:
        return None
    if isinstance(codec, str):
        if codec == "default":
            return default
        raise GIPCValueError(f"unknown {role} {codec!r}: use 'default', None or a callable")
    if callable(codec):
        return codec
    raise GIPCTypeError(
        f"{role} must be 'default', None or a callable, not {type(codec).__name__}"
    )


@overload
def pipe(
    duplex: Literal[False] = False,
    encoder: Encoder = "default",
    decoder: Decoder = "default",
    *,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> _PairContext[_GIPCReader, _GIPCWriter]: ...


@overload
def pipe(
    duplex: Literal[True],
    encoder: Encoder = "default",
    decoder: Decoder = "default",
    *,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> _PairContext[_GIPCDuplexHandle, _GIPCDuplexHandle]: ...


@overload
def pipe(
    duplex: bool,
    encoder: Encoder = "default",
    decoder: Decoder = "default",
    *,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> Union[
    _PairContext[_GIPCReader, _GIPCWriter], _PairContext[_GIPCDuplexHandle, _GIPCDuplexHandle]
]: ...


def pipe(
    duplex: bool = False,
    encoder: Encoder = "default",
    decoder: Decoder = "default",
    *,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> Union[
    _PairContext[_GIPCReader, _GIPCWriter], _PairContext[_GIPCDuplexHandle, _GIPCDuplexHandle]
]:
    """Create a message channel between greenlets and/or processes started with
    :func:`gipc.start_process`, and return its two handles.

    Args:
        duplex: ``False``: return ``(reader, writer)``. ``True``: return two
            :class:`_GIPCDuplexHandle` that both ``put`` and ``get``.
        encoder: ``'default'`` (pickle, highest protocol, or what
            :func:`set_default_codec` set), ``None`` (``put`` takes bytes-like objects only)
            or a callable returning a bytes-like object.
        decoder: ``'default'`` (pickle, or what :func:`set_default_codec` set), ``None``
            (``get`` returns ``bytes``) or a callable taking ``bytes``.
        max_message_size: the largest message a reader accepts (default 4 GiB); a larger
            one raises ``GIPCError`` before anything is allocated.

    Bad arguments are rejected before any file descriptor is created, with
    ``GIPCTypeError`` or ``GIPCValueError`` (each is a ``GIPCError``, as gipc 1.x raised,
    and a ``TypeError``/``ValueError``).
    """
    default_encoder, default_decoder = get_default_codec()
    enc = _resolve(encoder, "encoder", default_encoder)
    dec = _resolve(decoder, "decoder", default_decoder)
    if not isinstance(max_message_size, int) or max_message_size < 0:
        raise GIPCValueError("max_message_size must be a non-negative int")
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
    # few microseconds before sleeping in the event loop on every wait, not only within a
    # stream as a one-way reader does, which catches a prompt reply without two wake-ups
    # through the kernel (and backs off when that does not pay).
    reader1._core.spin_streams_only = reader2._core.spin_streams_only = False
    return _PairContext(
        (_GIPCDuplexHandle(reader1, writer2), _GIPCDuplexHandle(reader2, writer1))
    )
