"""The NBD codec, bytes in and bytes out (no event loop)."""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence

import pytest

from qmpd.nbd.protocol import (
    OPT_REPLY_MAGIC, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
    Closed, Cmd, ExportInfo, Opt, Phase, Request, ServerConnection, StartTLS,
)

MiB = 1 << 20
EXPORTS = {
    "disk": ExportInfo("disk", 4 * MiB, read_only=False, description="a disk",
                       contexts=("base:allocation", "qemu:dirty-bitmap:b0", "qemu:allocation-depth")),
    "ro": ExportInfo("ro", MiB, read_only=True, multi_conn=True),
}


class Cat:
    def lookup(self, name: str) -> ExportInfo | None:
        return EXPORTS.get(name)

    def listing(self) -> Sequence[ExportInfo]:
        return list(EXPORTS.values())


def opt(code: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", 0x49484156454F5054, code, len(data)) + data


def rep(code: int, typ: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", OPT_REPLY_MAGIC, code, typ, len(data)) + data


def s32(text: str) -> bytes:
    return struct.pack(">I", len(text)) + text.encode()


def req(cmd: int, cookie: int, offset: int, length: int, flags: int = 0, data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + data


def negotiated(tls: bool = False) -> ServerConnection:
    conn = ServerConnection(Cat(), tls=tls)
    assert conn.data_to_send() == b"NBDMAGIC" + struct.pack(">QH", 0x49484156454F5054, 3)
    conn.receive_data(struct.pack(">I", 3))
    return conn


def go(conn: ServerConnection, name: str = "disk", structured: bool = True) -> None:
    if structured:
        conn.receive_data(opt(Opt.STRUCTURED_REPLY))
    conn.receive_data(opt(Opt.GO, s32(name) + struct.pack(">H", 0)))
    conn.data_to_send()
    assert conn.phase is Phase.TRANSMISSION


def test_go_replies_block_size_export_ack() -> None:
    conn = negotiated()
    conn.receive_data(opt(Opt.GO, s32("disk") + struct.pack(">HH", 1, 3)))
    assert conn.data_to_send() == (
        rep(Opt.GO, 3, struct.pack(">H", 3) + struct.pack(">III", 1, 4096, 32 * MiB))
        + rep(Opt.GO, 3, struct.pack(">HQH", 0, 4 * MiB, 0x1 | 0x4 | 0x8 | 0x20 | 0x40 | 0x400 | 0x800))
        + rep(Opt.GO, 1)
    )
    assert conn.phase is Phase.TRANSMISSION


def test_info_names_and_description_and_unknown_export() -> None:
    conn = negotiated()
    conn.receive_data(opt(Opt.INFO, s32("ro") + struct.pack(">HHH", 2, 1, 2)))
    out = conn.data_to_send()
    assert out.startswith(rep(Opt.INFO, 3, struct.pack(">H", 1) + b"ro"))
    flags = 0x1 | 0x2 | 0x4 | 0x8 | 0x100 | 0x400  # read-only: no TRIM/ZEROES/FAST_ZERO; no DF yet
    assert out.endswith(rep(Opt.INFO, 3, struct.pack(">HQH", 0, MiB, flags)) + rep(Opt.INFO, 1))
    conn.receive_data(opt(Opt.INFO, s32("nope") + struct.pack(">H", 0)))
    assert conn.data_to_send() == rep(Opt.INFO, (1 << 31) + 6, b"export 'nope' not present")
    assert conn.phase is Phase.OPTIONS


def test_list_and_abort() -> None:
    conn = negotiated()
    conn.receive_data(opt(Opt.LIST))
    assert conn.data_to_send() == (rep(Opt.LIST, 2, s32("disk") + b"a disk") + rep(Opt.LIST, 2, s32("ro"))
                                   + rep(Opt.LIST, 1))
    conn.receive_data(opt(Opt.LIST, b"x"))
    assert conn.data_to_send() == rep(Opt.LIST, (1 << 31) + 3, b"option 'list' has unexpected length")
    conn.receive_data(opt(Opt.ABORT))
    assert conn.data_to_send() == rep(Opt.ABORT, 1)
    assert list(conn.events()) == [Closed("client aborted the handshake")]


def test_unknown_option_and_bad_magic() -> None:
    conn = negotiated()
    conn.receive_data(opt(42))
    assert conn.data_to_send() == rep(42, (1 << 31) + 1, b"Unsupported option 42 (<unknown>)")
    conn.receive_data(b"X" * 16)
    assert conn.closed and list(conn.events()) == [Closed("Bad option magic")]


def test_bad_client_flags_close() -> None:
    conn = ServerConnection(Cat())
    conn.receive_data(struct.pack(">I", 0x80))
    assert conn.closed


def test_oversized_option_is_skipped() -> None:
    conn = negotiated()
    conn.receive_data(opt(Opt.LIST)[:12] + struct.pack(">I", 100000) + bytes(50000))
    assert conn.data_to_send() == rep(Opt.LIST, (1 << 31) + 9, b"option payload too large")
    conn.receive_data(bytes(50000) + opt(Opt.LIST))
    assert conn.data_to_send().endswith(rep(Opt.LIST, 1))


def test_export_name_old_style() -> None:
    conn = ServerConnection(Cat())
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 1))  # no NO_ZEROES: 124 zero bytes follow
    conn.receive_data(opt(Opt.EXPORT_NAME, b"ro"))
    out = conn.data_to_send()
    assert out[:10] == struct.pack(">QH", MiB, EXPORTS["ro"].flags(False)) and out[10:] == bytes(124)
    conn2 = negotiated()
    conn2.receive_data(opt(Opt.EXPORT_NAME, b"missing"))
    assert conn2.closed


def test_meta_contexts() -> None:
    conn = negotiated()
    conn.receive_data(opt(Opt.SET_META_CONTEXT, s32("disk") + struct.pack(">I", 0)))
    assert conn.data_to_send() == rep(10, (1 << 31) + 3,
                                      b"request option 'set meta context' when structured reply is not negotiated")
    conn.receive_data(opt(Opt.STRUCTURED_REPLY))
    assert conn.data_to_send() == rep(8, 1)
    conn.receive_data(opt(Opt.STRUCTURED_REPLY))
    assert conn.data_to_send() == rep(8, (1 << 31) + 3, b"structured reply already negotiated")
    conn.receive_data(opt(Opt.LIST_META_CONTEXT, s32("disk") + struct.pack(">I", 0)))
    assert conn.data_to_send() == (rep(9, 4, struct.pack(">I", 0) + b"base:allocation")
                                   + rep(9, 4, struct.pack(">I", 1) + b"qemu:dirty-bitmap:b0")
                                   + rep(9, 4, struct.pack(">I", 2) + b"qemu:allocation-depth") + rep(9, 1))
    conn.receive_data(opt(Opt.SET_META_CONTEXT, s32("disk") + struct.pack(">I", 2) + s32("qemu:dirty-bitmap:")
                          + s32("nope:x")))
    assert conn.data_to_send() == rep(10, 4, struct.pack(">I", 1) + b"qemu:dirty-bitmap:b0") + rep(10, 1)
    conn.receive_data(opt(Opt.GO, s32("disk") + struct.pack(">H", 0)))
    conn.data_to_send()
    conn.receive_data(req(Cmd.BLOCK_STATUS, 7, 0, MiB, flags=8))
    (ev,) = list(conn.events())
    assert ev == Request(7, Cmd.BLOCK_STATUS, 8, 0, MiB, b"", ((1, "qemu:dirty-bitmap:b0"),))
    conn.reply_block_status(ev, [(1, [(65536, 1), (65536, 0)])])
    assert conn.data_to_send() == (struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, 1, 5, 7, 12)
                                   + struct.pack(">III", 1, 65536, 1))


def test_transmission_errors_structured() -> None:
    conn = negotiated()
    go(conn, "ro")

    def error_of(data: bytes) -> tuple[int, bytes]:
        conn.receive_data(data)
        out = conn.data_to_send()
        magic, flags, typ, _cookie, length = struct.unpack_from(">IHHQI", out)
        assert (magic, flags, typ) == (STRUCTURED_REPLY_MAGIC, 1, 32769)
        err, n = struct.unpack_from(">IH", out, 20)
        return err, out[26:26 + n]

    assert error_of(req(Cmd.WRITE, 1, 0, 4, data=b"abcd")) == (errno.EPERM, b"Export is read-only")
    assert error_of(req(Cmd.READ, 2, MiB, 1)) == (errno.EINVAL, b"operation past EOF; From: 1048576, Len: 1, Size: 1048576")
    assert error_of(req(Cmd.READ, 3, 0, 32 * MiB + 1))[0] == errno.EINVAL
    assert error_of(req(99, 4, 0, 0)) == (errno.EINVAL, b"invalid request type (99) received")
    assert error_of(req(Cmd.READ, 5, 0, 1, flags=0x80)) == (errno.EINVAL, b"unsupported flags for command read (got 0x80)")
    assert error_of(req(Cmd.BLOCK_STATUS, 6, 0, 1)) == (errno.EINVAL, b"CMD_BLOCK_STATUS not negotiated")
    assert list(conn.events()) == []
    conn.receive_data(req(Cmd.FLUSH, 7, 0, 0, flags=1))   # FUA is valid on any command (QEMU)
    assert [e.cmd for e in conn.events() if isinstance(e, Request)] == [Cmd.FLUSH]
    conn.receive_data(req(Cmd.DISC, 9, 0, 0))
    assert list(conn.events()) == [Closed("client sent NBD_CMD_DISC")]


def test_oversized_write_is_skipped_then_answered() -> None:
    conn = negotiated()
    go(conn, "disk", structured=False)
    conn.receive_data(req(Cmd.WRITE, 1, 0, 32 * MiB + 1) + bytes(MiB))
    assert conn.data_to_send() == b""
    conn.receive_data(bytes(31 * MiB + 1) + req(Cmd.FLUSH, 2, 0, 0))
    assert conn.data_to_send() == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, errno.EINVAL, 1)
    assert [e.cmd for e in conn.events() if isinstance(e, Request)] == [Cmd.FLUSH]


def test_write_past_end_is_enospc_and_simple_read_reply() -> None:
    conn = negotiated()
    go(conn, "disk", structured=False)
    conn.receive_data(req(Cmd.WRITE_ZEROES, 1, 4 * MiB, 1))
    assert conn.data_to_send() == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, errno.ENOSPC, 1)
    conn.receive_data(req(Cmd.READ, 2, 0, 8))
    (ev,) = list(conn.events())
    assert isinstance(ev, Request)
    conn.reply_read(ev, [(0, b"abcd"), (4, 4)])
    assert conn.data_to_send() == struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, 2) + b"abcd" + bytes(4)


def test_structured_read_with_hole() -> None:
    conn = negotiated()
    go(conn)
    conn.receive_data(req(Cmd.READ, 3, 0, 8))
    (ev,) = list(conn.events())
    assert isinstance(ev, Request)
    conn.reply_read(ev, [(0, b"abcd"), (4, 4)])
    assert conn.data_to_send() == (
        struct.pack(">IHHQIQ", STRUCTURED_REPLY_MAGIC, 0, 1, 3, 12, 0) + b"abcd"
        + struct.pack(">IHHQIQI", STRUCTURED_REPLY_MAGIC, 1, 2, 3, 12, 4, 4))


def test_write_split_across_feeds() -> None:
    conn = negotiated()
    go(conn)
    data = req(Cmd.WRITE, 5, 512, 4, flags=1, data=b"wxyz")
    for b in data:
        conn.receive_data(bytes([b]))
    assert list(conn.events()) == [Request(5, Cmd.WRITE, 1, 512, 4, b"wxyz")]


@pytest.mark.parametrize("option", [Opt.LIST, Opt.GO, Opt.INFO, Opt.STRUCTURED_REPLY])
def test_tls_required_before_options(option: int) -> None:
    conn = negotiated(tls=True)
    conn.receive_data(opt(option))
    assert conn.data_to_send() == rep(option, (1 << 31) + 5, b"Option 0x%x not permitted before TLS" % option)
    conn.receive_data(opt(Opt.STARTTLS))
    assert conn.data_to_send() == rep(Opt.STARTTLS, 1)
    assert list(conn.events()) == [StartTLS()]


def test_starttls_without_tls_is_policy() -> None:
    conn = negotiated()
    conn.receive_data(opt(Opt.STARTTLS))
    assert conn.data_to_send() == rep(Opt.STARTTLS, (1 << 31) + 2, b"TLS not configured")


def test_eof_closes() -> None:
    conn = negotiated()
    conn.receive_data(b"")
    assert list(conn.events()) == [Closed("client disconnected")]


def test_errno_mapping() -> None:
    """QEMU's system_errno_to_nbd_errno: EROFS is EPERM, EDQUOT/EFBIG are
    ENOSPC, anything off the protocol's list is EINVAL."""
    conn = negotiated()
    go(conn, "disk", structured=False)
    got = []
    for err in (errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EIO):
        conn.reply_error(Request(1, Cmd.READ, 0, 0, 1), err)
        got.append(struct.unpack(">IIQ", conn.data_to_send())[1])
    assert got == [errno.EPERM, errno.ENOSPC, errno.ENOSPC, errno.EINVAL, errno.EIO]
