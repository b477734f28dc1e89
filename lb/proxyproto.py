"""Strict sans-IO codec for the PROXY protocol, versions 1 and 2.

This module owns the bytes of the PROXY protocol header, for both ends: the load balancer
encodes it (``encode_v1`` / ``encode_v2``) and the broker decodes it
(``ProxyProtocolDecoder``). It does no I/O and imports no socket, ssl or asyncio.

Specification: HAProxy's ``doc/proxy-protocol.txt`` (2020/03/05 revision, as shipped with
HAProxy 2.6):

- section 2.1 "Human-readable header format (Version 1)": the line, its 107-byte limit, CRLF,
  ``TCP4`` / ``TCP6`` / ``UNKNOWN``, no leading zeros;
- section 2.2 "Binary header format (version 2)": signature, version/command, family and
  transport nibbles, address block sizes, ``16 + len`` framing, TLVs;
- sections 2.2.1 to 2.2.8: ALPN, AUTHORITY, CRC32C (RFC 4960 appendix B), NOOP, UNIQUE_ID
  (at most 128 bytes), SSL and its sub-TLVs, NETNS, and the custom range 0xE0-0xEF, where we
  put ``CHAIN_SUBJECTS`` (0xE1) and ``HMAC`` (0xE2, an HMAC-SHA256 of the whole header that
  a receiver holding the key can check; see ``MACKey``, ``HeaderMAC``, lb.proxy_hmac).

The encoders produce what HAProxy 2.6 ``make_proxy_line_v1`` / ``make_proxy_line_v2``
(``src/connection.c``) produce, byte for byte: v4 addresses mapped into ``::ffff:0:0/96`` when
the other side is IPv6, addresses printed like glibc's ``inet_ntop``, LOCAL with family
UNSPEC for health checks (still followed by the TLVs), and the TLV order CRC32C, ALPN,
AUTHORITY, UNIQUE_ID, SSL (sub-TLVs VERSION, CN, KEY_ALG, SIG_ALG, CIPHER), then ours.

The decoder is stricter than HAProxy's ``conn_recv_proxy`` where the spec says "must reject"
and HAProxy does not bother (undefined families, v1 leading zeros, scoped IPv6), and as strict
where HAProxy is (TLV overrun, CRC32C, AUTHORITY > 255, UNIQUE_ID > 128). Every refusal is a
``ProxyProtocolError`` with a stable ``reason`` code; nothing else escapes the decoder.
"""

from __future__ import annotations

import enum
import functools
import hmac
import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "DEFAULT_MAX_HEADER_SIZE",
    "NEED_DATA",
    "V1_MAX_LENGTH",
    "V2_DEFAULT_MAX_LENGTH",
    "V2_HEADER_LENGTH",
    "V2_SIGNATURE",
    "ClientFlags",
    "Command",
    "Family",
    "HeaderMAC",
    "MACKey",
    "NeedData",
    "ProxyHeader",
    "ProxyProtocolDecoder",
    "ProxyProtocolError",
    "Reason",
    "SSLInfo",
    "TLVType",
    "Transport",
    "crc32c",
    "encode_v1",
    "encode_v2",
    "is_trusted_source",
]

# --- limits and constants, each from doc/proxy-protocol.txt -------------------------------

#: Section 2.1: "If the CRLF sequence is not found in the first 107 characters, the receiver
#: should declare the line invalid" (worst case "PROXY UNKNOWN ffff:f...f:ffff ..." + CRLF).
V1_MAX_LENGTH: Final = 107
#: Section 2.1: a version 1 header starts with "PROXY" and exactly one space.
V1_SIGNATURE: Final = b"PROXY "
#: Section 2.2: the 12-byte binary signature.
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
#: Section 2.2: signature, ver_cmd, fam, len: "the length of the protocol header in bytes is
#: always exactly 16 + this value".
V2_HEADER_LENGTH: Final = 16
#: Section 2.2 allows up to 65535 bytes after the 16-byte header, and "both formats are
#: designed to fit in ... 536 bytes" without TLVs; receivers cap it (Mosquitto: 500, HAProxy
#: its buffer). A header is at most this long by default, all of it (16 + len): enough for
#: the SSL TLV and CHAIN_SUBJECTS of a ten-deep chain of 746-byte subjects, which a limit of
#: 1,024 refused (issue 14). ``ProxyProtocolDecoder(max_v2_length=)`` sets another; the
#: broker's ``proxy_protocol_max_size`` and lb's ``proxy-v2-max-size`` use the same unit.
DEFAULT_MAX_HEADER_SIZE: Final = 8192
V2_DEFAULT_MAX_LENGTH: Final = DEFAULT_MAX_HEADER_SIZE - V2_HEADER_LENGTH
V2_MAX_LENGTH: Final = 0xFFFF
#: Section 2.2.5: "an opaque byte sequence of up to 128 bytes".
UNIQUE_ID_MAX_LENGTH: Final = 128
#: HAProxy's PP2_AUTHORITY_MAX (include/haproxy/connection-t.h): an SNI host name is at most
#: 255 bytes; conn_recv_proxy rejects longer AUTHORITY TLVs.
AUTHORITY_MAX_LENGTH: Final = 255
#: Section 2.2.6: ``struct pp2_tlv_ssl { uint8_t client; uint32_t verify; ... }``.
SSL_TLV_MIN_LENGTH: Final = 5
#: Section 2.2: a TLV is ``uint8_t type; uint8_t length_hi; uint8_t length_lo;``.
TLV_HEADER_LENGTH: Final = 3
#: Our HMAC TLV (TLVType.HMAC): a 128-bit nonce, a full HMAC-SHA256, key ids of 1..32 bytes.
HMAC_VERSION: Final = 1
HMAC_NONCE_LENGTH: Final = 16
HMAC_MAC_LENGTH: Final = 32
HMAC_KEY_ID_MAX_LENGTH: Final = 32

_V2_VERSION: Final = 0x2
_V1_TOKEN_TCP4: Final = b"TCP4 "
_V1_TOKEN_TCP6: Final = b"TCP6 "
_V1_TOKEN_UNKNOWN: Final = b"UNKNOWN"
# The bytes that may follow "PROXY " on a valid line (section 2.1).
_V1_TOKEN_PREFIXES: Final = (_V1_TOKEN_TCP4, _V1_TOKEN_TCP6, b"UNKNOWN ", b"UNKNOWN\r")
# A prefix at least this long that then diverges is a damaged PROXY header, not another
# protocol ("PROX", "\r\n\r\n"); shorter ones ("PO", "PUT") are something else entirely.
_SIGNATURE_CONFIDENT_PREFIX: Final = 4

# --- spec enumerations --------------------------------------------------------------------


class Command(enum.IntEnum):
    """Section 2.2, the low nibble of the 13th byte."""

    LOCAL = 0x0
    PROXY = 0x1


class Family(enum.IntEnum):
    """Section 2.2, the high nibble of the 14th byte (AF_UNSPEC, AF_INET, AF_INET6, AF_UNIX)."""

    UNSPEC = 0x0
    INET = 0x1
    INET6 = 0x2
    UNIX = 0x3


class Transport(enum.IntEnum):
    """Section 2.2, the low nibble of the 14th byte."""

    UNSPEC = 0x0
    STREAM = 0x1
    DGRAM = 0x2


class TLVType(enum.IntEnum):
    """Section 2.2 ``PP2_TYPE_*`` / ``PP2_SUBTYPE_SSL_*``, plus our custom type (2.2.8)."""

    ALPN = 0x01
    AUTHORITY = 0x02
    CRC32C = 0x03
    NOOP = 0x04
    UNIQUE_ID = 0x05
    SSL = 0x20
    SSL_VERSION = 0x21
    SSL_CN = 0x22
    SSL_CIPHER = 0x23
    SSL_SIG_ALG = 0x24
    SSL_KEY_ALG = 0x25
    NETNS = 0x30
    #: Ours, from PP2_TYPE_MIN_CUSTOM..PP2_TYPE_MAX_CUSTOM: the verified client chain's
    #: subject names, leaf first, each as ``[u16 BE length][DER X.509 Name]``.
    CHAIN_SUBJECTS = 0xE1
    #: Ours: ``[u8 version=1][u8 key id length][key id][u64 BE timestamp, ms since the Unix
    #: epoch][16-byte nonce][32-byte HMAC-SHA256]``, the MAC over the whole header with the
    #: CRC32C value zeroed (it is computed after) and these 32 MAC bytes left out.
    HMAC = 0xE2


class ClientFlags(enum.IntFlag):
    """Section 2.2.6, ``PP2_CLIENT_*`` bits of ``pp2_tlv_ssl.client``."""

    SSL = 0x01
    CERT_CONN = 0x02
    CERT_SESS = 0x04


# (family, transport) byte -> address block length. Section 2.2 lists exactly these as the
# protocol bytes to expect; anything else "must be rejected as invalid by receivers".
_ADDRESS_LENGTHS: Final[dict[int, int]] = {
    0x00: 0,
    0x11: 12,
    0x12: 12,
    0x21: 36,
    0x22: 36,
    0x31: 216,
    0x32: 216,
}
_TRANSPORT_NAMES: Final[dict[int, Literal["tcp", "udp"]]] = {
    0x11: "tcp",
    0x12: "udp",
    0x21: "tcp",
    0x22: "udp",
}

# --- errors -------------------------------------------------------------------------------

Reason = Literal[
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
]
LooksLike = Literal["mqtt-connect", "tls-client-hello", "http"]


class ProxyProtocolError(Exception):
    """The peer sent something that is not a valid PROXY protocol header.

    ``reason`` is a stable code for logs and metrics; ``str(error)`` is for humans.
    ``looks_like`` guesses what the peer spoke instead when ``reason == "not_proxy"``.
    """

    def __init__(self, reason: Reason, message: str, *, looks_like: LooksLike | None = None):
        super().__init__(message)
        self.reason: Reason = reason
        self.message = message
        self.looks_like: LooksLike | None = looks_like

    def __repr__(self) -> str:
        return f"ProxyProtocolError({self.reason!r}, {self.message!r})"


# --- records ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SSLInfo:
    """The PP2_TYPE_SSL TLV (section 2.2.6).

    HAProxy leaves ``verify`` at 0 when the client sent no certificate, so "verified" needs
    the certificate bits too (see ``cert_verified``).
    """

    client: ClientFlags
    verify: int
    version: str | None = None
    cn: str | None = None
    cipher: str | None = None
    sig_alg: str | None = None
    key_alg: str | None = None

    # The flags tested as plain ints: `&` on the IntFlag makes a new member each time (three
    # enum calls, a third of what the broker's PROXY path spent outside the codec's parsing).

    @property
    def over_tls(self) -> bool:
        """The client connected over TLS (PP2_CLIENT_SSL)."""
        return bool(int(self.client) & _SSL_BIT)

    @property
    def certificate_used(self) -> bool:
        """A client certificate was used: this connection's, or its resumed session's
        (PP2_CLIENT_CERT_SESS; HAProxy's ssl_c_used)."""
        return bool(int(self.client) & _CERT_SESS_BIT)

    @property
    def certificate_resumed(self) -> bool:
        """The client certificate came with a resumed session, not with this connection."""
        return int(self.client) & _CERT_BITS == _CERT_SESS_BIT

    @property
    def cert_verified(self) -> bool:
        """TLS was used, a client certificate was presented, and it verified."""
        client = int(self.client)
        return bool(client & _SSL_BIT) and bool(client & _CERT_BITS) and self.verify == 0


@dataclass(frozen=True, slots=True)
class MACKey:
    """What ``encode_v2`` needs to authenticate one header (TLVType.HMAC): the key, its id
    (so the receiver can pick it during a rotation), the sender's clock and a fresh nonce.
    The caller supplies the time and the randomness: the codec has neither."""

    key_id: str
    secret: bytes
    timestamp_ms: int
    nonce: bytes

    def __post_init__(self) -> None:
        if not self.key_id.isascii() or not 1 <= len(self.key_id) <= HMAC_KEY_ID_MAX_LENGTH:
            raise ValueError(f"HMAC key id must be 1..{HMAC_KEY_ID_MAX_LENGTH} ASCII bytes")
        if len(self.nonce) != HMAC_NONCE_LENGTH:
            raise ValueError(f"HMAC nonce must be {HMAC_NONCE_LENGTH} bytes")
        if not 0 <= self.timestamp_ms < 2**64:
            raise ValueError("HMAC timestamp out of range")


@dataclass(frozen=True, slots=True)
class HeaderMAC:
    """A received HMAC TLV: its fields, and ``signed``, the bytes its MAC covers (the header
    with the CRC32C value zeroed and the MAC left out), for ``HeaderMAC.matches``."""

    key_id: str
    timestamp_ms: int
    nonce: bytes
    mac: bytes
    signed: bytes

    def matches(self, secret: bytes) -> bool:
        """Whether ``secret`` made this MAC (in constant time)."""
        return hmac.compare_digest(hmac.digest(secret, self.signed, "sha256"), self.mac)


Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A decoded PROXY header.

    ``source`` / ``destination`` are None for LOCAL, for v1 ``UNKNOWN`` and for v2 UNSPEC or
    AF_UNIX: the receiver then uses the real connection endpoints (section 2.1, 2.2).
    IPv6 addresses are printed like ``inet_ntop`` (so v4-mapped ones read ``::ffff:a.b.c.d``).
    ``tlvs`` holds every top-level TLV in wire order, known or not, with its raw value.
    """

    version: Literal[1, 2]
    command: Command
    source: Address | None
    destination: Address | None
    transport: Literal["tcp", "udp"] | None
    alpn: bytes | None = None
    authority: str | None = None
    unique_id: bytes | None = None
    ssl: SSLInfo | None = None
    chain_subjects: tuple[bytes, ...] = ()
    tlvs: tuple[tuple[int, bytes], ...] = ()
    mac: HeaderMAC | None = None

    @property
    def is_local(self) -> bool:
        """A LOCAL command: the proxy's own connection (a health check)."""
        return self.command is Command.LOCAL


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by ``ProxyProtocolDecoder.next_event`` until a whole header has been fed.
NEED_DATA: Final = _NeedData.NEED_DATA
NeedData = Literal[_NeedData.NEED_DATA]

# --- CRC32C (section 2.2.3, RFC 4960 appendix B: Castagnoli, reflected, poly 0x82F63B78) ---


def _make_crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _make_crc32c_table()


def _crc32c_update(crc: int, data: bytes | bytearray | memoryview) -> int:
    table = _CRC32C_TABLE  # local name: the loop is the cost of the whole function
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC32C of ``data`` (pure Python, table driven; ~50 ns per byte)."""
    return _crc32c_update(0xFFFFFFFF, data) ^ 0xFFFFFFFF


# Every v2 header starts with the same 12 bytes: start the CRC after them.
_CRC32C_AFTER_SIGNATURE: Final = _crc32c_update(0xFFFFFFFF, V2_SIGNATURE)


def _crc32c_v2_header(header: bytes | bytearray) -> int:
    return _crc32c_update(_CRC32C_AFTER_SIGNATURE, memoryview(header)[12:]) ^ 0xFFFFFFFF


# --- addresses ----------------------------------------------------------------------------


def _ntop4(packed: bytes) -> str:
    return f"{packed[0]}.{packed[1]}.{packed[2]}.{packed[3]}"


_U16X8: Final = struct.Struct("!8H")


def _ntop6(packed: bytes) -> str:
    """Print an IPv6 address exactly like glibc ``inet_ntop(AF_INET6)`` (HAProxy uses it).

    The first longest run of two or more zero groups becomes "::"; ``::a.b.c.d`` and
    ``::ffff:a.b.c.d`` keep the IPv4 form. (CPython 3.11's ipaddress prints the latter as
    ``::ffff:102:304``, so it can't be used for the v1 line.)
    """
    words = _U16X8.unpack(packed)
    best_base, best_len, base, length = -1, 0, -1, 0
    for index, word in enumerate(words):
        if word == 0:
            if base < 0:
                base, length = index, 1
            else:
                length += 1
            if length > best_len:
                best_base, best_len = base, length
        else:
            base = -1
    if best_len < 2:
        best_base = -1
    if best_base == 0 and (best_len == 6 or (best_len == 5 and words[5] == 0xFFFF)):
        return ("::ffff:" if best_len == 5 else "::") + _ntop4(packed[12:])
    if best_base < 0:
        return ":".join(f"{word:x}" for word in words)
    head = ":".join(f"{word:x}" for word in words[:best_base])
    tail = ":".join(f"{word:x}" for word in words[best_base + best_len :])
    return head + "::" + tail


_V4_MAPPED_PREFIX: Final = b"\x00" * 10 + b"\xff\xff"


@functools.lru_cache(maxsize=4096)
def _pton(host: str) -> tuple[bool, bytes]:
    """Return ``(is_ipv6, packed)``; cached because a balancer sees the same few addresses
    (its own listeners, returning clients) again and again and parsing costs ~1.5 µs."""
    address = ipaddress.ip_address(host)
    return address.version == 6, address.packed


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def is_trusted_source(host: str, networks: Iterable[Network]) -> bool:
    """May the peer at ``host`` send a PROXY header (section 3: "the receiver ... must only
    accept it from known sources")? The one trust check of lb's ``accept-proxy-from`` and the
    broker's ``proxy_protocol_trusted``.

    On a dual-stack IPv6 socket an IPv4 peer shows up as ``::ffff:a.b.c.d``: it is checked as
    the IPv4 address it is (so ``10.0.0.0/8`` matches it) and as itself (so a network
    written in ``::ffff:0:0/96`` form does too). A scope id (``fe80::1%eth0``) is dropped.
    Anything that is not an IP address is untrusted.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    for network in networks:
        if address in network or (mapped is not None and mapped in network):
            return True
    return False


def _check_port(port: int) -> int:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range 0..65535: {port!r}")
    return port


# --- encoders -----------------------------------------------------------------------------


def encode_v1(source: Address | None, destination: Address | None) -> bytes:
    """Build a version 1 line like HAProxy ``make_proxy_line_v1`` (section 2.1).

    ``TCP4`` when both ends are IPv4, ``TCP6`` when either is IPv6 (an IPv4 end is mapped
    into ``::ffff:0:0/96``), ``PROXY UNKNOWN\\r\\n`` when an end is unknown.
    Raises ValueError for an invalid address or port.
    """
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    source_v6, source_packed = _pton(source[0])
    destination_v6, destination_packed = _pton(destination[0])
    source_port = _check_port(source[1])
    destination_port = _check_port(destination[1])
    if not source_v6 and not destination_v6:
        protocol = "TCP4"
        source_text = _ntop4(source_packed)
        destination_text = _ntop4(destination_packed)
    else:
        protocol = "TCP6"
        source_text = _ntop6(source_packed if source_v6 else _V4_MAPPED_PREFIX + source_packed)
        destination_text = _ntop6(
            destination_packed if destination_v6 else _V4_MAPPED_PREFIX + destination_packed
        )
    line = f"PROXY {protocol} {source_text} {destination_text} {source_port} {destination_port}\r\n"
    return line.encode("ascii")


_V2_PREFIX_PROXY: Final = V2_SIGNATURE + bytes([0x20 | Command.PROXY])
_V2_PREFIX_LOCAL_UNSPEC: Final = V2_SIGNATURE + bytes([0x20 | Command.LOCAL, 0x00])
_FAM_LEN: Final = struct.Struct("!BH")
_LEN: Final = struct.Struct("!H")
_TLV_HEADER: Final = struct.Struct("!BH")
_V4_ADDRESSES: Final = struct.Struct("!4s4sHH")
_V6_ADDRESSES: Final = struct.Struct("!16s16sHH")
_SSL_HEADER: Final = struct.Struct("!BI")
_U32: Final = struct.Struct("!I")
_CRC32C_PLACEHOLDER: Final = _TLV_HEADER.pack(TLVType.CRC32C, 4) + b"\x00\x00\x00\x00"
_U64: Final = struct.Struct("!Q")
_MAC_PLACEHOLDER: Final = bytes(HMAC_MAC_LENGTH)


def _tlv(tlv_type: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"TLV 0x{tlv_type:02x} value too long: {len(value)} bytes")
    return _TLV_HEADER.pack(tlv_type, len(value)) + value


def _encode_ssl(ssl: SSLInfo) -> bytes:
    parts = [b"", _SSL_HEADER.pack(int(ssl.client), ssl.verify)]
    # Sub-TLV order of make_proxy_line_v2: VERSION, CN, KEY_ALG, SIG_ALG, CIPHER.
    if ssl.version is not None:
        parts.append(_tlv(TLVType.SSL_VERSION, ssl.version.encode("ascii")))
    if ssl.cn is not None:
        parts.append(_tlv(TLVType.SSL_CN, ssl.cn.encode("utf-8")))
    if ssl.key_alg is not None:
        parts.append(_tlv(TLVType.SSL_KEY_ALG, ssl.key_alg.encode("ascii")))
    if ssl.sig_alg is not None:
        parts.append(_tlv(TLVType.SSL_SIG_ALG, ssl.sig_alg.encode("ascii")))
    if ssl.cipher is not None:
        parts.append(_tlv(TLVType.SSL_CIPHER, ssl.cipher.encode("ascii")))
    value = b"".join(parts)
    return _TLV_HEADER.pack(TLVType.SSL, len(value)) + value


def _encode_chain_subjects(chain_subjects: Iterable[bytes]) -> bytes:
    parts = []
    for subject in chain_subjects:
        if not 0 < len(subject) <= 0xFFFF:
            raise ValueError("a chain subject must be 1..65535 bytes of DER")
        parts.append(_LEN.pack(len(subject)))
        parts.append(subject)
    return _tlv(TLVType.CHAIN_SUBJECTS, b"".join(parts))


def encode_v2(
    command: Command,
    source: Address | None,
    destination: Address | None,
    *,
    alpn: bytes | None = None,
    authority: str | None = None,
    unique_id: bytes | None = None,
    ssl: SSLInfo | None = None,
    crc32c: bool = False,
    chain_subjects: Iterable[bytes] = (),
    extra_tlvs: Iterable[tuple[int, bytes]] = (),
    mac: MACKey | None = None,
) -> bytes:
    """Build a version 2 header like HAProxy 2.6 ``make_proxy_line_v2`` (section 2.2).

    PROXY with two addresses gives family 0x11 (both IPv4) or 0x21 (an IPv4 end mapped into
    ``::ffff:0:0/96``). LOCAL, or PROXY with an unknown end, gives ver_cmd 0x20 and family
    0x00 with no address block, as HAProxy does, still followed by the TLVs.
    TLVs come in HAProxy's order: CRC32C (computed last over the whole header), ALPN,
    AUTHORITY, UNIQUE_ID, SSL; then CHAIN_SUBJECTS (if any), ``extra_tlvs`` verbatim, and
    last our HMAC TLV when ``mac`` is given (its MAC covers everything before it; the CRC32C,
    computed after it, covers it).
    Raises ValueError for arguments our own decoder would refuse.
    """
    if command is Command.PROXY and source is not None and destination is not None:
        source_v6, source_packed = _pton(source[0])
        destination_v6, destination_packed = _pton(destination[0])
        source_port = _check_port(source[1])
        destination_port = _check_port(destination[1])
        if not source_v6 and not destination_v6:
            family = 0x11
            addresses = _V4_ADDRESSES.pack(
                source_packed, destination_packed, source_port, destination_port
            )
        else:
            family = 0x21
            addresses = _V6_ADDRESSES.pack(
                source_packed if source_v6 else _V4_MAPPED_PREFIX + source_packed,
                destination_packed if destination_v6 else _V4_MAPPED_PREFIX + destination_packed,
                source_port,
                destination_port,
            )
    elif command is Command.PROXY or command is Command.LOCAL:
        family = -1
        addresses = b""
    else:
        raise ValueError(f"not a PROXY protocol command: {command!r}")

    parts = [b"", addresses]
    if crc32c:
        parts.append(_CRC32C_PLACEHOLDER)
    if alpn is not None:
        parts.append(_tlv(TLVType.ALPN, alpn))
    if authority is not None:
        authority_bytes = authority.encode("utf-8")
        if len(authority_bytes) > AUTHORITY_MAX_LENGTH:
            raise ValueError(f"authority longer than {AUTHORITY_MAX_LENGTH} bytes")
        parts.append(_tlv(TLVType.AUTHORITY, authority_bytes))
    if unique_id is not None:
        if len(unique_id) > UNIQUE_ID_MAX_LENGTH:
            raise ValueError(f"unique_id longer than {UNIQUE_ID_MAX_LENGTH} bytes")
        parts.append(_tlv(TLVType.UNIQUE_ID, unique_id))
    if ssl is not None:
        parts.append(_encode_ssl(ssl))
    if chain_subjects:
        subjects = tuple(chain_subjects)  # an iterator is always truthy
        if subjects:
            parts.append(_encode_chain_subjects(subjects))
    for tlv_type, value in extra_tlvs:
        if not 0 <= tlv_type <= 0xFF:
            raise ValueError(f"TLV type out of range 0..255: {tlv_type!r}")
        parts.append(_tlv(tlv_type, value))
    if mac is not None:
        key_id = mac.key_id.encode("ascii")
        parts.append(
            _tlv(
                TLVType.HMAC,
                bytes((HMAC_VERSION, len(key_id)))
                + key_id
                + _U64.pack(mac.timestamp_ms)
                + mac.nonce
                + _MAC_PLACEHOLDER,
            )
        )

    body_length = sum(map(len, parts))
    if body_length > V2_MAX_LENGTH:
        raise ValueError(f"PROXY v2 header body too long: {body_length} bytes")
    if family < 0:
        parts[0] = _V2_PREFIX_LOCAL_UNSPEC + _LEN.pack(body_length)
    else:
        parts[0] = _V2_PREFIX_PROXY + _FAM_LEN.pack(family, body_length)
    header = b"".join(parts)
    if mac is not None:
        # The CRC32C field is still zero here, as the receiver zeroes it to check.
        signed = header[:-HMAC_MAC_LENGTH]
        header = signed + hmac.digest(mac.secret, signed, "sha256")
    if crc32c:
        offset = V2_HEADER_LENGTH + len(addresses) + TLV_HEADER_LENGTH
        checksum = _U32.pack(_crc32c_v2_header(header))
        header = header[:offset] + checksum + header[offset + 4 :]
    return header


# --- decoder ------------------------------------------------------------------------------

_HTTP_METHODS: Final = (
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
    b"PRI ",
)


def _looks_like(data: bytes | bytearray) -> LooksLike | None:
    """Guess the protocol of bytes that are not a PROXY header, for a helpful log line."""
    if not data:
        return None
    if data[0] == 0x10:
        return "mqtt-connect"
    if data[0] == 0x16 and (len(data) == 1 or data[1] == 0x03):
        return "tls-client-hello"
    head = bytes(data[:8])
    for method in _HTTP_METHODS:
        if head.startswith(method) or method.startswith(head):
            return "http"
    return None


def _common_prefix(data: bytes | bytearray, signature: bytes) -> int:
    length = min(len(data), len(signature))
    if data[:length] == signature[:length]:  # the usual case, without a Python loop
        return length
    for index in range(length):
        if data[index] != signature[index]:
            return index
    return length


def _describe(data: bytes | bytearray) -> str:
    return repr(bytes(data[:16]))


_IPV4_DIGITS: Final = frozenset(b"0123456789")
_IPV6_CHARACTERS: Final = frozenset(b"0123456789abcdefABCDEF:.")


def _parse_v1_port(text: bytes) -> int:
    # Section 2.1: decimal, 0..65535, "heading zeroes are not permitted".
    if (
        not 0 < len(text) <= 5
        or not _IPV4_DIGITS.issuperset(text)
        or (len(text) > 1 and text[0] == 0x30)
    ):
        raise ProxyProtocolError("bad_address", f"invalid port in PROXY v1 line: {text!r}")
    port = int(text)
    if port > 0xFFFF:
        raise ProxyProtocolError("bad_address", f"port out of range in PROXY v1 line: {text!r}")
    return port


def _parse_v1_ipv4(text: bytes) -> str:
    # Section 2.1: "exactly 4 integers in the range [0..255] ... separated by exactly one dot",
    # no heading zeroes.
    parts = text.split(b".")
    if len(parts) != 4:
        raise ProxyProtocolError("bad_address", f"invalid IPv4 address in PROXY v1: {text!r}")
    for part in parts:
        if (
            not 0 < len(part) <= 3
            or not _IPV4_DIGITS.issuperset(part)
            or (len(part) > 1 and part[0] == 0x30)
            or int(part) > 255
        ):
            raise ProxyProtocolError("bad_address", f"invalid IPv4 address in PROXY v1: {text!r}")
    return text.decode("ascii")


def _parse_v1_ipv6(text: bytes) -> str:
    # Section 2.1: hex groups with at most one "::". Only these characters: no scope id
    # ("%eth0"), no brackets; ipaddress does the grouping and bit count.
    if not text or not _IPV6_CHARACTERS.issuperset(text) or b":" not in text:
        raise ProxyProtocolError("bad_address", f"invalid IPv6 address in PROXY v1: {text!r}")
    try:
        packed = ipaddress.IPv6Address(text.decode("ascii")).packed
    except ValueError:
        raise ProxyProtocolError(
            "bad_address", f"invalid IPv6 address in PROXY v1: {text!r}"
        ) from None
    return _ntop6(packed)


def _parse_v1(line: bytes) -> ProxyHeader:
    """Parse a whole v1 line, CRLF excluded (section 2.1)."""
    rest = line[len(V1_SIGNATURE) :]
    if rest == _V1_TOKEN_UNKNOWN or rest.startswith(_V1_TOKEN_UNKNOWN + b" "):
        # "the receiver must ignore anything presented before the CRLF is found"
        return ProxyHeader(1, Command.PROXY, None, None, None)
    if rest.startswith(_V1_TOKEN_TCP4):
        parse_address = _parse_v1_ipv4
    elif rest.startswith(_V1_TOKEN_TCP6):
        parse_address = _parse_v1_ipv6
    else:
        raise ProxyProtocolError(
            "bad_family", f"PROXY v1 protocol is not TCP4, TCP6 or UNKNOWN: {line!r}"
        )
    fields = rest[len(_V1_TOKEN_TCP4) :].split(b" ")
    if len(fields) != 4:
        raise ProxyProtocolError(
            "bad_address", f"PROXY v1 line needs exactly 4 fields after the protocol: {line!r}"
        )
    source_text, destination_text, source_port_text, destination_port_text = fields
    return ProxyHeader(
        1,
        Command.PROXY,
        (parse_address(source_text), _parse_v1_port(source_port_text)),
        (parse_address(destination_text), _parse_v1_port(destination_port_text)),
        "tcp",
    )


_SSL_SUBTYPES: Final[dict[int, tuple[str, str]]] = {
    TLVType.SSL_VERSION: ("version", "ascii"),
    TLVType.SSL_CN: ("cn", "utf-8"),
    TLVType.SSL_CIPHER: ("cipher", "ascii"),
    TLVType.SSL_SIG_ALG: ("sig_alg", "ascii"),
    TLVType.SSL_KEY_ALG: ("key_alg", "ascii"),
}


def _iter_tlvs(data: bytes, start: int, end: int, what: str) -> list[tuple[int, int, int]]:
    """Split ``data[start:end]`` into ``(type, value_start, value_end)``; overrun or a partial
    TLV header at the end is an error, as in HAProxy ``conn_recv_proxy``."""
    tlvs = []
    offset = start
    while offset < end:
        if offset + TLV_HEADER_LENGTH > end:
            raise ProxyProtocolError(
                "bad_tlv", f"{what}: {end - offset} trailing byte(s), not a whole TLV header"
            )
        tlv_type, length = _TLV_HEADER.unpack_from(data, offset)
        value_start = offset + TLV_HEADER_LENGTH
        offset = value_start + length
        if offset > end:
            raise ProxyProtocolError(
                "bad_tlv",
                f"{what}: TLV 0x{tlv_type:02x} of length {length} overruns the header by "
                f"{offset - end} byte(s)",
            )
        tlvs.append((tlv_type, value_start, offset))
    return tlvs


def _decode_text(value: bytes, encoding: str, what: str) -> str:
    try:
        return value.decode(encoding)
    except UnicodeDecodeError:
        raise ProxyProtocolError("bad_tlv", f"{what} is not valid {encoding}: {value!r}") from None


def _parse_ssl(value: bytes) -> SSLInfo:
    # Section 2.2.6: client u8, verify u32, then sub-TLVs.
    if len(value) < SSL_TLV_MIN_LENGTH:
        raise ProxyProtocolError(
            "bad_tlv", f"SSL TLV of {len(value)} bytes, at least {SSL_TLV_MIN_LENGTH} needed"
        )
    client, verify = _SSL_HEADER.unpack_from(value, 0)
    fields: dict[str, str] = {}
    for sub_type, start, end in _iter_tlvs(value, SSL_TLV_MIN_LENGTH, len(value), "SSL TLV"):
        known = _SSL_SUBTYPES.get(sub_type)
        if known is None:
            continue  # section 2.2: a receiver may skip TLVs it does not understand
        name, encoding = known
        if name in fields:
            raise ProxyProtocolError("bad_tlv", f"duplicate SSL sub-TLV 0x{sub_type:02x}")
        fields[name] = _decode_text(value[start:end], encoding, f"SSL sub-TLV 0x{sub_type:02x}")
    return SSLInfo(_CLIENT_FLAGS[client], verify, **fields)


def _parse_chain_subjects(value: bytes) -> tuple[bytes, ...]:
    subjects = []
    offset = 0
    while offset < len(value):
        if offset + 2 > len(value):
            raise ProxyProtocolError("bad_tlv", "CHAIN_SUBJECTS: partial length field")
        (length,) = _LEN.unpack_from(value, offset)
        offset += 2
        subject = value[offset : offset + length]
        offset += length
        if offset > len(value):
            raise ProxyProtocolError("bad_tlv", "CHAIN_SUBJECTS: subject overruns the TLV")
        if not _is_der_sequence(subject):
            raise ProxyProtocolError("bad_tlv", "CHAIN_SUBJECTS: subject is not a DER SEQUENCE")
        subjects.append(subject)
    return tuple(subjects)


def _is_der_sequence(data: bytes) -> bool:
    """True if ``data`` is exactly one DER SEQUENCE (tag 0x30, definite minimal length)."""
    if len(data) < 2 or data[0] != 0x30:
        return False
    first = data[1]
    if first < 0x80:
        return len(data) == 2 + first
    count = first & 0x7F
    if count == 0 or count > 4 or len(data) < 2 + count or data[2] == 0:
        return False
    length = int.from_bytes(data[2 : 2 + count], "big")
    return length >= 0x80 and len(data) == 2 + count + length


_SSL_BIT: Final = int(ClientFlags.SSL)
_CERT_BITS: Final = int(ClientFlags.CERT_CONN | ClientFlags.CERT_SESS)
_CERT_SESS_BIT: Final = int(ClientFlags.CERT_SESS)

# Enum lookups by value cost ~0.5 µs each; index prebuilt tuples instead.
_COMMANDS: Final = (Command.LOCAL, Command.PROXY)
_CLIENT_FLAGS: Final = tuple(ClientFlags(value) for value in range(256))

_SINGLE_TLVS: Final = frozenset(
    {
        TLVType.ALPN,
        TLVType.AUTHORITY,
        TLVType.CRC32C,
        TLVType.UNIQUE_ID,
        TLVType.SSL,
        TLVType.CHAIN_SUBJECTS,
        TLVType.HMAC,
    }
)


def _parse_v2(header: bytes, command: Command, family: int) -> ProxyHeader:
    """Parse a whole v2 header whose first 16 bytes are already validated (section 2.2)."""
    total = len(header)
    address_length = _ADDRESS_LENGTHS[family]
    body_length = total - V2_HEADER_LENGTH
    source: Address | None = None
    destination: Address | None = None
    transport = None
    if command is Command.LOCAL:
        # Section 2.2: LOCAL "must use the real connection endpoints and discard the protocol
        # block including the family"; receivers "must not assume zero is presented".
        address_length = min(address_length, body_length)
    elif family in (0x11, 0x12):
        source_packed, destination_packed, source_port, destination_port = (
            _V4_ADDRESSES.unpack_from(header, V2_HEADER_LENGTH)
        )
        source = (_ntop4(source_packed), source_port)
        destination = (_ntop4(destination_packed), destination_port)
        transport = _TRANSPORT_NAMES[family]
    elif family in (0x21, 0x22):
        source_packed, destination_packed, source_port, destination_port = (
            _V6_ADDRESSES.unpack_from(header, V2_HEADER_LENGTH)
        )
        source = (_ntop6(source_packed), source_port)
        destination = (_ntop6(destination_packed), destination_port)
        transport = _TRANSPORT_NAMES[family]
    # else: UNSPEC or AF_UNIX; "the receiver should ignore address information".

    tlv_start = V2_HEADER_LENGTH + address_length
    if tlv_start == total:
        return ProxyHeader(2, command, source, destination, transport)

    alpn: bytes | None = None
    authority: str | None = None
    unique_id: bytes | None = None
    ssl: SSLInfo | None = None
    chain_subjects: tuple[bytes, ...] = ()
    crc_at = mac_at = -1  # where the CRC32C and HMAC values start
    mac_fields: tuple[str, int, bytes, bytes] | None = None
    seen: set[int] = set()
    tlvs = []
    for tlv_type, start, end in _iter_tlvs(header, tlv_start, total, "PROXY v2 header"):
        value = header[start:end]
        tlvs.append((tlv_type, value))
        if tlv_type in _SINGLE_TLVS:
            if tlv_type in seen:
                raise ProxyProtocolError("bad_tlv", f"duplicate TLV 0x{tlv_type:02x}")
            seen.add(tlv_type)
        if tlv_type == TLVType.CRC32C:
            # Section 2.2.3: the receiver MUST verify, with the field zeroed.
            if len(value) != 4:
                raise ProxyProtocolError("bad_tlv", f"CRC32C TLV of {len(value)} bytes, not 4")
            zeroed = header[:start] + b"\x00\x00\x00\x00" + header[end:]
            expected = _crc32c_v2_header(zeroed)
            (received,) = _U32.unpack(value)
            if received != expected:
                raise ProxyProtocolError(
                    "crc_mismatch",
                    f"CRC32C mismatch: header says 0x{received:08x}, computed 0x{expected:08x}",
                )
            crc_at = start
        elif tlv_type == TLVType.ALPN:
            alpn = value
        elif tlv_type == TLVType.AUTHORITY:
            if len(value) > AUTHORITY_MAX_LENGTH:
                raise ProxyProtocolError(
                    "bad_tlv", f"AUTHORITY TLV longer than {AUTHORITY_MAX_LENGTH} bytes"
                )
            authority = _decode_text(value, "utf-8", "AUTHORITY TLV")
        elif tlv_type == TLVType.UNIQUE_ID:
            if len(value) > UNIQUE_ID_MAX_LENGTH:
                raise ProxyProtocolError(
                    "bad_tlv", f"UNIQUE_ID TLV longer than {UNIQUE_ID_MAX_LENGTH} bytes"
                )
            unique_id = value
        elif tlv_type == TLVType.SSL:
            ssl = _parse_ssl(value)
        elif tlv_type == TLVType.CHAIN_SUBJECTS:
            chain_subjects = _parse_chain_subjects(value)
        elif tlv_type == TLVType.HMAC:
            mac_fields = _parse_hmac(value)
            mac_at = end - HMAC_MAC_LENGTH
    mac = None
    if mac_fields is not None:
        # The MAC covers the header as the sender had it when it signed: CRC32C still zero.
        signed = header
        if crc_at >= 0:
            signed = header[:crc_at] + b"\x00\x00\x00\x00" + header[crc_at + 4 :]
        key_id, timestamp_ms, nonce, value = mac_fields
        mac = HeaderMAC(
            key_id, timestamp_ms, nonce, value, signed[:mac_at] + signed[mac_at + HMAC_MAC_LENGTH :]
        )
    return ProxyHeader(
        2,
        command,
        source,
        destination,
        transport,
        alpn=alpn,
        authority=authority,
        unique_id=unique_id,
        ssl=ssl,
        chain_subjects=chain_subjects,
        tlvs=tuple(tlvs),
        mac=mac,
    )


def _parse_hmac(value: bytes) -> tuple[str, int, bytes, bytes]:
    """TLVType.HMAC: version 1, a 1..32-byte ASCII key id, a u64 timestamp, a 16-byte nonce
    and a 32-byte MAC, nothing else. Returns (key id, timestamp ms, nonce, MAC)."""
    if len(value) < 2 or value[0] != HMAC_VERSION:
        raise ProxyProtocolError("bad_tlv", "HMAC TLV: not version 1")
    key_id_length = value[1]
    fixed = 8 + HMAC_NONCE_LENGTH + HMAC_MAC_LENGTH
    if not 1 <= key_id_length <= HMAC_KEY_ID_MAX_LENGTH or len(value) != 2 + key_id_length + fixed:
        raise ProxyProtocolError("bad_tlv", f"HMAC TLV of {len(value)} bytes: bad layout")
    key_id = value[2 : 2 + key_id_length]
    if not key_id.isascii():
        raise ProxyProtocolError("bad_tlv", "HMAC TLV: key id is not ASCII")
    offset = 2 + key_id_length
    (timestamp_ms,) = _U64.unpack_from(value, offset)
    nonce = value[offset + 8 : offset + 8 + HMAC_NONCE_LENGTH]
    return key_id.decode("ascii"), timestamp_ms, nonce, value[-HMAC_MAC_LENGTH:]


class ProxyProtocolDecoder:
    """Sans-IO receiver of one PROXY header at the start of a connection.

    ``feed()`` bytes as they arrive (``feed(b"")`` means the peer closed); ``next_event()``
    returns the ``ProxyHeader`` once complete, ``NEED_DATA`` before, and raises
    ``ProxyProtocolError`` as soon as the bytes seen cannot start a valid header. After an
    error every call raises it again. Once the header is out, ``trailing_data`` is every
    byte fed after it, untouched, and ``next_event()`` keeps returning the same header.
    Version 1 and 2 are told apart by their signatures (section 2.2, as HAProxy's
    ``accept-proxy``); the receiver never guesses whether a header is present.
    """

    __slots__ = (
        "_allow_v1",
        "_allow_v2",
        "_buffer",
        "_closed",
        "_error",
        "_header",
        "_max_v2_length",
        "_trailing",
    )

    def __init__(
        self,
        *,
        allow_v1: bool = True,
        allow_v2: bool = True,
        max_v2_length: int = V2_DEFAULT_MAX_LENGTH,
    ) -> None:
        if not allow_v1 and not allow_v2:
            raise ValueError("allow at least one of PROXY protocol v1 and v2")
        if not 0 <= max_v2_length <= V2_MAX_LENGTH:
            raise ValueError(f"max_v2_length must be within 0..{V2_MAX_LENGTH}")
        self._allow_v1 = allow_v1
        self._allow_v2 = allow_v2
        self._max_v2_length = max_v2_length
        self._buffer = bytearray()
        self._trailing = bytearray()
        self._closed = False
        self._header: ProxyHeader | None = None
        self._error: ProxyProtocolError | None = None

    @property
    def trailing_data(self) -> bytes:
        """The bytes fed after the header (empty until the header is complete)."""
        return bytes(self._trailing)

    def feed(self, data: bytes) -> None:
        """Add received bytes; ``b""`` marks the end of the stream."""
        if self._error is not None:
            raise self._error
        if self._header is not None:
            self._trailing += data
        elif not data:
            self._closed = True
        else:
            self._buffer += data

    def next_event(self) -> ProxyHeader | NeedData:
        """The header, NEED_DATA, or raise ProxyProtocolError."""
        if self._error is not None:
            raise self._error
        if self._header is not None:
            return self._header
        try:
            result = self._parse()
        except ProxyProtocolError as error:
            self._error = error
            self._buffer.clear()
            raise
        if result is NEED_DATA:
            if self._closed:
                self._error = ProxyProtocolError(
                    "truncated",
                    f"connection closed after {len(self._buffer)} byte(s) of a PROXY header",
                )
                raise self._error
            return NEED_DATA
        header, length = result
        self._header = header
        self._trailing = self._buffer[length:]
        self._buffer = bytearray()
        return header

    def _parse(self) -> tuple[ProxyHeader, int] | NeedData:
        data = self._buffer
        if not data:
            return NEED_DATA
        if data[0] == 0x50:  # "P"
            matched = _common_prefix(data, V1_SIGNATURE)
            if matched == len(V1_SIGNATURE):
                if not self._allow_v1:
                    raise ProxyProtocolError(
                        "bad_version", "PROXY protocol v1 header received, only v2 is allowed"
                    )
                return self._parse_v1()
            if matched == len(data):
                return NEED_DATA
        elif data[0] == 0x0D:  # "\r"
            matched = _common_prefix(data, V2_SIGNATURE)
            if matched == len(V2_SIGNATURE):
                if not self._allow_v2:
                    raise ProxyProtocolError(
                        "bad_version", "PROXY protocol v2 header received, only v1 is allowed"
                    )
                return self._parse_v2()
            if matched == len(data):
                return NEED_DATA
        else:
            matched = 0
        if matched >= _SIGNATURE_CONFIDENT_PREFIX:
            raise ProxyProtocolError(
                "bad_signature", f"damaged PROXY protocol signature: {_describe(data)}"
            )
        looks_like = _looks_like(data)
        hint = f" (looks like {looks_like})" if looks_like else ""
        raise ProxyProtocolError(
            "not_proxy",
            f"received something which does not look like a PROXY protocol header{hint}: "
            f"{_describe(data)}",
            looks_like=looks_like,
        )

    def _parse_v1(self) -> tuple[ProxyHeader, int] | NeedData:
        data = self._buffer
        # Refuse an unknown protocol token as soon as it is visible.
        token = bytes(data[len(V1_SIGNATURE) : len(V1_SIGNATURE) + len(_V1_TOKEN_UNKNOWN) + 1])
        if not any(
            candidate.startswith(token) or token.startswith(candidate)
            for candidate in _V1_TOKEN_PREFIXES
        ):
            raise ProxyProtocolError(
                "bad_family", f"PROXY v1 protocol is not TCP4, TCP6 or UNKNOWN: {_describe(data)}"
            )
        end = data.find(b"\n", 0, V1_MAX_LENGTH)
        if end < 0:
            if len(data) >= V1_MAX_LENGTH:
                raise ProxyProtocolError(
                    "too_long", f"no CRLF in the first {V1_MAX_LENGTH} bytes of a PROXY v1 line"
                )
            return NEED_DATA
        if data[end - 1] != 0x0D:
            # Section 2.1: "must not tolerate a single CR or LF character to end the line".
            raise ProxyProtocolError("bad_signature", "PROXY v1 line ends with LF without CR")
        return _parse_v1(bytes(data[: end - 1])), end + 1

    def _parse_v2(self) -> tuple[ProxyHeader, int] | NeedData:
        data = self._buffer
        if len(data) <= len(V2_SIGNATURE):
            return NEED_DATA
        version_command = data[12]
        if version_command >> 4 != _V2_VERSION:
            raise ProxyProtocolError(
                "bad_version", f"PROXY v2 version nibble is {version_command >> 4}, not 2"
            )
        if version_command & 0x0F > Command.PROXY:
            raise ProxyProtocolError(
                "bad_command", f"PROXY v2 command 0x{version_command & 0x0F:x} is undefined"
            )
        command = _COMMANDS[version_command & 0x0F]
        if len(data) < 14:
            return NEED_DATA
        family = data[13]
        address_length = _ADDRESS_LENGTHS.get(family)
        if address_length is None:
            raise ProxyProtocolError(
                "bad_family", f"PROXY v2 family/transport byte 0x{family:02x} is undefined"
            )
        if len(data) < V2_HEADER_LENGTH:
            return NEED_DATA
        (body_length,) = _LEN.unpack_from(data, 14)
        if body_length > self._max_v2_length:
            raise ProxyProtocolError(
                "too_long",
                f"PROXY v2 header of {V2_HEADER_LENGTH + body_length} bytes announced, the "
                f"limit is {V2_HEADER_LENGTH + self._max_v2_length}",
            )
        if command is Command.PROXY and body_length < address_length:
            raise ProxyProtocolError(
                "bad_address",
                f"PROXY v2 family 0x{family:02x} needs {address_length} address bytes, "
                f"length is {body_length}",
            )
        total = V2_HEADER_LENGTH + body_length
        if len(data) < total:
            return NEED_DATA
        return _parse_v2(bytes(data[:total]), command, family), total
