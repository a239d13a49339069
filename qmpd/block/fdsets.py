"""File descriptor sets: files a caller opened itself and passed in
(QEMU's ``add-fd`` / ``remove-fd`` / ``query-fdsets``, ``/dev/fdset/N``).

A QMP client that may not (or should not) let the daemon open paths, as
libvirt does, opens the image itself, passes the descriptor over the UNIX
socket with SCM_RIGHTS and ``add-fd``, and names ``/dev/fdset/N`` where a
filename is expected.  The opener (:mod:`qmpd.block.io`) then asks
:meth:`FdSets.dup` for a duplicate of a member whose access mode (O_RDONLY,
O_WRONLY, O_RDWR) matches the open flags, as QEMU's
``monitor_fdset_dup_fd_add`` does; the duplicate belongs to the node and is
given back with :meth:`FdSets.released` when the node closes it.

Lifetime as in QEMU 7.2 (monitor/fds.c): a member removed with
``remove-fd`` is closed at once (duplicates in use stay valid); when the
last QMP client disconnects every member of a set none of whose
duplicates is in use is closed; a set disappears once it has neither
members nor duplicates in use.  The sets are used from the event loop and
from I/O worker threads, hence the lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from dataclasses import dataclass, field

from qmpd.block.errors import BlockIOError

__all__ = ["FDSET_PREFIX", "FdSets", "FdsetMember", "Fdset", "FdsetOpenError", "PassedFds", "fdset_id_of"]

#: Filenames naming a descriptor set.
FDSET_PREFIX = "/dev/fdset/"


def fdset_id_of(path: str) -> int | None:
    """:return: N of ``/dev/fdset/N``, or None when ``path`` is no fdset name."""
    if not path.startswith(FDSET_PREFIX):
        return None
    tail = path[len(FDSET_PREFIX):]
    return int(tail) if tail.isdigit() else -1


class FdsetOpenError(BlockIOError):
    """``/dev/fdset/N`` could not be opened; :attr:`desc` is QEMU's text
    (``Could not dup FD for /dev/fdset/N flags 2: Permission denied``)."""

    def __init__(self, path: str, flags: int, err: int) -> None:
        super().__init__(err)
        shown = flags & ~(os.O_CLOEXEC | os.O_NONBLOCK)
        self.desc = f"Could not dup FD for {path} flags {shown:x}: {os.strerror(err)}"


@dataclass(slots=True)
class FdsetMember:
    """One descriptor added with ``add-fd``."""

    fd: int
    opaque: str | None = None


@dataclass(slots=True)
class Fdset:
    """One set: its members (in the order added) and duplicates handed out."""

    id: int
    members: list[FdsetMember] = field(default_factory=list)
    dups: set[int] = field(default_factory=set)


class FdSets:
    """The daemon's descriptor sets."""

    def __init__(self, max_fds: int = 1024) -> None:
        #: Members all sets together may hold (``add-fd`` beyond it fails).
        self.max_fds = max_fds
        self._sets: dict[int, Fdset] = {}
        self._lock = threading.Lock()
        #: No QMP client is connected (members not in use are then closed).
        self._unwatched = False

    @property
    def member_count(self) -> int:
        with self._lock:
            return sum(len(s.members) for s in self._sets.values())

    def add(self, fd: int, fdset_id: int | None, opaque: str | None) -> tuple[int, int]:
        """Take ownership of ``fd`` as a member of set ``fdset_id`` (a new
        set with the lowest free id when None).

        :return: (fdset id, fd).
        :raise ValueError: ``fdset_id`` is negative (``fd`` is not taken).
        :raise OverflowError: the daemon holds ``max_fds`` members already.
        """
        if fdset_id is not None and fdset_id < 0:
            raise ValueError("fdset-id")
        with self._lock:
            if sum(len(s.members) for s in self._sets.values()) >= self.max_fds:
                raise OverflowError(self.max_fds)
            if fdset_id is None:
                fdset_id = 0
                while fdset_id in self._sets:
                    fdset_id += 1
            fdset = self._sets.setdefault(fdset_id, Fdset(fdset_id))
            fdset.members.append(FdsetMember(fd, opaque))
        return fdset_id, fd

    def remove(self, fdset_id: int, fd: int | None) -> bool:
        """``remove-fd``: close member ``fd`` (every member when None).

        :return: False when no such set or member exists.
        """
        with self._lock:
            fdset = self._sets.get(fdset_id)
            if fdset is None:
                return False
            if fd is None:
                gone, fdset.members = fdset.members, []
            else:
                gone = [m for m in fdset.members if m.fd == fd]
                if not gone:
                    return False
                fdset.members = [m for m in fdset.members if m.fd != fd]
            self._drop_if_empty(fdset)
        for member in gone:
            os.close(member.fd)
        return True

    def query(self) -> list[dict[str, object]]:
        """``query-fdsets``: sets by descending id, members in the order added."""
        with self._lock:
            out: list[dict[str, object]] = []
            for fdset_id in sorted(self._sets, reverse=True):
                fds: list[dict[str, object]] = []
                for m in self._sets[fdset_id].members:
                    fds.append({"fd": m.fd} if m.opaque is None else {"fd": m.fd, "opaque": m.opaque})
                out.append({"fdset-id": fdset_id, "fds": fds})
            return out

    def stat(self, path: str) -> os.stat_result | None:
        """fstat of the first member of ``/dev/fdset/N`` (None: no such set)."""
        fdset_id = fdset_id_of(path)
        with self._lock:
            fdset = self._sets.get(fdset_id) if fdset_id is not None else None
            if fdset is None or not fdset.members:
                return None
            return os.fstat(fdset.members[0].fd)

    def dup(self, path: str, flags: int) -> int:
        """Open ``/dev/fdset/N`` with ``flags``: duplicate the first member
        whose access mode matches, with the remaining status flags applied.

        :raise FdsetOpenError: ENOENT (no such set), EACCES (no member with
            that access mode), or the errno of dup/fcntl/ftruncate.
        """
        fdset_id = fdset_id_of(path)
        with self._lock:
            fdset = self._sets.get(fdset_id) if fdset_id is not None else None
            if fdset is None:
                raise FdsetOpenError(path, flags, errno.ENOENT)
            want = flags & os.O_ACCMODE
            member = next((m for m in fdset.members
                           if fcntl.fcntl(m.fd, fcntl.F_GETFL) & os.O_ACCMODE == want), None)
            if member is None:
                raise FdsetOpenError(path, flags, errno.EACCES)
            try:
                new = os.dup(member.fd)  # close-on-exec
            except OSError as exc:
                raise FdsetOpenError(path, flags, exc.errno or errno.EIO) from exc
            fdset.dups.add(new)
        try:
            settable = os.O_APPEND | os.O_NONBLOCK | getattr(os, "O_DIRECT", 0)
            status = fcntl.fcntl(new, fcntl.F_GETFL)
            fcntl.fcntl(new, fcntl.F_SETFL, (status & ~settable) | (flags & settable))
            if flags & os.O_TRUNC:
                os.ftruncate(new, 0)
        except OSError as exc:
            self.released(new)
            os.close(new)
            raise FdsetOpenError(path, flags, exc.errno or errno.EIO) from exc
        return new

    def released(self, fd: int) -> None:
        """A duplicate from :meth:`dup` is being closed by its user."""
        gone: list[FdsetMember] = []
        with self._lock:
            for fdset in list(self._sets.values()):
                if fd in fdset.dups:
                    fdset.dups.discard(fd)
                    if not fdset.dups and self._unwatched:
                        gone, fdset.members = fdset.members, []
                    self._drop_if_empty(fdset)
                    break
        for member in gone:
            os.close(member.fd)

    def client_arrived(self) -> None:
        """A QMP client connected: members stay open while clients are around."""
        self._unwatched = False

    def last_client_gone(self) -> None:
        """The last QMP client disconnected: close the members of every set
        whose duplicates are all closed, now or later, until a client
        connects again (QEMU's ``monitor_fdsets_cleanup``, ``mon_refcount``)."""
        gone: list[FdsetMember] = []
        with self._lock:
            self._unwatched = True
            for fdset in list(self._sets.values()):
                if not fdset.dups:
                    gone.extend(fdset.members)
                    fdset.members = []
                    self._drop_if_empty(fdset)
        for member in gone:
            os.close(member.fd)

    def close_all(self) -> None:
        """Daemon exit: close every member (duplicates belong to their nodes)."""
        with self._lock:
            gone = [m for s in self._sets.values() for m in s.members]
            self._sets.clear()
        for member in gone:
            os.close(member.fd)

    def _drop_if_empty(self, fdset: Fdset) -> None:
        if not fdset.members and not fdset.dups:
            del self._sets[fdset.id]


class PassedFds:
    """Descriptors one QMP connection received with SCM_RIGHTS.

    As in QEMU's socket chardev, descriptors wait with the connection until
    a command takes one (``getfd``, ``add-fd``: the first is taken, the
    others are closed); descriptors still waiting when new ones arrive are
    closed.  ``getfd`` names live in :attr:`named` until ``closefd``.
    :meth:`close_all` (the connection closed) closes everything not handed
    to an fdset.
    """

    def __init__(self, max_named: int = 256) -> None:
        #: ``getfd`` names this connection may hold at once.
        self.max_named = max_named
        #: ``getfd`` name -> descriptor.
        self.named: dict[str, int] = {}
        self._pending: list[int] = []

    @property
    def held(self) -> int:
        """Descriptors held (waiting plus named)."""
        return len(self._pending) + len(self.named)

    def received(self, fds: list[int]) -> None:
        """New descriptors arrived: they replace any still waiting."""
        old, self._pending = self._pending, list(fds)
        for fd in old:
            os.close(fd)

    def take(self) -> int | None:
        """:return: the first waiting descriptor (the caller owns it), or None."""
        if not self._pending:
            return None
        first, *rest = self._pending
        self._pending = []
        for fd in rest:
            os.close(fd)
        return first

    def close_all(self) -> None:
        pending, self._pending = self._pending, []
        named, self.named = self.named, {}
        for fd in [*pending, *named.values()]:
            os.close(fd)
