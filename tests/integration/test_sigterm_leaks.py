"""After a SIGTERM under load, nothing of the daemon is left (issue 8 part 4).

Load: four QMP clients issuing commands, a speed-limited backup, an NBD
client reading an export, ``qemu-io`` writes through HMP and a dashboard
WebSocket.  Then a real SIGTERM.

* In-process: the daemon runs in the test's loop with the CLI's signal
  handler; after its clean-up the threads (the I/O pool's are joined), the
  asyncio tasks and the file descriptors are exactly those of before.
* Subprocess: ``python -m qmpd`` exits with status 0, and afterwards no
  process holds the images open (a scan of ``/proc/*/fd``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from qmpd.commands.context import DaemonConfig
from qmpd.server.daemon import Daemon
from qmpd.server.listeners import UnixListener
from qmpd.web import WebServer, create_token_file
from tests.support.daemon import AsyncRawClient

MiB = 1 << 20
SIZE = 64 * MiB
#: Seconds the subprocess may take to exit after SIGTERM.
EXIT_BOUND = 10.0

NBD_READER = """
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("connected", flush=True)
while True:
    for off in range(0, h.get_size(), 1 << 20):
        h.pread(1 << 20, off)
"""


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _holders(paths: list[Path]) -> list[str]:
    """``pid -> path`` for every process with one of ``paths`` open."""
    wanted = {str(p.resolve()) for p in paths}
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                        found.append(f"{pid} -> {os.readlink(f'/proc/{pid}/fd/{fd}')}")
    return found


def _images(tmp: Path) -> tuple[Path, Path, Path]:
    src, dst, scratch = tmp / "src.img", tmp / "dst.img", tmp / "scratch.img"
    for p in (src, dst, scratch):
        with open(p, "wb") as f:
            f.truncate(SIZE)
    with open(src, "r+b") as f:
        f.write(os.urandom(4 * MiB))
    return src, dst, scratch


def _setup_commands(src: Path, dst: Path, scratch: Path, nbd_sock: Path) -> list[dict[str, Any]]:
    def raw(name: str, path: Path) -> dict[str, Any]:
        return {"execute": "blockdev-add", "arguments": {
            "driver": "raw", "node-name": name, "file": {"driver": "file", "filename": str(path)}}}
    return [
        raw("src", src), raw("dst", dst), raw("scratch", scratch),
        {"execute": "blockdev-backup", "arguments": {
            "job-id": "j", "device": "src", "target": "dst", "sync": "full", "speed": 1 * MiB}},
        {"execute": "nbd-server-start", "arguments": {
            "addr": {"type": "unix", "data": {"path": str(nbd_sock)}}}},
        {"execute": "block-export-add", "arguments": {
            "type": "nbd", "id": "e", "node-name": "src", "name": "src"}},
    ]


async def _ok(client: AsyncRawClient, request: dict[str, Any]) -> Any:
    reply, _ = await client.execute(request)
    assert "return" in reply, (request, reply)
    return reply["return"]


async def _until_closed(step: Callable[[], Awaitable[object]], started: asyncio.Event | None = None) -> int:
    """Run ``step`` until the daemon closes the connection (``started`` is
    set after the first one); :return: steps."""
    n = 0
    try:
        while True:
            await step()
            n += 1
            if started is not None:
                started.set()
    except (EOFError, ConnectionError, json.JSONDecodeError, asyncio.IncompleteReadError):
        return n


async def _qmp_load(path: str, command: str, started: asyncio.Event) -> int:
    client = await AsyncRawClient.connect(path)
    try:
        return await _until_closed(lambda: client.execute({"execute": command}), started)
    finally:
        await client.close()


async def _hmp_load(path: str, started: asyncio.Event) -> int:
    client = await AsyncRawClient.connect(path)
    line = {"execute": "human-monitor-command",
            "arguments": {"command-line": "qemu-io scratch \"write -P 0x5a 0 1M\""}}
    try:
        return await _until_closed(lambda: client.execute(line), started)
    finally:
        await client.close()


async def _dashboard_load(url: str, first: asyncio.Event) -> int:
    n = 0
    async with aiohttp.ClientSession() as session, session.ws_connect(url + "live") as ws:
        async for _msg in ws:
            n += 1
            first.set()
    return n


async def _nbd_reader(uri: str) -> subprocess.Popen[bytes]:
    """A libnbd client reading the export in a loop, once connected.

    A plain Popen and a pipe read by the loop: asyncio's own subprocess
    support would add a child-watcher thread to the thread count.
    """
    rfd, wfd = os.pipe()
    proc = subprocess.Popen(["/usr/bin/python3", "-c", NBD_READER, uri],  # python3-libnbd: a Debian package
                            stdout=wfd, stderr=subprocess.DEVNULL)
    os.close(wfd)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                os.fdopen(rfd, "rb", 0))
    try:
        assert await asyncio.wait_for(reader.readline(), 20) == b"connected\n"
    finally:
        transport.close()
    return proc


@pytest.mark.asyncio
async def test_in_process_sigterm_leaves_no_thread_task_or_fd(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    src, dst, scratch = _images(tmp_path)
    path, nbd_sock = str(tmp_path / "q.sock"), tmp_path / "nbd.sock"
    loop = asyncio.get_running_loop()
    threads_before = set(threading.enumerate())
    tasks_before = asyncio.all_tasks()
    fds_before = _fds()

    # --state-dir with a short flush interval: the lazy bitmap stores run too.
    config = DaemonConfig(qemu_version=(9, 0, 0), package="qmpd-test", state_dir=str(tmp_path / "state"),
                          state_flush_interval=0.01)
    daemon = Daemon(config, [UnixListener(path)])
    daemon.setup()
    await daemon.start()
    web_server = WebServer(daemon, "127.0.0.1", 0, create_token_file(str(tmp_path / "token")))
    await web_server.start()
    loop.add_signal_handler(signal.SIGTERM,
                            lambda: daemon.spawn(daemon.request_shutdown("host-signal"), "signal"))
    try:
        control = await AsyncRawClient.connect(path)
        for request in _setup_commands(src, dst, scratch, nbd_sock):
            await _ok(control, request)
        await _ok(control, {"execute": "block-dirty-bitmap-add", "arguments": {
            "node": "scratch", "name": "b", "persistent": True}})
        reader = await _nbd_reader(f"nbd+unix:///src?socket={nbd_sock}")
        seen = [asyncio.Event() for _ in range(5)]
        load = [asyncio.ensure_future(c) for c in (
            _qmp_load(path, "query-block", seen[0]), _qmp_load(path, "query-jobs", seen[1]),
            _qmp_load(path, "query-named-block-nodes", seen[2]), _hmp_load(path, seen[3]),
            _dashboard_load(web_server.url, seen[4]))]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in seen)), 20)   # every client is busy
        # The backup is still running (1 MiB/s over 64 MiB) when the signal comes.
        jobs = await _ok(control, {"execute": "query-jobs"})
        assert [(j["id"], j["status"]) for j in jobs] == [("j", "running")]
        busy_threads = daemon.pool.threads
        assert busy_threads >= 1

        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(daemon.wait_stopped(), 10)
        await web_server.stop()
        await daemon.cleanup()
        # Right after clean-up: the I/O workers were joined, no task is left.
        assert (daemon.pool.threads, len(daemon.tasks)) == (0, 0)
        assert asyncio.all_tasks() - tasks_before - set(load) == set()
        counts = await asyncio.wait_for(asyncio.gather(*load), 20)
        assert all(n >= 1 for n in counts), counts
        await _until_closed(lambda: control.execute({"execute": "query-status"}))
        await control.close()
        assert reader.wait(20) != 0   # the server went away: the client failed
    finally:
        loop.remove_signal_handler(signal.SIGTERM)

    assert asyncio.all_tasks() - tasks_before == set()
    # Nothing was stuck, failed or cancelled noisily on the way down.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert set(threading.enumerate()) == threads_before
    assert _fds() == fds_before, sorted(_fds() - fds_before)
    assert not os.path.exists(path) and not nbd_sock.exists()
    assert _holders([src, dst, scratch]) == []


@pytest.mark.slow
def test_subprocess_sigterm_exits_zero_and_releases_the_images(tmp_path: Path) -> None:
    src, dst, scratch = _images(tmp_path)
    path, nbd_sock, pidfile = tmp_path / "q.sock", tmp_path / "nbd.sock", tmp_path / "q.pid"
    proc = subprocess.Popen([sys.executable, "-m", "qmpd", "--socket", str(path), "--pidfile", str(pidfile),
                             "--http", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        asyncio.run(_subprocess_load(proc, pidfile, path, nbd_sock, src, dst, scratch))
        assert proc.wait(EXIT_BOUND) == 0
        assert proc.stderr is not None
        assert proc.stderr.read() == b""   # no warning, error or traceback on the way down
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not path.exists() and not nbd_sock.exists() and not pidfile.exists()
    assert _holders([src, dst, scratch]) == []


async def _subprocess_load(proc: subprocess.Popen[bytes], pidfile: Path, path: Path, nbd_sock: Path,
                           src: Path, dst: Path, scratch: Path) -> None:
    assert proc.stderr is not None
    line = await asyncio.to_thread(proc.stderr.readline)   # "qmpd: dashboard at URL (..."
    assert b"dashboard at " in line, line
    url = line.split(b"dashboard at ")[1].split()[0].decode()
    # The dashboard starts after the QMP listener, and the signal handlers before both.
    control = await AsyncRawClient.connect(str(path))
    for request in _setup_commands(src, dst, scratch, nbd_sock):
        await _ok(control, request)
    reader = await _nbd_reader(f"nbd+unix:///src?socket={nbd_sock}")
    seen = [asyncio.Event() for _ in range(5)]
    load = [asyncio.ensure_future(c) for c in (
        _qmp_load(str(path), "query-block", seen[0]), _qmp_load(str(path), "query-jobs", seen[1]),
        _qmp_load(str(path), "query-named-block-nodes", seen[2]), _hmp_load(str(path), seen[3]),
        _dashboard_load(url, seen[4]))]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in seen)), 20)   # every client is busy
    jobs = await _ok(control, {"execute": "query-jobs"})
    assert [(j["id"], j["status"]) for j in jobs] == [("j", "running")]
    proc.send_signal(signal.SIGTERM)
    counts = await asyncio.wait_for(asyncio.gather(*load), EXIT_BOUND)
    assert all(n >= 1 for n in counts), counts
    await control.close()
    assert reader.wait(EXIT_BOUND) != 0
