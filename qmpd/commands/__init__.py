"""QMP command handlers, registered into :data:`registry.REGISTRY` on import."""

from qmpd.commands import backup, bitmap, block, core, fds, hmp, jobs, machine, nbd, objects, transaction  # noqa: F401,E501

__all__: list[str] = []
