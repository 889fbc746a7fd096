"""Type stubs for gipc's Rust extension module. It never waits: methods report "would block"
and the Python layer waits on gevent's hub."""

import sys
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple, Union, final

if sys.version_info >= (3, 12):
    from collections.abc import Buffer
else:
    from typing_extensions import Buffer

__all__ = [
    "AllSignalsBlocked",
    "BULK_MIN",
    "ClaimWord",
    "DONE",
    "GetPath",
    "HandleLock",
    "KIND_BATCH",
    "KIND_BYTES",
    "KIND_ENCODED",
    "KIND_HANDLES",
    "PutPath",
    "REPLY_SPIN_US",
    "Reader",
    "StartFds",
    "WOULD_BLOCK",
    "Writer",
    "YIELD",
    "__version__",
    "channel",
    "install_get",
    "install_put",
    "reader_from_fds",
    "recv_record",
    "reset_signal_state",
    "send_record",
    "writer_from_fds",
]

__version__: str

#: What a call that never waits answers, on both ends alike. Writer.try_send, try_send_many
#: and try_flush: DONE (all written), WOULD_BLOCK (wait until wait_fileno() is writable,
#: then try_flush) or YIELD (let the event loop run a turn, then try_flush).
#: Reader.try_recv: the message itself in place of DONE, else WOULD_BLOCK (wait until
#: wait_fileno() is readable) or YIELD. A message is a tuple, the others are ints: test
#: ``result.__class__ is tuple`` first.
DONE: int
WOULD_BLOCK: int
YIELD: int

#: Payload kinds on the wire.
KIND_ENCODED: int
KIND_BYTES: int
KIND_BATCH: int
#: A message with descriptors (Writer.try_send_fds): its payload starts with their count.
KIND_HANDLES: int

#: On a "hybrid" channel, payloads at least this long (bytes) go through its socket lane.
BULK_MIN: int
#: How long a reader looks again for a message before waiting (a duplex handle's on every
#: wait, a one-way reader's in the middle of a stream), in microseconds.
REPLY_SPIN_US: int

@final
class Reader:
    """The read end of a channel."""

    max_message_size: int
    #: How long try_recv() looks again, while that pays off, before answering WOULD_BLOCK
    #: (microseconds; 0 never; REPLY_SPIN_US by default).
    spin_us: int
    #: True (the default): spin only in the middle of a stream (two messages taken since
    #: the last wait, or a spin that caught one); False: on every wait (replies expected).
    spin_streams_only: bool
    #: Whether messages may carry descriptors to this reader (True by default); False
    #: closes every descriptor as it comes, and a message that carries some comes without.
    takes_descriptors: bool
    #: Whether the rest of a payload of 8 MiB or more is read on a thread of its own while
    #: the caller waits (False for a new reader; gipc's handles set it).
    read_aside: bool
    @property
    def closed(self) -> bool: ...
    @property
    def transport(self) -> str:
        """"hybrid", "socket" or "pipe"."""
    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as messages (a large payload in progress
        counts with its header)."""
    @property
    def reading_aside(self) -> bool:
        """Whether a thread reads a payload now: ``wait_fileno()`` is its descriptor, a new
        one for each payload, readable once the thread is done."""
    def halt_aside(self) -> None:
        """Stops the thread reading aside, if any, keeping what it read: a waiter on its
        descriptor wakes, and its next try_recv() goes on from there."""
    def try_recv(self) -> Union[Tuple[int, bytes], Tuple[int, bytes, List[int]], int]:
        """``(kind, payload)``, else WOULD_BLOCK (wait until readable) or YIELD (let the
        loop run first). A KIND_HANDLES message is ``(kind, payload, fds)``: the
        descriptors that came with it, which the caller now owns and must close. Those
        received and not yet returned are closed with the reader.

        Raises EOFError at a clean end of stream, GIPCError for a torn, corrupt or oversized
        frame, MemoryError if the payload cannot be allocated, OSError for I/O errors, and
        GIPCClosed once closed."""
    def fileno(self) -> int:
        """The frame lane's descriptor."""
    def filenos(self) -> List[int]:
        """Every descriptor of this end: the frame lane's, then the bulk lane's if any."""
    def wait_fileno(self) -> int:
        """The descriptor to wait for (readable) after try_recv() answered WOULD_BLOCK: the
        bulk lane's while a large payload is coming on it, else the frame lane's. With
        ``read_aside``, for the rest of a large payload: starts the thread that reads it
        and returns that thread's descriptor."""
    def close(self) -> bool:
        """Closes the descriptors; False if they were closed already."""
    def transfer_state(self) -> Tuple[str, bytes]:
        """What another process needs, besides ``filenos()``, to go on reading this channel
        with :func:`reader_from_fds`: the transport's name and the bytes received but not
        yet returned as messages (a partly received frame included). Changes and closes
        nothing. GIPCError when the end cannot move now (a large payload partly received on
        the bulk lane, a corrupt stream); GIPCClosed once closed."""

@final
class Writer:
    """The write end of a channel."""

    @property
    def closed(self) -> bool: ...
    @property
    def transport(self) -> str:
        """"hybrid", "socket" or "pipe"."""
    @property
    def mid_frame(self) -> bool:
        """True when a frame is partly written: closing now would tear it."""
    def try_send(self, kind: int, payload: Buffer, /) -> int:
        """Queues one frame and writes what the descriptor takes now: DONE, WOULD_BLOCK
        (wait until writable, then try_flush) or YIELD (let the loop run, then try_flush).
        Positional arguments only (a "fastcall" method: no tuple per call).

        ``payload`` is ``bytes`` or any object with a contiguous buffer, held (exported)
        until written and written from where it lies; anything else raises TypeError."""
    def try_send_many(self, kind: int, payloads: List[Buffer]) -> int: ...
    def try_send_fds(self, kind: int, payload: Buffer, fds: List[int]) -> int:
        """Like try_send for a KIND_HANDLES message whose payload starts with the count of
        ``fds`` (a little-endian u32): copies of ``fds`` go with it (SCM_RIGHTS) on the
        channel's socket lane. GIPCError on a "pipe" channel, ValueError for a payload that
        does not announce ``fds``; nothing is queued then."""
    def try_flush(self) -> int: ...
    def fileno(self) -> int:
        """The frame lane's descriptor."""
    def filenos(self) -> List[int]:
        """Every descriptor of this end: the frame lane's, then the bulk lane's if any."""
    def wait_fileno(self) -> int:
        """The descriptor to wait for (writable) after WOULD_BLOCK."""
    def close(self) -> bool:
        """Drops queued frames and closes the descriptors; False if they were closed
        already."""
    def transfer_state(self) -> str:
        """The transport's name, for :func:`writer_from_fds` in another process. GIPCError
        while queued frames are not entirely written (``pending``); GIPCClosed once
        closed."""

def channel(transport: str = "hybrid", max_message_size: int = ...) -> Tuple[Reader, Writer]:
    """A one-way channel: ``transport`` is "hybrid" (frames through a pipe, payloads of
    BULK_MIN bytes or more through an AF_UNIX stream pair beside it), "socket" or "pipe".
    A transfer that runs longer than a time slice (0.5 ms) asks for a YIELD."""

def reader_from_fds(
    transport: str,
    fds: List[int],
    buffered: bytes = ...,
    max_message_size: int = ...,
) -> Reader:
    """A channel's read end rebuilt from the descriptors of one made elsewhere
    (``Reader.filenos()`` and ``transfer_state()`` there): the messages in ``buffered`` come
    first. Takes ownership of ``fds`` (``close()`` closes them) and makes them non-blocking
    and close-on-exec, once they are checked: as many as the transport has lanes, a pipe
    lane a pipe's read end, a socket lane an AF_UNIX stream socket. GIPCValueError
    otherwise, or OSError (EBADF) for one that is not open; on any error the caller still
    owns the descriptors, unchanged. ``spin_us`` and ``spin_streams_only`` start at their
    defaults."""

def writer_from_fds(transport: str, fds: List[int]) -> Writer:
    """A channel's write end rebuilt from descriptors, checked as by :func:`reader_from_fds`
    (a pipe lane must be a pipe's write end)."""

def reset_signal_state() -> List[int]:
    """Every signal's disposition to SIG_DFL at the C level, except SIGPIPE, SIGKILL and
    SIGSTOP, and every signal unblocked in the calling thread; returns the signals whose
    disposition was not SIG_DFL before."""

def send_record(fd: int, data: bytes, fds: List[int]) -> int:
    """Sends ``data`` with the descriptors ``fds`` on the socket ``fd`` in one ``sendmsg``
    that never waits nor raises SIGPIPE; the bytes sent. ``fd`` and ``fds`` stay the
    caller's (nothing closes them)."""

def recv_record(fd: int, size: int) -> Tuple[bytes, List[int]]:
    """One ``recvmsg`` that never waits of at most ``size`` bytes from the socket ``fd``:
    the bytes (empty at the end of the stream) and the descriptors that came (the
    caller's now). ``BlockingIOError`` when nothing is there."""

@final
class AllSignalsBlocked:
    """``with AllSignalsBlocked():`` blocks every signal in the calling thread for the
    block, and restores the thread's mask when it is left, in the process that entered it
    only (a child forked inside keeps them blocked). Each change is one call."""

    def __init__(self) -> None: ...
    def __enter__(self) -> AllSignalsBlocked: ...
    def __exit__(self, *exc_info: object) -> Literal[False]: ...

@final
class StartFds:
    """The descriptors a start made for its child and nobody else owns yet. Each change is
    one call, so an exception from a signal handler between two steps of a start cannot
    leave one owned and unrecorded, or recorded and handed on. Dropping it closes
    nothing. The fork server's caller keeps the descriptors that come on its control
    socket in one too, in the order they came, until an offer takes its own."""

    def __init__(self) -> None: ...
    def pipe(self) -> Tuple[int, int]:
        """A new pipe (close-on-exec), both ends recorded: ``(read_end, write_end)``."""
    def socketpair(self) -> Tuple[int, int]:
        """A new connected pair of Unix stream sockets (close-on-exec), both recorded."""
    def receive(self, fd: int, into: bytearray, size: int, pad_lost_to: int = 0) -> int:
        """One read that never waits of at most ``size`` bytes from the socket ``fd``,
        appended to ``into``; the descriptors that came recorded in order (-1 for each the
        kernel dropped, up to ``pad_lost_to`` in all). The bytes read (0: the end of the
        stream); ``BlockingIOError`` when nothing is there."""
    def move_first(self, n: int, to: StartFds) -> List[int]:
        """Hands the ``n`` descriptors recorded first (all, if fewer are) over to ``to`` in
        one step; returns those moved."""
    def pidfd(self, pid: int) -> Optional[int]:
        """A pidfd for the child ``pid`` (close-on-exec), recorded; None where the system
        has none or the child is already reaped."""
    def close(self, fd: int) -> None:
        """Closes ``fd``, one the start owns (else ``ValueError``), and forgets it (the
        others keep their order)."""
    def hand_on(self, fd: int) -> None:
        """Forgets ``fd`` without closing it: it has a new owner."""
    def close_all(self) -> None:
        """Closes every descriptor still recorded, and forgets them."""
    @property
    def owned_fds(self) -> List[int]:
        """The descriptors recorded now."""

@final
class HandleLock:
    """Who may do I/O on one handle: one greenlet at a time, of whichever OS thread. Every
    change of its state is made within one call (an exception from a signal handler cannot
    leave it taken with no greenlet in it); use it as ``with lock as waited:``."""

    def __new__(
        cls,
        getcurrent: Callable[[], Any],
        get_ident: Callable[[], int],
        new_queue: Callable[[], Any],
        sleep: Callable[[float], None],
    ) -> "HandleLock":
        """``getcurrent``: greenlet's; ``get_ident``: the system's thread ident;
        ``new_queue``: makes a gevent semaphore (one per thread, its greenlets wait there in
        order); ``sleep``: a cooperative sleep (while another thread holds the lock)."""
    def locked(self) -> bool:
        """Whether a greenlet does I/O on the handle now."""
    def __enter__(self) -> bool:
        """Takes the lock, waiting cooperatively; True if that meant waiting. ``GIPCLocked``
        if the calling greenlet holds it already."""
    def __exit__(self, *exc_info: object) -> None: ...
    def try_acquire(self) -> bool:
        """Takes the lock only if that needs no wait; True if taken."""
    def release(self) -> None:
        """Lets the lock go."""
    @property
    def _queues(self) -> Dict[int, Any]:
        """The per-thread semaphores."""

@final
class PutPath:
    """What a writer handle's ``put`` (installed by :func:`install_put`) needs, looked up
    once per handle, as its ``_fast`` attribute."""

    def __new__(
        cls,
        writer: Writer,
        lock: HandleLock,
        codecs: str,
        dumps: Callable[[Any, int], bytes],
        protocol: int,
        not_picklable: type,
    ) -> "PutPath":
        """``lock``: the handle's; ``codecs``: "pickle" (``bytes`` as KIND_BYTES,
        anything else pickled with ``dumps``), "raw" (``bytes`` as KIND_ENCODED) or "other"
        (all of ``put`` in Python); ``not_picklable``: what ``dumps`` raises for a message
        that holds handles."""

def install_put(cls: type) -> None:
    """Replaces ``cls.put`` (keeping its docstring) with one that does the common cases
    without a Python frame: no greenlet doing I/O on the handle (its lock not held), a
    ``bytes`` message or (pickle codecs) one that pickles, written at once. It calls the
    instance's ``_put_unfinished(status)`` when the message is queued,
    ``_put_with_handles(o)`` for a message with handles and ``_put_python(o)`` for the rest."""

@final
class GetPath:
    """What a reader handle's ``get`` (installed by :func:`install_get`) needs, looked up
    once per handle, as its ``_get_path`` attribute."""

    def __new__(
        cls,
        reader: Reader,
        lock: HandleLock,
        backlog: Any,
        decoder: str,
        bytes_as_they_are: bool,
        loads: Callable[[bytes], Any],
    ) -> "GetPath":
        """``lock``: the handle's; ``backlog``: the handle's deque of messages not
        returned yet; ``decoder``: "pickle" (``loads``), "raw" (payloads as they came) or
        "other" (the handle's ``_decode``); ``bytes_as_they_are``: whether KIND_BYTES
        frames are returned as they came (both ends use pickle)."""

def install_get(cls: type) -> None:
    """Replaces ``cls.get`` (keeping its docstring) with one that does the common cases
    without a Python frame: no timeout, no greenlet doing I/O on the handle
    (its lock not held), no backlog, a message there at once that pickle or no
    decoder turns into the object. It calls the instance's ``_get_python(timeout)`` for a
    timeout, a busy handle or a backlog, ``_decode(frame)`` for other frames and
    ``_get_waiting(status)`` when it must wait."""

@final
class ClaimWord:
    """The claim word a pool worker shares with its parent (``gipc.pool._claims``): the
    last task claimed and the last revoked, changed by atomic compare-and-swap only."""

    @staticmethod
    def anonymous() -> ClaimWord:
        """A new word in anonymous shared memory, shared with children forked later."""
    @staticmethod
    def from_fd(fd: int) -> ClaimWord:
        """The word at the start of the file ``fd`` refers to, mapped shared."""
    def claim(self, number: int) -> bool:
        """In the worker: whether it may run task ``number``."""
    def revoke(self, through: int) -> int:
        """In the parent: revokes the unclaimed tasks up to ``through``; the last claimed."""
    def claimed(self, reference: int) -> int:
        """The last task claimed; ``reference`` is a task number at or after it."""
    def close(self) -> None:
        """Unmaps the word; later calls raise ValueError."""
