"""Block drivers, one module each, behind :class:`BlockDriver`.

:data:`DRIVERS` maps a QAPI driver name to its opener; other layers may
add theirs (e.g. ``copy-before-write``) with :func:`register_driver`.
"""

from __future__ import annotations

from qmpd.block.drivers.base import BaseDriver, BlockDriver, DriverOpener, OpenContext
from qmpd.block.drivers.blkdebug import open_blkdebug
from qmpd.block.drivers.file import open_file
from qmpd.block.drivers.null import open_null
from qmpd.block.drivers.qcow2.driver import open_qcow2
from qmpd.block.drivers.raw import open_raw

__all__ = ["BaseDriver", "BlockDriver", "DRIVERS", "DriverOpener", "OpenContext", "register_driver"]

#: Driver name -> opener.
DRIVERS: dict[str, DriverOpener] = {
    "file": open_file,
    "raw": open_raw,
    "null-co": open_null,
    "null-aio": open_null,
    "blkdebug": open_blkdebug,
    "qcow2": open_qcow2,
}


def register_driver(name: str, opener: DriverOpener) -> None:
    """Make ``blockdev-add`` accept ``driver: name``.

    :raise ValueError: the name is already registered.
    """
    if name in DRIVERS:
        raise ValueError(f"driver {name!r} already registered")
    DRIVERS[name] = opener
