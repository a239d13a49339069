"""The qmpd exception tree.

Every error a client can see is a :class:`QMPError`; its class attribute
``error_class`` is the wire class, its ``desc`` the QEMU text::

    QMPDError                 root; never sent as is
    ├── SchemaError           QAPI definitions failed to load (start-up only)
    └── QMPError              error_class: str, desc: str
        ├── GenericError      "GenericError"
        ├── CommandNotFound   "CommandNotFound"
        ├── DeviceNotFound    "DeviceNotFound"
        └── DeviceNotActive   "DeviceNotActive"

Domain packages subclass the QMP class their errors map to, next to the code
that raises them.  Only ``qmpd.server`` turns exceptions into replies.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "QMPDError",
    "SchemaError",
    "QMPError",
    "GenericError",
    "CommandNotFound",
    "DeviceNotFound",
    "DeviceNotActive",
]


class QMPDError(Exception):
    """Root of every qmpd exception."""


class SchemaError(QMPDError):
    """The QAPI definitions could not be loaded; carries ``file:line``."""


class QMPError(QMPDError):
    """An error that goes on the wire as ``{"class": ..., "desc": ...}``."""

    #: QMP error class sent to the client.
    error_class: ClassVar[str] = "GenericError"

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        #: Human-readable description, worded as QEMU words it.
        self.desc = desc

    def to_wire(self) -> dict[str, str]:
        """:return: the ``error`` member of a QMP error reply."""
        return {"class": self.error_class, "desc": self.desc}


class GenericError(QMPError):
    """QEMU's catch-all class, used for almost every failure."""

    error_class = "GenericError"


class CommandNotFound(QMPError):
    """Unknown command, or any command during capabilities negotiation."""

    error_class = "CommandNotFound"


class DeviceNotFound(QMPError):
    """A BlockBackend lookup failed (rare in qmpd's command set)."""

    error_class = "DeviceNotFound"


class DeviceNotActive(QMPError):
    """``block-job-*`` commands naming no existing block job."""

    error_class = "DeviceNotActive"
