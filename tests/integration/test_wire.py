"""Exact wire bytes for the cases of spec §1.1–1.6.

Every expected line below was first recorded from QEMU 7.2.22
(``qemu-system-x86_64 -machine none``) with the same input; only the version
triple and ``package`` differ from what QEMU answers.
"""

from __future__ import annotations

import json
import socket

import pytest

from tests.support.daemon import DaemonProcess, RawClient

E = b'{"error": {"class": "GenericError", "desc": "%s"}}\r\n'


def ge(desc: str, msg_id: int | None = None) -> bytes:
    body = json.dumps({"class": "GenericError", "desc": desc})
    if msg_id is None:
        return b'{"error": ' + body.encode() + b"}\r\n"
    return b'{"id": %d, "error": ' % msg_id + body.encode() + b"}\r\n"


CASES: list[tuple[bytes, list[bytes]]] = [
    # pretty-printed over several lines
    (b'{"execute":\n  "query-name",\n "id": 1}', [b'{"return": {}, "id": 1}\r\n']),
    # two requests on one line, no newline between
    (b'{"execute":"query-status","id":1}{"execute":"query-name","id":2}',
     [b'{"return": {"status": "running", "running": true}, "id": 1}\r\n', b'{"return": {}, "id": 2}\r\n']),
    # single-quoted strings
    (b"{'execute': 'query-name', 'id': 'sq'}", [b'{"return": {}, "id": "sq"}\r\n']),
    (b"}", [ge("JSON parse error, expecting value")]),
    (b"]", [ge("JSON parse error, expecting value")]),
    (b'{"execute": "query-name" @ }',
     [ge("JSON parse error, stray '@'"), ge("JSON parse error, expecting value")]),
    # an ASCII control character discards the partial request
    (b'{"execute": "query-name"\x1b{"execute":"query-name","id":3}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\u001B\'"}}\r\n',
      b'{"return": {}, "id": 3}\r\n']),
    (b"[1, 2]", [ge("QMP input must be a JSON object")]),
    (b'"str"', [ge("QMP input must be a JSON object")]),
    (b'{"execute": "query-name", "foo": 1, "id": 4}', [ge("QMP input member 'foo' is unexpected", 4)]),
    (b'{"arguments": {}, "id": 5}', [ge("QMP input lacks member 'execute'", 5)]),
    (b'{"execute": 1, "id": 6}', [ge("QMP input member 'execute' must be a string", 6)]),
    (b'{"execute": "query-name", "arguments": [], "id": 7}',
     [ge("QMP input member 'arguments' must be an object", 7)]),
    (b'{"execute": "nosuch", "id": 8}',
     [b'{"id": 8, "error": {"class": "CommandNotFound", "desc": "The command nosuch has not been found"}}\r\n']),
    (b'{"exec-oob": "query-name", "id": 9}', [ge("QMP input member 'exec-oob' is unexpected", 9)]),
    (b'{"execute": "query-name", "arguments": {"x": 1}, "id": 10}', [ge("Parameter 'x' is unexpected", 10)]),
    # ids of every JSON type come back verbatim
    (b'{"execute": "query-name", "id": null}', [b'{"return": {}, "id": null}\r\n']),
    (b'{"execute": "query-name", "id": [1, {"a": true}]}', [b'{"return": {}, "id": [1, {"a": true}]}\r\n']),
    (b'{"execute": "query-name", "id": 1.5}', [b'{"return": {}, "id": 1.5}\r\n']),
    (b'{"execute": "query-name", "id": 18446744073709551615}',
     [b'{"return": {}, "id": 18446744073709551615}\r\n']),
    (b'{"execute": "query-name", "id": "\\u00e9\\ud83d\\ude00"}',
     [b'{"return": {}, "id": "\\u00E9\\uD83D\\uDE00"}\r\n']),
    (b'{"execute": "qmp_capabilities", "id": 11}',
     [b'{"id": 11, "error": {"class": "CommandNotFound", '
      b'"desc": "Capabilities negotiation is already complete, command ignored"}}\r\n']),
    # argument validation, nested paths, enum and range texts
    (b'{"execute": "block-dirty-bitmap-add", "arguments": {"node": "x"}, "id": 12}',
     [ge("Parameter 'name' is missing", 12)]),
    (b'{"execute": "block-dirty-bitmap-add", "arguments": {"node": 1, "name": "b"}, "id": 13}',
     [ge("Invalid parameter type for 'node', expected: string", 13)]),
    (b'{"execute": "block-dirty-bitmap-add", "arguments": {"node": "x", "name": "b", "granularity": -1}, "id": 14}',
     [ge("Parameter 'granularity' expects uint32_t", 14)]),
    (b'{"execute": "block-dirty-bitmap-add", "arguments": {"node": "x", "name": "b", "granularity": 1.5}, "id": 15}',
     [ge("Parameter 'granularity' expects uint64", 15)]),
    (b'{"execute": "block-dirty-bitmap-add", "arguments": {"node": "x", "name": "b", "granularity": "big"}, "id": 16}',
     [ge("Parameter 'granularity' expects uint64", 16)]),
    (b'{"execute": "block-dirty-bitmap-add", "arguments": {"node": "x", "name": "b", "granularity": 4294967296}, "id": 25}',
     [ge("Parameter 'granularity' expects uint32_t", 25)]),
    (b'{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "n", "file": {"driver": "file"}}, "id": 17}',
     [ge("Parameter 'file.filename' is missing", 17)]),
    (b'{"execute": "blockdev-backup", "arguments": {"device": "a", "target": "b", "sync": "fast"}, "id": 18}',
     [ge("Parameter 'sync' does not accept value 'fast'", 18)]),
    (b'{"execute": "transaction", "arguments": {"actions": [{"type": "abort", "data": {}}, '
     b'{"type": "block-dirty-bitmap-add", "data": {"node": "n"}}]}, "id": 19}',
     [ge("Parameter 'actions[1].data.name' is missing", 19)]),
    (b'{"execute": "transaction", "arguments": {"actions": [{"type": "bogus", "data": {}}]}, "id": 22}',
     [ge("Parameter 'type' does not accept value 'bogus'", 22)]),
    (b'{"execute": "transaction", "arguments": {"actions": [{"data": {}}]}, "id": 23}',
     [ge("Parameter 'actions[0].type' is missing", 23)]),
    (b'{"execute": "block-dirty-bitmap-merge", "arguments": {"node": "n", "target": "t", "bitmaps": ["a", 1]}, "id": 24}',
     [ge("Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr", 24)]),
    (b'{"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}, "id": 26}',
     [ge("Parameter 'null' does not accept value 'foo'", 26)]),
    # parse errors
    (b'{"execute": "query-name", "id": 20, "id": 21}', [ge("JSON parse error, duplicate key")]),
    (b'{"execute": "query-name", "id": tru}', [ge("JSON parse error, invalid keyword 'tru'")]),
    (b'{"execute": "query-name", "id": 012}',
     [ge("JSON parse error, stray '01'"), ge("JSON parse error, expecting value")]),
    (b'{"execute" "query-name"}', [ge("JSON parse error, missing : in object pair")]),
    (b'{"execute": "query-name",}', [ge("JSON parse error, expecting value")]),
    (b'{"execute": "query-name", "id": "\\x"}', [ge("JSON parse error, invalid escape sequence in string")]),
    (b'{"execute": "x\x01"}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\"x\\u0001\'"}}\r\n',
      ge("JSON parse error, expecting value")]),
    (b"{1: 2}", [ge("JSON parse error, key is not a string in object")]),
]


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="qmpd-") as tmp:
        proc = DaemonProcess(Path(tmp))
        try:
            yield proc
        finally:
            proc.stop()


@pytest.mark.parametrize("data,expected", CASES, ids=[c[0][:40].decode("latin-1") for c in CASES])
def test_exact_replies(shared_daemon: DaemonProcess, data: bytes, expected: list[bytes]) -> None:
    client = RawClient(shared_daemon.path)
    try:
        client.send(data + b"\n")
        got = [client.read_line() for _ in expected]
        assert got == expected
        # the connection is still in sync afterwards
        assert client.exchange(b'{"execute": "query-name", "id": "after"}') == [b'{"return": {}, "id": "after"}\r\n']
    finally:
        client.close()


def test_greeting_bytes(shared_daemon: DaemonProcess) -> None:
    client = RawClient(shared_daemon.path, negotiate=False)
    try:
        assert client.greeting == (
            b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 9}, '
            b'"package": "qmpd-0.1.0"}, "capabilities": ["oob"]}}\r\n'
        )
    finally:
        client.close()


def test_negotiation_mode(shared_daemon: DaemonProcess) -> None:
    client = RawClient(shared_daemon.path, negotiate=False)
    try:
        for req in (b'{"execute": "query-version", "id": 1}', b'{"execute": "nosuch", "id": 1}'):
            assert client.exchange(req) == [
                b'{"id": 1, "error": {"class": "CommandNotFound", '
                b"\"desc\": \"Expecting capabilities negotiation with 'qmp_capabilities'\"}}\r\n"
            ]
        # malformed requests keep their own text while negotiating
        assert client.exchange(b'{"id": 2}') == [ge("QMP input lacks member 'execute'", 2)]
        assert client.exchange(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": 3}') == [
            b'{"return": {}, "id": 3}\r\n'
        ]
        # with oob enabled, exec-oob is understood but no command allows it
        assert client.exchange(b'{"exec-oob": "query-name", "id": 4}') == [
            ge("The command query-name does not support OOB", 4)
        ]
        assert client.exchange(b'{"exec-oob": "query-name", "execute": "query-name", "id": 5}') == [
            ge("QMP input member 'execute' clashes with 'exec-oob'", 5)
        ]
    finally:
        client.close()


def test_no_id_means_no_id(shared_daemon: DaemonProcess) -> None:
    client = RawClient(shared_daemon.path)
    try:
        assert client.exchange(b'{"execute": "query-name"}') == [b'{"return": {}}\r\n']
        assert client.exchange(b'{"execute": "nosuch"}') == [
            b'{"error": {"class": "CommandNotFound", "desc": "The command nosuch has not been found"}}\r\n'
        ]
    finally:
        client.close()


def test_nesting_limit(shared_daemon: DaemonProcess) -> None:
    client = RawClient(shared_daemon.path)
    try:
        deep = b"[" * 1025 + b"]" * 1025
        client.send(deep)
        assert client.read_line() == ge("JSON nesting depth limit exceeded")
        client.send(b'\x1b{"execute": "query-name", "id": 1}')
        lines = []
        while True:
            line = client.read_line()
            lines.append(line)
            if b'"id": 1' in line:
                break
        assert lines[-1] == b'{"return": {}, "id": 1}\r\n'
    finally:
        client.close()


def test_half_close_still_answers(shared_daemon: DaemonProcess) -> None:
    client = RawClient(shared_daemon.path)
    try:
        client.send(b'{"execute": "query-name", "id": 1}{"execute": "query-status", "id": 2}')
        client.sock.shutdown(socket.SHUT_WR)
        assert client.read_line() == b'{"return": {}, "id": 1}\r\n'
        assert client.read_line() == b'{"return": {"status": "running", "running": true}, "id": 2}\r\n'
        assert client.sock.recv(10) == b""
    finally:
        client.close()


def test_several_clients_independent(shared_daemon: DaemonProcess) -> None:
    a = RawClient(shared_daemon.path)
    b = RawClient(shared_daemon.path, negotiate=False)
    try:
        # b is still negotiating while a works
        assert a.exchange(b'{"execute": "query-name", "id": 1}') == [b'{"return": {}, "id": 1}\r\n']
        assert b.exchange(b'{"execute": "query-name", "id": 1}')[0].startswith(b'{"id": 1, "error": {"class": "CommandNotFound"')
        # garbage and an abrupt close on one client do not disturb the other
        c = RawClient(shared_daemon.path)
        c.send(b'{"execute": "query-name" \xff\xfe garbage {{{{')
        c.close()
        assert a.exchange(b'{"execute": "query-name", "id": 2}') == [b'{"return": {}, "id": 2}\r\n']
    finally:
        a.close()
        b.close()
