"""The guest side qmpd models (no emulation): BlockBackends, guest devices,
QOM paths and the run state (L2, beside ``block/``: devices hold
BlockBackends that point at nodes; block/ knows no devices).

Names are imported on first use (PEP 562): the command line reads
:data:`~qmpd.machine.types.MACHINE_TYPES` without loading the block layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qmpd.lazy import lazy_names

from qmpd.machine.types import MACHINE_TYPES

if TYPE_CHECKING:
    from qmpd.machine.backend import BackendTable, BlockBackend
    from qmpd.machine.devices import MODELS, Device, DeviceModel, device_help
    from qmpd.machine.machine import Machine
    from qmpd.machine.runstate import RunState

__all__ = ["BackendTable", "BlockBackend", "Device", "DeviceModel", "MODELS", "MACHINE_TYPES",
           "Machine", "RunState", "device_help"]

#: Names imported on first use: name -> module.
_LAZY = {
    "BackendTable": "qmpd.machine.backend",
    "BlockBackend": "qmpd.machine.backend",
    "MODELS": "qmpd.machine.devices",
    "Device": "qmpd.machine.devices",
    "DeviceModel": "qmpd.machine.devices",
    "device_help": "qmpd.machine.devices",
    "Machine": "qmpd.machine.machine",
    "RunState": "qmpd.machine.runstate",
}

__getattr__ = lazy_names(__name__, globals(), _LAZY)
