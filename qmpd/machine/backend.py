"""BlockBackends: the named, guest-facing handle on a root node.

QEMU's ``-drive id=drive0`` creates a BlockBackend ``drive0`` whose root is
an auto-named node; ``-device ...,drive=NODE`` attaches an anonymous one.
``device`` arguments of QMP commands find a BlockBackend by name before a
node by name (:meth:`BackendTable.resolve`), so backups and ``qemu-io
drive0`` go through whatever root a ``qom-set ... drive`` swapped in.

The root node's ``backend`` attribute holds the BlockBackend name: jobs take
it as their default ``job-id`` and ``blockdev-del`` refuses such a node
("Node %s is in use").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qmpd.block.node import BlockNode
    from qmpd.machine.devices import Device

__all__ = ["BlockBackend", "BackendTable"]


@dataclass(eq=False)
class BlockBackend:
    """One BlockBackend; ``name`` is "" for an anonymous one."""

    name: str
    root: BlockNode | None = None
    device: Device | None = None
    werror: str = "enospc"
    rerror: str = "report"
    writeback: bool = True
    #: Removable medium (a CD-ROM drive).
    removable: bool = False
    #: ``ok``, ``failed`` or ``nospace`` (query-block's io-status).
    io_status: str = "ok"

    def attach(self, node: BlockNode | None) -> None:
        """Make ``node`` the root (detaching the old one)."""
        if self.root is not None and self.root.backend == self.name:
            self.root.backend = None
        self.root = node
        if node is not None:
            node.backend = self.name


class BackendTable:
    """Every BlockBackend, in creation order (query-block's order)."""

    def __init__(self) -> None:
        self._all: list[BlockBackend] = []

    def __iter__(self) -> Iterator[BlockBackend]:
        return iter(list(self._all))

    def add(self, backend: BlockBackend) -> None:
        self._all.append(backend)
        if backend.root is not None:
            backend.root.backend = backend.name

    def get(self, name: str) -> BlockBackend | None:
        """:return: the backend called ``name`` (never an anonymous one)."""
        if not name:
            return None
        for b in self._all:
            if b.name == name:
                return b
        return None

    def names(self) -> set[str]:
        return {b.name for b in self._all if b.name}

    def listed(self) -> list[BlockBackend]:
        """query-block: named backends and those attached to a device."""
        return [b for b in self._all if b.name or b.device is not None]
