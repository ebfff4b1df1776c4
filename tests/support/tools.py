"""Command-line tools the tests run: any program to completion, and Prometheus's promtool."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support import SupportError
from tests.support.stack import ROOT

PROMTOOL = ROOT / "deploy" / "local" / "promtool"


def run_tool(*cmd: str | Path, stdin: str | None = None, timeout: float = 120) -> str:
    """Run a command; fail with its output when it exits non-zero. Its stdout and stderr."""
    proc = subprocess.run(
        [str(c) for c in cmd],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise SupportError(
            f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    return proc.stdout + proc.stderr


def promtool(*args: str | Path, stdin: str | None = None) -> str:
    """deploy/local/promtool fetches promtool from Debian's package on first use."""
    return run_tool(PROMTOOL, *args, stdin=stdin, timeout=300)
