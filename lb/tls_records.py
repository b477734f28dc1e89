"""TLS 1.3 records once the handshake is done: a sans-IO record layer for one connection.

OpenSSL does lb's TLS handshakes (lb.tls, lb.tls_io). When a TLS 1.3 handshake is complete,
lb.tls_io hands the connection's two application traffic secrets to a `Records` and frees the
OpenSSL connection: an established `SSL` of pyOpenSSL's OpenSSL 4.0 holds about 27 KiB
(two record layers of 4.4 KiB each, the SSL_CONNECTION of 6 KiB, two cipher contexts, the
session and the client's parsed certificate; heaptrack, bench/README.md), and a device keeps
its connection open for days while sending little. A `Records` is about 0.5 KiB; it holds a
cipher object (about 2.3 KiB: cryptography keeps an encrypting and a decrypting context
per key) only while its connection moves records (`ActiveKeys`).

What it implements, from RFC 8446:

- 5.1 and 5.2: records of at most 2^14 + 256 bytes of ciphertext behind a 5-byte header
  (outer type application_data, legacy_record_version 0x0303); anything else after the
  handshake (plaintext alerts, change_cipher_spec) is an unexpected_message;
- 5.3: the per-record nonce, the static IV XOR the 64-bit record sequence number;
- 5.4: the inner plaintext: content, inner content type, zero padding; at most 2^14 + 1
  bytes; a record of zeros only is an unexpected_message;
- 5.5: at most 2^24 records under one AES-GCM sending key (the RFC allows 2^24.5), then a
  KeyUpdate of our own;
- 4.6.3 and 7.2: KeyUpdate from the peer (the next receiving secret; when it asks, a
  KeyUpdate in answer and the next sending secret), and no other handshake message;
- 5.1: handshake messages are neither interleaved with other record types nor continued
  past a KeyUpdate (unexpected_message);
- 6: alerts are two bytes in a record of their own; close_notify ends the peer's data,
  user_canceled is ignored, any other is fatal; our own errors send a fatal alert;
- 7.1 and 7.3: HKDF-Expand-Label, the traffic key and IV of a secret.

Limits (not in the RFC): at most MAX_EMPTY_RECORDS empty records in a row (OpenSSL's own
limit). The cipher suites are those with a 16-byte tag in `SUITES`; lb.tls_io keeps OpenSSL
for any other (and for TLS 1.2). Every refusal is a `TLSRecordError` with the alert that
goes with it; a `Records` that has raised, or has seen close_notify, takes no more input.

This module does no I/O and keeps no clock; one event loop per process uses it (`ActiveKeys`
is not shared between threads).
"""

from __future__ import annotations

import enum
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

__all__ = [
    "HEADER_LENGTH",
    "MAX_CIPHERTEXT",
    "MAX_PLAINTEXT",
    "SUITES",
    "ActiveKeys",
    "AlertDescription",
    "CipherSuite",
    "ContentType",
    "Records",
    "TLSRecordError",
    "count_records",
    "expand_label",
]


class ContentType(enum.IntEnum):
    """RFC 8446 5.1, ContentType."""

    INVALID = 0
    CHANGE_CIPHER_SPEC = 20
    ALERT = 21
    HANDSHAKE = 22
    APPLICATION_DATA = 23


class AlertLevel(enum.IntEnum):
    """RFC 8446 6, AlertLevel."""

    WARNING = 1
    FATAL = 2


class AlertDescription(enum.IntEnum):
    """RFC 8446 6, AlertDescription (those this module sends or names)."""

    CLOSE_NOTIFY = 0
    UNEXPECTED_MESSAGE = 10
    BAD_RECORD_MAC = 20
    RECORD_OVERFLOW = 22
    HANDSHAKE_FAILURE = 40
    BAD_CERTIFICATE = 42
    UNSUPPORTED_CERTIFICATE = 43
    CERTIFICATE_REVOKED = 44
    CERTIFICATE_EXPIRED = 45
    CERTIFICATE_UNKNOWN = 46
    ILLEGAL_PARAMETER = 47
    UNKNOWN_CA = 48
    ACCESS_DENIED = 49
    DECODE_ERROR = 50
    DECRYPT_ERROR = 51
    PROTOCOL_VERSION = 70
    INSUFFICIENT_SECURITY = 71
    INTERNAL_ERROR = 80
    INAPPROPRIATE_FALLBACK = 86
    USER_CANCELED = 90
    MISSING_EXTENSION = 109
    UNSUPPORTED_EXTENSION = 110
    UNRECOGNIZED_NAME = 112
    BAD_CERTIFICATE_STATUS_RESPONSE = 113
    UNKNOWN_PSK_IDENTITY = 115
    CERTIFICATE_REQUIRED = 116
    NO_APPLICATION_PROTOCOL = 120


class HandshakeType(enum.IntEnum):
    """RFC 8446 4, HandshakeType: the one a client may send after the handshake here."""

    KEY_UPDATE = 24


class KeyUpdateRequest(enum.IntEnum):
    """RFC 8446 4.6.3, KeyUpdateRequest."""

    UPDATE_NOT_REQUESTED = 0
    UPDATE_REQUESTED = 1


#: 5.1: "The length MUST NOT exceed 2^14 bytes" (the content of one record).
MAX_PLAINTEXT: Final = 2**14
#: 5.4: "the full encoded TLSInnerPlaintext MUST NOT exceed 2^14 + 1 octets".
MAX_INNER_PLAINTEXT: Final = 2**14 + 1
#: 5.2: "The length MUST NOT exceed 2^14 + 256 bytes" (TLSCiphertext.length).
MAX_CIPHERTEXT: Final = 2**14 + 256
#: 5.1: opaque_type (1), legacy_record_version (2), length (2).
HEADER_LENGTH: Final = 5
#: 5.2: legacy_record_version of every TLS 1.3 record after the ClientHello.
LEGACY_RECORD_VERSION: Final = 0x0303
#: 5.3: "iv_length ... max(8 bytes, N_MIN)" = 12 for the AEADs in SUITES.
IV_LENGTH: Final = 12
#: RFC 5116 5.1 and RFC 8439 2.8: the tag of AES-GCM and ChaCha20-Poly1305.
TAG_LENGTH: Final = 16
#: 5.5: "up to 2^24.5 full-size records ... may be encrypted" with one AES-GCM key; our
#: sending key is updated after 2^24.
KEY_UPDATE_AFTER: Final = 2**24
#: 5.3: "Sequence numbers MUST NOT wrap"; the connection ends before.
SEQUENCE_LIMIT: Final = 2**64 - 1
#: Empty application_data records tolerated in a row (OpenSSL's MAX_EMPTY_RECORDS): each
#: costs a decryption and carries nothing.
MAX_EMPTY_RECORDS: Final = 32
#: 4.6.3: a KeyUpdate is a 4-byte handshake header and its one-byte request.
KEY_UPDATE_LENGTH: Final = 1
HANDSHAKE_HEADER_LENGTH: Final = 4

_HEADER = struct.Struct(">BHH")
#: 5.2: every protected record's opaque_type and legacy_record_version; its length follows.
_APPLICATION_DATA_HEADER = b"\x17\x03\x03"
_INNER_TYPES: dict[int, bytes] = {t: bytes((t,)) for t in ContentType}
_APPLICATION_DATA: Final = int(ContentType.APPLICATION_DATA)
#: The lengths (TLSCiphertext.length) of the records `Records.open` takes on its fast path:
#: an inner plaintext of 2 bytes at least (so content or padding before the type: an empty
#: record is counted on the general path) and at most MAX_INNER_PLAINTEXT (5.4; so within
#: MAX_CIPHERTEXT, 5.2). Longer records, up to MAX_CIPHERTEXT, take the general path, which
#: refuses their plaintext when it is too long.
_FAST_MIN_LENGTH: Final = TAG_LENGTH + 2
_FAST_MAX_LENGTH: Final = MAX_INNER_PLAINTEXT + TAG_LENGTH
#: What an application_data record adds to its content: the inner type, the tag.
_SEALED: Final = 1 + TAG_LENGTH
_INNER_APPLICATION_DATA: Final = _INNER_TYPES[ContentType.APPLICATION_DATA]


_Bytes = bytes | bytearray | memoryview


class _Aead(Protocol):
    def encrypt(self, nonce: bytes, data: _Bytes, associated_data: _Bytes | None) -> bytes: ...

    def decrypt(self, nonce: bytes, data: _Bytes, associated_data: _Bytes | None) -> bytes: ...


@dataclass(frozen=True, slots=True)
class CipherSuite:
    """A TLS 1.3 cipher suite (RFC 8446 B.4): its AEAD, key length and HKDF hash."""

    name: str
    aead: Callable[[bytes], _Aead]
    key_length: int
    hash_name: str  # hashlib's name of the suite's Hash
    hash_length: int


#: By the name OpenSSL reports (SSL_CIPHER_get_name), which is the IANA name in TLS 1.3.
SUITES: Final[dict[str, CipherSuite]] = {
    "TLS_AES_128_GCM_SHA256": CipherSuite("TLS_AES_128_GCM_SHA256", AESGCM, 16, "sha256", 32),
    "TLS_AES_256_GCM_SHA384": CipherSuite("TLS_AES_256_GCM_SHA384", AESGCM, 32, "sha384", 48),
    "TLS_CHACHA20_POLY1305_SHA256": CipherSuite(
        "TLS_CHACHA20_POLY1305_SHA256", ChaCha20Poly1305, 32, "sha256", 32
    ),
}


class TLSRecordError(Exception):
    """A connection that cannot go on: the alert that says why, whether the peer sent it
    (`received`: nothing is sent back) or we found it, and the plaintext of the records
    that came before it in the same input (authenticated, so it is delivered)."""

    def __init__(
        self,
        alert: AlertDescription | int,
        message: str,
        *,
        received: bool = False,
        plaintext: bytes = b"",
    ) -> None:
        super().__init__(message)
        self.alert = alert
        self.message = message
        self.received = received
        self.plaintext = plaintext


def expand_label(secret: bytes, label: bytes, context: bytes, length: int, hash_name: str) -> bytes:
    """HKDF-Expand-Label (RFC 8446 7.1) over HKDF-Expand (RFC 5869 2.3)."""
    key = (label, context, length)
    info = _LABELS.get(key)
    if info is None:
        full = b"tls13 " + label
        info = struct.pack(">HB", length, len(full)) + full + bytes((len(context),)) + context
        if len(_LABELS) < _LABELS_KEPT:
            _LABELS[key] = info
    block = hmac.digest(secret, info + b"\x01", hash_name)
    if len(block) >= length:  # a key, an IV or a next secret: one block
        return block[:length]
    output = block
    counter = 2
    while len(output) < length:
        block = hmac.digest(secret, block + info + bytes((counter,)), hash_name)
        output += block
        counter += 1
    return output[:length]


#: HkdfLabel structures by (label, context, length): the few of the record layer (key, iv,
#: traffic upd for each suite's lengths) are made once, not per connection.
_LABELS: dict[tuple[bytes, bytes, int], bytes] = {}
_LABELS_KEPT = 64


def count_records(data: bytes) -> int | None:
    """How many whole records `data` is, or None when it is not a run of whole records."""
    count = 0
    position = 0
    end = len(data)
    while position < end:
        if end - position < HEADER_LENGTH:
            return None
        position += HEADER_LENGTH + int.from_bytes(data[position + 3 : position + 5], "big")
        count += 1
    return count if position == end else None


class ActiveKeys:
    """The cipher objects of the connections that moved records lately, in two generations.

    A connection makes its cipher object when it next needs it (about 1 us: from the key
    bytes it keeps, Records.read_key/write_key) and is added to `young`; when `young` has
    `limit` connections it becomes `old`, and those in the old `old` that were not used
    meanwhile (not in `young`) drop theirs. So at most
    2 x limit connections hold them (2.3 KiB per direction: 2.4 MiB at most with the default
    limit), a connection in use by fewer than `limit` others keeps them, and a quiet one
    loses them within two generations of others' traffic (a generation is counted in
    connections, not seconds: when every connection is quiet, nothing changes).

    The generations are dicts used as sets: `touch` adds with a subscript store and tests
    with `in`, no method call, and leaves a connection it moves in `old` (the end of the
    generation skips those in `young`), so a quiet device's message, which finds its
    connection in neither, costs one C call here (len) rather than three (add, discard,
    len; bench/README.md). The callers test `records in ACTIVE.young` before they call;
    Records' fast paths do touch's work themselves (a Python call less a quiet message).
    """

    __slots__ = ("limit", "old", "young")

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self.young: dict[Records, None] = {}
        self.old: dict[Records, None] = {}

    def touch(self, records: Records) -> None:
        young = self.young
        if records in young:
            return
        young[records] = None
        if len(young) >= self.limit:
            self.next_generation()

    def next_generation(self) -> None:
        """`young` is full: it becomes `old`, and the connections of the old `old` not used
        since drop their cipher objects."""
        young = self.young
        for stale in self.old.keys() - young.keys():  # the difference made in C
            stale.read_aead = stale.write_aead = None
        self.old = young
        self.young = {}

    def forget(self, records: Records) -> None:
        self.young.pop(records, None)
        self.old.pop(records, None)
        records.read_aead = records.write_aead = None


#: This process's (one event loop's) cipher objects.
ACTIVE = ActiveKeys()

#: Records.state. _OPEN is 0: lb.datapath's short path tests `records.state` for false.
_OPEN, _PEER_CLOSED, _FAILED = 0, 1, 2


class Records:
    """One connection's TLS 1.3 records after the handshake, for either side: `read_secret`
    is the peer's application traffic secret, `write_secret` ours (RFC 8446 7.1); the
    sequence numbers say how many records each side has already protected with them (the
    server's NewSessionTickets, for instance).

    `open(data)` takes ciphertext as it arrives, in any pieces, and returns the plaintext of
    the whole records in it; `peer_closed` turns True at the peer's close_notify. `seal(data)`
    returns records for `data`. `take_output()` returns records made while reading (the
    answer to a KeyUpdate that asked for one), to be sent before anything else.

    Both have a fast path for the steady relay, one whole application_data record per read
    and one record per write, that makes the general path's checks in fewer steps (about
    250 opcodes a message echoed, against 430; bench/README.md); tests/test_lb_tls_relay.py
    compares the two on real records.
    """

    __slots__ = (
        "empty_records",
        "handshake",
        "incoming",
        "output",
        "read_aead",
        "read_iv",
        "read_key",
        "read_secret",
        "read_seq",
        "state",
        "suite",
        "write_aead",
        "write_iv",
        "write_key",
        "write_secret",
        "write_seq",
    )

    def __init__(
        self,
        suite: CipherSuite,
        read_secret: bytes,
        write_secret: bytes,
        *,
        read_seq: int = 0,
        write_seq: int = 0,
    ) -> None:
        if len(read_secret) != suite.hash_length or len(write_secret) != suite.hash_length:
            raise ValueError(f"{suite.name} secrets are {suite.hash_length} bytes")
        self.suite = suite
        # The secrets only make the next keys (KeyUpdate); the keys' bytes are kept so that a
        # connection whose cipher objects ActiveKeys let go makes them again without the
        # derivation (~100 bytes a connection; 2.4 -> 0.8 us a direction, and a quiet
        # device's every message needs both again).
        self.read_secret = read_secret
        self.read_iv = self._iv(read_secret)
        self.read_key = self._key_bytes(read_secret)
        self.read_seq = read_seq
        self.write_secret = write_secret
        self.write_iv = self._iv(write_secret)
        self.write_key = self._key_bytes(write_secret)
        self.write_seq = write_seq
        self.read_aead: _Aead | None = None
        self.write_aead: _Aead | None = None
        self.incoming: bytearray | None = None  # a record begun in an earlier `open`
        self.handshake: bytes | None = None  # a handshake message begun in an earlier record
        self.output: bytes | None = None
        self.empty_records = 0
        self.state = _OPEN

    @property
    def peer_closed(self) -> bool:
        return self.state == _PEER_CLOSED

    # -- keys ------------------------------------------------------------------------------

    def _iv(self, secret: bytes) -> int:
        suite = self.suite
        return int.from_bytes(expand_label(secret, b"iv", b"", IV_LENGTH, suite.hash_name), "big")

    def _key_bytes(self, secret: bytes) -> bytes:
        suite = self.suite
        return expand_label(secret, b"key", b"", suite.key_length, suite.hash_name)

    def _next_secret(self, secret: bytes) -> bytes:
        """RFC 8446 7.2: application_traffic_secret_N+1."""
        suite = self.suite
        return expand_label(secret, b"traffic upd", b"", suite.hash_length, suite.hash_name)

    def _update_read_key(self) -> None:
        self.read_secret = self._next_secret(self.read_secret)
        self.read_iv = self._iv(self.read_secret)
        self.read_key = self._key_bytes(self.read_secret)
        self.read_seq = 0
        self.read_aead = None

    def _update_write_key(self) -> bytes:
        """Our KeyUpdate (update_not_requested), sealed with the current key; the next
        records use the next one."""
        message = bytes((HandshakeType.KEY_UPDATE, 0, 0, KEY_UPDATE_LENGTH)) + bytes(
            (KeyUpdateRequest.UPDATE_NOT_REQUESTED,)
        )
        record = self._seal(message, ContentType.HANDSHAKE)
        self.write_secret = self._next_secret(self.write_secret)
        self.write_iv = self._iv(self.write_secret)
        self.write_key = self._key_bytes(self.write_secret)
        self.write_seq = 0
        self.write_aead = None
        return record

    def _read_cipher(self) -> _Aead:
        """The reading cipher object, made again from the key's bytes if ActiveKeys let it
        go; the connection counts as in use."""
        aead = self.read_aead
        if aead is None:
            aead = self.read_aead = self.suite.aead(self.read_key)
        if self not in ACTIVE.young:  # ActiveKeys.touch's first test, without its call
            ACTIVE.touch(self)
        return aead

    def _write_cipher(self) -> _Aead:
        """The writing cipher object, as `_read_cipher`."""
        aead = self.write_aead
        if aead is None:
            aead = self.write_aead = self.suite.aead(self.write_key)
        if self not in ACTIVE.young:  # ActiveKeys.touch's first test, without its call
            ACTIVE.touch(self)
        return aead

    # -- writing ---------------------------------------------------------------------------

    def seal(self, data: bytes | memoryview) -> bytes:
        """Records for `data` (at most MAX_PLAINTEXT bytes each), behind any records made
        while reading that were not taken yet (a KeyUpdate goes before the data after it)."""
        size = len(data)
        seq = self.write_seq
        if size > MAX_PLAINTEXT or seq >= KEY_UPDATE_AFTER or self.output is not None:
            return self._seal_all(data)
        # One record under the current key (a relayed message): `_seal` and `_write_cipher`
        # written out.
        aead = self.write_aead
        if aead is None:
            aead = self.write_aead = self.suite.aead(self.write_key)
        young = ACTIVE.young  # ActiveKeys.touch written out
        if self not in young:
            young[self] = None
            if len(young) >= ACTIVE.limit:
                ACTIVE.next_generation()
        header = _HEADER.pack(_APPLICATION_DATA, LEGACY_RECORD_VERSION, size + _SEALED)
        self.write_seq = seq + 1
        return header + aead.encrypt(
            (self.write_iv ^ seq).to_bytes(IV_LENGTH),
            b"".join((data, _INNER_APPLICATION_DATA)),
            header,
        )

    def _seal_all(self, data: bytes | memoryview) -> bytes:
        """`seal` where it takes more than one record: the records made while reading first,
        records of MAX_PLAINTEXT bytes, our KeyUpdate when the key has sealed enough."""
        if self.output is not None:
            return self.take_output() + self.seal(data)
        if len(data) <= MAX_PLAINTEXT:
            return self._seal_application_data(data)
        view = memoryview(data)
        return b"".join(
            self._seal_application_data(view[start : start + MAX_PLAINTEXT])
            for start in range(0, len(data), MAX_PLAINTEXT)
        )

    def _seal_application_data(self, data: bytes | memoryview) -> bytes:
        if self.write_seq >= KEY_UPDATE_AFTER:
            return self._update_write_key() + self._seal(data, ContentType.APPLICATION_DATA)
        return self._seal(data, ContentType.APPLICATION_DATA)

    def _seal(self, content: bytes | memoryview, content_type: int) -> bytes:
        aead = self.write_aead
        if aead is None or self not in ACTIVE.young:
            aead = self._write_cipher()
        inner = b"".join((content, _INNER_TYPES[content_type]))
        header = _HEADER.pack(_APPLICATION_DATA, LEGACY_RECORD_VERSION, len(inner) + TAG_LENGTH)
        nonce = (self.write_iv ^ self.write_seq).to_bytes(IV_LENGTH)
        self.write_seq += 1
        return header + aead.encrypt(nonce, inner, header)

    def close_notify(self) -> bytes:
        """Our close_notify alert (RFC 8446 6.1)."""
        return self._seal(
            bytes((AlertLevel.WARNING, AlertDescription.CLOSE_NOTIFY)), ContentType.ALERT
        )

    def alert(self, description: AlertDescription | int) -> bytes:
        """A fatal alert record (RFC 8446 6.2): the last thing sent on the connection."""
        return self._seal(bytes((AlertLevel.FATAL, description)), ContentType.ALERT)

    def take_output(self) -> bytes:
        output = self.output
        if output is None:
            return b""
        self.output = None
        return output

    def release(self) -> None:
        """The connection is over: its cipher objects go now rather than when they age out
        of ACTIVE."""
        ACTIVE.forget(self)

    # -- reading ---------------------------------------------------------------------------

    def open(self, data: bytes | bytearray | memoryview) -> bytes | memoryview:
        """The plaintext of the whole records in what came so far (one record's is a view
        of its decryption, not a copy). Raises TLSRecordError; after that, or after
        close_notify, input is ignored."""
        if self.state != _OPEN:
            return b""
        parts: list[bytes | memoryview] = []
        try:
            # The steady relay's case, one whole application_data record and nothing more
            # (a quiet device's message): its header is checked in place and its content
            # returned without the general path's framing (~140 opcodes a record). Anything
            # else (a partial record, several, a header the general path refuses, a record
            # that could be empty or too long inside) takes the general path, which makes
            # the same checks and raises the same errors.
            length = len(data) - HEADER_LENGTH
            seq = self.read_seq
            if (
                _FAST_MIN_LENGTH <= length <= _FAST_MAX_LENGTH
                and data[3] << 8 | data[4] == length
                and data[:3] == _APPLICATION_DATA_HEADER
                and self.incoming is None
                and self.handshake is None
                and seq < SEQUENCE_LIMIT
            ):
                aead = self.read_aead  # `_read_cipher` written out
                if aead is None:
                    aead = self.read_aead = self.suite.aead(self.read_key)
                young = ACTIVE.young  # ActiveKeys.touch written out
                if self not in young:
                    young[self] = None
                    if len(young) >= ACTIVE.limit:
                        ACTIVE.next_generation()
                try:
                    inner = aead.decrypt(
                        (self.read_iv ^ seq).to_bytes(IV_LENGTH),
                        data[HEADER_LENGTH:],
                        data[:HEADER_LENGTH],
                    )
                except InvalidTag:
                    raise TLSRecordError(
                        AlertDescription.BAD_RECORD_MAC, "record failed authentication"
                    ) from None
                self.read_seq = seq + 1
                if inner[-1] == _APPLICATION_DATA:  # at least one byte before it: content
                    self.empty_records = 0
                    return memoryview(inner)[:-1]
                self._read_inner(inner, parts)  # padding, an alert, a KeyUpdate, ...
            else:
                self._open(memoryview(data), parts)
        except TLSRecordError as error:
            self.state = _FAILED
            self.incoming = None
            error.plaintext = b"".join(parts)
            raise
        if not parts:
            return b""
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def _open(self, view: memoryview, parts: list[bytes | memoryview]) -> None:
        position = 0
        end = len(view)
        incoming = self.incoming
        if incoming is not None:
            # Finish the record an earlier call began: its header first, then its body.
            if len(incoming) < HEADER_LENGTH:
                take = HEADER_LENGTH - len(incoming)
                incoming += view[:take]
                position = min(take, end)
                if len(incoming) < HEADER_LENGTH:
                    return
            total = HEADER_LENGTH + self._record_length(incoming)
            take = total - len(incoming)
            incoming += view[position : position + take]
            position = min(position + take, end)
            if len(incoming) < total:
                return
            self.incoming = None
            with memoryview(incoming) as record:
                self._open_record(bytes(record[:HEADER_LENGTH]), record[HEADER_LENGTH:], parts)
            if self.state != _OPEN:
                return
        while end - position >= HEADER_LENGTH:
            header = bytes(view[position : position + HEADER_LENGTH])
            total = HEADER_LENGTH + self._record_length(header)
            if end - position < total:
                break
            self._open_record(header, view[position + HEADER_LENGTH : position + total], parts)
            position += total
            if self.state != _OPEN:
                return
        if position < end:
            rest = view[position:]
            if len(rest) >= HEADER_LENGTH:
                self._record_length(rest)  # a bad header fails now, before it is kept
            self.incoming = bytearray(rest)

    def _record_length(self, header: bytes | bytearray | memoryview) -> int:
        """The checked length field of a record header (RFC 8446 5.1, 5.2)."""
        outer_type: int
        version: int
        length: int
        outer_type, version, length = _HEADER.unpack_from(header)
        if outer_type != ContentType.APPLICATION_DATA:
            name = _name(ContentType, outer_type)
            raise TLSRecordError(
                AlertDescription.UNEXPECTED_MESSAGE,
                f"unprotected {name} record after the handshake",
            )
        if version != LEGACY_RECORD_VERSION:
            raise TLSRecordError(
                AlertDescription.DECODE_ERROR, f"record version 0x{version:04x}, not 0x0303"
            )
        if length > MAX_CIPHERTEXT:
            raise TLSRecordError(
                AlertDescription.RECORD_OVERFLOW,
                f"record of {length} bytes (at most {MAX_CIPHERTEXT})",
            )
        if length <= TAG_LENGTH:
            raise TLSRecordError(
                AlertDescription.DECODE_ERROR, f"record of {length} bytes holds no content type"
            )
        return length

    def _open_record(
        self, header: bytes, body: memoryview, parts: list[bytes | memoryview]
    ) -> None:
        aead = self.read_aead
        if aead is None or self not in ACTIVE.young:
            aead = self._read_cipher()
        if self.read_seq >= SEQUENCE_LIMIT:
            raise TLSRecordError(AlertDescription.INTERNAL_ERROR, "record sequence exhausted")
        nonce = (self.read_iv ^ self.read_seq).to_bytes(IV_LENGTH)
        try:
            inner = aead.decrypt(nonce, body, header)
        except InvalidTag:
            raise TLSRecordError(
                AlertDescription.BAD_RECORD_MAC, "record failed authentication"
            ) from None
        self.read_seq += 1
        self._read_inner(inner, parts)

    def _read_inner(self, inner: bytes, parts: list[bytes | memoryview]) -> None:
        """What an authenticated record holds (RFC 8446 5.4): its content by inner type."""
        if len(inner) > MAX_INNER_PLAINTEXT:
            raise TLSRecordError(
                AlertDescription.RECORD_OVERFLOW, f"record plaintext of {len(inner)} bytes"
            )
        content_type = inner[-1]
        if content_type == 0:  # padding (5.4): the type is the last byte that is not zero
            inner = inner.rstrip(b"\x00")
            if not inner:
                raise TLSRecordError(AlertDescription.UNEXPECTED_MESSAGE, "record of padding only")
            content_type = inner[-1]
        content = memoryview(inner)[:-1]
        if content_type == ContentType.APPLICATION_DATA:
            if self.handshake is not None:
                raise TLSRecordError(
                    AlertDescription.UNEXPECTED_MESSAGE,
                    "application data inside a handshake message",
                )
            if content:
                parts.append(content)
                self.empty_records = 0
                return
            self.empty_records += 1
            if self.empty_records > MAX_EMPTY_RECORDS:
                raise TLSRecordError(
                    AlertDescription.UNEXPECTED_MESSAGE,
                    f"more than {MAX_EMPTY_RECORDS} empty records in a row",
                )
            return
        self.empty_records = 0
        if content_type == ContentType.ALERT:
            self._read_alert(content)
        elif content_type == ContentType.HANDSHAKE:
            self._read_handshake(bytes(content))
        else:
            raise TLSRecordError(
                AlertDescription.UNEXPECTED_MESSAGE,
                f"{_name(ContentType, content_type)} record after the handshake",
            )

    def _read_alert(self, content: memoryview) -> None:
        if self.handshake is not None:
            raise TLSRecordError(
                AlertDescription.UNEXPECTED_MESSAGE, "alert inside a handshake message"
            )
        if len(content) != 2:  # 5.1: "Alert messages MUST NOT be fragmented ... coalesced"
            raise TLSRecordError(
                AlertDescription.DECODE_ERROR, f"alert record of {len(content)} bytes"
            )
        description = content[1]
        if description == AlertDescription.CLOSE_NOTIFY:
            self.state = _PEER_CLOSED
            self.incoming = None
            return
        if description == AlertDescription.USER_CANCELED:
            return  # 6.1: a close_notify follows
        raise TLSRecordError(
            description, f"{_name(AlertDescription, description)} alert", received=True
        )

    def _read_handshake(self, content: bytes) -> None:
        """KeyUpdate, the only handshake message a client sends after the handshake here
        (lb never asks for post-handshake authentication)."""
        if not content:  # 5.1: "MUST NOT send zero-length fragments of Handshake types"
            raise TLSRecordError(AlertDescription.UNEXPECTED_MESSAGE, "empty handshake record")
        message = self.handshake + content if self.handshake is not None else content
        self.handshake = None
        if message[0] != HandshakeType.KEY_UPDATE:
            raise TLSRecordError(
                AlertDescription.UNEXPECTED_MESSAGE,
                f"handshake message type {message[0]} after the handshake",
            )
        if len(message) >= HANDSHAKE_HEADER_LENGTH:
            length = int.from_bytes(message[1:4], "big")
            if length != KEY_UPDATE_LENGTH:
                raise TLSRecordError(AlertDescription.DECODE_ERROR, f"KeyUpdate of {length} bytes")
        whole = HANDSHAKE_HEADER_LENGTH + KEY_UPDATE_LENGTH
        if len(message) < whole:
            self.handshake = message  # the rest comes in the next record
            return
        if len(message) > whole:  # 5.1: handshake messages MUST NOT span key changes
            raise TLSRecordError(
                AlertDescription.UNEXPECTED_MESSAGE, "data after a KeyUpdate in its record"
            )
        request = message[4]
        if request not in (
            KeyUpdateRequest.UPDATE_NOT_REQUESTED,
            KeyUpdateRequest.UPDATE_REQUESTED,
        ):
            raise TLSRecordError(
                AlertDescription.ILLEGAL_PARAMETER, f"KeyUpdate request_update {request}"
            )
        self._update_read_key()
        if request == KeyUpdateRequest.UPDATE_REQUESTED:
            answer = self._update_write_key()
            self.output = answer if self.output is None else self.output + answer


def _name(enumeration: type[enum.IntEnum], value: int) -> str:
    try:
        return enumeration(value).name.lower()
    except ValueError:
        return f"type {value}" if enumeration is ContentType else f"alert {value}"
