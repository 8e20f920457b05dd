"""Run the real `lorahub` CLI in-process (fast: no new interpreter, torch already imported).

`run_cli(...)` returns an object shaped like `subprocess.CompletedProcess` (returncode, stdout,
stderr). An exception that escapes the CLI is rendered into stderr as a traceback, so tests that
assert "no traceback" still catch it. Tests that need a separate process (kill -9, environment
read at import time) use `run_cli_subprocess`.
"""
from __future__ import annotations

import os
import subprocess
import sys
import traceback
from dataclasses import dataclass

from click.testing import CliRunner


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args, check: bool = False, env: dict | None = None) -> CliResult:
    from lorahub.cli import cli

    runner = CliRunner()
    result = runner.invoke(cli, [str(a) for a in args], env=env, catch_exceptions=True)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    out = CliResult(result.exit_code, result.stdout, stderr)
    if check:
        assert out.returncode == 0, out.stderr + out.stdout
    return out


def run_cli_subprocess(*args, check: bool = False, env: dict | None = None,
                       timeout: float | None = 600) -> subprocess.CompletedProcess:
    full_env = None if env is None else {**os.environ, **env}
    result = subprocess.run([sys.executable, "-m", "lorahub.cli", *map(str, args)], capture_output=True,
                            text=True, env=full_env, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr + result.stdout
    return result
