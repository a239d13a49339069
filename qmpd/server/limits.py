"""Resource limits of the QMP server (``--max-connections``, ``--max-buffer``...).

Per connection, QEMU's own per-message limits apply (64 MiB of token bytes,
2 Mi tokens, nesting 1024; see :mod:`qmpd.protocol.framing`).  On top of
them the daemon bounds what all connections together may hold, so that a
few hostile clients cannot grow its memory without limit:

* ``max_buffer``: input buffered for unfinished messages plus output a
  client has not read, summed over all connections.  The connection whose
  growth crosses it is aborted.
* ``max_output``: output one client may leave unread before it is aborted
  (``transport.abort()``: the buffer is dropped at once, not flushed).
* ``max_connections``: further connections get one error line and are
  closed.
* ``max_framing_errors``: consecutive framing errors (no valid message in
  between) before the connection is closed.
* ``negotiation_timeout``: seconds a connection may stay unnegotiated.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits", "DEFAULT_LIMITS"]


@dataclass(frozen=True, slots=True)
class Limits:
    """The server's resource limits (see the module docstring)."""

    max_connections: int = 64
    max_buffer: int = 256 << 20
    max_output: int = 64 << 20
    max_framing_errors: int = 1024
    negotiation_timeout: float | None = None
    #: Listen backlog of every listener (bursts of connects queue here).
    backlog: int = 128
    #: Bytes the parser looks at before yielding to the event loop.
    slice_bytes: int = 16 << 10
    #: A connection holding less than this is never checked against max_buffer.
    check_above: int = 1 << 20


DEFAULT_LIMITS = Limits()
