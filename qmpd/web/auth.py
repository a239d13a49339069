"""The HTTP access token: who may change state through the web layer.

Anything that can change the daemon's state (``/qmp`` and the dashboard's
job buttons) needs the token, sent as ``Authorization: Bearer TOKEN`` or,
where a browser cannot set headers (WebSocket handshakes), as
``?token=TOKEN``.  Read-only pages and ``/metrics`` need none.

The token is either read from ``--http-token-file`` (the operator's file,
never changed) or generated at start and written to a new file with mode
0600, which the daemon removes at exit.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import stat
from dataclasses import dataclass

__all__ = ["Token", "load_token", "create_token_file", "is_loopback", "TokenError"]

#: Longest token accepted from a file.
MAX_TOKEN = 4096


class TokenError(ValueError):
    """The token file cannot be read or written."""


@dataclass(frozen=True, slots=True)
class Token:
    """The secret, and the file the daemon created for it (None if given)."""

    value: str
    owned_file: str | None = None

    def check(self, presented: str | None) -> bool:
        """:return: whether ``presented`` is the token (constant time)."""
        if not presented:
            return False
        return hmac.compare_digest(presented.encode(), self.value.encode())

    def remove_file(self) -> None:
        """Remove the file the daemon wrote (nothing if the token was given)."""
        if self.owned_file is not None:
            try:
                os.unlink(self.owned_file)
            except FileNotFoundError:
                pass


def load_token(path: str) -> Token:
    """Read the token from ``path`` (first line, surrounding blanks stripped).

    :raise TokenError: unreadable, too long or empty.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TOKEN + 1)
    except OSError as err:
        raise TokenError(f"--http-token-file {path}: {err.strerror}") from err
    lines = data.decode("utf-8", "replace").strip().splitlines()
    if len(data) > MAX_TOKEN or not lines or not lines[0].strip():
        raise TokenError(f"--http-token-file {path}: expected one line holding the token")
    return Token(lines[0].strip())


def create_token_file(path: str) -> Token:
    """Generate a token and write it to ``path`` with mode 0600.

    A regular file already there (left by an earlier run) is replaced;
    anything else (a symlink, a directory) is refused.

    :raise TokenError: the file cannot be written.
    """
    value = secrets.token_urlsafe(32)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise TokenError(f"token file {path}: {err.strerror}") from err
    else:
        if not stat.S_ISREG(st.st_mode):
            raise TokenError(f"token file {path}: exists and is not a regular file")
        os.unlink(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise TokenError(f"token file {path}: {err.strerror}") from err
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (value + "\n").encode())
    finally:
        os.close(fd)
    return Token(value, owned_file=path)


def is_loopback(host: str) -> bool:
    """:return: whether ``host`` only binds loopback addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
