"""Errors raised by the bitmap layer, worded as QEMU words them (spec 5.3).

All are :class:`qmpd.errors.GenericError` (QMP class ``GenericError``)::

    BitmapError                 any other bitmap failure (text given)
    ├── BitmapNotFound          "Dirty bitmap '%s' not found"
    ├── BitmapBusy              "Bitmap '%s' is currently in use by another ..."
    ├── BitmapReadonly          "Bitmap '%s' is readonly and cannot be modified"
    └── BitmapInconsistent      "Bitmap '%s' is inconsistent and cannot be used"

The texts of the other checks are built by the functions below, so callers
never spell them.
"""

from __future__ import annotations

from qmpd.errors import GenericError

__all__ = [
    "BitmapError",
    "BitmapNotFound",
    "BitmapBusy",
    "BitmapReadonly",
    "BitmapInconsistent",
    "MAX_NAME_BYTES",
    "empty_name",
    "bad_granularity",
    "persistent_unsupported",
    "already_exists",
    "name_too_long",
    "sizes_differ",
]

#: Longest bitmap name QEMU accepts, in bytes (BDRV_BITMAP_MAX_NAME_SIZE).
MAX_NAME_BYTES = 1023


class BitmapError(GenericError):
    """A bitmap operation was refused; ``desc`` is QEMU's text."""


class BitmapNotFound(BitmapError):
    """No bitmap of that name on the node."""

    def __init__(self, name: str) -> None:
        super().__init__(f"Dirty bitmap '{name}' not found")


class BitmapBusy(BitmapError):
    """The bitmap is frozen by an operation (a backup job)."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"Bitmap '{name}' is currently in use by another operation and cannot be used"
        )


class BitmapReadonly(BitmapError):
    """The bitmap is read-only (persistent bitmaps of read-only images)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"Bitmap '{name}' is readonly and cannot be modified")


class BitmapInconsistent(BitmapError):
    """The bitmap was not saved cleanly (persistent bitmaps only)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"Bitmap '{name}' is inconsistent and cannot be used")


def empty_name() -> BitmapError:
    """:return: the error for ``name: ""``."""
    return BitmapError("Bitmap name cannot be empty")


def bad_granularity() -> BitmapError:
    """:return: the error for a granularity below 512 or not a power of two."""
    return BitmapError("Granularity must be power of 2 and at least 512")


def persistent_unsupported(node: str) -> BitmapError:
    """:return: the error for ``persistent: true`` on e.g. a raw node."""
    return BitmapError(f"Can't store persistent bitmaps to {node}: Operation not supported")


def already_exists(name: str) -> BitmapError:
    """:return: the error for a name already used on the node."""
    return BitmapError(f"Bitmap already exists: {name}")


def name_too_long(name: str) -> BitmapError:
    """:return: the error for a name longer than :data:`MAX_NAME_BYTES`."""
    return BitmapError(f"Bitmap name too long: {name}")


def sizes_differ(dest: int, src: int) -> BitmapError:
    """:return: the merge error for bitmaps covering different sizes."""
    return BitmapError(
        f"Bitmaps are of different sizes (destination size is {dest}, "
        f"source size is {src}) and can't be merged"
    )
