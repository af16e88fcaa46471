"""Run the `taskfold` command in a fresh process, as a user would, and check the exit-2 promise."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "taskfold.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=600)


def assert_user_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    """Exit code 2, exactly one line on stderr naming the problem, no traceback."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert fragment in lines[0]
    assert "Traceback" not in proc.stderr


def assert_main_user_error(capsys, fragment: str, *args: str) -> None:
    """:func:`assert_user_error`'s contract through ``taskfold.cli.main.main`` in this process:
    for recipe mistakes, where a subprocess would spend seconds importing torch for each case
    (the exit code through the real command line is tested in test_user_errors)."""
    from taskfold.cli.main import main

    capsys.readouterr()
    assert main(list(args)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], lines
