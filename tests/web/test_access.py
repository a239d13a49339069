"""The token file, --http parsing and the non-loopback warning."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qmpd.cli.main import parse_http
from qmpd.cli.options import OptionError
from qmpd.web.auth import Token, TokenError, create_token_file, is_loopback, load_token


def test_generated_token_file_is_private_and_removed(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.write_text("stale\n")  # an earlier run's file is replaced
    token = create_token_file(str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_text() == token.value + "\n" and len(token.value) >= 40
    assert token.check(token.value) and not token.check("x") and not token.check(None)
    token.remove_file()
    assert not path.exists()


def test_token_file_refuses_non_regular(tmp_path: Path) -> None:
    (tmp_path / "target").write_text("keep me")
    os.symlink(tmp_path / "target", tmp_path / "link")
    with pytest.raises(TokenError, match="exists and is not a regular file"):
        create_token_file(str(tmp_path / "link"))
    assert (tmp_path / "target").read_text() == "keep me"


def test_given_token_file(tmp_path: Path) -> None:
    path = tmp_path / "mine"
    path.write_text("  s3cret  \nignored\n")
    token = load_token(str(path))
    assert token == Token("s3cret")
    token.remove_file()  # never the operator's file
    assert path.exists()
    path.write_text("\n")
    with pytest.raises(TokenError, match="expected one line holding the token"):
        load_token(str(path))
    with pytest.raises(TokenError, match="No such file or directory"):
        load_token(str(tmp_path / "nope"))


@pytest.mark.parametrize("text,expected", [
    ("127.0.0.1:8420", ("127.0.0.1", 8420)), (":0", ("127.0.0.1", 0)),
    ("[::1]:80", ("::1", 80)), ("localhost:65535", ("localhost", 65535)),
])
def test_parse_http(text: str, expected: tuple[str, int]) -> None:
    assert parse_http(text) == expected


@pytest.mark.parametrize("text,message", [
    ("8420", "--http expects HOST:PORT, not '8420'"),
    ("h:x", "--http expects HOST:PORT, not 'h:x'"),
    ("h:65536", "--http: port 65536 is out of range (0-65535)"),
])
def test_parse_http_errors(text: str, message: str) -> None:
    with pytest.raises(OptionError) as err:
        parse_http(text)
    assert str(err.value) == message


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("example.org")


def test_daemon_writes_then_removes_its_token_and_warns_off_loopback(sock_dir: Path) -> None:
    sock = sock_dir / "q.sock"
    proc = subprocess.Popen([sys.executable, "-m", "qmpd", "--socket", str(sock), "--http", "0.0.0.0:0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        lines = [proc.stderr.readline(), proc.stderr.readline()]
        assert "is not a loopback address" in lines[0]
        assert re.match(r"qmpd: dashboard at http://0\.0\.0\.0:\d+/ \(token for /qmp and the buttons in "
                        + re.escape(str(sock)) + r"\.http-token;", lines[1]), lines
        token = Path(str(sock) + ".http-token")
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        proc.terminate()
        assert proc.wait(10) == 0
        assert not token.exists() and not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_tcp_port_out_of_range_is_refused() -> None:
    out = subprocess.run([sys.executable, "-m", "qmpd", "--chardev", "socket,id=t,port=65536,server=on",
                          "--monitor", "t"], capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stderr) == (1, "qmpd: port 65536 is out of range (0-65535)\n")


def test_help_shows_defaults() -> None:
    out = subprocess.run([sys.executable, "-m", "qmpd", "--help"], capture_output=True, text=True, timeout=30)
    text = " ".join(out.stdout.split())
    for default in ("default ./qmpd.sock", "default 9.0.0", "default warning", "default text",
                    "host defaults to 127.0.0.1", "default: off"):
        assert default in text, default



@pytest.mark.asyncio
async def test_foreign_pages_are_refused(sock_dir: Path) -> None:
    """DNS rebinding (a foreign Host) and cross-site WebSockets (a foreign Origin) get 403."""
    import aiohttp

    from tests.support.web import TOKEN, web_daemon

    async with web_daemon(sock_dir) as wd:
        port = wd.web.port
        async with aiohttp.ClientSession() as http:
            async with http.get(wd.url + "api/state", headers={"Host": f"evil.example:{port}"}) as resp:
                assert resp.status == 403
                assert (await resp.json())["error"]["desc"] == f"Host 'evil.example:{port}' is not this server"
            async with http.get(wd.url + "metrics", headers={"Host": f"localhost:{port}"}) as resp:
                assert resp.status == 200
            for path in ("live", f"qmp?token={TOKEN}"):
                with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                    await http.ws_connect(wd.url + path, origin="http://evil.example")
                assert err.value.status == 403
            async with http.ws_connect(wd.url + "live", origin=f"http://127.0.0.1:{port}") as ws:
                assert '"jobs"' in await ws.receive_str(timeout=10)
