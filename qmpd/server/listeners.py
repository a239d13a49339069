"""Listening sockets: UNIX (mode 0600) and TCP (loopback by default), and
client-mode sockets (QEMU's ``-chardev socket,...,server=off``): the
daemon connects to a peer that listens, as QEMU's iotests harness wants."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["UnixListener", "TcpListener", "Listener", "open_listener",
           "UnixConnector", "TcpConnector", "Connector", "open_connector"]


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


@dataclass(frozen=True, slots=True)
class UnixConnector:
    """A UNIX socket the daemon connects to (client mode)."""

    path: str


@dataclass(frozen=True, slots=True)
class TcpConnector:
    """A TCP peer the daemon connects to (client mode)."""

    host: str
    port: int


Connector = UnixConnector | TcpConnector


def _bind_unix(path: str) -> socket.socket:
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
    sock.listen(16)
    sock.setblocking(False)
    return sock


async def open_listener(
    spec: Listener, factory: Callable[[], asyncio.Protocol]
) -> asyncio.base_events.Server:
    """Start serving ``spec``; :raise OSError: when it cannot be bound."""
    loop = asyncio.get_running_loop()
    if isinstance(spec, UnixListener):
        sock = _bind_unix(spec.path)
        return await loop.create_unix_server(factory, sock=sock)
    return await loop.create_server(factory, spec.host, spec.port, reuse_address=True)


async def open_connector(
    spec: Connector, factory: Callable[[], asyncio.Protocol]
) -> asyncio.BaseTransport:
    """Connect to ``spec``; :raise OSError: when the peer is not there."""
    loop = asyncio.get_running_loop()
    if isinstance(spec, UnixConnector):
        transport, _ = await loop.create_unix_connection(factory, spec.path)
    else:
        transport, _ = await loop.create_connection(factory, spec.host, spec.port)
    return transport


def connector_label(spec: Connector) -> str:
    """``path`` or ``host:port`` (QEMU's error texts name it)."""
    return spec.path if isinstance(spec, UnixConnector) else f"{spec.host}:{spec.port}"
