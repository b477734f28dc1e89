"""The seed corpus: the spec vectors the codec tests already hold, shaped as target input.

Each target reads its first byte or two as options (decoder level, limits, chunk size; see
targets.py), so a seed is those bytes plus a vector: the fuzzer starts from every valid and
malformed vector of the specs (HAProxy's proxy-protocol.txt, MQTT 3.1.1 and 5.0), the
cluster and control frames, and every example configuration in configs/.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable
from pathlib import Path

from broker import cluster_codec
from broker.mqtt import Connect, Properties, Publish, Subscribe, Subscription, encode
from lb.control import CertRecord, ServerRecord
from lb.control_codec import encode as encode_control
from tests import (
    test_broker_authz,
    test_broker_cluster_codec,
    test_config_lexer,
    test_mqtt_codec,
    test_proxyproto,
)

ROOT = Path(__file__).resolve().parent.parent.parent
CONFIGS = ROOT / "configs"

Seeds = list[tuple[str, bytes]]


def proxy_seeds() -> Seeds:
    seeds: Seeds = []
    for index, (_, data, _header) in enumerate(test_proxyproto.VALID):
        seeds.append((f"valid-{index}", b"\x00\x00" + data + test_proxyproto.TRAILING))
        seeds.append(
            (
                f"valid-{index}-bytewise-v-only",
                bytes((1 + data.startswith(b"\r"),)) + b"\x00" + data,
            )
        )
    for index, (_, data, _reason) in enumerate(test_proxyproto.MALFORMED):
        seeds.append((f"malformed-{index}", b"\x00\x05" + data))
    seeds.append(("health-check", b"\x00\x03" + test_proxyproto.HEALTH_CHECK))
    return seeds


def mqtt_seeds() -> Seeds:
    seeds: Seeds = []
    for index, (_, level, wire, packet) in enumerate(test_mqtt_codec.VECTORS):
        # CONNECT to a server-side decoder (level from the packet), the rest client-side.
        selector = 0 if isinstance(packet, Connect) else level - 2
        seeds.append((f"valid-{index}", bytes((selector, 0)) + wire + wire[:3]))
    for index, (_, level, wire, _code) in enumerate(test_mqtt_codec.MALFORMED):
        selector = 0 if level is None else level - 2
        seeds.append((f"malformed-{index}", bytes((selector, 2)) + wire))
    for level in (3, 4, 5):
        name = "MQIsdp" if level == 3 else "MQTT"
        session = [
            Connect(name, level, True, 30, "fuzz"),
            Subscribe(1, (Subscription("a/+", 1),)),
            Publish("a/b", b"payload", 1, False, False, 2),
            Publish("a/c", b"", 0, True, False, None),
        ]
        if level == 5:
            session.append(
                Publish("t", b"x", 1, False, False, 3, Properties(message_expiry_interval=5))
            )
        seeds.append(
            (f"session-{level}", b"\x00\x00" + b"".join(encode(p, level) for p in session))
        )
    return seeds


def cluster_seeds() -> Seeds:
    seeds: Seeds = [
        (f"valid-{index}", b"\x00\x00" + data + data[:4])
        for index, (_, data) in enumerate(test_broker_cluster_codec.VECTORS)
    ]
    stream = b"".join(data for _, data in test_broker_cluster_codec.VECTORS)
    seeds.append(("all", b"\x00\x07" + stream))
    seeds.append(("sync", b"\x03\x00" + b"".join(cluster_codec.encode_sync(["a/#", "b/+/c"]))))
    seeds.append(("qos3", b"\x00\x00\x00\x00\x00\x05\x08\x03\x00\x00\x00"))
    return seeds


def control_seeds() -> Seeds:
    server = ServerRecord("be", "s1", "127.0.0.1:1883", 1, False, True, 3, "L4OK", "ready", 1)
    cert = CertRecord("/etc/lb/a.pem", b"-----BEGIN-----", (("/etc/lb/a.pem", 1, 2),))
    messages = [
        {"t": "ready"},
        {"t": "gather", "id": 7, "what": "counters"},
        {"t": "gathered", "id": 7, "data": {"a": [1, 2.5, None, True, "x"]}},
        server.to_message(),
        cert.to_message(),
        {"t": "reload_ssl"},
    ]
    frames = [encode_control(message) for message in messages]
    seeds: Seeds = [(f"frame-{index}", b"\x00" + frame) for index, frame in enumerate(frames)]
    seeds.append(("all", b"\x03" + b"".join(frames)))
    seeds.append(("bad-json", b"\x00" + struct.pack(">I", 3) + b"{x}" + frames[0]))
    seeds.append(("bad-pem", b"\x00" + encode_control({**cert.to_message(), "pem": "%%"})))
    seeds.append(
        ("b64", b"\x00" + encode_control({"t": "cert", "pem": base64.b64encode(b"x").decode()}))
    )
    return seeds


def _files(*patterns: str) -> Seeds:
    seeds: Seeds = []
    for pattern in patterns:
        for path in sorted(CONFIGS.glob(pattern)):
            seeds.append(
                (path.relative_to(CONFIGS).as_posix().replace("/", "-"), path.read_bytes())
            )
    return seeds


def haproxy_cfg_seeds() -> Seeds:
    seeds = _files("*.cfg", "bad/*.cfg", "docker/*.cfg")
    seeds.append(("lexer", "\n".join(text for text, _ in test_config_lexer.VECTORS).encode()))
    return seeds


def broker_toml_seeds() -> Seeds:
    return _files("broker-*.toml", "bad/broker-*.toml", "docker/*.toml")


def authz_policy_seeds() -> Seeds:
    seeds: Seeds = []
    for name, data in _files("authz/*"):
        seeds.append((name, (b"\x01" if name.endswith(".json") else b"\x00") + data))
    for index, (origin, text, _line, _words) in enumerate(test_broker_authz.BAD_POLICIES):
        prefix = b"\x01" if origin.endswith(".json") else b"\x00"
        seeds.append((f"bad-{index}", prefix + text.encode()))
    return seeds


SEEDS: dict[str, Callable[[], Seeds]] = {
    "proxy": proxy_seeds,
    "mqtt": mqtt_seeds,
    "cluster": cluster_seeds,
    "control": control_seeds,
    "haproxy-cfg": haproxy_cfg_seeds,
    "broker-toml": broker_toml_seeds,
    "authz-policy": authz_policy_seeds,
}


def write_seeds(target: str, directory: Path) -> int:
    """Write the target's seeds into ``directory`` (one file each); how many."""
    directory.mkdir(parents=True, exist_ok=True)
    seeds = SEEDS[target]()
    for name, data in seeds:
        (directory / f"seed-{name}").write_bytes(data)
    return len(seeds)
