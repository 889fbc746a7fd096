"""gipc logs its lifecycle to the ``gipc`` logger at debug level, and says nothing unless
the program configures logging."""

from __future__ import annotations

import logging

import pytest

import gipc
from gipc.pool import WorkerCrashed

from helpers import run_python


def read_one(reader: gipc.Reader) -> None:
    reader.get()


def test_child_start_exit_handle_transfer_and_close_are_logged(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.DEBUG, logger="gipc"):
        with gipc.pipe() as (r, w):
            p = gipc.start_process(read_one, (r,))
            w.put(1)
            p.join(10)
    messages = [record.getMessage() for record in caplog.records if record.name == "gipc"]
    assert any(m.startswith("started child") and str(p.pid) in m for m in messages), messages
    assert any(m.startswith("handed <_GIPCReader") and str(p.pid) in m for m in messages)
    assert any(m == f"child pid {p.pid} exited with code 0" for m in messages), messages
    assert any(m.startswith("closing <_GIPCWriter") for m in messages), messages
    assert all(record.levelno == logging.DEBUG for record in caplog.records)


def test_silent_by_default():
    result = run_python(
        """
        import gipc

        def child(r):
            r.get()

        if __name__ == "__main__":
            with gipc.pipe() as (r, w):
                p = gipc.start_process(child, (r,))
                w.put(1)
                p.join()
            print("done")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "done\n" and result.stderr == ""


def crash() -> None:
    import os

    os._exit(3)


def test_pool_worker_start_loss_and_retirement_are_logged(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.DEBUG, logger="gipc"):
        with gipc.ProcessPool(1) as pool:
            assert pool.submit(abs, -1).result(10) == 1
            with pytest.raises(WorkerCrashed):
                pool.submit(crash).result(10)
            assert pool.submit(abs, -2).result(10) == 2
    messages = [record.getMessage() for record in caplog.records if record.name == "gipc"]
    assert sum(m.startswith("pool worker 1 started") for m in messages) == 1, messages
    assert any(m.startswith("pool worker 1 (pid") and "died, exit code 3" in m for m in messages)
    assert any(m.startswith("pool worker 2 started") for m in messages), messages
    assert any(m.startswith("retiring pool worker 2") for m in messages), messages
