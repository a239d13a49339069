"""Control commands: negotiation, version, introspection, status, quit."""

from __future__ import annotations

import os
from typing import Any, TYPE_CHECKING

from qmpd.commands.context import OFFERED_CAPABILITIES, CommandContext
from qmpd.commands.registry import command
from qmpd.errors import CommandNotFound, GenericError

if TYPE_CHECKING:
    # Annotations only: the registry resolves each command's model by name
    # at dispatch time (qmpd.qapi.validate), so importing this module
    # creates no model.
    from qmpd.qapi.models import (
        QmpCapabilitiesArgs,
        QueryCommandsArgs,
        QueryNameArgs,
        QueryQmpSchemaArgs,
        QueryTpmArgs,
        OrgQmpdQueryInstanceArgs,
        QueryVersionArgs,
        QuitArgs,
    )

__all__: list[str] = []


def _enum_value(item: Any) -> str:
    return str(getattr(item, "value", item))


@command("qmp_capabilities")
async def qmp_capabilities(ctx: CommandContext, args: QmpCapabilitiesArgs) -> None:
    """Leave negotiation mode, optionally enabling ``oob``."""
    if not ctx.session.negotiating:
        raise CommandNotFound("Capabilities negotiation is already complete, command ignored")
    enable = [_enum_value(c) for c in (args.enable or [])]
    missing = [c for c in enable if c not in OFFERED_CAPABILITIES]
    if missing:
        raise GenericError(f"Capability {','.join(missing)} not available")
    ctx.session.negotiate("oob" in enable)


@command("query-version")
async def query_version(ctx: CommandContext, args: QueryVersionArgs) -> dict[str, Any]:
    """The QEMU version qmpd claims, and qmpd's own identity in ``package``."""
    return ctx.state.config.version_info()


@command("query-commands")
async def query_commands(ctx: CommandContext, args: QueryCommandsArgs) -> list[dict[str, str]]:
    """Every command of the command table (exactly the implemented ones)."""
    return [{"name": name} for name in ctx.state.command_names]


@command("query-qmp-schema")
async def query_qmp_schema(ctx: CommandContext, args: QueryQmpSchemaArgs) -> list[dict[str, Any]]:
    """The introspection of everything qmpd implements."""
    return ctx.state.introspection


@command("query-name")
async def query_name(ctx: CommandContext, args: QueryNameArgs) -> dict[str, Any]:
    """The ``--name`` given at start, or nothing."""
    name = ctx.state.config.name
    return {} if name is None else {"name": name}


@command("quit")
async def quit_(ctx: CommandContext, args: QuitArgs) -> None:
    """SHUTDOWN, force-cancel every job (with its events), then exit."""
    await ctx.state.request_shutdown("host-qmp-quit")


@command("query-tpm")
async def query_tpm(ctx: CommandContext, args: QueryTpmArgs) -> list[dict[str, Any]]:
    """qmpd emulates no TPM (backup tools such as qmpbackup ask anyway)."""
    return []


@command("__org.qmpd_query-instance")
async def query_instance(ctx: CommandContext, args: OrgQmpdQueryInstanceArgs) -> dict[str, Any]:
    """Which run of qmpd this is: a client that sees ``boot-id`` change
    knows the daemon restarted (qmpd extension)."""
    state = ctx.state
    micros = int(state.start_time * 1_000_000)
    out: dict[str, Any] = {
        "boot-id": state.boot_id,
        "start-time": {"seconds": micros // 1_000_000, "microseconds": micros % 1_000_000},
        "pid": os.getpid(),
    }
    graph = state.block
    if graph is not None and graph.bitmap_state is not None:
        out["state-dir"] = graph.bitmap_state.path
    return out
