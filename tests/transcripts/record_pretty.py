#!/usr/bin/env python3
"""Record QEMU 7.2's pretty QMP output (``-mon chardev=c,mode=control,pretty=on``).

    python tests/transcripts/record_pretty.py > tests/transcripts/pretty_monitor.json

Writes the greeting and the raw answer to each request of
``tests.support.pretty.REQUESTS`` (bytes as ASCII text, CR LF kept).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import socket
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.support.pretty import REQUESTS, exchange_on  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="qrec-") as tmp:
        path = os.path.join(tmp, "m.sock")
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(30)
        # client mode: QEMU connects to us (as the test does with qmpd)
        proc = subprocess.Popen(["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
                                 "-chardev", f"socket,id=c,path={path}",
                                 "-mon", "chardev=c,mode=control,pretty=on"])
        try:
            conn, _ = listener.accept()
            conn.settimeout(10)
            answers = exchange_on(conn)
        finally:
            proc.wait(10)
            listener.close()
    version = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
    json.dump({"recorded-with": version.splitlines()[0],
               "requests": [r.decode() for r in REQUESTS], "answers": answers}, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
