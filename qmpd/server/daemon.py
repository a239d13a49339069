"""The daemon: set-up, serving, command execution and clean shutdown.

Lifecycle (aiohttp's runner shape): :meth:`Daemon.setup` loads the command
table and the schema, freezes and checks the registry and builds the shared
state; :meth:`Daemon.start` opens the listeners; :meth:`Daemon.wait_stopped`
returns once ``quit`` or a signal asked for shutdown; :meth:`Daemon.cleanup`
stops accepting, closes connections (their output is flushed), removes
socket files and closes the block graph.  Each stage is a plain loop.

Greeting first: the greeting needs only the version and the capabilities,
so the command line may :meth:`~Daemon.start` before loading and run
:meth:`Daemon.load` as a task of the daemon right after.  Until loading has
finished every command waits for it (:meth:`Daemon.execute`), so no
command ever sees a half-loaded daemon; clients are greeted meanwhile, and
what a session answers by itself (framing errors, commands before
``qmp_capabilities``) does not depend on what is loaded.  This module
imports only the light parts; the command handlers, the schema and the
block, job, machine and NBD layers are imported by :func:`_import_layers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from qmpd.commands.context import CommandContext, DaemonConfig, DaemonState, SessionControl
from qmpd.block import BlockIOError
from qmpd.block.fdsets import FdSets
from qmpd.block.pool import IOPool
from qmpd.errors import GenericError, QMPError, SchemaError
from qmpd.events import EventBus
from qmpd.events.names import SHUTDOWN
from qmpd.protocol.encode import freeze
from qmpd.protocol.session import Call, Session
from qmpd.server.connection import Connection
from qmpd.server.limits import DEFAULT_LIMITS, Limits
from qmpd.server.listeners import (
    Listener, OwnedPath, Server, TcpListener, UnixListener, connector_label, open_connector,
    open_qmp_listener,
)
from qmpd.server.plan import StartupError, StartupPlan
from qmpd.server.qtest import QtestProtocol
from qmpd.tasks import OwnedThread, TaskGroup

if TYPE_CHECKING:
    from qmpd.block.graph import BlockGraph
    from qmpd.commands.registry import Registry
    from qmpd.nbd.server import NbdServer
    from qmpd.qapi.service import SchemaService

__all__ = ["Daemon", "UNIMPLEMENTED"]

#: Commands that read or change no block, bitmap or job state: they may run
#: while a detached command (``qemu-io``) still does its I/O.
BLOCK_FREE: frozenset[str] = frozenset({
    "qmp_capabilities", "query-version", "query-commands", "query-qmp-schema",
    "query-status", "query-name", "query-tpm", "quit",
})
#: Seconds shutdown waits for jobs, I/O and connections before leaving them.
SHUTDOWN_GRACE = 0.5

#: Schema commands deliberately left without a handler.  They are neither
#: advertised nor accepted; today every schema command is implemented.
UNIMPLEMENTED: frozenset[str] = frozenset()

log = logging.getLogger(__name__)

#: Told of every executed command: ``(name, outcome, seconds)``, where
#: ``outcome`` is ``"ok"`` or the error class.  The web layer's metrics use it.
RequestObserver = Callable[[str, str, float], None]


def _loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Daemon:
    """A qmpd instance serving one or more listeners."""

    def __init__(
        self,
        config: DaemonConfig,
        listeners: list[Listener],
        *,
        registry: Registry | None = None,
        trace: bool = False,
        limits: Limits = DEFAULT_LIMITS,
        allowed_dirs: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.limits = limits
        self.listeners = listeners
        self.trace = trace
        self.events = EventBus()
        self.stopping = False
        #: The command registry (None: the handlers' global one, known once loaded).
        self._registry = registry
        #: The I/O worker threads of every image file (see block/io.py).
        #: Descriptor sets of ``add-fd``; ``/dev/fdset/N`` opens through the pool.
        self.fdsets = FdSets()
        confinement = None
        if allowed_dirs:
            from qmpd.block.confine import Confinement

            confinement = Confinement.of(list(allowed_dirs))
        self.pool = IOPool(confinement=confinement, fdsets=self.fdsets)
        self._lock = asyncio.Lock()
        #: Detached commands still doing I/O, and an event set when none is.
        self._detached = 0
        self._attached = asyncio.Event()
        self._attached.set()
        self._stopped = asyncio.Event()
        self._servers: list[Server] = []
        #: Socket files this process bound (removed at clean-up if unchanged).
        self._owned: list[OwnedPath] = []
        self._connections: set[Connection] = set()
        #: Every task the daemon and its parts start (qmpd/tasks.py): the
        #: job manager, the NBD server, the bitmap state directory and the
        #: web server get this group; clean-up awaits or cancels them all.
        self.tasks = TaskGroup("qmpd")
        self._qtests: list[QtestProtocol] = []
        self.command_names: frozenset[str] = frozenset()
        self.oob_commands: frozenset[str] = frozenset()
        #: The greeting needs only the configuration: clients are greeted
        #: before :meth:`load` has finished.
        self.greeting: dict[str, Any] = config.greeting()
        #: Set once the command table, the schema and the domain are loaded
        #: (:meth:`setup` or :meth:`load`); commands wait for it.
        self._loaded = asyncio.Event()
        #: Set once a first client was greeted (see :meth:`load`).
        self._greeted = asyncio.Event()
        self._load_error: BaseException | None = None
        self.state = DaemonState(config=config, events=self.events, request_shutdown=self.request_shutdown,
                                 start_time=time.time(), fdsets=self.fdsets)
        self.schema: SchemaService | None = None
        self.nbd: NbdServer | None = None
        #: Called once per executed command (see :data:`RequestObserver`).
        self.request_observer: RequestObserver | None = None

    # -- lifecycle --------------------------------------------------------
    @property
    def load_error(self) -> BaseException | None:
        """Why :meth:`load` failed (None: it did not, or has not finished);
        the command line then exits with status 1."""
        return self._load_error

    @property
    def loaded(self) -> bool:
        """Whether commands can run (:meth:`setup` or :meth:`load` finished)."""
        return self._loaded.is_set()

    def setup(self) -> None:
        """Load everything at once: import the command handlers and the
        layers, load the schema, freeze and check the registry, build the
        state.  (:meth:`load` does the same while the daemon greets.)

        :raise qmpd.errors.SchemaError: when registry and schema disagree.
        """
        self._install(*_import_layers(self._registry))
        self._loaded.set()

    async def load(self, greet_first: float = 0.0) -> None:
        """What :meth:`setup` does, for a daemon that already listens: the
        imports, the schema and the introspection run in a thread, so
        the loop stays free to accept and greet clients; the tables and the
        domain objects are installed on the loop in one step; then the
        commands waiting in :meth:`execute` run.  If loading fails the
        daemon shuts down (the waiting commands get an internal error).

        :param greet_first: wait until a first client was greeted, but at
            most this many seconds, before loading: a client that connects
            right after start-up (a test harness) is greeted without
            competing with the loader thread for the interpreter.
        :raise qmpd.errors.SchemaError: when registry and schema disagree.
        """
        if greet_first > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._greeted.wait(), greet_first)
        try:
            schema, registry = await _in_thread(
                functools.partial(_import_layers, self._registry, True), "qmpd-load")
            self._install(schema, registry)
        except Exception as err:
            self._load_error = err
            self._loaded.set()
            log.error("loading failed: %s", err)
            self.spawn(self.request_shutdown("host-error"), "shutdown")
            raise
        # (Cancelled: the daemon is shutting down; the waiting commands end
        # with their connections.)
        self._loaded.set()
        await self.preload()

    async def preload(self) -> None:
        """Import what commands with arguments need (pydantic, jsonschema)
        in a thread, creating no model, while commands already run
        (one that needs a module first waits for its import)."""
        await _in_thread(_import_validation, "qmpd-preload")

    def _install(self, schema: SchemaService, registry: Registry) -> None:
        """Freeze ``registry`` and the other tables, check them against
        ``schema``, build the state.

        :raise qmpd.errors.SchemaError: when registry and schema disagree.
        """
        import uuid

        from qmpd.block.drivers import freeze_drivers
        from qmpd.commands.actions import freeze_actions

        self._registry = registry
        registry.freeze()
        freeze_actions()
        freeze_drivers()
        names = schema.check_registry(set(registry))
        missing = set(schema.schema.commands) - set(names) - UNIMPLEMENTED
        if missing:
            raise SchemaError("schema commands without a handler: " + ", ".join(sorted(missing)))
        self.schema = schema
        self.command_names = frozenset(names)
        self.oob_commands = registry.oob_commands
        self.state.command_names = tuple(sorted(names))
        self.state.introspection = schema.introspection(names)
        # Never mutated (shared by every caller): encode it once, not per reply.
        freeze(self.state.introspection)
        self.state.boot_id = str(uuid.uuid4())
        self._setup_domain()

    def _setup_domain(self) -> None:
        """Create the block graph and the job manager."""
        from qmpd.block.graph import BlockGraph
        from qmpd.block.persist import BitmapStateDir
        from qmpd.commands.objects import ObjectStore
        from qmpd.jobs import JobManager
        from qmpd.machine.machine import Machine
        from qmpd.nbd.server import NbdServer

        bitmap_state = None
        if self.config.state_dir is not None:
            bitmap_state = BitmapStateDir(self.config.state_dir,
                                          flush_interval=self.config.state_flush_interval,
                                          write_lease=self.config.state_write_lease,
                                          keep_transient=self.config.state_keep_transient,
                                          tasks=self.tasks.child("bitmap-state"), pool=self.pool)
        self.state.block = BlockGraph(bitmap_state=bitmap_state, pool=self.pool,
                                      emit_event=self.events.emit)
        self.state.jobs = JobManager(self.events, tasks=self.tasks.child("jobs"))
        self.state.machine = Machine(self.state.block, self.events, prelaunch=self.config.prelaunch)
        self.state.objects = ObjectStore()
        self.nbd = NbdServer(self._graph, self.events, tls_creds=self.state.objects.get,
                             tasks=self.tasks.child("nbd"), drained=self.state.jobs.show_drain)
        self.state.nbd = self.nbd

    def _graph(self) -> BlockGraph:
        assert self.state.block is not None
        return self.state.block

    async def add_blockdevs(self, specs: list[str]) -> None:
        """Create ``--blockdev`` nodes, in order, through ``blockdev-add``'s
        path (:func:`qmpd.commands.block.add_blockdev`).

        :raise QMPError: with blockdev-add's own error texts.
        """
        from qmpd.commands.block import add_blockdev
        from qmpd.qapi import models
        from qmpd.qapi.keyval import parse_option_value

        assert self.schema is not None and self.state.block is not None
        await self.prepare_state_dir()
        options_type = self.schema.schema.lookup_type("BlockdevOptions")
        for text in specs:
            options = parse_option_value(text, options_type)
            if not isinstance(options, dict):
                raise GenericError("--blockdev expects an object")
            args = self.schema.build_arguments("blockdev-add", options)
            assert isinstance(args, models.BlockdevAddArgs)
            await add_blockdev(self.state.block, args)

    async def apply_plan(self, plan: StartupPlan) -> None:
        """Build what the command line asked for, in QEMU's order:
        ``-blockdev`` nodes, ``-drive``s, then ``-device``s.

        :raise StartupError: naming the failed option, with QEMU's text.
        """
        assert self.schema is not None and self.state.machine is not None
        machine = self.state.machine
        for text in plan.blockdevs:
            try:
                await self.add_blockdevs([text])
            except QMPError as err:
                raise StartupError(f"-blockdev {text}", err.desc) from err
        for text in plan.drives:
            try:
                await machine.add_drive(text, self.schema)
            except QMPError as err:
                raise StartupError(f"-drive {text}", err.desc) from err
        for text in plan.devices:
            try:
                machine.add_device(text)
            except QMPError as err:
                raise StartupError(f"-device {text}", err.desc) from err

    async def connect(self, plan: StartupPlan) -> None:
        """Connect the client-mode monitors and the qtest socket.

        :raise StartupError: ``"Failed to connect to 'PATH': <strerror>"``.
        """
        for spec, option in zip(plan.connectors, plan.connector_options):
            label = connector_label(spec)
            try:
                await open_connector(spec, functools.partial(self._new_connection, label, spec.pretty))
            except OSError as err:
                raise StartupError(option, f"Failed to connect to '{label}': {err.strerror}") from err
        if plan.qtest is not None:
            label = connector_label(plan.qtest)
            try:
                await open_connector(plan.qtest, self._new_qtest)
            except OSError as err:
                raise StartupError(plan.qtest_option,
                                   f"Failed to connect to '{label}': {err.strerror}") from err

    def _new_qtest(self) -> QtestProtocol:
        proto = QtestProtocol()
        self._qtests.append(proto)
        return proto

    async def prepare_state_dir(self) -> None:
        """Create ``--state-dir`` (mode 0700) if configured.

        :raise BlockIOError: it cannot be created.
        """
        state = self.state.block.bitmap_state if self.state.block is not None else None
        if state is not None:
            try:
                await state.prepare()
            except BlockIOError as exc:
                raise GenericError(f"--state-dir {state.path}: {exc.strerror}") from exc

    async def add_nbd(self, servers: list[str], exports: list[str]) -> None:
        """``--nbd-server`` (a second one fails as nbd-server-start does) and
        ``--export`` options, as
        qemu-storage-daemon parses them (``--export`` may start with its
        type, ``nbd,id=...``); errors read ``--OPTION TEXT: reason``.

        :raise QMPError: the commands' own error texts, prefixed.
        """
        for text in servers:
            try:
                await self._nbd_server_option(text)
            except QMPError as err:
                raise GenericError(f"--nbd-server {text}: {err.desc}") from err
        for text in exports:
            try:
                self._export_option(text)
            except QMPError as err:
                raise GenericError(f"--export {text}: {err.desc}") from err

    async def _nbd_server_option(self, text: str) -> None:
        from qmpd.qapi.keyval import parse_option_value

        assert self.schema is not None and self.nbd is not None
        opts = parse_option_value(text, self.schema.schema.lookup_type("NbdServerOptions"))
        if not isinstance(opts, dict) or not isinstance(opts.get("addr"), dict):
            raise GenericError("Parameter 'addr' is missing")
        addr = dict(opts["addr"])
        legacy = {k: v for k, v in opts.items() if k != "addr"}
        legacy["addr"] = {"type": addr.pop("type", None), "data": addr}
        try:
            self.schema.validate_arguments("nbd-server-start", legacy)
        except QMPError as err:   # name members by the flat SocketAddress path
            raise GenericError(err.desc.replace("'addr.data.", "'addr.")) from err
        await self.nbd.start({"type": legacy["addr"]["type"], **addr},
                             max_connections=int(opts.get("max-connections", 0)),
                             tls_creds=opts.get("tls-creds"), tls_authz=opts.get("tls-authz"))

    def _export_option(self, text: str) -> None:
        from qmpd.qapi.keyval import parse_option_value

        assert self.schema is not None and self.nbd is not None
        head = text.split(",", 1)[0]
        if not text.lstrip().startswith("{") and "=" not in head:
            text = "type=" + text
        opts = parse_option_value(text, self.schema.schema.lookup_type("BlockExportOptions"))
        if not isinstance(opts, dict):
            raise GenericError("--export expects an object")
        self.schema.validate_arguments("block-export-add", opts)
        self.nbd.add(id=opts["id"], node_name=opts["node-name"], name=opts.get("name"),
                     description=opts.get("description"), writable=opts.get("writable", False),
                     writethrough=opts.get("writethrough", False),
                     bitmaps=tuple(opts.get("bitmaps", ())),
                     allocation_depth=opts.get("allocation-depth", False))

    async def start(self) -> None:
        """Open every listener.  :raise OSError: when one cannot be bound."""
        await self.prepare_state_dir()
        for spec in self.listeners:
            label = spec.path if isinstance(spec, UnixListener) else f"{spec.host}:{spec.port}"
            server, owned = await open_qmp_listener(
                spec, functools.partial(self._new_connection, label, spec.pretty), backlog=self.limits.backlog)
            self._servers.append(server)
            if owned is not None:
                self._owned.append(owned)
            log.info("listening on %s", label)
            if isinstance(spec, TcpListener) and not _loopback(spec.host):
                log.warning("QMP on %s is reachable from the network without authentication; "
                            "any peer can run every command (prefer a UNIX socket or 127.0.0.1)", label)

    def _new_connection(self, label: str, pretty: bool = False) -> Connection:
        if len(self._connections) >= self.limits.max_connections or self.stopping:
            return Connection(self, label, self.limits, refused=True)
        conn = Connection(self, label, self.limits, pretty=pretty)
        self._connections.add(conn)
        self.fdsets.client_arrived()
        return conn

    def client_greeted(self) -> None:
        """A connection has sent its greeting."""
        self._greeted.set()

    def connection_closed(self, conn: Connection) -> None:
        """Forget a connection once its transport is gone."""
        self._connections.discard(conn)
        if not self._connections:
            # QEMU closes unused fdsets when its last monitor disconnects.
            self.fdsets.last_client_gone()

    @property
    def connection_count(self) -> int:
        """Connections currently open (refused ones are not counted)."""
        return len(self._connections)

    def buffered_bytes(self) -> int:
        """Input and output buffered by all connections (``--max-buffer``)."""
        return sum(conn.footprint() for conn in self._connections)

    @property
    def connections(self) -> list[Connection]:
        """The QMP socket connections currently open."""
        return list(self._connections)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` as a task the daemon awaits at clean-up."""
        return self.tasks.spawn(coro, name=name)

    async def wait_stopped(self) -> None:
        """Return once shutdown was requested."""
        await self._stopped.wait()

    async def request_shutdown(self, reason: str) -> None:
        """Emit SHUTDOWN, force-cancel every job, and stop serving."""
        if self.stopping:
            return
        self.stopping = True
        self.events.emit(SHUTDOWN, {"guest": False, "reason": reason})
        if self.state.jobs is not None:
            try:
                await asyncio.wait_for(self.state.jobs.shutdown(), SHUTDOWN_GRACE)
            except asyncio.TimeoutError:
                log.warning("jobs did not stop in time (stuck I/O?); exiting anyway")
        self._stopped.set()

    async def cleanup(self) -> None:
        """Stop accepting, flush and close connections, release resources."""
        for server in self._servers:
            server.close()
        for owned in self._owned:
            owned.remove()
        self._owned.clear()
        await asyncio.sleep(0)
        for conn in list(self._connections):
            conn.close()
        for qtest in self._qtests:
            qtest.close()
        for server in self._servers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), SHUTDOWN_GRACE)
        if self.nbd is not None:
            await self.nbd.cleanup()
        await self.tasks.shutdown(SHUTDOWN_GRACE)
        if self.state.block is not None:
            if self.pool.busy:
                # A worker is stuck in a file call: closing its descriptor
                # under it could let a later open reuse the number.  The
                # process is about to exit; the kernel closes everything.
                log.warning("%d file operation(s) still running; not closing images", self.pool.busy)
            else:
                await self.state.block.close()
        self.pool.shutdown()
        if not self.pool.busy:   # idle workers end at once; a stuck one is left
            self.pool.join(SHUTDOWN_GRACE)
        self.fdsets.close_all()

    # -- commands ---------------------------------------------------------
    async def execute(self, call: Call, conn: SessionControl) -> dict[str, Any]:
        """Run one command (:meth:`_dispatch`) and tell the request observer.

        A command that arrives while the daemon is still loading
        (:meth:`load`) waits until everything is loaded; if loading failed
        it gets an internal error.

        :return: the reply message (success or error).
        """
        started = time.perf_counter()
        if not self._loaded.is_set():
            await self._loaded.wait()
        if self._load_error is not None:
            return Session.failure(call, "GenericError", "Internal error in qmpd; see its log")
        reply = await self._dispatch(call, conn)
        observer = self.request_observer
        if observer is not None:
            error = reply.get("error")
            observer(call.name, "ok" if error is None else error["class"], time.perf_counter() - started)
        return reply

    async def _dispatch(self, call: Call, conn: SessionControl) -> dict[str, Any]:
        """Validate and run one command.

        Commands run one at a time, in arrival order, under one lock (as in
        QEMU's monitor).  A handler that does long I/O (``qemu-io``) calls
        ``ctx.detach()``: the lock is released so other clients are not
        stalled, but only :data:`BLOCK_FREE` commands may run until the
        detached handler has finished; every other command waits for it,
        still holding the lock, so no command ever sees block, bitmap or
        job state half-way through another command (QEMU's monitor could
        not show that either).

        :return: the reply message (success or error).
        """
        assert self.schema is not None
        await self._lock.acquire()
        detached = False

        def detach() -> None:
            nonlocal detached
            if not detached:
                detached = True
                self._detached += 1
                self._attached.clear()
                self._lock.release()

        try:
            if call.name not in BLOCK_FREE:
                # Still under the lock, so commands keep their order.
                await self._attached.wait()
            try:
                args = self.schema.build_arguments(call.name, call.arguments)
                assert self._registry is not None
                spec = self._registry[call.name]
                fds = conn.fds if isinstance(conn, Connection) else None
                result = await spec.handler(CommandContext(self.state, conn, detach, fds), args)
            except QMPError as err:
                return Session.failure(call, err.error_class, err.desc)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("command %s failed unexpectedly", call.name)
                return Session.failure(call, "GenericError", "Internal error in qmpd; see its log")
            return Session.success(call, result)
        finally:
            if detached:
                self._detached -= 1
                if not self._detached:
                    self._attached.set()
            else:
                self._lock.release()


_T = TypeVar("_T")


async def _in_thread(fn: Callable[[], _T], name: str) -> _T:
    """Run ``fn`` in an :class:`~qmpd.tasks.OwnedThread` (a daemon thread:
    a shutdown never waits for it); :return: its result."""
    out: list[_T] = []
    await OwnedThread(lambda: out.append(fn()), name=name).start()
    return out[0]


def _import_layers(registry: Registry | None, first_model: bool = False) -> tuple[SchemaService, Registry]:
    """Import the command handlers (which registers them) and the layers
    the daemon builds its state from, load the schema, build the
    introspection for ``registry``'s commands (cached in the schema
    service) and, if asked, the first command's model.  Imports, file
    reads and computation only, no event loop: :meth:`Daemon.load` runs
    this in a thread (:class:`~qmpd.tasks.OwnedThread`).

    :param registry: None for the handlers' global registry.
    :param first_model: also build the model of ``qmp_capabilities`` (which
        imports pydantic); only while no command can run.
    :return: the schema service and the registry.
    """
    from qmpd.commands import handlers  # noqa: F401  (registers the handlers)
    from qmpd.commands.registry import REGISTRY
    from qmpd.block import graph, persist  # noqa: F401
    from qmpd.jobs import manager  # noqa: F401
    from qmpd.machine import machine  # noqa: F401
    from qmpd.nbd import server  # noqa: F401
    from qmpd.qapi.service import SchemaService

    if registry is None:
        registry = REGISTRY
    schema = SchemaService.load()
    schema.introspection(sorted(set(registry) & set(schema.schema.commands)))
    if first_model:
        # What the first command would pay for: pydantic and the model of
        # qmp_capabilities (no command creates models meanwhile: they all
        # wait for the load).
        schema.build_arguments("qmp_capabilities", {})
    return schema, registry


def _import_validation() -> None:
    """Import pydantic and jsonschema and build the argument validator
    class, which commands with arguments need (``{}`` is checked without
    them); no model is created."""
    import pydantic  # noqa: F401

    from qmpd.qapi.jsonschema import qapi_validator_class

    qapi_validator_class()
