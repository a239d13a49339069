#!/usr/bin/env python3
"""Record QEMU 7.2's command-line error texts (the oracle for qmpd's).

    python tests/transcripts/record_cli.py INPUT.txt > cli_errors.txt

INPUT holds ``$ ARGS`` lines (shell words; TEST_DIR is a temporary
directory holding a 1 MiB ``x.img``).  Each is run as
``qemu-system-x86_64 -M none -nodefaults -display none ARGS``; the output
adds QEMU's exit status (``= N``) and its stderr lines (``! TEXT``), with
the program name written as ``PROG`` and the directory as ``TEST_DIR``.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

PREFIX = ["-M", "none", "-nodefaults", "-display", "none"]


def main(src: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="qcli-") as tmp:
        with open(Path(tmp) / "x.img", "wb") as f:
            f.truncate(1 << 20)
        for line in src.read_text().splitlines():
            print(line)
            if not line.startswith("$ "):
                continue
            args = shlex.split(line[2:].replace("TEST_DIR", tmp))
            proc = subprocess.run(["qemu-system-x86_64", *PREFIX, *args], capture_output=True,
                                  text=True, timeout=20, cwd=tmp)
            print(f"= {proc.returncode}")
            for err in proc.stderr.splitlines():
                print("! " + err.replace("qemu-system-x86_64:", "PROG:").replace(tmp, "TEST_DIR"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
