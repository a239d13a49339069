"""No global stalls (issue 7, item 5): FIFOs and devices are refused, long
qemu-io I/O does not block other clients, SIGTERM ends qmpd whatever I/O
is stuck."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from tests.support.daemon import AsyncRawClient, DaemonProcess, RawClient, RunningDaemon
from tests.support.faultfs import FaultyFile


def _ge(desc: str) -> dict[str, object]:
    return {"error": {"class": "GenericError", "desc": desc}}


@pytest.mark.asyncio
async def test_fifo_and_char_device_are_refused_with_qemus_text(qmpd: RunningDaemon, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    client = await AsyncRawClient.connect(qmpd.path)
    for path, ro in ((str(fifo), True), (str(fifo), False), ("/dev/null", True), ("/dev/null", False)):
        reply, _ = await client.execute({"execute": "blockdev-add", "arguments": {
            "driver": "file", "node-name": "f", "filename": path, "read-only": ro}})
        # QEMU 7.2 text for /dev/null; on a FIFO QEMU hangs in open(2).
        assert reply == _ge(f"'file' driver requires '{path}' to be a regular file")
    reply, _ = await client.execute({"execute": "query-status"})
    assert reply["return"]["status"] == "running"
    await client.close()


@pytest.mark.asyncio
async def test_slow_qemu_io_does_not_block_other_clients(qmpd: RunningDaemon, tmp_path: Path) -> None:
    with FaultyFile(tmp_path, 1 << 20, delay_reads=2) as slow:
        io_client = await AsyncRawClient.connect(qmpd.path)
        witness = await AsyncRawClient.connect(qmpd.path)
        reply, _ = await io_client.execute({"execute": "blockdev-add", "arguments": {
            "driver": "file", "node-name": "slow", "filename": slow.path}})
        assert reply == {"return": {}}
        pending = asyncio.ensure_future(io_client.execute({"execute": "human-monitor-command", "arguments": {
            "command-line": 'qemu-io slow "read 0 64k"'}, "id": "io"}))
        # The witness's block-free commands are answered while the read sleeps.
        for i in range(3):
            reply, _ = await witness.execute({"execute": "query-status", "id": i})
            assert reply["id"] == i
        assert not pending.done()
        # A command that touches block state waits for the qemu-io command.
        reply, _ = await witness.execute({"execute": "query-named-block-nodes", "id": "q"})
        assert pending.done() and (await pending)[0] == {"return": "", "id": "io"}
        assert reply["return"][0]["node-name"] == "slow"
        reply, _ = await io_client.execute({"execute": "blockdev-del", "arguments": {"node-name": "slow"}})
        assert reply == {"return": {}}
        await io_client.close()
        await witness.close()


def _threads_in_read(pid: int) -> int:
    """Threads of ``pid`` blocked in pread64/preadv (x86-64 syscalls 17, 295)."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                nr = f.read().split()[0]
        except (OSError, IndexError):
            continue
        n += nr in ("17", "295")
    return n


@pytest.mark.slow
def test_sigterm_exits_promptly_with_a_stuck_read(sock_dir: Path, tmp_path: Path) -> None:
    with FaultyFile(tmp_path, 1 << 20, delay_reads=60) as stuck:
        proc = DaemonProcess(sock_dir, "--blockdev", f"driver=file,node-name=stuck,filename={stuck.path}")
        try:
            client = RawClient(proc.path)
            client.send(b'{"execute": "human-monitor-command", "arguments": '
                        b'{"command-line": "qemu-io stuck \\"read 0 4k\\""}}')
            for _ in range(2000):  # until a worker thread sits in the FUSE read
                if _threads_in_read(proc.proc.pid):
                    break
                os.sched_yield()
                client.sock.settimeout(0.005)
                try:
                    client.sock.recv(1, 0x2)  # MSG_PEEK: nothing is expected
                except TimeoutError:
                    pass
            assert _threads_in_read(proc.proc.pid)
            proc.proc.send_signal(signal.SIGTERM)
            # The read sleeps 60 s; qmpd must not wait for it.
            assert proc.proc.wait(15) == 0
            assert not os.path.exists(proc.path)
            client.close()
        finally:
            proc.stop()
