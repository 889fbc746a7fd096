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
caller: ``("spare", pid)`` with the spare's pidfd and a copy of the server's end of the
spare's socket attached (``SCM_RIGHTS``), and ``("taken", pid)`` when the server gave that
spare to a start sent to it. The caller reads them at its next start, never waiting, and
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
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

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
        #: descriptors that came with it, in order; the latest spare offered.
        self._inbox = bytearray()
        self._inbox_fds: List[int] = []
        self._offer: Optional[_Offer] = None
        #: Offers read so far, and starts sent to the server whose pid has not come yet:
        #: while one is on its way, the server may hand it the spare it offered last (if
        #: we had not read that offer when we sent it), so no offer is used meanwhile.
        self._offers_seen = 0
        self._asking = 0
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

    def take_offer(self) -> Optional["_Offer"]:
        """The spare the server offered last, if nobody took it yet (the caller then hands
        it the start itself: the server is not on the way). Reads what the server sent
        meanwhile, never waits; finding the server's end, forgets the server."""
        with self._offer_lock:
            self._drain()
            if self._asking:
                return None
            offer, self._offer = self._offer, None
        return offer

    def begin_asking(self) -> int:
        """A start request is about to go to the server; returns how many offers we have
        read (sent with it: the server may give it a spare whose offer we have not)."""
        with self._offer_lock:
            self._asking += 1
            return self._offers_seen

    def end_asking(self) -> None:
        """That start's pid came (an offer the server took for it was withdrawn before:
        its word "taken" precedes the pid), or it failed."""
        with self._offer_lock:
            self._asking -= 1

    def _drain(self) -> None:
        while not self.dead:
            try:
                data, fds, _flags, _addr = socket.recv_fds(
                    self.sock, 4096, 16, getattr(socket, "MSG_CMSG_CLOEXEC", 0)
                )
            except BlockingIOError:
                return
            except OSError:
                data, fds, _flags = b"", [], 0
            _child.parent_only_fds.update(fds)
            if _flags & getattr(socket, "MSG_CTRUNC", 0) and len(fds) < 2:
                # An offer's two descriptors did not all fit (this process is at its limit
                # of open descriptors): placeholders keep the next offers' descriptors with
                # their messages, and this offer is dropped when its message is read.
                fds = fds + [-1] * (2 - len(fds))
            self._inbox_fds += fds
            if not data:  # the server is gone
                self.close()
                return
            self._inbox += data
            while len(self._inbox) >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(self._inbox)
                if len(self._inbox) < _LENGTH.size + length:
                    break
                body = pickle.loads(bytes(self._inbox[_LENGTH.size : _LENGTH.size + length]))
                del self._inbox[: _LENGTH.size + length]
                if body[0] == "spare" and len(self._inbox_fds) >= 2:
                    self._offers_seen += 1
                    pidfd, sock = self._inbox_fds[:2]
                    del self._inbox_fds[:2]
                    if pidfd < 0 or sock < 0:  # it came without them: unusable
                        _Offer(body[1], pidfd, sock).close()
                        continue
                    # Replaced before the older one (the server has moved on) is closed:
                    # interrupted in between, a closed offer is never left to a start.
                    older, self._offer = self._offer, _Offer(body[1], pidfd, sock)
                    if older is not None:
                        older.close()
                elif body[0] == "taken" and self._offer is not None:
                    if self._offer.pid == body[1]:  # given to a start sent to the server
                        taken, self._offer = self._offer, None
                        taken.close()

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
        offer, self._offer = self._offer, None
        if offer is not None:
            offer.close(mine)
        fds, self._inbox_fds = self._inbox_fds, []
        for fd in fds:
            if mine:
                _child.parent_only_fds.discard(fd)
            try:
                os.close(fd)
            except OSError:
                pass


class _Offer:
    """A spare the server forked ahead, as its caller knows it: its pid, its pidfd, and
    a socket to it, where the caller sends a start request (what the server would)."""

    def __init__(self, pid: int, pidfd: int, sock: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.sock = sock

    def hand_over(self, fds: Sequence[int]) -> bool:
        """Sends the start request to the spare (never waits: its socket is empty); False
        if it is gone (then the caller asks the server). Closes the socket either way.

        The socket is taken from ``self.sock`` before it is closed, and no socket object
        ever owns it: an exception from a signal handler at any line leaves it open
        (leaked) or closed and forgotten, never closed and still named here, where
        ``close()`` would close it again, whatever the number is by then."""
        try:
            if self.sock < 0:  # closed already: as good as gone
                return False
            _core.send_record(self.sock, b"s", list(fds))
            return True
        except OSError:  # EPIPE, ECONNRESET: it died meanwhile
            return False
        finally:
            sock, self.sock = self.sock, -1
            _child.parent_only_fds.discard(sock)
            _close_quietly(sock)

    def close(self, mine: bool = True) -> None:
        # Forgotten before closed (see hand_over): never closed twice.
        fds = (self.pidfd, self.sock)
        self.pidfd = self.sock = -1
        for fd in fds:
            if fd < 0:
                continue
            if mine:
                _child.parent_only_fds.discard(fd)
            _close_quietly(fd)


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
        opened: List[int] = []
        status: Optional[socket.socket] = None
        feeder: Optional[Feeder] = None
        data_w = -1
        try:
            status, child_status = _socketpair()
            opened.append(child_status.detach())
            child_r, parent_w = os.pipe()  # the child's parent_process().sentinel
            opened += (child_r, parent_w)
            data_r, data_w = os.pipe()
            opened.append(data_r)
            # Fed before the request goes, but for the last byte: the child finds its data
            # waiting when it wakes (fewer wake-ups), and runs nothing before we know its
            # pid (with a spare offered we know it already: released at once).
            feeder = Feeder(data_w, startup.payload, hold_back=1)
            feeder.start()
            fds = [data_r, child_r, opened[0], *startup.handle_fds]
            self._server, offer = _send_start_request(fds)
        except BaseException:
            if feeder is not None:
                feeder.cancel()
            elif data_w >= 0:
                os.close(data_w)
            for fd in opened:
                os.close(fd)
            if status is not None:
                status.close()
            raise
        for fd in (opened[0], child_r, data_r):
            os.close(fd)
        status.setblocking(False)
        self._status_fd = status.detach()
        if offer is not None:
            # The spare took it: we knew its pid before, and it runs the child now.
            self._pidfd = offer.pidfd
            self._adopt(offer.pid, self._status_fd, (self._status_fd, parent_w, offer.pidfd))
            feeder.release()
            _log.debug("started child %s (pid %d, forkserver)", process_obj.name, self.pid)
            return
        self._adopt(-1, self._status_fd, (self._status_fd, parent_w))
        self._answered = False
        try:
            self.pid = self._await_pid()
        except BaseException:
            # No child (the server said so, or died), or the start was interrupted (a
            # timeout, a kill): a child that was forked reads a torn start-up pickle and
            # exits.
            feeder.cancel()
            if self._answered:
                self._release()
                self._server.end_asking()
            else:
                self._abandon_start()
            raise
        self._server.end_asking()
        feeder.release()
        _log.debug("started child %s (pid %d, forkserver)", process_obj.name, self.pid)

    def _abandon_start(self) -> None:
        """A start interrupted before the server's answer. The request is still on its
        way: the server may yet hand it the spare it offered last, which the caller may
        have read meanwhile. Ending "asking" now would let the next start hand that same
        spare its own request (one spare, two requests: one of them never runs). So the
        status socket goes to a greenlet that waits for the answer, and only then ends
        "asking"; meanwhile other starts go through the server."""
        status_fd = self._status_fd
        self._parent_fds = tuple(fd for fd in self._parent_fds if fd != status_fd)
        self._release()  # the rest (the parent sentinel's write end), and the watchers
        gevent.spawn(_await_abandoned_answer, self._server, status_fd, os.getpid())

    def _await_pid(self) -> int:
        while True:
            self._read_records()
            if self._records or self._ended:
                self._answered = True  # whatever follows: the server's word is in
            if len(self._records) >= _RECORD.size:
                tag, value = _RECORD.unpack_from(self._records)
                del self._records[: _RECORD.size]
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
                if self._server.alive():
                    # It dropped the request: its descriptors did not all reach it.
                    raise GIPCError(
                        "gipc's fork server could not take this start: the descriptors of "
                        "the request did not reach it (is it at its limit of open "
                        "descriptors, RLIMIT_NOFILE?)"
                    )
                self._server.close()
                raise GIPCError(
                    "gipc's fork server died before starting the child; "
                    "a new one is started on next use"
                )
            wait_read(self._status_fd)

    def _read_records(self) -> None:
        """Everything the status socket has now; notes its end."""
        while not self._ended:
            try:
                data, fds = _receive_records(self._status_fd)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            for fd in fds:
                if self._pidfd is None:
                    self._pidfd = fd
                    _child.parent_only_fds.add(fd)
                    self._parent_fds += (fd,)
                else:
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



#: Seconds an interrupted start's answer is waited for (see ``_await_abandoned_answer``).
ABANDONED_ANSWER_WAIT = 60.0


def _await_abandoned_answer(server: _Server, status_fd: int, owner: int) -> None:
    """For a start interrupted before the server answered it: waits for that answer on
    its status socket (a PID or FAILED record, or the socket's end: the server dropped
    the request or died), then ends the start's "asking" and closes the socket. The
    server's answer comes after its word that it took the offered spare ("taken", on the
    control socket), so the next start knows that spare is gone. With no answer in
    ``ABANDONED_ANSWER_WAIT`` seconds, "asking" is never ended: no offer of that server's
    is used again (its starts all go through it: slower, never handed twice)."""
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
                for fd in fds:  # the child's pidfd: not needed
                    os.close(fd)
                answered = True  # a record, or the socket's end
                break
    finally:
        if os.getpid() == owner:  # not in a forked child (there it is closed already)
            _child.close_fd(status_fd)
            if answered:
                server.end_asking()


def _receive_records(fd: int) -> Tuple[bytes, List[int]]:
    """What the status socket ``fd`` has now (BlockingIOError if nothing), and the
    descriptors that came with it. ``fd`` is never wrapped in a socket object: one that an
    exception from a signal handler left to the garbage collector closed the status socket
    while the process object still named it, and then whatever reused the number."""
    return _core.recv_record(fd, 4096)


def _send_start_request(fds: Sequence[int]) -> Tuple[_Server, Optional[_Offer]]:
    """Hands the start request to the spare the server offered, if there is one (the
    offer it returns); else sends it to the server, which answers with a PID record."""
    server = _current_server()
    offer = server.take_offer()
    if server.dead:  # found gone: a new one (which has offered nothing yet)
        server = _current_server()
    while offer is not None:
        if offer.hand_over(fds):
            # The server reports REAPED on the status socket (a child killed by a signal
            # writes nothing): it gets it from us, as the spare may die before it could
            # pass it on. Never waited for; a server gone meanwhile is found next start.
            try:
                server.send(("used", offer.pid), fds[2:3])
            except GIPCError:
                pass
            return server, offer
        offer.close()  # it died: the server forks another
        offer = server.take_offer()
    seen = server.begin_asking()
    try:
        server.send(("start", seen), fds)
    except BaseException as exc:
        server.end_asking()
        if not isinstance(exc, GIPCError):
            raise
        # It died since the last start: nothing of this start reached it; one new server.
        server = _current_server()
        seen = server.begin_asking()
        try:
            server.send(("start", seen), fds)
        except BaseException:
            server.end_asking()
            raise
    return server, None
