#!/usr/bin/env python3
"""Differential testing: the same QMP requests to QEMU 7.2 and to qmpd, replies compared.

    .venv/bin/python tools/differential.py                 # scripted families + seeds 0..19
    .venv/bin/python tools/differential.py --seeds 0-199 --steps 80
    .venv/bin/python tools/differential.py --family backup --no-random -v

Each run starts ``qemu-system-x86_64 -machine none`` and ``python -m qmpd
--qemu-version 7.2.0`` on their own copies of the same sparse images, sends
both the same requests over raw sockets and compares the normalised replies
and the events each step produced (timestamps dropped, the temp dir written
TEST_DIR, ``#block123`` written ``#blockN``, key order ignored).  Documented
deliberate differences are in ALLOWED.  Exit status 1 on any other difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

Msg = dict[str, Any]
ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
IMAGES = {"src0.img": 16 * MiB, "src1.img": 16 * MiB, "tgt0.img": 16 * MiB, "tgt1.img": 16 * MiB,
          "tgt2.img": 16 * MiB, "small.img": 64 * 1024}
AUTO_NAME = re.compile(r"#block\d+")
TRANSIENT = {"created", "running", "waiting", "aborting", "undefined"}


class Peer:
    """One QMP server (QEMU or qmpd) over a raw UNIX socket."""

    def __init__(self, name: str, argv: Callable[[str], list[str]]) -> None:
        self.name = name
        self.dir = tempfile.mkdtemp(prefix=f"diff-{name}-")
        for img, size in IMAGES.items():
            with open(os.path.join(self.dir, img), "wb") as f:
                f.truncate(size)
        self.sock_path = os.path.join(self.dir, "qmp.sock")
        self.proc = subprocess.Popen(argv(self.sock_path), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, cwd=ROOT)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.01)
        self.sock = socket.socket(socket.AF_UNIX)
        while True:
            try:
                self.sock.connect(self.sock_path)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.buf = b""
        self.jobs: list[Msg] = []  # the last query-jobs answer (from settle)
        self.greeting = self.read(10)
        self.send({"execute": "qmp_capabilities"})

    def read(self, timeout: float) -> Msg | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return None
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"{self.name} closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        msg: Msg = json.loads(line)
        return msg

    def send(self, req: Msg) -> tuple[Msg, list[Msg]]:
        self.sock.sendall(json.dumps(req).replace("TEST_DIR", self.dir).encode())
        events: list[Msg] = []
        while True:
            msg = self.read(30)
            if msg is None:
                raise TimeoutError(f"{self.name}: no reply to {req}")
            if "event" in msg:
                events.append(msg)
            else:
                return msg, events

    def settle(self) -> list[Msg]:
        """Wait until no job is in a transient state (or progress stalls); collect events."""
        events: list[Msg] = []
        last: Any = None
        same = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            reply, evs = self.send({"execute": "query-jobs"})
            events += evs
            jobs = self.jobs = reply.get("return", [])
            if not any(j["status"] in TRANSIENT for j in jobs):
                break
            snap = [(j["id"], j["status"], j["current-progress"]) for j in jobs]
            same = same + 1 if snap == last else 0
            last = snap
            if same >= 8:
                break
            time.sleep(0.02)
        while (msg := self.read(0.05)) is not None:
            events.append(msg)
        return events

    def close(self) -> None:
        self.sock.close()
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        subprocess.run(["rm", "-rf", self.dir], check=False)


def qemu_argv(sock: str) -> list[str]:
    return ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
            "-qmp", f"unix:{sock},server=on,wait=off"]


def qmpd_argv(sock: str) -> list[str]:
    return [str(ROOT / ".venv/bin/python"), "-m", "qmpd", "--socket", sock, "--qemu-version", "7.2.0"]


def normalize(value: Any, test_dir: str) -> Any:
    text = AUTO_NAME.sub("#blockN", json.dumps(value).replace(test_dir, "TEST_DIR"))
    out = json.loads(text)
    if isinstance(out, dict):
        out.pop("timestamp", None)
        ret = out.get("return")
        if isinstance(ret, dict) and "qemu" in ret and "package" in ret:
            ret.pop("package")
            ret.pop("qemu")
    return out


def paths(a: Any, b: Any, at: str = "") -> list[str]:
    """Where ``a`` and ``b`` differ, as short ``path: a != b`` lines."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [x for k in sorted(set(a) | set(b), key=str)
                for x in paths(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{at}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [x for i, (p, q) in enumerate(zip(a, b)) for x in paths(p, q, f"{at}[{i}]")]
    if a == b:
        return []
    sa, sb = json.dumps(a), json.dumps(b)
    return [f"{at or '.'}: qemu {sa[:300]} != qmpd {sb[:300]}"]


def drop_drain_pairs(events: list[Msg]) -> list[Msg]:
    """QEMU's transient paused→running pairs from drains (spec §10: not to be copied)."""
    out: list[Msg] = []
    for ev in events:
        if ev.get("event") == "JOB_STATUS_CHANGE" and ev["data"]["status"] == "running":
            mine = [i for i, e in enumerate(out)  # other jobs' events may come in between
                    if e.get("event") == "JOB_STATUS_CHANGE" and e["data"]["id"] == ev["data"]["id"]]
            if mine and out[mine[-1]]["data"]["status"] == "paused":
                del out[mine[-1]]
                continue
        out.append(ev)
    return out


def backup_targets(req: Msg) -> list[str]:
    """The targets of the backups ``req`` starts (plain or in a transaction):
    node names (blockdev-backup) and filenames (drive-backup)."""
    calls = [(req.get("execute"), req.get("arguments", {}))]
    if req.get("execute") == "transaction":
        calls = [(a.get("type"), a.get("data", {})) for a in req["arguments"].get("actions", [])]
    return [str(args["target"]) for name, args in calls
            if name in ("blockdev-backup", "drive-backup") and "target" in args]


def _sparser_targets_only(qemu: Any, qmpd: Any, targets: set[str]) -> bool:
    """Every difference is an ``actual-size`` of a node over a backup target's
    file, smaller in qmpd (the README: holes are not re-zeroed, so a target
    can stay sparser than QEMU's; nothing else may differ)."""
    if not (isinstance(qemu, dict) and isinstance(qmpd, dict)):
        return False
    ql, ml = qemu.get("return"), qmpd.get("return")
    if not (isinstance(ql, list) and isinstance(ml, list) and len(ql) == len(ml)):
        return False
    files = {n.get("file") for n in ql if isinstance(n, dict) and n.get("node-name") in targets}
    files |= targets
    diffs = paths(qemu, qmpd)
    if not diffs:
        return False
    for p in diffs:
        m = re.match(r"\.return\[(\d+)\]\.image(?:\.backing-image)*\.actual-size: qemu (\d+) != qmpd (\d+)$", p)
        if m is None:
            return False
        i, q, d = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if ql[i].get("file") not in files or not d < q:
            return False
    return True


def allowed(req: Msg, qemu: Any, qmpd: Any, targets: Collection[str] = ()) -> str | None:
    """The name of the documented deliberate difference that explains this one, if any.

    :param targets: node names used as backup targets so far (the holes
        exemption covers only their files, and only when qmpd's is sparser).
    """
    qd, md = json.dumps(qemu), json.dumps(qmpd)
    if "Transaction property" in qd and qd.replace("Transaction property", "transaction property") == md:
        return "transaction-property-spelling"
    if req.get("arguments", {}).get("cpu-index") == 0:
        return "hmp-cpu-index-0"
    if "Permission conflict" in qd and req.get("execute") == "human-monitor-command":
        return "source-node-writes"
    if _sparser_targets_only(qemu, qmpd, set(targets)):
        return "holes-not-rezeroed"
    return None


class Diverged(Exception):
    """An allowed difference after which the two states differ."""


class Runner:
    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.diffs: list[tuple[str, Msg, str]] = []
        self.allowed: dict[str, int] = {}
        self.steps = 0
        self.qemu: Peer | None = None
        self.qmpd: Peer | None = None
        self.label = ""
        self.last_reply: Msg = {}  # QEMU's normalised reply to the last request
        self.targets: set[str] = set()  # backup targets so far (holes exemption)

    def start(self, label: str) -> None:
        self.stop()
        self.label = label
        self.targets = set()
        self.qemu, self.qmpd = Peer("qemu", qemu_argv), Peer("qmpd", qmpd_argv)

    def stop(self) -> None:
        for p in (self.qemu, self.qmpd):
            if p is not None:
                p.close()
        self.qemu = self.qmpd = None

    def run(self, req: Msg, settle: bool = True) -> Msg:
        """Send ``req`` to both; compare; :return: QEMU's normalised reply."""
        assert self.qemu and self.qmpd
        self.steps += 1
        self.targets.update(backup_targets(req))
        out = []
        for p in (self.qemu, self.qmpd):
            try:
                reply, events = p.send(req)
                if settle:
                    events += p.settle()
            except (ConnectionError, TimeoutError) as e:
                reply, events = {"crash": str(e)}, []
            events = drop_drain_pairs([normalize(e, p.dir) for e in events])
            out.append((normalize(reply, p.dir), events))
        (qr, qe), (mr, me) = out
        if self.verbose:
            print(f"[{self.label}] -> {json.dumps(req)}\n   <- {json.dumps(qr)}")
        for what, a, b in (("reply", qr, mr), ("events", qe, me)):
            if a == b:
                continue
            why = allowed(req, a, b, self.targets)
            if why:
                self.allowed[why] = self.allowed.get(why, 0) + 1
                if why == "source-node-writes":
                    raise Diverged(why)  # qmpd wrote, QEMU did not: the states part
                continue
            self.diffs.append((self.label, req, what))
            where = "\n    ".join(paths(a, b)[:6])
            print(f"DIFF [{self.label}] {what}\n  -> {json.dumps(req)}\n    {where}", flush=True)
        if "crash" in qr:
            raise ConnectionError("QEMU died")
        qemu_reply: dict[str, Any] = qr
        self.last_reply = qemu_reply
        return qemu_reply

    def writable(self, backups: dict[str, tuple[str, str | None]], node: str) -> str | None:
        """The node a write meant for ``node`` can go to in QEMU: the topmost filter of the
        backups (``backups``: job -> (source, filter), oldest first) that QEMU still runs
        above it (each new filter goes right above its source), or None if that one is
        auto-named.  QEMU refuses writes below a backup filter, qmpd copies before them."""
        live = {j["id"] for j in (self.qemu.jobs if self.qemu else []) if j["status"] != "concluded"}
        above: dict[str, str] = {}
        for n, (job, (src, flt)) in enumerate(backups.items()):
            if job in live:
                name = flt or f"#auto{n}"
                if src in above:
                    above[name] = above[src]
                above[src] = name
        while node in above:
            node = above[node]
        return None if node.startswith("#auto") else node


# ---------------------------------------------------------------- builders

def ex(cmd: str, **args: Any) -> Msg:
    return {"execute": cmd, "arguments": args} if args else {"execute": cmd}


def raw_node(name: str, img: str, **extra: Any) -> Msg:
    return ex("blockdev-add", driver="raw", **{"node-name": name},
              file={"driver": "file", "filename": f"TEST_DIR/{img}"}, **extra)


def qio(node: str, cmd: str) -> Msg:
    return ex("human-monitor-command", **{"command-line": f'qemu-io {node} "{cmd}"'})


def backup(src: str, tgt: str, sync: str, job: str = "j0", **extra: Any) -> Msg:
    args: Msg = {"device": src, "target": tgt, "sync": sync, "job-id": job, "auto-finalize": False,
                 "x-perf": {"max-workers": 1}}
    return ex("blockdev-backup", **{**args, **extra})


def sha(node: str, name: str) -> Msg:
    return ex("x-debug-block-dirty-bitmap-sha256", node=node, name=name)


def base_setup(r: Runner) -> None:
    r.run(raw_node("drive0", "src0.img"))
    r.run(raw_node("target0", "tgt0.img"))
    for pat, off in ((0x11, 0), (0x22, 3 * MiB), (0x33, 9 * MiB + 4096)):
        r.run(qio("drive0", f"write -P {pat:#x} {off} 1M"))


# ---------------------------------------------------------------- scripted families

def fam_blockdev(r: Runner) -> None:
    f = "TEST_DIR/src0.img"
    for args in (
        {"driver": "file", "node-name": "f0", "filename": f},
        {"driver": "file", "node-name": "f0", "filename": f},
        {"driver": "file", "node-name": "f1", "filename": "TEST_DIR/none.img"},
        {"driver": "file", "node-name": "f2"},
        {"driver": "file", "node-name": "f2", "filename": 3},
        {"driver": "file", "node-name": "f2", "filename": f, "bogus": 1},
        {"driver": "file", "node-name": "f2", "filename": f, "aio": "bogus"},
        {"driver": "file", "node-name": "f2", "filename": f, "read-only": "yes"},
        {"driver": "file", "node-name": "f2", "filename": f, "discard": "unmap", "cache": {"direct": False}},
        {"driver": "nosuch", "node-name": "x"},
        {"driver": "raw", "node-name": "r0", "file": "f0"},
        {"driver": "raw", "node-name": "r1", "file": "nosuch"},
        {"driver": "raw", "node-name": "r1", "file": {"driver": "file"}},
        {"driver": "raw", "node-name": "r1", "file": {"filename": f}},
        {"driver": "raw", "node-name": "r1", "file": "f0", "offset": 4096, "size": 8192},
        {"driver": "raw", "node-name": "r2", "file": "f0", "offset": 100},
        {"driver": "raw", "node-name": "r2", "file": "f0", "size": 1000},
        {"driver": "raw", "node-name": "r2", "file": "f0", "offset": 32 * MiB},
        {"driver": "raw", "node-name": "r2", "file": "f0", "offset": 8 * MiB, "size": 16 * MiB},
        {"driver": "raw", "node-name": "r2", "file": "f0", "offset": -1},
        {"driver": "raw", "node-name": "-bad", "file": "f0"},
        {"driver": "raw", "node-name": "a.b", "file": "f0"},
        {"driver": "raw", "node-name": "", "file": "f0"},
        {"driver": "raw", "node-name": "ok_1-2.3", "file": "f0"},
        {"driver": "null-co", "node-name": "n0"},
        {"driver": "null-co", "node-name": "n1", "size": 1 * MiB, "read-zeroes": True},
        {"driver": "null-co", "node-name": "n2", "size": "big"},
        {"driver": "null-aio", "node-name": "n3", "latency-ns": 5},
        {"driver": "blkdebug", "node-name": "d0", "image": "f0"},
        {"driver": "blkdebug", "node-name": "d1", "image": {"driver": "file", "filename": f},
         "inject-error": [{"event": "read_aio", "errno": 5, "once": True}]},
        {"driver": "blkdebug", "node-name": "d2", "image": "f0", "inject-error": [{"event": "nosuch"}]},
        {"driver": "blkdebug", "node-name": "d2", "image": "f0", "inject-error": [{"errno": 5}]},
        {"driver": "blkdebug", "node-name": "d2", "image": "f0", "align": 3},
        {"driver": "blkdebug", "node-name": "d2"},
    ):
        r.run(ex("blockdev-add", **args))
    r.run(ex("query-named-block-nodes"))
    r.run(ex("query-named-block-nodes", flat=True))
    r.run(ex("query-block"))
    for n in ("f0", "r0", "n0", "nosuch", "d0", "d1", "r1", "f0", "ok_1-2.3", "f0"):
        r.run(ex("blockdev-del", **{"node-name": n}))
    r.run(ex("blockdev-del"))
    r.run(ex("blockdev-del", **{"node-name": 5}))
    r.run(ex("query-named-block-nodes", flat=False))


def fam_bitmaps(r: Runner) -> None:
    base_setup(r)
    for args in ({"node": "drive0", "name": "b0"}, {"node": "drive0", "name": "b1", "granularity": 65536},
                 {"node": "drive0", "name": "b2", "granularity": 1 << 31},
                 {"node": "drive0", "name": "b2", "granularity": 1 << 32},
                 {"node": "drive0", "name": "b3", "disabled": True}, {"node": "drive0", "name": "x" * 1024},
                 {"node": "drive0", "name": "x" * 1023}, {"node": "drive0", "name": 5},
                 {"node": "drive0"}, {"node": "drive0", "name": "b9", "granularity": "4k"},
                 {"node": "target0", "name": "b0", "granularity": 512}):
        r.run(ex("block-dirty-bitmap-add", **args))
    r.run(qio("drive0", "write -P 0x44 1M 2M"))
    r.run(qio("drive0", "write -z -u 5M 64k"))
    r.run(qio("drive0", "discard 6M 128k"))
    r.run(qio("drive0", "flush"))
    r.run(qio("drive0", "read -P 0x44 1M 1M"))
    r.run(ex("query-block"))
    r.run(ex("query-named-block-nodes"))
    for cmd in ("enable", "disable", "clear", "remove"):
        for args in ({"node": "drive0", "name": "b3"}, {"node": "drive0", "name": "nosuch"},
                     {"node": "nosuch", "name": "b3"}, {"node": "drive0"}):
            r.run(ex(f"block-dirty-bitmap-{cmd}", **args))
            r.run(sha("drive0", "b0"))
    for bms in (["b0"], ["b1", {"node": "drive0", "name": "b0"}], [{"node": "target0", "name": "b0"}],
                ["nosuch"], [{"node": "nosuch", "name": "b0"}], [{"node": "drive0"}], "b0", [5],
                [{"node": "drive0", "name": "b0", "x": 1}]):
        r.run(ex("block-dirty-bitmap-merge", node="drive0", target="b1", bitmaps=bms))
        r.run(sha("drive0", "b1"))
    r.run(ex("block-dirty-bitmap-merge", node="drive0", target="nosuch", bitmaps=["b0"]))
    r.run(ex("block-dirty-bitmap-add", node="drive0", name="g512", granularity=512))
    r.run(qio("drive0", "write 7M 1k"))
    r.run(ex("block-dirty-bitmap-merge", node="drive0", target="g512", bitmaps=["b1"]))
    r.run(ex("block-dirty-bitmap-merge", node="drive0", target="b1", bitmaps=["g512"]))
    r.run(sha("drive0", "g512"))
    r.run(sha("drive0", "b1"))
    r.run(sha("drive0", "nosuch"))
    r.run(ex("query-named-block-nodes"))


def fam_transaction(r: Runner) -> None:
    base_setup(r)
    r.run(ex("block-dirty-bitmap-add", node="drive0", name="b0"))
    A = dict  # noqa: N806
    for actions, props in (
        ([A(type="block-dirty-bitmap-add", data=A(node="drive0", name="t1")),
          A(type="block-dirty-bitmap-clear", data=A(node="drive0", name="b0"))], None),
        ([A(type="block-dirty-bitmap-add", data=A(node="drive0", name="t2")), A(type="abort", data=A())], None),
        ([A(type="block-dirty-bitmap-disable", data=A(node="drive0", name="b0")),
          A(type="block-dirty-bitmap-add", data=A(node="drive0", name="t1"))], None),
        ([A(type="block-dirty-bitmap-remove", data=A(node="drive0", name="t1")),
          A(type="block-dirty-bitmap-merge", data=A(node="drive0", target="b0", bitmaps=["t1"]))], None),
        ([A(type="block-dirty-bitmap-add", data=A(node="drive0", name="t3"))], A(**{"completion-mode": "grouped"})),
        ([A(type="nosuch", data=A())], None), ([A(type="abort")], None), ([], None),
        ([A(type="block-dirty-bitmap-enable", data=A(node="drive0", name="b0")),
          A(type="block-dirty-bitmap-remove", data=A(node="drive0", name="b0"))], None),
    ):
        args: Msg = {"actions": actions}
        if props:
            args["properties"] = props
        r.run(ex("transaction", **args))
        r.run(ex("query-named-block-nodes"))


def fam_backup(r: Runner) -> None:
    syncs = [("full", None), ("none", None), ("top", None), ("incremental", "on-success")]
    syncs += [("bitmap", m) for m in ("on-success", "never", "always")]
    for sync, mode in syncs:
        for end in ("job-finalize", "job-cancel"):
            r.start(f"backup-{sync}-{mode}-{end}")
            base_setup(r)
            r.run(ex("block-dirty-bitmap-add", node="drive0", name="bm"))
            r.run(qio("drive0", "write -P 0x55 2M 1M"))
            extra: Msg = {"bitmap": "bm"} if sync in ("bitmap", "incremental") else {}
            if mode and sync == "bitmap":
                extra["bitmap-mode"] = mode
            r.run(backup("drive0", "target0", sync, **extra, **{"filter-node-name": "flt"}))
            r.run(ex("query-jobs"))
            r.run(ex("query-block-jobs"))
            r.run(ex("query-named-block-nodes"))
            r.run(qio("flt", "write -P 0x66 0 4M"))
            r.run(ex(end, id="j0"))
            r.run(ex("query-jobs"))
            r.run(ex("job-dismiss", id="j0"))
            r.run(ex("query-named-block-nodes"))
            r.run(sha("drive0", "bm"))
    r.start("backup-api")
    base_setup(r)
    r.run(ex("block-dirty-bitmap-add", node="drive0", name="bm"))
    r.run(ex("block-dirty-bitmap-add", node="drive0", name="dis", disabled=True))
    for sync, extra in (("bitmap", {}), ("incremental", {}), ("full", {"bitmap": "bm", "bitmap-mode": "bogus"}),
                        ("bitmap", {"bitmap": "nosuch"}), ("incremental", {"bitmap": "bm", "bitmap-mode": "never"}),
                        ("full", {"bitmap-mode": "always"}), ("none", {"bitmap": "bm"}),
                        ("full", {"bitmap": "bm", "bitmap-mode": "never"}), ("top", {"bitmap": "bm"}),
                        ("bitmap", {"bitmap": "dis", "bitmap-mode": "never"}), ("bogus", {}),
                        ("full", {"speed": -1}), ("full", {"x-perf": {"max-chunk": 1}}),
                        ("full", {"on-source-error": "bogus"}), ("full", {"compress": True}),
                        ("full", {"filter-node-name": "1bad"}), ("full", {"filter-node-name": "drive0"})):
        r.run(backup("drive0", "target0", sync, job="bad", **extra))
    r.run(backup("nosuch", "target0", "full"))
    r.run(backup("drive0", "nosuch", "full"))
    r.run(backup("drive0", "drive0", "full"))
    r.run(ex("blockdev-backup", device="drive0", target="target0", sync="full"))
    r.run(ex("query-jobs"))


def fam_jobs(r: Runner) -> None:
    base_setup(r)
    r.run(raw_node("target1", "tgt1.img"))
    verbs = ["job-pause", "job-resume", "job-cancel", "job-complete", "job-finalize", "job-dismiss",
             "block-job-pause", "block-job-resume", "block-job-cancel", "block-job-complete",
             "block-job-finalize", "block-job-dismiss", "block-job-set-speed"]

    def verb(v: str, job: str) -> Msg:
        if v == "block-job-set-speed":
            return ex(v, device=job, speed=0)
        return ex(v, device=job) if v.startswith("block-job") and "finalize" not in v and "dismiss" not in v \
            else ex(v, id=job)

    extra: dict[str, Any] = {"speed": 1, "auto-dismiss": False}
    r.run(backup("drive0", "target0", "full", **extra))
    for v in verbs:
        if v not in ("job-cancel", "block-job-cancel"):
            r.run(verb(v, "j0"))
            r.run(verb(v, "nosuch"))
    r.run(ex("query-block-jobs"))
    r.run(ex("block-job-set-speed", device="j0", speed=-5))
    r.run(ex("block-job-cancel", device="j0", force=True))
    r.run(ex("query-jobs"))
    for v in verbs:
        r.run(verb(v, "j0"))
    r.run(backup("drive0", "target1", "full", job="j1", **{"auto-dismiss": False}))
    for v in verbs:
        r.run(verb(v, "j1"))
    r.run(ex("query-jobs"))
    r.run(ex("blockdev-create", **{"job-id": "c0"}, options={"driver": "file", "filename": "TEST_DIR/new.img",
                                                              "size": MiB}))
    r.run(ex("blockdev-create", **{"job-id": "c1"}, options={"driver": "raw", "filename": "x", "size": 1}))
    r.run(ex("blockdev-create", **{"job-id": "c0"}, options={"driver": "file", "filename": "TEST_DIR/n2.img",
                                                              "size": 512}))
    r.run(ex("query-jobs"))
    for v in verbs:
        r.run(verb(v, "c0"))
    r.run(ex("blockdev-add", driver="file", **{"node-name": "nf"}, filename="TEST_DIR/new.img"))
    r.run(ex("query-named-block-nodes"))
    # drive-backup
    for mode, fmt in (("existing", "raw"), ("absolute-paths", "raw"), ("existing", None), ("bogus", None)):
        a: Msg = {"device": "drive0", "target": "TEST_DIR/tgt2.img", "sync": "full", "mode": mode,
                  "job-id": "d0", "auto-finalize": False}
        if fmt:
            a["format"] = fmt
        r.run(ex("drive-backup", **a))
        r.run(ex("query-jobs"))
        r.run(ex("job-finalize", id="d0"))
        r.run(ex("job-dismiss", id="d0"))
    r.run(ex("drive-backup", device="drive0", target="TEST_DIR/nope/x.img", sync="full", mode="existing"))
    r.run(ex("drive-backup", device="drive0", target="TEST_DIR/tgt2.img", sync="full", mode="existing"))
    r.run(ex("drive-backup", device="drive0", target="TEST_DIR/tgt2.img", sync="full", format="nosuch"))


FAMILIES: dict[str, Callable[[Runner], None]] = {
    "blockdev": fam_blockdev, "bitmaps": fam_bitmaps, "transaction": fam_transaction,
    "backup": fam_backup, "jobs": fam_jobs}


# ---------------------------------------------------------------- random sequences

def random_requests(rng: random.Random, steps: int, r: Runner) -> Iterator[Msg]:
    """Random requests; ``r`` tells which backups QEMU accepted (writes below their filter,
    a deliberate difference, go to the topmost filter or are skipped)."""
    backups: dict[str, tuple[str, str | None]] = {}
    nodes = ["drive0", "target0"]
    bms = ["bm0"]
    names = ["drive0", "target0", "n1", "r1", "f1", "nosuch", "flt", "bm0", ""]
    imgs = ["src1.img", "tgt1.img", "tgt2.img", "small.img", "missing.img"]
    jobs = ["j0", "j1", "c0", "nosuch"]
    job_n = 0
    yield ex("block-dirty-bitmap-add", node="drive0", name="bm0")

    def some(xs: list[str]) -> str:
        return rng.choice(xs) if rng.random() < 0.85 else rng.choice(names)

    for _ in range(steps):
        k = rng.random()
        node, bm = some(nodes), some(bms)
        if k < 0.10:
            name = rng.choice(["n1", "r1", "f1", "1x", "drive0", "x" * 40])
            drv = rng.choice(["file", "raw", "null-co", "blkdebug"])
            a: Msg = {"driver": drv, "node-name": name}
            if drv == "file":
                a["filename"] = f"TEST_DIR/{rng.choice(imgs)}"
            elif drv == "raw":
                a["file"] = rng.choice([{"driver": "file", "filename": f"TEST_DIR/{rng.choice(imgs)}"},
                                        "f1", {"driver": "file"}])
                if rng.random() < 0.3:
                    a["offset"] = rng.choice([0, 512, 4096, 100, 20 * MiB])
                if rng.random() < 0.3:
                    a["size"] = rng.choice([4096, 1000, 8 * MiB, 40 * MiB])
            elif drv == "null-co":
                a["size"] = rng.choice([MiB, 16 * MiB, "x"])
            else:
                a["image"] = rng.choice(["f1", {"driver": "file", "filename": "TEST_DIR/src1.img"}])
            if rng.random() < 0.1:
                a[rng.choice(["extra", "read-only", "cache"])] = rng.choice([1, "on", {"x": 1}])
            if name not in nodes and name in names:
                nodes.append(name)
            yield ex("blockdev-add", **a)
        elif k < 0.14:
            yield ex("blockdev-del", **{"node-name": some(nodes)})
        elif k < 0.20:
            yield rng.choice([ex("query-named-block-nodes"), ex("query-named-block-nodes", flat=True),
                              ex("query-block"), ex("query-jobs"), ex("query-block-jobs")])
        elif k < 0.30:
            name = rng.choice(["bm0", "bm1", "bm2", "bm3", ""])
            a = {"node": node, "name": name}
            if rng.random() < 0.4:
                a["granularity"] = rng.choice([512, 4096, 65536, 1000, 256, 1 << 20])
            if rng.random() < 0.2:
                a["disabled"] = True
            if name and name not in bms:
                bms.append(name)
            yield ex("block-dirty-bitmap-add", **a)
        elif k < 0.40:
            yield ex(f"block-dirty-bitmap-{rng.choice(['remove', 'clear', 'enable', 'disable'])}",
                     node=node, name=bm)
        elif k < 0.46:
            srcs: list[Any] = [rng.choice([some(bms), {"node": some(nodes), "name": some(bms)}])
                               for _ in range(rng.randint(1, 3))]
            yield ex("block-dirty-bitmap-merge", node=node, target=some(bms), bitmaps=srcs)
        elif k < 0.52:
            yield sha(node, bm)
        elif k < 0.64:
            off, ln = rng.randrange(0, 16 * MiB, 512), rng.choice([512, 4096, 65536, MiB])
            cmd = rng.choice([f"write -P 0x{rng.randrange(256):02x} {off} {ln}", f"write -z -u {off} {ln}",
                              f"write -z {off} {ln}", f"discard {off} {ln}", "flush", f"read {off} {ln}"])
            target = rng.choice(["drive0", "drive0", "flt", node])
            top = target if cmd.startswith(("read", "flush")) else r.writable(backups, target)
            if top:
                yield qio(top, cmd)
        elif k < 0.70:
            acts = []
            for _ in range(rng.randint(1, 3)):
                # not "enable": QEMU 7.2 crashes when its prepare fails (NULL bitmap in abort)
                t = rng.choice(["add", "remove", "clear", "disable", "merge", "abort"])
                if t == "abort":
                    acts.append({"type": "abort", "data": {}})
                elif t == "merge":
                    acts.append({"type": "block-dirty-bitmap-merge",
                                 "data": {"node": node, "target": some(bms), "bitmaps": [some(bms)]}})
                else:
                    acts.append({"type": f"block-dirty-bitmap-{t}", "data": {"node": node, "name": some(bms)}})
            yield ex("transaction", actions=acts)
        elif k < 0.80:
            sync = rng.choice(["full", "none", "top", "bitmap", "incremental"])
            a = {"bitmap": some(bms)} if sync in ("bitmap", "incremental") or rng.random() < 0.1 else {}
            if sync == "bitmap" or rng.random() < 0.1:
                a["bitmap-mode"] = rng.choice(["on-success", "never", "always"])
            if rng.random() < 0.5:
                a["filter-node-name"] = "flt"
            if rng.random() < 0.2:
                a["auto-dismiss"] = False
            job = rng.choice(["j0", "j1"])
            job_n += 1
            src = rng.choice(["drive0", "drive0", node])
            yield backup(src, rng.choice(["target0", node]), sync, job=job, **a)
            if "return" in r.last_reply:
                backups.pop(job, None)
                backups[job] = (src, a.get("filter-node-name"))
        elif k < 0.83:
            yield ex("blockdev-create", **{"job-id": "c0"},
                     options={"driver": "file", "filename": f"TEST_DIR/c{job_n}.img", "size": rng.choice([MiB, 0])})
        else:
            v = rng.choice(["finalize", "finalize", "cancel", "dismiss", "dismiss", "pause", "resume",
                            "complete"])
            job = rng.choice(jobs)
            if rng.random() < 0.6:
                yield ex(f"job-{v}", id=job)
            elif v in ("finalize", "dismiss"):
                yield ex(f"block-job-{v}", id=job)
            else:
                yield ex(f"block-job-{v}", device=job)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0-19", help="range A-B or comma list")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--family", action="append", choices=sorted(FAMILIES))
    ap.add_argument("--no-random", action="store_true")
    ap.add_argument("--no-families", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    opts = ap.parse_args()
    r = Runner(opts.verbose)
    try:
        if not opts.no_families:
            for name in opts.family or sorted(FAMILIES):
                r.start(name)
                FAMILIES[name](r)
        if not opts.no_random:
            if "-" in opts.seeds:
                lo, hi = opts.seeds.split("-")
                seeds = list(range(int(lo), int(hi) + 1))
            else:
                seeds = [int(s) for s in opts.seeds.split(",")]
            for seed in seeds:
                r.start(f"seed{seed}")
                base_setup(r)
                try:
                    for req in random_requests(random.Random(seed), opts.steps, r):
                        r.run(req)
                except (ConnectionError, Diverged) as e:
                    print(f"[seed{seed}] stopped: {e}")
    finally:
        r.stop()
    print(f"\n{r.steps} requests, {len(r.diffs)} differences, allowed: {r.allowed or 'none'}")
    return 1 if r.diffs else 0


if __name__ == "__main__":
    sys.exit(main())
