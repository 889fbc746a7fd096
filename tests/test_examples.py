"""Every program in examples/ runs to completion, on the loop the suite runs on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))

# What each documented example must print; examples added later need only exit cleanly.
EXPECTED = {
    "usage.py": "child exited with 0",
    "messaging.py": "child exited with 0",
    "server_clients.py": "1000 clients served",
    "time_sync.py": "Time delta:",
}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
        cwd=path.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert EXPECTED.get(path.name, "") in result.stdout


def test_all_seed_examples_are_present() -> None:
    assert set(EXPECTED) <= {p.name for p in EXAMPLES}
