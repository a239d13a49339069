"""The guest side qmpd models (no emulation): BlockBackends, guest devices,
QOM paths and the run state (L2, beside ``block/``: devices hold
BlockBackends that point at nodes; block/ knows no devices)."""

from qmpd.machine.backend import BackendTable, BlockBackend
from qmpd.machine.devices import MODELS, Device, DeviceModel, device_help
from qmpd.machine.machine import MACHINE_TYPES, Machine
from qmpd.machine.runstate import RunState

__all__ = ["BackendTable", "BlockBackend", "Device", "DeviceModel", "MODELS", "MACHINE_TYPES",
           "Machine", "RunState", "device_help"]
