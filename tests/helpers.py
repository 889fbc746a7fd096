"""Small helpers shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from typing import List

import gevent
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def raw_header(length: int, kind: int = 0, bulk_lane: bool = False) -> bytes:
    """A frame header as gipc's wire format has it (crates/wire/src/frame.rs: magic, kind,
    the bulk-lane flag, length): what a peer that is not gipc could write."""
    kind_byte = kind | (0x80 if bulk_lane else 0)
    return ((0x6770 << 48) | (kind_byte << 40) | length).to_bytes(8, "little")


class Ticker:
    """A greenlet that ticks every ``interval`` seconds and records the longest gap: proof
    that the event loop kept running."""

    def __init__(self, interval: float = 0.001) -> None:
        import time

        self._time = time.perf_counter
        self.interval = interval
        self.ticks = 0
        self.max_gap = 0.0
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        last = self._time()
        while True:
            gevent.sleep(self.interval)
            now = self._time()
            self.max_gap = max(self.max_gap, now - last)
            last = now
            self.ticks += 1

    def stop(self) -> None:
        self._greenlet.kill()


def run_python(code: str, *args: str, env_extra: "dict[str, str] | None" = None,
               timeout: float = 60, flags: "tuple[str, ...]" = ()) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter (for monkey-patching and exit behaviour, which
    must not leak into the test process), with interpreter ``flags`` before ``-c``."""
    return _run_interpreter([*flags, "-c", textwrap.dedent(code), *args], env_extra, timeout)


def run_script(path: str, *args: str, env_extra: "dict[str, str] | None" = None,
               timeout: float = 60, flags: "tuple[str, ...]" = ()) -> subprocess.CompletedProcess:
    """Runs the script at ``path`` (relative to the repository, or absolute) in a fresh
    interpreter, with interpreter ``flags`` before it."""
    return _run_interpreter([*flags, path, *args], env_extra, timeout)


def _run_interpreter(arguments: "list[str]", env_extra: "dict[str, str] | None",
                     timeout: float) -> subprocess.CompletedProcess:
    """This interpreter with ``arguments``, in the repository, its output captured."""
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def fd_targets(pid: int) -> List[str]:
    """What the descriptors of process ``pid`` point to (Linux)."""
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            pass
    return out


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    """Waits until process ``pid`` no longer exists, reaping it if it is a zombie of ours;
    fails the test after ``timeout`` seconds. For a process someone else reaps (a fork
    server's child) or that is dying as the test goes on."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return  # a zombie of ours, reaped
        except ChildProcessError:
            pass  # not ours: its parent reaps it
        if time.monotonic() > deadline:
            pytest.fail(f"process {pid} is still there after {timeout} s")
        time.sleep(0.01)


def pipe_capacity(fd: int) -> int:
    """The capacity of the pipe ``fd`` belongs to (Linux)."""
    import fcntl

    # F_GETPIPE_SZ: in fcntl from Python 3.10; Linux's value since 2.6.35.
    return fcntl.fcntl(fd, getattr(fcntl, "F_GETPIPE_SZ", 1032))
