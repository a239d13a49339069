"""QEMU-style option strings: ``socket,id=mon0,path=/x.sock,server=on``.

Items are separated by commas; a literal comma inside a value is written
twice (``,,``), as QEMU's option parser wants.  An item without ``=`` is the
implied first key (``socket`` for ``--chardev``, ``chardev`` for
``--monitor``) when it comes first, else a boolean flag set to ``on``.
"""

from __future__ import annotations

from qmpd.qapi.keyval import split_items

__all__ = ["parse_option_string", "parse_bool", "OptionError"]


class OptionError(ValueError):
    """A command-line option string is malformed."""


def parse_option_string(text: str, implied: str) -> dict[str, str]:
    """Parse ``text`` into an ordered dict; ``implied`` names a bare first item.

    :raise OptionError: on an empty item or a repeated key.
    """
    result: dict[str, str] = {}
    for index, item in enumerate(split_items(text)):
        if not item:
            raise OptionError(f"Invalid parameter '' in '{text}'")
        if "=" in item:
            key, value = item.split("=", 1)
        elif index == 0:
            key, value = implied, item
        else:
            key, value = item, "on"
        if key in result:
            raise OptionError(f"Parameter '{key}' given twice in '{text}'")
        result[key] = value
    return result


def parse_bool(key: str, value: str) -> bool:
    """QEMU's on/off spelling.  :raise OptionError: for anything else."""
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise OptionError(f"Parameter '{key}' expects 'on' or 'off'")
