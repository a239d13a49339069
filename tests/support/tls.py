"""Test certificates for TLS (openssl): a CA, a server and a client.

``make_certs(DIR)`` writes ``DIR/srv`` (QEMU's server layout: ca-cert.pem,
server-cert.pem, server-key.pem) and ``DIR/cli`` (libnbd's and QEMU's
client layout: ca-cert.pem, client-cert.pem, client-key.pem).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SERVER_EXT = ("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
              "keyUsage=digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n")
CLIENT_EXT = "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n"


def _ssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(base: Path) -> None:
    """Create ``base/srv`` and ``base/cli`` (see the module docstring)."""
    work = base / "pki"
    work.mkdir(parents=True, exist_ok=True)
    _ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
         "-days", "2", "-subj", "/CN=qmpd test CA", cwd=work)
    for role, cn, ext in (("server", "localhost", SERVER_EXT), ("client", "client", CLIENT_EXT)):
        (work / f"{role}.ext").write_text(ext)
        _ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{role}-key.pem", "-out", f"{role}.csr",
             "-subj", f"/CN={cn}", cwd=work)
        _ssl("x509", "-req", "-in", f"{role}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
             "-CAcreateserial", "-out", f"{role}-cert.pem", "-days", "2", "-extfile", f"{role}.ext", cwd=work)
    for sub, role in (("srv", "server"), ("cli", "client")):
        (base / sub).mkdir(exist_ok=True)
        for name in ("ca-cert.pem", f"{role}-cert.pem", f"{role}-key.pem"):
            shutil.copy(work / name, base / sub / name)
    shutil.rmtree(work)
