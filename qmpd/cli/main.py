"""``qmpd`` command line: options, logging, uvloop, signals, daemonizing.

Compatible with qemu-storage-daemon where the two overlap::

    qmpd --socket ./qmpd.sock
    qmpd --chardev socket,id=mon0,path=/run/qmp.sock,server=on,wait=off \\
         --monitor chardev=mon0
    qmpd --chardev socket,id=tcp0,host=127.0.0.1,port=4444,server=on,wait=off \\
         --monitor tcp0

and with QEMU's system emulator (``-machine``, ``-drive``, ``-device``,
``-qmp``, ``-chardev``/``-mon``, ``-qtest``...; see :mod:`qmpd.cli.qemu_argv`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from qmpd import __version__
from qmpd.cli.hardening import add_options as add_hardening_options
from qmpd.cli.hardening import limits_from_args, write_pidfile
from qmpd.cli.options import OptionError, parse_bool, parse_option_string
from qmpd.cli.qemu_argv import ArgvError, Chardev, QemuArgs, split_argv
from qmpd.commands.context import DaemonConfig
from qmpd.server.listeners import (
    Connector, Listener, TcpConnector, TcpListener, UnixConnector, UnixListener,
)
from qmpd.server.plan import StartupPlan

__all__ = ["main", "build_parser", "parse_args"]

DEFAULT_SOCKET = "./qmpd.sock"
DEFAULT_QEMU_VERSION = (9, 0, 0)
log = logging.getLogger("qmpd.cli")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"qmpd: {message}\n")
        sys.exit(1)


def build_parser() -> argparse.ArgumentParser:
    """:return: the argument parser (also used for ``--help``)."""
    p = _Parser(
        prog="qmpd",
        description="QMP daemon with QEMU's block backup control plane over raw and qcow2 images.",
    )
    p.add_argument("-V", "--version", action="version", version=f"qmpd {__version__}")
    p.add_argument("--socket", action="append", default=[], metavar="PATH",
                   help=f"serve QMP on a UNIX socket (repeatable; default {DEFAULT_SOCKET})")
    p.add_argument("--chardev", action="append", default=[], metavar="OPTS",
                   help="socket,id=ID,path=PATH|host=H,port=P,server=on,wait=off (host defaults to 127.0.0.1)")
    p.add_argument("--monitor", action="append", default=[], metavar="OPTS",
                   help="[chardev=]ID[,mode=control][,pretty=off], or inline socket options")
    p.add_argument("--blockdev", action="append", default=[], metavar="OPTS",
                   help="a block node, as key=value pairs or JSON (like blockdev-add)")
    # --- NBD (issue 11): qemu-storage-daemon's --nbd-server and --export ---
    p.add_argument("--nbd-server", action="append", default=[], metavar="OPTS",
                   help="start the NBD server: addr.type=unix,addr.path=PATH or "
                        "addr.type=inet,addr.host=H,addr.port=P[,max-connections=N]")
    p.add_argument("--export", action="append", default=[], metavar="OPTS",
                   help="a block export, like block-export-add: nbd,id=ID,node-name=NODE[,...]")
    # --- end NBD ---
    p.add_argument("--name", help="the name answered by query-name")
    p.add_argument("--state-dir", metavar="DIR",
                   help="keep persistent bitmaps of raw images here, crash-consistently "
                        "(created 0700; default: none, persistent: true is refused on raw "
                        "nodes as in QEMU)")
    p.add_argument("--state-flush-interval", type=float, default=5.0, metavar="SECS",
                   help="seconds after a write before its fine bitmap bits are stored "
                        "(default %(default)s)")
    p.add_argument("--state-write-lease", type=float, default=2.0, metavar="SECS",
                   help="how far ahead qmpd's write lease on an image reaches: after a "
                        "crash during writes, a write by someone else within this time is "
                        "not detected (default %(default)s)")
    p.add_argument("--state-keep-transient-bitmaps", action="store_true",
                   help="also keep in --state-dir the bitmaps of raw images added with "
                        "persistent: false (they come back after a restart, still listed "
                        "persistent: false; for qmpbackup --include-raw)")
    p.add_argument("--pidfile", metavar="PATH", help="write the daemon's PID here")
    p.add_argument("--daemonize", action="store_true",
                   help="detach once the listeners are ready")
    p.add_argument("--qemu-version", default=".".join(map(str, DEFAULT_QEMU_VERSION)),
                   metavar="X.Y.Z", help="QEMU version to claim (default %(default)s)")
    p.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error"],
                   help="stderr log level (default %(default)s)")
    p.add_argument("--trace-qmp", action="store_true", help="log every QMP message in and out")
    # --- hardening options (issue 7): limits, confinement --------------------
    add_hardening_options(p)
    # --- end of hardening options -----------------------------------------------
    _add_web_options(p)
    return p


# --- web layer and logging options (issue 13) -------------------------------
DEFAULT_HTTP_PORT = 8420


def _add_web_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http", metavar="HOST:PORT",
                   help="serve the dashboard, /metrics and QMP over WebSocket (/qmp) here "
                        f"(default: off; `make run` uses 127.0.0.1:{DEFAULT_HTTP_PORT})")
    p.add_argument("--http-token-file", metavar="FILE",
                   help="read the token for /qmp and the job buttons from FILE (default: generate "
                        "one and write it, mode 0600, to SOCKET.http-token next to the first socket)")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="stderr log lines as text or one JSON object each (default %(default)s)")


def parse_http(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``; an empty host means 127.0.0.1).

    :raise OptionError: malformed, or the port is not 0-65535.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise OptionError(f"--http expects HOST:PORT, not '{text}'")
    port = int(port_text)
    if port > 65535:
        raise OptionError(f"--http: port {port} is out of range (0-65535)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "127.0.0.1", port


def web_token_path(args: argparse.Namespace, listeners: list[Listener]) -> str:
    """:return: where a generated token is written."""
    for spec in listeners:
        if isinstance(spec, UnixListener):
            return spec.path + ".http-token"
    return "qmpd.http-token"


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message (and exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)
# --- end of web layer and logging options ------------------------------------


def _chardev_listener(opts: dict[str, str]) -> Listener:
    backend = opts.get("socket", "socket") if "socket" in opts else opts.get("backend", "socket")
    if backend != "socket":
        raise OptionError(f"chardev backend '{backend}' is not supported (only 'socket')")
    if not parse_bool("server", opts.get("server", "off")):
        raise OptionError("only server=on sockets are supported")
    if "wait" in opts:
        parse_bool("wait", opts["wait"])
    if "path" in opts:
        return UnixListener(opts["path"])
    if "port" in opts:
        try:
            port = int(opts["port"])
        except ValueError as err:
            raise OptionError(f"Parameter 'port' expects a number: {opts['port']}") from err
        if not 0 <= port <= 65535:
            raise OptionError(f"port {port} is out of range (0-65535)")
        return TcpListener(opts.get("host", "127.0.0.1"), port)
    raise OptionError("chardev: 'path' or 'port' is required")


def _qemu_socket(dev: Chardev, pretty: bool = False) -> Listener | Connector:
    """A QEMU-style ``-chardev socket``: a listener (server=on) or a peer
    qmpd connects to (server=off, QEMU's default)."""
    if dev.path is not None:
        return (UnixListener(dev.path, pretty=pretty) if dev.server
                else UnixConnector(dev.path, pretty=pretty))
    assert dev.port is not None
    return (TcpListener(dev.host, dev.port, pretty=pretty) if dev.server
            else TcpConnector(dev.host, dev.port, pretty=pretty))


def _pretty(opts: dict[str, str]) -> bool:
    """``pretty=on|off`` of a ``-mon``/``--monitor`` (default off)."""
    return "pretty" in opts and parse_bool("pretty", opts["pretty"])


def parse_listeners(args: argparse.Namespace, qemu: QemuArgs | None = None,
                    plan: StartupPlan | None = None) -> list[Listener]:
    """Turn ``--socket``/``--chardev``/``--monitor`` (and QEMU's ``-chardev``,
    ``-mon``, ``-qmp``, ``-qtest``) into listeners; client-mode sockets go to
    ``plan.connectors``.

    :raise OptionError: on malformed or dangling options.
    """
    chardevs: dict[str, Listener] = {}
    for text in args.chardev:
        opts = parse_option_string(text, "socket")
        if "id" not in opts:
            raise OptionError(f"chardev: Parameter 'id' is missing in '{text}'")
        if opts["id"] in chardevs:
            raise OptionError(f"Duplicate chardev ID '{opts['id']}'")
        chardevs[opts["id"]] = _chardev_listener(opts)
    listeners: list[Listener] = [UnixListener(p) for p in args.socket]
    if qemu is not None and plan is not None:
        for cid, text in qemu.monitors:
            dev = qemu.chardevs[cid]
            sock = _qemu_socket(dev, _pretty(parse_option_string(text, "chardev")))
            if isinstance(sock, (UnixListener, TcpListener)):
                listeners.append(sock)
            else:
                plan.connectors.append(sock)
                kind = "-qmp" if cid.startswith("compat_monitor") else "-chardev"
                plan.connector_options.append(f"{kind} {dev.option}")
        if qemu.qtest is not None:
            sock = _qemu_socket(qemu.qtest)
            if isinstance(sock, (UnixListener, TcpListener)):
                raise OptionError("-qtest: only client sockets are supported (the harness listens)")
            plan.qtest = sock
            plan.qtest_option = f"-qtest {qemu.qtest.option}"
    for text in args.monitor:
        opts = parse_option_string(text, "chardev")
        if opts.get("mode", "control") != "control":
            raise OptionError("only mode=control monitors are supported")
        pretty = _pretty(opts)
        if "path" in opts or "port" in opts:
            listeners.append(dataclasses.replace(_chardev_listener({"server": "on", **opts}), pretty=pretty))
            continue
        name = opts.get("chardev")
        if name is None or name not in chardevs:
            raise OptionError(f"chardev '{name}' not found")
        listeners.append(dataclasses.replace(chardevs.pop(name), pretty=pretty))
    if not listeners and not (plan is not None and plan.connectors):
        listeners.append(UnixListener(DEFAULT_SOCKET))
    return listeners


def _parse_version(text: str) -> tuple[int, int, int]:
    parts = text.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise OptionError(f"--qemu-version expects X.Y.Z, not '{text}'")
    return int(parts[0]), int(parts[1]), int(parts[2])


def parse_args(
    argv: Sequence[str] | None = None,
) -> tuple[argparse.Namespace, list[Listener], DaemonConfig]:
    """:return: namespace, listeners and config; exits 1 on bad input.

    The namespace carries the QEMU-style options as ``args.qemu``
    (:class:`QemuArgs`) and the start-up plan as ``args.plan``.
    """
    parser = build_parser()
    try:
        qemu, rest = split_argv(list(sys.argv[1:] if argv is None else argv))
    except ArgvError as err:
        parser.error(str(err))
    args = parser.parse_args(rest)
    if not args.state_write_lease > 0:
        parser.error("--state-write-lease must be positive")
    if args.state_keep_transient_bitmaps and args.state_dir is None:
        parser.error("--state-keep-transient-bitmaps needs --state-dir")
    plan = StartupPlan(blockdevs=list(qemu.blockdevs), drives=list(qemu.drives),
                       devices=list(qemu.devices))
    args.qemu, args.plan = qemu, plan
    args.name = args.name if args.name is not None else qemu.name
    args.pidfile = args.pidfile or qemu.pidfile
    args.daemonize = args.daemonize or qemu.daemonize
    try:
        listeners = parse_listeners(args, qemu, plan)
        config = DaemonConfig(
            qemu_version=_parse_version(args.qemu_version),
            package=f"qmpd-{__version__}",
            name=args.name,
            prelaunch=qemu.prelaunch,
            state_dir=args.state_dir,
            state_flush_interval=args.state_flush_interval,
            state_write_lease=args.state_write_lease,
            state_keep_transient=args.state_keep_transient_bitmaps,
        )
        args.http_address = parse_http(args.http) if args.http else None
    except OptionError as err:
        parser.error(str(err))
    return args, listeners, config


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _serve(args: argparse.Namespace, listeners: list[Listener], config: DaemonConfig,
                 ready: Callable[[], None]) -> int:
    from qmpd.server.daemon import Daemon

    daemon = Daemon(config, listeners, trace=args.trace_qmp, limits=limits_from_args(args),
                    allowed_dirs=args.allowed_dir)
    daemon.setup()
    # Before anything listens: a signal right after a socket appears shuts down cleanly.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(
            sig, lambda: daemon.spawn(daemon.request_shutdown("host-signal"), "signal")
        )
    pidfile = None
    web_server = None
    try:
        await daemon.add_blockdevs(args.blockdev)
        await daemon.apply_plan(args.plan)                     # QEMU's -drive/-device
        await daemon.add_nbd(args.nbd_server, args.export)   # NBD (issue 11)
        await daemon.start()
        await daemon.connect(args.plan)                        # client-mode -chardev, -qtest
        web_server = await _start_web(args, listeners, daemon)
    except Exception as err:  # noqa: BLE001 - one line to stderr, exit 1
        sys.stderr.write(f"qmpd: {getattr(err, 'desc', None) or err}\n")
        await daemon.cleanup()
        return 1
    if args.pidfile:
        try:
            pidfile = write_pidfile(args.pidfile)
        except OSError as err:
            sys.stderr.write(f"qmpd: {err}\n")
            if web_server is not None:
                await web_server.stop()
            await daemon.cleanup()
            return 1
    ready()
    try:
        await daemon.wait_stopped()
    finally:
        if web_server is not None:
            await web_server.stop()
        await daemon.cleanup()
        if pidfile is not None:
            pidfile.remove()
    return 0


async def _start_web(args: argparse.Namespace, listeners: list[Listener], daemon: Any) -> Any:
    """Start ``--http`` if asked; prints the dashboard's URL.

    :raise OSError, TokenError: the address or the token file failed.
    """
    if args.http_address is None:
        return None
    from qmpd.web import WebServer, create_token_file, load_token

    if args.http_token_file:
        token = load_token(args.http_token_file)
        where = args.http_token_file
    else:
        where = web_token_path(args, listeners)
        token = create_token_file(where)
    host, port = args.http_address
    server = WebServer(daemon, host, port, token)
    try:
        await server.start()
    except OSError as err:
        raise OSError(f"--http {args.http}: {err.strerror or err}") from err
    sys.stderr.write(f"qmpd: dashboard at {server.url} (token for /qmp and the buttons in {where}; "
                     f"open {server.url}#token=TOKEN to use them)\n")
    return server


def _daemonize() -> Callable[[], None]:
    """Fork; the parent exits 0 once the child reports ready (1 otherwise)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(wfd)
        ok = os.read(rfd, 1) == b"1"
        os._exit(0 if ok else 1)
    os.close(rfd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)

    def ready() -> None:
        os.write(wfd, b"1")
        os.close(wfd)
        os.dup2(devnull, 2)

    return ready


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qmpd`` console script."""
    args, listeners, config = parse_args(argv)
    if args.qemu.probe is not None:
        from qmpd.cli.probes import answer_probe

        sys.stdout.write(answer_probe(args.qemu.probe))
        return 0
    handler = logging.StreamHandler(sys.stderr)
    if args.log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), handlers=[handler])
    if args.trace_qmp and logging.getLogger().level > logging.INFO:
        logging.getLogger("qmpd.connection").setLevel(logging.INFO)
    ready: Callable[[], None] = lambda: None  # noqa: E731
    if args.daemonize:
        ready = _daemonize()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_serve(args, listeners, config, ready))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
