"""Image locking as QEMU's file-posix does it: OFD byte-range locks.

QEMU expresses what a user of an image does and what it lets others do as
permission bits (``consistent read``, ``write``, ``write unchanged``,
``resize``).  On the image file it holds a shared (read) lock on byte
``100 + bit`` for each permission it *uses* and on byte ``200 + bit`` for
each permission it does *not share*.  Before it takes permissions it
tests, with ``F_OFD_GETLK``, whether another open file description holds a
conflicting byte.  qmpd uses the same bytes, so qmpd, QEMU, qemu-img and
qemu-io see each other's locks.

A node that nobody uses holds nothing (as a node added with blockdev-add
in qemu-storage-daemon); a backup job claims ``consistent read`` on its
source, unsharing ``write`` and ``resize``, and ``write`` on its target.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass, field

__all__ = ["CONSISTENT_READ", "WRITE", "WRITE_UNCHANGED", "RESIZE", "ALL",
           "LockConflict", "PermLocks"]

CONSISTENT_READ = 0x01
WRITE = 0x02
WRITE_UNCHANGED = 0x04
RESIZE = 0x08
ALL = 0x0F
_NAMES = {CONSISTENT_READ: "consistent read", WRITE: "write",
          WRITE_UNCHANGED: "write unchanged", RESIZE: "resize"}
_PERM_BASE = 100
_SHARED_BASE = 200
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = "hhqqi4x"


class LockConflict(Exception):
    """Another process (or file description) holds a conflicting lock byte;
    ``str()`` is QEMU's text."""


def _flock(kind: int, offset: int) -> bytes:
    return struct.pack(_FLOCK, kind, os.SEEK_SET, offset, 1, 0)


def _held_by_other(fd: int, offset: int) -> bool:
    result = fcntl.fcntl(fd, _F_OFD_GETLK, _flock(fcntl.F_WRLCK, offset))
    kind: int = struct.unpack(_FLOCK, result)[0]
    return kind != fcntl.F_UNLCK


def _set(fd: int, offset: int, locked: bool) -> None:
    fcntl.fcntl(fd, _F_OFD_SETLK, _flock(fcntl.F_RDLCK if locked else fcntl.F_UNLCK, offset))


def check(fd: int, perm: int, shared: int) -> None:
    """:raise LockConflict: when taking ``perm`` / unsharing ``~shared`` conflicts."""
    for bit, name in _NAMES.items():
        if perm & bit and _held_by_other(fd, _SHARED_BASE + bit.bit_length() - 1):
            raise LockConflict(f'Failed to get "{name}" lock')
    for bit, name in _NAMES.items():
        if not shared & bit and _held_by_other(fd, _PERM_BASE + bit.bit_length() - 1):
            raise LockConflict(f'Failed to get shared "{name}" lock')


def apply(fd: int, perm: int, shared: int) -> None:
    """Hold exactly the bytes for ``perm`` and ``~shared``."""
    for bit in _NAMES:
        i = bit.bit_length() - 1
        _set(fd, _PERM_BASE + i, bool(perm & bit))
        _set(fd, _SHARED_BASE + i, not shared & bit)


def supported(fd: int) -> bool:
    """Whether the kernel and file system support OFD locks on ``fd``."""
    try:
        _held_by_other(fd, _PERM_BASE)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
            return False
        raise
    return True


@dataclass(eq=False)
class PermLocks:
    """The permission claims on one open image file and their lock bytes."""

    fd: int
    claims: list[tuple[int, int]] = field(default_factory=list)

    def effective(self, extra: tuple[int, int] | None = None) -> tuple[int, int]:
        perm, shared = 0, ALL
        for p, s in self.claims + ([extra] if extra else []):
            perm |= p
            shared &= s
        return perm, shared

    def claim(self, perm: int, shared: int) -> tuple[int, int]:
        """Add a claim after checking it; :raise LockConflict:."""
        new_perm, new_shared = self.effective((perm, shared))
        check(self.fd, new_perm, new_shared)
        apply(self.fd, new_perm, new_shared)
        token = (perm, shared)
        self.claims.append(token)
        return token

    def release(self, token: tuple[int, int]) -> None:
        """Drop a claim (idempotent per claim)."""
        if token in self.claims:
            self.claims.remove(token)
            if self.fd >= 0:
                try:
                    apply(self.fd, *self.effective())
                except OSError:
                    pass
