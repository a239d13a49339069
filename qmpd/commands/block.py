"""Block graph commands: blockdev-add/del, query-named-block-nodes."""

from __future__ import annotations

from typing import Any

from qmpd.block import BlockGraph
from qmpd.commands.context import CommandContext
from qmpd.commands.registry import command

__all__ = ["graph_of"]


def graph_of(ctx: CommandContext) -> BlockGraph:
    """:return: the daemon's block graph."""
    graph = ctx.state.block
    assert graph is not None
    return graph


@command("blockdev-add")
async def blockdev_add(ctx: CommandContext, args: Any) -> None:
    """Open a node (and its inline children) from BlockdevOptions."""
    options = args.root.model_dump(mode="json", by_alias=True, exclude_none=True)
    await graph_of(ctx).add(options)


@command("blockdev-del")
async def blockdev_del(ctx: CommandContext, args: Any) -> None:
    """Close a node the monitor owns; refused while anything uses it."""
    await graph_of(ctx).delete(args.node_name)


@command("query-named-block-nodes")
async def query_named_block_nodes(ctx: CommandContext, args: Any) -> list[dict[str, Any]]:
    """Every named node, in creation order (BlockDeviceInfo, QEMU 7.2 shape)."""
    return graph_of(ctx).info(flat=bool(args.flat))

