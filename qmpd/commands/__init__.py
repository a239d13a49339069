"""QMP command handlers, registered into :data:`registry.REGISTRY` on import."""

from qmpd.commands import core, hmp  # noqa: F401

__all__: list[str] = []
