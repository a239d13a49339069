"""Command-line options of the hardening work: resource limits.

Kept apart from :mod:`qmpd.cli.main` so the option list there stays short;
``main`` calls :func:`add_options` and :func:`limits_from_args`.
"""

from __future__ import annotations

import argparse
import os

from qmpd.server.limits import DEFAULT_LIMITS, Limits
from qmpd.server.listeners import OwnedPath

__all__ = ["add_options", "limits_from_args", "write_pidfile"]

_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _size(text: str) -> int:
    """``256M``-style sizes (k, M, G suffixes, powers of 1024)."""
    t = text.strip().lower()
    if t.endswith(("kb", "mb", "gb")):
        t = t[:-1]
    unit = t[-1:] if t[-1:] in ("k", "m", "g") else ""
    number = t[:-1] if unit else t
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"invalid size '{text}'")
    return int(number) * _SUFFIXES[unit]


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expects a positive integer, not '{text}'")
    return int(text)


def _directory(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"'{text}' is not a directory")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects seconds, not '{text}'") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expects a positive number of seconds, not '{text}'")
    return value


def add_options(p: argparse.ArgumentParser) -> None:
    """Add the resource-limit options to ``p``."""
    g = p.add_argument_group("resource limits")
    d = DEFAULT_LIMITS
    g.add_argument("--max-connections", type=_positive_int, default=d.max_connections, metavar="N",
                   help="simultaneous QMP connections; more are refused (default %(default)s)")
    g.add_argument("--max-buffer", type=_size, default=d.max_buffer, metavar="SIZE",
                   help="input and output buffered by all connections together "
                        "(default 256M); the connection that exceeds it is dropped")
    g.add_argument("--max-output", type=_size, default=d.max_output, metavar="SIZE",
                   help="unread output one client may accumulate before it is dropped (default 64M)")
    g.add_argument("--max-framing-errors", type=_positive_int, default=d.max_framing_errors,
                   metavar="N", help="consecutive JSON errors before a connection is closed "
                                     "(default %(default)s)")
    c = p.add_argument_group("confinement")
    c.add_argument("--allowed-dir", action="append", default=[], metavar="DIR", type=_directory,
                   help="image files may only be opened, created or truncated beneath DIR "
                        "(repeatable; no escape through '..' or symlinks; default: anywhere); "
                        "/dev/fdset/N names descriptors the client opened and passed (add-fd) "
                        "and is not checked")
    g.add_argument("--negotiation-timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="close connections that have not sent qmp_capabilities in time (default: never)")


def limits_from_args(args: argparse.Namespace) -> Limits:
    """:return: the :class:`Limits` the options describe."""
    return Limits(
        max_connections=args.max_connections,
        max_buffer=args.max_buffer,
        max_output=args.max_output,
        max_framing_errors=args.max_framing_errors,
        negotiation_timeout=args.negotiation_timeout,
    )


def write_pidfile(path: str) -> OwnedPath:
    """Write this process's PID to ``path``: a new file renamed into place
    (never written through a symlink).  An older daemon exiting later does
    not remove it: removal checks device, inode, ctime and the PID written,
    since a file system may hand the new file the old one's inode number.

    :return: the file, to be removed at exit only if it is still ours.
    :raise OSError: ``cannot create PID file: Could not create '<path>': <reason>``
        (qemu-storage-daemon's text).
    """
    tmp = f"{path}.{os.getpid()}.tmp"
    content = f"{os.getpid()}\n".encode("ascii")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, content)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        return OwnedPath.of(path, content)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise OSError(f"cannot create PID file: Could not create '{path}': "
                      f"{exc.strerror or exc}") from exc
