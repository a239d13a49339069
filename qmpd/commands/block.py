"""Block graph commands: blockdev-add/del, query-named-block-nodes."""

from __future__ import annotations

from typing import Any, TYPE_CHECKING

from qmpd.block import BlockGraph, BlockNode
from qmpd.commands.context import CommandContext
from qmpd.commands.registry import command
from qmpd.commands.views import named_block_nodes

if TYPE_CHECKING:
    # Annotations only: the registry resolves each command's model by name
    # at dispatch time (qmpd.qapi.validate), so importing this module
    # creates no model.
    from qmpd.qapi.models import (
        BlockdevAddArgs,
        BlockdevDelArgs,
        QueryNamedBlockNodesArgs,
    )

__all__ = ["graph_of", "add_blockdev"]


def graph_of(ctx: CommandContext) -> BlockGraph:
    """:return: the daemon's block graph."""
    graph = ctx.state.block
    assert graph is not None
    return graph


async def add_blockdev(graph: BlockGraph, args: BlockdevAddArgs) -> BlockNode:
    """The one path from typed BlockdevOptions (the per-driver branch model
    built by the schema service) to the graph, shared by ``blockdev-add``
    and ``--blockdev``: the options reach the drivers as the wire mapping
    of exactly what was given (the domain sees no pydantic models).

    :raise QMPError: blockdev-add's errors.
    """
    options = args.root.model_dump(mode="json", by_alias=True, exclude_none=True)
    return await graph.add(options)


@command("blockdev-add")
async def blockdev_add(ctx: CommandContext, args: BlockdevAddArgs) -> None:
    """Open a node (and its inline children) from BlockdevOptions."""
    await add_blockdev(graph_of(ctx), args)


@command("blockdev-del")
async def blockdev_del(ctx: CommandContext, args: BlockdevDelArgs) -> None:
    """Close a node the monitor owns; refused while anything uses it."""
    await graph_of(ctx).delete(args.node_name)


@command("query-named-block-nodes")
async def query_named_block_nodes(ctx: CommandContext, args: QueryNamedBlockNodesArgs) -> list[dict[str, Any]]:
    """Every named node, in creation order (BlockDeviceInfo, QEMU 7.2 shape)."""
    return named_block_nodes(graph_of(ctx), flat=bool(args.flat))

