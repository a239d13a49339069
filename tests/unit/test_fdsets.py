"""The descriptor-set registry (qmpd.block.fdsets) on its own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qmpd.block.fdsets import FdSets, FdsetOpenError, PassedFds


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_ids_access_modes_and_lifetime(tmp_path: Path) -> None:
    img = tmp_path / "a.img"
    img.write_bytes(b"abc")
    sets = FdSets()
    ro = os.open(img, os.O_RDONLY)
    rw = os.open(img, os.O_RDWR)
    assert sets.add(ro, 2, "r") == (2, ro)
    assert sets.add(rw, 2, None) == (2, rw)
    spare = os.open(img, os.O_RDONLY)
    assert sets.add(spare, None, None) == (0, spare)   # lowest free id
    with pytest.raises(ValueError):
        sets.add(spare, -1, None)
    # The member with the matching access mode is duplicated; O_TRUNC truncates.
    dup = sets.dup("/dev/fdset/2", os.O_RDWR | os.O_TRUNC)
    assert dup not in (ro, rw) and os.fstat(dup).st_size == 0
    with pytest.raises(FdsetOpenError) as err:
        sets.dup("/dev/fdset/2", os.O_WRONLY)
    assert err.value.desc == "Could not dup FD for /dev/fdset/2 flags 1: Permission denied"
    with pytest.raises(FdsetOpenError) as err:
        sets.dup("/dev/fdset/9", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    assert err.value.desc == "Could not dup FD for /dev/fdset/9 flags 42: No such file or directory"
    # The last client leaves: set 0 (unused) is closed, set 2 (in use) stays...
    sets.last_client_gone()
    assert not _is_open(spare)
    assert sets.query() == [{"fdset-id": 2, "fds": [{"fd": ro, "opaque": "r"}, {"fd": rw}]}]
    # ...until its duplicate is closed while no client is connected.
    sets.released(dup)
    os.close(dup)
    assert sets.query() == [] and not _is_open(ro) and not _is_open(rw)


def test_bounded_and_remove(tmp_path: Path) -> None:
    sets = FdSets(max_fds=2)
    fds = [os.open(tmp_path, os.O_RDONLY) for _ in range(3)]
    sets.add(fds[0], 1, None)
    sets.add(fds[1], 1, None)
    with pytest.raises(OverflowError):
        sets.add(fds[2], 1, None)
    assert not sets.remove(1, fds[2]) and not sets.remove(5, None)
    assert sets.remove(1, fds[0]) and not _is_open(fds[0])
    assert sets.remove(1, None) and sets.query() == []
    os.close(fds[2])


def test_passed_fds_take_first_close_rest(tmp_path: Path) -> None:
    passed = PassedFds()
    a, b, c = (os.open(tmp_path, os.O_RDONLY) for _ in range(3))
    passed.received([a, b])
    passed.received([c])            # a and b were never taken: closed
    assert not _is_open(a) and not _is_open(b)
    assert passed.take() == c and passed.take() is None
    passed.named["x"] = c
    passed.close_all()
    assert not _is_open(c) and passed.held == 0
