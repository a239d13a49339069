"""The ``create`` job of ``blockdev-create`` (driver ``file``, spec 2.7).

Creates or truncates a host file to ``size`` bytes.  It is not a block job
(only JOB_STATUS_CHANGE events), is finalised automatically but never
dismissed automatically: created -> running -> waiting -> pending ->
concluded, then ``job-dismiss`` -> null.
"""

from __future__ import annotations

import errno as _errno

from qmpd.block.errors import BlockIOError
from qmpd.block.io import ImageFile, IOPool, create_file
from qmpd.jobs.errors import JobError
from qmpd.jobs.job import Job
from qmpd.jobs.status import JobType

__all__ = ["CreateFileJob"]


class CreateFileJob(Job):
    """``blockdev-create {driver: file, filename, size, *preallocation}``.

    ``preallocation`` ``falloc``/``full`` allocate the whole file (as zeroes);
    ``off``/``metadata`` leave it sparse.
    """

    job_type = JobType.CREATE
    block_job = False

    def __init__(self, job_id: str, filename: str, size: int, preallocation: str = "off",
                 pool: IOPool | None = None) -> None:
        super().__init__(job_id, auto_finalize=True, auto_dismiss=False)
        self.pool = pool
        self.filename = filename
        self.size = size
        self.preallocation = preallocation

    async def run(self) -> None:
        self.progress.set_remaining(1)
        try:
            await create_file(self.filename, self.size, pool=self.pool)
            if self.preallocation in ("falloc", "full") and self.size:
                image = await ImageFile.open(self.filename, pool=self.pool)
                try:
                    await image.write_zeroes(0, self.size, may_unmap=False)
                finally:
                    image.close()
        except BlockIOError as exc:
            code = exc.errno or _errno.EIO
            raise JobError(code, f"Could not create '{self.filename}': {exc.strerror}") from exc
        self.progress.work_done(1)
