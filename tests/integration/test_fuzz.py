"""Property tests: random bytes and random JSON never hurt the daemon."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.daemon import DaemonProcess, RawClient

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
requests = st.fixed_dictionaries(
    {"execute": st.sampled_from(["query-name", "query-status", "query-version", "nosuch",
                                 "block-dirty-bitmap-add", "transaction", "human-monitor-command"])},
    optional={"arguments": st.dictionaries(st.sampled_from(["node", "name", "granularity", "actions",
                                                            "command-line", "x"]), json_values, max_size=3),
              "id": json_values},
)


@pytest.fixture(scope="module")
def fuzz_daemon() -> Iterator[DaemonProcess]:
    with tempfile.TemporaryDirectory(prefix="qmpd-") as tmp:
        proc = DaemonProcess(Path(tmp))
        try:
            yield proc
        finally:
            assert proc.proc.poll() is None, "the daemon died during fuzzing"
            proc.stop()


def _resync_and_check(client: RawClient, token: str) -> None:
    """Discard partial input, then a marked request must come back intact."""
    client.send(b'\x1b{"execute": "query-name", "id": "%s"}' % token.encode())
    while True:
        line = client.read_line()
        assert line.endswith(b"\r\n") and b"\n" not in line[:-1]
        msg = json.loads(line)
        assert isinstance(msg, dict) and ("return" in msg or "error" in msg or "event" in msg)
        if msg.get("id") == token:
            assert msg == {"return": {}, "id": token}
            return


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_random_bytes(fuzz_daemon: DaemonProcess, data: bytes) -> None:
    client = RawClient(fuzz_daemon.path)
    try:
        client.send(data)
        _resync_and_check(client, "sync")
    finally:
        client.close()
    fresh = RawClient(fuzz_daemon.path)
    try:
        assert fresh.cmd("query-status") == {"return": {"status": "running", "running": True}, "id": "t"}
    finally:
        fresh.close()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(requests, min_size=1, max_size=4))
def test_random_requests(fuzz_daemon: DaemonProcess, batch: list[dict[str, object]]) -> None:
    client = RawClient(fuzz_daemon.path)
    try:
        client.send("".join(json.dumps(r) for r in batch))
        for req in batch:
            msg = client.read_msg()
            assert ("return" in msg) != ("error" in msg)
            if "id" not in msg and msg.get("error", {}).get("desc", "").startswith("JSON parse error"):
                # e.g. a noncharacter such as U+FDD0 in a string: QEMU's parser
                # refuses it, and parse errors carry no id
                continue
            if "id" in req:
                assert msg["id"] == req["id"]
            else:
                assert "id" not in msg
            if "error" in msg:
                assert set(msg["error"]) == {"class", "desc"}
                assert msg["error"]["class"] in {"GenericError", "CommandNotFound", "DeviceNotFound",
                                                 "DeviceNotActive"}
        _resync_and_check(client, "after")
    finally:
        client.close()
