"""The broker's admin HTTP API over real sockets: h11 parsing (431 for an oversized head,
413 for a body, 400 for garbage), and its credentials (bearer token or basic auth from a
file only its owner reads), which a bind reachable from the network must have."""

from __future__ import annotations

import base64
import json
import socket
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from broker.authentication import hash_password
from broker.config import ConfigError, parse_config
from tests.broker_harness import BrokerThread, running_broker

pytestmark = pytest.mark.timeout(30)

TOKEN = "s3cr3t-token-for-the-admin-api"


def admin_config(tmp_path: Path, **admin: Any) -> Any:
    document = {
        "node": {"name": "admin-node"},
        "listeners": {"tcp": {"default": {"bind": "127.0.0.1:0"}}},
        "admin": {"bind": "127.0.0.1:0", **admin},
    }
    return parse_config(document, str(tmp_path / "node.toml"), base_directory=tmp_path)


def secret_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def admin_port(node: BrokerThread) -> int:
    assert node.server is not None and node.server.admin is not None
    return node.server.admin.port


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def get(port: int, path: str, authorization: str | None = None) -> tuple[int, Message, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if authorization is not None:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_oversized_head_gets_431(node_plain: BrokerThread) -> None:
    port = admin_port(node_plain)
    answer = raw_request(
        port, b"GET /api/stats HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 10_000 + b"\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer[:80]


def test_body_too_large_and_garbage(node_plain: BrokerThread) -> None:
    port = admin_port(node_plain)
    body = b"x" * 5000
    answer = raw_request(
        port,
        b"POST /api/authz/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + body,
    )
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:80]
    assert raw_request(port, b"\x16\x03\x01garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    status, headers, payload = get(port, "/api/stats")
    assert status == 200 and json.loads(payload)["node"] == "test-node"
    assert headers["Content-Type"] == "application/json"


@pytest.fixture
def node_plain() -> Any:
    with running_broker() as node:
        yield node


def test_bearer_token(tmp_path: Path) -> None:
    token_file = secret_file(tmp_path / "admin.token", TOKEN + "\n")
    with running_broker(admin_config(tmp_path, token_file=str(token_file))) as node:
        port = admin_port(node)
        status, headers, _ = get(port, "/api/clients")
        assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="broker admin"'
        assert get(port, "/api/clients", "Bearer wrong-token-of-some-length")[0] == 401
        status, _, payload = get(port, "/api/clients", f"Bearer {TOKEN}")
        assert status == 200 and json.loads(payload) == []
        assert get(port, "/metrics", f"Bearer {TOKEN}")[0] == 200


def test_basic_auth_from_a_password_file(tmp_path: Path) -> None:
    users = secret_file(tmp_path / "admin.passwd", f"ops:{hash_password('correct horse')}\n")
    with running_broker(admin_config(tmp_path, password_file=str(users))) as node:
        port = admin_port(node)
        status, headers, _ = get(port, "/api/stats")
        assert status == 401 and headers["WWW-Authenticate"].startswith('Basic realm="broker')
        good = "Basic " + base64.b64encode(b"ops:correct horse").decode()
        bad = "Basic " + base64.b64encode(b"ops:battery staple").decode()
        assert get(port, "/api/stats", good)[0] == 200
        assert get(port, "/api/stats", bad)[0] == 401
        assert get(port, "/api/stats", "Basic !!!not-base64")[0] == 401


def test_network_bind_without_credentials_is_refused(tmp_path: Path) -> None:
    document = {
        "listeners": {"tcp": {"default": {"bind": "127.0.0.1:0"}}},
        "admin": {"bind": "0.0.0.0:18083"},
    }
    with pytest.raises(ConfigError, match=r"'admin\.bind': 0\.0\.0\.0:18083 is reachable"):
        parse_config(document, "node.toml")
    # Said so explicitly (a private container network): allowed, and logged loudly.
    document["admin"] = {"bind": "0.0.0.0:18083", "anonymous": True}
    assert parse_config(document, "node.toml").admin.anonymous  # type: ignore[union-attr]
    token_file = secret_file(tmp_path / "admin.token", TOKEN)
    document["admin"] = {"bind": "0.0.0.0:0", "token_file": str(token_file)}
    with running_broker(parse_config(document, "node.toml")) as node:
        assert get(admin_port(node), "/api/stats")[0] == 401


@pytest.mark.parametrize(
    ("text", "mode", "message"),
    [
        (TOKEN, 0o644, r"'admin\.token_file': credentials file .* readable by group or others"),
        ("short", 0o600, r"'admin\.token_file': .*at least 16 characters"),
    ],
)
def test_bad_token_file_stops_the_start(tmp_path: Path, text: str, mode: int, message: str) -> None:
    token_file = secret_file(tmp_path / "admin.token", text, mode)
    node = BrokerThread(admin_config(tmp_path, token_file=str(token_file)))
    with pytest.raises(ConfigError, match=message):
        node.start()
    node.loop.call_soon_threadsafe(node.loop.stop)
    node.thread.join(5)
    node.loop.close()
