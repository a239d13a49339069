"""Listening sockets: UNIX (mode 0600) and TCP (loopback by default)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["UnixListener", "TcpListener", "Listener", "open_listener"]


@dataclass(frozen=True, slots=True)
class UnixListener:
    """A QMP socket at ``path``."""

    path: str
    label: str = "unix"


@dataclass(frozen=True, slots=True)
class TcpListener:
    """A QMP TCP socket."""

    host: str
    port: int
    label: str = "tcp"


Listener = UnixListener | TcpListener


def _bind_unix(path: str, backlog: int) -> socket.socket:
    """Bind a UNIX stream socket created with mode 0600.

    A stale socket file at ``path`` (nobody accepting) is replaced; a live
    one, or a file that is not a socket, is an error.
    """
    with contextlib.suppress(FileNotFoundError):
        mode = os.lstat(path).st_mode
        if not stat.S_ISSOCK(mode):
            raise OSError(f"{path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
        else:
            raise OSError(f"{path}: another server is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


async def open_listener(
    spec: Listener, factory: Callable[[], asyncio.Protocol], *, backlog: int = 128
) -> asyncio.base_events.Server:
    """Start serving ``spec``; :raise OSError: when it cannot be bound."""
    loop = asyncio.get_running_loop()
    if isinstance(spec, UnixListener):
        sock = _bind_unix(spec.path, backlog)
        return await loop.create_unix_server(factory, sock=sock, backlog=backlog)
    return await loop.create_server(factory, spec.host, spec.port, reuse_address=True,
                                    backlog=backlog)
