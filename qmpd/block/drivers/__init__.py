"""Block drivers, one module each, behind :class:`BlockDriver`.

:data:`DRIVERS` maps a QAPI driver name to its :class:`DriverSpec` (the
opener plus what ``blockdev-add`` must know before opening).  Each driver
module exports its ``SPEC``; a new driver adds one line here.  What the
generic code may ask a driver is listed in :mod:`qmpd.block.drivers.base`.
"""

from __future__ import annotations

from qmpd.block.drivers import blkdebug, cbw, file, null, raw, snapshot_access
from qmpd.block.drivers.base import (
    BaseDriver,
    BlockDriver,
    DriverOpener,
    DriverSpec,
    FileWindow,
    OpenContext,
)
from qmpd.block.drivers.qcow2 import driver as qcow2

__all__ = [
    "BaseDriver",
    "BlockDriver",
    "DRIVERS",
    "DriverOpener",
    "DriverSpec",
    "FileWindow",
    "OpenContext",
    "register_driver",
    "freeze_drivers",
]

#: Driver name -> spec.
DRIVERS: dict[str, DriverSpec] = {
    "file": file.SPEC,
    "raw": raw.SPEC,
    "null-co": null.SPEC,
    "null-aio": null.SPEC,
    "blkdebug": blkdebug.SPEC,
    "copy-before-write": cbw.SPEC,
    "snapshot-access": snapshot_access.SPEC,
    "qcow2": qcow2.SPEC,
}


_frozen = False


def freeze_drivers() -> None:
    """No more :func:`register_driver` (the daemon calls this in setup)."""
    global _frozen
    _frozen = True


def register_driver(name: str, opener: DriverOpener | DriverSpec) -> None:
    """Make ``blockdev-add`` accept ``driver: name`` (a bare opener is a
    non-format driver).

    :raise ValueError: the name is already registered.
    """
    if _frozen:
        raise RuntimeError(f"driver table frozen; cannot register {name!r}")
    if name in DRIVERS:
        raise ValueError(f"driver {name!r} already registered")
    DRIVERS[name] = opener if isinstance(opener, DriverSpec) else DriverSpec(opener)
