"""Fixtures shared by every test tier."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.support.daemon import DaemonProcess, RawClient, RunningDaemon, running_daemon, short_socket_dir


@pytest.fixture
def sock_dir(tmp_path: Path) -> Iterator[Path]:
    with short_socket_dir(tmp_path) as d:
        yield d


@pytest_asyncio.fixture
async def qmpd(sock_dir: Path) -> AsyncIterator[RunningDaemon]:
    """An in-process daemon on a UNIX socket, in the test's event loop."""
    async with running_daemon(sock_dir) as running:
        yield running


@pytest.fixture
def qmpd_proc(sock_dir: Path) -> Iterator[DaemonProcess]:
    """A daemon in a subprocess (for synchronous clients)."""
    proc = DaemonProcess(sock_dir)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def raw(qmpd_proc: DaemonProcess) -> Iterator[RawClient]:
    """A negotiated raw client on a subprocess daemon."""
    client = RawClient(qmpd_proc.path)
    try:
        yield client
    finally:
        client.close()
