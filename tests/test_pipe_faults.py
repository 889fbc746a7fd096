"""Pipes and the rest of the system: a writer whose reader is gone gets ``BrokenPipeError``
whatever the program did with SIGPIPE, and channels leave the user's shared pipe budget to
the other programs of that user.

Both run in fresh interpreters: a SIGPIPE disposition is process-wide, and the pipe budget is
per user, so that scenario runs as a user of its own."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from helpers import run_python

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
def test_a_writer_under_default_sigpipe_gets_broken_pipe_error(transport: str) -> None:
    """Many command-line programs put SIGPIPE back to its default action; a put with no
    reader left must still raise, not kill the process."""
    done = run_python(SIGPIPE_SCENARIOS, env_extra={"GIPC_TRANSPORT": transport})
    assert done.returncode == 0, (done.returncode, done.stderr)
    results = json.loads(done.stdout)
    clean = {"blocked": False, "pending": False}
    for scenario in ["put", "put_many", "large", "blocked", "handler"]:
        assert results[scenario] == ["BrokenPipeError", clean], scenario
    assert results["handler_calls"] == 0
    assert results["masked"] == ["BrokenPipeError", {"blocked": True, "pending": False}]
    assert results["masked_pending"] == ["BrokenPipeError", {"blocked": True, "pending": True}]
