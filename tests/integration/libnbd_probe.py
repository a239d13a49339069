"""Drive an NBD server with libnbd's Python bindings and print what it saw.

Run by the tests with the system Python (Debian's python3-libnbd)::

    /usr/bin/python3 libnbd_probe.py SCENARIO SOCKET

Prints one JSON object; the test asserts on it.  Errors are recorded as
their errno name (``nbd.Error.errno``), never raised.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

import nbd

MiB = 1 << 20


def handle(sock: str, export: str, *, opt: bool = False, structured: bool = True,
           contexts: tuple[str, ...] = (), strict: bool = True) -> Any:
    h = nbd.NBD()
    h.set_export_name(export)
    h.set_request_structured_replies(structured)
    for ctx in contexts:
        h.add_meta_context(ctx)
    if opt:
        h.set_opt_mode(True)
    if not strict:
        h.set_strict_mode(0)
    h.connect_unix(sock)
    return h


def err(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except nbd.Error as exc:
        return {"errno": exc.errno}


def flags(h: Any) -> dict[str, Any]:
    return {k: getattr(h, k)() for k in ("is_read_only", "can_flush", "can_fua", "can_trim", "can_zero",
                                         "can_fast_zero", "can_df", "can_multi_conn", "can_cache")}


def options(sock: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    h = handle(sock, "ro", opt=True)
    names: list[tuple[str, str]] = []
    h.opt_list(lambda name, desc: names.append((name, desc)) or 0)
    out["list"] = names
    h.set_full_info(True)
    h.opt_info()
    out["info"] = {"size": h.get_size(), "description": h.get_export_description(),
                   "canonical": h.get_canonical_export_name(),
                   "block": [h.get_block_size(k) for k in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED,
                                                           nbd.SIZE_MAXIMUM)],
                   **flags(h)}
    for query in ((), ("qemu:",), ("qemu:dirty-bitmap:",), ("base:allocation",), ("nope:x",)):
        h.clear_meta_contexts()
        for q in query:
            h.add_meta_context(q)
        seen: list[str] = []
        h.opt_list_meta_context(lambda name: seen.append(name) or 0)
        out[f"meta {' '.join(query) or '(all)'}"] = seen
    h.set_export_name("missing")
    out["info missing"] = err(h.opt_info)
    h.set_export_name("ro")
    h.clear_meta_contexts()
    h.add_meta_context("base:allocation")
    h.add_meta_context("qemu:dirty-bitmap:b0")
    h.opt_go()
    out["structured"] = h.get_structured_replies_negotiated()
    out["contexts"] = [c for c in ("base:allocation", "qemu:dirty-bitmap:b0", "qemu:allocation-depth")
                       if h.can_meta_context(c)]
    h.shutdown()
    a = handle(sock, "ro", opt=True)
    a.opt_abort()
    out["abort"] = a.aio_is_closed()
    n = handle(sock, "ro", structured=False)
    out["unstructured"] = {"structured": n.get_structured_replies_negotiated(),
                           "data": n.pread(4096, MiB) == _file_bytes(MiB, 4096), **flags(n)}
    out["unstructured block_status"] = err(lambda: n.block_status(4096, 0, lambda *a: 0))
    n.shutdown()
    return out


_FILE = ""


def _file_bytes(offset: int, length: int) -> bytes:
    with open(_FILE, "rb") as f:
        f.seek(offset)
        return f.read(length)


def reads(sock: str) -> dict[str, Any]:
    h = handle(sock, "ro")
    chunks: list[tuple[int, int, int]] = []

    def chunk(sub: Any, offset: int, status: int, error: Any) -> int:
        chunks.append((offset, len(sub), status))
        return 0

    buf = h.pread_structured(4 * MiB, 0, chunk)
    out: dict[str, Any] = {"same": buf == _file_bytes(0, 4 * MiB), "chunks": sorted(chunks)}
    chunks.clear()
    buf = h.pread_structured(4 * MiB, 0, chunk, flags=nbd.CMD_FLAG_DF)
    out["df"] = {"same": buf == _file_bytes(0, 4 * MiB), "chunks": len(chunks)}
    h.cache(MiB, 0)
    out["cache"] = "ok"
    out["flush"] = err(h.flush) or "ok"
    h.shutdown()
    return out


def block_status(sock: str) -> dict[str, Any]:
    h = handle(sock, "ro", contexts=("base:allocation", "qemu:dirty-bitmap:b0", "qemu:allocation-depth"))
    seen: dict[str, list[int]] = {}

    def cb(meta: str, offset: int, entries: list[int], error: Any) -> int:
        seen.setdefault(meta, []).extend(entries)
        return 0

    size = h.get_size()
    h.block_status(size, 0, cb)
    out: dict[str, Any] = {"all": seen}
    seen = {}
    h.block_status(size, 0, cb, flags=nbd.CMD_FLAG_REQ_ONE)
    out["one"] = seen
    h.shutdown()
    return out


def writes(sock: str) -> dict[str, Any]:
    h = handle(sock, "rw")
    out: dict[str, Any] = {"flags": flags(h)}
    h.pwrite(b"\xaa" * 65536, 0)
    h.pwrite(b"\xbb" * 4096, 65536, flags=nbd.CMD_FLAG_FUA)
    h.zero(2 * 65536, 65536)                                    # (count, offset); may punch a hole
    out["after zero"] = h.pread(4, 65536).hex()
    h.pwrite(b"\xbb" * 4096, 65536)
    h.zero(4 * 65536, 65536, flags=nbd.CMD_FLAG_NO_HOLE)
    out["after zero no hole"] = h.pread(4, 65536).hex()
    out["fast zero"] = err(lambda: h.zero(6 * 65536, 65536, flags=nbd.CMD_FLAG_FAST_ZERO)) or "ok"
    out["fast zero no hole"] = err(lambda: h.zero(8 * 65536, 65536,
                                                  flags=nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE))
    h.pwrite(b"\xcc" * 65536, 10 * 65536)
    h.trim(10 * 65536, 65536)
    h.flush()
    out["read back"] = [h.pread(4, o).hex() for o in (0, 65536, 10 * 65536)]
    h.shutdown()
    return out


def errors(sock: str) -> dict[str, Any]:
    h = handle(sock, "ro", strict=False)
    size = h.get_size()
    out: dict[str, Any] = {
        "read past end": err(lambda: h.pread(4096, size)),
        "read across end": err(lambda: h.pread(8192, size - 4096)),
        "read 33 MiB": err(lambda: h.pread(33 * MiB, 0)),
        "write ro": err(lambda: h.pwrite(b"x" * 512, 0)),
        "zero ro": err(lambda: h.zero(512, 0)),
        "trim ro": err(lambda: h.trim(512, 0)),
        "bad flags": err(lambda: h.pread(512, 0, flags=nbd.CMD_FLAG_REQ_ONE)),
        "fua flush": err(lambda: h.flush(flags=nbd.CMD_FLAG_FUA)) or "ok",
        "status not negotiated": err(lambda: h.block_status(4096, 0, lambda *a: 0)),
    }
    out["still works"] = h.pread(4096, 0) == _file_bytes(0, 4096)
    h.shutdown()
    w = handle(sock, "rw", strict=False)
    out["write 33 MiB"] = err(lambda: w.pwrite(b"\1" * (33 * MiB), 0))
    out["write past end"] = err(lambda: w.pwrite(b"\1" * 512, w.get_size()))
    out["rw still works"] = w.pread(4, 0).hex()
    w.shutdown()
    return out


SCENARIOS: dict[str, Callable[[str], dict[str, Any]]] = {
    "options": options, "reads": reads, "block_status": block_status,
    "writes": writes, "errors": errors,
}



def pull(sock: str, export: str, bitmap: str, target: str) -> dict[str, Any]:
    """A pull-mode backup client: read only the extents the exported bitmap
    marks dirty and write them into ``target`` at the same offsets."""
    ctx = f"qemu:dirty-bitmap:{bitmap}"
    h = handle(sock, export, contexts=(ctx,))
    size = h.get_size()
    dirty: list[list[int]] = []
    pos = 0
    while pos < size:
        got: list[int] = []

        def cb(meta: str, offset: int, entries: list[int], error: Any) -> int:
            if meta == ctx:
                got.extend(entries)
            return 0

        h.block_status(min(size - pos, 1 << 30), pos, cb)
        for i in range(0, len(got), 2):
            n, flag = got[i], got[i + 1]
            if flag & 1:
                if dirty and dirty[-1][0] + dirty[-1][1] == pos:
                    dirty[-1][1] += n
                else:
                    dirty.append([pos, n])
            pos += n
    with open(target, "r+b") as f:
        for off, n in dirty:
            done = 0
            while done < n:
                step = min(n - done, 16 * MiB)
                f.seek(off + done)
                f.write(h.pread(step, off + done))
                done += step
    h.shutdown()
    return {"dirty": dirty}


SCENARIOS["pull"] = lambda sock: pull(sock, *sys.argv[3:6])


if __name__ == "__main__":
    _FILE = sys.argv[3] if len(sys.argv) > 3 else ""
    print(json.dumps(SCENARIOS[sys.argv[1]](sys.argv[2])))
