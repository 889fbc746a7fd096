"""Start method "forkserver": children forked by a small server process of gipc's own.

The server is a fresh interpreter (started like a spawned child, without blocking the
caller's loop) that has imported gevent and gipc, and the modules named with
``gipc.set_forkserver_preload()``, and runs no event loop. It forks each child from itself,
so a start costs the same whatever the caller's size, and the caller's event loop only
waits for a few messages. It forks each child *before* it is asked for one (``_Spare``)
and tells the caller about it at once (an *offer*: its pid, its pidfd, a socket to it), so
a start hands its descriptors to a child that is already waiting, directly: the server is
not on the way. The next spare is forked once the child started has ended (or 10 ms later),
not while the child and the caller want the CPUs.

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
import errno
import logging
import os
import pickle
import select
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from multiprocessing import process as mp_process
from multiprocessing import spawn as mp_spawn
from multiprocessing import util as mp_util
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import gevent
import gevent.lock
from gevent import monkey
from gevent.socket import wait_read, wait_write

from . import _child
from ._hub import READ, io_watcher
from ._popen import CooperativePopen
from ._startup import Feeder, StartupData, child_command, preparation_data
from ._startup_child import run_child
from .exceptions import GIPCError

if TYPE_CHECKING:
    from ._process import _GProcess

_log = logging.getLogger("gipc")

_FLAG = "--gipc-forkserver"
_LENGTH = struct.Struct("<I")
_RECORD = struct.Struct("<ii")
PID, EXITED, REAPED, FAILED = 1, 2, 3, 4
#: How many children, forked one after the other, a start request is offered to before
#: the server gives up on it: a child forked for it can die before it is handed the
#: request (killed, or out of memory in its after-fork work).
HANDOVER_TRIES = 3
#: Tests only: in a server started with this set (to a count), that many children forked
#: for a start request are killed before the handover, as if they had died meanwhile.
_DOOMED_ENV = "GIPC_FORKSERVER_TEST_DOOMED"
#: Seconds after a start at the latest before the next spare is forked, if the started
#: child has not ended before. Forking (~1 ms of the server's time on a virtual machine)
#: and the spare's after-fork work compete for the CPUs with the child just started and
#: with the caller: on 2 vCPUs that held the caller's loop off its CPU for 1.5 ms.
#: (The environment variable is read by the server, for tests and measurements.)
SPARE_DELAY = float(os.environ.get("GIPC_FORKSERVER_SPARE_DELAY", "0.01"))
#: Seconds before the server tries again to fork a spare the system refused (EMFILE,
#: EAGAIN): starts meanwhile get a child forked for them, or a clear error.
SPARE_RETRY = 0.1
#: The most descriptors one message can carry (Linux's SCM_MAX_FD), less the three of
#: every start request.
MAX_HANDLE_FDS = 253 - 3

#: What the next server imports before it forks anything; "__main__" by default, as in
#: multiprocessing: the caller's main module, so a child need not import it again.
_preload: List[str] = ["__main__"]


#: The standard library's socket class, whatever gevent.monkey.patch_all() made of
#: ``socket.socket``: gevent's waits on the hub where this module must not wait (the caller
#: reads only what is there and waits on its own terms; the server and its children run no
#: hub).
_Socket: Any = monkey.get_original("socket", "socket")


def _socketpair() -> Tuple[socket.socket, socket.socket]:
    """A connected pair of Unix stream sockets of the standard library's class."""
    one, two = _socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return _Socket(fileno=one.detach()), _Socket(fileno=two.detach())


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
                "from gipc._forkserver import serve; serve()", _FLAG, str(theirs.fileno())
            )
            self.pid: int = mp_util.spawnv_passfds(args[0], args, [theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
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
                        sent = self.sock.sendmsg([data], ancillary)
                    except BlockingIOError:
                        wait_write(self.sock.fileno())
                        continue
                    ancillary = []  # attached to the first bytes only
                    data = data[sent:]
            except OSError as exc:
                self.close()
                raise GIPCError(f"gipc's fork server (pid {self.pid}) is gone: {exc}") from exc
            except BaseException:
                # Interrupted (a timeout, a kill) while it waited to send the rest: a message
                # cut short would garble every later one. This server is dropped (it ends
                # with its socket) and the next start launches another.
                if len(data) < whole:
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
                    if self._offer is not None:
                        self._offer.close()  # an older one: the server has moved on
                    self._offer = _Offer(body[1], pidfd, sock)
                elif body[0] == "taken" and self._offer is not None:
                    if self._offer.pid == body[1]:  # given to a start sent to the server
                        self._offer.close()
                        self._offer = None

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
        # It is our child: no zombie. It exits at once (its socket closed) or is gone.
        if mine and not _reaped(self.pid):
            gevent.spawn(_reap_soon, self.pid)

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
        if it is gone (then the caller asks the server). Closes the socket either way."""
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        flags = socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)
        sock = _Socket(fileno=self.sock)
        try:
            sock.sendmsg([b"s"], ancillary, flags)
            return True
        except OSError:  # EPIPE, ECONNRESET: it died meanwhile
            return False
        finally:
            _child.parent_only_fds.discard(self.sock)
            sock.close()
            self.sock = -1

    def close(self, mine: bool = True) -> None:
        for fd in (self.pidfd, self.sock):
            if fd < 0:
                continue
            if mine:
                _child.parent_only_fds.discard(fd)
            try:
                os.close(fd)
            except OSError:
                pass
        self.pidfd = self.sock = -1


def _framed(message: Any) -> bytes:
    """A control-socket message: its length, then its pickle."""
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


def _reaped(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:  # reaped by somebody else (gevent's SIGCHLD handling)
        return True


def _reap_soon(pid: int) -> None:
    for _ in range(100):
        gevent.sleep(0.01)
        if _reaped(pid):
            return
    _log.debug("gipc's fork server (pid %d) did not end when asked to", pid)


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
        startup = StartupData(process_obj, self.method)
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


def _has_ended(pidfd: Optional[int]) -> bool:
    """Whether the process of ``pidfd`` has ended (a pidfd is readable from then on)."""
    if pidfd is None:
        return False
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _receive_records(fd: int) -> Tuple[bytes, List[int]]:
    """What the status socket ``fd`` has now (BlockingIOError if nothing), and the
    descriptors that came with it."""
    sock = _Socket(fileno=fd)
    try:
        data, fds, _flags, _addr = socket.recv_fds(sock, 4096, 1)
    finally:
        sock.detach()
    return data, fds


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


# ---------------------------------------------------------------------------------------
# The server process


def serve() -> None:
    """The server's main loop (its interpreter's entry point)."""
    flag, fd = sys.argv[1:3]
    if flag != _FLAG:
        raise SystemExit(f"gipc: not started as a fork server ({sys.argv!r})")
    del sys.argv[1:3]
    # What every child unpickles (its process object, and with capture=True its outcome
    # pipe), imported once here rather than in each child.
    from . import _outcome, _process  # noqa: F401
    control: socket.socket = _Socket(fileno=int(fd))
    control.setblocking(True)
    # Ctrl-C in a terminal reaches the whole process group: the server outlives it (its
    # callers decide), as multiprocessing's does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    #: pid -> the server's ends of its start's status socket (one; two only if a spare
    #: was ever handed two requests: both hear its end, neither is kept after it).
    children: Dict[int, List[int]] = {}
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    own_fds = [control.fileno(), wake_r, wake_w, selector.fileno()]
    spare: Optional[_Spare] = None
    #: Spares offered to the caller whose word (their start's status socket, or their
    #: end) has not come yet, by pid.
    offered: Dict[int, _Spare] = {}
    offers_sent = [0]
    #: Wait statuses of the children reaped lately, by pid: for the caller's word that it
    #: used a spare, if that word comes after the spare's end.
    reaped_lately: Dict[int, int] = {}
    # The next spare is forked once the child just started has ended, or SPARE_DELAY after
    # its start, whichever comes first: not while it runs (see SPARE_DELAY).
    spare_due: Optional[float] = None
    awaited: Optional[int] = None

    def held() -> List[int]:
        """Every descriptor the server holds now: none of them goes on into a child."""
        fds = [*own_fds, *(fd for fds in children.values() for fd in fds)]
        for other in (spare, *offered.values()):
            if other is not None:
                fds.append(other.sock.fileno())
                if other.pidfd is not None:
                    fds.append(other.pidfd)
        return [fd for fd in fds if fd >= 0]

    def new_spare() -> Optional[_Spare]:
        """A spare forked now; None if the system refused (no descriptor, no process
        left: tried again a little later, and the starts meanwhile fork their own)."""
        nonlocal spare_due
        try:
            return _Spare(held())
        except OSError:
            spare_due = time.monotonic() + SPARE_RETRY
            return None

    def schedule_spare(started: Optional[int]) -> None:
        nonlocal spare_due, awaited
        if started is not None:
            awaited = started
        due = time.monotonic() + (SPARE_DELAY if started is not None else 0.0)
        spare_due = due if spare_due is None else min(spare_due, due)

    def spare_reported(offer: _Spare) -> None:
        """An offered spare's word: the caller handed it a start, or it died unused."""
        nonlocal spare
        if offered.pop(offer.pid, None) is None:
            return  # already heard (its socket's event came in the same batch)
        selector.unregister(offer.sock)
        used = _take_report(offer)
        if offer is spare:
            spare = None
            schedule_spare(offer.pid if used else None)

    while True:
        timeout = None if spare_due is None else max(0.0, spare_due - time.monotonic())
        for key, _ in selector.select(timeout):
            if key.fileobj is control:
                message = _receive(control)
                if message is None:  # the caller is gone (and with us, any spare)
                    os._exit(0)
                body, fds = message
                if body[0] == "init":
                    _init(body[1], body[2])
                    spare = new_spare()
                    # The first start is often queued behind "init": this spare is its.
                    if spare is not None and not select.select([control], [], [], 0)[0]:
                        offers_sent[0] += _offer(control, spare, selector, offered)
                elif body[0] == "start":
                    # A spare offered to the caller is the caller's to hand a start to,
                    # unless the caller had not read that offer when it sent this (it
                    # uses none before this start's pid comes: we withdraw it first).
                    own = spare if spare is not None and spare.pid not in offered else None
                    if own is None and spare is not None and body[-1] < offers_sent[0]:
                        own = spare
                        offered.pop(spare.pid, None)
                        selector.unregister(spare.sock)
                        try:
                            control.sendmsg([_framed(("taken", spare.pid))])
                        except OSError:
                            pass
                    started = _start(fds, own, children, held)
                    if started is not None:  # an old child's pid, come round again
                        reaped_lately.pop(started.pid, None)
                    if own is not None and (started is own or own.dead):
                        spare = None
                    if started is not None:
                        started.close()
                    if spare is None:
                        schedule_spare(started.pid if started is not None else None)
                elif body[0] == "used":
                    _claim(body[1], fds, children, reaped_lately)
                else:
                    for received in fds:
                        os.close(received)
            elif isinstance(key.data, _Spare):
                spare_reported(key.data)
            else:
                try:
                    while os.read(wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                # A used spare's word before its end is reaped (the next spare waits
                # for that end).
                for offer in [o for o in offered.values() if _has_ended(o.pidfd)]:
                    spare_reported(offer)
                if awaited in _reap(children, reaped_lately):
                    spare_due = time.monotonic()
        if spare is None and spare_due is not None and time.monotonic() >= spare_due:
            spare_due, awaited = None, None
            spare = new_spare()
            if spare is not None:
                reaped_lately.pop(spare.pid, None)  # an old child's pid, come round again
                offers_sent[0] += _offer(control, spare, selector, offered)


def _offer(
    control: socket.socket,
    spare: _Spare,
    selector: selectors.BaseSelector,
    offered: Dict[int, _Spare],
) -> int:
    """Tells the caller about ``spare`` ahead of its next start: its pid, its pidfd and
    (a copy of) our end of its socket, on which the caller hands it a start request
    itself. The spare sends back, on that socket, the start's status socket (for REAPED).
    Without a pidfd the caller could not tell the spare's end: no offer. Returns how many
    offers were sent (0 or 1)."""
    if spare.pidfd is None:
        return 0
    ancillary = [
        (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [spare.pidfd, spare.sock.fileno()]))
    ]
    try:
        control.sendmsg([_framed(("spare", spare.pid))], ancillary)
    except OSError:
        return 0  # the caller is gone: we see it next
    offered[spare.pid] = spare
    selector.register(spare.sock, selectors.EVENT_READ, spare)
    return 1


def _take_report(spare: _Spare) -> bool:
    """An offered spare's word (it is readable, or has ended): that the caller handed it
    a start, or its end unused. True if it was used."""
    try:
        spare.sock.setblocking(False)
        data = spare.sock.recv(1)
    except OSError:
        data = b""
    spare.close()
    return bool(data)


def _claim(
    pid: int, fds: List[int], children: Dict[int, List[int]], reaped_lately: Dict[int, int]
) -> None:
    """The caller's word that it handed offered spare ``pid`` a start, with that start's
    status socket: REAPED goes there (at once if the child has been reaped already).
    Whatever the word names (a child the server handed a start itself, reaped or not),
    the socket is never kept past that child's end."""
    if not fds:
        return
    status_w, *extra = fds
    for fd in extra:
        os.close(fd)
    os.set_blocking(status_w, False)
    status = reaped_lately.get(pid)
    if status is None:
        children.setdefault(pid, []).append(status_w)
        return
    try:
        os.write(status_w, _RECORD.pack(REAPED, status))
    except OSError:
        pass
    os.close(status_w)


def _receive(control: socket.socket) -> Optional[Tuple[Any, List[int]]]:
    """The caller's next message, or None once the caller is gone: its end closed (with
    offers of ours unread in it, that reads as ECONNRESET)."""
    try:
        return _receive_message(control)
    except OSError:
        return None


def _receive_message(control: socket.socket) -> Optional[Tuple[Any, List[int]]]:
    header, fds, flags, _ = socket.recv_fds(control, _LENGTH.size, MAX_HANDLE_FDS + 3)
    if not header:
        return None
    while len(header) < _LENGTH.size:
        more = control.recv(_LENGTH.size - len(header))
        if not more:
            return None
        header += more
    (length,) = _LENGTH.unpack(header)
    body = bytearray()
    while len(body) < length:
        chunk = control.recv(length - len(body))
        if not chunk:
            return None
        body += chunk
    if flags & getattr(socket, "MSG_CTRUNC", 0):
        for fd in fds:
            os.close(fd)
        return ("dropped",), []
    return pickle.loads(body), fds


def _init(preload: List[str], prep: Dict[str, Any]) -> None:
    """sys.path and the working directory as the caller's; then the preloads."""
    if "sys_path" in prep:
        sys.path = prep["sys_path"]
    if "dir" in prep:
        try:
            os.chdir(prep["dir"])
        except OSError:
            pass
    # A main module without `if __name__ == "__main__":` would start children while the
    # server imports it: marked as inheriting, that raises multiprocessing's explanation
    # (then the module is not preloaded, and each child shows the error).
    current = mp_process.current_process()
    current._inheriting = True  # type: ignore[attr-defined]
    try:
        _preload_modules(preload, prep)
    finally:
        del current._inheriting  # type: ignore[attr-defined]


def _preload_modules(preload: List[str], prep: Dict[str, Any]) -> None:
    for name in preload:
        try:
            if name == "__main__":
                if "init_main_from_name" in prep:  # python -m package.module
                    mp_spawn._fixup_main_from_name(  # type: ignore[attr-defined]
                        prep["init_main_from_name"]
                    )
                elif "init_main_from_path" in prep:
                    mp_spawn.import_main_path(prep["init_main_from_path"])
            else:
                __import__(name)
        except Exception:  # noqa: BLE001 - a preload is an optimisation, not a must
            pass


class _Spare:
    """A child forked ahead of its start request, waiting for it on a socket of its own.

    Forking, the child's after-fork work and its signal reset take about a millisecond
    (pages copied on first write, on a virtual machine): done between starts, not while a
    caller waits. Each start request is handed to the waiting spare with its descriptors;
    the next spare is forked when the child has ended (or ``SPARE_DELAY`` later), so that
    the fork does not compete with the child and the caller for the CPUs. A start that
    finds no spare (none yet, or it died meanwhile) gets a child forked there and then. It
    ends, unused, when the server does (its socket closes), and holds no descriptor of the
    server's but its own end of that socket."""

    def __init__(self, inherited: List[int]) -> None:
        """``inherited``: the server's descriptors, which the child closes at once."""
        ours, theirs = _socketpair()
        # Forked with every signal blocked, as start_process forks: one sent to the child
        # before it has put back the default dispositions (the server ignores SIGINT)
        # waits, and meets the default action once the child unblocks it.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            self.pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            ours.close()
            theirs.close()
            raise
        if self.pid == 0:
            ours.close()
            _run_spare(theirs, inherited)  # never returns
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        theirs.close()
        self.sock = ours
        self.dead = False
        self.pidfd: Optional[int] = None
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            pass

    def hand_over(self, fds: List[int]) -> bool:
        """Sends the start request's descriptors; False if the spare is gone."""
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        try:
            self.sock.sendmsg([b"s"], ancillary)
            return True
        except OSError:
            self.dead = True
            self.close()
            return False

    def close(self) -> None:
        self.sock.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def _run_spare(sock: socket.socket, inherited: List[int]) -> None:
    """In a spare child: get ready, wait for a start request, run it, exit."""
    code = 1
    status_w = -1
    try:
        signal.set_wakeup_fd(-1)
        for fd in inherited:
            try:
                os.close(fd)
            except OSError:
                pass
        _child.restore_default_signals()
        data, fds, _flags, _addr = socket.recv_fds(sock, 1, MAX_HANDLE_FDS + 3)
        if data and len(fds) >= 3:
            # To the server: this offered spare was used (the next may be forked); one the
            # server handed a start to fails harmlessly (the server closed its end).
            try:
                sock.send(b"r", socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0))
            except OSError:
                pass
        sock.close()
        if not data or len(fds) < 3:  # the server ended: nothing to run
            for fd in fds:
                os.close(fd)
            code = 0
            return
        data_r, parent_sentinel, status_w, *handle_fds = fds
        _child.parent_only_fds.add(status_w)  # no grandchild of ours holds it
        code = _child.exit_status(run_child(data_r, handle_fds, parent_sentinel, forked=True))
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            if status_w >= 0:
                # Every other descriptor closed first: a join returns on this record, and
                # then the child's ends of its pipes (its stdio too) must be closed already.
                # What is left, the kernel tearing down the address space (~0.5 ms for the
                # server's image, more for a child that grew), no longer delays the join.
                _close_fds_except(status_w)
                os.write(status_w, _RECORD.pack(EXITED, code))
                # That write woke the caller's join as a "sync" wake-up: Linux may queue
                # the caller on this CPU, expecting the writer to sleep now, but the
                # teardown follows (0.5-3 ms here) and the caller's loop would wait for
                # it unless another CPU pulled it over. Yielding lets the caller run first.
                _yield_cpu()
        finally:
            os._exit(code)


def _yield_cpu() -> None:
    yield_cpu = getattr(os, "sched_yield", None)
    if yield_cpu is not None:
        yield_cpu()


def _close_fds_except(keep: int) -> None:
    """Closes every descriptor of this process but ``keep``. Lists the open ones (Python
    3.9's ``os.closerange`` tries every number up to its bound, one system call each)."""
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            fds = [int(name) for name in os.listdir(directory)]
            break
        except OSError:
            continue
    else:
        fds = list(range(os.sysconf("SC_OPEN_MAX")))
    for fd in fds:
        if fd != keep:
            try:
                os.close(fd)
            except OSError:  # the listing's own descriptor, closed already
                pass


def _start(
    fds: List[int],
    spare: Optional[_Spare],
    children: Dict[int, List[int]],
    held: Callable[[], List[int]],
) -> Optional[_Spare]:
    """Hands a start request to the spare (or, if there is none or it died, to a child
    forked now) and tells the caller its pid. Returns the child that took it (``spare``
    or the one forked now; closed by the caller), or None."""
    if len(fds) < 3:
        for fd in fds:
            os.close(fd)
        return None
    child = spare
    if child is None or not child.hand_over(fds):
        error = 0
        try:
            child = _fork_and_hand_over(fds, held)
        except OSError as exc:  # no descriptor or process left
            child, error = None, exc.errno or 0
        if child is None:
            # Not the server's death: it says so, and the caller fails just this start.
            try:
                os.write(fds[2], _RECORD.pack(FAILED, error))
            except OSError:
                pass
            for fd in fds:
                os.close(fd)
            return None
    status_w = fds[2]
    for fd in fds:
        if fd != status_w:
            os.close(fd)
    os.set_blocking(status_w, False)
    children.setdefault(child.pid, []).append(status_w)
    try:
        with _Socket(fileno=os.dup(status_w)) as status:
            ancillary = (
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [child.pidfd]))]
                if child.pidfd is not None
                else []
            )
            status.sendmsg([_RECORD.pack(PID, child.pid)], ancillary)
    except OSError:
        pass  # the caller gave up on this start; the child finds no start-up data
    return child


def _fork_and_hand_over(fds: List[int], held: Callable[[], List[int]]) -> Optional[_Spare]:
    """A child forked now and handed the start request. One that died before the handover
    is replaced by another (it was not the server that failed, and the caller's request
    is still whole), up to ``HANDOVER_TRIES`` children; None if none took it."""
    for _ in range(HANDOVER_TRIES):
        # The request's descriptors are the server's too until the handover. An OSError
        # (no descriptor or process left) fails this start with its reason.
        child = _Spare([*held(), *fds])
        _doom_for_test(child)
        if child.hand_over(fds):
            return child
    return None


def _doom_for_test(child: _Spare) -> None:
    """Tests only (``_DOOMED_ENV``): the child dies, and is gone, before its handover."""
    doomed = int(os.environ.get(_DOOMED_ENV) or 0)
    if doomed <= 0:
        return
    os.environ[_DOOMED_ENV] = str(doomed - 1)
    os.kill(child.pid, signal.SIGKILL)
    select.select([child.sock], [], [], 10)  # its end closed: readable, at EOF


def _reap(children: Dict[int, List[int]], reaped_lately: Dict[int, int]) -> List[int]:
    """Reaps every child that ended (a dead spare too), and tells the started ones'
    callers; returns the pids reaped. Every child's status is kept (the last few hundred)
    for a word of the caller's that it handed that child a start, if it comes later: the
    socket it brings gets REAPED at once, rather than wait for a child that is gone."""
    reaped: List[int] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            return reaped
        if pid == 0:
            return reaped
        reaped.append(pid)
        reaped_lately.pop(pid, None)  # kept in the order reaped
        reaped_lately[pid] = status
        while len(reaped_lately) > 256:
            del reaped_lately[next(iter(reaped_lately))]
        for status_w in children.pop(pid, []):
            try:
                os.write(status_w, _RECORD.pack(REAPED, status))
            except OSError:
                pass
            os.close(status_w)
