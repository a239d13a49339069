"""``human-monitor-command``: the few HMP commands qmpd speaks.

HMP output lines end in ``\\r\\n`` as QEMU's monitor writes them.  The table
below drives both dispatch and ``help``/``info`` listings, whose shape
qmp-shell's ``-H`` mode parses at connect (first token of every ``help``
line, second token of every ``info`` line).
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qmpd.block.qemuio import run_qemu_io
from qmpd.commands.context import CommandContext
from qmpd.commands.registry import command
from qmpd.commands.views import query_block_jobs
from qmpd.errors import DeviceNotFound, GenericError, QMPError

if TYPE_CHECKING:
    # Annotations only: the registry resolves each command's model by name
    # at dispatch time (qmpd.qapi.validate), so importing this module
    # creates no model.
    from qmpd.qapi.models import HumanMonitorCommandArgs

__all__: list[str] = []

log = logging.getLogger(__name__)

HmpHandler = Callable[[CommandContext, str], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class HmpCommand:
    """One HMP command (or ``info`` subcommand)."""

    names: str  # "quit|q"
    params: str  # "[-d] [device] ..." as in QEMU's help
    help: str
    handler: HmpHandler

    @property
    def line(self) -> str:
        return f"{self.names} {self.params} -- {self.help}"


def _version(ctx: CommandContext) -> str:
    return ctx.state.config.version_text() + "\r\n"


async def _info_version(ctx: CommandContext, rest: str) -> str:
    return _version(ctx)


async def _info_status(ctx: CommandContext, rest: str) -> str:
    machine = ctx.state.machine
    status = machine.runstate.status if machine is not None else "running"
    if status == "running":
        return "VM status: running\r\n"
    if status == "paused":
        return "VM status: paused\r\n"
    return f"VM status: paused ({status})\r\n"


async def _info_block(ctx: CommandContext, rest: str) -> str:
    machine = ctx.state.machine
    return machine.info_block() if machine is not None else ""


async def _info_name(ctx: CommandContext, rest: str) -> str:
    name = ctx.state.config.name
    return "" if name is None else f"{name}\r\n"


async def _info_block_jobs(ctx: CommandContext, rest: str) -> str:
    jobs = query_block_jobs(ctx.state.jobs) if ctx.state.jobs is not None else []
    if not jobs:
        return "No active jobs\r\n"
    lines = []
    for j in jobs:
        lines.append(
            f"Type {j['type']}, device {j['device']}: Completed {j['offset']} of {j['len']} bytes,"
            f" speed limit {j['speed']} bytes/s\r\n"
        )
    return "".join(lines)


INFO_COMMANDS: tuple[HmpCommand, ...] = (
    HmpCommand("info block", "[-n] [-v] [device]", "show info of one block device or all block devices "
               "(-n: show named nodes; -v: show details)", _info_block),
    HmpCommand("info block-jobs", "", "show progress of ongoing block device operations", _info_block_jobs),
    HmpCommand("info name", "", "show the current VM name", _info_name),
    HmpCommand("info status", "", "show the current VM status (running|paused)", _info_status),
    HmpCommand("info version", "", "show the version of QEMU", _info_version),
)


async def _help(ctx: CommandContext, rest: str) -> str:
    if rest:
        for cmd in COMMANDS:
            if rest in cmd.names.split("|"):
                return cmd.line + "\r\n"
        if rest == "info":
            return "".join(c.line + "\r\n" for c in INFO_COMMANDS)
        return f"unknown command: '{rest}'\r\n"
    return "".join(c.line + "\r\n" for c in COMMANDS)


async def _info(ctx: CommandContext, rest: str) -> str:
    if not rest:
        return "".join(c.line + "\r\n" for c in INFO_COMMANDS)
    sub = rest.split(None, 1)
    for cmd in INFO_COMMANDS:
        if cmd.names == f"info {sub[0]}":
            return await cmd.handler(ctx, sub[1] if len(sub) > 1 else "")
    return f"unknown command: 'info {sub[0]}'\r\n"


async def _qemu_io(ctx: CommandContext, rest: str) -> str:
    try:
        words = shlex.split(rest)
    except ValueError as err:
        return f"qemu-io: {err}\r\n"
    qdev = bool(words) and words[0] == "-d"
    if qdev:
        words = words[1:]
    if not words:
        return 'qemu-io: block device name expected\r\nTry "help qemu-io" for more information\r\n'
    if len(words) < 2:
        return 'qemu-io: string expected\r\nTry "help qemu-io" for more information\r\n'
    name, io_cmd = words[0], " ".join(words[1:])
    graph = ctx.state.block
    assert graph is not None
    machine = ctx.state.machine
    # -d: a qdev id; else a BlockBackend name first, then a node name.  The
    # request goes to the backend's current root (through a swapped filter).
    node = None
    if qdev:
        if machine is None:
            raise DeviceNotFound(f"Device '{name}' not found")
        node = machine.backend_by_qdev(name).root
    else:
        found, node = graph.backend_root(name)
        if not found:
            node = graph.lookup(name, device="")
    if node is None:
        raise GenericError(f"Device '{name}' has no medium")
    ctx.detach()  # long I/O: let block-free commands of other clients through
    output = await run_qemu_io(node, io_cmd)
    if output:
        ctx.state.console(output)
    for line in output.splitlines():
        log.info("qemu-io %s: %s", name, line)
    return ""


async def _quit(ctx: CommandContext, rest: str) -> str:
    await ctx.state.request_shutdown("host-qmp-quit")
    return ""


COMMANDS: tuple[HmpCommand, ...] = (
    HmpCommand("help|?", "[cmd]", "show the help", _help),
    HmpCommand("info", "[subcommand]", "show various information about the system state", _info),
    HmpCommand(
        "qemu-io",
        '[-d] [device] "[command]"',
        "run a qemu-io command on a block device (-d: [device] is a device ID rather than a node name)",
        _qemu_io,
    ),
    HmpCommand("quit|q", "", "quit the emulator", _quit),
)


async def run_hmp(ctx: CommandContext, line: str) -> str:
    """Run one HMP command line; :return: its output text."""
    stripped = line.strip()
    if not stripped:
        return ""
    parts = stripped.split(None, 1)
    word, rest = parts[0], (parts[1].strip() if len(parts) > 1 else "")
    for cmd in COMMANDS:
        if word in cmd.names.split("|"):
            return await cmd.handler(ctx, rest)
    return f"unknown command: '{word}'\r\n"


@command("human-monitor-command")
async def human_monitor_command(ctx: CommandContext, args: HumanMonitorCommandArgs) -> str:
    """Run an HMP command line; the output comes back as a string."""
    if args.cpu_index not in (None, 0):
        # qmpd has one notional CPU, index 0: qmp-shell -H always sends
        # cpu-index 0 (QEMU's ``-machine none`` has no CPU and refuses it).
        raise GenericError("Parameter 'cpu-index' expects a CPU number")
    try:
        return await run_hmp(ctx, args.command_line)
    except QMPError as err:
        return f"Error: {err.desc}\r\n"
