"""The sans-I/O session: request checks in QEMU's order, two command tables."""

from __future__ import annotations

from qmpd.protocol.framing import FramingError
from qmpd.protocol.session import Call, Reply, Session, SessionState


def _session(negotiated: bool = True, oob: bool = False) -> Session:
    s = Session({"qmp_capabilities", "query-name", "x-oob"}, {"x-oob"})
    if negotiated:
        s.negotiated(oob)
    return s


def _err(item: object, s: Session | None = None) -> dict[str, object]:
    work = (s or _session()).handle(item)
    assert isinstance(work, Reply)
    return work.msg


def test_framing_error_has_no_id() -> None:
    assert _err(FramingError("JSON parse error, expecting value")) == {
        "error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}


def test_member_order_decides_the_error() -> None:
    # the first offending member in the object's own order wins
    assert _err({"foo": 1, "execute": 3, "id": 1})["error"] == {
        "class": "GenericError", "desc": "QMP input member 'foo' is unexpected"}
    assert _err({"execute": 3, "foo": 1, "id": 1})["error"] == {
        "class": "GenericError", "desc": "QMP input member 'execute' must be a string"}


def test_id_echoed_first_in_errors() -> None:
    msg = _err({"execute": "nosuch", "id": {"x": [1]}})
    assert list(msg) == ["id", "error"] and msg["id"] == {"x": [1]}


def test_negotiation_table() -> None:
    s = _session(negotiated=False)
    assert s.state is SessionState.NEGOTIATING
    assert _err({"execute": "query-name"}, s) == {"error": {
        "class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
    work = s.handle({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": 1})
    assert isinstance(work, Call) and work.arguments == {"enable": ["oob"]}


def test_oob() -> None:
    plain = _session(oob=False)
    assert _err({"exec-oob": "x-oob"}, plain)["error"]["desc"] == "QMP input member 'exec-oob' is unexpected"  # type: ignore[index]
    s = _session(oob=True)
    work = s.handle({"exec-oob": "x-oob", "id": 2})
    assert isinstance(work, Call) and work.oob
    assert _err({"exec-oob": "query-name"}, s)["error"]["desc"] == "The command query-name does not support OOB"  # type: ignore[index]
    assert _err({"execute": "query-name", "exec-oob": "query-name"}, s)["error"]["desc"] == (  # type: ignore[index]
        "QMP input member 'exec-oob' clashes with 'execute'")


def test_success_and_failure_shapes() -> None:
    s = _session()
    call = s.handle({"execute": "query-name", "id": 7})
    assert isinstance(call, Call)
    assert list(Session.success(call, None).items()) == [("return", {}), ("id", 7)]
    assert Session.failure(call, "GenericError", "x") == {"id": 7, "error": {"class": "GenericError", "desc": "x"}}
    no_id = s.handle({"execute": "query-name"})
    assert isinstance(no_id, Call)
    assert Session.success(no_id, [1]) == {"return": [1]}


def test_registry_and_schema_agree() -> None:
    """Every schema command has a handler and every handler a schema entry."""
    from qmpd.commands import handlers  # noqa: F401
    from qmpd.commands.registry import REGISTRY
    from qmpd.qapi.schema import load_schema
    from qmpd.server.daemon import UNIMPLEMENTED

    assert set(load_schema().commands) - UNIMPLEMENTED == set(REGISTRY)
