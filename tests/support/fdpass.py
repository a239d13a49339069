"""A blocking QMP client that passes descriptors, and the fd-passing script
replayed against QEMU 7.2 (recorded golden) and against qmpd.

Descriptor numbers differ between processes, so replies are normalised:
the descriptor ``add-fd`` returned becomes ``"fd#k"`` (k-th add-fd), and a
later mention of that number (``query-fdsets``) the same label.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

__all__ = ["FdClient", "run_script", "GOLDEN"]

GOLDEN = Path(__file__).resolve().parents[1] / "transcripts" / "fdpass.golden.json"


class FdClient:
    """Blocking QMP client over a UNIX socket; :meth:`cmd` may pass fds."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self._file = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        self._read()
        assert self.cmd({"execute": "qmp_capabilities"}) == {"return": {}}

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        assert line, "connection closed"
        msg: dict[str, Any] = json.loads(line)
        return msg

    def wait_event(self, data: dict[str, Any]) -> None:
        """Read until an event with ``data`` was seen."""
        while not any(e.get("data") == data for e in self.events):
            self.events.append(self._read())

    def cmd(self, msg: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> dict[str, Any]:
        data = json.dumps(msg).encode()
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            return reply

    def close(self) -> None:
        self._file.close()
        self.sock.close()


def _ex(name: str, **args: Any) -> dict[str, Any]:
    return {"execute": name, "arguments": args} if args else {"execute": name}


def run_script(sock_path: str, workdir: str) -> list[dict[str, Any]]:
    """Run the fd-passing script; :return: its normalised transcript."""
    img = os.path.join(workdir, "fd.img")
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    ro = os.open(img, os.O_RDONLY | os.O_CLOEXEC)
    rw = os.open(img, os.O_RDWR | os.O_CLOEXEC)
    labels: dict[int, str] = {}
    out: list[dict[str, Any]] = []

    def norm(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: norm(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [norm(v) for v in value]
        if key == "fd" and isinstance(value, int):
            return labels.get(value, value)
        return value

    def step(c: FdClient, msg: dict[str, Any], fds: tuple[int, ...] = ()) -> dict[str, Any]:
        reply = c.cmd(msg, fds)
        if msg["execute"] == "add-fd" and "return" in reply:
            added = sum(1 for e in out if e["request"]["execute"] == "add-fd" and "return" in e["reply"])
            labels[reply["return"]["fd"]] = f"fd#{added}"
        out.append({"request": norm(msg), "fds": len(fds), "reply": norm(reply)})
        return reply

    c = FdClient(sock_path)
    try:
        step(c, _ex("getfd", fdname="a"))
        step(c, _ex("getfd", fdname="1a"), (ro,))
        step(c, _ex("getfd", fdname="a"), (ro,))
        step(c, _ex("getfd", fdname="a"), (rw,))
        step(c, _ex("closefd", fdname="a"))
        step(c, _ex("closefd", fdname="a"))
        step(c, _ex("add-fd"))
        step(c, _ex("add-fd", **{"fdset-id": -1}), (ro,))
        step(c, _ex("add-fd", **{"fdset-id": 3, "opaque": "ro"}), (ro,))
        step(c, _ex("add-fd", **{"fdset-id": 3}), (rw,))
        step(c, _ex("add-fd"), (rw,))
        step(c, _ex("add-fd"), (rw,))
        step(c, _ex("add-fd", **{"fdset-id": 6}), (ro,))
        step(c, _ex("query-fdsets"))
        step(c, _ex("remove-fd", **{"fdset-id": 9}))
        step(c, _ex("remove-fd", **{"fdset-id": 3, "fd": 99999}))
        step(c, _ex("blockdev-add", driver="file", filename="/dev/fdset/7", **{"node-name": "n7"}))
        step(c, _ex("blockdev-add", driver="file", filename="/dev/fdset/6", **{"node-name": "n6"}))
        step(c, _ex("blockdev-add", driver="file", filename="/dev/fdset/6", **{"node-name": "n6",
                                                                              "read-only": True}))
        step(c, _ex("blockdev-add", driver="file", filename="/dev/fdset/0", **{"node-name": "n0"}))
        step(c, _ex("blockdev-add", driver="file", filename="/dev/fdset/3",
                    **{"node-name": "n3", "read-only": True}))
        step(c, _ex("blockdev-add", driver="file", filename="/dev/fdset/3", **{"node-name": "n3w"}))
        step(c, _ex("query-fdsets"))
        step(c, _ex("remove-fd", **{"fdset-id": 3}))
        step(c, _ex("query-fdsets"))
        step(c, _ex("blockdev-del", **{"node-name": "n3"}))
        step(c, _ex("query-fdsets"))
        step(c, _ex("blockdev-del", **{"node-name": "n3w"}))
        step(c, _ex("query-fdsets"))
        step(c, _ex("remove-fd", **{"fdset-id": 1, "fd": _fd_of(labels, "fd#3")}))
        step(c, _ex("query-fdsets"))
        step(c, _ex("getfd", fdname="kept"), (ro,))
    finally:
        c.close()
        os.close(ro)
        os.close(rw)
    # The last client left: sets not in use are closed, set 0 (node n0) stays.
    c = FdClient(sock_path)
    try:
        step(c, _ex("query-fdsets"))
        step(c, _ex("blockdev-del", **{"node-name": "n6"}))
        step(c, _ex("query-fdsets"))
    finally:
        c.close()
    return out


def _fd_of(labels: dict[int, str], label: str) -> int:
    return next(fd for fd, name in labels.items() if name == label)
