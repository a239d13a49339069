"""Guest device models (a model of them: no emulation) and their QOM paths.

A device has a model from :data:`MODELS`, an optional ``id`` and, for disks,
a BlockBackend.  QOM paths are QEMU's::

    -device virtio-blk-pci,drive=drive0,id=vblk0
        /machine/peripheral/vblk0                  the PCI proxy
        /machine/peripheral/vblk0/virtio-backend   the virtio-blk device (qdev of query-block)
    -device scsi-hd,drive=d1           /machine/peripheral-anon/device[N]

``N`` counts every anonymous ``-device`` (controllers included), as QEMU's
peripheral-anon container does.  Models answer ``-device help`` in QEMU
7.2's format (``name "ide-hd", bus IDE, desc "virtual IDE disk"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qmpd.machine.backend import BlockBackend

__all__ = ["DeviceModel", "Device", "MODELS", "ALIASES", "device_help"]


@dataclass(frozen=True, slots=True)
class DeviceModel:
    """One ``-device`` type."""

    name: str
    bus: str
    desc: str | None = None
    alias: str | None = None
    #: The device has a ``drive`` property (a disk).
    disk: bool = False
    #: QOM child holding the disk for proxy devices (virtio-*-pci).
    backend_child: str | None = None
    #: QOM type name of the object holding ``drive`` (qom errors name it).
    drive_type: str | None = None
    #: Bus type the device provides (controllers), or None.
    provides: str | None = None
    #: Removable medium (``removable`` of query-block).
    removable: bool = False


MODELS: dict[str, DeviceModel] = {m.name: m for m in (
    DeviceModel("ide-hd", "IDE", desc="virtual IDE disk", disk=True, drive_type="ide-hd"),
    DeviceModel("scsi-hd", "SCSI", desc="virtual SCSI disk", disk=True, drive_type="scsi-hd"),
    DeviceModel("virtio-blk-device", "virtio-bus", disk=True, drive_type="virtio-blk-device"),
    DeviceModel("virtio-blk-pci", "PCI", alias="virtio-blk", disk=True,
                backend_child="virtio-backend", drive_type="virtio-blk-device"),
    DeviceModel("virtio-scsi-device", "virtio-bus", provides="SCSI"),
    DeviceModel("virtio-scsi-pci", "PCI", alias="virtio-scsi", provides="SCSI"),
)}
#: ``-device`` aliases (QEMU's qdev_alias_table for x86).
ALIASES = {m.alias: m.name for m in MODELS.values() if m.alias}


def device_help() -> str:
    """:return: ``-device help`` as QEMU 7.2 prints it (models qmpd has)."""
    lines = ["Storage devices:"]
    for model in sorted(MODELS.values(), key=lambda m: m.name):
        line = f'name "{model.name}", bus {model.bus}'
        if model.alias:
            line += f', alias "{model.alias}"'
        if model.desc:
            line += f', desc "{model.desc}"'
        lines.append(line)
    return "\n".join(lines) + "\n\n"


@dataclass(eq=False)
class Device:
    """A guest device."""

    model: DeviceModel
    #: ``id=`` (qdev id), or None for an anonymous device.
    id: str | None
    #: QOM path of the device itself.
    path: str
    backend: BlockBackend | None = None
    #: Property values given on the command line (for qom-get).
    props: dict[str, str] = field(default_factory=dict)

    @property
    def qdev(self) -> str:
        """The path ``query-block`` reports (the virtio backend for proxies)."""
        if self.model.backend_child:
            return f"{self.path}/{self.model.backend_child}"
        return self.path
