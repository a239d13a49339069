"""kill -9 at random moments: persistent raw bitmaps stay usable (issue 12).

Each cycle starts qmpd (forked from a pre-imported zygote, ``--daemonize``
so it is known to listen), checks that the bitmap came back persistent and
consistent, runs an incremental backup into the previous backup and
compares it with the disk byte for byte, then starts random writes from
three connections (``qemu-io`` through HMP) and an incremental backup into
the same target, and SIGKILLs the daemon after a random delay.

The number of cycles is ``QMPD_CRASH_CYCLES`` (default 1000); the time per
cycle is printed at the end (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import short_socket_dir

CYCLES = int(os.environ.get("QMPD_CRASH_CYCLES", "1000"))
SIZE = 8 << 20
CLUSTER = 64 << 10
ROOT = Path(__file__).resolve().parents[2]
#: Seconds spent per phase over all cycles (printed at the end).
PHASES: dict[str, float] = {}


class _Phase:
    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        PHASES[self.name] = PHASES.get(self.name, 0.0) + time.perf_counter() - self.t0


class Client:
    """A minimal asyncio QMP client: one command at a time, events kept."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, path: str) -> Client:
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 24)
        c = cls(reader, writer)
        await reader.readline()
        await c.cmd("qmp_capabilities")
        return c

    async def _msg(self) -> dict[str, Any]:
        line = await self.reader.readline()
        if not line:
            raise EOFError
        msg: dict[str, Any] = json.loads(line)
        return msg

    async def cmd(self, name: str, /, **args: Any) -> Any:
        req: dict[str, Any] = {"execute": name}
        if args:
            req["arguments"] = {k.replace("_", "-"): v for k, v in args.items()}
        self.writer.write(json.dumps(req).encode())
        while True:
            msg = await self._msg()
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                raise RuntimeError(f"{name}: {msg['error']}")
            return msg["return"]

    async def event(self, name: str) -> dict[str, Any]:
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] == name:
                    return self.events.pop(i)
            self.events.append(await self._msg())

    def close(self) -> None:
        self.writer.close()


class Zygote:
    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.zygote"], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, *req: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(list(req)) + "\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return reply

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


def _differing_clusters(a: Path, b: Path) -> list[int]:
    da, db = a.read_bytes(), b.read_bytes()
    assert len(da) == len(db) == SIZE
    if da == db:
        return []
    return [off for off in range(0, SIZE, CLUSTER) if da[off:off + CLUSTER] != db[off:off + CLUSTER]]


async def _writer(c: Client, rng: random.Random) -> None:
    while True:
        off = rng.randrange(0, SIZE // 512) * 512
        length = min(SIZE - off, rng.choice((512, 4096, 65536, 200 * 1024)))
        await c.cmd("human-monitor-command",
                    command_line=f'qemu-io d0 "write -P {rng.randrange(256)} {off} {length}"')


async def _backup(c: Client, job: str) -> None:
    await c.cmd("blockdev-backup", device="d0", target="t0", sync="incremental", bitmap="b0", job_id=job)
    await c.event("BLOCK_JOB_COMPLETED")


async def _cycle(zyg: Zygote, argv: list[str], pidfile: str, sock: str, disk: Path, target: Path,
                 rng: random.Random, first: bool, n: int) -> None:
    with _Phase("start"):
        reply = zyg.ask("spawn", argv, pidfile)
        assert "pid" in reply, reply
        pid = reply["pid"]
        c = await Client.connect(sock)
    with _Phase("check+backup"):
        await _check_and_backup(c, first, n)
    with _Phase("compare"):
        assert _differing_clusters(disk, target) == [], f"cycle {n}: missed clusters"
    with _Phase("chaos+kill"):
        await _chaos(c, sock, rng, n, lambda: zyg.ask("kill", pid))


async def _check_and_backup(c: Client, first: bool, n: int) -> None:
    if first:
        await c.cmd("transaction", actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "b0", "persistent": True}},
            {"type": "blockdev-backup", "data": {"device": "d0", "target": "t0", "sync": "full",
                                                  "job-id": "full"}}])
        await c.event("BLOCK_JOB_COMPLETED")
    else:
        nodes = await c.cmd("query-named-block-nodes")
        bms = next(n["dirty-bitmaps"] for n in nodes if n["node-name"] == "d0")
        assert [(b["name"], b["persistent"], b["recording"], b.get("inconsistent", False))
                for b in bms] == [("b0", True, True, False)], (n, bms)
        await _backup(c, f"inc{n}")


async def _chaos(c: Client, sock: str, rng: random.Random, n: int,
                 kill: Callable[[], dict[str, Any]]) -> None:
    writers = [c] + [await Client.connect(sock) for _ in range(2)]
    tasks = [asyncio.ensure_future(_writer(w, random.Random(rng.random()))) for w in writers[1:]]
    if rng.random() < 0.5:
        tasks.append(asyncio.ensure_future(_backup(writers[0], f"chaos{n}")))
    else:
        tasks.append(asyncio.ensure_future(_writer(writers[0], random.Random(rng.random()))))
    await asyncio.wait(tasks, timeout=rng.uniform(0.0, 0.06))
    assert kill()["status"] == -9  # while the requests are still coming
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for w in writers:
        w.close()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_kill9_during_writes_and_backups(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("QMPD_CRASH_SEED", "12")))
    disk, target, state = tmp_path / "disk.img", tmp_path / "backup.img", tmp_path / "state"
    for p in (disk, target):
        with open(p, "wb") as f:
            f.truncate(SIZE)
    with short_socket_dir(tmp_path) as sock_dir:
        sock = str(sock_dir / "q.sock")
        argv = ["--socket", sock, "--state-dir", str(state), "--state-flush-interval", "0.01",
                "--blockdev", json.dumps({"driver": "raw", "node-name": "d0",
                                          "file": {"driver": "file", "filename": str(disk)}}),
                "--blockdev", json.dumps({"driver": "raw", "node-name": "t0",
                                          "file": {"driver": "file", "filename": str(target)}})]
        zyg = Zygote()
        try:
            t0 = time.perf_counter()
            for n in range(CYCLES):
                asyncio.run(_cycle(zyg, argv, str(tmp_path / "pid"), sock, disk, target, rng, n == 0, n))
            # A last start: the chain is still complete after the last kill.
            asyncio.run(_cycle(zyg, argv, str(tmp_path / "pid"), sock, disk, target, rng, False, CYCLES))
            per = (time.perf_counter() - t0) / (CYCLES + 1)
            print(f"\n{CYCLES} kill -9 cycles, {per * 1000:.1f} ms per cycle: "
                  + ", ".join(f"{k} {v * 1000 / (CYCLES + 1):.1f} ms" for k, v in PHASES.items()))
        finally:
            zyg.close()
