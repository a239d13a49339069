"""The NBD wire protocol (server side), sans-I/O.

A :class:`ServerConnection` turns the bytes a client sends into events and
the server's answers into bytes, in the shape of
:class:`qmpd.protocol.session.Session`: no sockets, no asyncio.  The driver
(:mod:`qmpd.nbd.server`) loops::

    conn = ServerConnection(catalog)          # greeting queued at once
    send(conn.data_to_send())
    conn.receive_data(chunk)                  # b"" means EOF
    for event in conn.events():               # Request, StartTLS, Closed
        ...                                   # run a Request, then
        conn.reply_error(req, errno.EIO, "")  # or reply_read / reply_ok ...
    send(conn.data_to_send())

Handshake (fixed newstyle, NetworkBlockDevice/nbd doc/proto.md): the
server greets with ``NBDMAGIC IHAVEOPT`` and its flags, the client answers
with its flags, then sends options until ``NBD_OPT_GO`` or
``NBD_OPT_EXPORT_NAME`` picks an export.  The handshake answers options by
itself from the :class:`Catalog` (export names, sizes, meta contexts); which
option is allowed when is one table, :data:`OPTION_RULES`, and one check,
:meth:`ServerConnection._check_option`.

Transmission: each request header is checked (magic, command, flags,
bounds, 32 MiB payload limit) in QEMU 7.2's order; a bad one is answered
here with its errno, a good one becomes a :class:`Request` the driver runs.
Replies may be sent in any order (each carries the client's cookie).
"""

from __future__ import annotations

import enum
import errno as _errno
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "Catalog", "Closed", "ExportInfo", "Request", "ServerConnection", "StartTLS",
    "Cmd", "Opt", "MAX_BUFFER", "NBD_FLAGS",
]

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

#: Largest READ/WRITE payload (QEMU's NBD_MAX_BUFFER_SIZE).
MAX_BUFFER = 32 * 1024 * 1024
#: Largest option payload read into memory; longer ones are skipped.
MAX_OPTION = 64 * 1024
#: Longest name or meta-context string (the spec's 4096-byte limit).
MAX_STRING = 4096

# handshake flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

# transmission flags
NBD_FLAGS = {
    "HAS_FLAGS": 1 << 0, "READ_ONLY": 1 << 1, "SEND_FLUSH": 1 << 2, "SEND_FUA": 1 << 3,
    "ROTATIONAL": 1 << 4, "SEND_TRIM": 1 << 5, "SEND_WRITE_ZEROES": 1 << 6, "SEND_DF": 1 << 7,
    "CAN_MULTI_CONN": 1 << 8, "SEND_RESIZE": 1 << 9, "SEND_CACHE": 1 << 10,
    "SEND_FAST_ZERO": 1 << 11,
}

# command flags
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# option reply types
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_TOO_BIG = (1 << 31) + 9

# info types
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

# structured reply chunk types
CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE, CHUNK_BLOCK_STATUS = 0, 1, 2, 5
CHUNK_ERROR = (1 << 15) + 1
CHUNK_FLAG_DONE = 1

#: errno values the protocol carries (the spec's list; others become EINVAL).
WIRE_ERRNOS = frozenset({_errno.EPERM, _errno.EIO, _errno.ENOMEM, _errno.EINVAL, _errno.ENOSPC,
                         _errno.EOVERFLOW, _errno.ENOTSUP, _errno.ESHUTDOWN})


#: errno values the protocol carries under another name (QEMU's
#: system_errno_to_nbd_errno); anything else unknown becomes EINVAL.
_ERRNO_ALIASES = {_errno.EROFS: _errno.EPERM, _errno.EDQUOT: _errno.ENOSPC, _errno.EFBIG: _errno.ENOSPC,
                  _errno.EOPNOTSUPP: _errno.ENOTSUP}


class Opt(enum.IntEnum):
    """Handshake options."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10


class Cmd(enum.IntEnum):
    """Transmission commands."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


#: Flags each command accepts (DF only with structured replies, checked
#: apart).  QEMU 7.2 accepts FUA on every command.
_VALID_FLAGS = {
    Cmd.READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    Cmd.WRITE: CMD_FLAG_FUA,
    Cmd.DISC: CMD_FLAG_FUA,
    Cmd.FLUSH: CMD_FLAG_FUA,
    Cmd.TRIM: CMD_FLAG_FUA,
    Cmd.CACHE: CMD_FLAG_FUA,
    Cmd.WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    Cmd.BLOCK_STATUS: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
}
#: QEMU's command names (nbd_cmd_lookup), as its error texts print them.
_CMD_NAMES = {
    Cmd.READ: "read", Cmd.WRITE: "write", Cmd.DISC: "disconnect", Cmd.FLUSH: "flush",
    Cmd.TRIM: "trim", Cmd.CACHE: "cache", Cmd.WRITE_ZEROES: "write zeroes",
    Cmd.BLOCK_STATUS: "block status",
}
_WRITES = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES})


# ---------------------------------------------------------------- exports

@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake needs to know about one export."""

    name: str
    size: int
    read_only: bool
    description: str = ""
    #: Meta contexts offered, in order (``base:allocation`` first).
    contexts: tuple[str, ...] = ("base:allocation",)
    #: Advertise NBD_FLAG_CAN_MULTI_CONN.
    multi_conn: bool = False
    min_block: int = 1
    pref_block: int = 4096
    max_block: int = MAX_BUFFER

    def flags(self, structured: bool) -> int:
        """Transmission flags as QEMU 7.2 sets them: DF only once structured
        replies are negotiated; TRIM, WRITE_ZEROES and FAST_ZERO only when
        writable (recorded with qemu-nbd --list against qemu-storage-daemon)."""
        f = NBD_FLAGS
        flags = f["HAS_FLAGS"] | f["SEND_FLUSH"] | f["SEND_FUA"] | f["SEND_CACHE"]
        if self.read_only:
            flags |= f["READ_ONLY"]
        else:
            flags |= f["SEND_TRIM"] | f["SEND_WRITE_ZEROES"] | f["SEND_FAST_ZERO"]
        if structured:
            flags |= f["SEND_DF"]
        if self.multi_conn:
            flags |= f["CAN_MULTI_CONN"]
        return flags


class Catalog(Protocol):
    """The exports a handshake can pick from."""

    def lookup(self, name: str) -> ExportInfo | None:
        """:return: the export called ``name``, or None."""

    def listing(self) -> Sequence[ExportInfo]:
        """:return: every export, for NBD_OPT_LIST."""


# ---------------------------------------------------------------- events

@dataclass(frozen=True, slots=True)
class Request:
    """A checked transmission request the driver must run and answer."""

    cookie: int
    cmd: Cmd
    flags: int
    offset: int
    length: int
    #: The WRITE payload (empty otherwise).
    data: bytes = b""
    #: BLOCK_STATUS: (context id, context name) selected by the client.
    contexts: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Flush, then wrap the transport in TLS; more bytes follow encrypted."""


@dataclass(frozen=True, slots=True)
class Closed:
    """The conversation is over; close the transport after flushing."""

    reason: str


Event = Request | StartTLS | Closed


# ---------------------------------------------------------------- states

class Phase(enum.Enum):
    """Where a connection is in its life."""

    #: Greeting sent; waiting for the client's 32-bit flags.
    CLIENT_FLAGS = "client-flags"
    #: Reading option requests.
    OPTIONS = "options"
    #: An export is attached; reading requests.
    TRANSMISSION = "transmission"
    #: Finished (abort, disconnect, protocol violation).
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class OptionRule:
    """When an option may be used."""

    #: Refused with ERR_TLS_REQD until TLS is up (when TLS is required).
    needs_tls: bool = True
    #: Refused with ERR_INVALID unless structured replies were negotiated.
    needs_structured: bool = False
    #: The option ends the handshake on success.
    ends_handshake: bool = False


#: Handshake options and their preconditions (one check: _check_option).
OPTION_RULES: dict[int, OptionRule] = {
    Opt.EXPORT_NAME: OptionRule(ends_handshake=True),
    Opt.ABORT: OptionRule(),   # before TLS: ERR_TLS_REQD, then closed (QEMU)
    Opt.LIST: OptionRule(),
    Opt.STARTTLS: OptionRule(needs_tls=False),
    Opt.INFO: OptionRule(),
    Opt.GO: OptionRule(ends_handshake=True),
    Opt.STRUCTURED_REPLY: OptionRule(),
    Opt.LIST_META_CONTEXT: OptionRule(),   # QEMU lists even without structured replies
    Opt.SET_META_CONTEXT: OptionRule(needs_structured=True),
}


class _OptionError(Exception):
    """An option answered with an error reply (the handshake goes on)."""

    def __init__(self, rep: int, message: str) -> None:
        super().__init__(message)
        self.rep = rep
        self.message = message


def context_matches(query: str, name: str) -> bool:
    """A LIST/SET_META_CONTEXT query selects ``name`` (QEMU's rules:
    ``base:`` and ``qemu:`` list a namespace, ``qemu:dirty-bitmap:`` every
    bitmap, anything else must match exactly)."""
    if query in ("base:", "qemu:", "qemu:dirty-bitmap:"):
        return name.startswith(query)
    return query == name


class ServerConnection:
    """One client's handshake and transmission state.

    :param catalog: the exports to serve.
    :param tls: the server has TLS credentials (STARTTLS offered, required).
    """

    def __init__(self, catalog: Catalog, *, tls: bool = False) -> None:
        self.phase = Phase.CLIENT_FLAGS
        self.catalog = catalog
        self.tls_required = tls
        self.tls_active = False
        self.structured = False
        self.no_zeroes = False
        #: The attached export (transmission phase).
        self.export: ExportInfo | None = None
        #: Meta contexts selected by SET_META_CONTEXT: (id, name).
        self.contexts: tuple[tuple[int, str], ...] = ()
        self._meta_export = ""
        self._in = bytearray()
        self._out: list[bytes | bytearray] = []
        self._events: list[Event] = []
        #: Bytes of an oversized payload still to skip, then the reply to give.
        self._skip = 0
        self._after_skip: int | None = None
        self._eof = False
        self._out.append(NBDMAGIC + struct.pack(">QH", IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))

    # ------------------------------------------------------------ I/O seam

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client; ``b""`` means EOF."""
        if self.phase is Phase.CLOSED:
            return
        if not data:
            self._eof = True
            self._close("client disconnected")
            return
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
            if not self._skip and self._after_skip is not None:
                cookie, self._after_skip = self._after_skip, None
                self._simple_or_error(cookie, _errno.EINVAL, f"request length exceeds {MAX_BUFFER} bytes")
        self._in += data
        self._parse()

    def events(self) -> Iterator[Event]:
        """:return: the events parsed so far (each once)."""
        while self._events:
            yield self._events.pop(0)

    def data_to_send(self) -> bytes:
        """:return: and forget the bytes queued for the client."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def has_output(self) -> bool:
        """Whether replies are queued that :meth:`buffers_to_send` has not
        handed out yet."""
        return bool(self._out)

    def buffers_to_send(self) -> list[bytes | bytearray]:
        """:return: and forget the queued buffers, uncopied (for writev)."""
        out, self._out = self._out, []
        return out

    def tls_started(self) -> None:
        """The transport is now TLS (after :class:`StartTLS`)."""
        self.tls_active = True

    @property
    def closed(self) -> bool:
        """Nothing more will be parsed."""
        return self.phase is Phase.CLOSED

    def _close(self, reason: str) -> None:
        if self.phase is not Phase.CLOSED:
            self.phase = Phase.CLOSED
            self._events.append(Closed(reason))

    # ------------------------------------------------------------ parsing

    def _parse(self) -> None:
        while self.phase is not Phase.CLOSED and not self._skip:
            if self.phase is Phase.CLIENT_FLAGS:
                if not self._client_flags():
                    return
            elif self.phase is Phase.OPTIONS:
                if not self._option():
                    return
            elif not self._request():
                return
            if any(isinstance(e, StartTLS) for e in self._events):
                return  # the rest arrives encrypted, after tls_started()

    def _client_flags(self) -> bool:
        if len(self._in) < 4:
            return False
        (flags,) = struct.unpack_from(">I", self._in)
        del self._in[:4]
        if flags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
            self._close(f"Unknown client flags 0x{flags:x} received")
            return False
        self.no_zeroes = bool(flags & FLAG_NO_ZEROES)
        self.phase = Phase.OPTIONS
        return True

    def _option(self) -> bool:
        if len(self._in) < 16:
            return False
        magic, opt, length = struct.unpack_from(">QII", self._in)
        if magic != IHAVEOPT:
            self._close("Bad option magic")
            return False
        if length > MAX_OPTION:
            if opt == Opt.EXPORT_NAME:
                self._close("Bad length received")
                return False
            del self._in[:16]
            skip = min(length, len(self._in))
            del self._in[:skip]
            self._skip = length - skip
            self._option_reply(opt, REP_ERR_TOO_BIG, b"option payload too large")
            return True
        if len(self._in) < 16 + length:
            return False
        data = bytes(self._in[16:16 + length])
        del self._in[:16 + length]
        try:
            self._check_option(opt)
            self._handle_option(opt, data)
        except _OptionError as err:
            if err.rep:  # 0: EXPORT_NAME has no error reply; already closed
                self._option_reply(opt, err.rep, err.message.encode())
        return True

    def _check_option(self, opt: int) -> None:
        """The one precondition check of the handshake (:data:`OPTION_RULES`).

        :raise _OptionError: the option is unknown or not allowed now.
        """
        rule = OPTION_RULES.get(opt)
        # QEMU checks TLS first: unknown options too get ERR_TLS_REQD.
        if (rule is None or rule.needs_tls) and self.tls_required and not self.tls_active:
            if opt == Opt.EXPORT_NAME:
                self._close("Option 0x1 not permitted before TLS")
                raise _OptionError(0, "")
            text = "Option 0x%x not permitted before TLS" % opt
            if opt == Opt.ABORT:
                self._option_reply(opt, REP_ERR_TLS_REQD, text.encode())
                self._close("client aborted the handshake")
                raise _OptionError(0, "")
            raise _OptionError(REP_ERR_TLS_REQD, text)
        if rule is None:
            raise _OptionError(REP_ERR_UNSUP, f"Unsupported option {opt} ({_opt_name(opt)})")
        if rule.needs_structured and not self.structured:
            raise _OptionError(REP_ERR_INVALID,
                               f"request option '{_opt_name(opt)}' when structured reply is not negotiated")

    def _handle_option(self, opt: int, data: bytes) -> None:
        if opt == Opt.ABORT:   # acknowledged even with a payload (QEMU 7.2)
            self._option_reply(opt, REP_ACK)
            self._close("client aborted the handshake")
        elif opt == Opt.LIST:
            if data:
                raise _OptionError(REP_ERR_INVALID, "option 'list' has unexpected length")
            for exp in self.catalog.listing():
                name = exp.name.encode()
                desc = exp.description.encode()
                self._option_reply(opt, REP_SERVER, struct.pack(">I", len(name)) + name + desc)
            self._option_reply(opt, REP_ACK)
        elif opt == Opt.STARTTLS:
            if data:
                raise _OptionError(REP_ERR_INVALID, "option 'starttls' has unexpected length")
            if not self.tls_required:
                raise _OptionError(REP_ERR_POLICY, "TLS not configured")
            if self.tls_active:
                raise _OptionError(REP_ERR_INVALID, "TLS already enabled")
            self._option_reply(opt, REP_ACK)
            self._events.append(StartTLS())
        elif opt == Opt.STRUCTURED_REPLY:
            if data:
                raise _OptionError(REP_ERR_INVALID,
                                   "option 'structured reply' has unexpected length")
            if self.structured:
                raise _OptionError(REP_ERR_INVALID, "structured reply already negotiated")
            self.structured = True
            self._option_reply(opt, REP_ACK)
        elif opt == Opt.EXPORT_NAME:
            self._export_name(data)
        elif opt in (Opt.INFO, Opt.GO):
            self._info(opt, data)
        else:
            self._meta_context(opt, data)

    def _export_name(self, data: bytes) -> None:
        exp = self.catalog.lookup(data.decode(errors="replace"))
        if exp is None:
            self._close("export not found")
            return
        tail = b"" if self.no_zeroes else bytes(124)
        self._out.append(struct.pack(">QH", exp.size, exp.flags(self.structured)) + tail)
        self._attach(exp)

    def _info(self, opt: int, data: bytes) -> None:
        name, rest = _read_string(data, opt)
        if len(rest) < 2:
            raise _OptionError(REP_ERR_INVALID, f"Inconsistent lengths in option {_opt_name(opt)}")
        (count,) = struct.unpack_from(">H", rest)
        if len(rest) != 2 + 2 * count:
            raise _OptionError(REP_ERR_INVALID, f"Inconsistent lengths in option {_opt_name(opt)}")
        wanted = set(struct.unpack_from(f">{count}H", rest, 2))
        exp = self.catalog.lookup(name)
        if exp is None:
            raise _OptionError(REP_ERR_UNKNOWN, f"export '{name}' not present")
        if INFO_NAME in wanted:
            self._option_reply(opt, REP_INFO, struct.pack(">H", INFO_NAME) + exp.name.encode())
        if INFO_DESCRIPTION in wanted and exp.description:
            self._option_reply(opt, REP_INFO, struct.pack(">H", INFO_DESCRIPTION) + exp.description.encode())
        # QEMU sends the block sizes always; the minimum is 1 unless the
        # client promised to honour it (asked for it, or this is INFO).
        minimum = exp.min_block if (opt == Opt.INFO or INFO_BLOCK_SIZE in wanted) else 1
        self._option_reply(opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, minimum,
                                                      max(exp.pref_block, minimum), exp.max_block))
        self._option_reply(opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, exp.size, exp.flags(self.structured)))
        self._option_reply(opt, REP_ACK)
        if opt == Opt.GO:
            self._attach(exp)

    def _attach(self, exp: ExportInfo) -> None:
        self.export = exp
        if self._meta_export != exp.name:
            self.contexts = ()
        self.phase = Phase.TRANSMISSION

    def _meta_context(self, opt: int, data: bytes) -> None:
        name, rest = _read_string(data, opt)
        if len(rest) < 4:
            raise _OptionError(REP_ERR_INVALID, f"Inconsistent lengths in option {_opt_name(opt)}")
        (count,) = struct.unpack_from(">I", rest)
        pos, queries = 4, []
        for _ in range(count):
            query, tail = _read_string(rest[pos:], opt)
            pos = len(rest) - len(tail)
            queries.append(query)
        if pos != len(rest):
            raise _OptionError(REP_ERR_INVALID, f"Inconsistent lengths in option {_opt_name(opt)}")
        exp = self.catalog.lookup(name)
        if exp is None:
            raise _OptionError(REP_ERR_UNKNOWN, f"export '{name}' not present")
        if opt == Opt.LIST_META_CONTEXT and not queries:
            queries = list(exp.contexts)
        chosen = [(i, ctx) for i, ctx in enumerate(exp.contexts)
                  if any(context_matches(q, ctx) for q in queries)]
        for ctx_id, ctx in chosen:
            self._option_reply(opt, REP_META_CONTEXT, struct.pack(">I", ctx_id) + ctx.encode())
        self._option_reply(opt, REP_ACK)
        if opt == Opt.SET_META_CONTEXT:
            self.contexts = tuple(chosen)
            self._meta_export = exp.name

    # ------------------------------------------------------------ transmission

    def _request(self) -> bool:
        if len(self._in) < 28:
            return False
        magic, flags, typ, cookie, offset, length = struct.unpack_from(">IHHQQI", self._in)
        if magic != REQUEST_MAGIC:
            self._close(f"invalid magic (got 0x{magic:x})")
            return False
        has_payload = typ == Cmd.WRITE
        if has_payload and length > MAX_BUFFER:
            del self._in[:28]
            skip = min(length, len(self._in))
            del self._in[:skip]
            self._skip = length - skip
            if self._skip:
                self._after_skip = cookie
            else:
                self._simple_or_error(cookie, _errno.EINVAL, f"request length exceeds {MAX_BUFFER} bytes")
            return True
        if has_payload and len(self._in) < 28 + length:
            return False
        data = bytes(self._in[28:28 + length]) if has_payload else b""
        del self._in[:28 + (length if has_payload else 0)]
        err, message = self._check_request(typ, flags, offset, length)
        if err:
            self._simple_or_error(cookie, err, message)
            return True
        cmd = Cmd(typ)
        if cmd == Cmd.DISC:
            self._close("client sent NBD_CMD_DISC")
            return False
        self._events.append(Request(cookie, cmd, flags, offset, length, data,
                                    self.contexts if cmd == Cmd.BLOCK_STATUS else ()))
        return True

    def _check_request(self, typ: int, flags: int, offset: int, length: int) -> tuple[int, str]:
        """QEMU 7.2's request checks, in its order.  :return: (errno, text) or (0, "")."""
        assert self.export is not None
        try:
            cmd = Cmd(typ)
        except ValueError:
            return _errno.EINVAL, f"invalid request type ({typ}) received"
        if cmd == Cmd.DISC:
            return 0, ""
        if cmd == Cmd.READ and length > MAX_BUFFER:
            return _errno.EINVAL, f"len ({length} ) is larger than max len ({MAX_BUFFER})"   # sic
        if cmd in _WRITES and self.export.read_only:
            # The spec's EPERM; QEMU 7.2 sends EINVAL here (deliberate difference).
            return _errno.EPERM, "Export is read-only"
        if offset > self.export.size or length > self.export.size - offset:
            text = f"operation past EOF; From: {offset}, Len: {length}, Size: {self.export.size}"
            return (_errno.ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else _errno.EINVAL), text
        valid = _VALID_FLAGS[cmd]
        if cmd == Cmd.READ and not self.structured:
            valid &= ~CMD_FLAG_DF
        if flags & ~valid:
            return _errno.EINVAL, f"unsupported flags for command {_CMD_NAMES[cmd]} (got 0x{flags:x})"
        if cmd == Cmd.BLOCK_STATUS and not (self.structured and self.contexts):
            return _errno.EINVAL, "CMD_BLOCK_STATUS not negotiated"
        return 0, ""

    # ------------------------------------------------------------ replies

    def reply_ok(self, req: Request) -> None:
        """Success without data (WRITE, FLUSH, TRIM, CACHE, WRITE_ZEROES)."""
        self._out.append(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, req.cookie))

    def reply_error(self, req: Request, err: int, message: str = "") -> None:
        """Fail ``req`` with ``err`` (an errno; unknown ones become EINVAL)."""
        self._simple_or_error(req.cookie, err, message)

    def _simple_or_error(self, cookie: int, err: int, message: str) -> None:
        err = _ERRNO_ALIASES.get(err, err)
        err = err if err in WIRE_ERRNOS else _errno.EINVAL
        if self.structured:
            msg = message.encode()[:4096]
            payload = struct.pack(">IH", err, len(msg)) + msg
            self._chunk(CHUNK_FLAG_DONE, CHUNK_ERROR, cookie, payload)
        else:
            self._out.append(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, err, cookie))

    def reply_read(self, req: Request, segments: Sequence[tuple[int, bytes | bytearray | int]]) -> None:
        """Answer a READ with ``segments``: ``(offset, data)`` or
        ``(offset, hole_length)``, in order, covering the request.  Holes are
        OFFSET_HOLE chunks with structured replies, zeroes otherwise."""
        if not self.structured:
            parts: list[bytes | bytearray] = [struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, req.cookie)]
            parts += [bytes(s) if isinstance(s, int) else s for _, s in segments]
            self._out.append(b"".join(parts))
            return
        if req.length == 0 or not segments:
            self._chunk(CHUNK_FLAG_DONE, CHUNK_NONE, req.cookie, b"")
            return
        last = len(segments) - 1
        for i, (offset, seg) in enumerate(segments):
            flags = CHUNK_FLAG_DONE if i == last else 0
            if isinstance(seg, int):
                self._chunk(flags, CHUNK_OFFSET_HOLE, req.cookie, struct.pack(">QI", offset, seg))
            else:
                head = struct.pack(">IHHQIQ", STRUCTURED_REPLY_MAGIC, flags, CHUNK_OFFSET_DATA,
                                   req.cookie, 8 + len(seg), offset)
                self._out.append(head)
                self._out.append(seg)

    def read_data_header(self, req: Request) -> bytes:
        """The bytes that precede a READ's data when it is answered with
        one run of data sent by the caller (the server's sendfile path):
        a final OFFSET_DATA chunk header, or a simple reply."""
        if not self.structured:
            return struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, req.cookie)
        return struct.pack(">IHHQIQ", STRUCTURED_REPLY_MAGIC, CHUNK_FLAG_DONE, CHUNK_OFFSET_DATA,
                           req.cookie, 8 + req.length, req.offset)

    def reply_block_status(self, req: Request, answers: Sequence[tuple[int, Sequence[tuple[int, int]]]]) -> None:
        """Answer a BLOCK_STATUS: per selected context id, its extents as
        ``(length, flags)`` (cut to one with REQ_ONE)."""
        last = len(answers) - 1
        for i, (ctx_id, extents) in enumerate(answers):
            if req.flags & CMD_FLAG_REQ_ONE:
                extents = extents[:1]
            body = struct.pack(f">I{2 * len(extents)}I", ctx_id, *[v for e in extents for v in e])
            self._chunk(CHUNK_FLAG_DONE if i == last else 0, CHUNK_BLOCK_STATUS, req.cookie, body)

    def _chunk(self, flags: int, typ: int, cookie: int, payload: bytes) -> None:
        self._out.append(struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, flags, typ, cookie, len(payload)))
        self._out.append(payload)

    def _option_reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self._out.append(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, rep, len(data)) + data)


def _read_string(data: bytes, opt: int) -> tuple[str, bytes]:
    """:return: a u32-length-prefixed string and the bytes after it.

    :raise _OptionError: ERR_INVALID when it does not fit.
    """
    if len(data) < 4:
        raise _OptionError(REP_ERR_INVALID, f"Inconsistent lengths in option {_opt_name(opt)}")
    (n,) = struct.unpack_from(">I", data)
    if n > MAX_STRING or 4 + n > len(data):
        raise _OptionError(REP_ERR_INVALID, f"Inconsistent lengths in option {_opt_name(opt)}")
    return data[4:4 + n].decode(errors="replace"), data[4 + n:]


#: QEMU's option names (nbd_opt_lookup), as its error texts print them.
_OPT_NAMES = {
    Opt.EXPORT_NAME: "export name", Opt.ABORT: "abort", Opt.LIST: "list", 4: "peek export",
    Opt.STARTTLS: "starttls", Opt.INFO: "info", Opt.GO: "go",
    Opt.STRUCTURED_REPLY: "structured reply", Opt.LIST_META_CONTEXT: "list meta context",
    Opt.SET_META_CONTEXT: "set meta context",
}


def _opt_name(opt: int) -> str:
    return _OPT_NAMES.get(opt, "<unknown>")
