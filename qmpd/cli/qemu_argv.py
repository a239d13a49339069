"""QEMU's system-emulator command line (``qemu-system-x86_64 ...``).

qmpd can be started exactly as QEMU's iotests harness, libvirt-style test
scripts or a user start QEMU::

    qmpd -machine pc -S -nodefaults -display none \\
         -chardev socket,id=mon,path=/tmp/mon.sock -mon chardev=mon,mode=control \\
         -qtest unix:path=/tmp/qtest.sock -accel qtest \\
         -drive if=none,id=drive0,file=/srv/disk.img,format=raw \\
         -device virtio-blk-pci,drive=drive0,id=vblk0

:func:`split_argv` takes the options it knows out of ``argv`` (QEMU accepts
``-opt`` and ``--opt`` alike) and leaves the rest for the QSD-style parser
in :mod:`qmpd.cli.main`.  Options both command lines have keep their
QSD meaning in the double-dash spelling (``--chardev``, ``--monitor``,
``--blockdev``, ``--name``, ``--pidfile``, ``--daemonize``); their
single-dash spelling is QEMU's.  An unknown single-dash option is one line
and exit status 1, as QEMU: ``qmpd: -foo: invalid option``.

Probes (``-machine help``, ``-drive format=help``, ``-device help``) are
answered from the machine, driver and device tables, then qmpd exits 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qmpd.cli.options import OptionError, parse_bool, parse_option_string

__all__ = ["QemuArgs", "Chardev", "split_argv", "ArgvError"]


class ArgvError(ValueError):
    """A QEMU-style option is wrong; ``str()`` is QEMU's one-line text."""


class _BareError(ArgvError):
    """An error QEMU prints without naming the option."""


@dataclass
class Chardev:
    """``-chardev socket,...``: a UNIX path or TCP host/port; ``server``
    listens, otherwise qmpd connects (QEMU's default)."""

    id: str
    option: str
    server: bool
    path: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None


@dataclass
class QemuArgs:
    """The QEMU options found in argv, in their order within each kind."""

    chardevs: dict[str, Chardev] = field(default_factory=dict)
    #: ``-mon`` (chardev id, option text).
    monitors: list[tuple[str, str]] = field(default_factory=list)
    qtest: Chardev | None = None
    blockdevs: list[str] = field(default_factory=list)
    drives: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)
    machine: str = "none"
    prelaunch: bool = False
    name: str | None = None
    pidfile: str | None = None
    daemonize: bool = False
    #: A probe asked (``-machine help`` ...): print it and exit 0.
    probe: str | None = None
    #: Any QEMU-style option was given.
    used: bool = False


#: QEMU options qmpd accepts: name -> takes an argument.
_WITH_ARG = {"machine", "M", "accel", "display", "vga", "name", "pidfile", "blockdev", "drive",
             "device", "object", "qmp", "chardev", "mon", "qtest", "serial", "parallel",
             "m", "smp", "cpu", "boot", "L", "rtc", "global", "d", "D", "trace", "msg"}
_FLAGS = {"S", "nodefaults", "nographic", "daemonize", "no-user-config", "no-shutdown",
          "no-reboot", "enable-kvm", "snapshot", "preconfig"}
#: Shared with the QSD command line: only the single-dash form is QEMU's.
_SHARED = {"chardev", "blockdev", "name", "pidfile", "daemonize", "monitor"}
#: QEMU options that exist but that qmpd refuses (no guest to run).
_REFUSED = {"monitor", "hda", "hdb", "cdrom", "kernel", "initrd", "incoming", "loadvm",
            "netdev", "nic", "net", "vnc", "spice", "gdb", "s", "icount"}
_OBJECT_TYPES = ("iothread", "throttle-group")
_ACCELS = ("qtest", "tcg", "kvm")


def _option_name(arg: str) -> tuple[str, bool] | None:
    """:return: (name, double-dash) for an option-looking argument."""
    if arg.startswith("--") and len(arg) > 2:
        return arg[2:], True
    if arg.startswith("-") and len(arg) > 1:
        return arg[1:], False
    return None


def split_argv(argv: list[str]) -> tuple[QemuArgs, list[str]]:
    """Take QEMU's options out of ``argv``.

    :return: the QEMU options and the arguments left for the QSD-style parser.
    :raise ArgvError: QEMU's texts for unknown options and bad values.
    """
    out = QemuArgs()
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        parsed = _option_name(arg)
        if parsed is None:
            rest.append(arg)
            continue
        name, double = parsed
        if "=" in name and double:
            rest.append(arg)
            continue
        if double and (name in _SHARED or name in ("h", "help", "V", "version")):
            rest.append(arg)
            continue
        if name in _REFUSED:
            raise ArgvError(f"{arg}: option not supported by qmpd (it runs no guest)")
        if name not in _WITH_ARG and name not in _FLAGS:
            if double:
                rest.append(arg)  # a qmpd option (--socket, --log-level, ...)
                continue
            if name in ("h", "V"):
                rest.append(arg)
                continue
            raise ArgvError(f"{arg}: invalid option")
        out.used = True
        value = ""
        if name in _WITH_ARG:
            if i >= len(argv):
                raise ArgvError(f"{arg}: requires an argument")
            value = argv[i]
            i += 1
        try:
            _apply(out, name, value)
        except _BareError:
            raise
        except (ArgvError, OptionError) as err:
            raise ArgvError(f"{arg} {value}: {err}" if value else f"{arg}: {err}") from err
    for cid, value in out.monitors:
        if cid not in out.chardevs:
            raise ArgvError(f"-mon {value}: chardev '{cid}' not found")
    return out, rest


def _apply(out: QemuArgs, name: str, value: str) -> None:
    if name in ("machine", "M"):
        _machine(out, value)
    elif name == "accel":
        accel = parse_option_string(value, "accel").get("accel", "")
        if accel == "help":
            out.probe = "Accelerators supported in QEMU binary:\n" + "\n".join(_ACCELS) + "\n"
        elif accel not in _ACCELS:
            raise ArgvError(f"invalid accelerator {accel}")
    elif name == "S":
        out.prelaunch = True
    elif name == "display":
        if value.split(",")[0] != "none":
            raise ArgvError("qmpd has no display (only 'none')")
    elif name in ("vga", "serial", "parallel"):
        if value not in ("none", "null"):
            raise ArgvError(f"qmpd has no {name} (only 'none')")
    elif name == "name":
        opts = parse_option_string(value, "guest")
        out.name = opts.get("guest")
    elif name == "pidfile":
        out.pidfile = value
    elif name == "daemonize":
        out.daemonize = True
    elif name == "blockdev":
        out.blockdevs.append(value)
    elif name == "drive":
        if value == "format=help" or value.endswith(",format=help"):
            out.probe = "format=help"
        else:
            out.drives.append(value)
    elif name == "device":
        if value in ("help", "?"):
            out.probe = "device=help"
        else:
            out.devices.append(value)
    elif name == "object":
        _object(out, value)
    elif name == "chardev":
        _chardev(out, value, value)
    elif name == "qmp":
        cid = f"compat_monitor{len(out.monitors)}"
        _chardev(out, _legacy_socket(value, cid), value)
        out.monitors.append((cid, value))
    elif name == "mon":
        opts = parse_option_string(value, "chardev")
        if opts.get("mode", "readline") != "control":
            raise ArgvError("only mode=control monitors are supported (QMP); qmpd has no HMP monitor")
        if "pretty" in opts:
            parse_bool("pretty", opts["pretty"])   # QEMU's error for a bad value
        mon_id = opts.get("chardev")
        if mon_id is None:
            raise ArgvError("Parameter 'chardev' is missing")
        out.monitors.append((mon_id, value))
    elif name == "qtest":
        out.qtest = _chardev(out, _legacy_socket(value, "qtest"), value, register=False)
    # the rest (-nodefaults, -nographic, -m, -smp, ...) changes nothing here


def _machine(out: QemuArgs, value: str) -> None:
    from qmpd.machine.types import MACHINE_TYPES

    opts = parse_option_string(value, "type")
    mtype = opts.pop("type", None)
    if mtype in ("help", "?"):
        out.probe = "machine=help"
        return
    if mtype is not None:
        if mtype not in MACHINE_TYPES:
            raise _BareError("unsupported machine type\nUse -machine help to list supported machines")
        out.machine = mtype
    accel = opts.get("accel")
    if accel is not None and not all(a in _ACCELS for a in accel.split(":")):
        raise ArgvError(f"invalid accelerator {accel}")


def _object(out: QemuArgs, value: str) -> None:
    opts = parse_option_string(value, "qom-type")
    qom_type = opts.get("qom-type")
    if qom_type not in _OBJECT_TYPES:
        raise ArgvError(f"invalid object type: {qom_type}")
    if "id" not in opts:
        raise ArgvError("Parameter 'id' is missing")
    out.objects.append(value)


def _legacy_socket(value: str, cid: str) -> str:
    """``unix:PATH,opts`` / ``unix:path=PATH`` / ``tcp:HOST:PORT,opts`` as a
    ``-chardev socket`` option string."""
    head, _, opts = value.partition(",")
    extra = f",{opts}" if opts else ""
    if head.startswith("unix:"):
        path = head[len("unix:"):]
        if path.startswith("path="):
            path = path[len("path="):]
        return f"socket,id={cid},path={path.replace(',', ',,')}{extra}"
    if head.startswith("tcp:"):
        host, _, port = head[len("tcp:"):].rpartition(":")
        return f"socket,id={cid},host={host or '127.0.0.1'},port={port}{extra}"
    raise ArgvError(f"chardev: backend '{head.split(':')[0]}' is not supported (only unix: and tcp:)")


def _chardev(out: QemuArgs, text: str, option: str, *, register: bool = True) -> Chardev:
    opts = parse_option_string(text, "backend")
    backend = opts.pop("backend", "")
    if backend != "socket":
        raise ArgvError(f"chardev backend '{backend}' is not supported (only 'socket')")
    cid = opts.get("id")
    if not cid:
        raise ArgvError("Parameter 'id' is missing")
    if register and cid in out.chardevs:
        raise ArgvError(f"attempt to add duplicate property '{cid}' to object (type 'container')")
    server = parse_bool("server", opts.get("server", "off"))
    if "wait" in opts:
        parse_bool("wait", opts["wait"])
    dev = Chardev(cid, option, server)
    if "path" in opts:
        dev.path = opts["path"]
    elif "port" in opts:
        try:
            dev.port = int(opts["port"])
        except ValueError as err:
            raise ArgvError("Parameter 'port' expects a number") from err
        dev.host = opts.get("host") or "127.0.0.1"
    else:
        raise ArgvError("chardev: socket: no 'path' or 'port'")
    if register:
        out.chardevs[cid] = dev
    return dev
