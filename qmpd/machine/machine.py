"""The machine: BlockBackends, guest devices, QOM paths and the run state.

Built by the daemon beside the block graph; ``-drive``/``-device`` options
(from the command-line plan) and the QOM/run-state commands act on it::

    m = Machine(graph, events)
    await m.add_drive("if=none,id=drive0,file=/d.img,format=raw", schema)
    m.add_device("virtio-blk-pci,drive=drive0,id=vblk0")
    m.query_block()[0]["qdev"]     # '/machine/peripheral/vblk0/virtio-backend'
    m.qom_set("/machine/peripheral/vblk0/virtio-backend", "drive", "cbw")

Name lookup as QEMU: the graph asks :meth:`Machine.backend_root` before
looking for a node, so ``device`` arguments find a BlockBackend first.
"""

from __future__ import annotations

import sys
from typing import Any

from qmpd.block.errors import NodeInUse, NodeNotFound
from qmpd.block.graph import BlockGraph
from qmpd.block.node import BlockNode
from qmpd.errors import DeviceNotFound, GenericError
from qmpd.events import EventBus
from qmpd.machine.backend import BackendTable, BlockBackend
from qmpd.machine.devices import ALIASES, MODELS, Device
from qmpd.machine.drive import ID_RE, DriveSpec, parse_drive
from qmpd.machine.runstate import RunState
from qmpd.machine.types import MACHINE_TYPES
from qmpd.qapi.keyval import coerce, split_items
from qmpd.qapi.schema import ObjectType
from qmpd.qapi.service import SchemaService

__all__ = ["Machine", "MACHINE_TYPES"]


class Machine:
    """Backends, devices and run state of one daemon."""

    def __init__(self, graph: BlockGraph, events: EventBus, *, prelaunch: bool = False) -> None:
        self.graph = graph
        self.events = events
        self.runstate = RunState(events, prelaunch=prelaunch)
        self.backends = BackendTable()
        self.devices: list[Device] = []
        self._anon = 0
        self._drive_index: dict[str, int] = {}
        graph.backend_root = self.backend_root
        graph.device_names = self.backends.names
        graph.root_moved = self._root_moved
        self.runstate.on_cont.append(self._reset_io_status)

    # ------------------------------------------------------------ lookups

    def backend_root(self, name: str) -> tuple[bool, BlockNode | None]:
        """:return: (a BlockBackend ``name`` exists, its root)."""
        backend = self.backends.get(name)
        if backend is None:
            return False, None
        return True, backend.root

    def backend_by_qdev(self, qdev_id: str) -> BlockBackend:
        """HMP ``qemu-io -d``: the backend of the device with id or QOM path
        ``qdev_id`` (a virtio proxy has none; its ``virtio-backend`` has).

        :raise DeviceNotFound: ``"Device '%s' not found"``.
        :raise GenericError: the device has no BlockBackend.
        """
        for dev in self.devices:
            if qdev_id in (dev.id, dev.path, dev.qdev):
                if dev.backend is None or (dev.model.backend_child and qdev_id != dev.qdev):
                    raise GenericError("Device does not have a block device backend")
                return dev.backend
        raise DeviceNotFound(f"Device '{qdev_id}' not found")

    def _root_moved(self, old: BlockNode, new: BlockNode) -> None:
        """A filter was inserted above (or removed from below) a root:
        its BlockBackend follows, as QEMU's bdrv_replace_node moves it."""
        for b in self.backends:
            if b.root is old:
                b.attach(new)

    def _reset_io_status(self) -> None:
        for b in self.backends:
            b.io_status = "ok"

    # ------------------------------------------------------------ -drive

    async def add_drive(self, text: str, schema: SchemaService) -> BlockBackend:
        """``-drive TEXT``: open the node tree, create the BlockBackend and,
        for ``if=virtio|scsi|ide``, its guest device.

        :raise GenericError: QEMU's texts (bad keys, formats, files).
        """
        spec = parse_drive(text, self._drive_index)
        if self.backends.get(spec.backend) is not None:
            raise GenericError(f"Duplicate ID '{spec.backend}' for drive")
        if spec.backend in self.graph or (spec.options or {}).get("node-name") == spec.backend:
            raise GenericError(f"Device name '{spec.backend}' conflicts with an existing node name")
        root: BlockNode | None = None
        if spec.options is not None:
            options = _typed_options(spec, schema)
            # The BlockBackend owns the tree (blockdev-del refuses it; it
            # goes away with its last user), named or not.
            root = await self.graph.add(options, auto_root=True)
            if spec.probe:
                filename = options.get("file", {}).get("filename", "")
                sys.stderr.write(
                    f"WARNING: Image format was not specified for '{filename}' and probing guessed raw.\n"
                    "         Automatically detecting the format is dangerous for raw images, "
                    "write operations on block 0 will be restricted.\n"
                    "         Specify the 'raw' format explicitly to remove the restrictions.\n"
                )
        backend = BlockBackend(spec.backend, werror=spec.werror, rerror=spec.rerror,
                               writeback=spec.writeback, removable=spec.media == "cdrom")
        backend.root = root
        self.backends.add(backend)
        model = {"virtio": "virtio-blk-pci", "scsi": "scsi-hd", "ide": "ide-hd"}.get(spec.interface)
        if model is not None and spec.media == "disk":
            self._create_device(MODELS[model], None, backend, {"drive": spec.backend})
        elif spec.interface == "ide" and spec.media == "cdrom":
            backend.removable = True
        return backend

    # ------------------------------------------------------------ -device

    def add_device(self, text: str) -> Device:
        """``-device MODEL,drive=NAME,id=ID``.

        :raise GenericError: QEMU's texts.
        """
        items = split_items(text)
        model_name = items[0]
        props: dict[str, str] = {}
        for item in items[1:]:
            key, sep, value = item.partition("=")
            props[key] = value if sep else "on"
        model_name = props.pop("driver", model_name)
        model = MODELS.get(ALIASES.get(model_name, model_name))
        if model is None:
            raise GenericError(f"'{model_name}' is not a valid device model name")
        dev_id = props.pop("id", None)
        if dev_id is not None:
            if not ID_RE.match(dev_id):
                raise GenericError("Parameter 'id' expects an identifier\n"
                                   "Identifiers consist of letters, digits, '-', '.', '_', "
                                   "starting with a letter.")
            if any(d.id == dev_id for d in self.devices):
                raise GenericError(f"Duplicate device ID '{dev_id}'")
        backend: BlockBackend | None = None
        if model.disk:
            drive = props.get("drive")
            if drive is None:
                raise GenericError("drive property not set")
            backend = self._backend_for_device(drive)
        elif "drive" in props:
            raise GenericError(f"Property '{model.name}.drive' not found")
        for key in ("werror", "rerror"):
            if backend is not None and key in props:
                setattr(backend, key, props[key])
        return self._create_device(model, dev_id, backend, props)

    def _backend_for_device(self, drive: str) -> BlockBackend:
        backend = self.backends.get(drive)
        if backend is not None:
            if backend.device is not None:
                raise GenericError(
                    f"Property 'virtio-blk-device.drive' can't take value '{drive}', "
                    "it's in use")
            return backend
        node = self.graph.get(drive)
        if node is None:
            raise GenericError(f"Property 'virtio-blk-device.drive' can't find value '{drive}'")
        if node.backend is not None:
            raise GenericError(
                f"Property 'virtio-blk-device.drive' can't take value '{drive}', it's in use")
        backend = BlockBackend("")
        backend.attach(node)
        self.backends.add(backend)
        return backend

    def _create_device(self, model: Any, dev_id: str | None, backend: BlockBackend | None,
                       props: dict[str, str]) -> Device:
        if dev_id is None:
            path = f"/machine/peripheral-anon/device[{self._anon}]"
            self._anon += 1
        else:
            path = f"/machine/peripheral/{dev_id}"
        dev = Device(model, dev_id, path, backend, dict(props))
        if backend is not None:
            backend.device = dev
        self.devices.append(dev)
        return dev

    # ------------------------------------------------------------ queries

    def info_block(self) -> str:
        """HMP ``info block`` (QEMU 7.2's layout)."""
        parts: list[str] = []
        for b in self.backends.listed():
            lines: list[str] = []
            if b.root is None:
                lines.append(f"{b.name}: [not inserted]")
            else:
                lines.append(f"{b.name} ({b.root.node_name}): {b.root.driver.filename} "
                             f"({b.root.driver.name}{', read-only' if b.root.read_only else ''})")
            if b.device is not None:
                lines.append(f"    Attached to:      {b.device.qdev}")
            if b.removable or b.device is None:
                lines.append("    Removable device: not locked, tray closed")
            if b.root is not None:
                lines.append(f"    Cache mode:       {_cache_mode(b)}")
            parts.append("\r\n".join(lines) + "\r\n")
        return "\r\n".join(parts)

    # ------------------------------------------------------------ QOM

    def _object(self, path: str) -> tuple[Device, bool]:
        """:return: (device, path names its virtio backend child)."""
        for dev in self.devices:
            if path == dev.path or (dev.id is not None and path == dev.id):
                return dev, False
            if dev.model.backend_child and path == dev.qdev:
                return dev, True
        raise DeviceNotFound(f"Device '{path}' not found")

    def _properties(self, dev: Device, child: bool) -> list[dict[str, str]]:
        props = [{"name": "type", "type": "string"}, {"name": "realized", "type": "bool"}]
        if dev.model.disk:
            props += [{"name": "drive", "type": "str"},
                      {"name": "werror", "type": "BlockdevOnError"},
                      {"name": "rerror", "type": "BlockdevOnError"}]
        if dev.model.backend_child and not child:
            props.append({"name": dev.model.backend_child,
                          "type": f"child<{dev.model.drive_type}>"})
        return props

    def qom_list(self, path: str) -> list[dict[str, str]]:
        """qom-list for ``/machine``, its containers and device paths
        (the properties qmpd models)."""
        containers = {"/machine": ["peripheral", "peripheral-anon", "unattached"],
                      "/machine/peripheral": [d.id for d in self.devices if d.id],
                      "/machine/peripheral-anon": [d.path.rsplit("/", 1)[1] for d in self.devices
                                                   if d.id is None],
                      "/machine/unattached": []}
        if path in ("", "/"):
            return [{"name": "type", "type": "string"}, {"name": "machine", "type": "child<machine>"}]
        if path in containers:
            out = [{"name": "type", "type": "string"}]
            for name in containers[path]:
                kind = "container" if path == "/machine" else self._type_at(f"{path}/{name}")
                out.append({"name": name, "type": f"child<{kind}>"})
            return out
        dev, child = self._object(path)
        return self._properties(dev, child)

    def _type_at(self, path: str) -> str:
        dev, child = self._object(path)
        return dev.model.drive_type if child and dev.model.drive_type else dev.model.name

    def qom_get(self, path: str, prop: str) -> Any:
        """qom-get of ``type``, ``realized``, ``drive``, ``werror``, ``rerror``."""
        dev, child = self._object(path)
        type_name = self._type_at(path)
        names = {p["name"] for p in self._properties(dev, child)}
        if prop not in names:
            raise GenericError(f"Property '{type_name}.{prop}' not found")
        if prop == "type":
            return type_name
        if prop == "realized":
            return True
        assert dev.backend is not None
        if prop == "drive":
            b = dev.backend
            return b.name or (b.root.node_name if b.root is not None else "")
        if prop == dev.model.backend_child:
            return None
        return str(getattr(dev.backend, prop))

    async def qom_set(self, path: str, prop: str, value: Any) -> None:
        """qom-set ``drive``: re-point the device's BlockBackend to the node
        ``value`` (qmpbackup's and libvirt's fleecing swap).

        :raise DeviceNotFound: no object at ``path``.
        :raise GenericError: QEMU's texts for other properties and values.
        """
        dev, child = self._object(path)
        type_name = self._type_at(path)
        names = {p["name"] for p in self._properties(dev, child)}
        if prop not in names:
            raise GenericError(f"Property '{type_name}.{prop}' not found")
        if prop != "drive" or (dev.model.backend_child and not child):
            raise GenericError(f"Attempt to set property '{prop}' on device "
                               f"'{dev.id or ''}' (type '{type_name}') after it was realized")
        if not isinstance(value, str):
            raise GenericError("Invalid parameter type for 'drive', expected: string")
        node = self.graph.get(value)
        if node is None:
            raise NodeNotFound(f"Cannot find device='' nor node-name='{value}'")
        assert dev.backend is not None
        backend = dev.backend
        if node is backend.root:
            return
        if node.backend is not None:
            raise NodeInUse(f"Node '{value}' is already in use by another device")
        old = backend.root
        backend.attach(node)
        if old is not None and not old.owned_by_monitor and not old.parents:
            # The backend held the last reference (a -drive tree): QEMU frees it.
            await self.graph.remove_node(old)


def _cache_mode(b: BlockBackend) -> str:
    assert b.root is not None
    if not b.writeback:
        mode = "writethrough"
    else:
        mode = "writeback"
    if b.root.cache_direct:
        mode += ", direct"
    if b.root.cache_no_flush:
        mode += ", ignore flushes"
    return mode


def _typed_options(spec: DriveSpec, schema: SchemaService) -> dict[str, Any]:
    """Coerce the drive's string options with the schema, with QEMU's
    "does not support the option" texts for unknown keys."""
    assert spec.options is not None
    options = dict(spec.options)
    _check_keys(options, schema, top=True)
    options_type = schema.schema.lookup_type("BlockdevOptions")
    typed = coerce(options, options_type)
    assert isinstance(typed, dict)
    schema.validate_arguments("blockdev-add", typed)
    return typed


def _check_keys(options: dict[str, Any], schema: SchemaService, *, top: bool) -> None:
    driver = str(options.get("driver", ""))
    options_type = schema.schema.lookup_type("BlockdevOptions")
    assert isinstance(options_type, ObjectType) and options_type.variants is not None
    try:
        branch = options_type.variants.lookup(driver).type
    except (KeyError, LookupError):
        raise GenericError(f"Unknown driver '{driver}'") from None
    members = {m.name for m in options_type.members}
    if isinstance(branch, ObjectType):
        members |= {m.name for m in branch.members}
    protocol = driver in ("file", "blkdebug", "null-co", "null-aio", "nbd")
    for key, value in options.items():
        if key not in members:
            if protocol:
                raise GenericError(f"Block protocol '{driver}' doesn't support the option '{key}'")
            raise GenericError(f"Block format '{driver}' does not support the option '{key}'")
        if isinstance(value, dict) and "driver" in value and key in ("file", "image"):
            _check_keys(value, schema, top=False)
