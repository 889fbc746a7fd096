"""Every test must leave no trace: no new open file descriptor, no child process (running
or zombie) of this process, no gevent watcher dropped without ``close()`` on a CFFI loop
(libuv). The autouse fixture below fails a test that leaks any of them.

Every test runs once per start method named by ``--start-methods`` (default ``fork``; e.g.
``--start-methods=fork,spawn,forkserver``; ``GIPC_TEST_START_METHOD`` sets the default):
the session-scoped ``start_method`` fixture, a parameter of every test, makes its method
multiprocessing's default (``fork``: none set, as in a program that never chose), which
``start_process`` and ``ProcessPool`` follow. A test about fork itself is marked
``fork_only``, one that cannot hold for some method ``not_with_start_method(name, reason=)``:
skipped there. gipc's fork server, once started, lives as long as the test process: it is
not counted as a leak.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import weakref
from typing import Dict, Iterator, List, Set, Tuple

import multiprocessing

import gevent
import pytest

LINUX = sys.platform.startswith("linux")

START_METHODS = ("fork", "spawn", "forkserver")

#: The start method of the tests running now (see ``start_method``).
_current_start_method = "fork"


def current_start_method() -> str:
    """The start method the running test is parametrised with (for module-level helpers;
    a test takes the ``start_method`` fixture)."""
    return _current_start_method


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--start-methods",
        default=os.environ.get("GIPC_TEST_START_METHOD", "fork"),
        help="comma-separated start methods to run every test with "
        f"({', '.join(START_METHODS)}; default: fork, or GIPC_TEST_START_METHOD)",
    )


def _start_methods(config: pytest.Config) -> List[str]:
    names = [m.strip() for m in config.getoption("--start-methods").split(",") if m.strip()]
    unknown = [m for m in names if m not in START_METHODS]
    if unknown or not names:
        raise pytest.UsageError(
            f"--start-methods: {unknown or 'none'} (known: {', '.join(START_METHODS)})"
        )
    return list(dict.fromkeys(names))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "start_method" in metafunc.fixturenames:
        metafunc.parametrize(
            "start_method", _start_methods(metafunc.config), indirect=True, scope="session"
        )


@pytest.fixture(scope="session", autouse=True)
def start_method(request: pytest.FixtureRequest) -> Iterator[str]:
    """The start method every test runs with (a session-scoped parameter: pytest runs the
    tests of one method together)."""
    global _current_start_method
    method: str = request.param
    multiprocessing.set_start_method(None if method == "fork" else method, force=True)
    _current_start_method = method
    yield method
    multiprocessing.set_start_method(None, force=True)
    _current_start_method = "fork"


def fork_server_traces() -> Dict[int, str]:
    """The fork server's pid and the caller's control socket (if it runs)."""
    from gipc import _forkserver

    server = _forkserver._server
    if _forkserver.server_pid() is None or server is None:
        return {}
    traces = {server.pid: "fork server", server.sock.fileno(): "fork server socket"}
    if server.pidfd is not None:
        traces[server.pidfd] = "fork server pidfd"
    return traces


def open_fds() -> Dict[int, str]:
    """Descriptor number -> what it points to."""
    if LINUX:
        found = {}
        for name in os.listdir("/proc/self/fd"):
            try:
                found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
            except OSError:  # the directory's own descriptor, gone by now
                pass
        return found
    result = {}
    for fd in range(0, 1024):
        try:
            os.fstat(fd)
        except OSError:
            continue
        result[fd] = "?"
    return result


def child_pids(of: "int | None" = None) -> Set[int]:
    """Children of this process (or of process ``of``), alive or zombie (Linux: read from
    /proc)."""
    if not LINUX:
        return set()
    me = os.getpid() if of is None else of
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the command name, which is in parentheses and may contain spaces.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[1]) == me:
            found.add(int(entry))
    return found


@pytest.fixture(scope="session", autouse=True)
def _warm_hub() -> None:
    # The hub, its loop and the loop's own descriptors are created once per process; make
    # them before the first test so they are not mistaken for a leak.
    hub = gevent.get_hub()
    gevent.sleep(0.001)
    hub.threadpool  # noqa: B018
    global _CFFI_LOOP
    _CFFI_LOOP = _report_watchers_collected_open()


_CFFI_LOOP = False


#: Watchers of gevent's CFFI loops (libuv) collected while still open: their type, and a
#: weak reference to their loop.
_COLLECTED_OPEN: List[Tuple[str, "weakref.ref[object]"]] = []


def _unclosed_watchers() -> List[str]:
    """The types of the watchers collected open whose loop lives on: a loop destroyed or
    collected (a thread's, say) is never walked again, and its watchers are harmless."""
    return [
        kind
        for kind, loop_ref in _COLLECTED_OPEN
        if getattr(loop_ref(), "ptr", None)  # dead or destroyed loops have none
    ]


def _report_watchers_collected_open() -> bool:
    """On libuv, a gevent watcher (``loop.timer``, ``gevent.Timeout``'s timer, ...) that is
    garbage-collected without ``close()`` frees its native handle while libuv still links it
    in the loop's handle list. Nothing notices until something walks that list
    (``gevent.reinit()`` in a forked child, ``loop.debug()``, destroying the loop), which then
    reads freed memory and can crash. A cancelled ``gevent.Timeout`` that is never closed is
    enough. Seen in this suite: a multiprocessing child's ``gevent.reinit()`` segfaulted
    tests later. Each collected open watcher is recorded here, with its loop (gevent calls
    ``__del__`` on them only in its debug mode, so one is installed). Returns whether the
    loop is a CFFI one.
    """
    loop = gevent.get_hub().loop
    if not type(loop).__module__.startswith("gevent.libuv"):
        return False  # libev's Cython watchers free nothing the loop still links
    from gevent._ffi import watcher as cffi_watchers

    def __del__(watcher: object) -> None:
        loop = getattr(watcher, "loop", None)
        if getattr(watcher, "_watcher", None) is not None and loop is not None:
            _COLLECTED_OPEN.append((type(watcher).__name__, weakref.ref(loop)))

    cffi_watchers.watcher.__del__ = __del__  # type: ignore[attr-defined]
    return True


def _settle(check, attempts: int = 50) -> bool:
    for _ in range(attempts):
        if check():
            return True
        gc.collect()
        time.sleep(0.02)
    return check()


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    gc.collect()
    fds_before = open_fds()
    children_before = child_pids()
    _COLLECTED_OPEN.clear()
    yield
    if request.node.get_closest_marker("allow_leaks"):
        return
    if _CFFI_LOOP:
        gc.collect()
        unclosed = _unclosed_watchers()
        assert not unclosed, (
            f"test dropped gevent watchers without closing them: {unclosed} (their native "
            "handles stay linked in libuv's loop after being freed)"
        )
    new_children: Set[int] = set()

    def no_new_children() -> bool:
        new_children.clear()
        new_children.update(child_pids() - children_before - set(fork_server_traces()))
        return not new_children

    assert _settle(no_new_children), f"test left child processes behind: {new_children}"
    leaked: Dict[int, str] = {}

    def no_new_fds() -> bool:
        now = open_fds()
        leaked.clear()
        leaked.update({fd: what for fd, what in now.items() if fds_before.get(fd) != what})
        for fd in fork_server_traces():
            leaked.pop(fd, None)
        return not leaked

    assert _settle(no_new_fds, attempts=10), f"test leaked file descriptors: {leaked}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "allow_leaks: the test deliberately keeps descriptors or children"
    )
    config.addinivalue_line(
        "markers", "fork_only: about forked children (skipped for the other start methods)"
    )
    config.addinivalue_line(
        "markers",
        "not_with_start_method(name, reason): cannot hold for that start method (skipped)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        method = callspec.params.get("start_method") if callspec is not None else None
        if method is None:
            continue
        if method != "fork" and item.get_closest_marker("fork_only"):
            item.add_marker(pytest.mark.skip(reason=f"about fork; this runs with {method}"))
        for marker in item.iter_markers("not_with_start_method"):
            if marker.args[0] == method:
                item.add_marker(pytest.mark.skip(reason=marker.kwargs["reason"]))
