"""Start method "forkserver": children forked by a small server process of gipc's own.
This module is the caller's side (what runs in the user's process) and the protocol both
sides speak; the server process itself, and its loop, are ``_forkserver_main``.

The server is a fresh interpreter (started like a spawned child, without blocking the
caller's loop) that has imported gevent and gipc, and the modules named with
``gipc.set_forkserver_preload()``, and runs no event loop. It forks each child from itself,
so a start costs the same whatever the caller's size, and the caller's event loop only
waits for a few messages. It forks each child *before* it is asked for one (a *spare*)
and tells the caller about it at once (an *offer*: its pid, its pidfd, a socket to it), so
a start hands its descriptors to a child that is already waiting, directly: the server is
not on the way.

**Who may talk to it.** The server runs whatever it is sent, so it has no address: its only
way in is one end of a socket pair whose other end the caller created and holds (close-on-
exec, and closed in every child gipc forks). No filesystem path, no abstract name; a
process that does not hold that descriptor cannot reach it. A caller that forks a child of
its own gets a new server there on first use (the server belongs to the process id that
started it).

**Messages.** On the control socket, both ways: ``length (4 bytes) + pickle``. Server →
caller: ``("spare", pid, serial)`` with the spare's pidfd and a copy of the server's end
of the spare's socket attached (``SCM_RIGHTS``; ``serial`` counts the offers sent, this
one included), and ``("taken", pid)`` when the server gave that spare to a start sent to
it. The caller reads them at its next start, never waiting, and
hands the latest spare its start request: one byte with the descriptors attached, the
start-up data pipe's read end, the child's parent sentinel, the child's status socket,
then the passed handles'. The caller then sends the server ``("used", pid)`` with the
status socket attached (the server reports ``REAPED`` on it, also for a spare killed
before it could run), and the spare tells the server on its socket that it was used (the
next spare may be forked) and runs the child. A start that knows no spare (none offered
yet, it died, or a concurrent start took it) sends the same request to the server,
``("start", offers read)``; the server hands it to a child forked then (or, if the caller
had not read the last offer, to that spare, withdrawn first). Server → caller, per child,
on that child's status socket: 8-byte records ``(tag, value)``: ``PID`` (with the child's
pidfd attached where the system has them; only for a start sent to the server), or
``FAILED`` if no child could be given the start; then ``EXITED`` (the child's own exit
code, written by the child as its last act, once every other descriptor of its is closed)
and ``REAPED`` (the wait status, written by the server when it reaps the child). A join
watches the status socket and ends on ``EXITED`` (one wake-up; the kernel's teardown of
the child's address space, ~0.5 ms or more, is not waited for); ``REAPED`` is what a child
killed by a signal (which writes nothing) is known by. The pidfd is for signals: it names
exactly that child, whatever reuses its pid. The child is not the
caller's own, so ``waitpid`` cannot tell the caller its exit: these records do. If the
server dies, a child it started still reports ``EXITED`` (or, killed by a signal, just
closes the socket: exit code 255), and starts in flight to it fail with a ``GIPCError``
(a start handed to a spare is not in flight: the child runs); the next start finds the
server's end of the control socket closed and launches a new server.
"""

from __future__ import annotations

import _socket
import array
import atexit
import logging
import os
import pickle
import signal
import socket
import struct
import threading
from multiprocessing import util as mp_util
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Set, Tuple

import gevent
import gevent.lock
from gevent import monkey
from gevent.socket import wait_read, wait_write

from . import _child, _core
from ._hub import READ, io_watcher
from ._popen import CooperativePopen, open_pidfd
from ._startup import Feeder, StartupData, child_command, preparation_data
from .exceptions import GIPCError

if TYPE_CHECKING:
    from ._process import _GProcess

_log = logging.getLogger("gipc")

# ---------------------------------------------------------------------------------------
# The protocol: what both sides use (the server, ``_forkserver_main``, imports it from here)

_FLAG = "--gipc-forkserver"
_LENGTH = struct.Struct("<I")
_RECORD = struct.Struct("<ii")
PID, EXITED, REAPED, FAILED = 1, 2, 3, 4
#: How many children, forked one after the other, a start request is offered to before
#: the server gives up on it: a child forked for it can die before it is handed the
#: request (killed, or out of memory in its after-fork work).
HANDOVER_TRIES = 3
#: The most descriptors one message can carry (Linux's SCM_MAX_FD), less the three of
#: every start request.
MAX_HANDLE_FDS = 253 - 3

#: The standard library's socket class, whatever gevent.monkey.patch_all() made of
#: ``socket.socket``: gevent's waits on the hub where neither side of the fork server may
#: wait (the caller reads only what is there and waits on its own terms; the server and its
#: children run no hub).
_Socket: Any = monkey.get_original("socket", "socket")


def _socketpair() -> Tuple[socket.socket, socket.socket]:
    """A connected pair of Unix stream sockets of the standard library's class."""
    one, two = _socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return _Socket(fileno=one.detach()), _Socket(fileno=two.detach())


def _framed(message: Any) -> bytes:
    """A control-socket message: its length, then its pickle."""
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


# ---------------------------------------------------------------------------------------
# The caller's side

#: What the next server imports before it forks anything; "__main__" by default, as in
#: multiprocessing: the caller's main module, so a child need not import it again.
_preload: List[str] = ["__main__"]


def set_forkserver_preload(module_names: Sequence[str]) -> None:
    """Modules the fork server imports once, when it starts, so that children forked from
    it find them imported. ``"__main__"`` (the default) is the caller's main module,
    imported as ``__mp_main__`` (as multiprocessing's forkserver does); without it, each
    child imports the main module anew. Applies to the next server started; a running
    server keeps what it has. A module that fails to import is skipped.
    """
    if isinstance(module_names, str) or not all(isinstance(m, str) for m in module_names):
        raise TypeError("module_names must be a sequence of module names (str)")
    _preload[:] = list(module_names)


class _Server:
    """The fork server as its caller sees it: the control socket and the server's pid."""

    def __init__(self) -> None:
        ours, theirs = _socketpair()
        try:
            args = child_command(
                "from gipc._forkserver_main import serve; serve()", _FLAG, str(theirs.fileno())
            )
            self.pid: int = mp_util.spawnv_passfds(args[0], args, [theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        # While it is certainly our unreaped child: the end of the server is then waited
        # for, and a stuck one killed, by this descriptor, never by a pid that someone
        # else's wait() may have freed for reuse (see _reap_soon).
        self.pidfd = open_pidfd(self.pid)
        self.sock = ours
        self.owner = os.getpid()
        self.dead = False
        self._send_lock = gevent.lock.Semaphore()
        #: What the server sent us (offers of spares), read at each start, and the
        #: descriptors that came with it, in order (recorded by the call that receives
        #: them, until an offer takes its own); the latest spare offered.
        self._inbox = bytearray()
        self._inbox_fds = _core.StartFds()
        self._offer: Optional[_Offer] = None
        #: Offers read so far, and the starts sent to the server whose pid has not come
        #: yet (each its own token, so that ending one twice ends it once): while one is on
        #: its way, the server may hand it the spare it offered last (if we had not read
        #: that offer when we sent it), so no offer is used meanwhile.
        self._offers_seen = 0
        self._asking: Set[object] = set()
        #: Threads may start children at once; draining and taking never wait.
        self._offer_lock = threading.Lock()
        _child.parent_only_fds.add(ours.fileno())
        # Queued in the socket (a few KiB, far below its buffer), where the server reads it
        # once it has started. Sent before the socket is non-blocking, so it never waits on
        # the hub: this runs under _server_lock, and no greenlet may switch away holding it.
        prep = preparation_data("ForkServer")
        keys = ("sys_path", "dir", "init_main_from_path", "init_main_from_name")
        init = {key: prep[key] for key in keys if key in prep}
        try:
            ours.sendall(_framed(("init", list(_preload), init)))
        except OSError as exc:
            self.close()
            raise GIPCError(f"gipc's fork server (pid {self.pid}) is gone: {exc}") from exc
        ours.setblocking(False)
        _log.debug("started gipc's fork server (pid %d)", self.pid)

    def send(self, message: Any, fds: Sequence[int]) -> None:
        """One message, with ``fds`` attached; cooperative. GIPCError if the server is gone."""
        data = memoryview(_framed(message))
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        with self._send_lock:  # whole messages: a partial send is finished before the next
            whole = len(data)
            try:
                while data:
                    try:
                        # What went is dropped in the same statement: an exception from a
                        # signal handler finds ``data`` as the socket has it.
                        data = data[self.sock.sendmsg([data], ancillary) :]
                    except BlockingIOError:
                        wait_write(self.sock.fileno())
                        continue
                    ancillary = []  # attached to the first bytes only
            except OSError as exc:
                self.close()
                raise GIPCError(f"gipc's fork server (pid {self.pid}) is gone: {exc}") from exc
            except BaseException:
                # Interrupted (a timeout, a kill) while it waited to send the rest: a message
                # cut short would garble every later one. This server is dropped (it ends
                # with its socket) and the next start launches another. (One sent whole,
                # or not begun, garbles nothing.)
                if 0 < len(data) < whole:
                    self.close()
                raise

    def take_offer(self, start: "_Start") -> None:
        """Gives ``start`` the spare the server offered last (as ``start.offer``; None if
        there is none), if nobody took it yet: the start then hands it the request itself,
        the server is not on the way. Gives nothing while a start sent to the server waits
        for its pid. The offer changes hands in one statement: an exception from a signal
        handler leaves it ours or the start's, never neither's. Reads what the server sent
        meanwhile, never waits; finding the server's end, forgets the server."""
        with self._offer_lock:
            self._drain()
            if not self._asking:
                start.offer, self._offer = self._offer, None

    def begin_asking(self, token: object) -> int:
        """A start request (``token``: the start) is about to go to the server; returns how
        many offers we have read (sent with it: the server may give it a spare whose offer
        we have not)."""
        with self._offer_lock:
            self._asking.add(token)
            return self._offers_seen

    def end_asking(self, token: object) -> None:
        """That start's pid came (an offer the server took for it was withdrawn before:
        its word "taken" precedes the pid), or it failed. Once is enough: again, or for a
        start that never began asking, it does nothing."""
        with self._offer_lock:
            self._asking.discard(token)

    def is_asking(self, token: object) -> bool:
        """Whether that start began asking and has not ended."""
        return token in self._asking

    def _drain(self) -> None:
        """Reads what the server sent (never waits) and acts on each whole message. Each
        descriptor is recorded in ``_inbox_fds`` by the call that receives it, and the
        bytes go to ``_inbox`` in the same call; a message leaves the inbox only once it
        has been acted on, and acting on it again does the same: an exception from a
        signal handler at any line leaves it to be read again, nothing lost."""
        while not self.dead:
            while self._read_message():  # also what an interrupted read left
                pass
            try:
                # An offer's two descriptors that did not all fit (this process is at its
                # limit of open descriptors) get placeholders (-1): the next offers'
                # descriptors stay with their messages, and this offer is passed over.
                received = self._inbox_fds.receive(self.sock.fileno(), self._inbox, 4096, 2)
            except BlockingIOError:
                return
            except OSError:
                received = 0
            _child.parent_only_fds.update(fd for fd in self._inbox_fds.owned_fds if fd >= 0)
            if not received:  # the server is gone
                self.close()
                return

    def _read_message(self) -> bool:
        """Acts on the inbox's first whole message, then drops it; False if there is none."""
        if len(self._inbox) < _LENGTH.size:
            return False
        (length,) = _LENGTH.unpack_from(self._inbox)
        end = _LENGTH.size + length
        if len(self._inbox) < end:
            return False
        body = pickle.loads(bytes(self._inbox[_LENGTH.size : end]))
        if body[0] == "spare":
            self._read_offer(body[1], body[2])
        elif body[0] == "taken" and self._offer is not None and self._offer.pid == body[1]:
            # Given to a start sent to the server. Closed before it is forgotten: never
            # forgotten open.
            self._offer.close()
            self._offer = None
        del self._inbox[:end]
        return True

    def _read_offer(self, pid: int, serial: int) -> None:
        """The server's offer of spare ``pid``: the one to use from now on (the server has
        moved on from the one before, which is closed). Read twice (an exception before
        its message was dropped), it is known by its ``serial`` and its descriptors are
        taken once."""
        if self._offer is None or self._offer.serial != serial:
            if self._offer is not None:
                self._offer.close()  # before it is replaced: never replaced open
            self._offer = _Offer(pid, serial)
        offer = self._offer
        if not offer.fds.owned_fds and len(self._inbox_fds.owned_fds) >= 2:
            self._inbox_fds.move_first(2, offer.fds)  # its pidfd and socket, in one step
        _child.parent_only_fds.update(fd for fd in offer.fds.owned_fds if fd >= 0)
        self._offers_seen = serial

    def alive(self) -> bool:
        """Whether the server's end of the control socket is still open (reads what it
        sent meanwhile, never waits)."""
        with self._offer_lock:
            self._drain()
        return not self.dead

    def close(self) -> None:
        """Forgets the server: closing the control socket ends it (if it still runs)."""
        if self.dead:
            return
        self.dead = True
        mine = self.owner == os.getpid()
        if mine:
            _child.parent_only_fds.discard(self.sock.fileno())
        self.sock.close()
        self._forget_offers(mine)
        pidfd, self.pidfd = self.pidfd, None
        if not mine:
            _close_quietly(pidfd)
            return
        # It is our child: no zombie. It exits at once (its socket closed) or is gone.
        if _reaped(self.pid, pidfd):
            _close_pidfd(pidfd)
        else:
            gevent.spawn(_reap_soon, self.pid, pidfd)

    def _forget_offers(self, mine: bool = True) -> None:
        """Closes the descriptors of spares offered and not taken (a spare ends when its
        socket's last holder closes it)."""
        if self._offer is not None:
            self._offer.close(mine)  # before it is forgotten: never forgotten open
        self._offer = None
        if mine:
            _child.parent_only_fds.difference_update(self._inbox_fds.owned_fds)
        self._inbox_fds.close_all()


class _Offer:
    """A spare the server forked ahead, as its caller knows it: its pid, its pidfd and a
    socket to it, where the caller sends a start request (what the server would).

    Its descriptors are recorded in ``fds`` (a ``_core.StartFds``: the pidfd, then the
    socket), moved there in one step from the control socket's (``_Server._read_offer``),
    and leave it one at a time, each closed or handed on by the call that forgets it:
    whoever holds the offer holds them, and an exception from a signal handler at any
    line leaves each recorded there or gone, never both, never neither."""

    def __init__(self, pid: int, serial: int) -> None:
        self.pid = pid
        #: The server's count of offers, this one included: the same offer read twice is
        #: known by it.
        self.serial = serial
        self.fds = _core.StartFds()

    @property
    def pidfd(self) -> int:
        """Its pidfd (-1 once closed or handed on, or if it came without it)."""
        owned = self.fds.owned_fds
        return owned[0] if owned else -1

    @property
    def sock(self) -> int:
        """Its socket (-1 once closed, or if it came without it)."""
        owned = self.fds.owned_fds
        return owned[1] if len(owned) == 2 else -1

    def hand_over(self, fds: Sequence[int]) -> bool:
        """Sends the start request to the spare (never waits: its socket is empty); False
        if it is gone, or its offer is closed or came without a descriptor (then the
        caller asks the server). Closes the socket either way. No socket object ever owns
        it: ``fds`` does, until the call that closes it forgets it."""
        sock = self.sock
        if sock < 0 or self.pidfd < 0:
            return False
        try:
            _core.send_record(sock, b"s", list(fds))
            return True
        except OSError:  # EPIPE, ECONNRESET: it died meanwhile
            return False
        finally:
            _child.parent_only_fds.discard(sock)
            self.fds.close(sock)

    def close(self, mine: bool = True) -> None:
        """Closes what is left of its descriptors (a spare ends once every holder of its
        socket has closed it; one that was sent a start runs it)."""
        if mine:
            _child.parent_only_fds.difference_update(self.fds.owned_fds)
        self.fds.close_all()


def _reaped(pid: int, pidfd: Optional[int]) -> bool:
    """Whether the server has ended and is reaped now (by us, or by somebody else: gevent's
    SIGCHLD handling, a program's own wait())."""
    try:
        if pidfd is not None and _P_PIDFD is not None:
            try:
                return os.waitid(_P_PIDFD, pidfd, os.WEXITED | os.WNOHANG) is not None
            except ChildProcessError:
                raise
            except OSError:  # EINVAL: Linux 5.3 has pidfds but cannot wait on them
                pass
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return True


_P_PIDFD: Optional[int] = getattr(os, "P_PIDFD", None)


#: How long a closed server may take to end before it is killed.
_END_GRACE = 1.0


def _reap_soon(pid: int, pidfd: Optional[int]) -> None:
    """Reaps a server whose socket was closed. It ends as soon as it sees that, unless it
    is busy (importing a slow preload module, say): after ``_END_GRACE`` it is killed,
    so that it is never left running, or a zombie, for the rest of the caller's life. By
    its pidfd where there is one: its pid may have been reaped by somebody else and reused
    by now (without a pidfd that risk is the system's, as for any pid)."""
    waited = 0.0
    try:
        while not _reaped(pid, pidfd):
            if waited >= _END_GRACE:
                _log.debug("gipc's fork server (pid %d) did not end when asked to: killed", pid)
                try:
                    if pidfd is not None:
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    else:
                        os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                waited = -float("inf")  # once
            gevent.sleep(0.01)
            waited += 0.01
    finally:
        _close_pidfd(pidfd)


def _close_pidfd(pidfd: Optional[int]) -> None:
    if pidfd is not None:
        _child.parent_only_fds.discard(pidfd)
        _close_quietly(pidfd)


def _close_quietly(fd: Optional[int]) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


_server: Optional[_Server] = None
#: Held while the server is looked up and, if need be, started: OS threads whose first
#: starts meet must not start a server each (one would be lost, its descriptor with it).
_server_lock = threading.Lock()


def _current_server() -> _Server:
    """This process's fork server, started on first use (again if it died)."""
    global _server
    with _server_lock:
        server = _server
        if server is None or server.dead:
            server = _server = _Server()
    return server


def _forget_server_after_fork() -> None:
    """In any forked child (gipc's or a plain ``os.fork()``): the parent's server is the
    parent's. Our copy of its socket goes; a start here gets a server of our own."""
    global _server, _server_lock
    server, _server = _server, None
    # Another thread of the parent may have held it at the fork: here nobody does.
    _server_lock = threading.Lock()
    if server is not None and not server.dead:
        _child.parent_only_fds.discard(server.sock.fileno())
        try:
            server.sock.close()
        except OSError:
            pass
        _close_pidfd(server.pidfd)
        server.pidfd = None
        server._offer_lock = threading.Lock()
        server._forget_offers()


os.register_at_fork(after_in_child=_forget_server_after_fork)


def _close_at_exit() -> None:
    """At interpreter exit: the control socket closes now (the server sees it and ends),
    not as a stray object of the interpreter's teardown."""
    server = _server
    if server is not None and not server.dead and server.owner == os.getpid():
        server.dead = True
        server.sock.close()
        server._forget_offers()  # an offered spare's descriptors (it ends with the server)
        _close_pidfd(server.pidfd)
        server.pidfd = None


atexit.register(_close_at_exit)


def server_pid() -> Optional[int]:
    """The pid of this process's running fork server, if any (for tests and tools)."""
    server = _server
    if server is None or server.dead or server.owner != os.getpid():
        return None
    return server.pid


class ForkServerPopen(CooperativePopen):
    """A child forked by gipc's fork server: a start cost independent of the caller's
    size, no fork of the caller's threads, the target, arguments and handles pickled."""

    method = "forkserver"

    _pidfd: Optional[int] = None
    _status_fd = -1

    def _launch(self, process_obj: "_GProcess") -> None:
        # The server imports the main module when it starts if "__main__" is preloaded
        # (_preload as it is now: a server started before a change keeps its own).
        startup = StartupData(process_obj, self.method, "__main__" in _preload)
        if len(startup.handle_fds) > MAX_HANDLE_FDS:
            raise GIPCError(
                f"a fork server child can be passed at most {MAX_HANDLE_FDS} descriptors "
                f"of handles, not {len(startup.handle_fds)}"
            )
        self._records = bytearray()
        self._child_code: Optional[int] = None
        self._status: Optional[int] = None
        self._ended = False
        # What this start holds until the process object has it: undone if the start fails
        # or is interrupted (an exception from a signal handler can come at any line).
        start = _Start()
        try:
            passed = self._prepare(start, startup)
            _send_start_request(start, passed)
            for fd in passed[:3]:  # the child's (or the server's) now
                start.fds.close(fd)
            pid = start.offer.pid if start.offer is not None else self._await_pid(start)
            self._take_over(start, pid, process_obj.name)
        except BaseException:
            self._abort_fork_server_start(start)
            raise

    def _prepare(self, start: "_Start", startup: StartupData) -> List[int]:
        """The start's descriptors, each recorded in ``start.fds`` by the call that makes
        it: the status socket (our end non-blocking, in ``_status_fd``), the child's parent
        sentinel and the start-up data pipe, whose write end goes to a Feeder. Returns
        those the request passes to the child: data, sentinel, status, then the handles'."""
        self._status_fd, child_status = start.fds.socketpair()
        os.set_blocking(self._status_fd, False)
        child_r, start.parent_w = start.fds.pipe()  # the child's parent_process().sentinel
        # Ours to keep, as a process object's are: a child forked meanwhile (the wait for
        # the server's answer lets other greenlets start children) closes them. (An undone
        # start forgets them there as it closes them.)
        _child.parent_only_fds.update((self._status_fd, start.parent_w))
        data_r, start.data_w = start.fds.pipe()
        # Fed before the request goes, but for the last byte: the child finds its data
        # waiting when it wakes (fewer wake-ups), and runs nothing before the start is
        # done (_take_over releases it).
        start.feeder = Feeder(start.data_w, startup.payload, hold_back=1)
        start.fds.hand_on(start.data_w)  # the feeder's, which closes it
        start.feeder.start()
        return [data_r, child_r, child_status, *startup.handle_fds]

    def _take_over(self, start: "_Start", pid: int, name: str) -> None:
        """The start's last steps, once the child's pid is known: the process object takes
        the descriptors it keeps, the start's "asking" ends, and the child gets the last
        byte of its start-up data (then it runs; nothing of the start is left to fail)."""
        if start.offer is not None:
            pidfd: Optional[int] = start.offer.pidfd
        else:
            answered = start.answer_fds.owned_fds
            pidfd = answered[0] if answered else None
        kept = (self._status_fd, start.parent_w) + ((pidfd,) if pidfd is not None else ())
        self._adopt(pid, self._status_fd, kept)
        self._pidfd = pidfd
        for fd in kept:
            start.hand_on(fd)
        start.close_received()  # any other that came with the answer
        if start.server is not None:
            start.server.end_asking(start)
        _log.debug("started child %s (pid %d, forkserver)", name, pid)
        assert start.feeder is not None
        start.feeder.release()

    def _abort_fork_server_start(self, start: "_Start") -> None:
        """Undoes a start that failed or was interrupted. The caller gets the exception and
        never a process object, so the child that may have been handed the start is
        killed (the server reaps it: it is the server's child), and its start-up data is
        cut short (a child not killed reads a torn start-up and exits). A request that may
        be on its way to the server, not answered yet, keeps the start "asking" until the
        answer comes (``_await_abandoned_answer``); otherwise that ends here. Every
        descriptor the start made or received is closed once."""
        if start.feeder is not None:
            start.fds.hand_on(start.data_w)  # the feeder's to close, once
            start.feeder.cancel()
        self._kill_handed_child(start)
        server = start.server
        if server is not None and server.is_asking(start):
            if self._records or self._ended:  # the server's answer is in
                server.end_asking(start)
            else:
                status_fd = self._status_fd
                start.fds.hand_on(status_fd)  # the waiting greenlet's, which closes it
                gevent.spawn(_await_abandoned_answer, server, status_fd, os.getpid(), start)
        for fd in self._parent_fds:
            start.hand_on(fd)  # closed by _abort_start, once
        start.close_received()
        self._abort_start(None, start.fds)

    def _kill_handed_child(self, start: "_Start") -> None:
        """SIGKILL for the child that was (or may have been) handed the start: the offered
        spare the start took (unused, it is replaced: the server forks the next), or the
        child the server named. By its pidfd: the server reaps it, and its pid may be
        reused as soon as it is gone. Without one (a system that has none), by the pid the
        server named."""
        if self._pidfd is not None:
            pidfd: Optional[int] = self._pidfd
        elif start.offer is not None:
            pidfd = start.offer.pidfd if start.offer.pidfd >= 0 else None
        else:
            answered = start.answer_fds.owned_fds
            pidfd = answered[0] if answered else None
        try:
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            elif start.offer is None and len(self._records) >= _RECORD.size:
                tag, pid = _RECORD.unpack_from(self._records)
                if tag == PID:
                    os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _await_pid(self, start: "_Start") -> int:
        """The pid in the server's answer, waited for cooperatively. The answer is the first
        record, left in ``_records`` (``_try_reap`` reads past it)."""
        while True:
            self._read_answer(start)
            if len(self._records) >= _RECORD.size:
                tag, value = _RECORD.unpack_from(self._records)
                if tag == FAILED:
                    if value:
                        raise GIPCError(
                            "gipc's fork server could not fork the child: "
                            f"{os.strerror(value)} (errno {value})"
                        )
                    raise GIPCError(
                        f"gipc's fork server could not start the child: {HANDOVER_TRIES} "
                        "children forked for it died before they could be handed the start"
                    )
                if tag != PID:
                    raise GIPCError(f"gipc's fork server sent record {tag} before a pid")
                pid: int = value
                return pid
            if self._ended:
                assert start.server is not None
                if start.server.alive():
                    # It dropped the request: its descriptors did not all reach it.
                    raise GIPCError(
                        "gipc's fork server could not take this start: the descriptors of "
                        "the request did not reach it (is it at its limit of open "
                        "descriptors, RLIMIT_NOFILE?)"
                    )
                start.server.close()
                raise GIPCError(
                    "gipc's fork server died before starting the child; "
                    "a new one is started on next use"
                )
            wait_read(self._status_fd)

    def _read_answer(self, start: "_Start") -> None:
        """Everything the status socket has now, while the start waits for its answer;
        notes its end. The bytes go to ``_records``, and the descriptors (the child's
        pidfd, with the PID record) to ``start.answer_fds``, in the call that receives
        them."""
        while not self._ended:
            try:
                received = start.answer_fds.receive(self._status_fd, self._records, 4096)
            except BlockingIOError:
                return
            except OSError:
                received = 0
            if not received:
                self._ended = True

    def _read_records(self) -> None:
        """Everything the status socket has now; notes its end. (No descriptor comes after
        the start's answer: one that did is closed.)"""
        while not self._ended:
            try:
                data, fds = _receive_records(self._status_fd)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            for fd in fds:
                os.close(fd)
            if not data:
                self._ended = True
                return
            self._records += data

    def _try_reap(self) -> Optional[int]:
        self._read_records()
        while len(self._records) >= _RECORD.size:
            tag, value = _RECORD.unpack_from(self._records)
            del self._records[: _RECORD.size]
            if tag == EXITED:
                self._child_code = value
            elif tag == REAPED:
                self._status = value
        if self._status is not None:
            return os.waitstatus_to_exitcode(self._status)
        if self._child_code is not None:
            # Its own last word, written with every other descriptor of its closed: it
            # runs nothing more. Neither its teardown nor the server's reaping is waited
            # for (the server reaps it; it never was our child).
            return self._child_code
        if self._ended:  # the server died: the child's own word, if it had its say
            return self._child_code if self._child_code is not None else 255
        return None

    def _watch_exit(self) -> None:
        # On the status socket: the child's EXITED record ends a join at once (one
        # wake-up); a child killed by a signal writes none, and the server's REAPED record
        # (or the socket's end, if the server died too) comes instead.
        self._exit_watcher = io_watcher(self._status_fd, READ)
        self._exit_watcher.start(self._on_exit_readable)

    def _signal(self, sig: int) -> None:
        try:
            if self._pidfd is not None:
                # Exactly our child, even if its pid was reused since.
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass


class _Start:
    """What a fork-server start holds until its process object has it, each thing recorded
    by the statement that makes or takes it, so that an interrupted start knows what to
    undo: the descriptors it made (``fds``), the write end of the start-up data pipe and
    its feeder, the parent sentinel's write end, the server it went to, the offered spare
    it took, and the descriptors that came with the server's answer (``answer_fds``). The
    start itself is its token in its server's "asking"."""

    def __init__(self) -> None:
        self.fds = _core.StartFds()
        self.answer_fds = _core.StartFds()
        self.data_w = -1
        self.parent_w = -1
        self.feeder: Optional[Feeder] = None
        self.server: Optional[_Server] = None
        self.offer: Optional[_Offer] = None

    def hand_on(self, fd: int) -> None:
        """``fd`` has a new owner: forgotten wherever the start records it."""
        self.fds.hand_on(fd)
        self.answer_fds.hand_on(fd)
        if self.offer is not None:
            self.offer.fds.hand_on(fd)

    def close_received(self) -> None:
        """Closes the descriptors that came to the start: the offer's, the answer's."""
        if self.offer is not None:
            self.offer.close()
        self.answer_fds.close_all()


#: Seconds an interrupted start's answer is waited for (see ``_await_abandoned_answer``).
ABANDONED_ANSWER_WAIT = 60.0


def _await_abandoned_answer(server: _Server, status_fd: int, owner: int, token: object) -> None:
    """For a start interrupted before the server answered it: waits for that answer on
    its status socket (a PID or FAILED record, or the socket's end: the server dropped
    the request or died, or the request never reached it), then ends the start's
    "asking" (``token``) and closes the socket. The child the server names is killed, by
    the pidfd that comes with its pid: nobody will join it. The server's answer comes
    after its word that it took the offered spare ("taken", on the control socket), so
    the next start knows that spare is gone. With no answer in ``ABANDONED_ANSWER_WAIT``
    seconds, "asking" is never ended: no offer of that server's is used again (its starts
    all go through it: slower, never handed twice)."""
    answered = False
    try:
        with gevent.Timeout(ABANDONED_ANSWER_WAIT, False):
            while os.getpid() == owner:
                try:
                    _data, fds = _receive_records(status_fd)
                except BlockingIOError:
                    wait_read(status_fd)
                    continue
                except OSError:
                    fds = []
                for fd in fds:  # the child's pidfd
                    _kill_quietly(fd)
                    os.close(fd)
                answered = True  # a record, or the socket's end
                break
    finally:
        if os.getpid() == owner:  # not in a forked child (there it is closed already)
            _child.close_fd(status_fd)
            if answered:
                server.end_asking(token)


def _kill_quietly(pidfd: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:  # gone already
        pass


def _receive_records(fd: int) -> Tuple[bytes, List[int]]:
    """What the status socket ``fd`` has now (BlockingIOError if nothing), and the
    descriptors that came with it. ``fd`` is never wrapped in a socket object: one that an
    exception from a signal handler left to the garbage collector closed the status socket
    while the process object still named it, and then whatever reused the number."""
    return _core.recv_record(fd, 4096)


def _send_start_request(start: _Start, fds: Sequence[int]) -> None:
    """Hands the start request to the spare the server offered, if there is one (then
    ``start.offer`` is it); else sends it to the server, which answers with a PID record.
    The server and the offer are recorded in ``start`` as they are taken."""
    start.server = _current_server()
    start.server.take_offer(start)
    if start.server.dead:  # found gone: a new one (which has offered nothing yet)
        start.server = _current_server()
    while start.offer is not None:
        if start.offer.hand_over(fds):
            # The server reports REAPED on the status socket (a child killed by a signal
            # writes nothing): it gets it from us, as the spare may die before it could
            # pass it on. Never waited for; a server gone meanwhile is found next start.
            try:
                start.server.send(("used", start.offer.pid), fds[2:3])
            except GIPCError:
                pass
            return
        start.offer.close()  # it died: the server forks another
        start.offer = None
        start.server.take_offer(start)
    _ask_server(start, fds)


def _ask_server(start: _Start, fds: Sequence[int]) -> None:
    """Sends the start request to the server, the start "asking" from just before it goes
    (ended by ``_take_over`` once the answer is read, or by whoever undoes the start)."""
    assert start.server is not None
    seen = start.server.begin_asking(start)
    try:
        start.server.send(("start", seen), fds)
    except GIPCError:
        # It died since the last start: nothing of this start reached it; one new server.
        start.server.end_asking(start)
        start.server = _current_server()
        seen = start.server.begin_asking(start)
        start.server.send(("start", seen), fds)
