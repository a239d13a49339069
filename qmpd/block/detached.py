"""Nodes the daemon opens for itself, such as drive-backup's target.

QEMU opens drive-backup's target with automatic node names (``#block...``
for the format node and its file child), ``discard=unmap`` and
``detect-zeroes=unmap``; the nodes are listed by query-named-block-nodes,
cannot be deleted with blockdev-del (not owned by the monitor) and are
closed when the job ends.  This is ``BlockGraph.add(..., auto_root=True)``
plus a synchronous close.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qmpd.block.graph import BlockGraph
from qmpd.block.node import BlockNode

__all__ = ["open_detached", "close_detached"]


async def open_detached(graph: BlockGraph, options: Mapping[str, Any]) -> BlockNode:
    """Open ``options`` (a BlockdevOptions mapping without node names) with
    automatic names, owned by the daemon; nothing stays behind on failure.

    :raise NodeOpenError: / :raise NodeNotFound: as blockdev-add.
    """
    return await graph.add(options, auto_root=True)


def close_detached(graph: BlockGraph, node: BlockNode) -> None:
    """Drop ``node`` and its daemon-owned children from the graph and close
    their files, synchronously (flush first if durability matters)."""
    for child in graph.unregister(node):
        if not child.owned_by_monitor and not child.in_use:
            close_detached(graph, child)
