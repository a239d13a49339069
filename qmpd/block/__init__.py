"""The block layer (L2): node graph, drivers, request path, qemu-io.

Public API: :class:`BlockGraph` (blockdev-add/-del, lookups, queries),
:class:`BlockNode` (requests, hooks, bitmaps, blockers), :func:`run_qemu_io`,
and the errors of :mod:`qmpd.block.errors`.  Only :mod:`qmpd.block.io`
touches files.

The graph, the nodes and the drivers are imported on first use of their
names (PEP 562), so the daemon can import a light part of the package
(:mod:`~qmpd.block.fdsets`, :mod:`~qmpd.block.io`) before it greets and
load the rest afterwards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qmpd.lazy import lazy_names

from qmpd.block.errors import (
    BlockIOError,
    NodeInUse,
    NodeNameError,
    NodeNotFound,
    NodeOpenError,
    ReadOnlyNode,
)

if TYPE_CHECKING:
    from qmpd.block.graph import BlockGraph
    from qmpd.block.node import BeforeWriteHook, BlockNode, HookHandle
    from qmpd.block.qemuio import run_qemu_io

__all__ = [
    "BeforeWriteHook",
    "BlockGraph",
    "BlockIOError",
    "BlockNode",
    "HookHandle",
    "NodeInUse",
    "NodeNameError",
    "NodeNotFound",
    "NodeOpenError",
    "ReadOnlyNode",
    "run_qemu_io",
]

#: Names imported on first use: name -> module.
_LAZY = {
    "BlockGraph": "qmpd.block.graph",
    "BeforeWriteHook": "qmpd.block.node",
    "BlockNode": "qmpd.block.node",
    "HookHandle": "qmpd.block.node",
    "run_qemu_io": "qmpd.block.qemuio",
}

__getattr__ = lazy_names(__name__, globals(), _LAZY)
