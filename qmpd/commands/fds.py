"""File descriptor passing: getfd, closefd, add-fd, remove-fd, query-fdsets.

The descriptor comes with the command as SCM_RIGHTS data on the UNIX
socket (:attr:`CommandContext.fds`); the first one is taken, the others
are closed (QEMU 7.2).  Named descriptors (``getfd``) belong to the
connection and are closed with it; descriptor sets (``add-fd``) are the
daemon's (:class:`qmpd.block.fdsets.FdSets`) and ``/dev/fdset/N`` opens a
duplicate of a member.  Error texts are QEMU 7.2's (monitor/fds.c).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from qmpd.block.fdsets import FdSets
from qmpd.commands.context import CommandContext
from qmpd.commands.registry import command
from qmpd.errors import GenericError

if TYPE_CHECKING:
    from qmpd.qapi.models import AddFdArgs, ClosefdArgs, GetfdArgs, QueryFdsetsArgs, RemoveFdArgs

__all__: list[str] = []

NO_FD = "No file descriptor supplied via SCM_RIGHTS"


def _not_found(name: str) -> GenericError:
    return GenericError(f"File descriptor named '{name}' not found")


def _take(ctx: CommandContext) -> int:
    fd = ctx.fds.take() if ctx.fds is not None else None
    if fd is None:
        raise GenericError(NO_FD)
    return fd


def _fdsets(ctx: CommandContext) -> FdSets:
    fdsets = ctx.state.fdsets
    assert fdsets is not None, "the daemon sets up the descriptor sets"
    return fdsets


@command("getfd")
async def getfd(ctx: CommandContext, args: GetfdArgs) -> None:
    """Keep the passed descriptor under ``fdname`` (replacing an older one)."""
    fd = _take(ctx)
    assert ctx.fds is not None
    named = ctx.fds.named
    if args.fdname[:1].isdigit():
        os.close(fd)
        raise GenericError("Parameter 'fdname' expects a name not starting with a digit")
    if args.fdname not in named and len(named) >= ctx.fds.max_named:
        os.close(fd)
        raise GenericError(f"qmpd: at most {ctx.fds.max_named} named file descriptors per connection")
    old = named.get(args.fdname)
    named[args.fdname] = fd
    if old is not None:
        os.close(old)


@command("closefd")
async def closefd(ctx: CommandContext, args: ClosefdArgs) -> None:
    """Close a descriptor kept by ``getfd``."""
    fd = ctx.fds.named.pop(args.fdname, None) if ctx.fds is not None else None
    if fd is None:
        raise _not_found(args.fdname)
    os.close(fd)


@command("add-fd")
async def add_fd(ctx: CommandContext, args: AddFdArgs) -> dict[str, Any]:
    """Add the passed descriptor to set ``fdset-id`` (default: a new set)."""
    fd = _take(ctx)
    fdsets = _fdsets(ctx)
    try:
        fdset_id, fd = fdsets.add(fd, args.fdset_id, args.opaque)
    except ValueError:
        os.close(fd)
        raise GenericError("Parameter 'fdset-id' expects a non-negative value") from None
    except OverflowError:
        os.close(fd)
        raise GenericError(f"qmpd: descriptor sets hold at most {fdsets.max_fds} descriptors") from None
    return {"fdset-id": fdset_id, "fd": fd}


@command("remove-fd")
async def remove_fd(ctx: CommandContext, args: RemoveFdArgs) -> None:
    """Close one member of a set (``fd``) or all of them; duplicates in use stay open."""
    if not _fdsets(ctx).remove(args.fdset_id, args.fd):
        name = f"fdset-id:{args.fdset_id}" if args.fd is None else f"fdset-id:{args.fdset_id}, fd:{args.fd}"
        raise _not_found(name)


@command("query-fdsets")
async def query_fdsets(ctx: CommandContext, args: QueryFdsetsArgs) -> list[dict[str, Any]]:
    """Every set, highest id first, members in the order added (as QEMU 7.2)."""
    return _fdsets(ctx).query()
