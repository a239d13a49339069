"""NBD over TLS: ``object-add tls-creds-x509`` and ``nbd-server-start
tls-creds``, with libnbd (nbdinfo, nbdcopy) and QEMU's own clients, and the
handshake before STARTTLS compared byte for byte with qemu-storage-daemon
7.2."""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import short_socket_dir
from tests.support.nbd import MiB, NbdDaemon, have, make_disk, option_replies, run, wait_listening
from tests.support.tls import make_certs

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not have("openssl", "nbdinfo", "nbdcopy", "qemu-img", "qemu-nbd"),
                       reason="needs openssl, libnbd-bin and qemu-utils"),
]

_NAME = struct.pack(">I", 6) + b"drive0"
#: Options sent before STARTTLS, ABORT last.
BEFORE_TLS = ((8, b""), (3, b""), (7, _NAME + b"\0\0"), (6, _NAME + b"\0\0"),
              (10, _NAME + b"\0\0\0\0"), (0x55, b"x"), (2, b""))


@pytest.fixture
def env(tmp_path: Path) -> Iterator[NbdDaemon]:
    with short_socket_dir(tmp_path) as tmp:
        make_certs(tmp)
        make_disk(tmp / "disk.img", size=4 * MiB)
        d = NbdDaemon(tmp)
        d.add_raw("drive0", tmp / "disk.img")
        d.ok("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(tmp / "srv"),
                              "endpoint": "server"})
        try:
            yield d
        finally:
            d.close()


def test_tls_clients(env: NbdDaemon) -> None:
    env.start_server(**{"tls-creds": "tls0"})
    env.ok("block-export-add", type="nbd", id="e0", **{"node-name": "drive0"})
    cli = env.tmp / "cli"
    uri = f"nbds+unix:///drive0?socket={env.sock}&tls-certificates={cli}"
    out = run("nbdinfo", "--list", f"nbds+unix://?socket={env.sock}&tls-certificates={cli}").stdout
    assert out.startswith("protocol: newstyle-fixed with TLS, using structured packets\n")
    run("nbdcopy", uri, str(env.tmp / "copy.img"))
    assert (env.tmp / "copy.img").read_bytes() == (env.tmp / "disk.img").read_bytes()
    obj = f"tls-creds-x509,id=tls0,endpoint=client,dir={cli}"
    info = run("qemu-img", "info", "--object", obj, "--image-opts",
               f"driver=nbd,server.type=unix,server.path={env.sock},export=drive0,tls-creds=tls0,"
               "tls-hostname=localhost").stdout
    assert "virtual size: 4 MiB (4194304 bytes)" in info
    listing = run("qemu-nbd", "--list", "-k", env.sock, "--object", obj, "--tls-creds", "tls0",
                  "--tls-hostname", "localhost").stdout
    assert "flags: 0x58f ( readonly flush fua df multi cache )" in listing
    # Without TLS the client is refused (ERR_TLS_REQD), and QMP is fine.
    plain = run("nbdinfo", f"nbd+unix:///drive0?socket={env.sock}", check=False)
    assert plain.returncode != 0
    # object-del leaves the running server its credentials (as QEMU).
    env.ok("object-del", id="tls0")
    run("nbdcopy", uri, str(env.tmp / "copy2.img"))


def test_tls_authz_refused(env: NbdDaemon) -> None:
    """qmpd has no authz objects: tls-authz with tls-creds is refused
    (QEMU 7.2 accepts it and checks clients against the authz object)."""
    assert env.q("nbd-server-start", addr={"type": "unix", "data": {"path": env.sock}},
                 **{"tls-creds": "tls0", "tls-authz": "authz0"}) == {
        "error": {"class": "GenericError", "desc": "tls-authz is not supported by qmpd"}}


@pytest.mark.skipif(not have("qemu-storage-daemon"), reason="needs qemu-storage-daemon")
def test_handshake_before_starttls_as_qsd(env: NbdDaemon) -> None:
    env.start_server(**{"tls-creds": "tls0"})
    env.ok("block-export-add", type="nbd", id="e0", **{"node-name": "drive0"})
    qsock = env.tmp / "qsd.sock"
    proc = subprocess.Popen(
        ["qemu-storage-daemon", "--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={env.tmp / 'srv'}",
         "--blockdev", f"driver=file,node-name=f0,filename={env.tmp / 'disk.img'}",
         "--blockdev", "driver=raw,node-name=drive0,file=f0",
         "--nbd-server", f"addr.type=unix,addr.path={qsock},tls-creds=tls0",
         "--export", "nbd,id=e0,node-name=drive0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(qsock, proc)
        ours = option_replies(env.sock, BEFORE_TLS)
        theirs = option_replies(str(qsock), BEFORE_TLS)
        assert ours == theirs
        assert ours[-1] == b""     # ABORT: refused, then closed
    finally:
        proc.terminate()
        proc.wait()
