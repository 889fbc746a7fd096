"""A gipc child is a multiprocessing child: what the target sees of multiprocessing, stdin,
threads, exit codes and exit-time hooks is compared with multiprocessing's own fork child,
on whichever Python runs the suite (gipc runs its own, leaner version of multiprocessing's
child start-up, see gipc/_child.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import LINUX
from helpers import ROOT

# Run in a fresh interpreter whose stdin is a pipe with unread data in it: the script starts
# the same targets through multiprocessing's fork context and through gipc, and prints what
# each child saw and how it ended, as JSON.
SCRIPT = r'''
import atexit, json, multiprocessing, multiprocessing.util, os, sys, tempfile, threading, time
import gevent
import gipc

gevent.get_hub()  # a parent with a hub, as in any gevent program
PARENT_FD_0 = os.readlink("/proc/self/fd/0")
first_line = sys.stdin.readline()  # the parent reads a line; the rest stays unread
class Calls(list):
    pass
after_fork_calls = Calls()  # register_after_fork keeps a weak reference
multiprocessing.util.register_after_fork(after_fork_calls, lambda obj: obj.append(os.getpid()))

def observe(path):
    me = multiprocessing.current_process()
    parent = multiprocessing.parent_process()
    stdin = sys.stdin
    later = multiprocessing.get_context("fork").Process(target=print)
    seen = {
        "me_is_process_object": isinstance(me, multiprocessing.process.BaseProcess),
        "me_name": me.name, "me_pid_ok": me.pid == os.getpid(), "me_daemon": me.daemon,
        "identity_len": len(me._identity), "next_child_identity": list(later._identity)[-1:],
        "parent_pid": parent.pid, "parent_name": parent.name, "parent_alive": parent.is_alive(),
        "active_children": len(multiprocessing.active_children()),
        "after_fork_ran": after_fork_calls == [os.getpid()],
        "native_id_ok": threading.main_thread().native_id == threading.get_native_id(),
        "stdin_type": type(stdin).__name__, "stdin_encoding": stdin.encoding,
        "stdin_errors": stdin.errors, "stdin_mode": getattr(stdin, "mode", None),
        "stdin_name": stdin.name, "stdin_fileno": stdin.fileno(),
        "stdin_line_buffering": stdin.line_buffering, "stdin_read": stdin.read(),
        "stdin_target": os.readlink("/proc/self/fd/%d" % stdin.fileno()),
        "stdin_seekable": stdin.seekable(), "stdin_tell": stdin.tell(),
        "fd_0_target_is_parents": os.readlink("/proc/self/fd/0") == PARENT_FD_0,
        "stdin_closefd": stdin.buffer.raw.closefd,
        "old_stdin_closed": sys.__stdin__.closed,
    }
    with open(path, "w") as f:
        json.dump(seen, f)

def with_exit_hooks(path):
    multiprocessing.util.Finalize(None, lambda: open(path + ".finalizer", "w").close(),
                                  exitpriority=0)
    atexit.register(lambda: open(path + ".atexit", "w").close())
    def late_writer():
        time.sleep(0.2)
        open(path + ".thread", "w").close()
    threading.Thread(target=late_writer).start()
    sys.stdout.write("unflushed output from " + path[-1])

def exit_with_message(path):
    sys.exit("goodbye from the child")

def exit_with_code(path):
    sys.exit(3)

def exit_with_none(path):
    sys.exit()

def raise_error(path):
    raise ValueError("the child failed")

def start(impl, target, path):
    if impl == "mp":
        p = multiprocessing.get_context("fork").Process(target=target, args=(path,), name="kid")
        p.start()
    else:
        p = gipc.start_process(target, args=(path,), name="kid")
    p.join()
    return p.exitcode

tmp = tempfile.mkdtemp()
report = {}
for impl in ("mp", "gipc"):
    got = report[impl] = {}
    path = os.path.join(tmp, impl + "-observe")
    got["observe_exit"] = start(impl, observe, path)
    with open(path) as f:
        got["observe"] = json.load(f)
    path = os.path.join(tmp, impl + "-hooks-" + impl[0])
    got["hooks_exit"] = start(impl, with_exit_hooks, path)
    got["hooks"] = sorted(s for s in (".finalizer", ".atexit", ".thread")
                          if os.path.exists(path + s))
    for target in (exit_with_message, exit_with_code, exit_with_none, raise_error):
        sys.stderr.write("@@%s %s@@" % (impl, target.__name__))
        sys.stderr.flush()
        got[target.__name__] = start(impl, target, path)
print("\nREPORT " + json.dumps(report))
print("parent read:", first_line.strip(), "then:", sys.stdin.read().strip())
'''


@pytest.fixture(scope="module", params=["lean", "stock"])
def reports(request):
    # "stock": the fallback that a Python gipc's lean child start-up was not written from
    # gets (multiprocessing's own _bootstrap); it must be just as faithful.
    env = dict(os.environ, GIPC_CHILD_BOOTSTRAP=request.param)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        input="first line\nsecond line, for nobody but the parent\n",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    report = json.loads(next(line for line in lines if line.startswith("REPORT "))[7:])
    return report, proc.stdout, proc.stderr


pytestmark = pytest.mark.skipif(not LINUX, reason="reads /proc; multiprocessing fork context")

# The tests on `reports` compare gipc's child with multiprocessing's *fork* child, started
# by a script in a fresh interpreter that forks whatever the suite's start method: fork_only.


@pytest.mark.fork_only
def test_what_the_child_sees_matches_multiprocessing(reports):
    report, _, _ = reports
    seen = report["gipc"]["observe"]
    assert seen == report["mp"]["observe"]
    assert seen["me_name"] == "kid" and seen["me_pid_ok"] and seen["parent_alive"]
    assert seen["parent_name"] == "MainProcess" and seen["after_fork_ran"]
    assert seen["stdin_read"] == "" and seen["stdin_target"] == os.devnull
    assert seen["old_stdin_closed"]


@pytest.mark.fork_only
def test_exit_codes_match_multiprocessing(reports):
    report, _, _ = reports
    for key in ("observe_exit", "hooks_exit", "exit_with_message", "exit_with_code",
                "exit_with_none", "raise_error"):
        assert report["gipc"][key] == report["mp"][key], key
    assert (report["gipc"]["exit_with_message"], report["gipc"]["exit_with_code"],
            report["gipc"]["exit_with_none"], report["gipc"]["raise_error"]) == (1, 3, 0, 1)


@pytest.mark.fork_only
def test_exit_hooks_threads_and_output_match_multiprocessing(reports):
    report, stdout, _ = reports
    # Finalizers registered in the child run, its threads are waited for; atexit functions
    # registered in the child run from Python 3.13 on (as multiprocessing does there).
    assert report["gipc"]["hooks"] == report["mp"]["hooks"]
    assert ".finalizer" in report["gipc"]["hooks"] and ".thread" in report["gipc"]["hooks"]
    assert (".atexit" in report["gipc"]["hooks"]) == (sys.version_info >= (3, 13))
    assert "unflushed output from m" in stdout and "unflushed output from g" in stdout


@pytest.mark.fork_only
def test_errors_are_reported_on_stderr_as_multiprocessing_does(reports):
    _, _, stderr = reports

    def section(impl, name):
        start = stderr.index(f"@@{impl} {name}@@") + len(f"@@{impl} {name}@@")
        following = stderr.find("@@", start)
        return stderr[start:] if following < 0 else stderr[start:following]

    assert section("gipc", "exit_with_message") == section("mp", "exit_with_message")
    assert "goodbye from the child" in section("gipc", "exit_with_message")
    error = section("gipc", "raise_error")
    assert error.startswith("Process kid:\nTraceback")
    assert "ValueError: the child failed" in error


@pytest.mark.fork_only
def test_stdin_data_is_left_to_the_parent(reports):
    _, stdout, _ = reports
    assert "parent read: first line then: second line, for nobody but the parent" in stdout


def report_mask(path):
    with open("/proc/self/status") as f:
        blocked = next(line for line in f if line.startswith("SigBlk:"))
    with open(path, "w") as f:
        f.write(blocked.split(":")[1].strip())


@pytest.mark.skipif(not LINUX, reason="reads /proc")
def test_signals_blocked_in_the_parent_are_unblocked_in_the_child(tmp_path):
    import gipc

    out = tmp_path / "mask"
    old = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1, signal.SIGTERM])
    try:
        p = gipc.start_process(report_mask, args=(str(out),))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    p.join()
    assert p.exitcode == 0
    assert int(out.read_text(), 16) == 0


@pytest.mark.fork_only  # a script that forks, whatever the suite's start method
def test_a_parent_that_never_made_a_hub():
    # Nothing of gevent's to abandon in the child: it builds its hub when it first waits.
    code = r'''
import gevent._hub_local, gipc
assert gevent._hub_local.get_hub_if_exists() is None
def child(w):
    import gevent
    gevent.sleep(0.01)
    w.put("slept")
r, w = gipc.pipe()
p = gipc.start_process(child, args=(w,))
print(r.get())
p.join()
print(p.exitcode)
'''
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["slept", "0"]


def _grandchild(w) -> None:
    import gevent

    gevent.sleep(0.01)  # the first hub and loop of this process
    w.put(os.getpid())


def _child_starting_a_grandchild_before_its_own_hub(w) -> None:
    import gipc

    p = gipc.start_process(_grandchild, args=(w,))
    p.join()  # the child's own first hub, after the fork
    sys.exit(p.exitcode)


def test_hubs_made_later_in_children_and_grandchildren():
    # The inherited loop is retired when a process makes its first loop, also in a
    # grandchild forked before its parent made one.
    import gevent
    import gipc

    gevent.get_hub()
    with gipc.pipe() as (r, w):
        p = gipc.start_process(_child_starting_a_grandchild_before_its_own_hub, args=(w,))
        grandchild_pid = r.get(timeout=30)
        p.join(timeout=30)
    assert p.exitcode == 0
    assert grandchild_pid not in (os.getpid(), p.pid)


def test_the_lean_start_up_is_used_only_where_it_was_written_from():
    from gipc import _child

    if os.environ.get("GIPC_CHILD_BOOTSTRAP") == "stock":
        pytest.skip("the stock start-up was asked for")
    assert _child.STOCK_BOOTSTRAP is (not (3, 9) <= sys.version_info[:2] <= (3, 13))
