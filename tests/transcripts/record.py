#!/usr/bin/env python3
"""Record a transcript from a real QEMU (the oracle qmpd's replies must match).

    python tests/transcripts/record.py INPUT.qmp > OUTPUT.qmp

INPUT holds ``! file`` lines, an optional ``! args`` line (QEMU command-line
options replacing the default ``-machine none``; TEST_DIR is substituted)
and ``->`` requests; the output adds the ``<-`` replies (and events) that
``qemu-system-x86_64`` gives, with the temporary directory written as
``TEST_DIR``.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.support.tls import make_certs  # noqa: E402
from tests.support.transcript import normalize  # noqa: E402


def main(src: Path) -> None:
    lines = src.read_text().splitlines()
    with tempfile.TemporaryDirectory(prefix="qrec-") as tmp:
        sock_path = os.path.join(tmp, "qmp.sock")
        extra = ["-machine", "none"]
        if "! certs" in lines:
            make_certs(Path(tmp))
        for line in lines:
            if line.startswith("! args "):
                extra = shlex.split(line[len("! args "):].replace("TEST_DIR", tmp))
            if line.startswith("! file "):
                _, _, name, size = line.split()
                with open(os.path.join(tmp, name), "wb") as f:
                    f.truncate(int(size))
        proc = subprocess.Popen(["qemu-system-x86_64", *extra, "-nodefaults", "-display", "none",
                                 "-qmp", f"unix:{sock_path},server=on,wait=off"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not os.path.exists(sock_path):
                time.sleep(0.01)
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock_path)
            f = s.makefile("rb")
            f.readline()
            s.sendall(b'{"execute":"qmp_capabilities"}')
            f.readline()
            for line in lines:
                if not line.startswith("-> "):
                    print(line)
                    continue
                print(line)
                s.sendall(line[3:].replace("TEST_DIR", tmp).encode())
                while True:
                    msg = json.loads(f.readline())
                    msg.pop("timestamp", None)
                    print("<- " + json.dumps(normalize(msg, tmp)))
                    if "event" not in msg:
                        break
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
