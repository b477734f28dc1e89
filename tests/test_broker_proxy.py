"""PROXY protocol on broker listeners (seed 004: proxy_protocol = true behind HAProxy).

Trust is decided on the socket address before any byte is read; the header's source and
verified CN become the client's identity; LOCAL health checks stay quiet; misconfigurations
are reported in words.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from broker.config import ConfigError
from broker.mqtt import Connack, Connect, Pingreq, Pingresp
from lb.proxyproto import ClientFlags, Command, SSLInfo, encode_v1, encode_v2
from tests.broker_harness import BrokerThread, RawClient, make_config, running_broker, wait_for

pytestmark = pytest.mark.timeout(30)

CLIENT = ("203.0.113.7", 50123)
BROKER = ("10.0.0.5", 1883)
VERIFIED = SSLInfo(
    ClientFlags.SSL | ClientFlags.CERT_CONN | ClientFlags.CERT_SESS,
    0,
    version="TLSv1.3",
    cn="DEVICEA0001",
)


def proxy_config(**listener: Any) -> Any:
    settings: dict[str, Any] = {"bind": "127.0.0.1:0", "proxy_protocol": True}
    settings.update(listener)
    return make_config({"default": settings, "plain": {"bind": "127.0.0.1:0"}})


@pytest.fixture
def node() -> Iterator[BrokerThread]:
    with running_broker(proxy_config(peer_cert_as_username="cn")) as node:
        yield node


def connect(client_id: str, username: str | None = None) -> Connect:
    return Connect("MQTT", 5, True, 60, client_id, username=username)


def broker_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("broker") and record.levelno >= logging.WARNING
    ]


def test_header_from_trusted_balancer_sets_address_and_cn(node: BrokerThread) -> None:
    header = encode_v2(Command.PROXY, CLIENT, BROKER, ssl=VERIFIED)
    raw = RawClient(node.port(), prefix=header)
    connack = raw.connect(connect("device-a", username="forged"))
    assert isinstance(connack, Connack) and connack.reason_code == 0
    [record] = [c for c in node.admin_get("/api/clients") if c["client_id"] == "device-a"]
    assert record["address"] == "203.0.113.7:50123"
    assert (record["ip"], record["port"]) == CLIENT
    assert record["certificate_cn"] == "DEVICEA0001"
    assert record["username"] == "DEVICEA0001"  # peer_cert_as_username overrides the client
    assert record["via_proxy"] is True
    assert record["socket_address"].startswith("127.0.0.1:")


def test_the_balancers_connection_id_is_kept_printable(node: BrokerThread) -> None:
    # PP2_TYPE_UNIQUE_ID is the balancer's %ID, in every line about the connection: control
    # characters (and DEL) become "?", invalid UTF-8 U+FFFD, the rest is kept as sent.
    unique_id = "ab\x01c\x7fd-é\x1b".encode() + b"\xff"
    header = encode_v2(Command.PROXY, CLIENT, BROKER, ssl=VERIFIED, unique_id=unique_id)
    raw = RawClient(node.port(), prefix=header)
    assert isinstance(raw.connect(connect("device-id")), Connack)
    [record] = [c for c in node.admin_get("/api/clients") if c["client_id"] == "device-id"]
    assert record["connection_id"] == "ab?c?d-é?\ufffd"
    assert record["connection_id_source"] == "proxy"
    assert record["tls_version"] == "TLSv1.3"


def test_unverified_certificate_cn_is_not_trusted(node: BrokerThread) -> None:
    failed = SSLInfo(ClientFlags.SSL | ClientFlags.CERT_CONN, 20, version="TLSv1.3", cn="EVIL")
    raw = RawClient(node.port(), prefix=encode_v2(Command.PROXY, CLIENT, BROKER, ssl=failed))
    raw.connect(connect("device-b", username="claimed"))
    [record] = [c for c in node.admin_get("/api/clients") if c["client_id"] == "device-b"]
    assert record["certificate_cn"] is None
    assert record["username"] is None


def test_header_and_connect_in_one_segment_and_v1(node: BrokerThread) -> None:
    raw = RawClient(node.port(), prefix=encode_v1(("198.51.100.1", 4000), BROKER))
    assert isinstance(raw.connect(connect("v1")), Connack)
    [record] = [c for c in node.admin_get("/api/clients") if c["client_id"] == "v1"]
    assert record["address"] == "198.51.100.1:4000"


def test_untrusted_source_refused_before_reading(caplog: pytest.LogCaptureFixture) -> None:
    config = proxy_config(proxy_protocol_trusted=["127.0.0.1/32"])
    with running_broker(config) as node:
        forged = encode_v2(Command.PROXY, CLIENT, BROKER, ssl=VERIFIED)
        raw = RawClient(node.port(), source="127.0.0.2", prefix=forged)
        with contextlib.suppress(OSError):  # the server may have closed already
            raw.send(Connect("MQTT", 5, True, 60, "forger"))
        assert raw.closed_by_server()
        counters = node.counters()
        assert counters["proxy_untrusted_sources"] == 1
        assert counters["proxy_headers_accepted"] == 0
        assert counters["connects_accepted"] == 0
        [message] = broker_warnings(caplog)
        assert "127.0.0.2" in message and "proxy_protocol_trusted" in message
        # The trusted address still works.
        ok = RawClient(node.port(), source="127.0.0.1", prefix=forged)
        assert isinstance(ok.connect(connect("fine")), Connack)


def test_local_health_check_with_tlvs_is_quiet(
    node: BrokerThread, caplog: pytest.LogCaptureFixture
) -> None:
    empty_ssl = SSLInfo(ClientFlags(0), 0)
    for _ in range(3):
        check = RawClient(
            node.port(), prefix=encode_v2(Command.LOCAL, None, None, ssl=empty_ssl, crc32c=True)
        )
        check.close()
    wait_for(lambda: node.counters()["proxy_health_checks"] == 3)
    # An MQTT-level check after LOCAL (HAProxy option mqtt-chk) is served too.
    mqtt_check = RawClient(node.port(), prefix=encode_v2(Command.LOCAL, None, None))
    assert isinstance(mqtt_check.connect(connect("")), Connack)
    mqtt_check.close()
    wait_for(lambda: node.call(lambda: len(node.broker.connections)) == 0)
    assert broker_warnings(caplog) == []
    assert not [
        r
        for r in caplog.records
        if r.name.startswith("broker")
        and r.levelno >= logging.INFO
        and "health" not in r.getMessage()
        and "client" in r.getMessage()
    ]


def test_mqtt_without_header_is_explained(
    node: BrokerThread, caplog: pytest.LogCaptureFixture
) -> None:
    raw = RawClient(node.port())
    raw.send(connect("no-header"))
    assert raw.closed_by_server()
    [message] = broker_warnings(caplog)
    assert "MQTT CONNECT received without PROXY header from 127.0.0.1:" in message
    assert "is send-proxy-v2 set on the balancer?" in message
    assert node.counters()["proxy_missing_header"] == 1


def test_header_on_plain_listener_is_explained(
    node: BrokerThread, caplog: pytest.LogCaptureFixture
) -> None:
    raw = RawClient(node.port("plain"), prefix=encode_v2(Command.PROXY, CLIENT, BROKER))
    raw.send(connect("confused"))
    assert raw.closed_by_server()
    [message] = broker_warnings(caplog)
    assert "PROXY protocol header received on a listener without proxy_protocol = true" in message
    assert node.counters()["proxy_header_unexpected"] == 1


def test_header_timeout(caplog: pytest.LogCaptureFixture) -> None:
    with running_broker(proxy_config(proxy_protocol_timeout="300ms")) as node:
        raw = RawClient(node.port(), prefix=b"\r\n\r\n\x00")  # a v2 signature, cut short
        assert raw.closed_by_server(timeout=3)
        assert node.counters()["proxy_header_timeouts"] == 1
        assert any("timeout" in message for message in broker_warnings(caplog))


def test_garbage_header_closes_only_that_connection(node: BrokerThread) -> None:
    good = RawClient(node.port(), prefix=encode_v2(Command.PROXY, CLIENT, BROKER))
    good.connect(connect("good"))
    bad = RawClient(node.port(), prefix=b"PROXY TCP4 1.2.3.4 nonsense\r\n")
    assert bad.closed_by_server()
    good.send(Pingreq())
    assert isinstance(good.receive(), Pingresp)
    assert node.counters()["proxy_header_errors"] == 1


def long_subject(size: int) -> bytes:
    """A DER X.509 Name of about `size` bytes (organizational units of 60 characters)."""
    units = [x509.NameAttribute(NameOID.COMMON_NAME, "device-long-subject")]
    while len(x509.Name(units).public_bytes()) < size:
        units.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "u" * 60))
    return x509.Name(units).public_bytes()


def chain_header(subject_size: int) -> bytes:
    subjects = (long_subject(subject_size), long_subject(120), long_subject(100))
    return encode_v2(Command.PROXY, CLIENT, BROKER, ssl=VERIFIED, chain_subjects=subjects)


def test_long_chain_subjects_header_fits_the_default_limit(node: BrokerThread) -> None:
    """lb's chain-subjects with a 746-byte subject makes a header over 1,024 bytes, which
    the broker used to refuse (issue 14 item 8); the default limit now takes it."""
    header = chain_header(746)
    assert len(header) > 1024
    raw = RawClient(node.port(), prefix=header)
    assert isinstance(raw.connect(connect("long-chain")), Connack)
    assert node.counters()["proxy_header_errors"] == 0


def test_proxy_protocol_max_size_refuses_in_words(caplog: pytest.LogCaptureFixture) -> None:
    header = chain_header(746)
    with running_broker(proxy_config(proxy_protocol_max_size=1024)) as node:
        raw = RawClient(node.port(), prefix=header)
        raw.send(connect("too-long"))
        assert raw.closed_by_server()
        [message] = broker_warnings(caplog)
        assert f"header of {len(header)} bytes announced, the limit is 1024" in message
        assert "proxy_protocol_max_size" in message
        assert node.counters()["proxy_header_errors"] == 1
        # A header within the limit on the same listener is served.
        short = RawClient(node.port(), prefix=encode_v2(Command.PROXY, CLIENT, BROKER))
        assert isinstance(short.connect(connect("short")), Connack)


@pytest.mark.parametrize("size", [231, 65552, "8k"])
def test_proxy_protocol_max_size_bounds(size: object) -> None:
    with pytest.raises(ConfigError, match="proxy_protocol_max_size"):
        proxy_config(proxy_protocol_max_size=size)
