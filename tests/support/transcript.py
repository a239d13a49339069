"""Golden QMP transcripts: ``->`` lines are sent, ``<-`` lines must match.

A transcript is recorded from a real QEMU (``tests/transcripts/record.py``)
and replayed against qmpd.  Lines:

* ``! file NAME SIZE``: create a sparse file ``TEST_DIR/NAME`` first;
* ``! args ...``: QEMU command-line options the VM was started with
  (``-machine pc -S -drive ... -device ...``), given to qmpd as well;
* ``! certs``: create TLS test certificates in ``TEST_DIR/srv`` and
  ``TEST_DIR/cli`` first (:mod:`tests.support.tls`);
* ``-> {json}``: a request;
* ``<- {json}``: the reply to it, or an event (``{"event": ...}``, without
  timestamp) expected before the reply;
* ``#`` comments and blank lines.

Comparison is of parsed JSON, with auto-generated node names (``#block123``)
replaced by ``#blockN`` and the temporary directory by ``TEST_DIR``.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AUTO_NAME = re.compile(r"#block\d+")


@dataclass
class Step:
    request: dict[str, Any]
    expected: list[dict[str, Any]] = field(default_factory=list)
    line: int = 0


@dataclass
class Transcript:
    files: list[tuple[str, int]]
    steps: list[Step]
    certs: bool = False
    #: ``! args`` (shell words, TEST_DIR not yet substituted).
    args: list[str] = field(default_factory=list)


def parse(path: Path) -> Transcript:
    files: list[tuple[str, int]] = []
    steps: list[Step] = []
    args: list[str] = []
    certs = False
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("! file "):
            _, _, name, size = line.split()
            files.append((name, int(size)))
        elif line.startswith("! args "):
            args = shlex.split(line[len("! args "):])
        elif line == "! certs":
            certs = True
        elif line.startswith("-> "):
            steps.append(Step(json.loads(line[3:]), line=lineno))
        elif line.startswith("<- "):
            steps[-1].expected.append(json.loads(line[3:]))
        else:
            raise ValueError(f"{path}:{lineno}: cannot parse {raw!r}")
    return Transcript(files, steps, certs, args)


def normalize(value: Any, test_dir: str) -> Any:
    text = json.dumps(value)
    text = AUTO_NAME.sub("#blockN", text.replace(test_dir, "TEST_DIR"))
    return json.loads(text)


def localize(value: Any, test_dir: str) -> Any:
    return json.loads(json.dumps(value).replace("TEST_DIR", test_dir))
