"""gipc's fork server, the process itself: ``serve()``, the entry point of the interpreter
that ``_forkserver._Server`` launches, and everything it runs.

The protocol it speaks with its caller (the control socket's messages, the status
records, the limits both sides keep to) is described at the top of ``_forkserver`` and
defined there; this module imports it from there. With it the server imports the
caller's side, and what that imports (gipc's start-up and handle-transfer code, gevent's
socket module): a child forked from the server that is passed handles, or starts children
of its own, finds them imported.

**The loop.** One thread, no event loop: a poll over the control socket, the sockets
of the spares offered to the caller, and a pipe that signals (SIGCHLD) are written to. The
server forks each child *before* it is asked for one (``_Spare``) and offers it to the
caller at once (``_offer``); the next spare is forked once the child started has ended
(or ``SPARE_DELAY`` later), not while the child and the caller want the CPUs. The
caller's messages: ``"init"`` (its ``sys.path``, working directory and preloads; then the
first spare), ``"start"`` (a start request: handed to the server's spare if the caller
does not hold its offer, withdrawing an offer the caller had not read when it sent the
request, else to a child forked then: ``_start``) and ``"used"`` (the caller handed an
offered spare a start itself: that start's status socket, for ``REAPED``: ``_claim``).
An offered spare's own socket tells the server when it was used, or ended unused
(``_take_report``). On SIGCHLD the server reaps every child that ended and writes each
started child's ``REAPED`` record (``_reap``). The caller's end of the control socket
closing ends the server, and with it any spare waiting.
"""

from __future__ import annotations

import _signal
import array
import errno
import math
import os
import pickle
import select
import signal
import socket
import sys
import time
from multiprocessing import process as mp_process
from multiprocessing import spawn as mp_spawn
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import _child
from ._forkserver import (
    _FLAG,
    _LENGTH,
    _RECORD,
    EXITED,
    FAILED,
    HANDOVER_TRIES,
    MAX_HANDLE_FDS,
    PID,
    REAPED,
    _framed,
    _Socket,
    _socketpair,
)
from ._startup_child import run_child

# A sitecustomize or .pth file may have run gevent.monkey.patch_all() in this interpreter
# before the server's code: gevent's fork, waitpid, select and poll would wait on (and
# register with) a hub that the server never runs, and its signal.signal keeps a SIGCHLD
# handler for that hub instead of installing it. The system's own calls, always (and
# ``_signal``'s, which gevent does not patch).
if "gevent.monkey" in sys.modules:
    from gevent.monkey import get_original

    _fork, _waitpid = get_original("os", ["fork", "waitpid"])
    _select, _poll = get_original("select", ["select", "poll"])
else:
    _fork, _waitpid = os.fork, os.waitpid
    _select, _poll = select.select, select.poll


class _Watched:
    """The descriptors the server waits on to be readable, each with what it stands for:
    a ``select.poll`` of the system's (see above), with a selector's few calls."""

    def __init__(self) -> None:
        self._poll = _poll()
        self._what: Dict[int, Tuple[Any, Any]] = {}

    def register(self, obj: Any, data: Any = None) -> None:
        fd = obj if isinstance(obj, int) else obj.fileno()
        self._poll.register(fd, select.POLLIN)
        self._what[fd] = (obj, data)

    def unregister(self, obj: Any) -> None:
        fd = obj if isinstance(obj, int) else obj.fileno()
        self._poll.unregister(fd)
        del self._what[fd]

    def ready(self, timeout: Optional[float]) -> List[Tuple[Any, Any]]:
        """``(obj, data)`` of each that is readable (or at its end, or in error), waiting
        up to ``timeout`` seconds (``None``: for ever)."""
        ms = None if timeout is None else math.ceil(timeout * 1000)
        return [self._what[fd] for fd, _ in self._poll.poll(ms) if fd in self._what]

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


def _has_ended(pidfd: Optional[int]) -> bool:
    """Whether the process of ``pidfd`` has ended (a pidfd is readable from then on)."""
    if pidfd is None:
        return False
    poller = _poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


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
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    _signal.set_wakeup_fd(wake_w)
    _signal.signal(_signal.SIGCHLD, lambda *_: None)
    #: pid -> the server's ends of its start's status socket (one; two only if a spare
    #: was ever handed two requests: both hear its end, neither is kept after it).
    children: Dict[int, List[int]] = {}
    watched = _Watched()
    watched.register(control)
    watched.register(wake_r)
    own_fds = [control.fileno(), wake_r, wake_w]
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
        watched.unregister(offer.sock)
        used = _take_report(offer)
        if offer is spare:
            spare = None
            schedule_spare(offer.pid if used else None)

    while True:
        timeout = None if spare_due is None else max(0.0, spare_due - time.monotonic())
        for obj, data in watched.ready(timeout):
            if obj is control:
                message = _receive(control)
                if message is None:  # the caller is gone (and with us, any spare)
                    os._exit(0)
                body, fds = message
                if body[0] == "init":
                    _init(body[1], body[2])
                    spare = new_spare()
                    # The first start is often queued behind "init": this spare is its.
                    if spare is not None and not _select([control], [], [], 0)[0]:
                        offers_sent[0] += _offer(control, spare, watched, offered, offers_sent[0])
                elif body[0] == "start":
                    # A spare offered to the caller is the caller's to hand a start to,
                    # unless the caller had not read that offer when it sent this (it
                    # uses none before this start's pid comes: we withdraw it first).
                    own = spare if spare is not None and spare.pid not in offered else None
                    if own is None and spare is not None and body[-1] < offers_sent[0]:
                        own = spare
                        offered.pop(spare.pid, None)
                        watched.unregister(spare.sock)
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
            elif isinstance(data, _Spare):
                spare_reported(data)
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
                offers_sent[0] += _offer(control, spare, watched, offered, offers_sent[0])


def _offer(
    control: socket.socket,
    spare: _Spare,
    watched: _Watched,
    offered: Dict[int, _Spare],
    sent_before: int,
) -> int:
    """Tells the caller about ``spare`` ahead of its next start: its pid, its pidfd and
    (a copy of) our end of its socket, on which the caller hands it a start request
    itself, and how many offers were sent with this one (``sent_before`` + 1: the caller
    knows an offer it reads twice by it). The spare sends back, on that socket, the
    start's status socket (for REAPED). Without a pidfd the caller could not tell the
    spare's end: no offer. Returns how many offers were sent (0 or 1)."""
    if spare.pidfd is None:
        return 0
    ancillary = [
        (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [spare.pidfd, spare.sock.fileno()]))
    ]
    try:
        control.sendmsg([_framed(("spare", spare.pid, sent_before + 1))], ancillary)
    except OSError:
        return 0  # the caller is gone: we see it next
    offered[spare.pid] = spare
    watched.register(spare.sock, spare)
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
        except BaseException:  # noqa: BLE001 - a preload is an optimisation, not a must
            # Also SystemExit or KeyboardInterrupt from the module's code: they ended the
            # server, and every start after it.
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
            self.pid = _fork()
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
        _signal.set_wakeup_fd(-1)
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
    _select([child.sock], [], [], 10)  # its end closed: readable, at EOF


def _reap(children: Dict[int, List[int]], reaped_lately: Dict[int, int]) -> List[int]:
    """Reaps every child that ended (a dead spare too), and tells the started ones'
    callers; returns the pids reaped. Every child's status is kept (the last few hundred)
    for a word of the caller's that it handed that child a start, if it comes later: the
    socket it brings gets REAPED at once, rather than wait for a child that is gone."""
    reaped: List[int] = []
    while True:
        try:
            pid, status = _waitpid(-1, os.WNOHANG)
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
