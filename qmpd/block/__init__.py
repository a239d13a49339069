"""The block layer (L2): node graph, drivers, request path, qemu-io.

Public API: :class:`BlockGraph` (blockdev-add/-del, lookups, queries),
:class:`BlockNode` (requests, hooks, bitmaps, blockers), :func:`run_qemu_io`,
and the errors of :mod:`qmpd.block.errors`.  Only :mod:`qmpd.block.io`
touches files.
"""

from qmpd.block.errors import (
    BlockIOError,
    NodeInUse,
    NodeNameError,
    NodeNotFound,
    NodeOpenError,
    ReadOnlyNode,
)
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
