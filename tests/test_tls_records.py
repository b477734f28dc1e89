"""lb.tls_records: RFC 8448's vectors, two Records facing each other (whole, byte by byte,
with trailing bytes, and hypothesis splits), and every refusal, with records forged by
hand (AES-GCM over an inner plaintext this file builds, independent of `seal`)."""

from __future__ import annotations

import itertools
import os
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from hypothesis import given, settings
from hypothesis import strategies as st

from lb import tls_records
from lb.tls_records import (
    KEY_UPDATE_AFTER,
    MAX_CIPHERTEXT,
    MAX_EMPTY_RECORDS,
    MAX_PLAINTEXT,
    SUITES,
    ActiveKeys,
    AlertDescription,
    Records,
    TLSRecordError,
    count_records,
    expand_label,
)

AES128 = SUITES["TLS_AES_128_GCM_SHA256"]

# RFC 8448 section 3 ("Simple 1-RTT Handshake"): the server's handshake traffic secret and
# the key and IV derived from it; its application traffic secret, key and IV; and the
# application data it sends (the bytes 0x00..0x31) as record 1, after its NewSessionTicket.
RFC8448_SERVER_HS_SECRET = bytes.fromhex(
    "b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38"
)
RFC8448_SERVER_HS_KEY = bytes.fromhex("3fce516009c21727d0f2e4e86ee403bc")
RFC8448_SERVER_HS_IV = bytes.fromhex("5d313eb2671276ee13000b30")
RFC8448_SERVER_APP_SECRET = bytes.fromhex(
    "a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643"
)
RFC8448_SERVER_APP_KEY = bytes.fromhex("9f02283b6c9c07efc26bb9f2ac92e356")
RFC8448_SERVER_APP_IV = bytes.fromhex("cf782b88dd83549aadf1e984")
RFC8448_PAYLOAD = bytes(range(50))
RFC8448_SERVER_RECORD_1 = bytes.fromhex(
    "17030300432e937e11ef4ac740e538ad36005fc4a46932fc3225d05f82aa1b36e30efaf97d90e6dffc"
    "602dcb501a59a8fcc49c4bf2e5f0a21c0047c2abf332540dd032e167c2955d"
)


def test_rfc8448_traffic_keys() -> None:
    assert expand_label(RFC8448_SERVER_HS_SECRET, b"key", b"", 16, "sha256") == (
        RFC8448_SERVER_HS_KEY
    )
    assert expand_label(RFC8448_SERVER_HS_SECRET, b"iv", b"", 12, "sha256") == (
        RFC8448_SERVER_HS_IV
    )
    assert expand_label(RFC8448_SERVER_APP_SECRET, b"key", b"", 16, "sha256") == (
        RFC8448_SERVER_APP_KEY
    )
    assert expand_label(RFC8448_SERVER_APP_SECRET, b"iv", b"", 12, "sha256") == (
        RFC8448_SERVER_APP_IV
    )


@pytest.mark.parametrize("length", [1, 12, 16, 32, 33, 64, 100])
def test_expand_label_is_hkdf_expand_at_every_length(length: int) -> None:
    """One HMAC block (the record layer's keys and IVs) and several, against cryptography's
    HKDF-Expand over the same HkdfLabel; the cached labels give the same bytes again."""
    secret = RFC8448_SERVER_APP_SECRET
    full = b"tls13 custom"
    info = struct.pack(">HB", length, len(full)) + full + b"\x03abc"
    expected = HKDFExpand(hashes.SHA256(), length, info).derive(secret)
    assert expand_label(secret, b"custom", b"abc", length, "sha256") == expected
    assert expand_label(secret, b"custom", b"abc", length, "sha256") == expected


def test_rfc8448_server_application_record() -> None:
    other = os.urandom(32)
    server = Records(AES128, other, RFC8448_SERVER_APP_SECRET, write_seq=1)
    assert server.seal(RFC8448_PAYLOAD) == RFC8448_SERVER_RECORD_1
    client = Records(AES128, RFC8448_SERVER_APP_SECRET, other, read_seq=1)
    assert client.open(RFC8448_SERVER_RECORD_1) == RFC8448_PAYLOAD
    # whole, byte by byte, and with the start of the next record behind it
    client = Records(AES128, RFC8448_SERVER_APP_SECRET, other, read_seq=1)
    assert b"".join(client.open(bytes([b])) for b in RFC8448_SERVER_RECORD_1) == RFC8448_PAYLOAD
    client = Records(AES128, RFC8448_SERVER_APP_SECRET, other, read_seq=1)
    assert client.open(RFC8448_SERVER_RECORD_1 + b"\x17\x03") == RFC8448_PAYLOAD
    assert client.incoming == bytearray(b"\x17\x03")


# -- two Records facing each other ------------------------------------------------------------


def pair(suite: tls_records.CipherSuite = AES128) -> tuple[Records, Records]:
    """(server, client): each reads what the other writes."""
    client_secret, server_secret = os.urandom(suite.hash_length), os.urandom(suite.hash_length)
    server = Records(suite, client_secret, server_secret)
    client = Records(suite, server_secret, client_secret)
    return server, client


def forge(
    records: Records,
    inner: bytes,
    *,
    outer_type: int = 23,
    version: int = 0x0303,
    length: int | None = None,
) -> bytes:
    """One record of `records`' next write, over `inner` (content, type, padding) as given,
    sealed here with AES-GCM directly."""
    suite = records.suite
    assert suite.aead is AESGCM
    key = expand_label(records.write_secret, b"key", b"", suite.key_length, suite.hash_name)
    size = len(inner) + 16 if length is None else length
    header = struct.pack(">BHH", outer_type, version, size)
    nonce = (records.write_iv ^ records.write_seq).to_bytes(12, "big")
    records.write_seq += 1
    return header + AESGCM(key).encrypt(nonce, inner, header)


@pytest.mark.parametrize("name", sorted(SUITES))
def test_round_trip_every_suite(name: str) -> None:
    server, client = pair(SUITES[name])
    assert server.open(client.seal(b"CONNECT")) == b"CONNECT"
    assert client.open(server.seal(b"CONNACK")) == b"CONNACK"
    big = os.urandom(3 * MAX_PLAINTEXT + 7)
    sealed = server.seal(big)
    assert count_records(sealed) == 4
    assert client.open(sealed) == big


def test_byte_by_byte_and_trailing_bytes() -> None:
    server, client = pair()
    stream = client.seal(b"one") + client.seal(b"") + client.seal(b"two")
    assert b"".join(server.open(stream[i : i + 1]) for i in range(len(stream))) == b"onetwo"
    server, client = pair()
    first, second = client.seal(b"first"), client.seal(b"second")
    assert server.open(first + second[:3]) == b"first"
    assert server.open(second[3:]) == b"second"
    assert server.incoming is None


@settings(max_examples=60, deadline=None)
@given(
    messages=st.lists(st.binary(max_size=40000), min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=200000), max_size=8),
)
def test_any_split_gives_the_same_plaintext(messages: list[bytes], cuts: list[int]) -> None:
    server, client = pair()
    stream = b"".join(client.seal(m) for m in messages)
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    received = b"".join(server.open(stream[a:b]) for a, b in itertools.pairwise(points))
    assert received == b"".join(messages)


def test_padding_is_removed() -> None:
    server, client = pair()
    record = forge(client, b"padded" + b"\x17" + bytes(100))
    assert server.open(record) == b"padded"


# -- KeyUpdate ----------------------------------------------------------------------------------


def key_update(request: int) -> bytes:
    return bytes((24, 0, 0, 1, request)) + b"\x16"  # message, then the inner type


def test_key_update_requested_is_answered_and_both_sides_go_on() -> None:
    server, client = pair()
    old_read = server.read_secret
    assert server.open(forge(client, key_update(1))) == b""
    client.write_secret = client._next_secret(client.write_secret)  # what the client did
    client.write_iv, client.write_seq, client.write_aead = client._iv(client.write_secret), 0, None
    client.write_key = client._key_bytes(client.write_secret)
    assert server.read_secret != old_read and server.read_seq == 0
    answer = server.take_output()
    assert count_records(answer) == 1
    assert client.open(answer) == b""  # the client reads our KeyUpdate and updates
    assert client.read_seq == 0
    assert server.open(client.seal(b"after")) == b"after"
    assert client.open(server.seal(b"back")) == b"back"


def test_answer_goes_before_data_sealed_after_it() -> None:
    server, client = pair()
    server.open(forge(client, key_update(1)))
    output = server.seal(b"data")  # the KeyUpdate not taken yet goes first
    assert count_records(output) == 2
    assert client.open(output) == b"data"


def test_key_update_not_requested_is_not_answered() -> None:
    server, client = pair()
    server.open(forge(client, key_update(0)))
    assert server.take_output() == b""
    assert server.read_seq == 0


def test_key_update_split_across_records() -> None:
    server, client = pair()
    server.open(forge(client, bytes((24, 0)) + b"\x16") + forge(client, bytes((0, 1, 1)) + b"\x16"))
    assert server.read_seq == 0 and server.handshake is None
    assert count_records(server.take_output()) == 1


def test_our_sending_key_is_updated_after_the_aes_gcm_limit() -> None:
    server, client = pair()
    server.write_seq = client.read_seq = KEY_UPDATE_AFTER
    output = server.seal(b"x")
    assert count_records(output) == 2  # our KeyUpdate, then the data under the next key
    assert server.write_seq == 1
    assert client.open(output) == b"x"


# -- alerts -----------------------------------------------------------------------------------


def test_close_notify_ends_the_data_after_what_came_before_it() -> None:
    server, client = pair()
    stream = client.seal(b"last words") + client.close_notify() + client.seal(b"ignored")
    assert server.open(stream) == b"last words"
    assert server.peer_closed
    assert server.open(client.seal(b"more")) == b""
    assert client.open(server.close_notify()) == b"" and client.peer_closed


def test_user_canceled_is_ignored() -> None:
    server, client = pair()
    assert server.open(forge(client, bytes((1, 90, 21))) + client.seal(b"go")) == b"go"


def test_fatal_alert_from_the_peer() -> None:
    server, client = pair()
    with pytest.raises(TLSRecordError) as caught:
        server.open(client.seal(b"before") + client.alert(AlertDescription.DECRYPT_ERROR))
    assert caught.value.received
    assert caught.value.alert == AlertDescription.DECRYPT_ERROR
    assert caught.value.plaintext == b"before"
    assert "decrypt_error" in caught.value.message


# -- refusals -----------------------------------------------------------------------------------


def refusal(data: bytes, alert: AlertDescription, server: Records) -> TLSRecordError:
    with pytest.raises(TLSRecordError) as caught:
        server.open(data)
    assert caught.value.alert == alert, caught.value.message
    assert not caught.value.received
    assert server.open(b"\x17\x03\x03\x00\x20" + bytes(32)) == b""  # no more input taken
    return caught.value


def test_tampered_record() -> None:
    server, client = pair()
    record = bytearray(client.seal(b"payload"))
    record[-1] ^= 1
    refusal(bytes(record), AlertDescription.BAD_RECORD_MAC, server)


def test_record_from_the_wrong_sequence_number() -> None:
    server, client = pair()
    client.seal(b"lost")
    refusal(client.seal(b"next"), AlertDescription.BAD_RECORD_MAC, server)


@pytest.mark.parametrize(
    ("header", "alert"),
    [
        (b"\x15\x03\x03\x00\x02", AlertDescription.UNEXPECTED_MESSAGE),  # plaintext alert
        (b"\x14\x03\x03\x00\x01", AlertDescription.UNEXPECTED_MESSAGE),  # change_cipher_spec
        (b"\x16\x03\x03\x00\x20", AlertDescription.UNEXPECTED_MESSAGE),  # plaintext handshake
        (b"\x17\x03\x01\x00\x20", AlertDescription.DECODE_ERROR),  # record version
        (b"\x17\x03\x03\x41\x01", AlertDescription.RECORD_OVERFLOW),  # 2^14 + 257
        (b"\x17\x03\x03\x00\x10", AlertDescription.DECODE_ERROR),  # a tag and no type
    ],
)
def test_bad_headers_fail_before_their_body_arrives(header: bytes, alert: AlertDescription) -> None:
    server, _client = pair()
    refusal(header, alert, server)
    server, client = pair()
    with pytest.raises(TLSRecordError) as caught:
        server.open(client.seal(b"ok") + header)
    assert caught.value.alert == alert
    assert caught.value.plaintext == b"ok"


def test_largest_record_and_the_inner_plaintext_limit() -> None:
    server, client = pair()
    content = os.urandom(MAX_PLAINTEXT)
    record = forge(client, content + b"\x17" + bytes(MAX_CIPHERTEXT - 16 - MAX_PLAINTEXT - 1))
    assert len(record) == 5 + MAX_CIPHERTEXT
    with pytest.raises(TLSRecordError) as caught:
        server.open(record)  # inner plaintext of 2^14 + 240 bytes: too long by 5.4
    assert caught.value.alert == AlertDescription.RECORD_OVERFLOW
    server, client = pair()
    assert server.open(forge(client, content + b"\x17")) == content


def test_padding_only() -> None:
    server, client = pair()
    refusal(forge(client, bytes(20)), AlertDescription.UNEXPECTED_MESSAGE, server)


@pytest.mark.parametrize("inner_type", [0x14, 0x18, 0xFF])
def test_other_inner_types(inner_type: int) -> None:
    server, client = pair()
    refusal(
        forge(client, b"\x01" + bytes((inner_type,))), AlertDescription.UNEXPECTED_MESSAGE, server
    )


def test_too_many_empty_records() -> None:
    server, client = pair()
    stream = b"".join(client.seal(b"") for _ in range(MAX_EMPTY_RECORDS))
    assert server.open(stream + client.seal(b"x") + client.seal(b"")) == b"x"  # reset by data
    stream = b"".join(client.seal(b"") for _ in range(MAX_EMPTY_RECORDS + 1))
    refusal(stream, AlertDescription.UNEXPECTED_MESSAGE, server)


@pytest.mark.parametrize(
    ("inner", "alert"),
    [
        (b"\x16", AlertDescription.UNEXPECTED_MESSAGE),  # empty handshake record
        (bytes((4, 0, 0, 1, 0)) + b"\x16", AlertDescription.UNEXPECTED_MESSAGE),  # ticket
        (bytes((13, 0, 0, 1, 0)) + b"\x16", AlertDescription.UNEXPECTED_MESSAGE),  # cert req
        (bytes((24, 0, 0, 2, 0, 0)) + b"\x16", AlertDescription.DECODE_ERROR),
        (bytes((24, 0, 0, 1, 2)) + b"\x16", AlertDescription.ILLEGAL_PARAMETER),
        (bytes((24, 0, 0, 1, 0, 24)) + b"\x16", AlertDescription.UNEXPECTED_MESSAGE),  # spans
        (bytes((1, 0, 0)) + b"\x15", AlertDescription.DECODE_ERROR),  # alert of 3 bytes
        (bytes((1,)) + b"\x15", AlertDescription.DECODE_ERROR),  # alert of 1 byte
    ],
)
def test_bad_handshake_and_alert_content(inner: bytes, alert: AlertDescription) -> None:
    server, client = pair()
    refusal(forge(client, inner), alert, server)


def test_no_interleaving_inside_a_handshake_message() -> None:
    server, client = pair()
    server.open(forge(client, bytes((24, 0)) + b"\x16"))
    refusal(client.seal(b"data"), AlertDescription.UNEXPECTED_MESSAGE, server)
    server, client = pair()
    server.open(forge(client, bytes((24, 0)) + b"\x16"))
    refusal(forge(client, bytes((1, 0, 21))), AlertDescription.UNEXPECTED_MESSAGE, server)


def test_secrets_must_fit_the_suite() -> None:
    with pytest.raises(ValueError, match="48 bytes"):
        Records(SUITES["TLS_AES_256_GCM_SHA384"], os.urandom(32), os.urandom(32))


# -- count_records and ActiveKeys -------------------------------------------------------------


def test_count_records() -> None:
    _server, client = pair()
    records = client.seal(b"a") + client.seal(b"bb")
    assert count_records(b"") == 0
    assert count_records(records) == 2
    assert count_records(records[:-1]) is None
    assert count_records(records + b"\x17\x03") is None


def test_active_keys_drop_cipher_objects_of_quiet_connections() -> None:
    keys = ActiveKeys(limit=2)
    pairs = [pair() for _ in range(5)]
    original, tls_records.ACTIVE = tls_records.ACTIVE, keys
    try:
        for server, client in pairs:
            server.open(client.seal(b"x"))
        quiet = pairs[0][0]
        assert quiet.read_aead is None  # aged out
        busy = pairs[-1][0]
        assert busy.read_aead is not None
        assert busy.open(pairs[-1][1].seal(b"again")) == b"again"
        busy.release()
        assert busy.read_aead is None and busy not in keys.young | keys.old
        assert quiet.open(pairs[0][1].seal(b"back")) == b"back"  # made again when needed
        assert len(keys.young) + len(keys.old) <= 2 * keys.limit
    finally:
        tls_records.ACTIVE = original


def test_active_keys_keep_a_connection_used_again_in_the_old_generation() -> None:
    """A connection of the old generation used again before the generation ends keeps its
    cipher objects (it is in the young one, though still in the old); the others of the old
    generation lose theirs; the connections holding cipher objects stay within 2 x limit."""
    keys = ActiveKeys(limit=4)
    pairs = [pair() for _ in range(40)]
    # The clients' records made first, under the process's ActiveKeys: only the servers'
    # reads count in `keys`.
    records = [[client.seal(b"%d" % n) for n in range(5)] for _, client in pairs]
    servers = [server for server, _ in pairs]
    read = [0] * len(servers)

    def read_next(number: int) -> None:
        sequence = read[number]
        read[number] += 1
        assert servers[number].open(records[number][sequence]) == b"%d" % sequence

    original, tls_records.ACTIVE = tls_records.ACTIVE, keys
    try:
        for number in range(4):  # one generation
            read_next(number)
        assert set(keys.old) == set(servers[:4]) and not keys.young
        read_next(0)  # young again, still in old
        for number in range(4, 7):  # the young generation fills up: the old one ends
            read_next(number)
        assert servers[0].read_aead is not None
        assert all(server.read_aead is None for server in servers[1:4])
        for _ in range(3):
            for number in range(len(servers)):
                read_next(number)
                holding = [s for s in servers if s.read_aead is not None]
                assert len(holding) <= 2 * keys.limit
                assert set(holding) <= set(keys.young) | set(keys.old)
    finally:
        tls_records.ACTIVE = original
