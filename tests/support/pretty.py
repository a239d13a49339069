"""The ``-mon ...,pretty=on`` exchange, shared by its recorder
(tests/transcripts/record_pretty.py, against QEMU) and its test (against qmpd)."""

from __future__ import annotations

import json
import socket

#: Requests sent after the greeting, in order; each answer is read until
#: its reply (``quit`` also gets SHUTDOWN first).
REQUESTS: list[bytes] = [
    b'{"execute": "qmp_capabilities"}',
    b'{"execute": "query-jobs", "id": 1}',
    b'{"execute": "query-name"}',
    b'{"execute": "nope", "id": ["a\\u00e9\\n", {}]}',
    b'{"execute": "query-block-jobs"}',
    b'{"execute": "quit"}',
]


def _messages(sock: socket.socket, buf: bytearray, until_reply: bool) -> bytes:
    """Read whole pretty messages (each ends with ``\\r\\n}\\r\\n`` at depth 0)
    until one that is not an event (or just the greeting)."""
    decoder = json.JSONDecoder()
    pos = 0
    out = b""
    while True:
        text = bytes(buf).decode("ascii")
        try:
            msg, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            chunk = sock.recv(65536)
            if not chunk:
                raise EOFError(bytes(buf)) from None
            buf += chunk
            continue
        if not text.startswith("\r\n", end):
            chunk = sock.recv(65536)
            if not chunk:
                raise EOFError(bytes(buf)) from None
            buf += chunk
            continue
        end += 2
        out += buf[pos:end]
        pos = end
        if not until_reply or "event" not in msg:
            del buf[:pos]
            return out


def exchange(path: str) -> list[str]:
    """:return: the greeting, then each request's raw answer, as text."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(path)
    try:
        return exchange_on(sock)
    finally:
        sock.close()


def exchange_on(sock: socket.socket) -> list[str]:
    """:func:`exchange` on a connected socket."""
    buf = bytearray()
    answers = [_messages(sock, buf, False).decode("ascii")]
    for req in REQUESTS:
        sock.sendall(req)
        answers.append(_messages(sock, buf, True).decode("ascii"))
    return answers
