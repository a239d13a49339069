"""``object-add`` / ``object-del``: user-created objects (TLS credentials).

qmpd knows one object type, ``tls-creds-x509``: a directory of PEM files
read when the object is added, as QEMU 7.2 does (texts recorded in
tests/transcripts/nbd_tls.qmp)::

    dir/ca-cert.pem                        always
    dir/server-cert.pem, server-key.pem    endpoint "server"
    dir/client-cert.pem, client-key.pem    endpoint "client" (optional)

A user (the NBD server) keeps its reference after ``object-del``, as in
QEMU.
"""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass
from typing import Any, TYPE_CHECKING

from qmpd.commands.context import CommandContext
from qmpd.commands.registry import command
from qmpd.errors import GenericError

if TYPE_CHECKING:
    # Annotations only: the registry resolves each command's model by name
    # at dispatch time (qmpd.qapi.validate), so importing this module
    # creates no model.
    from qmpd.qapi.models import ObjectAddArgs, ObjectDelArgs

__all__ = ["ObjectStore", "TlsCredsX509"]

_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")


@dataclass(frozen=True)
class TlsCredsX509:
    """Loaded x509 credentials."""

    id: str
    dir: str
    endpoint: str
    verify_peer: bool
    context: ssl.SSLContext

    @classmethod
    def load(cls, obj_id: str, directory: str, endpoint: str, verify_peer: bool) -> TlsCredsX509:
        """Read the PEM files.  :raise GenericError: QEMU's "Unable to
        access credentials PATH: REASON", or a load failure."""
        ca = os.path.join(directory, "ca-cert.pem")
        names = ("server-cert.pem", "server-key.pem") if endpoint == "server" else ()
        for path in (ca, *(os.path.join(directory, n) for n in names)):
            if not os.access(path, os.R_OK):
                reason = os.strerror(2 if not os.path.exists(path) else 13)
                raise GenericError(f"Unable to access credentials {path}: {reason}")
        try:
            if endpoint == "server":
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.load_cert_chain(os.path.join(directory, "server-cert.pem"),
                                    os.path.join(directory, "server-key.pem"))
                if verify_peer:
                    ctx.verify_mode = ssl.CERT_REQUIRED
                    ctx.load_verify_locations(ca)
            else:
                ctx = ssl.create_default_context(cafile=ca)
                cert = os.path.join(directory, "client-cert.pem")
                if os.path.exists(cert):
                    ctx.load_cert_chain(cert, os.path.join(directory, "client-key.pem"))
        except (OSError, ssl.SSLError) as exc:
            raise GenericError(f"Unable to load TLS credentials from {directory}: {exc}") from exc
        return cls(obj_id, directory, endpoint, verify_peer, ctx)


class ObjectStore:
    """The objects created with ``object-add``, by id."""

    def __init__(self) -> None:
        self._objects: dict[str, TlsCredsX509] = {}

    def get(self, obj_id: str) -> TlsCredsX509 | None:
        """:return: the object ``obj_id``, or None."""
        return self._objects.get(obj_id)

    def add(self, options: dict[str, Any]) -> None:
        """object-add.  :raise GenericError: QEMU's texts."""
        obj_id = str(options["id"])
        if not _ID_RE.match(obj_id):
            raise GenericError("Parameter 'id' expects an identifier")
        if obj_id in self._objects:
            raise GenericError(f"attempt to add duplicate property '{obj_id}' to object (type 'container')")
        self._objects[obj_id] = TlsCredsX509.load(
            obj_id, str(options.get("dir", "")), str(options.get("endpoint", "client")),
            bool(options.get("verify-peer", True)))

    def delete(self, obj_id: str) -> None:
        """object-del.  :raise GenericError: ``"object '%s' not found"``."""
        if self._objects.pop(obj_id, None) is None:
            raise GenericError(f"object '{obj_id}' not found")


@command("object-add")
async def object_add(ctx: CommandContext, args: ObjectAddArgs) -> None:
    """Create an object (``tls-creds-x509``)."""
    options = args.root.model_dump(mode="json", by_alias=True, exclude_none=True)
    ctx.state.objects.add(options)


@command("object-del")
async def object_del(ctx: CommandContext, args: ObjectDelArgs) -> None:
    """Destroy an object; its users keep it until they let go."""
    ctx.state.objects.delete(args.id)
