"""qemu-io commands against one node (spec 2.9), as HMP ``qemu-io`` runs them.

:func:`run_qemu_io` parses one command line the way qemu-io does (split on
blanks, GNU getopt, ``cvtnum`` numbers), runs it on a :class:`BlockNode`
and returns what qemu-io would have printed (stdout and stderr together),
e.g.::

    await run_qemu_io(node, "write -P 0x49 0 64k")
    # 'wrote 65536/65536 bytes at offset 0\\n64 KiB, 1 ops; 00.00 sec (...)\\n'

Supported: ``read``/``r``, ``write``/``w``, ``discard``/``d``, ``flush``/``f``.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from qmpd.block.drivers.base import Breakpoints
from qmpd.block.errors import BlockIOError, ReadOnlyNode
from qmpd.block.node import BlockNode

__all__ = ["run_qemu_io", "cvtnum", "cvtstr", "timestr", "QemuIoUsage"]

#: Largest request qemu-io accepts (QEMU's BDRV_REQUEST_MAX_BYTES).
MAX_REQUEST = ((2**31 - 1) >> 9) << 9
_SUFFIXES = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_NUM_RE = re.compile(r"\s*(\d+)(?:(\.\d*))?([A-Za-z]?)\Z")
_HEX_RE = re.compile(r"\s*0[xX]([0-9a-fA-F]+)\Z")


def cvtnum(text: str) -> int:
    """qemu-io's number parser (qemu_strtosz): decimal with an optional
    fraction and suffix ``b k m g t p e`` (any case, powers of 1024), or
    ``0x`` hex without fraction or suffix.

    :return: the value, or ``-EINVAL`` / ``-ERANGE`` as qemu-io does.
    """
    m = _HEX_RE.match(text)
    if m:
        value = int(m.group(1), 16)
        return -errno.ERANGE if value >= 2**64 or value > 2**63 - 1 else value
    m = _NUM_RE.match(text)
    if not m:
        return -errno.EINVAL
    whole, frac, suffix = m.groups()
    if suffix and suffix.lower() not in _SUFFIXES:
        return -errno.EINVAL
    mul = 1024 ** _SUFFIXES[suffix.lower()] if suffix else 1
    fraction = float("0" + frac) if frac else 0.0
    if fraction and mul == 1:
        return -errno.EINVAL
    value = int(whole) * mul + int(fraction * mul)
    if int(whole) >= 2**64 or value >= 2**64 or value > 2**63 - 1:
        return -errno.ERANGE
    return value


def _cvtnum_err(rc: int, arg: str) -> str:
    if rc == -errno.EINVAL:
        return f"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}\n"
    if rc == -errno.ERANGE:
        return f"Parsing error: argument too large -- {arg}\n"
    return f"Parsing error: {arg}\n"


def cvtstr(value: float) -> str:
    for power, unit in ((6, "EiB"), (5, "PiB"), (4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        if value >= 1024**power:
            value /= 1024**power
            break
    else:
        unit = "bytes"
    text = f"{value:f}"
    if text.endswith(".000000"):
        text = text[:-7]
    return f"{text} {unit}"


def timestr(secs: float) -> str:
    if secs < 1:
        return f"{secs:05.2f} sec"
    whole = int(secs)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60 + secs - whole:05.2f}"


def _report(op: str, secs: float, offset: int, count: int, csv: bool) -> str:
    secs = max(secs, 1e-9)
    if csv:
        return f"{count},1,{timestr(secs)},{count / secs:.3f},{1 / secs:.3f}\n"
    return (
        f"{op} {count}/{count} bytes at offset {offset}\n"
        f"{cvtstr(count)}, 1 ops; {timestr(secs)} "
        f"({cvtstr(count / secs)}/sec and {1 / secs:.4f} ops/sec)\n"
    )


def _dump(buf: bytes, offset: int) -> str:
    lines = []
    for i in range(0, len(buf), 16):
        chunk = buf[i : i + 16]
        hexpart = "".join(f"{b:02x} " for b in chunk)
        text = "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else "." for b in chunk)
        lines.append(f"{offset + i:08x}:  {hexpart} {text}\n")
    return "".join(lines)


def _pattern(arg: str) -> int:
    try:
        value = int(arg, 0)
    except ValueError:
        value = -1
    return value if 0 <= value <= 255 else -1


class QemuIoUsage(Exception):
    """Internal: a parse failure; ``text`` is what qemu-io prints."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


@dataclass(frozen=True, slots=True)
class _Cmd:
    name: str
    args: str
    oneline: str
    flags: str  # getopt string
    argmin: int
    argmax: int
    writes: bool
    run: Callable[[BlockNode, dict[str, str], list[str]], Awaitable[str]]

    def usage(self) -> str:
        return f"{self.name} {self.args} -- {self.oneline}\n"


def _getopt(cmd: _Cmd, argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """GNU getopt with permutation; raises QemuIoUsage on unknown options."""
    opts: dict[str, str] = {}
    operands: list[str] = []
    i = 1
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            operands.extend(argv[i:])
            break
        if not arg.startswith("-") or arg == "-":
            operands.append(arg)
            continue
        j = 1
        while j < len(arg):
            ch = arg[j]
            pos = cmd.flags.find(ch)
            if pos < 0 or ch == ":":
                raise QemuIoUsage(f"{argv[0]}: invalid option -- '{ch}'\n{cmd.usage()}")
            if pos + 1 < len(cmd.flags) and cmd.flags[pos + 1] == ":":
                if j + 1 < len(arg):
                    opts[ch] = arg[j + 1 :]
                elif i < len(argv):
                    opts[ch] = argv[i]
                    i += 1
                else:
                    raise QemuIoUsage(
                        f"{argv[0]}: option requires an argument -- '{ch}'\n{cmd.usage()}"
                    )
                break
            opts[ch] = ""
            j += 1
    return opts, operands


def _offset_count(cmd: _Cmd, operands: list[str]) -> tuple[int, int]:
    if len(operands) != 2:
        raise QemuIoUsage(cmd.usage())
    offset = cvtnum(operands[0])
    if offset < 0:
        raise QemuIoUsage(_cvtnum_err(offset, operands[0]))
    count = cvtnum(operands[1])
    if count < 0:
        raise QemuIoUsage(_cvtnum_err(count, operands[1]))
    if count > MAX_REQUEST:
        raise QemuIoUsage(f"length cannot exceed {MAX_REQUEST}, given {operands[1]}\n")
    return offset, count


def _strerror(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


_fill: tuple[int, int, bytes] = (-1, -1, b"")


async def _write(node: BlockNode, opts: dict[str, str], operands: list[str]) -> str:
    global _fill
    out = ""
    zero = "z" in opts
    if "P" in opts:
        pattern = _pattern(opts["P"])
        if pattern < 0:
            return f"{opts['P']} is not a valid pattern byte\n"
    else:
        pattern = 0xCD
    if "b" in opts and zero:
        return "-b and -z cannot be specified at the same time\n"
    if "f" in opts and ("b" in opts or "c" in opts):
        return "-f and -b or -c cannot be specified at the same time\n"
    if "n" in opts and not zero:
        return "-n requires -z to be specified\n"
    if "u" in opts and not zero:
        return "-u requires -z to be specified\n"
    if zero + ("P" in opts) + ("s" in opts) > 1:
        return "Only one of -z, -P, and -s can be specified at the same time\n"
    offset, count = _offset_count(_COMMANDS["write"], operands)
    if "b" in opts or "c" in opts:
        if offset % 512:
            return f"{offset} is not a sector-aligned value for 'offset'\n"
        if count % 512:
            return f"{count} is not a sector-aligned value for 'count'\n"
    start = time.perf_counter()
    try:
        if "b" in opts or "c" in opts or "s" in opts:
            raise BlockIOError(errno.ENOTSUP)
        if zero:
            await node.write_zeroes(offset, count, may_unmap="u" in opts, addressed=True)
        else:
            if _fill[0] != pattern or _fill[1] != count:
                _fill = (pattern, count, bytes([pattern]) * count)
            await node.write(offset, _fill[2])
    except OSError as exc:
        return f"write failed: {_strerror(exc)}\n"
    if "q" not in opts:
        out += _report("wrote", time.perf_counter() - start, offset, count, "C" in opts)
    return out


async def _read(node: BlockNode, opts: dict[str, str], operands: list[str]) -> str:
    cmd = _COMMANDS["read"]
    pattern = -1
    if "P" in opts:
        pattern = _pattern(opts["P"])
        if pattern < 0:
            return f"{opts['P']} is not a valid pattern byte\n"
    pat_off = pat_len = 0
    for key in ("s", "l"):
        if key in opts:
            value = cvtnum(opts[key])
            if value < 0:
                return _cvtnum_err(value, opts[key])
            pat_off, pat_len = (value, pat_len) if key == "s" else (pat_off, value)
    offset, count = _offset_count(cmd, operands)
    if "P" not in opts and ("l" in opts or "s" in opts):
        return cmd.usage()
    if "l" not in opts:
        pat_len = count - pat_off
    if pat_len < 0 or pat_len + pat_off > count:
        return "pattern verification range exceeds end of read data\n"
    if "b" in opts:
        return "read failed: Operation not supported\n"
    start = time.perf_counter()
    try:
        buf = await node.read(offset, count)
    except OSError as exc:
        return f"read failed: {_strerror(exc)}\n"
    secs = time.perf_counter() - start
    out = ""
    if pattern >= 0 and buf[pat_off : pat_off + pat_len] != bytes([pattern]) * pat_len:
        out += f"Pattern verification failed at offset {offset + pat_off}, {pat_len} bytes\n"
    if "q" in opts:
        return out
    if "v" in opts:
        out += _dump(buf, offset)
    return out + _report("read", secs, offset, count, "C" in opts)


async def _discard(node: BlockNode, opts: dict[str, str], operands: list[str]) -> str:
    offset, count = _offset_count(_COMMANDS["discard"], operands)
    start = time.perf_counter()
    try:
        await node.discard(offset, count)
    except OSError as exc:
        return f"discard failed: {_strerror(exc)}\n"
    if "q" in opts:
        return ""
    return _report("discard", time.perf_counter() - start, offset, count, "C" in opts)


async def _flush(node: BlockNode, opts: dict[str, str], operands: list[str]) -> str:
    try:
        await node.flush()
    except OSError:
        pass  # qemu-io's flush prints nothing, even on failure
    return ""


def _blkdebug(node: BlockNode) -> Breakpoints | None:
    """The first driver with breakpoints (blkdebug) down the primary-child
    chain (QEMU's bdrv_debug_breakpoint walk)."""
    cur: BlockNode | None = node
    while cur is not None:
        found = cur.driver.breakpoints()
        if found is not None:
            return found
        cur = cur.primary_child
    return None


def _debug_cmd(name: str) -> Callable[[BlockNode, dict[str, str], list[str]], Awaitable[str]]:
    async def run(node: BlockNode, opts: dict[str, str], operands: list[str]) -> str:
        drv = _blkdebug(node)
        try:
            if drv is None:
                raise BlockIOError(errno.ENOTSUP)
            if name == "break":
                drv.add_breakpoint(operands[0], operands[1])
            elif name == "remove_break":
                drv.remove_breakpoint(operands[0])
            elif name == "resume":
                drv.resume(operands[0])
            else:
                await drv.wait_suspended(operands[0])
        except BlockIOError as exc:
            return f"{name}: {_strerror(exc)}\n"
        return ""
    return run


_COMMANDS: dict[str, _Cmd] = {
    "break": _Cmd("break", "event tag", "sets a breakpoint on event and tags the stopped request as tag",
                  "", 2, 2, False, _debug_cmd("break")),
    "remove_break": _Cmd("remove_break", "tag", "remove a breakpoint by tag",
                         "", 1, 1, False, _debug_cmd("remove_break")),
    "resume": _Cmd("resume", "tag", "resumes the request tagged as tag",
                   "", 1, 1, False, _debug_cmd("resume")),
    "wait_break": _Cmd("wait_break", "tag", "waits for the suspension of a request",
                       "", 1, 1, False, _debug_cmd("wait_break")),
    "read": _Cmd("read", "[-abCqv] [-P pattern [-s off] [-l len]] off len",
                 "reads a number of bytes at a specified offset",
                 "abCqrvP:s:l:", 2, -1, False, _read),
    "write": _Cmd("write", "[-bcCfnquz] [-P pattern | -s source_file] off len",
                  "writes a number of bytes at a specified offset",
                  "bcCfnquzrP:s:", 2, -1, True, _write),
    "discard": _Cmd("discard", "[-Cq] off len",
                    "discards a number of bytes at a specified offset",
                    "Cq", 2, -1, True, _discard),
    "flush": _Cmd("flush", "", "flush all in-core file state to disk", "", 0, 0, False, _flush),
}
_ALIASES = {"r": "read", "w": "write", "d": "discard", "f": "flush"}


async def run_qemu_io(node: BlockNode, command: str) -> str:
    """Run one qemu-io ``command`` on ``node``.

    I/O errors, pattern mismatches and parse errors do not raise: they are
    part of the returned text, as qemu-io prints them (``"write failed:
    Input/output error"``).

    :return: what qemu-io would print ("" for an empty line or ``flush``).
    :raise ReadOnlyNode: ``"Block node is read-only"`` for write/discard on a
        read-only node (QEMU prints this on the monitor, not stdout).
    """
    argv = command.split()
    if not argv:
        return ""
    cmd = _COMMANDS.get(_ALIASES.get(argv[0], argv[0]))
    if cmd is None:
        return f'command "{argv[0]}" not found\n'
    nargs = len(argv) - 1
    if nargs < cmd.argmin or (cmd.argmax != -1 and nargs > cmd.argmax):
        if cmd.argmax == 0:
            return f"command {argv[0]} doesn't take any arguments\n"
        return f"command {argv[0]} requires at least {cmd.argmin} argument(s)\n"
    if cmd.writes and node.read_only:
        raise ReadOnlyNode("Block node is read-only")
    try:
        opts, operands = _getopt(cmd, argv)
        return await cmd.run(node, opts, operands)
    except QemuIoUsage as exc:
        return exc.text
