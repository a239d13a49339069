"""The ``create`` job of ``blockdev-create`` with ``driver: qcow2``.

Formats the node given as ``file`` (truncated to 0 first, as QEMU does):
the writes of :func:`qmpd.block.drivers.qcow2.layout.new_image`, in their
order (refcounts, L2 tables and L1 before the header), through the node.
The option checks run in :func:`check_qcow2_options`, before the job
exists, with QEMU 7.2's texts.
"""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qmpd.block.drivers.qcow2.header import MAGIC
from qmpd.block.drivers.qcow2.layout import new_image
from qmpd.block.errors import BlockIOError
from qmpd.block.io import ImageFile, create_file
from qmpd.errors import GenericError
from qmpd.jobs.errors import JobError
from qmpd.jobs.job import Job
from qmpd.jobs.status import JobType

if TYPE_CHECKING:
    from qmpd.block.node import BlockNode

__all__ = ["CreateQcow2Job", "Qcow2CreateSpec", "check_qcow2_options", "create_qcow2_file",
           "probe_format"]


@dataclass(frozen=True, slots=True)
class Qcow2CreateSpec:
    size: int
    version: int = 3
    cluster_bits: int = 16
    refcount_order: int = 4
    backing_file: str | None = None
    backing_fmt: str | None = None
    lazy_refcounts: bool = False
    preallocation: str = "off"


def check_qcow2_options(size: int, version: str | None, cluster_size: int | None,
                        refcount_bits: int | None, lazy_refcounts: bool | None,
                        backing_file: str | None, backing_fmt: str | None,
                        preallocation: str | None) -> Qcow2CreateSpec:
    """:return: the checked options.  :raise GenericError: QEMU's texts."""
    v = 2 if version == "v2" else 3
    cs = 65536 if cluster_size is None else cluster_size
    if cs < 512 or cs > (2 << 20) or cs & (cs - 1):
        raise GenericError("Cluster size must be a power of two between 512 and 2048k")
    rb = 16 if refcount_bits is None else refcount_bits
    if rb < 1 or rb > 64 or rb & (rb - 1):
        raise GenericError("Refcount width must be a power of two and may not exceed 64 bits")
    if v < 3 and rb != 16:
        raise GenericError("Different refcount widths than 16 bits require compatibility level "
                           "1.1 or above (use version=v3 or greater)")
    if v < 3 and lazy_refcounts:
        raise GenericError("Lazy refcounts only supported with compatibility level 1.1 and above "
                           "(use version=v3 or greater)")
    if backing_fmt is not None and backing_file is None:
        raise GenericError("Backing format cannot be used without backing file")
    prealloc = preallocation or "off"
    if backing_file is not None and prealloc != "off":
        raise GenericError("Backing file and preallocation can only be used at the same time "
                           "if extended_l2 is on")
    if size % 512:
        raise GenericError("Image size must be a multiple of 512 bytes")
    return Qcow2CreateSpec(size, v, cs.bit_length() - 1, rb.bit_length() - 1, backing_file,
                           backing_fmt, bool(lazy_refcounts), prealloc)


class CreateQcow2Job(Job):
    """Format ``file`` as an empty qcow2 image (see the module docstring)."""

    job_type = JobType.CREATE
    block_job = False

    def __init__(self, job_id: str, file: BlockNode, spec: Qcow2CreateSpec) -> None:
        super().__init__(job_id, auto_finalize=True, auto_dismiss=False)
        self.file = file
        self.spec = spec

    async def run(self) -> None:
        s = self.spec
        img = new_image(s.size, cluster_bits=s.cluster_bits, refcount_order=s.refcount_order,
                        version=s.version, backing_file=s.backing_file,
                        backing_format=s.backing_fmt, lazy_refcounts=s.lazy_refcounts,
                        preallocate_metadata=s.preallocation != "off")
        # QEMU's blockdev_create_run counts the whole driver call as one unit.
        self.progress.set_remaining(1)
        truncate = getattr(self.file.driver, "truncate", None)
        try:
            if truncate is None:
                raise BlockIOError(_errno.ENOTSUP)
            await truncate(0)
            await truncate(img.length)
            for off, data in img.writes:
                await self.file.write(off, data)
            if s.preallocation in ("falloc", "full") and img.length:
                await self.file.write_zeroes(0, img.length, may_unmap=False)
            await self.file.flush()
        except BlockIOError as exc:
            code = exc.errno or _errno.EIO
            raise JobError(code, f"Could not create image: {exc.strerror}") from exc
        self.progress.work_done(1)


async def create_qcow2_file(path: str, size: int, *, backing_file: str | None = None,
                            backing_format: str | None = None) -> None:
    """Create (or truncate) ``path`` as an empty qcow2 image with QEMU's
    defaults (drive-backup's ``mode: absolute-paths``).

    :raise BlockIOError: the file could not be created or written.
    """
    img = new_image(size, backing_file=backing_file, backing_format=backing_format)
    await create_file(path, img.length)
    f = await ImageFile.open(path)
    try:
        for off, data in img.writes:
            await f.write(off, data)
    finally:
        f.close()


async def probe_format(path: str) -> str:
    """:return: ``"qcow2"`` if ``path`` starts with the qcow2 magic, else
    ``"raw"`` (QEMU's probe, for the formats qmpd has)."""
    try:
        f = await ImageFile.open(path, read_only=True)
    except BlockIOError:
        return "raw"
    try:
        return "qcow2" if await f.read(0, 4) == MAGIC else "raw"
    finally:
        f.close()
