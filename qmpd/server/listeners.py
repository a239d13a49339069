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
from typing import Protocol

from qmpd.server.fdtransport import FdServer

__all__ = ["BindError", "OwnedPath", "Server", "UnixListener", "TcpListener", "Listener", "open_listener",
           "open_qmp_listener", "UnixConnector", "TcpConnector", "Connector", "open_connector",
           "connector_label"]


class Server(Protocol):
    """What the daemon needs of a listening server (asyncio's or :class:`FdServer`)."""

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


@dataclass(frozen=True, slots=True)
class UnixListener:
    """A QMP socket at ``path``."""

    path: str
    label: str = "unix"
    #: QEMU's ``pretty=on``: multi-line JSON for this monitor's clients.
    pretty: bool = False


@dataclass(frozen=True, slots=True)
class TcpListener:
    """A QMP TCP socket."""

    host: str
    port: int
    label: str = "tcp"
    pretty: bool = False


Listener = UnixListener | TcpListener


@dataclass(frozen=True, slots=True)
class UnixConnector:
    """A UNIX socket the daemon connects to (client mode)."""

    path: str
    pretty: bool = False


@dataclass(frozen=True, slots=True)
class TcpConnector:
    """A TCP peer the daemon connects to (client mode)."""

    host: str
    port: int
    pretty: bool = False


Connector = UnixConnector | TcpConnector


class BindError(OSError):
    """A listener could not be bound; the text names the path."""


@dataclass(frozen=True, slots=True)
class OwnedPath:
    """A file this process created, identified by device, inode and ctime
    (and, for a pidfile, its content).

    :meth:`remove` unlinks the path only while it still is that file, so a
    socket or pidfile another daemon put at the same path later stays
    untouched, even when the file system gave the new file the old one's
    inode number.
    """

    path: str
    dev: int
    ino: int
    ctime_ns: int
    content: bytes | None = None

    @classmethod
    def of(cls, path: str, content: bytes | None = None) -> OwnedPath:
        st = os.lstat(path)
        return cls(path, st.st_dev, st.st_ino, st.st_ctime_ns, content)

    def _still_ours(self) -> bool:
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        if (st.st_dev, st.st_ino, st.st_ctime_ns) != (self.dev, self.ino, self.ctime_ns):
            return False
        if self.content is None:
            return True
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            return os.read(fd, len(self.content) + 1) == self.content
        finally:
            os.close(fd)

    def remove(self) -> None:
        if self._still_ours():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _bind_error(path: str, reason: str) -> BindError:
    return BindError(f"Failed to bind socket to {path}: {reason}")


def _bind_unix(path: str, backlog: int) -> tuple[socket.socket, OwnedPath]:
    """Bind a UNIX stream socket whose file has mode 0600.

    A stale socket file at ``path`` (nobody accepting) is replaced; a live
    one, or a file that is not a socket, is an error and is left alone.
    The mode is set between bind() and listen(): nobody can connect to a
    socket that is not listening yet, and the process umask is not touched.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _bind_error(path, exc.strerror or str(exc)) from exc
    else:
        if not stat.S_ISSOCK(mode):
            raise _bind_error(path, "the file exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        else:
            raise _bind_error(path, "another server is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise _bind_error(path, exc.strerror or str(exc)) from exc
    owned = OwnedPath.of(path)
    try:
        os.chmod(path, 0o600)
        owned = OwnedPath.of(path)  # chmod moved the ctime
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        owned.remove()
        raise _bind_error(path, exc.strerror or str(exc)) from exc
    sock.setblocking(False)
    return sock, owned


async def open_listener(
    spec: Listener, factory: Callable[[], asyncio.Protocol], *, backlog: int = 128
) -> tuple[asyncio.base_events.Server, OwnedPath | None]:
    """Start serving ``spec``.

    :return: the server and, for a UNIX socket, the socket file it created.
    :raise OSError: when it cannot be bound (:class:`BindError` names the path).
    """
    loop = asyncio.get_running_loop()
    if isinstance(spec, UnixListener):
        sock, owned = _bind_unix(spec.path, backlog)
        try:
            return await loop.create_unix_server(factory, sock=sock, backlog=backlog), owned
        except BaseException:
            sock.close()
            owned.remove()
            raise
    try:
        server = await loop.create_server(factory, spec.host, spec.port, reuse_address=True,
                                          backlog=backlog)
    except OSError as exc:
        raise BindError(f"Failed to bind socket to {spec.host}:{spec.port}: "
                        f"{exc.strerror or exc}") from exc
    return server, None


async def open_qmp_listener(
    spec: Listener, factory: Callable[[], asyncio.Protocol], *, backlog: int = 128
) -> tuple[Server, OwnedPath | None]:
    """:func:`open_listener` for QMP: a UNIX socket is served by
    :class:`FdServer`, so clients can pass descriptors with SCM_RIGHTS."""
    if isinstance(spec, TcpListener):
        return await open_listener(spec, factory, backlog=backlog)
    sock, owned = _bind_unix(spec.path, backlog)
    try:
        return FdServer(asyncio.get_running_loop(), sock, factory, backlog), owned
    except BaseException:
        sock.close()
        owned.remove()
        raise


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
