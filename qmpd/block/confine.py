"""``--allowed-dir``: every image path must resolve beneath an allowed directory.

Opening goes through ``openat2(2)`` with ``RESOLVE_BENEATH`` relative to
the allowed directory (Linux >= 5.6): the kernel refuses ``..`` and
symlinks (absolute or relative) that leave the directory, with no window
between check and open.  Where ``openat2`` is missing, the path's real
path is checked instead and the final component is opened with
``O_NOFOLLOW`` (a symlink swapped in for a parent directory between check
and open is the remaining gap).

Runs in the I/O pool's threads (called from :mod:`qmpd.block.io`).
``/dev/fdset/N`` names never get here: they open a descriptor the client
opened itself and passed with ``add-fd`` (:mod:`qmpd.block.fdsets`), so
the client's own permissions decided what it may reach.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["Confinement", "OutsideAllowedDirs"]

_SYS_OPENAT2 = 437  # the same number on every Linux architecture
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08


class OutsideAllowedDirs(OSError):
    """The path does not resolve beneath any ``--allowed-dir``."""

    def __init__(self) -> None:
        super().__init__(errno.EACCES, "Permission denied (outside every --allowed-dir)")


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _load_syscall() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syscall
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_long
    return fn


_syscall = _load_syscall()
_have_openat2: bool | None = None


def _openat2(dirfd: int, rel: str, flags: int, mode: int) -> int:
    """openat2 with RESOLVE_BENEATH; raises OSError (ENOSYS when missing)."""
    if _syscall is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    how = _OpenHow(flags, mode if flags & os.O_CREAT else 0, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    fd = _syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd), os.fsencode(rel),
                  ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


@dataclass(frozen=True)
class Confinement:
    """The allowed directories (absolute real paths)."""

    dirs: tuple[str, ...]

    @classmethod
    def of(cls, dirs: list[str]) -> Confinement:
        return cls(tuple(os.path.realpath(d) for d in dirs))

    def _split(self, path: str) -> tuple[str, str]:
        """:return: (allowed dir, path relative to it), lexically."""
        full = os.path.abspath(path)
        for d in self.dirs:
            if full.startswith(d.rstrip("/") + "/"):
                return d, full[len(d.rstrip("/")) + 1:]
        raise OutsideAllowedDirs()

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        """open(2) of ``path`` confined to the allowed directories.

        :raise OutsideAllowedDirs: the path leaves them (also through ``..``
            or a symlink).
        """
        global _have_openat2
        base, rel = self._split(path)
        if _have_openat2 is not False:
            dirfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fd = _openat2(dirfd, rel, flags, mode)
                _have_openat2 = True
                return fd
            except OSError as exc:
                if exc.errno in (errno.EXDEV, errno.ELOOP):
                    raise OutsideAllowedDirs() from None
                if exc.errno not in (errno.ENOSYS, errno.EPERM) or _have_openat2:
                    raise
                _have_openat2 = False  # no openat2 (or seccomp refuses it)
            finally:
                os.close(dirfd)
        return self._open_checked(path, flags, mode)

    def _open_checked(self, path: str, flags: int, mode: int) -> int:
        parent = os.path.realpath(os.path.dirname(os.path.abspath(path)))
        target = os.path.join(parent, os.path.basename(path))
        if not any(target.startswith(d.rstrip("/") + "/") for d in self.dirs):
            raise OutsideAllowedDirs()
        try:
            return os.open(target, flags | os.O_NOFOLLOW, mode)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OutsideAllowedDirs() from None
            raise
