"""Drivers ``null-co`` and ``null-aio``: no storage; reads return zeroes,
writes vanish.  ``size`` defaults to 1 GiB; ``latency-ns`` delays every
request."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from qmpd.block.drivers.base import BaseDriver, BlockDriver, DriverSpec, OpenContext
from qmpd.qapi.ghash import qdict_json

if TYPE_CHECKING:
    from qmpd.block.node import BlockNode

__all__ = ["NullDriver", "SPEC", "open_null"]


class NullDriver(BaseDriver):
    """See the module docstring.  Block status reports zeroes only with
    ``read-zeroes`` (otherwise the content is undefined, i.e. data)."""

    is_protocol = True

    def __init__(self, name: str, size: int, read_zeroes: bool, latency_ns: int,
                 explicit: dict[str, Any] | None = None) -> None:
        self.name = name
        #: ``size``/``read-zeroes`` as given: QEMU then names the node ``json:{...}``.
        self.explicit = explicit or {}
        self._size = size
        self.read_zeroes = read_zeroes
        self._latency = latency_ns / 1e9

    @property
    def length(self) -> int:
        return self._size

    @property
    def filename(self) -> str:
        if self.explicit:
            return "json:" + qdict_json(self.full_options())
        return f"{self.name}://"

    def full_options(self) -> dict[str, Any]:
        return {"driver": self.name, **self.explicit}

    def actual_size(self) -> int | None:
        return 0  # QEMU lists actual-size 0 for null nodes

    async def _delay(self) -> None:
        if self._latency:
            await asyncio.sleep(self._latency)

    async def pread(self, offset: int, length: int) -> bytes:
        await self._delay()
        return bytes(length)

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        await self._delay()

    async def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        await self._delay()

    async def pdiscard(self, offset: int, length: int) -> None:
        await self._delay()

    async def flush_to_disk(self) -> None:
        await self._delay()

    async def block_status(self, offset: int, length: int) -> tuple[bool, int]:
        return (not self.read_zeroes), length


async def open_null(
    options: Mapping[str, Any], ctx: OpenContext
) -> tuple[BlockDriver, dict[str, BlockNode]]:
    """Open a null node; never fails."""
    return (
        NullDriver(
            str(options["driver"]),
            int(options.get("size", 1 << 30)),
            bool(options.get("read-zeroes", False)),
            int(options.get("latency-ns", 0)),
            {k: options[k] for k in ("read-zeroes", "size") if k in options},
        ),
        {},
    )


#: ``blockdev-add`` driver ``null-co`` and ``null-aio``.
SPEC = DriverSpec(open_null, is_format=NullDriver.is_format)
