"""Artifacts of the web tests (the browser's screenshot), listed after the run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ARTIFACTS: list[Path] = []


@pytest.fixture
def artifact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``$QMPD_ARTIFACTS`` if set, else a directory under pytest's base temp."""
    where = os.environ.get("QMPD_ARTIFACTS")
    path = Path(where) if where else tmp_path_factory.mktemp("artifacts", numbered=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for path in ARTIFACTS:
        terminalreporter.write_line(f"web test artifact: {path}")
