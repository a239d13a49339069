"""Real NBD clients against qmpd's exports: qemu-img, qemu-io, qemu-nbd,
nbdinfo and nbdcopy, side by side with qemu-storage-daemon 7.2 where the
answer is QEMU's to give."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import short_socket_dir
from tests.support.nbd import MiB, NbdDaemon, have, make_disk, option_replies, run, wait_listening

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not have("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "nbdcopy"),
                       reason="needs qemu-utils and libnbd-bin (.ci/run installs them)"),
]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[NbdDaemon]:
    with short_socket_dir(tmp_path) as sock_dir:
        make_disk(sock_dir / "disk.img")
        d = NbdDaemon(sock_dir)
        try:
            yield d
        finally:
            d.close()


def test_convert_compare_nbdcopy(env: NbdDaemon) -> None:
    disk = env.tmp / "disk.img"
    env.add_raw("drive0", disk)
    env.start_server()
    env.ok("block-export-add", type="nbd", id="e0", **{"node-name": "drive0"})
    uri = env.uri("drive0")
    assert run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(disk)).stdout == "Images are identical.\n"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(env.tmp / "conv.img"))
    assert (env.tmp / "conv.img").read_bytes() == disk.read_bytes()
    run("nbdcopy", uri, str(env.tmp / "copy.img"))
    assert (env.tmp / "copy.img").read_bytes() == disk.read_bytes()
    # Holes travel as holes: the copy is as sparse as the disk.
    assert (env.tmp / "conv.img").stat().st_blocks <= disk.stat().st_blocks + 64


def test_dirty_bitmap_extents(env: NbdDaemon) -> None:
    env.add_raw("drive0", env.tmp / "disk.img")
    env.ok("block-dirty-bitmap-add", node="drive0", name="b0")
    env.hmp('qemu-io drive0 "write -P 0x55 1M 64k"')
    env.hmp('qemu-io drive0 "write -P 0x55 5M 200k"')
    env.ok("block-dirty-bitmap-disable", node="drive0", name="b0")
    env.start_server()
    env.ok("block-export-add", type="nbd", id="e0", **{"node-name": "drive0"}, bitmaps=["b0"])
    dirty = [(MiB, 64 * 1024), (5 * MiB, 256 * 1024)]   # 200k rounded to 64k clusters
    opts = (f"driver=nbd,export=drive0,server.type=unix,server.path={env.sock},"
            "x-dirty-bitmap=qemu:dirty-bitmap:b0")
    extents = json.loads(run("qemu-img", "map", "--output=json", "--image-opts", opts).stdout)
    # x-dirty-bitmap reports dirty areas as unallocated ("data": false).
    assert [(e["start"], e["length"]) for e in extents if not e["data"]] == dirty
    assert sum(e["length"] for e in extents) == 64 * MiB
    out = run("nbdinfo", "--map=qemu:dirty-bitmap:b0", env.uri("drive0")).stdout
    rows = [line.split() for line in out.splitlines()]
    assert [(int(r[0]), int(r[1])) for r in rows if r[3] == "dirty"] == dirty
    assert all(r[2] == ("1" if r[3] == "dirty" else "0") for r in rows)
    # The bitmap is busy while exported.
    nodes = env.ok("query-named-block-nodes")
    bm = next(n for n in nodes if n["node-name"] == "drive0")["dirty-bitmaps"][0]
    assert bm["busy"] is True and bm["count"] == 320 * 1024


def _qsd(tmp: Path, export: str) -> tuple[object, str]:
    import subprocess
    sock = str(tmp / "qsd.sock")
    proc = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=f0,filename={tmp / 'disk.img'}",
         "--blockdev", "raw,node-name=drive0,file=f0",
         "--nbd-server", f"addr.type=unix,addr.path={sock}", "--export", export],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(sock, proc)
    return proc, sock


@pytest.mark.skipif(not have("qemu-storage-daemon"), reason="needs qemu-storage-daemon")
@pytest.mark.parametrize("writable", [False, True])
def test_listing_as_qsd(env: NbdDaemon, writable: bool) -> None:
    """nbdinfo --list and qemu-nbd --list see the same export from qmpd and
    from qemu-storage-daemon 7.2 (flags, contexts, block sizes, description)."""
    env.add_raw("drive0", env.tmp / "disk.img")
    env.start_server()
    env.ok("block-export-add", type="nbd", id="e0", **{"node-name": "drive0"},
           description="the disk", writable=writable, **{"allocation-depth": True})
    w = "on" if writable else "off"
    proc, qsock = _qsd(env.tmp, f"nbd,id=e0,node-name=drive0,description=the disk,writable={w},"
                                f"allocation-depth=on")
    try:
        def listing(sock: str) -> dict[str, object]:
            out: dict[str, object] = json.loads(
                run("nbdinfo", "--json", "--list", f"nbd+unix://?socket={sock}").stdout)
            for exp in out["exports"]:  # type: ignore[attr-defined]
                exp.pop("uri")
            return out

        assert listing(env.sock) == listing(qsock)
        ours = run("qemu-nbd", "--list", "-k", env.sock).stdout
        theirs = run("qemu-nbd", "--list", "-k", qsock).stdout
        assert ours == theirs
        m1 = run("nbdinfo", "--map=qemu:allocation-depth", env.uri("drive0")).stdout
        m2 = run("nbdinfo", "--map=qemu:allocation-depth", f"nbd+unix:///drive0?socket={qsock}").stdout
        assert m1 == m2
        b1 = run("nbdinfo", "--map", env.uri("drive0")).stdout
        b2 = run("nbdinfo", "--map", f"nbd+unix:///drive0?socket={qsock}").stdout
        assert b1 == b2
    finally:
        proc.terminate()  # type: ignore[attr-defined]
        proc.wait()  # type: ignore[attr-defined]


def test_writable_export_through_qemu_io(env: NbdDaemon) -> None:
    disk = env.tmp / "disk.img"
    env.add_raw("drive0", disk, discard="unmap")
    env.start_server()
    env.ok("block-export-add", type="nbd", id="e0", **{"node-name": "drive0"}, writable=True)
    uri = env.uri("drive0")
    run("qemu-io", "-f", "raw", "-c", "write -P 0xab 3M 128k", "-c", "write -z 3M 64k",
        "-c", "flush", uri)
    data = disk.read_bytes()
    assert data[3 * MiB:3 * MiB + 64 * 1024] == bytes(64 * 1024)
    assert data[3 * MiB + 64 * 1024:3 * MiB + 128 * 1024] == b"\xab" * 64 * 1024
    run("qemu-io", "-f", "raw", "-c", "read -P 0xab 3136k 64k", uri)


def _attach(sock: str, export: bytes) -> socket.socket:
    """A raw client that completes NBD_OPT_GO and then stays idle."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sock)
    assert s.recv(18)[:8] == b"NBDMAGIC"
    s.sendall(struct.pack(">I", 3))
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 6 + len(export))
              + struct.pack(">I", len(export)) + export + struct.pack(">H", 0))
    got = b""
    while not got.endswith(struct.pack(">QIII", 0x3E889045565A9, 7, 1, 0)):
        chunk = s.recv(4096)
        assert chunk
        got += chunk
    return s


def test_export_del_modes_with_a_client(env: NbdDaemon) -> None:
    """As qemu-storage-daemon 7.2: safe mode refuses while a client is
    attached; hard mode drops it and BLOCK_EXPORT_DELETED follows the reply."""
    env.add_raw("drive0", env.tmp / "disk.img")
    env.start_server()
    env.ok("block-export-add", type="nbd", id="e0", **{"node-name": "drive0"})
    client = _attach(env.sock, b"drive0")
    assert env.q("block-export-del", id="e0") == {
        "error": {"class": "GenericError", "desc": "export 'e0' still in use"}}
    assert env.q("block-export-del", id="e0", mode="hard") == {"return": {}}
    assert client.recv(100) == b""
    assert env.ok("query-block-exports") == []
    assert env.events == [{"event": "BLOCK_EXPORT_DELETED", "data": {"id": "e0"}}]
    assert env.q("blockdev-del", **{"node-name": "drive0"}) == {"return": {}}


def test_max_connections(env: NbdDaemon) -> None:
    """A connection beyond max-connections gets no greeting until one leaves."""
    env.add_raw("drive0", env.tmp / "disk.img")
    env.start_server(**{"max-connections": 2})
    env.ok("block-export-add", type="nbd", id="e0", **{"node-name": "drive0"})
    a = _attach(env.sock, b"drive0")
    b = _attach(env.sock, b"drive0")
    c = socket.socket(socket.AF_UNIX)
    c.connect(env.sock)
    c.settimeout(0.5)
    with pytest.raises(TimeoutError):
        c.recv(18)
    assert env.ok("query-block-exports")[0]["id"] == "e0"   # QMP unaffected
    a.close()
    c.settimeout(10)
    assert c.recv(18)[:8] == b"NBDMAGIC"
    b.close()
    c.close()


def test_qsd_command_line(tmp_path: Path) -> None:
    """--nbd-server and --export as qemu-storage-daemon: the export serves at
    start-up, and bad options fail with QSD's line (program name aside)."""
    import subprocess
    import sys
    with short_socket_dir(tmp_path) as tmp:
        make_disk(tmp / "disk.img", size=4 * MiB)
        nbd_sock = str(tmp / "n.sock")
        blockdevs = ["--blockdev", f"driver=file,node-name=f0,filename={tmp / 'disk.img'}",
                     "--blockdev", "driver=raw,node-name=drive0,file=f0"]
        from tests.support.daemon import DaemonProcess
        d = DaemonProcess(tmp, *blockdevs, "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
                          "--export", "nbd,id=e0,node-name=drive0,writable=on,description=hi")
        try:
            wait_listening(nbd_sock, d.proc)
            proc = run("nbdinfo", "--json", f"nbd+unix:///drive0?socket={nbd_sock}")
            info = json.loads(proc.stdout)["exports"][0]
            assert (info["export-size"], info["is_read_only"], info["description"]) == (4 * MiB, False, "hi")
        finally:
            assert d.stop() == 0
        bad = [["--nbd-server", "addr.type=unix"],
               ["--nbd-server", f"addr.type=unix,addr.path={tmp / 'x.sock'}", "--export", "nbd,id=e0,node-name=nosuch"],
               ["--export", "nbd,id=e0,node-name=nosuch"],
               [*blockdevs, "--nbd-server", f"addr.type=unix,addr.path={tmp / 'x.sock'}",
                "--export", "nbd,id=e0,node-name=drive0,bitmaps.0=nosuch"],
               [*blockdevs, "--nbd-server", f"addr.type=unix,addr.path={tmp / 'x.sock'}",
                "--export", "nbd,id=e0,node-name=drive0,writable=maybe"],
               [*blockdevs, "--export", "nbd,node-name=drive0"],
               ["--nbd-server", f"addr.type=unix,addr.path={tmp / 'x.sock'}",
                "--nbd-server", f"addr.type=unix,addr.path={tmp / 'y.sock'}"],
               ["--nbd-server", f"addr.type=unix,addr.path={tmp / 'x.sock'},tls-creds=x"]]
        for argv in bad:
            ours = subprocess.run([sys.executable, "-m", "qmpd", "--socket", str(tmp / "q.sock"), *argv],
                                  capture_output=True, text=True, timeout=30)
            assert ours.returncode == 1
            if have("qemu-storage-daemon"):
                theirs = subprocess.run(["qemu-storage-daemon", *argv], capture_output=True, text=True,
                                        timeout=30)
                assert theirs.returncode == 1
                assert ours.stderr.removeprefix("qmpd: ") == theirs.stderr.removeprefix("qemu-storage-daemon: ")


_N = struct.pack(">I", 6) + b"drive0"
#: Handshakes with misuse in them; each option's first reply must be QEMU's.
HANDSHAKES = {
    "unknown option": [(0x55, b"x"), (3, b"")],
    "list meta context before structured replies": [(9, _N + b"\0\0\0\0")],
    "set meta context before structured replies": [(10, _N + b"\0\0\0\0")],
    "list with payload": [(3, b"x")],
    "structured reply twice, with payload": [(8, b"x"), (8, b""), (8, b"")],
    "bad info": [(6, b"\0\0\0\xff"), (6, _N), (6, _N + b"\0\1"), (6, struct.pack(">I", 4) + b"nope\0\0")],
    "info of everything": [(6, _N + b"\0\3\0\0\0\1\0\2")],
    "go with names": [(7, _N + b"\0\2\0\1\0\2")],
    "meta contexts": [(8, b""), (9, _N + b"\0\0\0\0"), (9, _N + b"\0\0\0\1" + struct.pack(">I", 5) + b"qemu:"),
                      (10, _N + b"\0\0\0\1" + struct.pack(">I", 15) + b"base:allocation"),
                      (10, struct.pack(">I", 4) + b"nope\0\0\0\0")],
    "starttls without tls": [(5, b""), (5, b"x")],
    "abort with payload": [(2, b"x")],
    "export name of nothing": [(1, b"nope")],
}


@pytest.mark.skipif(not have("qemu-storage-daemon"), reason="needs qemu-storage-daemon")
def test_handshake_replies_as_qsd(env: NbdDaemon) -> None:
    """Byte-for-byte the option replies (and texts) of qemu-storage-daemon 7.2."""
    env.add_raw("drive0", env.tmp / "disk.img")
    env.start_server()
    env.ok("block-export-add", type="nbd", id="e0", **{"node-name": "drive0"}, description="dd")
    proc, qsock = _qsd(env.tmp, "nbd,id=e0,node-name=drive0,description=dd")
    try:
        for label, options in HANDSHAKES.items():
            assert option_replies(env.sock, options) == option_replies(qsock, options), label
    finally:
        proc.terminate()  # type: ignore[attr-defined]
        proc.wait()  # type: ignore[attr-defined]


def _requests_replies(sock: str, structured: bool, requests: list[bytes]) -> list[bytes]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sock)
    s.recv(18)
    s.sendall(struct.pack(">I", 3))
    if structured:
        s.sendall(struct.pack(">QII", 0x49484156454F5054, 8, 0))
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(_N) + 2) + _N + b"\0\0")
    want = 20 * (2 if structured else 1) + 20 + 12 + 20 + 14 + 20
    got = b""
    while not got.endswith(struct.pack(">QIII", 0x3E889045565A9, 7, 1, 0)):
        got += s.recv(want)
    out = []
    for req in requests:
        s.sendall(req)
        out.append(s.recv(200))
    s.close()
    return out


def _req(typ: int, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, typ, 1, offset, length)


@pytest.mark.skipif(not have("qemu-storage-daemon"), reason="needs qemu-storage-daemon")
def test_transmission_errors_as_qsd(env: NbdDaemon) -> None:
    """Bad requests get qemu-storage-daemon 7.2's replies byte for byte
    (errno, error text), except writes to a read-only export: EPERM as the
    protocol says, where QEMU sends EINVAL."""
    env.add_raw("drive0", env.tmp / "disk.img")
    env.start_server()
    env.ok("block-export-add", type="nbd", id="e0", **{"node-name": "drive0"})
    proc, qsock = _qsd(env.tmp, "nbd,id=e0,node-name=drive0")
    size = 64 * MiB
    requests = [_req(42, 0, 0), _req(0, size, 512), _req(0, 0, 33 * MiB), _req(3, 0, 0, flags=1),
                _req(7, 0, 512), _req(0, 0, 512, flags=0x80), _req(5, size, 512), _req(0, size - 256, 512)]
    read_only = [_req(1, 0, 512) + b"x" * 512, _req(6, 0, 512), _req(4, 0, 512)]
    try:
        for structured in (False, True):
            assert _requests_replies(env.sock, structured, requests) == \
                _requests_replies(qsock, structured, requests)
            ours = _requests_replies(env.sock, structured, read_only)
            theirs = _requests_replies(qsock, structured, read_only)
            eperm, einval = struct.pack(">I", 1), struct.pack(">I", 22)
            at = 20 if structured else 4
            for o, t in zip(ours, theirs):
                assert o[at:at + 4] == eperm and t[at:at + 4] == einval
                assert o[:at] + o[at + 4:] == t[:at] + t[at + 4:]
    finally:
        proc.terminate()  # type: ignore[attr-defined]
        proc.wait()  # type: ignore[attr-defined]


def test_inet_server_and_export_keeps_node(env: NbdDaemon) -> None:
    """An inet listener (libvirt's TCP form); the export holds its node
    ("Node drive0 is in use") without making it a device: a backup's
    default job id stays the empty device name."""
    env.add_raw("drive0", env.tmp / "disk.img")
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    env.ok("nbd-server-start", addr={"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}})
    env.ok("block-export-add", type="nbd", id="e0", **{"node-name": "drive0"})
    assert run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/drive0").stdout == f"{64 * MiB}\n"
    assert env.q("blockdev-del", **{"node-name": "drive0"}) == {
        "error": {"class": "GenericError", "desc": "Node drive0 is in use"}}
    with open(env.tmp / "t.img", "wb") as f:
        f.truncate(64 * MiB)
    env.add_raw("t0", env.tmp / "t.img")
    assert env.q("blockdev-backup", device="drive0", target="t0", sync="full") == {
        "error": {"class": "GenericError", "desc": "Invalid job ID ''"}}
    env.ok("nbd-server-stop")
    assert env.events == [{"event": "BLOCK_EXPORT_DELETED", "data": {"id": "e0"}}]
    env.ok("blockdev-del", **{"node-name": "drive0"})
