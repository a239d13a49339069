"""QMP command handlers, registered into :data:`registry.REGISTRY` on import."""

from qmpd.commands import backup, bitmap, block, core, fds, hmp, jobs, nbd, objects, transaction  # noqa: F401

__all__: list[str] = []
