"""Control commands: negotiation, version, introspection, status, quit."""

from __future__ import annotations

from typing import Any

from qmpd.commands.context import CommandContext
from qmpd.commands.registry import command
from qmpd.errors import CommandNotFound, GenericError

__all__: list[str] = []

#: Capabilities qmpd offers in its greeting.
OFFERED_CAPABILITIES = ("oob",)


def _enum_value(item: Any) -> str:
    return str(getattr(item, "value", item))


@command("qmp_capabilities")
async def qmp_capabilities(ctx: CommandContext, args: Any) -> None:
    """Leave negotiation mode, optionally enabling ``oob``."""
    if not ctx.session.negotiating:
        raise CommandNotFound("Capabilities negotiation is already complete, command ignored")
    enable = [_enum_value(c) for c in (args.enable or [])]
    missing = [c for c in enable if c not in OFFERED_CAPABILITIES]
    if missing:
        raise GenericError(f"Capability {','.join(missing)} not available")
    ctx.session.negotiate("oob" in enable)


def version_info(ctx: CommandContext) -> dict[str, Any]:
    """:return: the VersionInfo of ``query-version`` and the greeting."""
    major, minor, micro = ctx.state.config.qemu_version
    return {
        "qemu": {"micro": micro, "minor": minor, "major": major},
        "package": ctx.state.config.package,
    }


@command("query-version")
async def query_version(ctx: CommandContext, args: Any) -> dict[str, Any]:
    """The QEMU version qmpd claims, and qmpd's own identity in ``package``."""
    return version_info(ctx)


@command("query-commands")
async def query_commands(ctx: CommandContext, args: Any) -> list[dict[str, str]]:
    """Every command of the command table (exactly the implemented ones)."""
    return [{"name": name} for name in ctx.state.command_names]


@command("query-qmp-schema")
async def query_qmp_schema(ctx: CommandContext, args: Any) -> list[dict[str, Any]]:
    """The introspection of everything qmpd implements."""
    return ctx.state.introspection


@command("query-name")
async def query_name(ctx: CommandContext, args: Any) -> dict[str, Any]:
    """The ``--name`` given at start, or nothing."""
    name = ctx.state.config.name
    return {} if name is None else {"name": name}


@command("quit")
async def quit_(ctx: CommandContext, args: Any) -> None:
    """SHUTDOWN, force-cancel every job (with its events), then exit."""
    await ctx.state.request_shutdown("host-qmp-quit")


@command("query-tpm")
async def query_tpm(ctx: CommandContext, args: Any) -> list[dict[str, Any]]:
    """qmpd emulates no TPM (backup tools such as qmpbackup ask anyway)."""
    return []
