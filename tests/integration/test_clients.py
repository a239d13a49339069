"""Real clients against qmpd: qemu.qmp's QMPClient, its legacy sync API, qmp-shell."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.support.daemon import DaemonProcess, RunningDaemon

QMP_SHELL = str(Path(sys.executable).with_name("qmp-shell"))


@pytest.mark.asyncio
async def test_qmpclient_basics(qmpd: RunningDaemon) -> None:
    qmp = QMPClient("test")
    await qmp.connect(qmpd.path)
    try:
        assert qmp.greeting is not None
        assert qmp.greeting.QMP.capabilities == ["oob"]
        version = await qmp.execute("query-version")
        assert version == {"qemu": {"micro": 0, "minor": 0, "major": 9}, "package": "qmpd-test"}
        names = {c["name"] for c in await qmp.execute("query-commands")}
        assert {"qmp_capabilities", "query-version", "query-commands", "query-qmp-schema",
                "query-status", "query-name", "human-monitor-command", "quit"} <= names
        assert await qmp.execute("query-status") == {"status": "running", "running": True}
        assert await qmp.execute("query-name") == {}
        with pytest.raises(ExecuteError) as info:
            await qmp.execute("query-name", {"bogus": 1})
        assert info.value.error_class == "GenericError"
        assert info.value.error.error.desc == "Parameter 'bogus' is unexpected"
        with pytest.raises(ExecuteError) as info:
            await qmp.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
    finally:
        await qmp.disconnect()


@pytest.mark.asyncio
async def test_qmpclient_many_in_flight(qmpd: RunningDaemon) -> None:
    """Pipelined requests all come back, each under its own id: every
    request has its own answer (an error naming its node, or a success), so
    a reply routed to the wrong request shows."""
    qmp = QMPClient("pipeline")
    await qmp.connect(qmpd.path)

    async def one(i: int) -> Any:
        if i % 3 == 0:
            return await qmp.execute("query-status")
        try:
            await qmp.execute("blockdev-del", {"node-name": f"node{i}"})
        except ExecuteError as err:
            return err.error.error.desc
        raise AssertionError("blockdev-del of a missing node succeeded")

    try:
        results = await asyncio.gather(*(one(i) for i in range(200)))
        assert results == [{"status": "running", "running": True} if i % 3 == 0
                           else f"Failed to find node with node-name='node{i}'" for i in range(200)]
    finally:
        await qmp.disconnect()


@pytest.mark.asyncio
async def test_query_qmp_schema_lists_exactly_the_commands(qmpd: RunningDaemon) -> None:
    qmp = QMPClient("schema")
    await qmp.connect(qmpd.path)
    try:
        schema = await qmp.execute("query-qmp-schema")
        commands = {c["name"] for c in await qmp.execute("query-commands")}
        assert {e["name"] for e in schema if e["meta-type"] == "command"} == commands
        by_name = {e["name"]: e for e in schema}
        # every referenced type is present
        for entry in schema:
            for key in ("arg-type", "ret-type", "element-type"):
                if key in entry:
                    assert entry[key] in by_name, (entry["name"], key)
        assert by_name["int"] == {"name": "int", "meta-type": "builtin", "json-type": "int"}
    finally:
        await qmp.disconnect()


def test_legacy_sync_client(qmpd_proc: DaemonProcess) -> None:
    mon = QEMUMonitorProtocol(qmpd_proc.path)
    greeting = mon.connect()
    try:
        assert greeting["QMP"]["version"]["qemu"] == {"micro": 0, "minor": 0, "major": 9}
        assert mon.cmd("query-name") == {}
        # cmd_obj sends no id; the reply must have none either
        assert mon.cmd_obj({"execute": "query-status"}) == {"return": {"status": "running", "running": True}}
        assert mon.cmd_obj({"execute": "nosuch"}) == {
            "error": {"class": "CommandNotFound", "desc": "The command nosuch has not been found"}
        }
        assert mon.cmd_obj({"execute": "human-monitor-command",
                            "arguments": {"command-line": "info version"}}) == {"return": "9.0.0qmpd-0.1.0\r\n"}
    finally:
        mon.close()


def _shell(path: str, stdin: str, *flags: str) -> str:
    env = dict(os.environ, HOME=str(Path(path).parent))
    out = subprocess.run([QMP_SHELL, *flags, path], input=stdin, capture_output=True, text=True,
                         timeout=30, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_qmp_shell(qmpd_proc: DaemonProcess) -> None:
    out = _shell(qmpd_proc.path, "query-name\nquery-status\nnosuch\nquery-name bogus=1\n"
                 "transaction( abort )\n")
    assert out.splitlines() == [
        "Welcome to the QMP low-level shell!",
        "Connected to QEMU 9.0.0",
        "",
        '(QEMU) {"return": {}}',
        '(QEMU) {"return": {"status": "running", "running": true}}',
        '(QEMU) {"error": {"class": "CommandNotFound", "desc": "The command nosuch has not been found"}}',
        '(QEMU) {"error": {"class": "GenericError", "desc": "Parameter \'bogus\' is unexpected"}}',
        '(QEMU) {"error": {"class": "GenericError", "desc": "Transaction aborted using Abort action"}}',
        "(QEMU) ",
    ]


def test_qmp_shell_hmp_mode(qmpd_proc: DaemonProcess) -> None:
    out = _shell(qmpd_proc.path, "info version\ninfo status\nhelp quit\nfoo\n", "-H")
    assert out.splitlines() == [
        "Welcome to the HMP shell!",
        "Connected to QEMU 9.0.0",
        "",
        # qmp-shell prints HMP output with end=" ", so the next prompt
        # follows a space.
        "(QEMU) 9.0.0qmpd-0.1.0",
        " (QEMU) VM status: running",
        " (QEMU) quit|q  -- quit the emulator",
        " (QEMU) unknown command: 'foo'",
        " (QEMU) ",
    ]
