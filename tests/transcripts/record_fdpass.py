#!/usr/bin/env python3
"""Record tests/transcripts/fdpass.golden.json from a real QEMU 7.2.

    PYTHONPATH=. python tests/transcripts/record_fdpass.py

Runs ``qemu-system-x86_64 -machine none`` with a QMP UNIX socket and the
script of :func:`tests.support.fdpass.run_script` (descriptors passed with
SCM_RIGHTS); tests/integration/test_fdpass.py replays it against qmpd.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.support.fdpass import GOLDEN, run_script  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "qmp.sock")
        # QEMU serves a socket we bound and listen on: connecting needs no wait.
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(sock)
        listener.listen(4)
        fd = listener.fileno()
        qemu = subprocess.Popen(["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
                                 "-chardev", f"socket,id=mon,fd={fd},server=on,wait=off",
                                 "-mon", "chardev=mon,mode=control"], pass_fds=(fd,))
        listener.close()
        try:
            out = run_script(sock, tmp)
        finally:
            qemu.terminate()
            qemu.wait()
    GOLDEN.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {GOLDEN} ({len(out)} steps)")


if __name__ == "__main__":
    main()
