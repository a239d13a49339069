"""Nodes the daemon opens for itself, such as drive-backup's target.

QEMU opens drive-backup's target with automatic node names (``#block...``
for the format node and its file child), ``discard=unmap`` and
``detect-zeroes=unmap``; the nodes are listed by query-named-block-nodes,
cannot be deleted with blockdev-del (not owned by the monitor) and are
closed when the job ends.  ``BlockGraph.add`` is blockdev-add and insists on
a root node-name, so this module uses the graph's own opener.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qmpd.block.drivers.cbw import unregister_node
from qmpd.block.graph import BlockGraph
from qmpd.block.node import BlockNode

__all__ = ["open_detached", "close_detached"]


async def open_detached(graph: BlockGraph, options: Mapping[str, Any]) -> BlockNode:
    """Open ``options`` (a BlockdevOptions mapping without node names) with
    automatic names, owned by the daemon; nothing stays behind on failure.

    :raise NodeOpenError: / :raise NodeNotFound: as blockdev-add.
    """
    created: list[BlockNode] = []
    mine: set[str] = set()
    try:
        node = await graph._open(options, {}, created, mine)
    except BaseException:
        for n in reversed(created):
            n.detach_children()
            n.close()
        raise
    finally:
        graph._reserved -= mine
    for n in created:
        graph.add_node(n)
    return node


def close_detached(graph: BlockGraph, node: BlockNode) -> None:
    """Drop ``node`` and its daemon-owned children from the graph and close
    their files, synchronously (flush first if durability matters)."""
    children = node.detach_children()
    unregister_node(graph, node)
    for child in children:
        if not child.owned_by_monitor and not child.in_use:
            close_detached(graph, child)
