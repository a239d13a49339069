"""NBD server and block export commands (the server is ``qmpd.nbd.server``).

Handlers only unpack arguments; the checks and their QEMU 7.2 texts live
with the server.
"""

from __future__ import annotations

from typing import Any, TYPE_CHECKING

from qmpd.commands.context import CommandContext, NbdControl
from qmpd.commands.registry import command

if TYPE_CHECKING:
    # Annotations only: the registry resolves each command's model by name
    # at dispatch time (qmpd.qapi.validate), so importing this module
    # creates no model.
    from qmpd.qapi.models import (
        BlockExportAddArgs,
        BlockExportDelArgs,
        NbdServerAddArgs,
        NbdServerRemoveArgs,
        NbdServerStartArgs,
        NbdServerStopArgs,
        QueryBlockExportsArgs,
    )

__all__: list[str] = []


def _nbd(ctx: CommandContext) -> NbdControl:
    server = ctx.state.nbd
    assert server is not None
    return server


def _dump(args: Any) -> dict[str, Any]:
    model = getattr(args, "root", args)
    out: dict[str, Any] = model.model_dump(mode="json", by_alias=True, exclude_none=True)
    return out


@command("nbd-server-start")
async def nbd_server_start(ctx: CommandContext, args: NbdServerStartArgs) -> None:
    """Listen for NBD clients (``addr`` in the legacy wrapped form)."""
    opts = _dump(args)
    addr = {"type": opts["addr"]["type"], **opts["addr"]["data"]}
    await _nbd(ctx).start(addr, max_connections=opts.get("max-connections", 0),
                          tls_creds=opts.get("tls-creds"), tls_authz=opts.get("tls-authz"))


@command("nbd-server-stop")
async def nbd_server_stop(ctx: CommandContext, args: NbdServerStopArgs) -> None:
    """Stop listening and remove every NBD export."""
    await _nbd(ctx).stop()


@command("block-export-add")
async def block_export_add(ctx: CommandContext, args: BlockExportAddArgs) -> None:
    """Export a node (``type: nbd``; ``iothread``/``fixed-iothread`` are
    accepted and ignored: qmpd serves every export from its one loop)."""
    o = _dump(args)
    _nbd(ctx).add(id=o["id"], node_name=o["node-name"], name=o.get("name"),
                  description=o.get("description"), writable=o.get("writable", False),
                  writethrough=o.get("writethrough", False), bitmaps=tuple(o.get("bitmaps", ())),
                  allocation_depth=o.get("allocation-depth", False))


@command("nbd-server-add")
async def nbd_server_add(ctx: CommandContext, args: NbdServerAddArgs) -> None:
    """The older form: the export id is its name."""
    o = _dump(args)
    name = o.get("name", o["device"])
    bitmap = o.get("bitmap")
    _nbd(ctx).add(id=name, node_name=o["device"], name=name, description=o.get("description"),
                  writable=o.get("writable", False), bitmaps=(bitmap,) if bitmap else (),
                  legacy=True)


@command("block-export-del")
async def block_export_del(ctx: CommandContext, args: BlockExportDelArgs) -> None:
    """Remove an export (``safe``: refused while clients are attached)."""
    o = _dump(args)
    _nbd(ctx).delete(o["id"], o.get("mode", "safe"))


@command("nbd-server-remove")
async def nbd_server_remove(ctx: CommandContext, args: NbdServerRemoveArgs) -> None:
    """Remove an export by name."""
    o = _dump(args)
    _nbd(ctx).delete(o["name"], o.get("mode", "safe"))


@command("query-block-exports")
async def query_block_exports(ctx: CommandContext, args: QueryBlockExportsArgs) -> list[dict[str, Any]]:
    """Every export, newest first."""
    return _nbd(ctx).query()
