"""The node graph: ``blockdev-add``, ``blockdev-del`` and node lookups.

Options arrive as a plain, schema-validated mapping shaped like QAPI
``BlockdevOptions`` (dashed keys).  Children are inline mappings (opened
here, auto-named ``#block<n><2 digits>`` when nameless, owned by their
parent) or the node-name of an existing node::

    g = BlockGraph()
    await g.add({"driver": "raw", "node-name": "drive0",
                 "file": {"driver": "file", "filename": "/x.img"}})
    g.names()   # ['drive0', '#block123']  (listing order, see below)

Order: QEMU keeps named nodes in the order they were named and
query-named-block-nodes lists them newest first.  A format or filter
driver (``raw``, ``copy-before-write``) has its ``file`` child opened before
it is named (a format driver, ``DriverSpec.is_format``, even before its
name is checked); a protocol driver (``blkdebug``) is named before it opens its
children, and so are a filter's other children (``target``).  So one
blockdev-add of raw over file lists ``drive0`` then its file node, and a
later blockdev-add comes before both.  :meth:`BlockGraph.names`, iteration
and query-named-block-nodes all use this listing order.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Container, Iterator, Mapping
from typing import Any

from qmpd.block.drivers import DRIVERS, OpenContext
from qmpd.block.errors import NodeInUse, NodeNameError, NodeNotFound, NodeOpenError
from qmpd.block.io import IOPool, shared_pool
from qmpd.block.node import BlockNode
from qmpd.block.persist import BitmapStateDir

log = logging.getLogger(__name__)

__all__ = ["BlockGraph", "MAX_NODE_NAME"]

#: Longest node-name (QEMU's 32-byte buffer minus the NUL).
MAX_NODE_NAME = 31
_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")


class BlockGraph:
    """All nodes, in QEMU's listing order (module docstring).

    :param device_names: BlockBackend (device) names, which node-names must
        not clash with (the machine's backends).
    :param rng: random source for the two digits of automatic names.
    """

    def __init__(
        self,
        *,
        device_names: Callable[[], Container[str]] | None = None,
        rng: random.Random | None = None,
        pool: IOPool | None = None,
        bitmap_state: BitmapStateDir | None = None,
        emit_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        #: Worker threads for every file the graph's nodes open.
        self.pool = pool or shared_pool()
        #: ``backend_root(name)`` -> (a BlockBackend ``name`` exists, its
        #: root or None without medium).  Set by the machine (qmpd.machine);
        #: block/ knows no devices.
        self.backend_root: Callable[[str], tuple[bool, BlockNode | None]] = lambda name: (False, None)
        #: ``root_moved(old, new)``: :meth:`replace_node` moved ``old``'s
        #: parents to ``new``; BlockBackends on ``old`` follow (the machine).
        self.root_moved: Callable[[BlockNode, BlockNode], None] = lambda old, new: None
        #: Drivers report events (BLOCK_IMAGE_CORRUPTED) through this.
        self.emit_event = emit_event
        #: Named nodes in QEMU's naming order (the reverse of the listing).
        self._nodes: dict[str, BlockNode] = {}
        self._counter = 0
        self.device_names = device_names or (lambda: ())
        self._rng = rng or random.Random()
        self._reserved: set[str] = set()
        #: Names of the nodes whose driver is being opened (outermost first).
        self._opening: list[str] = []
        #: ``--state-dir``: persistent bitmaps of raw nodes (None: refused).
        self.bitmap_state = bitmap_state

    # ------------------------------------------------------------ lookups

    def __iter__(self) -> Iterator[BlockNode]:
        """Nodes in listing order (query-named-block-nodes: newest first)."""
        return iter(list(reversed(self._nodes.values())))

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, name: object) -> bool:
        return name in self._nodes

    def names(self) -> list[str]:
        """:return: node-names in listing order."""
        return list(reversed(self._nodes))

    def get(self, name: str) -> BlockNode | None:
        """:return: the node called ``name``, or None."""
        return self._nodes.get(name)

    def lookup(self, name: str, *, device: str | None = None) -> BlockNode:
        """Device-or-node lookup (blockdev-backup, bitmap-add, HMP qemu-io):
        a BlockBackend called ``device`` first (its root), then a node
        called ``name``, as QEMU's bdrv_lookup_bs.

        :param device: the device name to look up and print; defaults to
            ``name`` (backup and bitmap-add give the same name twice; HMP
            and node-name-only arguments give "").
        :raise NodeNotFound: ``"Cannot find device='%s' nor node-name='%s'"``,
            ``"Device '%s' has no medium"``.
        """
        dev = name if device is None else device
        if dev:
            found, root = self.backend_root(dev)
            if found:
                if root is None:
                    raise NodeNotFound(f"Device '{dev}' has no medium")
                return root
        node = self._nodes.get(name) if name else None
        if node is None:
            raise NodeNotFound(f"Cannot find device='{dev}' nor node-name='{name}'")
        return node

    def lookup_node(self, name: str) -> BlockNode:
        """Lookup of the bitmap commands (remove/clear/enable/.../sha256).

        :raise NodeNotFound: ``"Node '%s' not found"``.
        """
        node = self._nodes.get(name)
        if node is None:
            raise NodeNotFound(f"Node '{name}' not found")
        return node

    # ------------------------------------------------------------ names

    def check_node_name(self, name: str) -> None:
        """Apply the node-name rules in QEMU's order.

        :raise NodeNameError: ``"Invalid node-name: '%s'"``,
            ``"node-name=%s is conflicting with a device id"``,
            ``"Duplicate nodes with node-name='%s'"``, ``"Node name too long"``.
        """
        if not _NAME_RE.match(name):
            raise NodeNameError(f"Invalid node-name: '{name}'")
        if name in self.device_names():
            raise NodeNameError(f"node-name={name} is conflicting with a device id")
        if name in self._nodes or name in self._reserved:
            raise NodeNameError(f"Duplicate nodes with node-name='{name}'")
        if len(name) > MAX_NODE_NAME:
            raise NodeNameError("Node name too long")

    def generate_name(self) -> str:
        """:return: a fresh ``#block<counter><2 random digits>`` name."""
        while True:
            self._counter += 1
            name = f"#block{self._counter}{self._rng.randrange(100):02d}"
            if name not in self._nodes and name not in self._reserved:
                return name

    # ------------------------------------------------------------ blockdev-add

    async def add(self, options: Mapping[str, Any], *, auto_root: bool = False) -> BlockNode:
        """blockdev-add: open the node and its inline children.

        On failure nothing stays behind: opened files are closed and no name
        is registered.

        :param auto_root: open a node for the daemon itself (e.g.
            drive-backup's target): ``options`` carry no ``node-name``, the
            root gets a ``#block...`` name and, like an inline child, is not
            owned by the monitor (blockdev-del refuses it) and defaults to
            ``discard: unmap``.  Drop it with :meth:`unregister`.
        :raise NodeNameError: missing/invalid/duplicate/too long name.
        :raise NodeOpenError: the driver or a file could not be opened.
        :raise NodeNotFound: a child given by name does not exist.
        """
        if not auto_root and options.get("node-name") is None:
            raise NodeNameError("'node-name' must be specified for the root node")
        created: list[BlockNode] = []
        mine: set[str] = set()
        try:
            node = await self._open(options, {} if auto_root else None, created, mine)
        except BaseException:
            for n in reversed(created):
                n.detach_children()
                n.close()
            raise
        finally:
            self._reserved -= mine
        if self.bitmap_state is not None:
            for n in created:
                await self.bitmap_state.attach(n)
        for n in created:
            self._nodes[n.node_name] = n
        log.info("node %s added (%s%s)", node.node_name, node.drv,
                 f", {node.driver.filename}" if node.driver.filename else "")
        return node

    async def sync_bitmaps(self, nodes: list[BlockNode] | None = None) -> None:
        """Make the persistent bitmaps of ``nodes`` (default: all) durable
        now (after bitmap commands; a no-op without ``--state-dir``).

        :raise BlockIOError: the state directory could not be written.
        """
        if self.bitmap_state is not None:
            await self.bitmap_state.sync(nodes)

    async def _open(
        self,
        options: Mapping[str, Any],
        inherited: Mapping[str, Any] | None,
        created: list[BlockNode],
        mine: set[str],
    ) -> BlockNode:
        opts = dict(options)
        if inherited is not None:
            for key in ("read-only",):
                if key in inherited and key not in opts:
                    opts[key] = inherited[key]
            cache = dict(inherited.get("cache") or {})
            cache.update(opts.get("cache") or {})
            opts["cache"] = cache
            opts.setdefault("discard", "unmap")
        driver_name = str(opts["driver"])
        spec = DRIVERS.get(driver_name)
        if spec is None:
            raise NodeOpenError(f"Unknown driver '{driver_name}'")
        read_only = bool(opts.get("read-only", False))
        cache = opts.get("cache") or {}
        mark = len(created)
        #: ``created`` slices holding the inline ``file`` children.
        file_subtrees: list[tuple[int, int]] = []
        name: Any = None

        async def open_child(ref: Any, role: str) -> BlockNode:
            if isinstance(ref, str):
                child = self._nodes.get(ref)
                if child is None and ref in self._opening:
                    raise NodeOpenError(f"Making '{ref}' a {role} child of '{name}' would create a cycle")
                if child is None:
                    raise NodeNotFound(f"Cannot find device='{ref}' nor node-name='{ref}'")
            else:
                start = len(created)
                child = await self._open(ref, opts, created, mine)
                if role == "file":
                    file_subtrees.append((start, len(created)))
            if child.read_only and not read_only and role != "backing":
                raise NodeOpenError("Block node is read-only")
            return child

        # QEMU opens a format driver's ``file`` child before it names (and
        # checks the name of) the node itself: the child's errors come first.
        early: dict[str, BlockNode] = {}
        if spec.is_format and "file" in opts:
            early["file"] = await open_child(opts["file"], "file")
        name = opts.get("node-name")
        auto = name is None
        if name is None:
            name = self.generate_name()
        else:
            self.check_node_name(str(name))
        name = str(name)
        self._reserved.add(name)
        mine.add(name)
        discard = "unmap" if opts.get("discard", "ignore") in ("unmap", "on") else "ignore"
        detect = str(opts.get("detect-zeroes", "off"))
        if detect == "unmap" and discard != "unmap":
            raise NodeOpenError(
                "setting detect-zeroes to unmap is not allowed "
                "without setting discard operation to unmap"
            )

        async def ctx_open_child(ref: Any, role: str) -> BlockNode:
            return early.pop(role) if role in early else await open_child(ref, role)

        ctx = OpenContext(
            name, read_only, bool(cache.get("direct", False)), ctx_open_child, self.lookup_node,
            self.pool, self.emit_event,
        )
        self._opening.append(name)
        try:
            driver, children = await spec.open(opts, ctx)
        finally:
            self._opening.pop()
        try:
            node = BlockNode(
                name,
                driver,
                children=children,
                read_only=read_only,
                discard=discard,
                detect_zeroes=detect,
                cache_direct=bool(cache.get("direct", False)),
                cache_no_flush=bool(cache.get("no-flush", False)),
                auto_named=auto,
                owned_by_monitor=inherited is None,
            )
        except BaseException:
            driver.close()
            raise
        # Naming order (module docstring): a non-protocol driver's inline
        # ``file`` child first, then this node, then its other children.
        before: list[BlockNode] = []
        if not driver.is_protocol:
            for start, end in file_subtrees:
                before.extend(created[start:end])
        taken = set(map(id, before))
        after = [n for n in created[mark:] if id(n) not in taken]
        created[mark:] = [*before, node, *after]
        driver.node_opened(node)
        return node

    def unregister(self, node: BlockNode) -> list[BlockNode]:
        """Drop ``node`` from the graph now, without a flush (for synchronous
        callers such as job finalisation): unregister it, drop its child
        edges and close it.  No checks; the children stay registered.

        :return: the former children (the caller decides their fate).
        """
        self._nodes.pop(node.node_name, None)
        if self.bitmap_state is not None:
            self.bitmap_state.drop(node)
        children = node.detach_children()
        node.close()
        return children

    def add_node(self, node: BlockNode) -> None:
        """Register a node built elsewhere (e.g. a job's filter).

        :raise NodeNameError: the name is taken.
        """
        if node.node_name in self._nodes:
            raise NodeNameError(f"Duplicate nodes with node-name='{node.node_name}'")
        self._nodes[node.node_name] = node

    def replace_node(self, old: BlockNode, new: BlockNode) -> None:
        """Re-point every parent edge of ``old`` (except from ``new``) to ``new``.

        Used to insert a filter above ``old`` and to remove it again.
        """
        for parent in list(old.parents):
            if parent is new:
                continue
            for role, child in list(parent.children.items()):
                if child is old:
                    parent.attach_child(role, new)
        self.root_moved(old, new)

    # ------------------------------------------------------------ block_resize

    async def resize(self, node: BlockNode, size: int) -> None:
        """``block_resize``: truncate the image below ``node`` to give it
        ``size`` bytes (rounded up to 512 by the file), then let every
        node's bitmaps follow its new length.

        :raise BlockIOError: the driver cannot resize (ENOTSUP) or the
            truncate failed.
        """
        try:
            await node.driver.truncate(size)
        finally:
            for n in self._nodes.values():
                if n.bitmaps.size != n.length:
                    n.bitmaps.truncate(n.length)

    # ------------------------------------------------------------ blockdev-del

    def check_delete(self, name: str) -> BlockNode:
        """blockdev-del's refusals, in QEMU's order.

        :raise NodeNotFound: ``"Failed to find node with node-name='%s'"``.
        :raise NodeInUse: ``"Node %s is in use"`` (attached to a device or
            an export), the
            op-blocker text, ``"Node %s is not owned by the monitor"``,
            ``"Block device %s is in use"`` (a parent or holder references it).
        """
        node = self._nodes.get(name)
        if node is None:
            raise NodeNotFound(f"Failed to find node with node-name='{name}'")
        if node.backend is not None or node.anonymous_backends:
            raise NodeInUse(f"Node {name} is in use")
        node.check_not_busy()
        if not node.owned_by_monitor:
            raise NodeInUse(f"Node {name} is not owned by the monitor")
        if node.in_use:
            raise NodeInUse(f"Block device {name} is in use")
        return node

    async def delete(self, name: str) -> None:
        """blockdev-del: check, unregister, flush and close the node and the
        inline children nobody else references.  Flush errors are ignored.

        :raise NodeNotFound: / :raise NodeInUse: see :meth:`check_delete`.
        """
        await self.remove_node(self.check_delete(name))

    async def remove_node(self, node: BlockNode) -> None:
        """Drop ``node`` (no checks) and its now-unreferenced non-monitor
        children; flushes before closing each."""
        if self._nodes.pop(node.node_name, None) is not None and not node.auto_named:
            log.info("node %s removed", node.node_name)
        try:
            await node.driver.before_close()
        except OSError as exc:
            log.warning("node %s: could not store bitmaps: %s", node.node_name, exc)
        try:
            await node.flush()
        except OSError:
            pass
        settle = getattr(node.driver, "settle", None)
        if settle is not None:
            await settle()  # background work of the driver (timed-out copies)
        if self.bitmap_state is not None:
            await self.bitmap_state.detach(node)
        for child in node.detach_children():
            if not child.owned_by_monitor and not child.in_use:
                await self.remove_node(child)
        node.close()

    async def close(self) -> None:
        """Remove every node (daemon shutdown), parents first."""
        for node in self:
            if node.node_name in self._nodes and not node.parents:
                await self.remove_node(node)
        for node in list(self._nodes.values()):
            await self.remove_node(node)
