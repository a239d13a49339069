"""qemu-io number parsing and report formatting (no event loop)."""

from __future__ import annotations

import errno

import pytest

from qmpd.block.qemuio import cvtstr, timestr, cvtnum


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("65536", 65536),
        ("64k", 65536),
        ("64K", 65536),
        ("1M", 1 << 20),
        ("1m", 1 << 20),
        ("2G", 2 << 30),
        ("1T", 1 << 40),
        ("1P", 1 << 50),
        ("1E", 1 << 60),
        ("512b", 512),
        ("512B", 512),
        ("0x3ff0000", 0x3FF0000),
        ("0X10", 16),
        ("1.5k", 1536),
        ("0.5M", 1 << 19),
    ],
)
def test_cvtnum_values(text: str, value: int) -> None:
    assert cvtnum(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-1", "1x", "0x10k", "1.5", "0x1.5", "12q"])
def test_cvtnum_einval(text: str) -> None:
    assert cvtnum(text) == -errno.EINVAL


@pytest.mark.parametrize("text", ["8E", "99999999999999999999", "0xffffffffffffffff"])
def test_cvtnum_erange(text: str) -> None:
    assert cvtnum(text) == -errno.ERANGE


def test_cvtstr() -> None:
    assert cvtstr(65536) == "64 KiB"
    assert cvtstr(1 << 20) == "1 MiB"
    assert cvtstr(32) == "32 bytes"
    assert cvtstr(1536) == "1.500000 KiB"


def test_timestr() -> None:
    assert timestr(0.001) == "00.00 sec"
    assert timestr(0.5) == "00.50 sec"
    assert timestr(61.25) == "0:01:01.25"
