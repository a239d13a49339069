"""Every file operation of qmpd, run off the event loop.

This is the only module that opens image files or calls ``pread``,
``pwrite``, ``fallocate``, ``fdatasync``, ``lseek(SEEK_DATA/SEEK_HOLE)``,
``ftruncate`` or ``copy_file_range``.  Blocking calls run in an
:class:`IOPool` (the daemon owns one; files opened without one use a shared
pool); callers only ``await``.

Failures surface as :class:`~qmpd.block.errors.BlockIOError` carrying the
errno.  Example::

    img = await ImageFile.open("/tmp/a.img")
    await img.write(0, b"\\xcd" * 65536)
    await img.write_zeroes(65536, 65536, may_unmap=True)   # punches a hole
    assert await img.block_status(65536, 1 << 20) == (False, ...)
    img.close()
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import socket
import stat
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from qmpd.block.confine import Confinement
from qmpd.block.errors import BlockIOError
from qmpd.block.fdsets import FdSets, fdset_id_of
from qmpd.block.pool import IOPool

__all__ = ["IOPool", "ImageFile", "NotRegularFile", "PinnedFile", "SeqWriteError", "copy_pairs", "copy_range",
           "copy_ranges", "create_file",
           "run_blocking", "shared_pool",
           "make_private_dir", "open_state_file", "read_state_file", "remove_state_file",
           "real_path", "replace_file_durably", "stat_path", "StateFile"]

_T = TypeVar("_T")

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

#: Largest single zero-filled write used when fallocate cannot zero.
_ZERO_CHUNK = 1 << 20
_ZEROS = bytes(_ZERO_CHUNK)

#: Largest read tried on the event loop from the page cache (RWF_NOWAIT).
_NOWAIT_MAX = 1 << 20
#: Largest READ reply sent with sendfile(2) from the event loop.
_SENDFILE_MAX = 4 << 20


_shared: IOPool | None = None


def shared_pool() -> IOPool:
    """The pool of callers that bring none (tests, library use); the
    daemon never uses it."""
    global _shared
    if _shared is None:
        _shared = IOPool()
    return _shared


async def run_blocking(fn: Callable[..., _T], *args: object, pool: IOPool | None = None) -> _T:
    """Run the blocking ``fn(*args)`` in ``pool``; OSError becomes
    BlockIOError.  For callers outside this module that must run blocking
    work next to the file I/O (they must not touch image files themselves)."""
    return await (pool or shared_pool()).run(fn, *args)


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate_fn = _load_fallocate()


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Linux fallocate(2); raises OSError (ENOTSUP/EOPNOTSUPP if unsupported)."""
    if _fallocate_fn is None:
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
    if _fallocate_fn(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _unsupported(exc: OSError) -> bool:
    return exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


# --- blocking helpers (run in the pool) -----------------------------------


def _pread(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    # Short read: retry until EOF, then zero-fill (QEMU pads past EOF).
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    parts.append(bytes(length - got))
    return b"".join(parts)


def _preadinto(fd: int, offset: int, buf: memoryview) -> None:
    done = 0
    total = len(buf)
    while done < total:
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            buf[done:] = bytes(total - done)
            return
        done += n


def _pwrite(fd: int, offset: int, data: bytes | bytearray | memoryview) -> None:
    n = os.pwrite(fd, data, offset)
    if n == len(data):
        return
    view = memoryview(data)
    while n < len(view):
        w = os.pwrite(fd, view[n:], offset + n)
        if w == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n += w


def _pwrite_seq(fd: int, writes: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> int:
    """:return: how many of ``writes`` were written, in order (stops at the first error)."""
    for i, (offset, data) in enumerate(writes):
        try:
            _pwrite(fd, offset, data)
        except OSError as exc:
            raise SeqWriteError(exc, i) from exc
    return len(writes)


class SeqWriteError(BlockIOError):
    """:meth:`ImageFile.write_seq` failed at ``writes[done]``; the writes
    before it are complete, that one may be partly written, the rest were
    not tried."""

    def __init__(self, exc: OSError, done: int) -> None:
        base = BlockIOError.from_oserror(exc)
        super().__init__(base.errno if base.errno is not None else errno.EIO, base.strerror)
        self.done = done


def _write_zeroes(fd: int, offset: int, length: int, may_unmap: bool) -> None:
    if may_unmap:
        try:
            _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
            return
        except OSError as exc:
            if not _unsupported(exc):
                raise
    try:
        _fallocate(fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, length)
        return
    except OSError as exc:
        if not _unsupported(exc):
            raise
    try:
        # Punch, then re-allocate so the range stays allocated (as QEMU does).
        _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        try:
            _fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if not _unsupported(exc):
                raise
        return
    except OSError as exc:
        if not _unsupported(exc):
            raise
    end = offset + length
    while offset < end:
        n = min(_ZERO_CHUNK, end - offset)
        _pwrite(fd, offset, memoryview(_ZEROS)[:n])
        offset += n


def _discard(fd: int, offset: int, length: int) -> None:
    try:
        _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
    except OSError as exc:
        if not _unsupported(exc):
            raise
        # Discard is advisory: an unsupported punch is a successful no-op.


def _block_status(fd: int, offset: int, length: int) -> tuple[bool, int]:
    try:
        data = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # only a hole up to EOF
            return False, length
        if _unsupported(exc):
            return True, length
        raise
    if data > offset:
        return False, min(data - offset, length)
    hole = os.lseek(fd, offset, os.SEEK_HOLE)
    return True, max(1, min(hole - offset, length))


def _read_sparse(fd: int, offset: int, length: int, base: int) -> list[tuple[int, bytes | bytearray | int]]:
    out: list[tuple[int, bytes | bytearray | int]] = []
    pos, end = offset, offset + length
    while pos < end:
        is_data, n = _block_status(fd, pos, end - pos)
        out.append((pos - base, _pread(fd, pos, n) if is_data else n))
        pos += n
    return out


class _CacheStat(ctypes.Structure):
    _fields_ = [("nr_cache", ctypes.c_uint64), ("nr_dirty", ctypes.c_uint64),
                ("nr_writeback", ctypes.c_uint64), ("nr_evicted", ctypes.c_uint64),
                ("nr_recently_evicted", ctypes.c_uint64)]


class _CacheRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


#: cachestat(2) (Linux 6.5; the same number on every architecture).
_SYS_CACHESTAT = 451
_PAGE = os.sysconf("SC_PAGESIZE") if hasattr(os, "sysconf") else 4096
_libc: Any = None
_cachestat_ok = hasattr(os, "sendfile")


def _all_cached(fd: int, offset: int, length: int) -> bool:
    """Whether every page of the range is in the page cache (cachestat(2));
    False where the kernel lacks it."""
    global _libc, _cachestat_ok
    if not _cachestat_ok:
        return False
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _cachestat_ok = False
            return False
    rng, st = _CacheRange(offset, length), _CacheStat()
    if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
            _cachestat_ok = False
        return False
    pages = (offset + length + _PAGE - 1) // _PAGE - offset // _PAGE
    return int(st.nr_cache) >= pages


def _send_cached(fd: int, out_fd: int, head: bytes, offset: int, length: int) -> bytes | None:
    if length > _SENDFILE_MAX or not _all_cached(fd, offset, length):
        return None
    is_data, n = _block_status(fd, offset, length)
    if not is_data or n < length:
        return None
    try:
        sent = os.write(out_fd, head)
    except BlockingIOError:
        return None
    except OSError:
        return None       # the transport finds the broken connection
    if sent < len(head):
        return head[sent:] + _pread(fd, offset, length)
    done = 0
    try:
        while done < length:
            n = os.sendfile(out_fd, fd, offset + done, length - done)
            if n == 0:
                break
            done += n
    except BlockingIOError:
        pass
    except OSError:
        return b""        # the peer is gone; the transport will notice
    return _pread(fd, offset + done, length - done) if done < length else b""


_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_MSG_MORE = getattr(socket, "MSG_MORE", 0)


def _read_sparse_cached(fd: int, offset: int, length: int,
                        base: int) -> list[tuple[int, bytes | bytearray | int]] | None:
    """:func:`_read_sparse` without blocking: None unless every data byte is
    in the page cache (preadv2 RWF_NOWAIT); SEEK_DATA/SEEK_HOLE only read
    cached metadata for files the cache already holds."""
    if not _RWF_NOWAIT:
        return None
    out: list[tuple[int, bytes | bytearray | int]] = []
    pos, end = offset, offset + length
    while pos < end:
        is_data, n = _block_status(fd, pos, end - pos)
        if is_data:
            buf = bytearray(n)
            try:
                got = os.preadv(fd, [buf], pos, _RWF_NOWAIT)
            except OSError:
                return None
            if got != n:
                return None
            out.append((pos - base, buf))
        else:
            out.append((pos - base, n))
        pos += n
    return out


def _copy_range(src: int, src_off: int, dst: int, dst_off: int, length: int) -> None:
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(src, dst, length - done, src_off + done, dst_off + done)
            if n == 0:
                break
            done += n
        if done == length:
            return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    buf = bytearray(min(length - done, 1 << 20))
    view = memoryview(buf)
    while done < length:
        n = min(len(buf), length - done)
        _preadinto(src, src_off + done, view[:n])
        _pwrite(dst, dst_off + done, view[:n])
        done += n


class NotRegularFile(BlockIOError):
    """The path is not a regular file (a FIFO, a device, a socket...)."""

    def __init__(self) -> None:
        super().__init__(errno.EINVAL)


def _open_path(path: str, flags: int, mode: int, confinement: Confinement | None,
               fdsets: FdSets | None) -> int:
    """open(2), or a duplicate from an fdset, or confined to --allowed-dir."""
    if fdsets is not None and fdset_id_of(path) is not None:
        return fdsets.dup(path, flags)
    if confinement is not None:
        return confinement.open(path, flags, mode)
    return os.open(path, flags, mode)


def _open_stat(path: str, flags: int, confinement: Confinement | None = None,
               fdsets: FdSets | None = None) -> tuple[int, os.stat_result]:
    # O_NONBLOCK: opening a FIFO must not wait for a writer (QEMU hangs
    # there); it is refused below like any file that is not regular.
    fd = _open_path(path, flags | os.O_NONBLOCK, 0o600, confinement, fdsets)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile()
        os.set_blocking(fd, True)
    except BaseException:
        _close(fd, fdsets)
        raise
    return fd, st


def _open(path: str, flags: int, confinement: Confinement | None = None,
          fdsets: FdSets | None = None) -> int:
    return _open_stat(path, flags, confinement, fdsets)[0]


def _close(fd: int, fdsets: FdSets | None) -> None:
    if fdsets is not None:
        fdsets.released(fd)
    os.close(fd)


def _create(path: str, size: int, confinement: Confinement | None = None,
            fdsets: FdSets | None = None) -> None:
    # Mode 0600: a backup of a private image must not become world-readable.
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
    fd = _open_path(path, flags, 0o600, confinement, fdsets)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        os.set_blocking(fd, True)
        os.ftruncate(fd, 0)
        os.ftruncate(fd, size)
    finally:
        _close(fd, fdsets)


# --- public API -----------------------------------------------------------


class ImageFile:
    """An open image file; every method but :meth:`close` runs in the pool."""

    __slots__ = ("path", "fd", "read_only", "pool", "opened_stat")

    def __init__(self, path: str, fd: int, read_only: bool, pool: IOPool | None = None,
                 opened_stat: os.stat_result | None = None) -> None:
        #: fstat(2) right after open, before qmpd wrote anything (the
        #: persistent-bitmap journal compares it with its write lease).
        self.opened_stat = opened_stat
        #: The worker threads that run this file's calls.
        self.pool = pool or shared_pool()
        #: Path as given by the user.
        self.path = path
        #: The open file descriptor (-1 once closed).
        self.fd = fd
        #: Opened with O_RDONLY.
        self.read_only = read_only

    @classmethod
    async def open(cls, path: str, *, read_only: bool = False, direct: bool = False,
                   pool: IOPool | None = None) -> ImageFile:
        """Open ``path`` (O_RDONLY when ``read_only``, O_DIRECT when ``direct``).

        :raise NotRegularFile: ``path`` is a FIFO, device or socket.
        :raise BlockIOError: with the errno of open(2), e.g. ENOENT.
        """
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= getattr(os, "O_DIRECT", 0)
        pool = pool or shared_pool()
        fd, st = await pool.run(_open_stat, path, flags, pool.confinement, pool.fdsets)
        return cls(path, fd, read_only, pool, st)

    async def read(self, offset: int, length: int) -> bytes:
        """:return: ``length`` bytes at ``offset`` (zeros past EOF)."""
        return await self.pool.run(_pread, self.fd, offset, length)

    async def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset`` with preadv (no intermediate copy)."""
        await self.pool.run(_preadinto, self.fd, offset, buf)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at ``offset``."""
        await self.pool.run(_pwrite, self.fd, offset, data)

    async def write_seq(self, writes: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> None:
        """pwrite each ``(offset, data)`` in turn, in one worker call (one
        event-loop round trip), so each lands only after the ones before it.

        :raise SeqWriteError: with how many were written before the failure.
        """
        await self.pool.run(_pwrite_seq, self.fd, list(writes))

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        """Zero a range: punch a hole if ``may_unmap``, else zero-range, else
        punch + re-allocate, else write zero buffers."""
        await self.pool.run(_write_zeroes, self.fd, offset, length, may_unmap)

    async def discard(self, offset: int, length: int) -> None:
        """Punch a hole (a no-op where the file system cannot)."""
        await self.pool.run(_discard, self.fd, offset, length)

    async def flush(self) -> None:
        """fdatasync(2)."""
        await self.pool.run(os.fdatasync, self.fd)

    async def block_status(self, offset: int, length: int) -> tuple[bool, int]:
        """:return: ``(is_data, n)``: the first ``n`` (>= 1, <= length) bytes
        from ``offset`` are all data or all hole, per SEEK_DATA/SEEK_HOLE."""
        return await self.pool.run(_block_status, self.fd, offset, length)

    def read_sparse_cached(self, offset: int, length: int, *,
                           base: int = 0) -> list[tuple[int, bytes | bytearray | int]] | None:
        """:meth:`read_sparse` without waiting: the answer if every byte is
        in the page cache (preadv2 RWF_NOWAIT, up to 1 MiB), else None."""
        if length > _NOWAIT_MAX:
            return None
        try:
            return _read_sparse_cached(self.fd, offset, length, base)
        except OSError:
            return None

    def send_cached(self, out_fd: int, head: bytes, offset: int, length: int) -> bytes | None:
        """Send ``head`` then ``length`` bytes at ``offset`` to the
        non-blocking socket ``out_fd`` without copying them through Python
        (sendfile(2)), when the range is all data and all in the page
        cache; None (nothing sent) otherwise.

        :return: the bytes still to send after what the socket took at once
            (``b""`` when all went, or when the peer is gone: the caller's
            transport then sees the closed connection).
        """
        return _send_cached(self.fd, out_fd, head, offset, length)

    async def read_sparse(self, offset: int, length: int, *,
                          base: int = 0) -> list[tuple[int, bytes | bytearray | int]]:
        """Read a range as data runs and holes in one pool call (an NBD
        READ's structured reply): ``(offset - base, data)`` for data,
        ``(offset - base, n)`` for ``n`` bytes of hole."""
        cached = self.read_sparse_cached(offset, length, base=base)
        if cached is not None:
            return cached
        return await self.pool.run(_read_sparse, self.fd, offset, length, base)

    async def size(self) -> int:
        """:return: the file size in bytes."""
        st = await self.pool.run(os.fstat, self.fd)
        return st.st_size

    def allocated_size(self) -> int:
        """:return: bytes allocated on disk (fstat ``st_blocks * 512``).

        Synchronous: fstat of an open descriptor reads only inode metadata.
        """
        try:
            return os.fstat(self.fd).st_blocks * 512
        except OSError:
            return -1

    async def truncate(self, size: int) -> None:
        """ftruncate(2) to ``size`` bytes."""
        await self.pool.run(os.ftruncate, self.fd, size)

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            _close(fd, self.pool.fdsets)


class PinnedFile:
    """A duplicate descriptor of an image for a thread of its own (an NBD
    connection's data pump): its calls block that thread, never the loop,
    and the file stays open even if the node closes or replaces its own
    descriptor meanwhile.  Close it from the thread that uses it."""

    __slots__ = ("image", "fd")

    def __init__(self, image: ImageFile) -> None:
        #: The image duplicated (compare to spot a change of file).
        self.image = image
        self.fd = os.dup(image.fd)

    def all_data(self, offset: int, length: int) -> bool:
        """Whether the range is all data (no hole), per SEEK_DATA/SEEK_HOLE."""
        is_data, n = _block_status(self.fd, offset, length)
        return is_data and n >= length

    def will_need(self, offset: int, length: int) -> None:
        """Start reading the range into the page cache without waiting
        (posix_fadvise WILLNEED): queued reads keep the disk busy."""
        with contextlib.suppress(OSError):
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def read_sparse(self, offset: int, length: int, *,
                    base: int = 0) -> list[tuple[int, bytes | bytearray | int]]:
        """:meth:`ImageFile.read_sparse`, blocking."""
        return _read_sparse(self.fd, offset, length, base)

    def send(self, out: socket.socket, head: bytes, offset: int, length: int,
             wait: Callable[[], bool]) -> bool:
        """Send ``head`` (MSG_MORE), then ``length`` bytes at ``offset`` by
        sendfile(2), zeros past EOF, to the non-blocking socket ``out``;
        ``wait()`` runs whenever it is full and returns False to give up.

        :return: whether all was sent.  :raise OSError: the peer is gone.
        """
        view, done = memoryview(head), 0
        while view or done < length:
            try:
                if view:
                    view = view[out.send(view, _MSG_MORE if done < length else 0):]
                elif (n := os.sendfile(out.fileno(), self.fd, offset + done, length - done)) > 0:
                    done += n
                else:   # past the end of the file: zeros, as QEMU reads there
                    n = min(length - done, _ZERO_CHUNK)
                    view, done = memoryview(_ZEROS)[:n], done + n
            except BlockingIOError:
                if not wait():
                    return False
        return True

    def close(self) -> None:
        """Close the duplicate (idempotent)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


async def copy_range(src: ImageFile, src_off: int, dst: ImageFile, dst_off: int, length: int) -> None:
    """Copy ``length`` bytes with copy_file_range(2), falling back to
    preadv/pwrite through one buffer when the kernel refuses."""
    await src.pool.run(_copy_range, src.fd, src_off, dst.fd, dst_off, length)


def _copy_ranges(src: int, src_base: int, dst: int, dst_base: int,
                 ranges: Sequence[tuple[int, int]]) -> None:
    for offset, length in ranges:
        _copy_range(src, src_base + offset, dst, dst_base + offset, length)


async def copy_ranges(src: ImageFile, src_base: int, dst: ImageFile, dst_base: int,
                      ranges: Sequence[tuple[int, int]]) -> None:
    """Copy each ``(offset, length)`` of ``ranges`` from ``src_base + offset``
    to ``dst_base + offset`` as :func:`copy_range` does, all in one job of
    the I/O pool (block-copy's batched fast path)."""
    await src.pool.run(_copy_ranges, src.fd, src_base, dst.fd, dst_base, list(ranges))


def _copy_pairs(src: int, dst: int, pairs: Sequence[tuple[int, int, int]]) -> None:
    for src_off, dst_off, length in pairs:
        _copy_range(src, src_off, dst, dst_off, length)


async def copy_pairs(src: ImageFile, dst: ImageFile, pairs: Sequence[tuple[int, int, int]]) -> None:
    """Copy each ``(src offset, dst offset, length)`` of ``pairs`` as
    :func:`copy_range` does, all in one job of the I/O pool (block-copy's
    file-to-file path through qcow2 mappings)."""
    await src.pool.run(_copy_pairs, src.fd, dst.fd, list(pairs))


async def create_file(path: str, size: int, pool: IOPool | None = None) -> None:
    """Create or truncate ``path`` to a sparse file of ``size`` bytes
    (``blockdev-create`` driver ``file``)."""
    pool = pool or shared_pool()
    await pool.run(_create, path, size, pool.confinement, pool.fdsets)


# --- state files (persistent bitmaps) --------------------------------------
# Small files qmpd owns in its state directory: created 0600, replaced
# atomically (write new, fsync, rename, fsync the directory).


def _make_private_dir(path: str) -> str:
    os.makedirs(path, mode=0o700, exist_ok=True)
    if not stat.S_ISDIR(os.stat(path).st_mode):
        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
    return os.path.realpath(path)


async def make_private_dir(path: str, *, pool: IOPool | None = None) -> str:
    """Create ``path`` (and parents) with mode 0700 unless it exists.

    :return: its real path.
    """
    return await run_blocking(_make_private_dir, path, pool=pool)


def _read_state(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


async def read_state_file(path: str, *, pool: IOPool | None = None) -> bytes | None:
    """:return: the whole file, or None if it does not exist."""
    return await run_blocking(_read_state, path, pool=pool)


def _replace_durably(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _pwrite(fd, 0, data)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


async def replace_file_durably(path: str, data: bytes, *, pool: IOPool | None = None) -> None:
    """Make ``path`` hold ``data`` atomically and durably: write
    ``path.tmp`` (mode 0600), fdatasync, rename over ``path``, fsync the
    directory.  A crash leaves the old or the new contents, whole."""
    await run_blocking(_replace_durably, path, data, pool=pool)


def _remove(path: str) -> None:
    for p in (path, path + ".tmp"):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


async def remove_state_file(path: str, *, pool: IOPool | None = None) -> None:
    """Delete ``path`` and a leftover ``path.tmp`` (missing ones are fine)."""
    await run_blocking(_remove, path, pool=pool)


async def stat_path(path: str, *, pool: IOPool | None = None) -> os.stat_result:
    """:return: stat(2) of ``path`` (following links)."""
    return await run_blocking(os.stat, path, pool=pool)


def _realpath(path: str) -> str:
    return os.path.realpath(path)


async def real_path(path: str, *, pool: IOPool | None = None) -> str:
    """:return: ``os.path.realpath(path)`` (resolved off the loop)."""
    return await run_blocking(_realpath, path, pool=pool)


def _write_sync(fd: int, offset: int, data: bytes) -> None:
    _pwrite(fd, offset, data)
    os.fdatasync(fd)


class StateFile(ImageFile):
    """A state file updated in place (the write-intent layer)."""

    __slots__ = ()

    async def write_durable(self, offset: int, data: bytes) -> None:
        """pwrite then fdatasync, in one job of the pool."""
        await self.pool.run(_write_sync, self.fd, offset, data)


async def open_state_file(path: str, *, pool: IOPool | None = None) -> StateFile:
    """Open ``path`` read-write, creating it with mode 0600; its calls run
    in ``pool`` (the daemon's; None: the shared pool)."""
    fd = await run_blocking(_open, path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, pool=pool)
    return StateFile(path, fd, False, pool)
