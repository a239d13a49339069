"""QEMU's probes, answered from qmpd's own tables (never fixed text):
``-machine help``, ``-drive format=help``, ``-device help``.

QEMU's iotests harness runs all three before a test: ``-machine help`` must
exit 0 (a line ending in `` (default)`` names the default machine),
``-drive format=help``'s first line lists the formats after a colon, and
``-M none -device help`` must mention ``virtio-blk``.
"""

from __future__ import annotations

__all__ = ["answer_probe"]


def answer_probe(probe: str) -> str:
    """:return: the text QEMU 7.2 prints for ``probe`` (or the probe's own
    text for ``-accel help``, computed by the parser)."""
    if probe == "machine=help":
        from qmpd.machine.types import MACHINE_TYPES

        lines = ["Supported machines are:"]
        for name, desc in MACHINE_TYPES.items():
            suffix = " (default)" if name == "none" else ""
            lines.append(f"{name:<20} {desc}{suffix}")
        return "\n".join(lines) + "\n"
    if probe == "format=help":
        import qmpd.server.daemon  # noqa: F401  (registers every driver)
        from qmpd.block.drivers import DRIVERS

        names = " ".join(sorted(DRIVERS))
        return f"Supported formats: {names}\nSupported formats (read-only): {names}\n"
    if probe == "device=help":
        from qmpd.machine.devices import device_help

        return device_help()
    return probe
