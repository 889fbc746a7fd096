"""A child's start: the event loop it gets, the signals that reach it early, the descriptors
it inherits and the handles handed to it (issue 11, points 6 to 10)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any, Dict, List

import gevent
import gevent.event
import gevent.server
import pytest

import gipc
from gipc._transfer import dumps_with_handles
from gipc.pool import ProcessPool

from conftest import LINUX, current_start_method
from helpers import run_python

LIBUV = "libuv" in type(gevent.get_hub().loop).__module__


def _join_or_kill(process: Any, timeout: float = 20.0) -> None:
    """A generous bound for a child that would otherwise hang for ever."""
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()


# --- 6: the child's loop goes idle --------------------------------------------------------


def _wait_for_everything(writer: Any) -> None:
    gevent.wait()  # returns once the loop has nothing left to do
    writer.put("gevent.wait() returned")


def _block_for_ever() -> None:
    try:
        gevent.event.Event().wait()  # nothing can ever set it
    except gevent.exceptions.LoopExit:
        sys.exit(42)


def _parent_with_active_watchers() -> List[Any]:
    """A sleeping greenlet (a timer) and a listening server (an io watcher), both started."""
    sleeper = gevent.spawn(gevent.sleep, 600)
    server = gevent.server.StreamServer(("127.0.0.1", 0), lambda sock, addr: None)
    server.start()
    gevent.sleep(0.001)
    return [sleeper, server]


def _stop(watchers: List[Any]) -> None:
    sleeper, server = watchers
    sleeper.kill()
    server.stop()


def test_gevent_wait_returns_in_a_child_whose_parent_has_active_watchers() -> None:
    watchers = _parent_with_active_watchers()
    try:
        with gipc.pipe() as (reader, writer):
            p = gipc.start_process(_wait_for_everything, (writer,))
            _join_or_kill(p)
            assert p.exitcode == 0
            assert reader.get() == "gevent.wait() returned"
    finally:
        _stop(watchers)


def test_a_wait_that_would_block_for_ever_is_detected_in_such_a_child() -> None:
    watchers = _parent_with_active_watchers()
    try:
        p = gipc.start_process(_block_for_ever)
        _join_or_kill(p)
        assert p.exitcode == 42
    finally:
        _stop(watchers)


# --- 7: signals during the child's start-up -----------------------------------------------

# Runs in a throwaway interpreter: at-fork hooks cannot be unregistered. The hook, armed only
# around start_process, runs in the child inside os.fork(), before any of gipc's start-up.
_EARLY_SIGNAL = r"""
import os, signal, sys
import gipc

how = sys.argv[1]
if how in ("handler", "terminate"):
    # As docs/reliability.md recommends for a parent.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
sig = signal.SIGINT if how == "sigint" else signal.SIGTERM
go_r, go_w = os.pipe()
armed = False

def in_child():
    if not armed:
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    os.write(report_w, b"blocked " if sig in blocked else b"unblocked ")
    if how == "terminate":
        os.read(go_r, 1)  # the parent's terminate() comes while the child is here
    else:
        os.kill(os.getpid(), sig)
    os.write(report_w, b"hook done")

def target():
    os.write(report_w, b" target ran")

report_r, report_w = os.pipe()
os.register_at_fork(after_in_child=in_child)
armed = True
p = gipc.start_process(target)
armed = False
os.close(report_w)
if how == "terminate":
    p.terminate()
    os.write(go_w, b"x")
p.join()
report = b""
while True:
    chunk = os.read(report_r, 100)
    if not chunk:
        break
    report += chunk
print(p.exitcode, report.decode())
"""


@pytest.mark.fork_only  # an at-fork hook, in a script that forks whatever the suite's method
@pytest.mark.parametrize(
    "how, expected",
    [
        ("sigint", -signal.SIGINT),  # the parent has Python's SIGINT handler
        ("handler", -signal.SIGTERM),  # the parent turns SIGTERM into an exit
        ("terminate", -signal.SIGTERM),  # ... and terminate()s a child just started
    ],
)
def test_a_signal_during_the_childs_start_up_meets_the_default_action(
    how: str, expected: int
) -> None:
    result = run_python(_EARLY_SIGNAL, how)
    assert result.returncode == 0, result.stderr
    code, report = result.stdout.split(" ", 1)
    # Blocked from before the hook on, and never run in the child: the signal kills it once
    # the dispositions are the default ones, before the target.
    assert report.strip() == "blocked hook done", (report, result.stderr)
    assert int(code) == expected, result.stderr


def _report_signal_state(writer: Any) -> None:
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    writer.put((sorted(int(s) for s in blocked), signal.getsignal(signal.SIGINT) is signal.SIG_DFL))


def test_the_parent_keeps_its_signal_mask_and_the_child_starts_unblocked() -> None:
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with gipc.pipe() as (reader, writer):
        p = gipc.start_process(_report_signal_state, (writer,))
        blocked, sigint_default = reader.get()
        p.join()
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    assert blocked == []
    assert sigint_default


# --- 8: a child started from a non-main thread ---------------------------------------------


# libuv: a forked child runs on a brand-new loop, with no child watchers at all (README);
# a spawned or fork server's child inherits no loop, and gets the default one.
def fresh_loop_only() -> bool:
    return LIBUV and current_start_method() == "fork"


def _describe_hub(writer: Any, with_child_watchers: bool) -> None:
    import gevent.subprocess

    hub = gevent.get_hub()
    facts: Dict[str, Any] = {"main_hub": hub.main_hub, "default": hub.loop.default}
    if with_child_watchers:
        facts["subprocess"] = gevent.subprocess.call([sys.executable, "-c", "exit(7)"])
    gevent.wait()
    facts["waited"] = True
    writer.put(facts)


def _start_from(thread_or_main: str) -> Dict[str, Any]:
    found: Dict[str, Any] = {}

    def start() -> None:
        with gipc.pipe() as (reader, writer):
            p = gipc.start_process(_describe_hub, (writer, not fresh_loop_only()))
            found.update(reader.get(timeout=30))
            _join_or_kill(p)
            found["exitcode"] = p.exitcode

    if thread_or_main == "main":
        start()
    else:

        def start_and_clean_up() -> None:
            try:
                start()
            finally:  # the thread's own hub and loop would outlive it
                gevent.get_hub().destroy(destroy_loop=True)

        thread = threading.Thread(target=start_and_clean_up)
        thread.start()
        thread.join()
    return found


@pytest.mark.parametrize("where", ["main", "thread"])
def test_a_child_started_from_any_thread_gets_the_main_hub(where: str) -> None:
    # The main thread's loop has a watcher running, as it would in a real program: the child
    # must neither take that loop over nor count its watchers.
    sleeper = gevent.spawn(gevent.sleep, 600)
    gevent.sleep(0.001)
    try:
        facts = _start_from(where)
    finally:
        sleeper.kill()
    expected: Dict[str, Any] = {"main_hub": True, "waited": True, "exitcode": 0}
    if fresh_loop_only():
        expected["default"] = False  # a brand-new loop, whatever the thread (README)
    else:
        expected.update(default=True, subprocess=7)
    assert facts == expected


# --- 9: no child inherits the descriptors that watch its siblings --------------------------


def _report_pidfds(writer: Any) -> None:
    writer.put(_pidfds_of("self"))


def _pidfds_of(pid: Any) -> List[str]:
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == "anon_inode:[pidfd]":
                with open(f"/proc/{pid}/fdinfo/{name}") as f:
                    found.append(f.read().split("Pid:")[1].split()[0])
        except (OSError, IndexError):
            pass
    return found


def _pidfds_in_a_new_child() -> List[str]:
    with gipc.pipe() as (reader, writer):
        p = gipc.start_process(_report_pidfds, (writer,))
        found: List[str] = reader.get()
        p.join()
    return found


def _wait_for_eof(reader: Any) -> str:
    try:
        reader.get()
    except EOFError:
        pass
    return "released"


needs_pidfd = pytest.mark.skipif(
    not (LINUX and hasattr(os, "pidfd_open")), reason="pidfds are Linux's"
)


@needs_pidfd
def test_a_child_does_not_inherit_the_pidfd_of_a_siblings_result_wait() -> None:
    with gipc.pipe() as (release_r, release_w):
        sibling = gipc.start_process(_wait_for_eof, (release_r,), capture=True)
        waiter = gevent.spawn(sibling.result)
        # Until result() waits on the sibling's exit (through its pidfd).
        deadline = time.monotonic() + 20
        while sibling._popen._exit_watcher is None or str(sibling.pid) not in _pidfds_of(
            "self"
        ):
            assert time.monotonic() < deadline
            gevent.sleep(0.001)
        try:
            assert _pidfds_in_a_new_child() == []
        finally:
            release_w.close()
            assert waiter.get(timeout=20) == "released"
            sibling.join()


def _identity(x: Any) -> Any:
    return x


@needs_pidfd
def test_a_child_does_not_inherit_the_pidfds_of_pool_workers() -> None:
    with ProcessPool(2) as pool:
        assert list(pool.map(_identity, range(4))) == [0, 1, 2, 3]
        assert len(_pidfds_of("self")) >= 2
        assert _pidfds_in_a_new_child() == []


# --- 10: handles nested to any depth -------------------------------------------------------


def _put_through(nested: Any, path: List[Any]) -> None:
    for key in path:
        nested = nested[key]
    nested.put("through")


def _nest(obj: Any, depth: int) -> Any:
    for level in range(depth):
        obj = [obj] if level % 3 == 0 else ((obj,) if level % 3 == 1 else {"k": obj})
    return obj


def _pickles(obj: Any) -> bool:
    """Whether ``obj`` (handles included) pickles on this Python, as spawn needs it to."""
    try:
        dumps_with_handles(obj)
    except RecursionError:
        return False
    return True


@pytest.mark.parametrize("depth", [5, 8, 2000])
def test_a_handle_nested_deep_in_args_is_handed_over(depth: int, start_method: str) -> None:
    with gipc.pipe() as (reader, writer):
        nested = _nest(writer, depth)
        path: List[Any] = []
        for level in reversed(range(depth)):
            path.append("k" if level % 3 == 2 else 0)
        if start_method != "fork" and not _pickles(nested):
            # Deeper than this Python's pickle goes (3.13's goes deeper than 3.9-3.12's):
            # spawn and forkserver must pickle the arguments, so the start is refused in
            # the caller, by name, and the handle stays the caller's.
            with pytest.raises(gipc.GIPCTypeError, match="argument 0"):
                gipc.start_process(_put_through, (nested, path))
            assert not writer.closed
            return
        p = gipc.start_process(_put_through, (nested, path))
        assert writer.closed  # handed over: the parent's copy is closed
        assert reader.get(timeout=20) == "through"
        p.join()
        assert p.exitcode == 0


def test_a_container_that_holds_itself_is_searched_once() -> None:
    with gipc.pipe() as (reader, writer):
        loop: List[Any] = []
        loop.append(loop)
        loop.append({"w": writer, "again": loop})
        p = gipc.start_process(_put_through, (loop, [1, "w"]))
        assert writer.closed
        assert reader.get(timeout=20) == "through"
        p.join()
        assert p.exitcode == 0
