"""Guest-side commands: run state, QOM, query-block, block_resize."""

from __future__ import annotations

from typing import Any, TYPE_CHECKING

from qmpd.block.errors import BlockIOError
from qmpd.commands.block import graph_of
from qmpd.commands.context import CommandContext
from qmpd.commands.registry import command
from qmpd.commands.views import block_info
from qmpd.errors import GenericError
from qmpd.machine import Machine

if TYPE_CHECKING:
    # Annotations only: the registry resolves each command's model by name
    # at dispatch time (qmpd.qapi.validate), so importing this module
    # creates no model.
    from qmpd.qapi.models import (
        BlockResizeArgs, ContArgs, QomGetArgs, QomListArgs, QomSetArgs, QueryBlockArgs, QueryStatusArgs,
        StopArgs,
    )

__all__ = ["machine_of"]


def machine_of(ctx: CommandContext) -> Machine:
    """:return: the daemon's machine."""
    machine = ctx.state.machine
    assert machine is not None
    return machine


@command("query-status")
async def query_status(ctx: CommandContext, args: QueryStatusArgs) -> dict[str, Any]:
    """The run state (``prelaunch`` with ``-S``, else ``running``)."""
    return machine_of(ctx).runstate.info()


@command("stop")
async def stop(ctx: CommandContext, args: StopArgs) -> None:
    """running -> paused with STOP; nothing otherwise."""
    machine_of(ctx).runstate.stop()


@command("cont")
async def cont(ctx: CommandContext, args: ContArgs) -> None:
    """Start or resume (RESUME); resets every backend's I/O status."""
    try:
        machine_of(ctx).runstate.cont()
    except ValueError as err:
        raise GenericError("Resetting the Virtual Machine is required") from err


@command("query-block")
async def query_block(ctx: CommandContext, args: QueryBlockArgs) -> list[dict[str, Any]]:
    """BlockBackends (``-drive``, devices); blockdev-add'ed nodes are not listed."""
    return [block_info(b) for b in machine_of(ctx).backends.listed()]


@command("qom-list")
async def qom_list(ctx: CommandContext, args: QomListArgs) -> list[dict[str, str]]:
    """Properties of a machine container or guest device."""
    return machine_of(ctx).qom_list(args.path)


@command("qom-get")
async def qom_get(ctx: CommandContext, args: QomGetArgs) -> Any:
    """Read a device property (``drive`` gives the BlockBackend name)."""
    return machine_of(ctx).qom_get(args.path, args.property)


@command("qom-set")
async def qom_set(ctx: CommandContext, args: QomSetArgs) -> None:
    """``drive``: point the device's BlockBackend at another node."""
    await machine_of(ctx).qom_set(args.path, args.property, args.value)


@command("block_resize")
async def block_resize(ctx: CommandContext, args: BlockResizeArgs) -> None:
    """Grow or shrink the image under a device or node (QEMU's check order)."""
    graph = graph_of(ctx)
    device = args.device
    node = graph.lookup(args.node_name or "", device=device or "")
    if args.size < 0:
        raise GenericError("Parameter 'size' expects a >0 size")
    if node.blockers:
        raise GenericError(f"Device '{device if device is not None else '(null)'}' is in use")
    for parent in node.parents:
        if parent.blockers and parent.driver.is_filter:
            role = next(r for r, c in parent.children.items() if c is node)
            raise GenericError(
                f"Permission conflict on node '{node.node_name}': permissions 'resize' are both "
                f"required by an unnamed block device (uses node '{node.node_name}' as 'root' "
                f"child) and unshared by node '{parent.node_name}' (uses node "
                f"'{node.node_name}' as '{role}' child).")
    if node.read_only:
        raise GenericError("Block node is read-only")
    try:
        await graph.resize(node, args.size)
    except BlockIOError as err:
        if err.errno == 95:
            raise GenericError("Image format driver does not support resize") from err
        raise GenericError(f"Failed to resize: {err.strerror}") from err
