"""Dirty bitmap commands and their transaction actions (spec §5.3, §2.6)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from collections.abc import Iterator

from qmpd.bitmap import BitmapList, DirtyBitmap, merge
from qmpd.bitmap.errors import empty_name
from qmpd.bitmap.hbitmap import HBitmap
from qmpd.block import BlockIOError, BlockNode
from qmpd.commands.actions import Action, BaseAction, TxnContext, action, run_actions
from qmpd.commands.block import graph_of
from qmpd.commands.context import CommandContext
from qmpd.commands.registry import command
from qmpd.errors import GenericError

if TYPE_CHECKING:
    # Annotations only: the registry resolves each command's model by name
    # at dispatch time (qmpd.qapi.validate), so importing this module
    # creates no model.
    from qmpd.qapi.models import (
        BlockDirtyBitmap,
        BlockDirtyBitmapAdd,
        BlockDirtyBitmapAddArgs,
        BlockDirtyBitmapClearArgs,
        BlockDirtyBitmapDisableArgs,
        BlockDirtyBitmapEnableArgs,
        BlockDirtyBitmapMerge,
        BlockDirtyBitmapMergeArgs,
        BlockDirtyBitmapRemoveArgs,
        XDebugBlockDirtyBitmapSha256Args,
    )

__all__: list[str] = []


def _lookup(ctx: CommandContext, node_name: str, name: str) -> tuple[BlockNode, DirtyBitmap]:
    """QEMU's bitmap lookup: "Node '%s' not found", then "Dirty bitmap '%s' not found"."""
    node = graph_of(ctx).lookup_node(node_name)
    return node, node.bitmaps.lookup(name)


class AddAction(BaseAction):
    """block-dirty-bitmap-add: undo removes the new bitmap."""

    def __init__(self, ctx: CommandContext, data: BlockDirtyBitmapAdd, txn: TxnContext) -> None:
        self.ctx, self.data = ctx, data
        self.node: BlockNode | None = None
        self.bitmap: DirtyBitmap | None = None

    async def prepare(self) -> None:
        d = self.data
        if d.name == "":
            raise empty_name()
        self.node = graph_of(self.ctx).lookup(d.node)
        self.bitmap = self.node.bitmaps.add(d.name, d.granularity, disabled=bool(d.disabled),
                                            persistent=bool(d.persistent))

    async def abort(self) -> None:
        if self.node is not None and self.bitmap is not None:
            self.node.bitmaps.remove(self.bitmap)


class RemoveAction(BaseAction):
    """block-dirty-bitmap-remove: busy until commit, released then."""

    def __init__(self, ctx: CommandContext, data: BlockDirtyBitmap, txn: TxnContext) -> None:
        self.ctx, self.data = ctx, data
        self.node: BlockNode | None = None
        self.bitmap: DirtyBitmap | None = None

    async def prepare(self) -> None:
        self.node, self.bitmap = _lookup(self.ctx, self.data.node, self.data.name)
        BitmapList.check_can_remove(self.bitmap)
        self.bitmap.busy = True

    def commit(self) -> None:
        assert self.node is not None and self.bitmap is not None
        self.bitmap.busy = False
        self.node.bitmaps.remove(self.bitmap)

    async def abort(self) -> None:
        if self.bitmap is not None:
            self.bitmap.busy = False


class ClearAction(BaseAction):
    """block-dirty-bitmap-clear: undo restores the old bits."""

    def __init__(self, ctx: CommandContext, data: BlockDirtyBitmap, txn: TxnContext) -> None:
        self.ctx, self.data = ctx, data
        self.bitmap: DirtyBitmap | None = None
        self.saved: HBitmap | None = None

    async def prepare(self) -> None:
        _, self.bitmap = _lookup(self.ctx, self.data.node, self.data.name)
        BitmapList.check_can_clear(self.bitmap)
        self.saved = self.bitmap.snapshot()
        self.bitmap.clear()

    async def abort(self) -> None:
        if self.bitmap is not None and self.saved is not None:
            self.bitmap.restore(self.saved)

    def clean(self) -> None:
        self.saved = None


class ToggleAction(BaseAction):
    """block-dirty-bitmap-enable/-disable: undo restores the previous state."""

    def __init__(self, ctx: CommandContext, data: BlockDirtyBitmap, txn: TxnContext, *, enable: bool) -> None:
        self.ctx, self.data, self.enable = ctx, data, enable
        self.bitmap: DirtyBitmap | None = None
        self.was_disabled = False

    async def prepare(self) -> None:
        _, self.bitmap = _lookup(self.ctx, self.data.node, self.data.name)
        BitmapList.check_can_enable(self.bitmap)
        self.was_disabled = self.bitmap.disabled
        self.bitmap.disabled = not self.enable

    async def abort(self) -> None:
        if self.bitmap is not None:
            self.bitmap.disabled = self.was_disabled


class MergeAction(BaseAction):
    """block-dirty-bitmap-merge: all-or-nothing; undo restores the target."""

    def __init__(self, ctx: CommandContext, data: BlockDirtyBitmapMerge, txn: TxnContext) -> None:
        self.ctx, self.data = ctx, data
        self.target: DirtyBitmap | None = None
        self.saved: HBitmap | None = None

    def _sources(self, node: BlockNode) -> Iterator[DirtyBitmap]:
        for src in self.data.bitmaps:
            if isinstance(src, str):
                yield node.bitmaps.lookup(src)
            else:
                yield _lookup(self.ctx, src.node, src.name)[1]

    async def prepare(self) -> None:
        node, self.target = _lookup(self.ctx, self.data.node, self.data.target)
        saved = self.target.snapshot()
        merge(self.target, self._sources(node))
        self.saved = saved

    async def abort(self) -> None:
        if self.target is not None and self.saved is not None:
            self.target.restore(self.saved)

    def clean(self) -> None:
        self.saved = None


action("block-dirty-bitmap-add")(AddAction)
action("block-dirty-bitmap-remove")(RemoveAction)
action("block-dirty-bitmap-clear")(ClearAction)
action("block-dirty-bitmap-merge")(MergeAction)


@action("block-dirty-bitmap-enable")
def _enable(ctx: CommandContext, data: BlockDirtyBitmap, txn: TxnContext) -> ToggleAction:
    return ToggleAction(ctx, data, txn, enable=True)


@action("block-dirty-bitmap-disable")
def _disable(ctx: CommandContext, data: BlockDirtyBitmap, txn: TxnContext) -> ToggleAction:
    return ToggleAction(ctx, data, txn, enable=False)


async def _one(ctx: CommandContext, act: Action) -> None:
    await run_actions([act])
    await sync_persistent(ctx, [act])


#: Actions whose effect on persistent bitmaps must be durable before the
#: reply (clear needs no sync: a stored bitmap may hold more, never less).
_SYNCED = (AddAction, RemoveAction, ToggleAction, MergeAction)


async def sync_persistent(ctx: CommandContext, actions: list[Action]) -> None:
    """Store the persistent bitmaps the committed ``actions`` changed
    (``--state-dir``; a no-op otherwise)."""
    graph = graph_of(ctx)
    if graph.bitmap_state is None:
        return
    nodes = []
    for act in actions:
        if isinstance(act, _SYNCED):
            node = graph.get(act.data.node)
            if node is not None and node not in nodes:
                nodes.append(node)
    if nodes:
        try:
            await graph.sync_bitmaps(nodes)
        except BlockIOError as exc:
            raise GenericError(f"Cannot store persistent bitmaps in '{graph.bitmap_state.path}': "
                               f"{exc.strerror}") from exc


@command("block-dirty-bitmap-add")
async def block_dirty_bitmap_add(ctx: CommandContext, args: BlockDirtyBitmapAddArgs) -> None:
    """Create a bitmap, enabled unless ``disabled``."""
    await _one(ctx, AddAction(ctx, args, TxnContext()))


@command("block-dirty-bitmap-remove")
async def block_dirty_bitmap_remove(ctx: CommandContext, args: BlockDirtyBitmapRemoveArgs) -> None:
    await _one(ctx, RemoveAction(ctx, args, TxnContext()))


@command("block-dirty-bitmap-clear")
async def block_dirty_bitmap_clear(ctx: CommandContext, args: BlockDirtyBitmapClearArgs) -> None:
    await _one(ctx, ClearAction(ctx, args, TxnContext()))


@command("block-dirty-bitmap-enable")
async def block_dirty_bitmap_enable(ctx: CommandContext, args: BlockDirtyBitmapEnableArgs) -> None:
    await _one(ctx, ToggleAction(ctx, args, TxnContext(), enable=True))


@command("block-dirty-bitmap-disable")
async def block_dirty_bitmap_disable(ctx: CommandContext, args: BlockDirtyBitmapDisableArgs) -> None:
    await _one(ctx, ToggleAction(ctx, args, TxnContext(), enable=False))


@command("block-dirty-bitmap-merge")
async def block_dirty_bitmap_merge(ctx: CommandContext, args: BlockDirtyBitmapMergeArgs) -> None:
    await _one(ctx, MergeAction(ctx, args, TxnContext()))


@command("x-debug-block-dirty-bitmap-sha256")
async def x_debug_block_dirty_bitmap_sha256(
    ctx: CommandContext, args: XDebugBlockDirtyBitmapSha256Args
) -> dict[str, str]:
    """SHA-256 of the bitmap's bits as QEMU lays them out (spec §5.6)."""
    _, bitmap = _lookup(ctx, args.node, args.name)
    return {"sha256": bitmap.hbitmap.sha256()}
