"""QMP command handlers (L3).

Importing this package registers nothing, so its light modules
(:mod:`~qmpd.commands.context`, :mod:`~qmpd.commands.registry`) cost
nothing at start-up; :mod:`qmpd.commands.handlers` imports every handler
module, explicitly, which registers them into :data:`registry.REGISTRY`.
"""

__all__: list[str] = []
