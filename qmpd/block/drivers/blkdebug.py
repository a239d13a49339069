"""Driver ``blkdebug``: a filter that injects errors (spec section 6).

State machine, with state starting at 1.  When event E is raised on this
node, every rule for E whose ``state`` is 0/absent or the current state
applies: the first applicable ``set-state`` rule (configuration order)
gives the next state, taken only after all rules of E were looked at;
applicable ``inject-error`` rules replace the *active* set (which is left
alone if none applies).  Each later request checks the active rules in
order; the first one whose ``sector`` (if any) lies inside the request and
whose ``iotype`` matches fails it with ``errno`` (default EIO), and is
deleted if ``once``.  Example (iotest 257)::

    set-state  flush_to_disk state 1 -> 2;  read_aio state 2 -> 3
    inject     read_aio state 3 errno 5 once
    flush (after a write) -> state 2; read -> state 3, succeeds;
    read -> error active, read fails with EIO, rule gone; reads succeed.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qmpd.block.drivers.base import BaseDriver, BlockDriver, OpenContext
from qmpd.block.errors import BlockIOError

if TYPE_CHECKING:
    from qmpd.block.node import BlockNode

__all__ = ["BlkdebugDriver", "InjectRule", "SetStateRule", "open_blkdebug", "IOTYPES"]

#: BlkdebugIOType values.
IOTYPES = ("read", "write", "write-zeroes", "discard", "flush", "block-status")
_DEFAULT_IOTYPES = frozenset(IOTYPES) - {"block-status"}


@dataclass(eq=False, slots=True)
class InjectRule:
    """One ``inject-error`` entry."""

    event: str
    state: int
    iotypes: frozenset[str]
    errno: int
    #: Byte offset (``sector * 512``) that must lie in the request, or -1.
    offset: int
    once: bool


@dataclass(eq=False, slots=True)
class SetStateRule:
    """One ``set-state`` entry."""

    event: str
    state: int
    new_state: int


class BlkdebugDriver(BaseDriver):
    """Forwards everything to its ``image`` child after checking rules."""

    name = "blkdebug"
    is_filter = True
    has_events = True
    is_protocol = True

    def __init__(
        self, image: BlockNode, inject: Iterable[InjectRule], set_state: Iterable[SetStateRule]
    ) -> None:
        self.image = image
        #: Current state (starts at 1).
        self.state = 1
        self._rules: dict[str, list[InjectRule | SetStateRule]] = {}
        rules: list[InjectRule | SetStateRule] = [*inject, *set_state]
        for rule in rules:
            self._rules.setdefault(rule.event, []).append(rule)
        self._active: list[InjectRule] = []

    @property
    def length(self) -> int:
        return self.image.length

    @property
    def filename(self) -> str:
        return f"blkdebug::{self.image.driver.filename}"

    @property
    def active_rules(self) -> list[InjectRule]:
        """The currently armed inject-error rules (a copy)."""
        return list(self._active)

    def debug_event(self, event: str) -> None:
        rules = self._rules.get(event)
        if not rules:
            return
        new_state: int | None = None
        injected = False
        for rule in rules:
            if rule.state and rule.state != self.state:
                continue
            if isinstance(rule, InjectRule):
                if not injected:
                    self._active = []
                    injected = True
                self._active.append(rule)
            elif new_state is None:
                new_state = rule.new_state
        if new_state is not None:
            self.state = new_state

    def _check(self, iotype: str, offset: int, length: int) -> None:
        if not self._active:
            return
        for rule in self._active:
            if iotype in rule.iotypes and (
                rule.offset < 0 or (length > 0 and offset <= rule.offset < offset + length)
            ):
                break
        else:
            return
        if not rule.errno:
            return
        if rule.once:
            self._active.remove(rule)
            self._rules[rule.event].remove(rule)
        raise BlockIOError(rule.errno)

    async def pread(self, offset: int, length: int) -> bytes:
        self._check("read", offset, length)
        return await self.image.read(offset, length)

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check("write", offset, len(data))
        await self.image.write(offset, data)

    async def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self._check("write-zeroes", offset, length)
        await self.image.write_zeroes(offset, length, may_unmap=may_unmap)

    async def pdiscard(self, offset: int, length: int) -> None:
        self._check("discard", offset, length)
        await self.image.discard(offset, length)

    async def flush_to_disk(self) -> None:
        self._check("flush", 0, 0)

    async def block_status(self, offset: int, length: int) -> tuple[bool, int]:
        self._check("block-status", offset, length)
        return await self.image.block_status(offset, length)

    def actual_size(self) -> int | None:
        return self.image.driver.actual_size()


def _inject_rule(opts: Mapping[str, Any]) -> InjectRule:
    iotype = opts.get("iotype")
    sector = opts.get("sector")
    return InjectRule(
        event=str(opts["event"]),
        state=int(opts.get("state", 0)),
        iotypes=_DEFAULT_IOTYPES if iotype is None else frozenset({str(iotype)}),
        errno=int(opts.get("errno", _errno.EIO)),
        offset=-1 if sector is None or int(sector) < 0 else int(sector) * 512,
        once=bool(opts.get("once", False)),
    )


def _set_state_rule(opts: Mapping[str, Any]) -> SetStateRule:
    return SetStateRule(
        event=str(opts["event"]),
        state=int(opts.get("state", 0)),
        new_state=int(opts["new_state"]),
    )


async def open_blkdebug(
    options: Mapping[str, Any], ctx: OpenContext
) -> tuple[BlockDriver, dict[str, BlockNode]]:
    """Open the ``image`` child and load the rules.

    ``config`` files, ``align`` and the transfer limits are accepted and
    ignored.
    """
    inject = [_inject_rule(r) for r in options.get("inject-error", ())]
    set_state = [_set_state_rule(r) for r in options.get("set-state", ())]
    image = await ctx.open_child(options["image"], "image")
    return BlkdebugDriver(image, inject, set_state), {"image": image}
