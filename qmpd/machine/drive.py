"""``-drive``: QEMU's legacy drive option string, parsed into a plan.

``-drive`` mixes three things, which :func:`parse_drive` separates:

* the BlockBackend and its guest device (``id``, ``if``, ``index``,
  ``media``, ``werror``, ``rerror``);
* shorthands QEMU expands (``cache=`` into ``cache.direct``/``cache.no-flush``,
  ``file=PATH`` into a ``file`` child, the ``blkdebug:[CONFIG]:PATH``
  pseudo-protocol, ``format=`` into ``driver``);
* everything else, which becomes ``blockdev-add`` options of the root node
  (dotted ``file.*`` keys included).  The machine checks those against the
  schema with QEMU's "Block format ... does not support the option" texts.

Example::

    parse_drive("if=virtio,id=drive0,file=blkdebug::/t.img,format=raw,cache=writeback")
    # DriveSpec(backend='drive0', interface='virtio', ...,
    #   options={'driver': 'raw', 'cache': {'direct': 'off', 'no-flush': 'off'},
    #            'file': {'driver': 'blkdebug', 'image': {'driver': 'file', 'filename': '/t.img'}}})

Values stay strings here; the caller coerces them with the schema.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from qmpd.errors import GenericError
from qmpd.qapi.keyval import split_items

__all__ = ["DriveSpec", "parse_drive", "default_drive_id", "INTERFACES", "ID_RE"]

#: ``if=`` values qmpd models, and the guest device each one implies.
INTERFACES = {"none": None, "virtio": "virtio-blk-pci", "scsi": "scsi-hd", "ide": "ide-hd"}
#: Units per bus of each interface (QEMU's if_max_devs; 0 = unlimited).
_MAX_DEVS = {"ide": 2, "scsi": 7, "virtio": 0, "none": 0}
_CACHE_MODES = {  # cache= -> (writeback, direct, no-flush)
    "writeback": ("on", "off", "off"), "none": ("on", "on", "off"),
    "writethrough": ("off", "off", "off"), "directsync": ("off", "on", "off"),
    "unsafe": ("on", "off", "on"),
}
_WERROR = ("ignore", "report", "stop", "enospc")
_RERROR = ("ignore", "report", "stop")
_BOOL = {"on": True, "yes": True, "true": True, "y": True,
         "off": False, "no": False, "false": False, "n": False}
ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")


@dataclass(slots=True)
class DriveSpec:
    """One ``-drive`` option, split (module docstring)."""

    #: BlockBackend name (``id=`` or the interface's default name).
    backend: str
    interface: str
    index: int
    media: str = "disk"
    werror: str = "enospc"
    rerror: str = "report"
    #: Cache writeback of the BlockBackend (``cache=writethrough``: False).
    writeback: bool = True
    #: ``blockdev-add`` options of the root node (string values); None for
    #: an empty drive (no ``file``, e.g. a CD-ROM without medium).
    options: dict[str, Any] | None = field(default=None)
    #: No ``format=``: the format is probed from the image (raw unless a
    #: registered format driver recognises the file).
    probe: bool = False


def default_drive_id(interface: str, index: int, media: str = "disk") -> str:
    """QEMU's name for a drive without ``id``: ``virtio0``, ``ide0-hd1``,
    ``ide1-cd0``, ``none0``..."""
    max_devs = _MAX_DEVS[interface]
    if max_devs:
        bus, unit = divmod(index, max_devs)
        kind = "cd" if media == "cdrom" else "hd"
        return f"{interface}{bus}-{kind}{unit}"
    return f"{interface}{index}"


def _bool(key: str, value: str) -> str:
    if value not in _BOOL:
        raise GenericError(f"Parameter '{key}' expects 'on' or 'off'")
    return "on" if _BOOL[value] else "off"


def _file_child(text: str) -> dict[str, Any] | str:
    """``file=``: a path, or ``blkdebug:[CONFIG]:PATH``."""
    if text.startswith("blkdebug:"):
        rest = text[len("blkdebug:"):]
        config, sep, path = rest.partition(":")
        if not sep:
            raise GenericError("Could not parse blkdebug filename")
        child: dict[str, Any] = {"driver": "blkdebug", "image": _file_child(path)}
        if config:
            child["config"] = config
        return child
    return {"driver": "file", "filename": text}


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _parse_items(text: str) -> tuple[dict[str, Any], str | None]:
    """QemuOpts-style: ``key=value`` items, dotted keys nested; ``file=``
    (a filename) may sit beside ``file.*`` keys.

    :return: the options and the ``file=`` filename, if any.
    """
    opts: dict[str, Any] = {}
    filename: str | None = None
    for item in split_items(text):
        key, sep, value = item.partition("=")
        if not sep:
            raise GenericError(f"Invalid parameter '{item}'")
        if key == "file":
            filename = value
            continue
        parts = key.split(".")
        cur = opts
        for part in parts[:-1]:
            nxt = cur.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise GenericError(f"Parameter '{key}' conflicts with another parameter")
            cur = nxt
        if parts[-1] in cur:
            raise GenericError(f"Parameter '{key}' conflicts with another parameter")
        cur[parts[-1]] = value
    return opts, filename


def parse_drive(text: str, next_index: dict[str, int]) -> DriveSpec:
    """Split one ``-drive`` option string.

    :param next_index: per interface, the next free ``index`` (updated).
    :raise GenericError: QEMU's texts for malformed drive-level options.
    """
    opts, file_opt = _parse_items(text)
    interface = opts.pop("if", "ide")
    if not isinstance(interface, str) or interface not in INTERFACES:
        raise GenericError(f"unsupported bus type '{interface}'")
    index_text = opts.pop("index", None)
    if index_text is not None:
        if not str(index_text).isdigit():
            raise GenericError("Parameter 'index' expects a number")
        index = int(index_text)
    else:
        index = next_index.get(interface, 0)
    next_index[interface] = max(next_index.get(interface, 0), index + 1)
    backend = opts.pop("id", None)
    if backend is None:
        backend = default_drive_id(interface, index, str(opts.get("media", "disk")))
    elif not ID_RE.match(str(backend)):
        raise GenericError("Parameter 'id' expects an identifier\n"
                           "Identifiers consist of letters, digits, '-', '.', '_', "
                           "starting with a letter.")
    spec = DriveSpec(str(backend), interface, index)
    media = opts.pop("media", "disk")
    if media not in ("disk", "cdrom"):
        raise GenericError(f"'{media}' invalid media")
    spec.media = str(media)
    werror = opts.pop("werror", "enospc")
    if werror not in _WERROR:
        raise GenericError(f"'{werror}' invalid write error action")
    rerror = opts.pop("rerror", "report")
    if rerror not in _RERROR:
        raise GenericError(f"'{rerror}' invalid read error action")
    spec.werror, spec.rerror = str(werror), str(rerror)
    for key in ("snapshot", "copy-on-read"):
        if key in opts and _bool(key, str(opts.pop(key))) == "on":
            raise GenericError(f"qmpd does not support {key}=on")
    opts.pop("serial", None)
    opts.pop("bus", None)
    opts.pop("unit", None)

    cache = opts.pop("cache", None)
    cache_opts: dict[str, Any] = {}
    if isinstance(cache, str):
        if cache not in _CACHE_MODES:
            raise GenericError("invalid cache option")
        writeback, direct, no_flush = _CACHE_MODES[cache]
        spec.writeback = writeback == "on"
        cache_opts = {"direct": direct, "no-flush": no_flush}
    elif isinstance(cache, dict):
        if "writeback" in cache:
            spec.writeback = _bool("cache.writeback", str(cache.pop("writeback"))) == "on"
        cache_opts = cache
    aio = opts.pop("aio", None)
    if aio is not None and aio not in ("threads", "native", "io_uring"):
        raise GenericError("invalid aio option")
    discard = opts.pop("discard", None)
    if discard is not None and discard not in ("ignore", "off", "unmap", "on"):
        raise GenericError("Invalid discard option")
    detect = opts.pop("detect-zeroes", None)
    if detect is not None and detect not in ("off", "on", "unmap"):
        raise GenericError(f"invalid parameter value: {detect}")
    if "read-only" in opts:
        opts["read-only"] = _bool("read-only", str(opts["read-only"]))

    fmt = opts.pop("format", None)
    driver = opts.pop("driver", None)
    file_extra = opts.pop("file", None)
    if fmt is not None and driver is not None:
        raise GenericError("Cannot specify both 'driver' and 'format'")
    driver = fmt if fmt is not None else driver
    if file_opt is None and file_extra is None and driver is None:
        if opts:
            raise GenericError("Must specify either driver or file")
        return spec  # an empty drive
    root: dict[str, Any] = {}
    if isinstance(file_opt, str):
        if not file_opt:
            raise GenericError('A block device must be specified for "file"')
        child = _file_child(file_opt)
        if driver is None:
            spec.probe = True
        root["file"] = child
    elif isinstance(file_extra, dict):
        root["file"] = {}
    elif fmt is not None and driver != "file":
        raise GenericError('A block device must be specified for "file"')
    root["driver"] = driver if driver is not None else "raw"
    if isinstance(file_extra, dict):
        _merge(root["file"], file_extra)
    _merge(root, opts)
    if isinstance(root.get("file"), dict) and aio is not None:
        file_child = root["file"]
        while file_child.get("driver") == "blkdebug" and isinstance(file_child.get("image"), dict):
            file_child = file_child["image"]
        if file_child.get("driver") == "file":
            file_child.setdefault("aio", aio)
    if cache_opts:
        root["cache"] = cache_opts
    root["discard"] = "unmap" if discard in ("unmap", "on") else "ignore"
    if detect is not None:
        root["detect-zeroes"] = detect
    spec.options = root
    return spec
