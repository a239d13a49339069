"""Tests wait for events, not for time (STYLE.md): no ``sleep`` in tests/
except the documented exceptions below, each one a wait whose end no
event can signal.  Jobs use the fake clock (``ManualClock.wait_timer``),
component tests wait for events (``Recorder.wait``) or for the loop to be
idle (``settle``)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

#: (file, enclosing function) -> why a sleep is the only way there.
EXCEPTIONS = {
    ("component/test_job_helpers.py", "settle"):
        "yields (sleep(0)) one loop iteration at a time until nothing is runnable",
    ("support/daemon.py", "__init__"):
        "DaemonProcess polls for the subprocess's pidfile: no event crosses the process boundary",
    ("integration/test_lifecycle.py", "test_qsd_style_chardev_and_monitor"):
        "polls for the subprocess's pidfile, as DaemonProcess does",
    ("integration/test_lifecycle.py", "test_tcp_listener_and_daemonize"):
        "waits for a daemonized qmpd (not our child, so no wait()) to exit",
    ("support/faultfs.py", "__init__"):
        "polls for nbdfuse's pidfile (written once the FUSE mount serves): no event crosses the process boundary",
    ("support/nbd.py", "wait_listening"):
        "polls until another process (qmpd, qemu-storage-daemon) listens: no event crosses the boundary",
    ("support/nbd.py", "connect_monitor"):
        "polls until QEMU's one-client QMP chardev serves a new connection (it closes one that comes "
        "before it saw the previous client hang up): no event crosses the process boundary",
    ("transcripts/record.py", "main"):
        "the recorder polls for real QEMU's socket file (a tool, not a test)",
}


def _sleeps(path: Path) -> list[tuple[str, int]]:
    """:return: (enclosing function, line) of every ``sleep(...)`` call."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = func
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = child.name
            if isinstance(child, ast.Call):
                f = child.func
                if (isinstance(f, ast.Attribute) and f.attr == "sleep") or (
                        isinstance(f, ast.Name) and f.id == "sleep"):
                    found.append((func, child.lineno))
            visit(child, name)

    visit(tree, "<module>")
    return found


def test_no_sleep_for_synchronisation() -> None:
    problems = []
    used = set()
    for path in sorted(TESTS.rglob("*.py")):
        rel = path.relative_to(TESTS).as_posix()
        for func, line in _sleeps(path):
            if (rel, func) in EXCEPTIONS:
                used.add((rel, func))
            else:
                problems.append(f"tests/{rel}:{line} in {func}()")
    assert problems == []
    assert used == set(EXCEPTIONS), "an exception no longer needed: drop it"
