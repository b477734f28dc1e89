"""Fuzz targets: one check per codec or parser, each asserting that codec's own contract.

A target takes the fuzzer's bytes and returns quietly when the code under test behaved. A
failed ``assert`` (a broken contract) or any exception other than the codec's own error is a
finding: atheris stops and saves the input, and tests/test_fuzz.py replays every saved one.

The decoders' contract (STYLE.md rules 2-4, 16):

- bytes in, events out; the only exception a peer can cause is the codec's own error;
- the same bytes give the same result fed whole or in chunks (here the first bytes of the
  input choose the chunk size and the decoder's options);
- a decoder that has raised accepts no more input and keeps raising;
- ``trailing_data`` is exactly the bytes after the last whole unit, untouched;
- where there is an encoder, what was decoded encodes again and decodes to the same thing
  (and, for PROXY v2 in HAProxy's canonical layout, to the very same bytes).

The configuration loaders' contract: any text gives either a model or the loader's own
error, which names the file and a line (or key) that exists.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from broker import cluster_codec
from broker import config as broker_config
from broker.authz import PolicyError, PrincipalView, parse_policy, resolve
from broker.mqtt import (
    NEED_DATA as MQTT_NEED_DATA,
)
from broker.mqtt import (
    Connect,
    MQTTDecoder,
    MQTTProtocolError,
    Packet,
    ReasonCode,
    encode,
)
from broker.mqtt import codec as mqtt_codec
from broker.mqtt.wire import Reader
from lb import control_codec
from lb.config import format_report, load_config_text
from lb.control import CertRecord, ServerRecord
from lb.proxyproto import (
    NEED_DATA as PROXY_NEED_DATA,
)
from lb.proxyproto import (
    V1_MAX_LENGTH,
    V2_DEFAULT_MAX_LENGTH,
    V2_HEADER_LENGTH,
    V2_MAX_LENGTH,
    Command,
    ProxyHeader,
    ProxyProtocolDecoder,
    ProxyProtocolError,
    Reason,
    encode_v1,
    encode_v2,
)

#: The reasons a ProxyProtocolError may carry (its ``reason`` is a stable code for logs).
PROXY_REASONS = frozenset(get_args(Reason))
#: The MQTT reason codes an error may carry into CONNACK or DISCONNECT (5.0 section 2.4:
#: 0x80 and above are failures).
MQTT_ERROR_CODES = frozenset(code for code in ReasonCode if code >= 0x80)
#: The environment the haproxy.cfg target expands ``${VAR}`` from.
CONFIG_ENVIRON = {"HOME": "/home/lb", "EMPTY": "", "PORT": "8883"}


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[start : start + size] for start in range(0, len(data), size)]


def _chunk_size(selector: int) -> int:
    """1 (byte by byte) to 16 bytes per feed."""
    return selector % 16 + 1


# --- PROXY protocol (lb/proxyproto.py) ----------------------------------------------------

ProxyOutcome = tuple[str, object, bytes]


def _proxy_decoder(options: int) -> ProxyProtocolDecoder:
    versions = options & 0x03  # 1: v1 only, 2: v2 only, else both
    return ProxyProtocolDecoder(
        allow_v1=versions != 2,
        allow_v2=versions != 1,
        max_v2_length=64 if options & 0x04 else V2_DEFAULT_MAX_LENGTH,
    )


def _proxy_outcome(options: int, pieces: Iterable[bytes]) -> ProxyOutcome:
    """Feed the pieces then end-of-stream; ("header", header, trailing) or ("error", ...)."""
    decoder = _proxy_decoder(options)
    for piece in (*pieces, b""):
        try:
            decoder.feed(piece)
            event = decoder.next_event()
        except ProxyProtocolError as error:
            assert error.reason in PROXY_REASONS, error.reason
            assert isinstance(str(error), str) and str(error)
            # Sticky: no more input, the same error again.
            try:
                decoder.feed(b"x")
            except ProxyProtocolError as again:
                assert again is error
            else:
                raise AssertionError("a failed PROXY decoder accepted more input") from None
            try:
                decoder.next_event()
            except ProxyProtocolError as again:
                assert again is error
            else:
                raise AssertionError("a failed PROXY decoder returned an event") from None
            return ("error", error.reason, b"")
        if event is not PROXY_NEED_DATA:
            assert isinstance(event, ProxyHeader)
    assert event is not PROXY_NEED_DATA, "NEED_DATA after end of stream"
    assert decoder.next_event() is event
    return ("header", event, decoder.trailing_data)


def _decode_proxy_header(data: bytes) -> tuple[ProxyHeader, bytes]:
    decoder = ProxyProtocolDecoder(max_v2_length=V2_MAX_LENGTH)
    decoder.feed(data)
    event = decoder.next_event()
    assert isinstance(event, ProxyHeader), event
    return event, decoder.trailing_data


def check_proxy(data: bytes) -> None:
    """PROXY v1/v2 decoder: only ProxyProtocolError, chunking changes nothing, errors are
    sticky, trailing bytes untouched, limits kept, and the encoders round-trip what it reads.
    Input: options byte (versions, a 64-byte v2 limit), chunk-size byte, then the stream."""
    if len(data) < 2:
        return
    options, stream = data[0], data[2:]
    whole = _proxy_outcome(options, [stream])
    chunked = _proxy_outcome(options, _chunks(stream, _chunk_size(data[1])))
    assert whole == chunked, (whole, chunked)
    if whole[0] != "header":
        return
    _, event, trailing = whole
    assert isinstance(event, ProxyHeader)
    header_length = len(stream) - len(trailing)
    raw = stream[:header_length]
    assert stream[header_length:] == trailing
    if event.version == 1:
        assert header_length <= V1_MAX_LENGTH
    else:
        limit = 64 if options & 0x04 else V2_DEFAULT_MAX_LENGTH
        assert header_length <= V2_HEADER_LENGTH + limit
    assert _decode_proxy_header(raw) == (event, b"")
    assert _decode_proxy_header(raw + b"\x10\x00tail") == (event, b"\x10\x00tail")
    _check_proxy_round_trip(event, raw)


def _check_proxy_round_trip(event: ProxyHeader, raw: bytes) -> None:
    if event.version == 1:
        again = encode_v1(event.source, event.destination)
        assert _decode_proxy_header(again) == (event, b"")
        return
    # HAProxy's layouts (PROXY over TCP with IPv4 or IPv6 addresses, LOCAL with no address
    # block) encode back to the very same bytes, TLVs verbatim (CRC32C included).
    if (raw[12], raw[13]) in ((0x21, 0x11), (0x21, 0x21), (0x20, 0x00)):
        again = encode_v2(event.command, event.source, event.destination, extra_tlvs=event.tlvs)
        assert again == raw, (again, raw)
    if event.transport == "udp":
        return  # the encoder speaks TCP only
    # The parsed TLVs encode and decode to the same values.
    again = encode_v2(
        event.command,
        event.source,
        event.destination,
        alpn=event.alpn,
        authority=event.authority,
        unique_id=event.unique_id,
        ssl=event.ssl,
        chain_subjects=event.chain_subjects,
        crc32c=True,
    )
    decoded, _ = _decode_proxy_header(again)
    for field in ("alpn", "authority", "unique_id", "ssl", "chain_subjects"):
        assert getattr(decoded, field) == getattr(event, field), field
    if event.command is Command.PROXY and event.source is not None:
        assert (decoded.source, decoded.destination) == (event.source, event.destination)


# --- MQTT (broker/mqtt/codec.py) ----------------------------------------------------------

_MQTT_LEVELS = (None, 3, 4, 5)
_MQTT_MAX_PACKET_SIZES = (mqtt_codec.MAX_PACKET_SIZE, 64, 1024, mqtt_codec.MAX_PACKET_SIZE)


def _mqtt_outcome(
    options: int, pieces: Iterable[bytes]
) -> tuple[list[tuple[int, Packet]], int | None, bytes]:
    """(level, packet) pairs, the error's reason code (or None), and the trailing bytes."""
    decoder = MQTTDecoder(
        max_packet_size=_MQTT_MAX_PACKET_SIZES[(options >> 2) & 0x03],
        protocol_level=_MQTT_LEVELS[options & 0x03],
    )
    packets: list[tuple[int, Packet]] = []
    for piece in pieces:
        try:
            decoder.feed(piece)
            while (event := decoder.next_event()) is not MQTT_NEED_DATA:
                level = event.protocol_level if isinstance(event, Connect) else None
                level = level or decoder.protocol_level
                assert level in (3, 4, 5)
                packets.append((level, event))
        except MQTTProtocolError as error:
            assert error.reason_code in MQTT_ERROR_CODES, error.reason_code
            assert error.protocol_level in (None, *range(256))
            try:
                decoder.feed(b"\xc0\x00")
            except MQTTProtocolError as again:
                assert again is error
            else:
                raise AssertionError("a failed MQTT decoder accepted more input") from None
            try:
                decoder.next_event()
            except MQTTProtocolError as again:
                assert again is error
            else:
                raise AssertionError("a failed MQTT decoder returned an event") from None
            return packets, int(error.reason_code), b""
    return packets, None, decoder.trailing_data


def check_mqtt(data: bytes) -> None:
    """MQTT 3.1/3.1.1/5.0 decoder: only MQTTProtocolError with a failure reason code,
    chunking changes nothing, errors are sticky, trailing bytes untouched, every packet
    encodes and decodes back to itself, and the 3.1.1 PUBLISH fast path agrees with the
    general one. Input: options byte (decoder level, max_packet_size), chunk byte, stream."""
    if len(data) < 2:
        return
    options, stream = data[0], data[2:]
    whole = _mqtt_outcome(options, [stream])
    chunked = _mqtt_outcome(options, _chunks(stream, _chunk_size(data[1])))
    assert whole == chunked, (whole, chunked)
    packets, error, trailing = whole
    if error is None:
        assert stream.endswith(trailing)
    for level, packet in packets:
        wire = encode(packet, level)
        decoder = MQTTDecoder(protocol_level=level)
        decoder.feed(wire)
        assert decoder.next_event() == packet, (packet, wire)
        assert decoder.next_event() is MQTT_NEED_DATA and decoder.trailing_data == b""
    if stream:
        _check_publish_fast_path(stream[0] & 0x0F, stream[1:], _MQTT_LEVELS[options & 0x03] == 5)


def _check_publish_fast_path(flags: int, body: bytes, v5: bool) -> None:
    """_decode_publish_fast either defers (None) or returns what the general path returns."""
    packet = bytes((0x30 | flags,)) + body  # the fast path reads only the first byte's flags
    fast = mqtt_codec._decode_publish_fast(packet, 1, v5)
    if fast is None:
        return
    general = mqtt_codec._decode_publish(Reader(memoryview(body), 0, len(body)), flags, v5)
    assert fast == general, (fast, general)
    assert fast.raw == packet


# --- cluster link (broker/cluster_codec.py) -----------------------------------------------

_CLUSTER_LIMITS = (cluster_codec.DEFAULT_MAX_FRAME_SIZE, 32, 256, 4096)


def _cluster_outcome(
    options: int, pieces: Iterable[bytes]
) -> tuple[list[cluster_codec.Frame], bool, bytes]:
    decoder = cluster_codec.ClusterDecoder(_CLUSTER_LIMITS[options & 0x03])
    frames: list[cluster_codec.Frame] = []
    for piece in pieces:
        try:
            decoder.feed(piece)
            while not isinstance(event := decoder.next_event(), cluster_codec.NeedData):
                frames.append(event)
        except cluster_codec.ClusterProtocolError:
            for action in (lambda: decoder.feed(b"\x00"), decoder.next_event):
                try:
                    action()
                except cluster_codec.ClusterProtocolError:
                    pass
                else:
                    raise AssertionError("a failed cluster decoder went on") from None
            return frames, True, b""
    return frames, False, decoder.trailing_data


def check_cluster(data: bytes) -> None:
    """Cluster frame decoder: only ClusterProtocolError, chunking changes nothing, errors
    are sticky, limits hold, frames round-trip through ``encode``.
    Input: options byte (max_frame_size), chunk byte, stream."""
    if len(data) < 2:
        return
    options, stream = data[0], data[2:]
    whole = _cluster_outcome(options, [stream])
    chunked = _cluster_outcome(options, _chunks(stream, _chunk_size(data[1])))
    assert whole == chunked, (whole, chunked)
    frames, failed, trailing = whole
    if not failed:
        assert stream.endswith(trailing)
    for frame in frames:
        wire = cluster_codec.encode(frame)
        assert len(wire) - 4 <= _CLUSTER_LIMITS[options & 0x03]
        decoder = cluster_codec.ClusterDecoder()
        decoder.feed(wire + b"\x00")
        assert decoder.next_event() == frame
        assert decoder.trailing_data == b"\x00"
        assert cluster_codec.encode(frame) == wire


# --- lb control channel (lb/control_codec.py) ---------------------------------------------


def _control_outcome(pieces: Iterable[bytes]) -> tuple[list[str], bool, bytes]:
    decoder = control_codec.FrameDecoder()
    messages: list[str] = []
    for piece in pieces:
        try:
            decoder.feed(piece)
            while (event := decoder.next_event()) is not control_codec.NEED_DATA:
                assert isinstance(event, dict) and isinstance(event.get("t"), str)
                messages.append(json.dumps(event, sort_keys=True))
        except control_codec.ControlProtocolError:
            for action in (lambda: decoder.feed(b"\x00"), decoder.next_event):
                try:
                    action()
                except control_codec.ControlProtocolError:
                    pass
                else:
                    raise AssertionError("a failed control decoder went on") from None
            return messages, True, b""
    return messages, False, decoder.trailing_data


def check_control(data: bytes) -> None:
    """lb's control frames and the records in them: only ControlProtocolError, chunking
    changes nothing, errors are sticky, messages and records round-trip.
    Input: chunk byte, stream."""
    if not data:
        return
    stream = data[1:]
    whole = _control_outcome([stream])
    chunked = _control_outcome(_chunks(stream, _chunk_size(data[0])))
    assert whole == chunked, (whole, chunked)
    messages, failed, trailing = whole
    if not failed:
        assert stream.endswith(trailing)
    for text in messages:
        message = json.loads(text)
        decoder = control_codec.FrameDecoder()
        decoder.feed(control_codec.encode(message))
        event = decoder.next_event()
        assert event is not control_codec.NEED_DATA
        assert json.dumps(event, sort_keys=True) == text
        # The records the master and workers exchange (lb/control.py) refuse a bad one with
        # the channel's own error, and round-trip a good one.
        record_type = {"server": ServerRecord, "cert": CertRecord}.get(message["t"])
        if record_type is None:
            continue
        try:
            record = record_type.from_message(message)
        except control_codec.ControlProtocolError:
            continue
        assert record_type.from_message(record.to_message()) == record


# --- haproxy.cfg (lb/config) --------------------------------------------------------------

CONFIG_FILE = "/fuzz/haproxy.cfg"


def check_haproxy_cfg(data: bytes) -> None:
    """The haproxy.cfg lexer and parser: any text gives a model or diagnostics, never an
    exception; an error means no model; every diagnostic names this file and a line of it
    (a line an editor shows: lines end at LF); the `-c` report renders."""
    text = data.decode("utf-8", errors="replace")
    result = load_config_text(text, CONFIG_FILE, environ=CONFIG_ENVIRON)
    lines = text.count("\n") + 1
    for diagnostic in result.diagnostics:
        assert diagnostic.file in (None, CONFIG_FILE), diagnostic
        assert diagnostic.line is None or 1 <= diagnostic.line <= lines, (diagnostic, lines)
        assert diagnostic.message
    assert (result.config is None) == any(d.is_error for d in result.diagnostics)
    format_report(result.diagnostics, 1)


# --- broker TOML (broker/config.py) -------------------------------------------------------


def check_broker_toml(data: bytes) -> None:
    """The broker's config loader (``broker -c``): any file gives a BrokerConfig or a
    ConfigError that names the file and a key; nothing else escapes. The file is in a
    directory of its own, gone after each input (libFuzzer ends its process without
    Python's exit handlers: a directory kept for the process outlived it)."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as scratch:
        path = Path(scratch) / "broker.toml"
        path.write_bytes(data)
        try:
            config = broker_config.load_config(path)
        except broker_config.ConfigError as error:
            assert error.origin == str(path) and error.key and error.message, error
            return
    assert config.listeners


# --- authorization policy (broker/authz.py) -----------------------------------------------

_YAML_LINE_BREAK = re.compile("\r\n|[\n\r\x85\u2028\u2029]")


def check_authz_policy(data: bytes) -> None:
    """The policy loader (JSON or YAML, seed 003): any text gives a Policy or a PolicyError
    naming the file and a line that exists; a loaded policy then decides for a client its
    own principals describe without raising. Input: a byte choosing .json or .yaml, text."""
    if not data:
        return
    origin = "policy.json" if data[0] & 1 else "policy.yaml"
    text = data[1:].decode("utf-8", errors="replace")
    try:
        policy = parse_policy(text, origin)
    except PolicyError as error:
        assert error.origin == origin and error.message
        # PyYAML also ends a line at a lone CR, NEL, U+2028 and U+2029 (YAML 1.1, 5.4).
        lines = len(_YAML_LINE_BREAK.split(text))
        assert error.line is None or 1 <= error.line <= lines, (error, lines)
        return
    for rule in policy.rules:
        principals = rule.principals
        view = PrincipalView(
            principals.client_ids[0].replace("*", "x") if principals.client_ids else "c",
            principals.usernames[0] if principals.usernames else None,
            principals.attributes[0] if principals.attributes else (),
        )
        grants = resolve(policy, view)
        topics = ["a/b", "$SYS/x", "#", "+/+"]
        for resource in rule.broker_resources:
            topics.extend(template.text for template in resource.topics)
        for topic in topics:
            grants.may_subscribe(topic)
            if "+" not in topic and "#" not in topic:
                grants.may_publish(topic)
        for key in grants.keys:
            key.matches(b"key")


# --- the registry -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    check: Callable[[bytes], None]
    #: Modules atheris instruments for coverage (imported under instrument_imports).
    modules: tuple[str, ...]
    #: What the target reads, for the README and --help.
    what: str


TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target("proxy", check_proxy, ("lb.proxyproto",), "PROXY v1/v2 decoder and encoders"),
        Target(
            "mqtt",
            check_mqtt,
            (
                "broker.mqtt.codec",
                "broker.mqtt.wire",
                "broker.mqtt.properties",
                "broker.mqtt.topics",
            ),
            "MQTT 3.1/3.1.1/5.0 decoder and encoder",
        ),
        Target(
            "cluster",
            check_cluster,
            ("broker.cluster_codec", "broker.mqtt.properties", "broker.mqtt.wire"),
            "cluster link frame codec",
        ),
        Target(
            "control",
            check_control,
            ("lb.control_codec", "lb.control"),
            "lb control channel frames and records",
        ),
        Target(
            "haproxy-cfg",
            check_haproxy_cfg,
            ("lb.config", "lb.config.lexer", "lb.config.keywords", "lb.config.model"),
            "haproxy.cfg lexer and parser",
        ),
        Target(
            "broker-toml",
            check_broker_toml,
            ("broker.config", "broker.subjects"),
            "broker TOML config loader",
        ),
        Target(
            "authz-policy",
            check_authz_policy,
            ("broker.authz",),
            "authorization policy loader (JSON/YAML) and decisions",
        ),
    )
}
