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

import asyncio
import errno as _errno
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qmpd.block.drivers.base import BaseDriver, BlockDriver, DriverSpec, OpenContext
from qmpd.block.errors import BlockIOError, NodeOpenError
from qmpd.qapi.ghash import qdict_json, qdict_order

if TYPE_CHECKING:
    from qmpd.block.node import BlockNode

__all__ = ["BlkdebugDriver", "SPEC", "InjectRule", "SetStateRule", "open_blkdebug", "IOTYPES",
           "BLKDEBUG_EVENTS"]

#: QEMU 7.2's BlkdebugEvent names (``break`` refuses others with ENOENT).
BLKDEBUG_EVENTS = frozenset("""
    l1_update l1_grow_alloc_table l1_grow_write_table l1_grow_activate_table
    l2_load l2_update l2_update_compressed l2_alloc_cow_read l2_alloc_write
    read_aio read_backing_aio read_compressed write_aio write_compressed
    vmstate_load vmstate_save cow_read cow_write reftable_load reftable_grow
    reftable_update refblock_load refblock_update refblock_update_part
    refblock_alloc refblock_alloc_hookup refblock_alloc_write
    refblock_alloc_write_blocks refblock_alloc_write_table
    refblock_alloc_switch_table cluster_alloc cluster_alloc_bytes
    cluster_free flush_to_os flush_to_disk pwritev_rmw_head
    pwritev_rmw_after_head pwritev_rmw_tail pwritev_rmw_after_tail pwritev
    pwritev_zero pwritev_done empty_image_prepare l1_shrink_write_table
    l1_shrink_free_l2_clusters cor_write cluster_alloc_space none
""".split())

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
        #: Flattened options that make QEMU name the node ``json:{...}``.
        self.strong: dict[str, Any] = {}
        #: Breakpoints (qemu-io ``break EVENT TAG``), one-shot, in order.
        self._breaks: list[tuple[str, str]] = []
        #: Suspended requests: (tag, future resolved by resume).
        self._suspended: list[tuple[str, asyncio.Future[None]]] = []
        #: Suspensions raised by an event, taken by the next request.
        self._pending: list[asyncio.Future[None]] = []
        self._changed: asyncio.Event | None = None

    @property
    def length(self) -> int:
        return self.image.length

    @property
    def filename(self) -> str:
        if self.strong or self.image.driver.filename.startswith("json:"):
            return "json:" + qdict_json(self.full_options(), copied=True)
        return f"blkdebug::{self.image.driver.filename}"

    def full_options(self) -> dict[str, Any]:
        if not self.strong and not self.image.driver.filename.startswith("json:"):
            return super().full_options()
        return {"driver": "blkdebug", "image": self.image.driver.full_options(), **self.strong}

    @property
    def active_rules(self) -> list[InjectRule]:
        """The currently armed inject-error rules (a copy)."""
        return list(self._active)

    # ------------------------------------------------------------ breakpoints
    # qemu-io's break/remove_break/resume/wait_break (QEMU's blkdebug
    # suspend rules): a breakpoint fires once, on the first request raising
    # its event, and holds that request until its tag is resumed.

    def breakpoints(self) -> BlkdebugDriver:
        return self

    def add_breakpoint(self, event: str, tag: str) -> None:
        """``break EVENT TAG``.  :raise BlockIOError: ENOENT, unknown event."""
        if event not in BLKDEBUG_EVENTS:
            raise BlockIOError(_errno.ENOENT)
        self._breaks.append((event, tag))

    def remove_breakpoint(self, tag: str) -> None:
        """``remove_break TAG``: drop its breakpoints, resume its requests.

        :raise BlockIOError: ENOENT when the tag is unknown."""
        found = self._resume(tag)
        before = len(self._breaks)
        self._breaks = [b for b in self._breaks if b[1] != tag]
        if not found and len(self._breaks) == before:
            raise BlockIOError(_errno.ENOENT)

    def resume(self, tag: str) -> None:
        """``resume TAG``.  :raise BlockIOError: ENOENT, nothing suspended."""
        if not self._resume(tag):
            raise BlockIOError(_errno.ENOENT)

    def is_suspended(self, tag: str) -> bool:
        return any(t == tag for t, _ in self._suspended)

    async def wait_suspended(self, tag: str) -> None:
        """``wait_break TAG``: return once a request is held under ``tag``."""
        while not self.is_suspended(tag):
            if self._changed is None:
                self._changed = asyncio.Event()
            self._changed.clear()
            await self._changed.wait()

    def _resume(self, tag: str) -> bool:
        found = False
        for entry in list(self._suspended):
            if entry[0] == tag:
                self._suspended.remove(entry)
                if not entry[1].done():
                    entry[1].set_result(None)
                found = True
        return found

    def _fire_breakpoint(self, event: str) -> None:
        for entry in self._breaks:
            if entry[0] == event:
                self._breaks.remove(entry)
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._suspended.append((entry[1], fut))
                self._pending.append(fut)
                if self._changed is not None:
                    self._changed.set()
                return

    async def _hold(self) -> None:
        """A request raised a breakpoint's event: wait until resumed."""
        while self._pending:
            await self._pending.pop(0)

    def debug_event(self, event: str) -> None:
        if self._breaks:
            self._fire_breakpoint(event)
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
        if self._pending:
            await self._hold()
        self._check("read", offset, length)
        return await self.image.read(offset, length)

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self._pending:
            await self._hold()
        self._check("write", offset, len(data))
        await self.image.write(offset, data)

    async def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        if self._pending:
            await self._hold()
        self._check("write-zeroes", offset, length)
        await self.image.write_zeroes(offset, length, may_unmap=may_unmap)

    async def pdiscard(self, offset: int, length: int) -> None:
        self._check("discard", offset, length)
        await self.image.discard(offset, length)

    async def flush_to_disk(self) -> None:
        if self._pending:
            await self._hold()
        self._check("flush", 0, 0)

    async def block_status(self, offset: int, length: int) -> tuple[bool, int]:
        self._check("block-status", offset, length)
        return await self.image.block_status(offset, length)

    def actual_size(self) -> int | None:
        return None  # QEMU 7.2 lists no actual-size for blkdebug

    async def truncate(self, size: int) -> None:
        await self.image.driver.truncate(size)


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


def _check_limits(options: Mapping[str, Any]) -> None:
    """QEMU's constraint checks on ``align`` and the transfer limits (in its order).

    :raise NodeOpenError: ``Cannot meet constraints with NAME VALUE``.
    """
    def get(key: str) -> int:
        return int(options.get(key, 0))

    align = get("align")
    if align and (align >= 0x7FFFFFFF or align & (align - 1)):
        raise NodeOpenError(f"Cannot meet constraints with align {align}")
    align = max(align, 1)
    opt_wz, opt_dis = get("opt-write-zero"), get("opt-discard")
    for key, unit in (("max-transfer", align), ("opt-write-zero", align),
                      ("max-write-zero", max(opt_wz, align)), ("opt-discard", align),
                      ("max-discard", max(opt_dis, align))):
        value = get(key)
        if value and (value % unit or (key == "max-transfer" and value >= 0x7FFFFFFF)):
            raise NodeOpenError(f"Cannot meet constraints with {key} {value}")


async def open_blkdebug(
    options: Mapping[str, Any], ctx: OpenContext
) -> tuple[BlockDriver, dict[str, BlockNode]]:
    """Open the ``image`` child and load the rules.

    ``config`` files are accepted and ignored; ``align`` and the transfer
    limits are checked as QEMU checks them, then ignored.
    """
    inject = [_inject_rule(r) for r in options.get("inject-error", ())]
    set_state = [_set_state_rule(r) for r in options.get("set-state", ())]
    image = await ctx.open_child(options["image"], "image")
    _check_limits(options)
    driver = BlkdebugDriver(image, inject, set_state)
    driver.strong = _strong_options(options)
    return driver, {"image": image}


_STRONG = ("config", "align", "max-transfer", "opt-write-zero", "max-write-zero", "opt-discard",
           "max-discard")


def _strong_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options QEMU lists in a blkdebug node's ``json:`` filename, flattened
    (``inject-error.0.event``) in QDict order of each rule."""
    out: dict[str, Any] = {}
    for key in ("inject-error", "set-state"):
        for i, rule in enumerate(options.get(key, ())):
            for member in qdict_order(list(rule)):
                out[f"{key}.{i}.{member}"] = rule[member]
    out.update((k, options[k]) for k in _STRONG if k in options)
    return out


#: ``blockdev-add`` driver ``blkdebug``.
SPEC = DriverSpec(open_blkdebug, is_format=BlkdebugDriver.is_format)
