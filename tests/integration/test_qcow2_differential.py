"""Seeded random differential: qmpd against QEMU 7.2 on qcow2 (issue 10).

The same QMP commands go to ``qemu-system-x86_64 -machine none`` and to
qmpd, each over its own copy of a qcow2 image: qemu-io writes, zero writes
and discards (HMP), bitmap add / clear / merge / disable / enable / remove
(persistent or not), and full / incremental backups (compressed or not)
into fresh qcow2 targets.  After each bitmap or backup step the
``dirty-bitmaps`` lists (names, counts, flags) must be equal; at the end the
sources and every pair of targets must compare identical (``qemu-img
compare``) and pass ``qemu-img check``; after ``quit`` and a restart the
persistent bitmaps must come back the same.
"""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_persistent_vs_qemu import Peer
from tests.support.daemon import short_socket_dir

SIZE = 16 << 20


def _check(img: Path) -> None:
    r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert r.returncode == 0, (img.name, r.stdout, r.stderr)


def _compare(a: Path, b: Path) -> None:
    r = subprocess.run(["qemu-img", "compare", str(a), str(b)], capture_output=True, text=True)
    assert r.returncode == 0, (a.name, b.name, r.stdout, r.stderr)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[list[Peer], Path]]:
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(SIZE)], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 3M", "-c", "write -P 0x22 9M 1M", str(base)],
                   check=True, capture_output=True)
    for side in ("q", "m"):
        (tmp_path / side).mkdir()
        (tmp_path / side / "d.qcow2").write_bytes(base.read_bytes())

    def node(side: str) -> str:
        return json.dumps({"driver": "qcow2", "node-name": "d0", "discard": "unmap",
                           "file": {"driver": "file", "filename": str(tmp_path / side / "d.qcow2")}})

    with short_socket_dir(tmp_path) as d:
        qemu = Peer("qemu", ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
                             "-qmp", "stdio", "-blockdev", node("q")])
        qmpd = Peer("qmpd", ["--blockdev", node("m")], d)
        both = [qemu, qmpd]
        try:
            for p in both:
                p.start()
            yield both, tmp_path
        finally:
            for p in both:
                p.stop()


def _same(peers: list[Peer], step: str) -> None:
    q, m = (p.bitmaps() for p in peers)
    assert m == q, f"{step}: qemu {q} qmpd {m}"


def _all(peers: list[Peer], command: str, /, **args: object) -> None:
    replies = [p.cmd(command, **args) for p in peers]
    assert replies[1] == replies[0], (command, args, replies)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_ops_backups_bitmaps_match_qemu(pair: tuple[list[Peer], Path], seed: int) -> None:
    peers, tmp = pair
    rng = random.Random(seed)
    hmp = "human-monitor-command"
    names: dict[str, bool] = {}  # bitmap name -> enabled
    targets: list[str] = []
    for step in range(60):
        op = rng.random()
        off = rng.randrange(0, SIZE - (1 << 20), 512)
        ln = rng.randrange(512, 1 << 20, 512)
        if op < 0.25:
            _all(peers, hmp, command_line=f'qemu-io d0 "write -P {rng.randrange(1, 256)} {off} {ln}"')
        elif op < 0.35:
            _all(peers, hmp, command_line=f'qemu-io d0 "write -z {off} {ln}"')
        elif op < 0.42:
            _all(peers, hmp, command_line=f'qemu-io d0 "discard {off} {ln}"')
        elif op < 0.55 or not names:
            name = f"b{step}"
            gran = rng.choice([65536, 131072, 4096])
            _all(peers, "block-dirty-bitmap-add", node="d0", name=name, granularity=gran,
                 persistent=rng.random() < 0.5)
            names[name] = True
        elif op < 0.62:
            _all(peers, "block-dirty-bitmap-clear", node="d0", name=rng.choice(sorted(names)))
        elif op < 0.69:
            tgt = rng.choice(sorted(names))
            srcs = rng.sample(sorted(names), min(len(names), rng.randrange(1, 3)))
            _all(peers, "block-dirty-bitmap-merge", node="d0", target=tgt, bitmaps=srcs)
        elif op < 0.76:
            name = rng.choice(sorted(names))
            cmd = "block-dirty-bitmap-disable" if names[name] else "block-dirty-bitmap-enable"
            _all(peers, cmd, node="d0", name=name)
            names[name] = not names[name]
        elif op < 0.80 and len(names) > 1:
            name = rng.choice(sorted(names))
            _all(peers, "block-dirty-bitmap-remove", node="d0", name=name)
            del names[name]
        else:
            t = f"t{step}"
            targets.append(t)
            args: dict[str, object] = {"device": "d0", "target": t, "job_id": f"j{step}",
                                       "compress": rng.random() < 0.3}
            if rng.random() < 0.5:
                args.update(sync="incremental", bitmap=rng.choice(sorted(names)))
            else:
                args.update(sync="full")
            for p, side in zip(peers, "qm"):
                img = tmp / side / f"{t}.qcow2"
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(SIZE)], check=True)
                p.cmd("blockdev-add", driver="qcow2", node_name=t,
                      file={"driver": "file", "filename": str(img)})
                assert p.cmd("blockdev-backup", **args) == {}, (p.name, args)
                p.event("BLOCK_JOB_COMPLETED")
                assert p.cmd("blockdev-del", node_name=t) == {}
        _same(peers, f"seed {seed} step {step}")
    for p in peers:
        p.quit()
        p.start()
    _same(peers, f"seed {seed} after restart")
    for p in peers:
        p.quit()
    for t in targets:
        _check(tmp / "q" / f"{t}.qcow2")
        _check(tmp / "m" / f"{t}.qcow2")
        _compare(tmp / "q" / f"{t}.qcow2", tmp / "m" / f"{t}.qcow2")
    _check(tmp / "m" / "d.qcow2")
    _compare(tmp / "q" / "d.qcow2", tmp / "m" / "d.qcow2")
