"""lb.tls_records' fast path for the steady relay (Records.open of a read that is one whole
application_data record, Records.seal of one record) and every way off it, with the records
of real TLS 1.3 connections: lb's own server context taken over by lb.tls_io (the setup of
tests/test_lb_tls_takeover.py), the standard library's client on the system OpenSSL over
memory BIOs, and openssl s_client over a socket for its KeyUpdates. What no OpenSSL client
sends (padding, an inner plaintext over the limit, empty records, a NewSessionTicket from the
client) is sealed here with the connection's real client key.

Which path a read took is seen through sys.setprofile: the functions of lb.tls_records it
called (the fast path calls none of `_open`, `_open_record`, `_record_length`, and
`_read_inner` only for a record that turns out not to be application data). A hypothesis
test feeds the same real records, cut and altered, to two Records with the connection's
keys, one read per record and in reads that force the general path, and finds the same
plaintext, error and state."""

from __future__ import annotations

import itertools
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lb import tls_io, tls_records
from lb.tls_records import (
    HEADER_LENGTH,
    MAX_CIPHERTEXT,
    MAX_EMPTY_RECORDS,
    MAX_PLAINTEXT,
    SEQUENCE_LIMIT,
    AlertDescription,
    Records,
    TLSRecordError,
    count_records,
)
from tests.harness import client_context
from tests.pki import TestPKI
from tests.test_lb_tls_takeover import Client, Output, bind_context, handshake, s_client, take_over

pytestmark = pytest.mark.timeout(60)

#: The general path's functions: a read on the fast path calls none of them.
GENERAL = {"_open", "_open_record", "_record_length"}
#: What an authenticated record holds, when it is not plain application data.
INNER = "_read_inner"
#: All a read on the fast path calls (the cipher object made again, ActiveKeys touched).
FAST = {"open", "_read_cipher", "touch"}
#: An MQTT PUBLISH (QoS 0) of 64 bytes' payload, as bench/lb_opcodes.py's devices send.
TOPIC = b"fleet/device-00001/telemetry"
TELEMETRY = bytes((0x30, 2 + len(TOPIC) + 64, 0, len(TOPIC))) + TOPIC + bytes(64)


def traced(action: Callable[[], Any]) -> tuple[Any, set[str]]:
    """What `action` returned (or the TLSRecordError it raised) and the functions of
    lb.tls_records it called."""
    called: set[str] = set()

    def profile(frame: FrameType, event: str, arg: object) -> None:
        del arg
        if event == "call" and frame.f_code.co_filename == tls_records.__file__:
            called.add(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        result = action()
    except TLSRecordError as error:
        result = error
    finally:
        sys.setprofile(None)
    return result, called


def open_traced(session: Records, data: bytes) -> tuple[Any, set[str]]:
    def action() -> bytes:
        return bytes(session.open(data))

    return traced(action)


def connect(pki: TestPKI, tmp_path: Path, number: int) -> tuple[tls_io.Session, Client]:
    """A TLS 1.3 session taken over from lb's server side, and its client (the tickets
    read)."""
    bind = bind_context(pki, tmp_path)
    device = pki.device(number)
    client = Client(client_context(device.chain, device.key, pki.root))
    server, state, tickets = handshake(
        bind, client.step, client.outgoing.read, client.incoming.write
    )
    taken = take_over(bind, server, state, tickets)
    assert taken is not None
    session, unread = taken
    assert unread == b""
    client.incoming.write(tickets)
    assert client.read_all() == b""
    return session, client


def record_of(client: Client, data: bytes) -> bytes:
    """The client's record(s) for `data`."""
    client.tls.write(data)
    return client.outgoing.read()


def client_keys(session: Records) -> Records:
    """The client's side of `session`'s keys, at the record the client sends next."""
    return Records(
        session.suite,
        session.write_secret,
        session.read_secret,
        read_seq=session.write_seq,
        write_seq=session.read_seq,
    )


def forge(keys: Records, inner: bytes) -> bytes:
    """One record of `keys`' next write over `inner` (content, type, padding) as given."""
    header = b"\x17\x03\x03" + (len(inner) + 16).to_bytes(2, "big")
    nonce = (keys.write_iv ^ keys.write_seq).to_bytes(12, "big")
    keys.write_seq += 1
    return header + keys.suite.aead(keys.write_key).encrypt(nonce, inner, header)


# -- the fast path ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, len(TELEMETRY), 1000, MAX_PLAINTEXT])
def test_one_record_a_read_takes_the_fast_path_both_ways(
    pki: TestPKI, tmp_path: Path, size: int
) -> None:
    session, client = connect(pki, tmp_path, 1)
    payload = (TELEMETRY * (size // len(TELEMETRY) + 1))[:size]
    for round_ in range(3):
        if round_ == 1:
            session.release()  # a quiet device's: the cipher objects are made again
        record = record_of(client, payload)
        assert count_records(record) == 1
        plaintext, called = open_traced(session, record)
        assert plaintext == payload
        assert not called & GENERAL and INNER not in called, called
        assert session.read_seq == round_ + 1
        sealed, called = traced(lambda: session.seal(payload))
        assert called <= {"seal", "_write_cipher", "touch"}, called  # not _seal_all
        assert count_records(sealed) == 1
        client.incoming.write(sealed)
        assert client.read_all() == payload


def test_fast_path_resets_the_empty_record_count(pki: TestPKI, tmp_path: Path) -> None:
    session, _client = connect(pki, tmp_path, 2)
    keys = client_keys(session)
    empties = b"".join(forge(keys, b"\x17") for _ in range(MAX_EMPTY_RECORDS))
    assert session.open(empties) == b""
    assert session.empty_records == MAX_EMPTY_RECORDS
    plaintext, called = open_traced(session, forge(keys, b"data\x17"))
    assert plaintext == b"data" and called <= FAST
    assert session.empty_records == 0
    assert session.open(b"".join(forge(keys, b"\x17") for _ in range(MAX_EMPTY_RECORDS))) == b""
    error, called = open_traced(session, forge(keys, b"\x17"))  # one empty too many
    assert isinstance(error, TLSRecordError) and "_open" in called
    assert error.alert == AlertDescription.UNEXPECTED_MESSAGE


def test_fast_path_keeps_the_cipher_objects_of_a_connection_in_use(
    pki: TestPKI, tmp_path: Path
) -> None:
    """Each record on the fast path counts its connection as in use (ActiveKeys), as the
    general path does: a busy connection keeps its cipher objects while others come and go,
    and a quiet one loses them."""
    keys = tls_records.ActiveKeys(limit=3)  # a generation: the three of a round
    original, tls_records.ACTIVE = tls_records.ACTIVE, keys
    try:
        reading, reading_client = connect(pki, tmp_path, 16)
        writing, writing_client = connect(pki, tmp_path, 17)
        others = [connect(pki, tmp_path, 18 + n) for n in range(3)]
        for round_ in range(len(others)):
            # one connection only reads, one only writes: each direction touches
            assert reading.open(record_of(reading_client, TELEMETRY)) == TELEMETRY
            writing_client.incoming.write(writing.seal(b"command"))
            assert writing_client.read_all() == b"command"
            other, other_client = others[round_]
            assert other.open(record_of(other_client, b"x")) == b"x"  # a generation ends
            assert reading.read_aead is not None and writing.write_aead is not None
        assert others[0][0].read_aead is None  # used in the first round only
    finally:
        tls_records.ACTIVE = original


# -- refused on the fast path's checks ------------------------------------------------------------


def refused(
    session: Records, data: bytes, alert: AlertDescription
) -> tuple[TLSRecordError, set[str]]:
    error, called = open_traced(session, data)
    assert isinstance(error, TLSRecordError), error
    assert error.alert == alert, error.message
    assert not error.received and error.plaintext == b""
    assert session.open(data) == b""  # a Records that has raised takes no more input
    return error, called


@pytest.mark.parametrize("where", [-1, HEADER_LENGTH, HEADER_LENGTH + 10])
def test_tampered_record(pki: TestPKI, tmp_path: Path, where: int) -> None:
    """A changed tag or ciphertext byte fails authentication; the alert lb sends for it is
    what the real client reads."""
    session, client = connect(pki, tmp_path, 3)
    record = bytearray(record_of(client, TELEMETRY))
    record[where] ^= 0x01
    error, called = refused(session, bytes(record), AlertDescription.BAD_RECORD_MAC)
    assert error.message == "record failed authentication"
    assert not called & GENERAL  # the header was good: the fast path's decryption refused it
    client.incoming.write(session.alert(error.alert))
    with pytest.raises(ssl.SSLError, match=r"(?i)bad.record.mac"):
        client.read_all()


def test_replayed_record_fails_on_the_sequence_number(pki: TestPKI, tmp_path: Path) -> None:
    session, client = connect(pki, tmp_path, 4)
    record = record_of(client, TELEMETRY)
    assert session.open(record) == TELEMETRY
    refused(session, record, AlertDescription.BAD_RECORD_MAC)


@pytest.mark.parametrize(
    ("offset", "value", "alert", "message"),
    [
        (0, 0x16, AlertDescription.UNEXPECTED_MESSAGE, "unprotected handshake record"),
        (0, 0x15, AlertDescription.UNEXPECTED_MESSAGE, "unprotected alert record"),
        (1, 0x01, AlertDescription.DECODE_ERROR, "record version 0x0103"),
        (2, 0x01, AlertDescription.DECODE_ERROR, "record version 0x0301"),
    ],
)
def test_header_refused_by_the_general_path(
    pki: TestPKI,
    tmp_path: Path,
    offset: int,
    value: int,
    alert: AlertDescription,
    message: str,
) -> None:
    session, client = connect(pki, tmp_path, 5)
    record = bytearray(record_of(client, TELEMETRY))
    record[offset] = value
    error, called = refused(session, bytes(record), alert)
    assert message in error.message
    assert "_record_length" in called


def test_record_one_byte_over_the_ciphertext_limit(pki: TestPKI, tmp_path: Path) -> None:
    """RFC 8446 5.2: a record of 2^14 + 257 bytes (TLSCiphertext.length; the client's
    largest real record, its body lengthened to that) is refused from its header by the
    general path (the fast path takes lengths up to 2^14 + 17)."""
    session, client = connect(pki, tmp_path, 6)
    largest = record_of(client, bytes(MAX_PLAINTEXT))
    assert len(largest) == HEADER_LENGTH + MAX_PLAINTEXT + 1 + 16  # OpenSSL pads nothing
    body = largest[HEADER_LENGTH:] + bytes(MAX_CIPHERTEXT + 1 - (len(largest) - HEADER_LENGTH))
    over = b"\x17\x03\x03" + (MAX_CIPHERTEXT + 1).to_bytes(2, "big") + body
    error, called = refused(session, over, AlertDescription.RECORD_OVERFLOW)
    assert error.message == f"record of {MAX_CIPHERTEXT + 1} bytes (at most {MAX_CIPHERTEXT})"
    assert "_record_length" in called


def test_inner_plaintext_one_byte_over_the_limit(pki: TestPKI, tmp_path: Path) -> None:
    """RFC 8446 5.4: an inner plaintext of 2^14 + 1 bytes is the fast path's largest; one
    byte more (here as padding, in a record within 5.2's limit) is refused once
    authenticated, by the general path."""
    session, _client = connect(pki, tmp_path, 7)
    keys = client_keys(session)
    content = bytes(range(256)) * (MAX_PLAINTEXT // 256)
    largest = forge(keys, content + b"\x17")
    plaintext, called = open_traced(session, largest)
    assert plaintext == content and called <= FAST
    for inner in (content + b"\x17\x00", content + b"+\x17"):  # padded, or content too long
        session, _client = connect(pki, tmp_path, 7)
        over = forge(client_keys(session), inner)
        error, called = refused(session, over, AlertDescription.RECORD_OVERFLOW)
        assert error.message == f"record plaintext of {MAX_PLAINTEXT + 2} bytes"
        assert "_open_record" in called


def test_sequence_exhausted(pki: TestPKI, tmp_path: Path) -> None:
    """RFC 8446 5.3: sequence numbers do not wrap; the record at 2^64 - 1 is refused before
    its decryption, on either path."""
    for cut in (0, -1):  # one read, or two
        session, client = connect(pki, tmp_path, 15)
        record = record_of(client, TELEMETRY)
        session.read_seq = SEQUENCE_LIMIT
        assert session.open(record[:cut]) == b""
        error, called = open_traced(session, record[cut:])
        assert isinstance(error, TLSRecordError)
        assert error.alert == AlertDescription.INTERNAL_ERROR
        assert error.message == "record sequence exhausted"
        assert "_open_record" in called  # the fast path left it to the general one
        assert session.read_seq == SEQUENCE_LIMIT and session.open(record) == b""


# -- what the general path takes ----------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 4, 5, 6, 30, -1])
def test_record_split_over_two_reads(pki: TestPKI, tmp_path: Path, cut: int) -> None:
    session, client = connect(pki, tmp_path, 8)
    record = record_of(client, TELEMETRY)
    first, called = open_traced(session, record[:cut])
    assert first == b"" and session.incoming is not None and "_open" in called
    second, called = open_traced(session, record[cut:])
    assert second == TELEMETRY and session.incoming is None and "_open" in called
    # the next whole record goes the fast way again
    assert open_traced(session, record_of(client, b"next"))[1] <= FAST
    assert session.read_seq == 2


def test_two_records_in_one_read_and_one_and_a_bit(pki: TestPKI, tmp_path: Path) -> None:
    session, client = connect(pki, tmp_path, 9)
    two = record_of(client, b"one") + record_of(client, TELEMETRY)
    plaintext, called = open_traced(session, two)
    assert plaintext == b"one" + TELEMETRY and "_open" in called
    third, fourth = record_of(client, b"three"), record_of(client, b"four")
    plaintext, called = open_traced(session, third + fourth[:3])
    assert plaintext == b"three" and session.incoming == fourth[:3] and "_open" in called
    assert open_traced(session, fourth[3:])[0] == b"four"
    assert session.read_seq == 4


def test_padding_is_removed_after_the_fast_path_decrypts(pki: TestPKI, tmp_path: Path) -> None:
    session, _client = connect(pki, tmp_path, 10)
    keys = client_keys(session)
    plaintext, called = open_traced(session, forge(keys, TELEMETRY + b"\x17" + bytes(31)))
    assert plaintext == TELEMETRY and INNER in called and not called & GENERAL
    refused(session, forge(keys, bytes(40)), AlertDescription.UNEXPECTED_MESSAGE)


def test_new_session_ticket_from_the_client(pki: TestPKI, tmp_path: Path) -> None:
    """RFC 8446 4.6.1: only a server sends NewSessionTicket; a client's is refused after the
    fast path has authenticated its record."""
    session, _client = connect(pki, tmp_path, 11)
    ticket = bytes((4, 0, 0, 13)) + bytes(13)
    error, called = refused(
        session, forge(client_keys(session), ticket + b"\x16"), AlertDescription.UNEXPECTED_MESSAGE
    )
    assert error.message == "handshake message type 4 after the handshake"
    assert INNER in called and not called & GENERAL


def test_close_notify_and_a_fatal_alert_from_the_client(pki: TestPKI, tmp_path: Path) -> None:
    session, client = connect(pki, tmp_path, 12)
    assert session.open(record_of(client, b"last")) == b"last"
    try:
        client.tls.unwrap()
    except ssl.SSLWantReadError:  # it waits for ours: its own close_notify is written
        pass
    plaintext, called = open_traced(session, client.outgoing.read())
    assert plaintext == b"" and session.peer_closed and INNER in called
    session, _client = connect(pki, tmp_path, 12)
    keys = client_keys(session)
    error, called = open_traced(session, forge(keys, bytes((2, 48, 21))))
    assert isinstance(error, TLSRecordError) and error.received
    assert error.alert == AlertDescription.UNKNOWN_CA and INNER in called


# -- KeyUpdate from openssl s_client ------------------------------------------------------------


class Incoming:
    """A socket's bytes, taken one record at a time."""

    def __init__(self, connection: socket.socket, pending: bytes) -> None:
        self.connection = connection
        self.pending = pending

    def record(self) -> bytes:
        while True:
            if len(self.pending) >= HEADER_LENGTH:
                end = HEADER_LENGTH + int.from_bytes(self.pending[3:5], "big")
                if len(self.pending) >= end:
                    record, self.pending = self.pending[:end], self.pending[end:]
                    return record
            chunk = self.connection.recv(65536)
            assert chunk, f"the client closed with {self.pending!r} pending"
            self.pending += chunk


def typed(client: subprocess.Popen[bytes], line: bytes) -> None:
    assert client.stdin is not None
    client.stdin.write(line)
    client.stdin.flush()


def test_key_update_between_application_records(pki: TestPKI, tmp_path: Path) -> None:
    """openssl s_client's KeyUpdates ("k", then "K" that asks for ours) between its lines:
    each record of a read of its own (the KeyUpdate's authenticated on the fast path, then
    read by the general one; the data after it under the next key on the fast path), then a
    KeyUpdate and data in one read (the general path changes keys between them)."""
    bind = bind_context(pki, tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(20)
        client = s_client(listener.getsockname()[1], pki, 13, "-tls1_3", messages=True)
        try:
            connection, _ = listener.accept()
            with connection:
                connection.settimeout(20)
                server, state, tickets = handshake(
                    bind, lambda: False, lambda: connection.recv(65536), connection.sendall
                )
                taken = take_over(bind, server, state, tickets)
                assert taken is not None
                session, unread = taken
                del server
                connection.sendall(tickets)
                incoming = Incoming(connection, unread)
                output = Output(client)

                typed(client, b"before\n")
                plaintext, called = open_traced(session, incoming.record())
                assert plaintext == b"before\n" and not called & GENERAL

                first_secret = session.read_secret
                typed(client, b"k\n")
                output.until(b"KEYUPDATE\n")
                typed(client, b"after-k\n")  # s_client sends its KeyUpdate before this
                plaintext, called = open_traced(session, incoming.record())
                assert plaintext == b"" and INNER in called and not called & GENERAL
                assert session.read_secret != first_secret and session.read_seq == 0
                assert session.take_output() == b""  # not requested: not answered
                plaintext, called = open_traced(session, incoming.record())
                assert plaintext == b"after-k\n" and INNER not in called and not called & GENERAL
                assert session.read_seq == 1

                typed(client, b"K\n")
                output.until(b"KEYUPDATE\n")
                typed(client, b"after-K\n")
                both = incoming.record() + incoming.record()  # the KeyUpdate, the line
                plaintext, called = open_traced(session, both)
                assert plaintext == b"after-K\n" and "_open" in called
                assert session.read_seq == 1
                answer = session.take_output()  # ours, asked for
                assert count_records(answer) == 1
                connection.sendall(answer + session.seal(b"from-lb\n"))
                output.until(b"from-lb\n")  # read under our next key
                assert session.write_seq == 1

                typed(client, b"last\n")
                assert open_traced(session, incoming.record())[0] == b"last\n"
        finally:
            client.kill()
            client.wait(5)


# -- the fast path against the general path, on the same real records --------------------


@dataclass(frozen=True)
class Captured:
    """A connection's keys as its Session began, and what its client sent: real records of
    the standard library's client, then records sealed with its key (a KeyUpdate, data
    under the next key, padding, an empty record, close_notify)."""

    suite: tls_records.CipherSuite
    read_secret: bytes
    write_secret: bytes
    read_seq: int
    write_seq: int
    records: tuple[bytes, ...]

    def records_layer(self) -> Records:
        return Records(
            self.suite,
            self.read_secret,
            self.write_secret,
            read_seq=self.read_seq,
            write_seq=self.write_seq,
        )


@pytest.fixture(scope="module")
def captured(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Captured]:
    session, client = connect(pki, tmp_path_factory.mktemp("relay"), 14)
    keys = client_keys(session)
    sizes = (1, len(TELEMETRY), 300, MAX_PLAINTEXT, 2)
    records = [record_of(client, (TELEMETRY * 300)[:size]) for size in sizes]
    keys.write_seq += len(records)
    records.append(keys._update_write_key())
    records.append(forge(keys, b"next key\x17"))
    records.append(forge(keys, TELEMETRY + b"\x17" + bytes(9)))
    records.append(forge(keys, b"\x17"))
    records.append(forge(keys, b"tail\x17"))
    records.append(forge(keys, bytes((1, 0, 21))))  # close_notify
    yield Captured(
        session.suite,
        session.read_secret,
        session.write_secret,
        session.read_seq,
        session.write_seq,
        tuple(records),
    )


Outcome = tuple[bytes, object, int, int, bytes, int, object, bytes, bytes]


def outcome(records: Records, reads: list[bytes]) -> Outcome:
    """Everything delivered, the error (alert, message, received) if any, and the state."""
    delivered = bytearray()
    error: object = None
    for data in reads:
        try:
            delivered += records.open(data)
        except TLSRecordError as failure:
            delivered += failure.plaintext
            error = (failure.alert, failure.message, failure.received)
            break
    return (
        bytes(delivered),
        error,
        records.state,
        records.read_seq,
        records.read_secret,
        records.empty_records,
        records.handshake,
        records.take_output(),
        bytes(records.incoming or b""),
    )


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fast_and_general_paths_agree(captured: Captured, data: st.DataObject) -> None:
    count = data.draw(st.integers(1, len(captured.records)), label="records")
    # the start of the first record again before it (a stream that went wrong): a whole
    # record after a partial one is not one record
    lead = data.draw(st.integers(0, HEADER_LENGTH + 2), label="lead")
    whole = (captured.records[0][:lead], *captured.records[:count])
    stream = bytearray(b"".join(whole))
    change = data.draw(
        st.none() | st.tuples(st.integers(0, len(stream) - 1), st.integers(1, 255)), label="xor"
    )
    if change is not None:
        stream[change[0]] ^= change[1]
    end = data.draw(st.just(len(stream)) | st.integers(0, len(stream)), label="end")
    stream = stream[:end]
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=3), label="cuts")
    boundaries = {0, len(stream), *cuts}
    position = 0
    for record in whole:
        position += len(record)
        boundaries.add(min(position, len(stream)))
    points = sorted(boundaries)
    # one read per record where the cuts allow (the fast path's case), and a first byte
    # alone then the rest (every record on the general path)
    by_record = [bytes(stream[a:b]) for a, b in itertools.pairwise(points)]
    general = [bytes(stream[:1]), bytes(stream[1:])]
    assert outcome(captured.records_layer(), by_record) == outcome(
        captured.records_layer(), general
    )
