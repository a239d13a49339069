"""Compressed qcow2 clusters: the L2 descriptor and the codecs
(QEMU's docs/interop/qcow2.txt, "Compressed Clusters Descriptor"; the
codecs as block/qcow2-threads.c runs them).

Descriptor (an L2 entry with bit 62 set), ``x = 62 - (cluster_bits - 8)``:
bits 0..x-1 hold the host *byte* offset of the compressed stream, bits
x..61 the number of 512-byte sectors it uses beyond the one holding that
offset.  Worked example (64 KiB clusters, so x = 54)::

    >>> d = encode_descriptor(0x70010, 700, 16)
    >>> hex(d)
    '0x4040000000070010'
    >>> decode_descriptor(d, 16)
    Descriptor(offset=458768, sectors=1, nbytes=1008)

``nbytes`` is what to read: from ``offset`` to the end of its last sector
(the stream may be shorter; what follows it is ignored).

Codecs (``compression_type`` from the header): 0 is raw deflate, window
bits 12, memory level 9, default level, one stream per cluster; 1 is
zstd, one frame per cluster, default level, no checksum, content size in
the frame header, as ``ZSTD_compressStream2(..., ZSTD_e_end)`` makes it.
:func:`compress_cluster` returns None when the result does not fit in
``cluster_size - 1`` bytes: QEMU then writes the cluster uncompressed.
:func:`decompress_cluster` accepts what QEMU accepts (several zstd frames,
trailing bytes after the stream) and raises :class:`CompressedDataError`
(QEMU's EIO) for anything else, never producing more than one cluster.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import zstandard

__all__ = [
    "COMPRESSED", "ZLIB", "ZSTD", "Descriptor", "CompressedDataError", "offset_bits",
    "encode_descriptor", "decode_descriptor", "is_compressed", "host_clusters",
    "compress_cluster", "decompress_cluster", "pack",
]

COMPRESSED = 1 << 62
ZLIB = 0
ZSTD = 1
#: Highest cluster_bits a compressed descriptor can describe (2 MiB).
MAX_CLUSTER_BITS = 21
_ZSTD_FEED = 1024  # bytes of zstd input per step: bounds the output of one step


class CompressedDataError(ValueError):
    """A compressed cluster QEMU fails to read (EIO)."""


@dataclass(frozen=True, slots=True)
class Descriptor:
    #: Host byte offset of the compressed stream.
    offset: int
    #: Additional 512-byte sectors (the field's value).
    sectors: int
    #: Bytes from ``offset`` to the end of the last sector.
    nbytes: int


def offset_bits(cluster_bits: int) -> int:
    """:return: ``x``: the width of the offset field."""
    return 62 - (cluster_bits - 8)


def is_compressed(entry: int) -> bool:
    return bool(entry & COMPRESSED)


def encode_descriptor(offset: int, nbytes: int, cluster_bits: int) -> int:
    """:return: the L2 entry of ``nbytes`` of compressed data at host byte
    ``offset`` (no COPIED bit: compressed clusters are never written in
    place).  :raise ValueError: it does not fit the fields."""
    x = offset_bits(cluster_bits)
    if nbytes <= 0 or offset < 0 or offset >= 1 << x:
        raise ValueError("compressed cluster offset out of range")
    sectors = ((offset + nbytes - 1) >> 9) - (offset >> 9)
    if sectors >= 1 << (cluster_bits - 8):
        raise ValueError("compressed cluster too large for its descriptor")
    return COMPRESSED | (sectors << x) | offset


def decode_descriptor(entry: int, cluster_bits: int) -> Descriptor:
    """:return: where a compressed entry's stream lies (bit 63 is ignored,
    as QEMU does)."""
    x = offset_bits(cluster_bits)
    offset = entry & ((1 << x) - 1)
    sectors = (entry >> x) & ((1 << (cluster_bits - 8)) - 1)
    return Descriptor(offset, sectors, (sectors + 1) * 512 - (offset & 511))


def host_clusters(d: Descriptor, cluster_bits: int) -> range:
    """:return: host cluster indexes the stream touches; each holds one
    reference per compressed cluster touching it (``qemu-img check``)."""
    return range(d.offset >> cluster_bits, ((d.offset + d.nbytes - 1) >> cluster_bits) + 1)


def compress_cluster(data: bytes | bytearray | memoryview, compression_type: int = ZLIB,
                     cluster_size: int | None = None) -> bytes | None:
    """:return: the compressed stream of one cluster, or None when it does
    not fit in ``cluster_size - 1`` bytes (``cluster_size`` defaults to
    ``len(data)``)."""
    limit = (len(data) if cluster_size is None else cluster_size) - 1
    if compression_type == ZLIB:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        out = c.compress(bytes(data)) + c.flush()
    elif compression_type == ZSTD:
        out = zstandard.ZstdCompressor(level=3, write_content_size=True,
                                       write_checksum=False).compress(bytes(data))
    else:
        raise ValueError(f"unknown compression type: {compression_type}")
    return out if len(out) <= limit else None


def decompress_cluster(raw: bytes | bytearray | memoryview, cluster_size: int,
                       compression_type: int = ZLIB) -> bytes:
    """:return: exactly ``cluster_size`` bytes from the stream at the start
    of ``raw`` (read ``Descriptor.nbytes`` bytes).
    :raise CompressedDataError: corrupt, short or overlong data."""
    if compression_type == ZLIB:
        d = zlib.decompressobj(-12)
        try:
            out = d.decompress(bytes(raw), cluster_size)
        except zlib.error as exc:
            raise CompressedDataError(str(exc)) from None
        if len(out) != cluster_size:
            raise CompressedDataError("short deflate stream")
        return out
    if compression_type == ZSTD:
        return _zstd_decompress(bytes(raw), cluster_size)
    raise ValueError(f"unknown compression type: {compression_type}")


def _zstd_decompress(raw: bytes, size: int) -> bytes:
    """Frames one after another until ``size`` bytes are out, which must be
    the end of a frame (QEMU's qcow2_zstd_decompress)."""
    out = bytearray()
    rest = raw
    while len(out) < size:
        if not rest:
            raise CompressedDataError("zstd data ends before the cluster does")
        d = zstandard.ZstdDecompressor().decompressobj()
        pos = 0
        try:
            while not d.eof:
                if pos >= len(rest):
                    raise CompressedDataError("truncated zstd frame")
                out += d.decompress(rest[pos:pos + _ZSTD_FEED])
                pos += _ZSTD_FEED
                if len(out) > size:
                    raise CompressedDataError("zstd data longer than the cluster")
        except zstandard.ZstdError as exc:
            raise CompressedDataError(str(exc)) from None
        rest = d.unused_data + rest[pos:]
    return bytes(out)


def pack(streams: list[bytes], start: int, cluster_bits: int) -> tuple[list[int], list[int]]:
    """Lay compressed streams one after another from host byte ``start``,
    as QEMU does (each begins where the last ended; 512-byte alignment is
    not required).

    :return: (descriptors, per host cluster from ``start >> cluster_bits``
        the number of references to add).
    """
    descs: list[int] = []
    base = start >> cluster_bits
    refs: list[int] = []
    pos = start
    for s in streams:
        entry = encode_descriptor(pos, len(s), cluster_bits)
        for c in host_clusters(decode_descriptor(entry, cluster_bits), cluster_bits):
            while len(refs) <= c - base:
                refs.append(0)
            refs[c - base] += 1
        descs.append(entry)
        pos += len(s)
    return descs, refs
