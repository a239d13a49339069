"""``-mon chardev=ID,mode=control,pretty=on``: QEMU 7.2's multi-line JSON,
byte for byte, on that monitor only (tests/transcripts/pretty_monitor.json,
recorded by tests/transcripts/record_pretty.py)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

from tests.support.daemon import short_socket_dir
from tests.support.pretty import exchange_on

GOLDEN = json.loads((Path(__file__).resolve().parents[1] / "transcripts" / "pretty_monitor.json").read_text())
_VERSION = re.compile(r'"micro": \d+,(\r\n +)"minor": \d+,(\r\n +)"major": \d+(\r\n +\},\r\n +)"package": "[^"]*"')
_STAMP = re.compile(r'"seconds": \d+,(\r\n +)"microseconds": \d+')


def _normalize(text: str) -> str:
    """Version numbers and timestamps are the only values that may differ."""
    text = _VERSION.sub(r'"micro": M,\1"minor": N,\2"major": J\3"package": "P"', text)
    return _STAMP.sub(r'"seconds": S,\1"microseconds": U', text)


def test_pretty_monitor_as_qemu(tmp_path: Path) -> None:
    with short_socket_dir(tmp_path) as sock_dir:
        pretty_path, compact_path = str(sock_dir / "pretty.sock"), str(sock_dir / "compact.sock")
        # client mode for the pretty monitor: qmpd connects, so no waiting for a file
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(pretty_path)
        listener.listen(1)
        listener.settimeout(30)
        proc = subprocess.Popen(
            [sys.executable, "-m", "qmpd", "-M", "none", "-nodefaults", "-display", "none",
             "-qmp", f"unix:{compact_path},server=on,wait=off",
             "-chardev", f"socket,id=c,path={pretty_path}", "-mon", "chardev=c,mode=control,pretty=on"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            conn, _ = listener.accept()
            # the listeners are open before the client-mode monitors connect:
            # the compact monitor stays one line per message
            compact = socket.socket(socket.AF_UNIX)
            compact.settimeout(30)
            compact.connect(compact_path)
            greeting = compact.makefile("rb").readline()
            assert greeting.startswith(b'{"QMP": {"version": {"qemu": {') and greeting.endswith(b"}}\r\n")
            compact.close()
            conn.settimeout(30)
            answers = exchange_on(conn)
            _out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            listener.close()
    assert proc.returncode == 0, err
    assert [_normalize(a) for a in answers] == [_normalize(a) for a in GOLDEN["answers"]]
    # and what was normalized away has the same shape
    assert answers[0].count("\r\n") == GOLDEN["answers"][0].count("\r\n")



def test_pretty_is_per_listener() -> None:
    """qemu-storage-daemon's ``--monitor ...,pretty=on`` and QEMU's ``-mon``
    mark only their own listener; ``pretty=off`` and other sockets stay compact."""
    from qmpd.cli.main import parse_args
    from qmpd.server.listeners import UnixListener

    _, listeners, _ = parse_args(["--chardev", "socket,id=x,path=/tmp/p.sock,server=on",
                                  "--monitor", "chardev=x,pretty=on", "--socket", "/tmp/c.sock"])
    assert listeners == [UnixListener("/tmp/c.sock"), UnixListener("/tmp/p.sock", pretty=True)]
    _, listeners, _ = parse_args(["-chardev", "socket,id=x,path=/tmp/p.sock,server=on,wait=off",
                                  "-mon", "chardev=x,mode=control,pretty=off"])
    assert listeners == [UnixListener("/tmp/p.sock")]
