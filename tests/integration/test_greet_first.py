"""Greeting first, loading after (issue 7, start-up).

When the command line builds nothing before it listens, the daemon opens
its sockets, greets, and only then imports its command handlers, schema and
block layer (:meth:`qmpd.server.daemon.Daemon.load`).  What must hold:

- before loading begins, a fresh interpreter running the command line has
  imported none of the heavy parts (for the QSD-style, the QEMU-style and
  the plain argv);
- a command that arrives while loading is under way waits for it and gets
  exactly the answer a loaded daemon gives; what the session answers by
  itself (commands before ``qmp_capabilities``, framing errors) is answered
  without waiting;
- the greeting and every reply are byte-identical to those of a daemon that
  loaded everything before listening.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qmpd.commands.context import DaemonConfig
from qmpd.protocol.framing import encode
from qmpd.server.daemon import Daemon
from qmpd.server.limits import Limits
from qmpd.server.listeners import UnixListener
from tests.support.daemon import short_socket_dir
from tests.support.nbd import wait_listening

#: Modules that a daemon about to load must not have imported yet.
HEAVY = ("qmpd.commands.handlers", "qmpd.commands.backup", "qmpd.block.graph", "qmpd.block.io",
         "qmpd.block.drivers", "qmpd.jobs", "qmpd.machine.machine", "qmpd.nbd.server",
         "qmpd.qapi.schema", "qmpd.qapi.service", "qmpd.qapi.models", "pydantic", "jsonschema",
         "ctypes", "uuid")

#: Runs the real command line with ``Daemon.load`` replaced by a probe that
#: prints which heavy modules are imported at the moment loading would start.
_PROBE = """
import json, os, sys
import qmpd.server.daemon as d
async def probe(self, greet_first=0.0):
    print(json.dumps(sorted(m for m in sys.argv[1].split(',') if m in sys.modules)), flush=True)
    os._exit(0)
d.Daemon.load = probe
import qmpd.cli.main as m
sys.exit(m.main(sys.argv[2:]))
"""


@pytest.fixture
def sock_dir(tmp_path: Path):  # type: ignore[no-untyped-def]
    with short_socket_dir(tmp_path) as d:
        yield d


@pytest.mark.parametrize("style", ["plain", "qsd", "qemu"])
def test_nothing_heavy_is_imported_before_loading(sock_dir: Path, style: str) -> None:
    sock = str(sock_dir / "q.sock")
    argv = {
        "plain": ["--socket", sock],
        "qsd": ["--chardev", f"socket,id=m0,path={sock},server=on,wait=off", "--monitor", "chardev=m0"],
        "qemu": ["-machine", "none", "-nodefaults", "-display", "none",
                 "-qmp", f"unix:{sock},server=on,wait=off"],
    }[style]
    out = subprocess.run([sys.executable, "-c", _PROBE, ",".join(HEAVY), *argv],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


async def _readline(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readline(), 30)


@pytest.mark.asyncio
async def test_commands_wait_for_loading_and_get_the_loaded_answers(sock_dir: Path) -> None:
    config = DaemonConfig(qemu_version=(9, 0, 0), package="qmpd-test")
    reference = Daemon(config, [])
    reference.setup()
    path = str(sock_dir / "qmpd.sock")
    daemon = Daemon(config, [UnixListener(path)])
    await daemon.start()                   # listening, nothing loaded
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        assert await _readline(reader) == encode(reference.greeting)
        assert not daemon.loaded
        # Answered by the session itself, at once, while nothing is loaded.
        writer.write(b'{"execute": "query-status", "id": 1}')
        assert await _readline(reader) == (
            b'{"id": 1, "error": {"class": "CommandNotFound", '
            b'"desc": "Expecting capabilities negotiation with \'qmp_capabilities\'"}}\r\n')
        writer.write(b'{"execute": "qmp_capabilities"}{"execute": "query-status"}'
                     b'{"execute": "query-qmp-schema"}{"execute": "query-commands"}'
                     b'{"execute": "query-block"}{"execute": "no-such-command"}')
        first = asyncio.ensure_future(_readline(reader))
        # Meanwhile the daemon greets and answers a second client (what
        # the session answers by itself) ...
        reader2, writer2 = await asyncio.open_unix_connection(path)
        assert await _readline(reader2) == encode(reference.greeting)
        writer2.write(b'{"execute": "query-status", "id": 2}')
        assert (await _readline(reader2)).startswith(b'{"id": 2, "error": {"class": "CommandNotFound"')
        writer2.close()
        # ... but the first client's commands wait until loading is done.
        assert not first.done() and not daemon.loaded
        load = daemon.spawn(daemon.load(), "load")
        assert await first == b'{"return": {}}\r\n'
        assert daemon.loaded
        replies = [json.loads(await _readline(reader)) for _ in range(5)]
        await load
        assert replies[0] == {"return": {"status": "running", "running": True}}
        assert replies[1] == {"return": reference.state.introspection}
        assert replies[2] == {"return": [{"name": n} for n in reference.state.command_names]}
        assert replies[3] == {"return": []}
        assert replies[4] == {"error": {"class": "CommandNotFound",
                                        "desc": "The command no-such-command has not been found"}}
        writer.close()
    finally:
        if not daemon.stopping:
            await daemon.request_shutdown("host-qmp-quit")
        await daemon.cleanup()
        await reference.cleanup()


@pytest.mark.asyncio
async def test_loading_does_not_count_toward_the_negotiation_timeout(sock_dir: Path) -> None:
    """``--negotiation-timeout`` is the client's time: a client whose
    ``qmp_capabilities`` waits for the loading daemon is not dropped."""
    path = str(sock_dir / "qmpd.sock")
    daemon = Daemon(DaemonConfig(), [UnixListener(path)], limits=Limits(negotiation_timeout=0.02))
    await daemon.start()
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        assert (await _readline(reader)).startswith(b'{"QMP"')
        writer.write(b'{"execute": "qmp_capabilities"}')
        later = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.1, later.set_result, None)
        await later                        # five timeouts pass while nothing is loaded
        assert daemon.connection_count == 1
        await daemon.spawn(daemon.load(), "load")
        assert await _readline(reader) == b'{"return": {}}\r\n'
        writer.close()
    finally:
        await daemon.request_shutdown("host-qmp-quit")
        await daemon.cleanup()


def _connect(path: str, proc: subprocess.Popen[bytes]) -> socket.socket:
    wait_listening(path, proc)
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    return s


_REQUESTS = (b'{"execute": "qmp_capabilities", "id": "a"}{"execute": "query-version", "id": "b"}'
             b'{"execute": "query-commands", "id": "c"}{"execute": "query-qmp-schema", "id": "d"}'
             b'{"execute": "query-block", "id": "e"}{"execute": "query-status", "id": "f"}')


def _session(sock: socket.socket) -> list[bytes]:
    f = sock.makefile("rb")
    lines = [f.readline()]
    sock.sendall(_REQUESTS)
    lines += [f.readline() for _ in range(6)]
    return lines


@pytest.mark.parametrize("argv", [[], ["--blockdev", "driver=null-co,node-name=n0"]],
                         ids=["greet-first", "load-first"])
def test_replies_right_after_the_greeting_are_the_loaded_ones(sock_dir: Path, argv: list[str]) -> None:
    """The first client talks while the daemon may still be loading; a
    second one after everything is loaded: byte-identical transcripts (and
    the greeting is the one of a daemon that loaded before listening)."""
    path = str(sock_dir / "q.sock")
    proc = subprocess.Popen([sys.executable, "-m", "qmpd", "--socket", path, *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    try:
        first = _session(_connect(path, proc))
        second = _session(_connect(path, proc))
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else b""
    assert first == second
    assert first[0] == (b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 9}, '
                        b'"package": "qmpd-0.1.0"}, "capabilities": ["oob"]}}\r\n')
    assert [json.loads(line).get("id") for line in first[1:]] == ["a", "b", "c", "d", "e", "f"]
