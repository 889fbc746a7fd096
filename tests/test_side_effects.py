"""gipc leaves the rest of the program alone.

After ``import gipc`` and while gipc children run, the other ways of starting and waiting for
processes keep their normal behaviour and exit codes: ``multiprocessing.Process`` and
``Pool`` (fork context), ``subprocess``, ``gevent.subprocess`` and ``os.fork`` with
``os.waitpid``; and gipc's own children still report their exit codes. Scenarios that change
process-wide state (monkey-patching, gevent's SIGCHLD handling) run in a fresh interpreter.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import gevent
import pytest

import gipc

from helpers import run_python

FORK = multiprocessing.get_context("fork")
LIBUV = "libuv" in type(gevent.get_hub().loop).__module__


def exit_after(code: int, delay: float) -> None:
    time.sleep(delay)
    sys.exit(code)


def square(x: int) -> int:
    return x * x


def echo_until_none(reader, writer) -> None:
    for item in reader:
        if item is None:
            break
        writer.put(item)
    sys.exit(6)


def start_gipc_children(codes, delay=0.3):
    return [gipc.start_process(exit_after, args=(code, delay)) for code in codes]


def join_all(procs):
    for p in procs:
        p.join()
    return [p.exitcode for p in procs]


class TestMultiprocessing:
    @pytest.mark.parametrize("join_first", ["multiprocessing", "gipc"])
    def test_process_exit_codes_alongside_gipc_children(self, join_first):
        ours = start_gipc_children([3, 4], delay=0.2)
        plain = [FORK.Process(target=exit_after, args=(code, 0.1)) for code in (7, 8)]
        for p in plain:
            p.start()
        more = start_gipc_children([5], delay=0.05)
        if join_first == "gipc":
            assert join_all(ours + more) == [3, 4, 5]
            assert join_all(plain) == [7, 8]
        else:
            assert join_all(plain) == [7, 8]
            assert join_all(ours + more) == [3, 4, 5]

    def test_join_timeout_terminate_and_active_children(self):
        ours = gipc.start_process(exit_after, args=(0, 30))
        plain = FORK.Process(target=exit_after, args=(0, 30))
        plain.start()
        plain.join(0.05)
        assert plain.is_alive() and plain.exitcode is None
        assert {plain, ours} <= set(multiprocessing.active_children())
        plain.terminate()
        plain.join()
        assert plain.exitcode == -signal.SIGTERM
        assert ours.is_alive(), "terminating a multiprocessing child touched a gipc one"
        ours.terminate()
        ours.join()
        assert ours.exitcode == -signal.SIGTERM
        assert not {plain, ours} & set(multiprocessing.active_children())

    def test_pool_alongside_gipc_traffic(self):
        with gipc.pipe() as (child_in, to_child), gipc.pipe() as (from_child, child_out):
            echo = gipc.start_process(echo_until_none, args=(child_in, child_out))
            pool = FORK.Pool(2)
            try:
                pending = pool.map_async(square, range(200))
                for i in range(500):
                    to_child.put(i)
                    assert from_child.get() == i
                assert pending.get(timeout=30) == [x * x for x in range(200)]
                assert pool.apply(square, (12,)) == 144
            finally:
                pool.close()
                pool.join()
            to_child.put(None)
            echo.join()
        assert echo.exitcode == 6

    def test_gipc_child_started_from_a_multiprocessing_child(self):
        # A multiprocessing child (inheriting gipc's module state, and a loop that the
        # tests before this one used) can use gipc itself. Its gevent.reinit() walks the
        # loop's handles on libuv: a watcher freed while still linked there crashed it
        # (tests had left cancelled Timeouts unclosed; conftest now fails such a test).
        def middle(code):
            gevent.reinit()  # what gevent asks of any process forked without its help
            p = gipc.start_process(exit_after, args=(code, 0))
            p.join()
            sys.exit(p.exitcode + 1)

        plain = FORK.Process(target=middle, args=(10,))
        plain.start()
        plain.join()
        assert plain.exitcode == 11


class TestSubprocess:
    def test_run_exit_codes_while_gipc_children_run(self):
        ours = start_gipc_children([3, 4], delay=0.3)
        for code in (0, 1, 42):
            result = subprocess.run([sys.executable, "-c", f"import sys; sys.exit({code})"])
            assert result.returncode == code
        assert join_all(ours) == [3, 4]

    def test_popen_and_gipc_children_exit_in_any_order(self):
        slow = subprocess.Popen([sys.executable, "-c", "import time,sys; time.sleep(0.4); "
                                 "sys.exit(12)"])
        fast = subprocess.Popen(["sh", "-c", "exit 13"])
        ours = start_gipc_children([5, 6], delay=0.2)
        assert fast.wait(timeout=30) == 13
        assert join_all(ours) == [5, 6]
        assert slow.wait(timeout=30) == 12
        killed = subprocess.Popen(["sleep", "30"])
        ours = start_gipc_children([7])
        killed.kill()
        assert killed.wait(timeout=30) == -signal.SIGKILL
        assert join_all(ours) == [7]

    def test_check_output_during_gipc_traffic(self):
        with gipc.pipe() as (child_in, to_child), gipc.pipe() as (from_child, child_out):
            echo = gipc.start_process(echo_until_none, args=(child_in, child_out))
            out = subprocess.check_output([sys.executable, "-c", "print('x' * 100000)"])
            assert out.strip() == b"x" * 100000
            to_child.put_many(range(1000))
            assert [from_child.get() for _ in range(1000)] == list(range(1000))
            to_child.put(None)
            echo.join()
        assert echo.exitcode == 6


class TestForkAndWaitpid:
    def test_raw_fork_keeps_its_status(self):
        ours = start_gipc_children([3], delay=0.2)
        pid = os.fork()
        if pid == 0:
            time.sleep(0.1)
            os._exit(17)
        more = start_gipc_children([4], delay=0)
        got, status = os.waitpid(pid, 0)
        assert got == pid and os.waitstatus_to_exitcode(status) == 17
        assert join_all(ours + more) == [3, 4]

    def test_wnohang_polling_and_signal_death(self):
        pid = os.fork()
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        ours = gipc.start_process(exit_after, args=(9, 0.05))
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)
        ours.join()
        assert ours.exitcode == 9
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), "gipc's join reaped a foreign child"
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL

    @pytest.mark.not_with_start_method(
        "forkserver",
        reason="os.wait() would wait for the fork server: the child is the server's, not ours",
    )
    def test_a_program_that_reaps_every_child_does_not_hang_join(self):
        # os.wait() takes any child's status, including a gipc child's: gipc cannot know the
        # exit code then (documented: exitcode 255), but join must still return.
        ours = gipc.start_process(exit_after, args=(3, 0))
        pid, status = os.wait()
        assert pid == ours.pid and os.waitstatus_to_exitcode(status) == 3
        with gevent.Timeout(10):
            ours.join()
        assert ours.exitcode in (3, 255)


# --- fresh-interpreter scenarios -------------------------------------------------------------

SNAPSHOT = """
import multiprocessing, multiprocessing.popen_fork, os, signal, subprocess, sys, threading
def snapshot():
    return {
        "signals": {int(s): repr(signal.getsignal(s)) for s in signal.valid_signals()
                    if s not in (signal.SIGKILL, signal.SIGSTOP)},
        "start_method": multiprocessing.get_start_method(allow_none=True),
        "functions": {name: id(obj) for name, obj in [
            ("os.fork", os.fork), ("os.waitpid", os.waitpid), ("os.wait", os.wait),
            ("os.kill", os.kill), ("subprocess.Popen", subprocess.Popen),
            ("Process._Popen", multiprocessing.Process._Popen),
            ("Process.start", multiprocessing.Process.start),
            ("Process.join", multiprocessing.Process.join),
            ("popen_fork.Popen.poll", multiprocessing.popen_fork.Popen.poll),
            ("popen_fork.Popen.wait", multiprocessing.popen_fork.Popen.wait),
            ("context.Process", multiprocessing.context.Process),
        ]},
        "threads": threading.active_count(),
        "sigmask": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
    }
"""


def test_import_and_use_change_no_process_wide_state():
    result = run_python(
        SNAPSHOT
        + """
import json, gevent
gevent.get_hub()
before = snapshot()
import gipc
after_import = snapshot()
def child(w):
    w.put("hi")
with gipc.pipe() as (r, w):
    p = gipc.start_process(child, args=(w,))
    assert r.get() == "hi"
    p.join()
    assert p.exitcode == 0
after_use = snapshot()
print(json.dumps([before == after_import, before == after_use, before, after_use]))
"""
    )
    assert result.returncode == 0, result.stderr
    same_after_import, same_after_use, before, after = json.loads(result.stdout)
    assert same_after_import, "import gipc changed process-wide state"
    assert same_after_use, {k: (before[k], after[k]) for k in before if before[k] != after[k]}


def test_import_gipc_loads_only_what_is_used_and_every_name_resolves():
    """``import gipc`` imports neither gevent nor any part of gipc a program does not use
    (each name is imported on first use), and every public name still resolves, through
    ``from gipc import *`` too, and is listed by ``dir()``."""
    result = run_python(
        """
import sys, gipc
assert "gevent" not in sys.modules, sorted(m for m in sys.modules if "gevent" in m)
assert not [m for m in sys.modules if m.startswith("gipc.") and m not in (
    "gipc._core", "gipc.exceptions")], sorted(m for m in sys.modules if m.startswith("gipc"))
names = {}
exec("from gipc import *", names)
missing = [n for n in gipc.__all__ if n not in names]
assert not missing, missing
assert set(gipc.__all__) <= set(dir(gipc))
assert not {"annotations", "import_module", "TYPE_CHECKING"} & set(dir(gipc)), dir(gipc)
assert gipc.gipc._GIPCReader is gipc.Reader is names["Reader"]
assert gipc.Process is gipc._GProcess and gipc.start_process is names["start_process"]
try:
    gipc.no_such_name
except AttributeError as e:
    assert "no_such_name" in str(e)
else:
    raise AssertionError("no AttributeError")
print("ok")
"""
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


GEVENT_SUBPROCESS = """
import sys, time, gevent, gevent.subprocess, gipc

def exit_after(code, delay):
    time.sleep(delay)
    sys.exit(code)

def run(code, delay=0.0):
    return gevent.subprocess.Popen(
        [sys.executable, "-c", f"import sys, time; time.sleep({delay}); sys.exit({code})"])

ours = [gipc.start_process(exit_after, args=(c, 0.5)) for c in (3, 4)]
first = run(21, 0.1)
second = run(22)
codes = [first.wait(), second.wait()]
codes.append(gevent.subprocess.call([sys.executable, "-c", "import sys; sys.exit(23)"]))
out = gevent.subprocess.check_output([sys.executable, "-c", "print('out')"])
for p in ours:
    p.join()
print(codes, out.decode().strip(), [p.exitcode is not None for p in ours])
"""


def test_gevent_subprocess_keeps_its_exit_codes_while_gipc_children_run():
    result = run_python(GEVENT_SUBPROCESS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[21, 22, 23] out [True, True]"


GIPC_AFTER_GEVENT_SUBPROCESS = """
import sys, gevent, gevent.subprocess, gipc
# gevent.subprocess starts gevent's SIGCHLD handling, which reaps *every* child with
# waitpid(-1) from then on (libev and libuv alike).
assert gevent.subprocess.call([sys.executable, "-c", "pass"]) == 0
codes = []
for code in (3, 4, 5):
    p = gipc.start_process(sys.exit, args=(code,))
    gevent.sleep(0.3)  # the loop runs while the child exits: gevent's handler sees SIGCHLD
    p.join()
    codes.append(p.exitcode)
print(codes)
"""


def test_gipc_exit_codes_survive_gevent_sigchld_handling():
    result = run_python(GIPC_AFTER_GEVENT_SUBPROCESS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[3, 4, 5]"


PATCH_ALL = """
from gevent import monkey
monkey.patch_all()
import json, multiprocessing, os, signal, subprocess, sys, threading, time
import gevent, gipc

def exit_after(code, delay):
    time.sleep(delay)
    sys.exit(code)

def fail():
    raise RuntimeError("child failed on purpose")

def echo(r, w):
    for item in r:
        w.put(item)

report = {}
with gipc.pipe() as (r, w), gipc.pipe() as (r2, w2):
    p = gipc.start_process(echo, args=(r, w2))
    big = b"z" * (8 << 20)
    w.put(big)
    w.put_many(range(100))
    report["pipe"] = r2.get() == big and [r2.get() for _ in range(100)] == list(range(100))
    w.close()
    p.join()
    report["echo_exit"] = p.exitcode
def start_children(w):
    # A forked child is its process's main thread, with the default loop and its child
    # watchers (it took itself for a fork from another thread when gipc was imported
    # after patch_all(), and could start nothing).
    grandchild = gipc.start_process(sys.exit, args=(4,))
    grandchild.join()
    if not gevent.get_hub().loop.default:
        # A gipc child on libuv runs a non-default loop: gevent's fork and subprocess need
        # child watchers, which it does not have (docs/migrating.md); gipc's own starts work.
        w.put([grandchild.exitcode])
        return
    mp_child = multiprocessing.get_context("fork").Process(target=sys.exit, args=(6,))
    mp_child.start()
    mp_child.join()
    w.put([grandchild.exitcode, mp_child.exitcode,
           subprocess.call([sys.executable, "-c", "import sys; sys.exit(8)"])])

with gipc.pipe() as (r, w):
    p = gipc.start_process(start_children, args=(w,))
    report["child_starts"] = r.get(timeout=60)
    p.join()
with gipc.pipe(duplex=True) as (a, b):
    p = gipc.start_process(lambda h: h.put(h.get() * 2), args=(b,))
    a.put(21)
    report["duplex"] = a.get()
    p.join()

ours = [gipc.start_process(exit_after, args=(c, 0.2)) for c in (0, 3)]
ours.append(gipc.start_process(fail))
sleeper = gipc.start_process(exit_after, args=(0, 30))
plain = multiprocessing.get_context("fork").Process(target=exit_after, args=(7, 0.1))
plain.start()
sub = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(42)"])
pid = os.fork()
if pid == 0:
    time.sleep(0.1)
    os._exit(17)
thread_result = []
t = threading.Thread(target=lambda: thread_result.append(subprocess.call(["sh", "-c", "exit 5"])))
t.start()
ticks = []
ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(10)])
sleeper.terminate()
for p in ours + [sleeper]:
    p.join()
plain.join()
t.join()
ticker.join()
report["gipc"] = [p.exitcode for p in ours + [sleeper]]
report["multiprocessing"] = plain.exitcode
report["subprocess"] = sub.wait()
report["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
report["thread_subprocess"] = thread_result
report["ticks"] = len(ticks)
print(json.dumps(report))
"""


def test_everything_under_monkey_patch_all():
    result = run_python(PATCH_ALL)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {
        "pipe": True,
        "echo_exit": 0,
        "duplex": 42,
        "child_starts": [4] if os.environ.get("GEVENT_LOOP") == "libuv" else [4, 6, 8],
        "gipc": [0, 3, 1, -signal.SIGTERM],
        "multiprocessing": 7,
        "subprocess": 42,
        "fork": 17,
        "thread_subprocess": [5],
        "ticks": 10,
    }
