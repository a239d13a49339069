"""Replay golden transcripts recorded from QEMU 7.2 (tests/transcripts/record.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmpd.cli.qemu_argv import split_argv
from qmpd.server.plan import StartupPlan
from tests.support.daemon import AsyncRawClient, running_daemon, short_socket_dir
from tests.support.tls import make_certs
from tests.support.transcript import localize, normalize, parse

TRANSCRIPTS = sorted((Path(__file__).resolve().parents[1] / "transcripts").glob("*.qmp"))


@pytest.mark.asyncio
@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[p.stem for p in TRANSCRIPTS])
async def test_transcript(tmp_path: Path, path: Path) -> None:
    script = parse(path)
    if script.certs:
        make_certs(tmp_path)
    for name, size in script.files:
        with open(tmp_path / name, "wb") as f:
            f.truncate(size)
    test_dir = str(tmp_path)
    qemu, _ = split_argv([a.replace("TEST_DIR", test_dir) for a in script.args])
    plan = StartupPlan(blockdevs=qemu.blockdevs, drives=qemu.drives, devices=qemu.devices)
    with short_socket_dir(tmp_path) as sock_dir:
        async with running_daemon(sock_dir, plan=plan, prelaunch=qemu.prelaunch) as d:
            client = await AsyncRawClient.connect(d.path)
            try:
                for step in script.steps:
                    reply, events = await client.execute(localize(step.request, test_dir))
                    for ev in events:
                        ev.pop("timestamp")
                    got = [normalize(m, test_dir) for m in (*events, reply)]
                    assert got == step.expected, f"{path.name}:{step.line}"
            finally:
                await client.close()
