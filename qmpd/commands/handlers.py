"""Every command module, listed explicitly: importing this module registers
all handlers into :data:`qmpd.commands.registry.REGISTRY`.

The daemon imports it while it loads (after the greeting, see
:meth:`qmpd.server.daemon.Daemon.load`); a new command module is added here.
"""

from qmpd.commands import backup, bitmap, block, core, fds, hmp, jobs, machine, nbd, objects, transaction  # noqa: F401,E501

__all__: list[str] = []
