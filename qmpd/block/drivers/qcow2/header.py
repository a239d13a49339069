"""The qcow2 header, its feature bits and header extensions, as pure
functions over ``bytes`` (QEMU's docs/interop/qcow2.txt, "Header").

Worked example: ``qemu-img create -f qcow2 a.qcow2 1G`` (QEMU 7.2) writes a
112-byte version 3 header, then a feature name table, into cluster 0::

    >>> h = parse_header(first_cluster)          # bytes 0..65535
    >>> h.version, h.cluster_bits, h.size
    (3, 16, 1073741824)
    >>> h.refcount_table_offset, h.refcount_table_clusters
    (65536, 1)                                   # refcount table in cluster 1
    >>> h.l1_table_offset, h.l1_size
    (196608, 2)                                  # two L1 entries cover 1 GiB
    >>> h.refcount_bits, h.header_length
    (16, 112)
    >>> encode_header(h)[:4]
    b'QFI\\xfb'

:func:`parse_header` raises :class:`HeaderError` with QEMU's words for every
header QEMU refuses; it never needs more than the first cluster.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

__all__ = [
    "MAGIC", "HeaderError", "Header", "parse_header", "encode_header",
    "INCOMPAT_DIRTY", "INCOMPAT_CORRUPT", "INCOMPAT_DATA_FILE", "INCOMPAT_COMPRESSION",
    "INCOMPAT_EXTL2", "COMPAT_LAZY_REFCOUNTS", "AUTOCLEAR_BITMAPS", "AUTOCLEAR_DATA_FILE_RAW",
    "AUTOCLEAR_MASK",
    "EXT_BACKING_FORMAT", "EXT_FEATURE_TABLE", "EXT_BITMAPS", "EXT_CRYPTO", "EXT_DATA_FILE",
    "FEATURE_NAMES", "V2_HEADER_LENGTH", "V3_HEADER_LENGTH", "MIN_CLUSTER_BITS", "MAX_CLUSTER_BITS",
]

MAGIC = b"QFI\xfb"
V2_HEADER_LENGTH = 72
#: What QEMU 7.2 writes for version 3 (104 bytes plus compression_type, padded).
V3_HEADER_LENGTH = 112
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
#: Autoclear bits QEMU 7.2 knows (QCOW2_AUTOCLEAR_MASK); others are cleared
#: at a read-write open.
AUTOCLEAR_MASK = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

#: (type, bit) -> name, as QEMU 7.2 writes its feature name table.
FEATURE_NAMES: tuple[tuple[int, int, str], ...] = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)

#: Incompatible bits this implementation handles (dirty, corrupt, compression type).
SUPPORTED_INCOMPAT = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")


class HeaderError(Exception):
    """A header QEMU refuses; ``str()`` is QEMU's text, ``unsupported`` marks
    QEMU's ENOTSUP cases (``qemu-img`` words them the same)."""

    def __init__(self, text: str, *, unsupported: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.unsupported = unsupported


@dataclass(slots=True)
class Header:
    """Every header field plus the header extensions QEMU understands."""

    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V3_HEADER_LENGTH
    compression_type: int = 0
    #: The backing file name (from ``backing_file_offset``), or None.
    backing_file: str | None = None
    #: The backing format extension, or None.
    backing_format: str | None = None
    #: Bitmaps extension: (nb_bitmaps, directory_size, directory_offset).
    bitmaps_ext: tuple[int, int, int] | None = None
    #: A bitmaps extension was found with its autoclear bit clear (a program
    #: without bitmap support wrote the image): QEMU ignores it, warns, and
    #: drops it from the header at the next read-write open.
    bitmaps_ignored: bool = False
    #: Extensions kept verbatim when the header is rewritten: (type, data).
    unknown_extensions: list[tuple[int, bytes]] = field(default_factory=list)
    #: Feature names from the image's table: (type, bit) -> name.
    feature_table: dict[tuple[int, int], str] = field(default_factory=dict)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & COMPAT_LAZY_REFCOUNTS)

    def with_features(self, set_bits: int = 0, clear_bits: int = 0) -> Header:
        """:return: a copy with incompatible bits set/cleared."""
        return replace(self, incompatible_features=(self.incompatible_features | set_bits) & ~clear_bits)


def _unsupported_features(h: Header, mask: int) -> str:
    """QEMU's report_unsupported_feature: the bits the image's feature name
    table names, then one "Unknown incompatible feature" with the rest."""
    names = []
    for bit in range(64):
        name = h.feature_table.get((0, bit))
        if mask & (1 << bit) and name is not None:
            names.append(name[:46])
            mask &= ~(1 << bit)
    if mask:
        names.append(f"Unknown incompatible feature: {mask:x}")
    return ", ".join(names)


def parse_header(buf: bytes, file_length: int | None = None) -> Header:
    """Parse the header and extensions from the start of the image.

    :param buf: at least the first cluster (zero-padded if the file is shorter).
    :param file_length: the image file's size, for the backing name check.
    :raise HeaderError: QEMU 7.2's open error texts.
    """
    if len(buf) < _V2.size:
        buf = bytes(buf) + bytes(_V2.size - len(buf))
    (magic, version, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
     nb_snap, snap_off) = _V2.unpack_from(buf)
    if magic != MAGIC:
        raise HeaderError("Image is not in qcow2 format")
    if version < 2 or version > 3:
        raise HeaderError(f"Unsupported qcow2 version {version}", unsupported=True)
    if cbits < MIN_CLUSTER_BITS or cbits > MAX_CLUSTER_BITS:
        raise HeaderError(f"Unsupported cluster size: 2^{cbits}")
    h = Header(version, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
               nb_snap, snap_off)
    csize = 1 << cbits
    if version == 2:
        h.header_length = V2_HEADER_LENGTH
        h.refcount_order = 4
    else:
        if len(buf) < 104:
            buf = bytes(buf) + bytes(104 - len(buf))
        (h.incompatible_features, h.compatible_features, h.autoclear_features,
         h.refcount_order, h.header_length) = _V3.unpack_from(buf, 72)
        if h.header_length < 104:
            raise HeaderError("qcow2 header too short")
        if h.header_length > csize:
            raise HeaderError("qcow2 header exceeds cluster size")
        if h.header_length > 104 and len(buf) > 104:
            h.compression_type = buf[104]
    if h.backing_file_offset > csize:
        raise HeaderError("Invalid backing file offset")
    end = csize if h.backing_file_offset == 0 else h.backing_file_offset
    _parse_extensions(h, buf, h.header_length, end)
    # An external data file is QEMU's; qmpd has none to offer, and the driver
    # refuses it with QEMU's text after the table checks.
    unknown = h.incompatible_features & ~(SUPPORTED_INCOMPAT | INCOMPAT_DATA_FILE | INCOMPAT_EXTL2)
    if unknown:
        raise HeaderError(f"Unsupported qcow2 feature(s): {_unsupported_features(h, unknown)}",
                          unsupported=True)
    if h.incompatible_features & INCOMPAT_EXTL2:
        # QEMU knows extended L2 entries (subclusters); qmpd does not.
        raise HeaderError(f"Unsupported qcow2 feature(s): "
                          f"{_unsupported_features(h, INCOMPAT_EXTL2)}", unsupported=True)
    if h.refcount_order > 6:
        raise HeaderError("Reference count entry width too large; may not exceed 64 bits")
    if h.incompatible_features & INCOMPAT_COMPRESSION:
        if h.compression_type == 0:
            raise HeaderError("qcow2_header: compression_type field is zero but compression "
                              "type bit is set")
    if h.compression_type > 1:
        raise HeaderError(f"qcow2: unknown compression type: {h.compression_type}")
    if h.compression_type != 0 and not h.incompatible_features & INCOMPAT_COMPRESSION:
        raise HeaderError("qcow2_header: compression type bit is not set, but compression "
                          "type is set")
    if h.crypt_method:
        # qmpd opens no encrypted image; these are QEMU's texts when no
        # key secret is given (AES, LUKS) or the method is unknown.
        if h.crypt_method > 2:
            raise HeaderError(f"Unsupported encryption method {h.crypt_method}")
        if h.crypt_method == 2 and not any(t == EXT_CRYPTO for t, _ in h.unknown_extensions):
            raise HeaderError("Missing CRYPTO header for crypt method 2")
        raise HeaderError("Parameter 'encrypt.key-secret' is required for cipher")
    if h.backing_file_offset:
        if h.backing_file_size > 1023 or h.backing_file_size > csize - h.backing_file_offset:
            raise HeaderError("Backing file name too long")
        raw = bytes(buf[h.backing_file_offset:h.backing_file_offset + h.backing_file_size])
        h.backing_file = raw.decode("utf-8", "replace")
    return h


def _parse_extensions(h: Header, buf: bytes, start: int, end: int) -> None:
    offset = start
    while offset + 8 <= min(end, len(buf)):
        etype, elen = struct.unpack_from(">II", buf, offset)
        offset += 8
        if etype == EXT_END:
            return
        if elen > end - offset:
            raise HeaderError("Invalid extension length")
        data = bytes(buf[offset:offset + elen])
        if etype == EXT_BACKING_FORMAT:
            if elen > 15:
                raise HeaderError(f"ERROR: ext_backing_format: len={elen} too large (>=16)")
            h.backing_format = data.decode("utf-8", "replace")
        elif etype == EXT_FEATURE_TABLE:
            for i in range(0, elen - 47, 48):
                name = data[i + 2:i + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
                h.feature_table[(data[i], data[i + 1])] = name
        elif etype == EXT_BITMAPS:
            if elen != 24:
                raise HeaderError("bitmaps_ext: Invalid extension length")
            if not h.autoclear_features & AUTOCLEAR_BITMAPS:
                h.bitmaps_ignored = True
                offset += (elen + 7) & ~7
                continue
            nb, _res, dsize, doff = struct.unpack(">IIQQ", data)
            h.bitmaps_ext = (nb, dsize, doff)
        else:
            h.unknown_extensions.append((etype, data))
        offset += (elen + 7) & ~7


def _ext(etype: int, data: bytes) -> bytes:
    pad = (-len(data)) % 8
    return struct.pack(">II", etype, len(data)) + data + bytes(pad)


def encode_header(h: Header, *, feature_table: bool = True) -> bytes:
    """:return: header, extensions and backing file name as QEMU lays them out
    (``backing_file_offset``/``backing_file_size`` are filled in).

    :raise HeaderError: it does not fit into the first cluster.
    """
    exts = b""
    if h.backing_format is not None:
        exts += _ext(EXT_BACKING_FORMAT, h.backing_format.encode())
    # QEMU's order (qcow2_update_header): feature table, then bitmaps.
    if feature_table and h.version >= 3:
        table = b"".join(struct.pack(">BB46s", t, b, n.encode()) for t, b, n in FEATURE_NAMES)
        exts += _ext(EXT_FEATURE_TABLE, table)
    if h.bitmaps_ext is not None:
        nb, dsize, doff = h.bitmaps_ext
        exts += _ext(EXT_BITMAPS, struct.pack(">IIQQ", nb, 0, dsize, doff))
    for etype, data in h.unknown_extensions:
        exts += _ext(etype, data)
    exts += struct.pack(">II", EXT_END, 0)
    hlen = V2_HEADER_LENGTH if h.version == 2 else h.header_length
    name = h.backing_file.encode() if h.backing_file is not None else b""
    bfo = hlen + len(exts) if h.backing_file is not None else 0
    fixed = _V2.pack(MAGIC, h.version, bfo, len(name), h.cluster_bits, h.size, h.crypt_method,
                     h.l1_size, h.l1_table_offset, h.refcount_table_offset,
                     h.refcount_table_clusters, h.nb_snapshots, h.snapshots_offset)
    if h.version >= 3:
        fixed += _V3.pack(h.incompatible_features, h.compatible_features, h.autoclear_features,
                          h.refcount_order, hlen)
        fixed += bytes([h.compression_type]) + bytes(hlen - 105)
    out = fixed + exts + name
    if len(out) > h.cluster_size:
        raise HeaderError("Header extensions too large")
    h.backing_file_offset, h.backing_file_size = bfo, len(name)
    return out
