"""lb.proxyproto: vectors from doc/proxy-protocol.txt and the HAProxy notes, every malformed
case of the notes' table, hypothesis round trips, and the proxy-protocol package as oracle."""

from __future__ import annotations

import hmac
import ipaddress
import socket
import struct

import crc32c as crc32c_package
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from proxyprotocol import ProxyProtocolChecksumError
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6
from proxyprotocol.tlv import ProxyProtocolSSLTLV, ProxyProtocolTLV
from proxyprotocol.v2 import ProxyProtocolV2

from lb import proxyproto
from lb.proxyproto import (
    NEED_DATA,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ClientFlags,
    Command,
    MACKey,
    ProxyHeader,
    ProxyProtocolDecoder,
    ProxyProtocolError,
    SSLInfo,
    TLVType,
    encode_v1,
    encode_v2,
)

SIG = V2_SIGNATURE
TRAILING = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c"  # an MQTT CONNECT after the header


def v2(ver_cmd: int, fam: int, body: bytes) -> bytes:
    """A v2 header assembled by hand (independent of encode_v2)."""
    return SIG + bytes([ver_cmd, fam]) + struct.pack("!H", len(body)) + body


def tlv(tlv_type: int, value: bytes) -> bytes:
    return bytes([tlv_type]) + struct.pack("!H", len(value)) + value


def with_crc(header: bytes, crc_value_offset: int) -> bytes:
    """Fill in the CRC32C value at the given offset, computed by the crc32c package."""
    checksum = crc32c_package.crc32c(header)
    return header[:crc_value_offset] + struct.pack("!I", checksum) + header[crc_value_offset + 4 :]


V4_BODY = bytes([192, 168, 0, 1, 192, 168, 0, 11]) + struct.pack("!HH", 56324, 443)
V6_SRC = ipaddress.IPv6Address("2001:db8::1").packed
V6_DST = ipaddress.IPv6Address("::ffff:10.0.0.1").packed
V6_BODY = V6_SRC + V6_DST + struct.pack("!HH", 1, 8883)
SSL_VALUE = (
    bytes([0x07])
    + struct.pack("!I", 0)
    + tlv(0x21, b"TLSv1.3")
    + tlv(0x22, b"device-0001")
    + tlv(0x25, b"EC256")
    + tlv(0x24, b"ecdsa-with-SHA256")
    + tlv(0x23, b"TLS_AES_256_GCM_SHA384")
)
# HAProxy 2.6 health check with `send-proxy-v2 proxy-v2-options crc32c,ssl` (notes §2):
# LOCAL, family UNSPEC, then a CRC32C TLV and an empty 5-byte SSL TLV.
HEALTH_CHECK = with_crc(v2(0x20, 0x00, tlv(0x03, bytes(4)) + tlv(0x20, bytes(5))), 19)

# (name, bytes, expected header)
VALID: list[tuple[str, bytes, ProxyHeader]] = [
    (
        "v1 spec example (2.1)",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        ProxyHeader(1, Command.PROXY, ("192.168.0.1", 56324), ("192.168.0.11", 443), "tcp"),
    ),
    (
        "v1 longest TCP4 (2.1)",
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        ProxyHeader(
            1, Command.PROXY, ("255.255.255.255", 65535), ("255.255.255.255", 65535), "tcp"
        ),
    ),
    (
        "v1 longest TCP6, 104 bytes (2.1)",
        b"PROXY TCP6 "
        + b":".join([b"ffff"] * 8)
        + b" "
        + b":".join([b"FFFF"] * 8)
        # ports 65535 65535
        + b" 65535 65535\r\n",
        ProxyHeader(
            1,
            Command.PROXY,
            (":".join(["ffff"] * 8), 65535),
            (":".join(["ffff"] * 8), 65535),
            "tcp",
        ),
    ),
    (
        "v1 TCP6 zero ports and mapped v4",
        b"PROXY TCP6 ::1 ::ffff:192.0.2.1 0 0\r\n",
        ProxyHeader(1, Command.PROXY, ("::1", 0), ("::ffff:192.0.2.1", 0), "tcp"),
    ),
    (
        "v1 UNKNOWN short form (2.1)",
        b"PROXY UNKNOWN\r\n",
        ProxyHeader(1, Command.PROXY, None, None, None),
    ),
    (
        "v1 UNKNOWN worst case, 107 bytes (2.1)",
        b"PROXY UNKNOWN "
        + b":".join([b"ffff"] * 8)
        + b" "
        + b":".join([b"ffff"] * 8)
        + b" 65535 65535\r\n",
        ProxyHeader(1, Command.PROXY, None, None, None),
    ),
    (
        "v1 UNKNOWN with junk is ignored (2.1)",
        b"PROXY UNKNOWN whatever \x00\xff\r\n",
        ProxyHeader(1, Command.PROXY, None, None, None),
    ),
    (
        "v2 TCP4",
        v2(0x21, 0x11, V4_BODY),
        ProxyHeader(2, Command.PROXY, ("192.168.0.1", 56324), ("192.168.0.11", 443), "tcp"),
    ),
    (
        "v2 UDP4",
        v2(0x21, 0x12, V4_BODY),
        ProxyHeader(2, Command.PROXY, ("192.168.0.1", 56324), ("192.168.0.11", 443), "udp"),
    ),
    (
        "v2 TCP6 with a v4-mapped destination",
        v2(0x21, 0x21, V6_BODY),
        ProxyHeader(2, Command.PROXY, ("2001:db8::1", 1), ("::ffff:10.0.0.1", 8883), "tcp"),
    ),
    (
        "v2 UDP6",
        v2(0x21, 0x22, V6_BODY),
        ProxyHeader(2, Command.PROXY, ("2001:db8::1", 1), ("::ffff:10.0.0.1", 8883), "udp"),
    ),
    (
        "v2 LOCAL, len 0 (2.2)",
        v2(0x20, 0x00, b""),
        ProxyHeader(2, Command.LOCAL, None, None, None),
    ),
    (
        "v2 LOCAL with an address block is skipped (2.2 'must not assume zero')",
        v2(0x20, 0x11, V4_BODY),
        ProxyHeader(2, Command.LOCAL, None, None, None),
    ),
    (
        "v2 LOCAL with a short address block",
        v2(0x20, 0x21, b"\x00" * 7),
        ProxyHeader(2, Command.LOCAL, None, None, None),
    ),
    (
        "v2 LOCAL with address block then TLVs",
        v2(0x20, 0x11, V4_BODY + tlv(0x05, b"uid")),
        ProxyHeader(2, Command.LOCAL, None, None, None, unique_id=b"uid", tlvs=((0x05, b"uid"),)),
    ),
    (
        "v2 HAProxy health check: LOCAL + CRC32C + empty SSL (notes §2)",
        HEALTH_CHECK,
        ProxyHeader(
            2,
            Command.LOCAL,
            None,
            None,
            None,
            ssl=SSLInfo(ClientFlags(0), 0),
            tlvs=((0x03, HEALTH_CHECK[19:23]), (0x20, bytes(5))),
        ),
    ),
    (
        "v2 PROXY + UNSPEC is accepted without addresses (2.2)",
        v2(0x21, 0x00, tlv(0x04, b"")),
        ProxyHeader(2, Command.PROXY, None, None, None, tlvs=((0x04, b""),)),
    ),
    (
        "v2 UNIX stream falls back to UNSPEC (2.2)",
        v2(0x21, 0x31, b"/tmp/a".ljust(108, b"\x00") + b"/tmp/b".ljust(108, b"\x00")),
        ProxyHeader(2, Command.PROXY, None, None, None),
    ),
    (
        "v2 all TLVs in HAProxy order with CRC32C",
        with_crc(
            v2(
                0x21,
                0x11,
                V4_BODY
                + tlv(0x03, bytes(4))
                + tlv(0x01, b"mqtt")
                + tlv(0x02, b"broker.example")
                + tlv(0x05, b"A1B2")
                + tlv(0x20, SSL_VALUE)
                + tlv(0x30, b"ns1")
                + tlv(0x04, b"\x00\x00")
                + tlv(0xE1, b"\x00\x020\x00\x00\x050\x03\x01\x01\xff")
                + tlv(0xF0, b"x"),
            ),
            16 + 12 + 3,
        ),
        ProxyHeader(
            2,
            Command.PROXY,
            ("192.168.0.1", 56324),
            ("192.168.0.11", 443),
            "tcp",
            alpn=b"mqtt",
            authority="broker.example",
            unique_id=b"A1B2",
            ssl=SSLInfo(
                ClientFlags.SSL | ClientFlags.CERT_CONN | ClientFlags.CERT_SESS,
                0,
                version="TLSv1.3",
                cn="device-0001",
                cipher="TLS_AES_256_GCM_SHA384",
                sig_alg="ecdsa-with-SHA256",
                key_alg="EC256",
            ),
            chain_subjects=(b"0\x00", b"0\x03\x01\x01\xff"),
            tlvs=(),  # filled in below
        ),
    ),
]
# the raw TLV tuple of the last vector is easiest to take from its bytes
_name, _data, _expected = VALID[-1]
VALID[-1] = (
    _name,
    _data,
    ProxyHeader(
        **{
            **{field: getattr(_expected, field) for field in ProxyHeader.__dataclass_fields__},
            "tlvs": (
                (0x03, _data[31:35]),
                (0x01, b"mqtt"),
                (0x02, b"broker.example"),
                (0x05, b"A1B2"),
                (0x20, SSL_VALUE),
                (0x30, b"ns1"),
                (0x04, b"\x00\x00"),
                (0xE1, b"\x00\x020\x00\x00\x050\x03\x01\x01\xff"),
                (0xF0, b"x"),
            ),
        }
    ),
)


def decode_whole(data: bytes, **options: int) -> tuple[ProxyHeader, bytes]:
    decoder = ProxyProtocolDecoder(**options)  # type: ignore[arg-type]
    decoder.feed(data)
    event = decoder.next_event()
    assert isinstance(event, ProxyHeader)
    return event, decoder.trailing_data


def decode_error(data: bytes, *, byte_by_byte: bool = False, **options: int) -> ProxyProtocolError:
    decoder = ProxyProtocolDecoder(**options)  # type: ignore[arg-type]
    chunks = [data[i : i + 1] for i in range(len(data))] if byte_by_byte else [data]
    with pytest.raises(ProxyProtocolError) as info:
        for chunk in chunks:
            decoder.feed(chunk)
            event = decoder.next_event()
            assert event is NEED_DATA, "decoded a header from invalid data"
        decoder.feed(b"")  # end of stream
        decoder.next_event()
    return info.value


@pytest.mark.parametrize(("name", "data", "expected"), VALID, ids=[v[0] for v in VALID])
def test_valid_vector_whole(name: str, data: bytes, expected: ProxyHeader) -> None:
    header, trailing = decode_whole(data)
    assert header == expected
    assert trailing == b""


@pytest.mark.parametrize(("name", "data", "expected"), VALID, ids=[v[0] for v in VALID])
def test_valid_vector_with_trailing_data(name: str, data: bytes, expected: ProxyHeader) -> None:
    header, trailing = decode_whole(data + TRAILING)
    assert header == expected
    assert trailing == TRAILING


@pytest.mark.parametrize(("name", "data", "expected"), VALID, ids=[v[0] for v in VALID])
def test_valid_vector_byte_by_byte(name: str, data: bytes, expected: ProxyHeader) -> None:
    decoder = ProxyProtocolDecoder()
    stream = data + TRAILING
    for index in range(len(data) - 1):
        decoder.feed(stream[index : index + 1])
        assert decoder.next_event() is NEED_DATA
        assert decoder.trailing_data == b""
    decoder.feed(stream[len(data) - 1 : len(data)])
    assert decoder.next_event() == expected
    assert decoder.trailing_data == b""
    for index in range(len(data), len(stream)):
        decoder.feed(stream[index : index + 1])
    assert decoder.trailing_data == TRAILING
    assert decoder.next_event() == expected  # idempotent once decoded


def test_health_check_is_local() -> None:
    header, _ = decode_whole(HEALTH_CHECK)
    assert header.is_local
    assert header.ssl is not None and not header.ssl.cert_verified


# (name, bytes, reason) - the notes' malformed-input table plus the spec's "must reject" cases
MALFORMED: list[tuple[str, bytes, str]] = [
    ("v2 10 bytes then EOF", SIG[:10], "truncated"),
    ("v2 header without its body then EOF", v2(0x21, 0x11, V4_BODY)[:20], "truncated"),
    ("v1 line without CRLF then EOF", b"PROXY TCP4 1.2.3.4", "truncated"),
    ("v2 bad signature", b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + V4_BODY, "bad_signature"),
    ("v2 version nibble 3", v2(0x31, 0x11, V4_BODY), "bad_version"),
    ("v2 version nibble 1", v2(0x11, 0x11, V4_BODY), "bad_version"),
    ("v2 command 0xF", v2(0x2F, 0x11, V4_BODY), "bad_command"),
    ("v2 command 2", v2(0x22, 0x11, V4_BODY), "bad_command"),
    ("v2 len=65535 over the default limit", SIG + b"\x21\x11\xff\xff" + V4_BODY, "too_long"),
    ("v2 fam 0x11 with len 4", v2(0x21, 0x11, V4_BODY[:4]), "bad_address"),
    ("v2 fam 0x11 with len 11", v2(0x21, 0x11, V4_BODY[:11]), "bad_address"),
    ("v2 fam 0x21 with 12-byte body", v2(0x21, 0x21, V4_BODY), "bad_address"),
    ("v2 fam 0x31 with 12-byte body", v2(0x21, 0x31, V4_BODY), "bad_address"),
    ("v2 family 0x4x undefined", v2(0x21, 0x41, V4_BODY), "bad_family"),
    ("v2 transport 0x3 undefined", v2(0x21, 0x13, V4_BODY), "bad_family"),
    ("v2 INET with transport UNSPEC", v2(0x21, 0x10, V4_BODY), "bad_family"),
    ("v2 LOCAL with undefined family", v2(0x20, 0x44, b""), "bad_family"),
    ("v2 TLV overruns the header", v2(0x21, 0x11, V4_BODY + b"\x04\x00\x05ab"), "bad_tlv"),
    ("v2 2 trailing bytes (partial TLV)", v2(0x21, 0x11, V4_BODY + b"\x04\x00"), "bad_tlv"),
    ("v2 LOCAL partial TLV", v2(0x20, 0x00, b"\x04"), "bad_tlv"),
    (
        "v2 wrong CRC32C",
        v2(0x21, 0x11, V4_BODY + tlv(0x03, b"\x12\x34\x56\x78")),
        "crc_mismatch",
    ),
    (
        "v2 LOCAL with wrong CRC32C",
        v2(0x20, 0x00, tlv(0x03, b"\x12\x34\x56\x78")),
        "crc_mismatch",
    ),
    ("v2 CRC32C TLV of length 2", v2(0x21, 0x11, V4_BODY + tlv(0x03, b"\x00\x00")), "bad_tlv"),
    ("v2 SSL TLV of 4 bytes", v2(0x21, 0x11, V4_BODY + tlv(0x20, bytes(4))), "bad_tlv"),
    (
        "v2 SSL sub-TLV overrun",
        v2(0x21, 0x11, V4_BODY + tlv(0x20, bytes(5) + b"\x22\x00\x09abc")),
        "bad_tlv",
    ),
    (
        "v2 SSL partial sub-TLV",
        v2(0x21, 0x11, V4_BODY + tlv(0x20, bytes(5) + b"\x22")),
        "bad_tlv",
    ),
    (
        "v2 SSL duplicate CN",
        v2(0x21, 0x11, V4_BODY + tlv(0x20, bytes(5) + tlv(0x22, b"a") + tlv(0x22, b"b"))),
        "bad_tlv",
    ),
    (
        "v2 SSL CN not UTF-8",
        v2(0x21, 0x11, V4_BODY + tlv(0x20, bytes(5) + tlv(0x22, b"\xff"))),
        "bad_tlv",
    ),
    ("v2 AUTHORITY not UTF-8", v2(0x21, 0x11, V4_BODY + tlv(0x02, b"\xc3")), "bad_tlv"),
    ("v2 AUTHORITY 256 bytes", v2(0x21, 0x11, V4_BODY + tlv(0x02, b"a" * 256)), "bad_tlv"),
    ("v2 UNIQUE_ID 129 bytes", v2(0x21, 0x11, V4_BODY + tlv(0x05, b"u" * 129)), "bad_tlv"),
    (
        "v2 duplicate SSL TLV",
        v2(0x21, 0x11, V4_BODY + tlv(0x20, bytes(5)) + tlv(0x20, bytes(5))),
        "bad_tlv",
    ),
    (
        "v2 CHAIN_SUBJECTS overrun",
        v2(0x21, 0x11, V4_BODY + tlv(0xE1, b"\x00\x09\x30\x00")),
        "bad_tlv",
    ),
    (
        "v2 CHAIN_SUBJECTS not DER",
        v2(0x21, 0x11, V4_BODY + tlv(0xE1, b"\x00\x02\x31\x00")),
        "bad_tlv",
    ),
    ("v1 LF without CR", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bad_signature"),
    ("v1 port 70000", b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 2\r\n", "bad_address"),
    ("v1 port -1", b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "bad_address"),
    ("v1 port abc", b"PROXY TCP4 1.2.3.4 5.6.7.8 abc 2\r\n", "bad_address"),
    ("v1 port +80", b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 2\r\n", "bad_address"),
    ("v1 port 0080", b"PROXY TCP4 1.2.3.4 5.6.7.8 0080 2\r\n", "bad_address"),
    ("v1 port 8_0", b"PROXY TCP4 1.2.3.4 5.6.7.8 8_0 2\r\n", "bad_address"),
    ("v1 port unicode digit", "PROXY TCP4 1.2.3.4 5.6.7.8 ٨ 2\r\n".encode(), "bad_address"),
    ("v1 TCP4 with IPv6", b"PROXY TCP4 ::1 ::1 1 2\r\n", "bad_address"),
    ("v1 TCP6 with IPv4", b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "bad_address"),
    ("v1 double space", b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "bad_address"),
    ("v1 trailing space", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "bad_address"),
    ("v1 missing port", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "bad_address"),
    ("v1 UDP4", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "bad_family"),
    ("v1 lowercase tcp4", b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "bad_family"),
    ("v1 UNKNOWNX", b"PROXY UNKNOWNX\r\n", "bad_family"),
    ("v1 no CRLF in 107 bytes", b"PROXY UNKNOWN " + b"a" * 200, "too_long"),
    ("v1 108 bytes with CRLF", b"PROXY UNKNOWN " + b"a" * 92 + b"\r\n", "too_long"),
    ("v1 IPv4 leading zero", b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "bad_address"),
    ("v1 IPv4 octet 256", b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "bad_address"),
    ("v1 IPv4 three octets", b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "bad_address"),
    ("v1 scoped IPv6", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "bad_address"),
    ("v1 IPv6 with 9 groups", b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "bad_address"),
    ("v1 IPv6 two double colons", b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "bad_address"),
    ("v1 IPv6 in brackets", b"PROXY TCP6 [::1] ::1 1 2\r\n", "bad_address"),
    ("v1 PROXY without space", b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", "bad_signature"),
    ("MQTT CONNECT", TRAILING, "not_proxy"),
    ("HTTP GET", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not_proxy"),
    ("HTTP POST", b"POST / HTTP/1.1\r\n", "not_proxy"),
    ("TLS ClientHello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "not_proxy"),
    ("SSH banner", b"SSH-2.0-OpenSSH_9.2\r\n", "not_proxy"),
]


@pytest.mark.parametrize(("name", "data", "reason"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_whole(name: str, data: bytes, reason: str) -> None:
    assert decode_error(data).reason == reason


@pytest.mark.parametrize(("name", "data", "reason"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_byte_by_byte(name: str, data: bytes, reason: str) -> None:
    assert decode_error(data, byte_by_byte=True).reason == reason


@pytest.mark.parametrize(
    ("first_bytes", "looks_like"),
    [
        (b"\x10", "mqtt-connect"),
        (b"\x16\x03", "tls-client-hello"),
        (b"\x16", "tls-client-hello"),
        (b"G", "http"),
        (b"PO", "http"),
        (b"PU", "http"),
        (b"PA", "http"),
        (b"PRI", "http"),
        (b"OPTIONS", "http"),
        (b"\x00", None),
        (b"S", None),
        (b"\r\x00", None),
    ],
)
def test_refused_early_with_hint(first_bytes: bytes, looks_like: str | None) -> None:
    decoder = ProxyProtocolDecoder()
    decoder.feed(first_bytes)  # no more bytes needed to decide
    with pytest.raises(ProxyProtocolError) as info:
        decoder.next_event()
    assert info.value.reason == "not_proxy"
    assert info.value.looks_like == looks_like
    if looks_like:
        assert looks_like in str(info.value)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"PROXY TCP5", "bad_family"),
        (b"PROXY UNKNOWN;", "bad_family"),
        (b"PROXZ", "bad_signature"),
        (SIG + b"\x31", "bad_version"),
        (SIG + b"\x25", "bad_command"),
        (SIG + b"\x21\x51", "bad_family"),
        (SIG + b"\x21\x11\x00\x04", "bad_address"),
        (SIG + b"\x21\x11\x20\x00", "too_long"),  # 16 + 8192 > DEFAULT_MAX_HEADER_SIZE
    ],
)
def test_refused_as_soon_as_visible(data: bytes, reason: str) -> None:
    decoder = ProxyProtocolDecoder()
    for index in range(len(data) - 1):
        decoder.feed(data[index : index + 1])
        assert decoder.next_event() is NEED_DATA
    decoder.feed(data[-1:])
    with pytest.raises(ProxyProtocolError) as info:
        decoder.next_event()
    assert info.value.reason == reason


def test_error_is_sticky() -> None:
    decoder = ProxyProtocolDecoder()
    decoder.feed(b"\x10\x00")
    with pytest.raises(ProxyProtocolError) as first:
        decoder.next_event()
    with pytest.raises(ProxyProtocolError) as again:
        decoder.feed(b"PROXY UNKNOWN\r\n")
    assert again.value is first.value
    with pytest.raises(ProxyProtocolError) as again:
        decoder.next_event()
    assert again.value is first.value
    assert decoder.trailing_data == b""


def test_eof_before_anything_is_truncated() -> None:
    decoder = ProxyProtocolDecoder()
    assert decoder.next_event() is NEED_DATA
    decoder.feed(b"")
    with pytest.raises(ProxyProtocolError) as info:
        decoder.next_event()
    assert info.value.reason == "truncated"


def test_eof_after_header_is_fine() -> None:
    decoder = ProxyProtocolDecoder()
    decoder.feed(b"PROXY UNKNOWN\r\n")
    assert isinstance(decoder.next_event(), ProxyHeader)
    decoder.feed(b"")
    assert decoder.trailing_data == b""


def test_version_switches() -> None:
    assert decode_error(b"PROXY UNKNOWN\r\n", allow_v1=False).reason == "bad_version"
    assert decode_error(v2(0x20, 0x00, b""), allow_v2=False).reason == "bad_version"
    assert decode_whole(b"PROXY UNKNOWN\r\n", allow_v2=False)[0].version == 1
    assert decode_whole(v2(0x20, 0x00, b""), allow_v1=False)[0].version == 2
    with pytest.raises(ValueError):
        ProxyProtocolDecoder(allow_v1=False, allow_v2=False)
    with pytest.raises(ValueError):
        ProxyProtocolDecoder(max_v2_length=70000)


def test_max_v2_length_is_configurable() -> None:
    header = v2(0x21, 0x11, V4_BODY + tlv(0x04, bytes(9000)))
    assert decode_error(header).reason == "too_long"
    assert "header of 9031 bytes announced, the limit is 8192" in decode_error(header).message
    assert isinstance(
        decode_whole(v2(0x21, 0x11, V4_BODY + tlv(0x04, bytes(8161))))[0], ProxyHeader
    )
    assert decode_whole(header, max_v2_length=65535)[0].source == ("192.168.0.1", 56324)
    assert decode_error(v2(0x21, 0x11, V4_BODY), max_v2_length=11).reason == "too_long"


def test_v1_exactly_107_bytes_is_accepted() -> None:
    line = b"PROXY UNKNOWN " + b"a" * 91 + b"\r\n"
    assert len(line) == V1_MAX_LENGTH
    assert decode_whole(line)[0].source is None


# --- encoders: golden bytes ------------------------------------------------------------------


def test_encode_v1_golden() -> None:
    assert (
        encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443))
        == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    )
    assert encode_v1(("1.2.3.4", 1), ("::1", 2)) == b"PROXY TCP6 ::ffff:1.2.3.4 ::1 1 2\r\n"
    assert encode_v1(("2001:DB8::1", 1), ("10.0.0.1", 2)) == (
        b"PROXY TCP6 2001:db8::1 ::ffff:10.0.0.1 1 2\r\n"
    )
    assert encode_v1(None, ("1.2.3.4", 1)) == b"PROXY UNKNOWN\r\n"
    with pytest.raises(ValueError):
        encode_v1(("1.2.3.4", 65536), ("1.2.3.4", 1))
    with pytest.raises(ValueError):
        encode_v1(("not-an-ip", 1), ("1.2.3.4", 1))


def test_encode_v2_golden() -> None:
    assert encode_v2(Command.PROXY, ("192.168.0.1", 56324), ("192.168.0.11", 443)) == v2(
        0x21, 0x11, V4_BODY
    )
    assert encode_v2(Command.PROXY, ("2001:db8::1", 1), ("10.0.0.1", 8883)) == v2(
        0x21, 0x21, V6_BODY
    )
    assert encode_v2(Command.LOCAL, None, None) == v2(0x20, 0x00, b"")
    # HAProxy sends LOCAL when an end is not INET/INET6 (make_proxy_line_v2)
    assert encode_v2(Command.PROXY, None, ("1.2.3.4", 1)) == v2(0x20, 0x00, b"")
    assert encode_v2(Command.LOCAL, None, None, crc32c=True, ssl=SSLInfo(ClientFlags(0), 0)) == (
        HEALTH_CHECK
    )
    # the all-TLVs vector, minus the TLVs HAProxy does not send
    ssl = SSLInfo(
        ClientFlags.SSL | ClientFlags.CERT_CONN | ClientFlags.CERT_SESS,
        0,
        version="TLSv1.3",
        cn="device-0001",
        cipher="TLS_AES_256_GCM_SHA384",
        sig_alg="ecdsa-with-SHA256",
        key_alg="EC256",
    )
    expected = with_crc(
        v2(
            0x21,
            0x11,
            V4_BODY
            + tlv(0x03, bytes(4))
            + tlv(0x01, b"mqtt")
            + tlv(0x02, b"broker.example")
            + tlv(0x05, b"A1B2")
            + tlv(0x20, SSL_VALUE)
            + tlv(0xE1, b"\x00\x020\x00")
            + tlv(0x30, b"ns1"),
        ),
        31,
    )
    assert (
        encode_v2(
            Command.PROXY,
            ("192.168.0.1", 56324),
            ("192.168.0.11", 443),
            alpn=b"mqtt",
            authority="broker.example",
            unique_id=b"A1B2",
            ssl=ssl,
            crc32c=True,
            chain_subjects=[b"0\x00"],
            extra_tlvs=[(TLVType.NETNS, b"ns1")],
        )
        == expected
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"unique_id": b"u" * 129},
        {"authority": "a" * 256},
        {"extra_tlvs": [(256, b"")]},
        {"extra_tlvs": [(0x04, bytes(65536))]},
        {"chain_subjects": [b""]},
    ],
)
def test_encode_v2_refuses_what_decoders_refuse(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        encode_v2(Command.PROXY, ("1.2.3.4", 1), ("5.6.7.8", 2), **kwargs)  # type: ignore[arg-type]


def test_ssl_info_cert_verified() -> None:
    both = ClientFlags.SSL | ClientFlags.CERT_CONN | ClientFlags.CERT_SESS
    assert SSLInfo(both, 0).cert_verified
    assert SSLInfo(ClientFlags.SSL | ClientFlags.CERT_SESS, 0).cert_verified
    assert not SSLInfo(ClientFlags.SSL, 0).cert_verified  # no certificate, verify left at 0
    assert not SSLInfo(both, 20).cert_verified  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    assert not SSLInfo(ClientFlags.CERT_CONN, 0).cert_verified


def test_ssl_info_certificate_used_and_resumed() -> None:
    """ssl_c_used: a certificate with this connection or its resumed session; resumed: only
    with the session (the case lb checks against a newer CRL)."""
    tls = ClientFlags.SSL
    connection = tls | ClientFlags.CERT_CONN | ClientFlags.CERT_SESS
    resumed = tls | ClientFlags.CERT_SESS
    assert SSLInfo(connection, 0).certificate_used
    assert SSLInfo(resumed, 0).certificate_used
    assert not SSLInfo(tls, 0).certificate_used
    assert SSLInfo(resumed, 0).certificate_resumed
    assert not SSLInfo(connection, 0).certificate_resumed
    assert not SSLInfo(tls, 0).certificate_resumed


# --- hypothesis ------------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
addresses = st.tuples(st.one_of(ipv4, ipv6), ports)
short_text = st.text(st.characters(codec="ascii", exclude_categories=["Cs"]), max_size=40)
ssl_infos = st.builds(
    SSLInfo,
    client=st.integers(0, 7).map(ClientFlags),
    verify=st.integers(0, 2**32 - 1),
    version=st.none() | short_text,
    cn=st.none() | st.text(max_size=64),
    cipher=st.none() | short_text,
    sig_alg=st.none() | short_text,
    key_alg=st.none() | short_text,
)


def der_sequence(body: bytes) -> bytes:
    length = bytes([len(body)]) if len(body) < 128 else b"\x82" + len(body).to_bytes(2, "big")
    return b"\x30" + length + body


der_names = st.binary(max_size=300).map(der_sequence)
extra_tlvs = st.lists(
    st.tuples(st.sampled_from([0x04, 0x30, 0xE0, 0xEF, 0xF0, 0x99]), st.binary(max_size=50)),
    max_size=4,
)


def canonical(address: tuple[str, int], mapped: bool) -> tuple[str, int]:
    """What the decoder returns for an encoded address."""
    ip = ipaddress.ip_address(address[0])
    packed = ip.packed if ip.version == 6 or not mapped else b"\0" * 10 + b"\xff\xff" + ip.packed
    if len(packed) == 4:
        return socket.inet_ntop(socket.AF_INET, packed), address[1]
    return socket.inet_ntop(socket.AF_INET6, packed), address[1]


@settings(max_examples=300, deadline=None)
@given(
    command=st.sampled_from(Command),
    source=addresses,
    destination=addresses,
    alpn=st.none() | st.binary(min_size=1, max_size=20),
    authority=st.none() | st.text(max_size=60),
    unique_id=st.none() | st.binary(max_size=128),
    ssl=st.none() | ssl_infos,
    crc=st.booleans(),
    chain=st.lists(der_names, max_size=3),
    extra=extra_tlvs,
    trailing=st.binary(max_size=20),
)
def test_round_trip_v2(
    command: Command,
    source: tuple[str, int],
    destination: tuple[str, int],
    alpn: bytes | None,
    authority: str | None,
    unique_id: bytes | None,
    ssl: SSLInfo | None,
    crc: bool,
    chain: list[bytes],
    extra: list[tuple[int, bytes]],
    trailing: bytes,
) -> None:
    data = encode_v2(
        command,
        source,
        destination,
        alpn=alpn,
        authority=authority,
        unique_id=unique_id,
        ssl=ssl,
        crc32c=crc,
        chain_subjects=chain,
        extra_tlvs=extra,
    )
    header, rest = decode_whole(data + trailing, max_v2_length=65535)
    assert rest == trailing
    assert header.command is command
    if command is Command.PROXY:
        mapped = ":" in source[0] or ":" in destination[0]
        assert header.source == canonical(source, mapped)
        assert header.destination == canonical(destination, mapped)
        assert header.transport == "tcp"
    else:
        assert header.source is header.destination is header.transport is None
    assert header.alpn == alpn
    assert header.authority == authority
    assert header.unique_id == unique_id
    assert header.ssl == ssl
    assert header.chain_subjects == tuple(chain)
    assert [t for t in header.tlvs if t[0] in {0x04, 0x30, 0xE0, 0xEF, 0xF0, 0x99}] == extra
    # byte by byte gives the same
    decoder = ProxyProtocolDecoder(max_v2_length=65535)
    for index in range(len(data)):
        decoder.feed(data[index : index + 1])
        event = decoder.next_event()
    assert event == header


@settings(max_examples=300, deadline=None)
@given(source=st.none() | addresses, destination=st.none() | addresses, trailing=st.binary())
def test_round_trip_v1(
    source: tuple[str, int] | None, destination: tuple[str, int] | None, trailing: bytes
) -> None:
    data = encode_v1(source, destination)
    assert len(data) <= V1_MAX_LENGTH
    header, rest = decode_whole(data + trailing)
    assert rest == trailing
    if source is None or destination is None:
        assert data == b"PROXY UNKNOWN\r\n"
        assert header.source is None
        return
    mapped = ":" in source[0] or ":" in destination[0]
    assert data.startswith(b"PROXY TCP6 " if mapped else b"PROXY TCP4 ")
    assert header.source == canonical(source, mapped)
    assert header.destination == canonical(destination, mapped)
    # the address text is exactly what glibc inet_ntop prints, as in make_proxy_line_v1
    fields = data.split(b" ")
    assert fields[2].decode() == header.source[0]


def feed_all(data: bytes, byte_by_byte: bool, **options: int) -> None:
    decoder = ProxyProtocolDecoder(**options)  # type: ignore[arg-type]
    chunks = [data[i : i + 1] for i in range(len(data))] if byte_by_byte else [data]
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            if decoder.next_event() is not NEED_DATA:
                return
        decoder.feed(b"")
        decoder.next_event()
        raise AssertionError("EOF without header did not raise")
    except ProxyProtocolError as error:
        assert error.reason in {
            "not_proxy",
            "truncated",
            "bad_signature",
            "bad_version",
            "bad_command",
            "bad_family",
            "bad_address",
            "bad_tlv",
            "crc_mismatch",
            "too_long",
        }
        assert str(error)


prefixes = st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", SIG])


@settings(max_examples=500, deadline=None)
@given(prefix=prefixes, data=st.binary(max_size=200), byte_by_byte=st.booleans())
def test_random_bytes_raise_only_proxy_protocol_error(
    prefix: bytes, data: bytes, byte_by_byte: bool
) -> None:
    feed_all(prefix + data, byte_by_byte)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from([v[1] for v in VALID]),
    flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 400),
    byte_by_byte=st.booleans(),
)
def test_mutated_headers_raise_only_proxy_protocol_error(
    seed: bytes, flips: list[tuple[int, int]], cut: int, byte_by_byte: bool
) -> None:
    data = bytearray(seed)
    for position, value in flips:
        if position < len(data):
            data[position] = value
    feed_all(bytes(data[: max(cut, 1)]), byte_by_byte)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_crc32c_matches_crc32c_package(data: bytes) -> None:
    assert proxyproto.crc32c(data) == crc32c_package.crc32c(data)


@settings(max_examples=1000, deadline=None)
@given(
    st.one_of(
        st.binary(min_size=16, max_size=16),
        st.lists(st.sampled_from([0, 0, 0, 1, 0xFFFF, 0x1234]), min_size=8, max_size=8).map(
            lambda words: struct.pack("!8H", *words)
        ),
    )
)
def test_ntop6_matches_glibc(packed: bytes) -> None:
    assert proxyproto._ntop6(packed) == socket.inet_ntop(socket.AF_INET6, packed)


# --- the proxy-protocol package as oracle ----------------------------------------------------


def test_oracle_reads_our_encoding() -> None:
    ssl = SSLInfo(
        ClientFlags.SSL | ClientFlags.CERT_CONN | ClientFlags.CERT_SESS,
        0,
        version="TLSv1.3",
        cn="device-0001",
        cipher="TLS_AES_256_GCM_SHA384",
        sig_alg="ecdsa-with-SHA256",
        key_alg="EC256",
    )
    data = encode_v2(
        Command.PROXY,
        ("2001:db8::1", 1),
        ("10.0.0.1", 8883),
        unique_id=b"A1B2",
        ssl=ssl,
        crc32c=True,
        chain_subjects=[b"0\x00"],
    )
    result = ProxyProtocolV2().unpack(data)
    assert str(result.source[0]) == "2001:db8::1" and result.source[1] == 1
    assert str(result.dest[0]) == "::ffff:a00:1" and result.dest[1] == 8883
    assert result.tlv.unique_id == b"A1B2"
    assert result.tlv.ssl.cn == "device-0001"
    assert result.tlv.ssl.version == "TLSv1.3"
    assert result.tlv.ssl.cipher == "TLS_AES_256_GCM_SHA384"
    assert result.tlv.ssl.sig_alg == "ecdsa-with-SHA256"
    assert result.tlv.ssl.key_alg == "EC256"
    assert result.tlv.ssl.verified
    assert result.tlv[0xE1] == b"\x00\x020\x00"


def test_oracle_rejects_haproxy_tlv_order_with_crc32c() -> None:
    """Documents an oracle bug: proxy-protocol 0.11.3 recomputes the CRC over its own
    re-serialisation of the TLVs (sorted by type), so HAProxy's order CRC32C-then-ALPN fails
    its check although the checksum is right (the crc32c package agrees with us)."""
    data = encode_v2(Command.PROXY, ("1.2.3.4", 1), ("5.6.7.8", 2), alpn=b"mqtt", crc32c=True)
    assert decode_whole(data)[0].alpn == b"mqtt"
    with pytest.raises(ProxyProtocolChecksumError):
        ProxyProtocolV2().unpack(data)


@settings(max_examples=200, deadline=None)
@given(
    source=addresses,
    destination=addresses,
    alpn=st.none() | st.binary(min_size=1, max_size=20),
    authority=st.none() | st.text(min_size=1, max_size=60),
    unique_id=st.none() | st.binary(min_size=1, max_size=128),
    crc=st.booleans(),
)
def test_oracle_agrees_with_our_encoding(
    source: tuple[str, int],
    destination: tuple[str, int],
    alpn: bytes | None,
    authority: str | None,
    unique_id: bytes | None,
    crc: bool,
) -> None:
    # the oracle's CRC check only works when TLVs are in ascending type order (see above)
    crc = crc and alpn is None and authority is None
    data = encode_v2(
        Command.PROXY,
        source,
        destination,
        alpn=alpn,
        authority=authority,
        unique_id=unique_id,
        crc32c=crc,
    )
    result = ProxyProtocolV2().unpack(data)
    ours = decode_whole(data)[0]
    assert ours.source is not None and ours.destination is not None
    assert ipaddress.ip_address(ours.source[0]) == result.source[0]
    assert ours.source[1] == result.source[1]
    assert ipaddress.ip_address(ours.destination[0]) == result.dest[0]
    assert ours.destination[1] == result.dest[1]
    assert result.tlv.alpn == alpn
    assert result.tlv.authority == authority
    assert result.tlv.unique_id == (unique_id or b"")
    assert dict(result.tlv) == dict(ours.tlvs)


@settings(max_examples=200, deadline=None)
@given(
    v6=st.booleans(),
    data=st.data(),
    alpn=st.none() | st.binary(min_size=1, max_size=20),
    authority=st.none() | st.text(min_size=1, max_size=60),
    unique_id=st.none() | st.binary(min_size=1, max_size=128),
    ssl_cn=st.none() | st.text(min_size=1, max_size=30),
    trailing=st.binary(max_size=10),
)
def test_we_read_the_oracles_encoding(
    v6: bool,
    data: st.DataObject,
    alpn: bytes | None,
    authority: str | None,
    unique_id: bytes | None,
    ssl_cn: str | None,
    trailing: bytes,
) -> None:
    addr = ipv6 if v6 else ipv4
    source = (ipaddress.ip_address(data.draw(addr)), data.draw(ports))
    destination = (ipaddress.ip_address(data.draw(addr)), data.draw(ports))
    ssl = None
    if ssl_cn is not None:
        ssl = ProxyProtocolSSLTLV(
            has_ssl=True, has_cert_conn=True, verified=True, version="TLSv1.2", cn=ssl_cn
        )
    tlv = ProxyProtocolTLV(alpn=alpn, authority=authority, unique_id=unique_id, ssl=ssl)
    result_type = ProxyResultIPv6 if v6 else ProxyResultIPv4
    packed = ProxyProtocolV2().pack(
        result_type(source, destination, protocol=socket.SOCK_STREAM, tlv=tlv)
    )
    header, rest = decode_whole(packed + trailing)
    assert rest == trailing
    assert header.source == (
        socket.inet_ntop(socket.AF_INET6 if v6 else socket.AF_INET, source[0].packed),
        source[1],
    )
    assert header.destination is not None and header.destination[1] == destination[1]
    assert header.alpn == alpn
    assert header.authority == authority
    assert header.unique_id == unique_id
    # with the crc32c package installed the oracle always adds a CRC32C TLV: we verified it
    assert TLVType.CRC32C in dict(header.tlvs)
    if ssl_cn is None:
        assert header.ssl is None
    else:
        assert header.ssl is not None
        assert header.ssl.cn == ssl_cn
        assert header.ssl.version == "TLSv1.2"
        assert header.ssl.cert_verified


# --- who may send a header (lb accept-proxy-from, broker proxy_protocol_trusted) ----------

TRUST_NETWORKS = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))


@pytest.mark.parametrize(
    ("host", "trusted"),
    [
        ("10.1.2.3", True),  # IPv4 on an IPv4 socket
        ("::ffff:10.1.2.3", True),  # the same sender on a dual-stack IPv6 socket
        ("::ffff:a01:203", True),  # how some stacks print it
        ("11.1.2.3", False),
        ("::ffff:11.1.2.3", False),
        ("2001:db8::7", True),  # IPv6
        ("2001:db8::7%eth0", True),  # a scope id is not part of the address
        ("2001:db9::7", False),
        ("::10.1.2.3", False),  # IPv4-compatible (deprecated), not IPv4-mapped
        ("localhost", False),  # a name is never trusted
        ("", False),
    ],
)
def test_trust_check_unmaps_ipv4_mapped_addresses(host: str, trusted: bool) -> None:
    assert proxyproto.is_trusted_source(host, TRUST_NETWORKS) is trusted


def test_trust_check_accepts_networks_written_as_mapped_addresses() -> None:
    mapped_network = (ipaddress.ip_network("::ffff:10.0.0.0/104"),)
    assert proxyproto.is_trusted_source("::ffff:10.9.9.9", mapped_network)
    assert not proxyproto.is_trusted_source("::ffff:11.9.9.9", mapped_network)
    assert not proxyproto.is_trusted_source("10.9.9.9", ())


# --- our HMAC TLV (0xE2) -------------------------------------------------------------------

SECRET = bytes(range(32))
NONCE = bytes(range(100, 116))
MAC_KEY = MACKey("2026-12", SECRET, 1_796_000_000_123, NONCE)
V4_TEST_ADDRESSES = bytes([192, 0, 2, 1, 198, 51, 100, 2]) + struct.pack("!HH", 40000, 1883)


def test_hmac_tlv_golden_bytes() -> None:
    """The layout, built by hand and with the standard library's HMAC: the MAC covers the
    whole header but its own 32 bytes (the TLV is last), and is written in their place."""
    header = encode_v2(Command.PROXY, ("192.0.2.1", 40000), ("198.51.100.2", 1883), mac=MAC_KEY)
    value_head = b"\x01\x07" + b"2026-12" + struct.pack("!Q", 1_796_000_000_123) + NONCE
    body = V4_TEST_ADDRESSES + tlv(0xE2, value_head + bytes(32))
    expected = v2(0x21, 0x11, body)
    expected = expected[:-32] + hmac.digest(SECRET, expected[:-32], "sha256")
    assert header == expected
    decoded, _ = decode_whole(header)
    assert decoded.mac is not None
    assert (decoded.mac.key_id, decoded.mac.timestamp_ms, decoded.mac.nonce) == (
        "2026-12",
        1_796_000_000_123,
        NONCE,
    )
    assert decoded.mac.matches(SECRET)
    assert not decoded.mac.matches(bytes(32))


@pytest.mark.parametrize("crc", [False, True], ids=["no-crc32c", "crc32c"])
def test_hmac_with_every_other_tlv_and_local(crc: bool) -> None:
    """The MAC is computed with the CRC32C field still zero; the CRC, computed last, covers
    the MAC. A LOCAL header (a health check) carries one too."""
    verified = SSLInfo(ClientFlags.SSL | ClientFlags.CERT_CONN, 0, version="TLSv1.3", cn="d-1")
    for command, source, destination in (
        (Command.PROXY, ("192.0.2.1", 1), ("2001:db8::1", 2)),
        (Command.LOCAL, None, None),
    ):
        header = encode_v2(
            command,
            source,
            destination,
            alpn=b"mqtt",
            authority="broker.example",
            unique_id=b"id-1",
            ssl=verified,
            crc32c=crc,
            chain_subjects=[b"\x30\x00"],
            mac=MAC_KEY,
        )
        decoded, _ = decode_whole(header)
        assert decoded.mac is not None and decoded.mac.matches(SECRET)
        assert decoded.unique_id == b"id-1" and decoded.command is command


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(position=st.integers(min_value=16, max_value=200), flip=st.integers(1, 255))
def test_any_change_to_an_authenticated_header_is_caught(position: int, flip: int) -> None:
    """Whatever byte after the fixed 16 is altered (addresses, TLVs, key id, timestamp,
    nonce, the MAC itself), the header is refused by the codec or its MAC no longer matches."""
    header = bytearray(
        encode_v2(
            Command.PROXY,
            ("192.0.2.1", 40000),
            ("198.51.100.2", 1883),
            ssl=SSLInfo(ClientFlags.SSL, 0, version="TLSv1.3"),
            unique_id=b"conn-42",
            mac=MAC_KEY,
        )
    )
    position %= len(header)
    if position < 16:
        position += 16
    header[position] ^= flip
    decoder = ProxyProtocolDecoder()
    decoder.feed(bytes(header))
    try:
        event = decoder.next_event()
    except ProxyProtocolError:
        return
    if event is NEED_DATA:
        return  # a longer length field: waits for bytes that never come
    assert isinstance(event, ProxyHeader)
    assert event.mac is None or not event.mac.matches(SECRET)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"\x02\x01k" + bytes(56),  # version 2
        b"\x01\x00" + bytes(56),  # empty key id
        b"\x01\x21" + b"k" * 33 + bytes(56),  # key id over 32 bytes
        b"\x01\x01k" + bytes(55),  # one byte short
        b"\x01\x01k" + bytes(57),  # one byte long
        b"\x01\x01\xff" + bytes(56),  # key id not ASCII
    ],
)
def test_malformed_hmac_tlv_is_bad_tlv(value: bytes) -> None:
    header = v2(0x21, 0x11, V4_TEST_ADDRESSES + tlv(0xE2, value))
    assert decode_error(header).reason == "bad_tlv"


def test_two_hmac_tlvs_are_refused() -> None:
    one = encode_v2(Command.PROXY, ("192.0.2.1", 1), ("192.0.2.2", 2), mac=MAC_KEY)
    value = one[28 + 3 :]
    twice = v2(0x21, 0x11, one[16:28] + tlv(0xE2, value) + tlv(0xE2, value))
    assert decode_error(twice).reason == "bad_tlv"


def test_mac_key_refuses_what_the_decoder_would() -> None:
    for key_id, nonce in (("", NONCE), ("k" * 33, NONCE), ("clé", NONCE), ("k", b"short")):
        with pytest.raises(ValueError):
            MACKey(key_id, SECRET, 0, nonce)
