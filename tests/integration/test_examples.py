"""The examples run against a live daemon and print what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.daemon import DaemonProcess

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_hello(qmpd_proc: DaemonProcess) -> None:
    out = subprocess.run([sys.executable, str(EXAMPLES / "hello.py"), qmpd_proc.path],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "QEMU 9.0.0 (qmpd-0.1.0)"
    assert "query-version" in lines[1:] and "qmp_capabilities" in lines[1:]
    assert lines[1:] == sorted(lines[1:])
