"""kill -9 during allocating writes, zero writes and discards: ``qemu-img
check`` may report leaked clusters (as after a QEMU crash), never
corruption.  The child reports each finished request on stdout; the test
kills it after a random number of them, while later ones are in flight."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = r"""
import asyncio, random, sys
from qmpd.block.graph import BlockGraph
async def main(path, seed):
    g = BlockGraph()
    n = await g.add({"driver": "qcow2", "node-name": "d", "discard": "unmap",
                     "file": {"driver": "file", "filename": path}})
    rng = random.Random(seed)
    size = n.length
    while True:
        off = rng.randrange(0, size - (2 << 20)) & ~511
        op = rng.random()
        if op < 0.6:
            await n.write(off, bytes([rng.randrange(1, 255)]) * rng.randrange(512, 2 << 20, 512))
        elif op < 0.8:
            await n.write_zeroes(off, rng.randrange(65536, 2 << 20, 65536), may_unmap=True)
        else:
            await n.discard(off & ~0xFFFF, rng.randrange(65536, 2 << 20, 65536))
        print("ok", flush=True)
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=4096,refcount_bits=1"])
def test_kill_during_writes_never_corrupts(tmp_path: Path, opts: str) -> None:
    rng = random.Random(opts)
    img = tmp_path / "crash.qcow2"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for round_ in range(12):
        if round_ % 4 == 0:
            subprocess.run(["qemu-img", "create", "-f", "qcow2", "-o", opts, str(img), "64M"],
                           check=True, capture_output=True)
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(img), str(round_)],
                                 stdout=subprocess.PIPE, env=env)
        assert child.stdout is not None
        for _ in range(rng.randrange(1, 40)):
            assert child.stdout.readline() == b"ok\n"
        child.send_signal(signal.SIGKILL)
        child.wait()
        r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
        assert r.returncode in (0, 3) and "ERROR" not in r.stdout, (round_, r.stdout, r.stderr)
