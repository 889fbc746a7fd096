"""Pipes and the rest of the system: a writer whose reader is gone gets ``BrokenPipeError``
whatever the program did with SIGPIPE, and channels leave the user's shared pipe budget to
the other programs of that user.

Both run in fresh interpreters: a SIGPIPE disposition is process-wide, and the pipe budget is
per user, so that scenario runs as a user of its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, run_python

TRANSPORTS = ["hybrid", "pipe", "socket"]

SIGPIPE_SCENARIOS = r"""
import json, signal, sys
import gevent, gipc

def exit_at_once(reader):
    pass

def broken(put):
    try:
        put()
    except BrokenPipeError:
        return "BrokenPipeError"
    return "no error"

def closed_reader_put(put_on):
    r, w = gipc.pipe()
    r.close()
    try:
        return broken(lambda: put_on(w))
    finally:
        w.close()

def state():
    return {
        "blocked": signal.SIGPIPE in signal.pthread_sigmask(signal.SIG_BLOCK, []),
        "pending": signal.SIGPIPE in signal.sigpending(),
    }

results = {}
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
results["put"] = closed_reader_put(lambda w: w.put("x")), state()
results["put_many"] = closed_reader_put(lambda w: w.put_many(["x"] * 10)), state()
results["large"] = closed_reader_put(lambda w: w.put(b"x" * (1 << 20))), state()

# Blocked in a put that does not fit, when the reader's process ends.
r, w = gipc.pipe()
child = gipc.start_process(exit_at_once, args=(r,))  # closes r here
results["blocked"] = broken(lambda: w.put(b"x" * (16 << 20))), state()
w.close()
child.join()

# A handler is not called: a write raises no signal, as on a socket (MSG_NOSIGNAL).
calls = []
signal.signal(signal.SIGPIPE, lambda *args: calls.append(args))
results["handler"] = closed_reader_put(lambda w: w.put("x")), state()
results["handler_calls"] = len(calls)

# The application blocks SIGPIPE and has one pending: both stay as they were.
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGPIPE])
results["masked"] = closed_reader_put(lambda w: w.put("x")), state()
signal.raise_signal(signal.SIGPIPE)
results["masked_pending"] = closed_reader_put(lambda w: w.put("x")), state()
signal.sigtimedwait([signal.SIGPIPE], 0)
signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGPIPE])
print(json.dumps(results))
"""


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kernel_flag", ["1", "0"], ids=["RWF_NOSIGNAL-if-any", "signal-mask"])
def test_a_writer_under_default_sigpipe_gets_broken_pipe_error(
    transport: str, kernel_flag: str
) -> None:
    """Many command-line programs put SIGPIPE back to its default action; a put with no
    reader left must still raise, not kill the process. Pipe writes use the kernel's
    RWF_NOSIGNAL where it exists (Linux 6.18+), else block the signal in their thread:
    GIPC_PIPE_NOSIGNAL=0 tests the latter on any kernel."""
    env = {"GIPC_TRANSPORT": transport, "GIPC_PIPE_NOSIGNAL": kernel_flag}
    done = run_python(SIGPIPE_SCENARIOS, env_extra=env)
    assert done.returncode == 0, (done.returncode, done.stderr)
    results = json.loads(done.stdout)
    clean = {"blocked": False, "pending": False}
    for scenario in ["put", "put_many", "large", "blocked", "handler"]:
        assert results[scenario] == ["BrokenPipeError", clean], scenario
    assert results["handler_calls"] == 0
    assert results["masked"] == ["BrokenPipeError", {"blocked": True, "pending": False}]
    assert results["masked_pending"] == ["BrokenPipeError", {"blocked": True, "pending": True}]


PIPE_BUDGET_SCENARIOS = r"""
import fcntl, json, os
import gevent, gipc

F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
MiB = 1 << 20

def fresh_pipe():
    # What any other program of this user would get now: a pipe's size, and whether it
    # can still be grown to 1 MiB.
    r, w = os.pipe()
    try:
        size = fcntl.fcntl(w, F_GETPIPE_SZ)
        try:
            grown = fcntl.fcntl(w, F_SETPIPE_SZ, MiB)
        except OSError as exc:
            grown = exc.strerror
        return size, grown
    finally:
        os.close(r)
        os.close(w)

def growth(pairs):
    # Bytes the channels' pipes hold beyond the default size, and the largest pipe.
    sizes = []
    for r, w in pairs:
        try:
            sizes.append(fcntl.fcntl(w._core.fileno(), F_GETPIPE_SZ))
        except OSError:  # a socket
            return None
    return sum(size - (64 << 10) for size in sizes), max(sizes)

def transfer(reader, writer, size):
    getter = gevent.spawn(reader.get)
    writer.put(b"x" * size)
    return len(getter.get())

results = {}
pairs = [gipc.pipe() for _ in range(200)]
results["idle"] = fresh_pipe()
results["idle_growth"] = growth(pairs)
results["moved"] = sum(transfer(r, w, MiB) for r, w in pairs)
results["busy"] = fresh_pipe()
results["busy_growth"] = growth(pairs)
with open("/proc/sys/fs/pipe-user-pages-soft") as f:
    results["budget"] = int(f.read()) * os.sysconf("SC_PAGE_SIZE")
for r, w in pairs:
    r.close()
    w.close()

# Another program used up the budget: a channel still works, at whatever size it has.
hogs = []
while True:
    hogs.append(os.pipe())
    try:
        fcntl.fcntl(hogs[-1][1], F_SETPIPE_SZ, MiB)
    except OSError:
        break
with gipc.pipe() as (r, w):
    results["exhausted"] = transfer(r, w, 4 * MiB)
for fds in hogs:
    for fd in fds:
        os.close(fd)
print(json.dumps(results))
"""


def _setpriv_command(uid: int) -> "list[str]":
    setpriv = shutil.which("setpriv")
    if not sys.platform.startswith("linux") or setpriv is None or os.geteuid() != 0:
        pytest.skip("needs Linux, root and setpriv to run as an unprivileged user")
    with open("/proc/sys/fs/pipe-user-pages-soft") as f:
        if int(f.read()) == 0:
            pytest.skip("no per-user pipe budget on this system")
    command = [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", sys.executable]
    probe = subprocess.run([*command, "-c", "import gipc"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot run this interpreter as uid {uid}: {probe.stderr.strip()}")
    return command


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_channels_leave_the_users_pipe_budget_to_other_programs(transport: str) -> None:
    """Linux counts pipe pages per user, across all of that user's programs; past the soft
    limit every new pipe of the user is created at 8 KiB and cannot grow. Many open channels,
    even busy ones, must not get there, and a channel still works when someone else did."""
    # A user of its own, so that nothing else (another test run) shares its budget.
    uid = 3_000_000 + os.getpid()
    command = _setpriv_command(uid)
    env = dict(os.environ, GIPC_TRANSPORT=transport)
    done = subprocess.run(
        [*command, "-c", PIPE_BUDGET_SCENARIOS],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, (done.returncode, done.stderr)
    results = json.loads(done.stdout)
    default = [64 << 10, 1 << 20]
    assert results["idle"] == default
    assert results["moved"] == 200 << 20
    assert results["busy"] == default
    assert results["exhausted"] == 4 << 20
    if transport == "socket":
        return
    # Idle channels keep the default size: pages are taken only for bulk traffic.
    assert results["idle_growth"] == [0, 64 << 10]
    grown, largest = results["busy_growth"]
    if transport == "hybrid":
        # Bulk payloads take the socket lane: the pipe never needs to grow.
        assert results["busy_growth"] == [0, 64 << 10]
    else:
        # Grown for bulk traffic, within a small share of the budget.
        assert largest == 1 << 20
        assert grown <= results["budget"] // 8
