"""Errors raised by the block layer.

Command-visible failures subclass :class:`qmpd.errors.GenericError` and carry
QEMU's text; I/O failures are :class:`BlockIOError`, an :class:`OSError`
whose ``errno`` jobs map to ``BLOCK_JOB_ERROR`` actions and to texts such as
``"Input/output error"``::

    GenericError
    ├── NodeNotFound      every lookup flavour ("Node 'x' not found", ...)
    ├── NodeNameError     node-name rules of blockdev-add
    ├── NodeOpenError     a driver could not open ("Could not open ...")
    ├── NodeInUse         blockdev-del refusals, op blockers ("is busy")
    └── ReadOnlyNode      "Block node is read-only" (write access refused)
    OSError
    └── BlockIOError      a request failed; ``.errno`` is the cause
"""

from __future__ import annotations

import errno as _errno
import os

from qmpd.errors import GenericError

__all__ = [
    "BlockIOError",
    "NodeInUse",
    "NodeNameError",
    "NodeNotFound",
    "NodeOpenError",
    "ReadOnlyNode",
]


class NodeNotFound(GenericError):
    """A node lookup failed; ``desc`` is the flavour the caller asked for."""


class NodeNameError(GenericError):
    """A node-name is missing, malformed, too long or taken."""


class NodeOpenError(GenericError):
    """A driver refused its options or could not open its image."""


class NodeInUse(GenericError):
    """The node is referenced, blocked by an operation or not deletable."""


class ReadOnlyNode(GenericError):
    """Write access was requested on a read-only node."""


class BlockIOError(OSError):
    """A block request failed with ``errno`` (``EIO``, ``ENOSPC``, ...).

    ``str(exc.strerror)`` is the C library text QEMU prints, e.g.
    ``"Input/output error"``.
    """

    def __init__(self, err: int, strerror: str | None = None) -> None:
        super().__init__(err, strerror if strerror is not None else os.strerror(err))

    @classmethod
    def from_oserror(cls, exc: OSError) -> BlockIOError:
        """:return: ``exc`` as a BlockIOError (itself if it already is one)."""
        if isinstance(exc, BlockIOError):
            return exc
        err = exc.errno if exc.errno is not None else _errno.EIO
        return cls(err, exc.strerror if isinstance(exc.strerror, str) and exc.errno is not None else None)
