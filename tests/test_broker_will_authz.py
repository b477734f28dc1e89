"""A will is published only if its client may publish it (seed 003), also when it waited on
disk: a real node (password listener linked to a policy, an open listener, a disk store) in a
background loop thread, raw MQTT clients, and a restart of the node on the same store."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from broker.authentication import hash_password
from broker.config import BrokerConfig, parse_config
from broker.mqtt import Connack, Connect, Properties, Publish, Suback, Subscribe, Subscription, Will
from tests.broker_harness import RawClient, running_broker

pytestmark = pytest.mark.timeout(30)

PASSWORD = "correct horse"
# "sensor" may connect and publish on status/allowed only.
POLICY = [
    {
        "principals": {"usernames": ["sensor"]},
        "brokerResources": [
            {"method": "Connect", "clientIds": ["*"]},
            {"method": "Publish", "topics": ["status/allowed"]},
        ],
    }
]


def config(directory: Path) -> BrokerConfig:
    passwords = directory / "passwd"
    passwords.write_text(f"sensor:{hash_password(PASSWORD)}\n")
    passwords.chmod(0o600)
    policy = directory / "policy.json"
    policy.write_text(json.dumps(POLICY))
    document = {
        "node": {"name": "node-1"},
        "listeners": {
            "tcp": {
                "users": {
                    "bind": "127.0.0.1:0",
                    "password_file": str(passwords),
                    "authorization": True,
                },
                "open": {"bind": "127.0.0.1:0"},
            }
        },
        "authorization": {"policy_file": str(policy)},
        "store": {"mode": "disk", "path": str(directory / "node.db")},
    }
    return parse_config(document, "<test>")


def drop_with_will(port: int, client_id: str, topic: str, delay: int) -> None:
    """A 5.0 session (expiry 300 s) whose connection ends without DISCONNECT."""
    client = RawClient(port)
    will = Will(topic, client_id.encode(), 1, properties=Properties(will_delay_interval=delay))
    connack = client.connect(
        Connect(
            "MQTT",
            5,
            True,
            60,
            client_id,
            username="sensor",
            password=PASSWORD.encode(),
            will=will,
            properties=Properties(session_expiry_interval=300),
        )
    )
    assert isinstance(connack, Connack) and connack.reason_code == 0
    client.close()


def watch(port: int) -> RawClient:
    watcher = RawClient(port)
    assert isinstance(watcher.connect(Connect("MQTT", 5, True, 60, "watcher")), Connack)
    watcher.send(Subscribe(1, (Subscription("status/#", 1),)))
    assert isinstance(watcher.receive(), Suback)
    return watcher


def wills_seen(watcher: RawClient, quiet: float) -> list[bytes]:
    got: list[bytes] = []
    while True:
        try:
            packet = watcher.receive(timeout=quiet)
        except TimeoutError:
            return got
        assert isinstance(packet, Publish)
        got.append(packet.payload)


def test_a_will_the_client_may_not_publish_is_refused_when_it_is_set_aside_not_after_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two sessions drop with a will delayed 3 s: one on a topic the policy grants, one not.
    The refused one is logged and counted when its connection ends, and not written to the
    store; the granted one waits on disk. The node stops at once and starts again on its
    store: the granted will is published, the refused one never (a will read back from disk
    has no connection to ask the policy about, so only authorized ones may be written)."""
    caplog.set_level(logging.INFO, logger="broker")
    with running_broker(config(tmp_path)) as node:
        drop_with_will(node.port("users"), "granted", "status/allowed", 3)
        drop_with_will(node.port("users"), "refused", "status/forbidden", 3)

        def offline() -> bool:
            sessions = node.broker.sessions
            return all(sessions[name].connection is None for name in ("granted", "refused"))

        deadline = time.monotonic() + 2
        while not node.call(offline) and time.monotonic() < deadline:
            time.sleep(0.02)
        # Well within the 3 s delay: refused now, not when the delay is over.
        assert node.counters()["authorization_denied"] == 1
        assert "will not published: client_id=refused topic=status/forbidden: not authorized" in (
            caplog.text
        )
        assert node.call(lambda: sorted(node.broker.pending_wills)) == ["granted"]
    caplog.clear()
    with running_broker(config(tmp_path)) as node:
        assert node.call(lambda: sorted(node.broker.pending_wills)) == ["granted"]
        watcher = watch(node.port("open"))
        assert wills_seen(watcher, quiet=4.0) == [b"granted"]
        watcher.close()
        assert "will published: client_id=granted topic=status/allowed" in caplog.text
        assert "client_id=refused" not in caplog.text
