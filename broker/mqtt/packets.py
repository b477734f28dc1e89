"""MQTT control packets as frozen records, plus the spec's enumerations and the codec's error.

One set of records serves MQTT 3.1 (level 3), 3.1.1 (level 4) and 5.0 (level 5); fields that
only exist on the 5.0 wire (properties, most reason codes) are dropped by the encoder for the
older levels and come back as their defaults when decoding them.

Sources: MQTT 3.1.1 (OASIS Standard, 2014) sections 2-3 and MQTT 5.0 (OASIS Standard, 2019)
section 2.1.2 (Table 2-1, packet types), 2.2.2.2 (Table 2-4, properties), 2.4 (Table 2-6,
reason codes) and 3.2.2.3 (3.1.1 CONNACK return codes, Table 3.1 of the 3.1.1 spec).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias, TypeVar

if TYPE_CHECKING:
    from typing_extensions import dataclass_transform
else:

    def dataclass_transform(**_options: Any) -> Any:
        return lambda function: function


__all__ = [
    "EMPTY_PROPERTIES",
    "Auth",
    "Connack",
    "ConnackReturnCode311",
    "Connect",
    "Disconnect",
    "MQTTProtocolError",
    "Packet",
    "PacketType",
    "Pingreq",
    "Pingresp",
    "Properties",
    "ProtocolLevel",
    "Puback",
    "Pubcomp",
    "Publish",
    "Pubrec",
    "Pubrel",
    "ReasonCode",
    "Suback",
    "Subscribe",
    "Subscription",
    "Unsuback",
    "Unsubscribe",
    "Will",
    "connack_code_for",
    "record",
]


_Record = TypeVar("_Record")


@dataclass_transform(frozen_default=True)
def record(cls: type[_Record]) -> type[_Record]:
    """A frozen record for the type checker, a plain slotted dataclass at run time.

    A frozen dataclass's ``__init__`` sets every field through ``object.__setattr__``: 2.5 µs
    against 0.56 µs for seven fields here, and the broker builds two to three of these per
    routed message (bench/README.md, broker section). mypy still refuses assignments to the
    fields (``frozen_default``); equality and hashing are those of a frozen dataclass.
    """
    return dataclass(slots=True, unsafe_hash=True)(cls)


class ProtocolLevel(IntEnum):
    """The Protocol Level byte of CONNECT (3.1.1 section 3.1.2.2, 5.0 section 3.1.2.2)."""

    MQTT_3_1 = 3
    MQTT_3_1_1 = 4
    MQTT_5 = 5


class PacketType(IntEnum):
    """MQTT Control Packet types (5.0 Table 2-1; 3.1.1 Table 2.1, where 15 is reserved)."""

    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


class ReasonCode(IntEnum):
    """MQTT 5.0 Reason Codes (section 2.4, Table 2-6). Value 0x00 has three spec names."""

    SUCCESS = 0x00
    NORMAL_DISCONNECTION = 0x00
    GRANTED_QOS_0 = 0x00
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    DISCONNECT_WITH_WILL_MESSAGE = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    CONTINUE_AUTHENTICATION = 0x18
    REAUTHENTICATE = 0x19
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BANNED = 0x8A
    SERVER_SHUTTING_DOWN = 0x8B
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    USE_ANOTHER_SERVER = 0x9C
    SERVER_MOVED = 0x9D
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    CONNECTION_RATE_EXCEEDED = 0x9F
    MAXIMUM_CONNECT_TIME = 0xA0
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2


class ConnackReturnCode311(IntEnum):
    """MQTT 3.1.1 CONNACK return codes (3.1.1 section 3.2.2.3, Table 3.1)."""

    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL_VERSION = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_USER_NAME_OR_PASSWORD = 4
    NOT_AUTHORIZED = 5


_CONNACK_311_FOR_REASON: dict[int, ConnackReturnCode311] = {
    ReasonCode.SUCCESS: ConnackReturnCode311.ACCEPTED,
    ReasonCode.UNSUPPORTED_PROTOCOL_VERSION: ConnackReturnCode311.UNACCEPTABLE_PROTOCOL_VERSION,
    ReasonCode.CLIENT_IDENTIFIER_NOT_VALID: ConnackReturnCode311.IDENTIFIER_REJECTED,
    ReasonCode.BAD_USER_NAME_OR_PASSWORD: ConnackReturnCode311.BAD_USER_NAME_OR_PASSWORD,
    ReasonCode.BAD_AUTHENTICATION_METHOD: ConnackReturnCode311.BAD_USER_NAME_OR_PASSWORD,
    ReasonCode.NOT_AUTHORIZED: ConnackReturnCode311.NOT_AUTHORIZED,
    ReasonCode.BANNED: ConnackReturnCode311.NOT_AUTHORIZED,
}


def connack_code_for(level: int, reason: int) -> int:
    """The CONNACK code byte for `reason` at protocol `level`.

    Level 5 sends the reason code itself; levels 3 and 4 have only six return codes, so each
    5.0 refusal maps to the nearest one and anything else becomes "server unavailable" (3).
    """
    if level >= ProtocolLevel.MQTT_5:
        return int(reason)
    return int(_CONNACK_311_FOR_REASON.get(reason, ConnackReturnCode311.SERVER_UNAVAILABLE))


class MQTTProtocolError(Exception):
    """The peer sent bytes that break the spec; `reason_code` goes into CONNACK or DISCONNECT.

    `protocol_level` is the level the offending bytes were decoded at, when known: for a CONNECT
    it is the Protocol Level byte itself (also when unsupported), so the server can answer in
    the client's dialect (3.1.1 section 3.1.2.2: CONNACK 0x01; 5.0: CONNACK 0x84).
    """

    reason_code: ReasonCode
    protocol_level: int | None

    def __init__(
        self, reason_code: ReasonCode, message: str, protocol_level: int | None = None
    ) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.protocol_level = protocol_level

    def __repr__(self) -> str:
        return f"MQTTProtocolError({self.reason_code.name}, {self.args[0]!r})"


@record
class Properties:
    """MQTT 5.0 properties (section 2.2.2.2, Table 2-4); None (or empty) means absent.

    Byte-valued properties stay ints as on the wire. `subscription_identifiers` repeats only
    on PUBLISH (one at most on SUBSCRIBE); `user_properties` keeps order and duplicates.
    """

    payload_format_indicator: int | None = None
    message_expiry_interval: int | None = None
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    subscription_identifiers: tuple[int, ...] = ()
    session_expiry_interval: int | None = None
    assigned_client_identifier: str | None = None
    server_keep_alive: int | None = None
    authentication_method: str | None = None
    authentication_data: bytes | None = None
    request_problem_information: int | None = None
    will_delay_interval: int | None = None
    request_response_information: int | None = None
    response_information: str | None = None
    server_reference: str | None = None
    reason_string: str | None = None
    receive_maximum: int | None = None
    topic_alias_maximum: int | None = None
    topic_alias: int | None = None
    maximum_qos: int | None = None
    retain_available: int | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    maximum_packet_size: int | None = None
    wildcard_subscription_available: int | None = None
    subscription_identifier_available: int | None = None
    shared_subscription_available: int | None = None

    def __repr__(self) -> str:
        # Only the properties that are present: a full repr is 27 fields of mostly None.
        present = (
            f"{field.name}={value!r}"
            for field in fields(self)
            if (value := getattr(self, field.name)) is not None and value != ()
        )
        return f"Properties({', '.join(present)})"


EMPTY_PROPERTIES = Properties()


@record
class Will:
    """The Will Message carried in CONNECT (3.1.1 section 3.1.2.5, 5.0 section 3.1.3.2)."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = EMPTY_PROPERTIES


@record
class Connect:
    """CONNECT (3.1.1 section 3.1, 5.0 section 3.1). `clean_start` is 3.1.1's Clean Session."""

    packet_type: ClassVar[PacketType] = PacketType.CONNECT
    protocol_name: str
    protocol_level: int
    clean_start: bool
    keep_alive: int
    client_id: str
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = EMPTY_PROPERTIES


@record
class Connack:
    """CONNACK (3.1.1 section 3.2, 5.0 section 3.2). For levels 3/4 see `connack_code_for`."""

    packet_type: ClassVar[PacketType] = PacketType.CONNACK
    session_present: bool
    reason_code: int
    properties: Properties = EMPTY_PROPERTIES


@record
class Publish:
    """PUBLISH (3.1.1 section 3.3, 5.0 section 3.3); `packet_id` is None exactly at QoS 0.

    `raw` is the whole packet as received, set by the decoder on the common PUBLISH (no
    properties, at most `codec.RAW_PUBLISH_MAX` bytes) so that the broker can forward those
    bytes instead of encoding them again; None otherwise. It is no part of the record's value
    (not compared, hashed or shown) and not an `__init__` argument, so `dataclasses.replace`
    drops it: a changed copy never carries bytes that no longer describe it.
    """

    packet_type: ClassVar[PacketType] = PacketType.PUBLISH
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    properties: Properties = EMPTY_PROPERTIES
    raw: bytes | None = field(default=None, init=False, compare=False, repr=False)


@record
class Puback:
    """PUBACK (3.1.1 section 3.4, 5.0 section 3.4)."""

    packet_type: ClassVar[PacketType] = PacketType.PUBACK
    packet_id: int
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


@record
class Pubrec:
    """PUBREC (3.1.1 section 3.5, 5.0 section 3.5)."""

    packet_type: ClassVar[PacketType] = PacketType.PUBREC
    packet_id: int
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


@record
class Pubrel:
    """PUBREL (3.1.1 section 3.6, 5.0 section 3.6)."""

    packet_type: ClassVar[PacketType] = PacketType.PUBREL
    packet_id: int
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


@record
class Pubcomp:
    """PUBCOMP (3.1.1 section 3.7, 5.0 section 3.7)."""

    packet_type: ClassVar[PacketType] = PacketType.PUBCOMP
    packet_id: int
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


@record
class Subscription:
    """One Topic Filter and its Subscription Options (5.0 section 3.8.3.1)."""

    topic_filter: str
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@record
class Subscribe:
    """SUBSCRIBE (3.1.1 section 3.8, 5.0 section 3.8)."""

    packet_type: ClassVar[PacketType] = PacketType.SUBSCRIBE
    packet_id: int
    subscriptions: tuple[Subscription, ...]
    properties: Properties = EMPTY_PROPERTIES


@record
class Suback:
    """SUBACK (3.1.1 section 3.9, 5.0 section 3.9); 3.1.1 knows only 0, 1, 2 and 0x80."""

    packet_type: ClassVar[PacketType] = PacketType.SUBACK
    packet_id: int
    reason_codes: tuple[int, ...]
    properties: Properties = EMPTY_PROPERTIES


@record
class Unsubscribe:
    """UNSUBSCRIBE (3.1.1 section 3.10, 5.0 section 3.10)."""

    packet_type: ClassVar[PacketType] = PacketType.UNSUBSCRIBE
    packet_id: int
    topic_filters: tuple[str, ...]
    properties: Properties = EMPTY_PROPERTIES


@record
class Unsuback:
    """UNSUBACK (3.1.1 section 3.11, 5.0 section 3.11); 3.1.1 has no reason codes."""

    packet_type: ClassVar[PacketType] = PacketType.UNSUBACK
    packet_id: int
    reason_codes: tuple[int, ...] = ()
    properties: Properties = EMPTY_PROPERTIES


@record
class Pingreq:
    """PINGREQ (3.1.1 section 3.12, 5.0 section 3.12)."""

    packet_type: ClassVar[PacketType] = PacketType.PINGREQ


@record
class Pingresp:
    """PINGRESP (3.1.1 section 3.13, 5.0 section 3.13)."""

    packet_type: ClassVar[PacketType] = PacketType.PINGRESP


@record
class Disconnect:
    """DISCONNECT (3.1.1 section 3.14, 5.0 section 3.14)."""

    packet_type: ClassVar[PacketType] = PacketType.DISCONNECT
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


@record
class Auth:
    """AUTH (5.0 section 3.15); there is no such packet before 5.0."""

    packet_type: ClassVar[PacketType] = PacketType.AUTH
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


Packet: TypeAlias = (
    Connect
    | Connack
    | Publish
    | Puback
    | Pubrec
    | Pubrel
    | Pubcomp
    | Subscribe
    | Suback
    | Unsubscribe
    | Unsuback
    | Pingreq
    | Pingresp
    | Disconnect
    | Auth
)
