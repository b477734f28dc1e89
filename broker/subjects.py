"""X.509 subject names for authorization attributes (seed 003 "X.509 属性").

Azure's ``authorizationAttributes`` give attributes to certificates by subject. This module
turns both sides into one comparable form: the subject strings an operator writes in the
config (:func:`parse_distinguished_name`: RFC 4514, the spaced form of Azure's examples and
OpenSSL's output, or OpenSSL's ``/C=US/CN=x`` form) and the DER Names of a verified chain
(:func:`decode_name`, X.690 DER of an X.501 Name, as lb's CHAIN_SUBJECTS TLV carries them).

A :data:`Subject` is the sorted tuple of (attribute type OID, value) pairs, values compared
the way X.520 caseIgnoreMatch does: NFKC, case folded, inner whitespace collapsed, ends
trimmed. RDN order is ignored (OpenSSL prints root-first, RFC 4514 leaf-first).
Pure functions; ValueError for anything malformed.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from typing import Final

__all__ = ["ATTRIBUTE_TYPES", "Subject", "decode_name", "normalized", "parse_distinguished_name"]

ATTRIBUTE_TYPES: Final[dict[str, str]] = {
    "CN": "2.5.4.3",
    "COMMONNAME": "2.5.4.3",
    "SN": "2.5.4.4",
    "SURNAME": "2.5.4.4",
    "SERIALNUMBER": "2.5.4.5",
    "C": "2.5.4.6",
    "COUNTRYNAME": "2.5.4.6",
    "L": "2.5.4.7",
    "LOCALITYNAME": "2.5.4.7",
    "ST": "2.5.4.8",
    "S": "2.5.4.8",
    "STATEORPROVINCENAME": "2.5.4.8",
    "STREET": "2.5.4.9",
    "O": "2.5.4.10",
    "ORGANIZATIONNAME": "2.5.4.10",
    "OU": "2.5.4.11",
    "ORGANIZATIONALUNITNAME": "2.5.4.11",
    "TITLE": "2.5.4.12",
    "GN": "2.5.4.42",
    "GIVENNAME": "2.5.4.42",
    "DC": "0.9.2342.19200300.100.1.25",
    "UID": "0.9.2342.19200300.100.1.1",
    "E": "1.2.840.113549.1.9.1",
    "EMAILADDRESS": "1.2.840.113549.1.9.1",
}
Subject = tuple[tuple[str, str], ...]


def _normalize_value(value: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", value).split()).casefold()


def normalized(pairs: Iterable[tuple[str, str]]) -> Subject:
    return tuple(sorted((oid, _normalize_value(value)) for oid, value in pairs))


def parse_distinguished_name(text: str) -> Subject:
    """A subject as written in a config, normalized for comparison.

    Accepts RFC 4514 (``CN=device,O=Contoso``), the spaced form Azure's examples and OpenSSL
    print (``CN = Contoso Root CA Cert, OU = Engineering, C = US``) and OpenSSL's slash form
    (``/C=US/O=Contoso/CN=device``). Order does not matter. Raises ValueError.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty subject")
    if text.startswith("/"):
        components = [part for part in text[1:].split("/") if part.strip()]
    else:
        components = _split_unescaped(text, ",;+")
    pairs: list[tuple[str, str]] = []
    for component in components:
        name, separator, raw = component.partition("=")
        if not separator:
            raise ValueError(f"{component.strip()!r} is not TYPE=VALUE")
        name = name.strip()
        oid = ATTRIBUTE_TYPES.get(name.upper().replace(" ", ""))
        if oid is None:
            if re.fullmatch(r"(?i:oid\.)?\d+(\.\d+)+", name):
                oid = name.lower().removeprefix("oid.")
            else:
                raise ValueError(f"unknown attribute type {name!r}")
        pairs.append((oid, _unescape(raw.strip())))
    return normalized(pairs)


def _split_unescaped(text: str, separators: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    index = 0
    while index < len(text):
        character = text[index]
        if character == "\\" and index + 1 < len(text):
            current.append(text[index : index + 2])
            index += 2
            continue
        if character == '"':
            quoted = not quoted
        elif character in separators and not quoted:
            parts.append("".join(current))
            current = []
            index += 1
            continue
        current.append(character)
        index += 1
    parts.append("".join(current))
    return parts


def _unescape(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        value = value[1:-1]
    if value.startswith("#"):
        raise ValueError(f"hex-encoded value {value!r} is not supported")
    out = bytearray()
    index = 0
    while index < len(value):
        character = value[index]
        if character == "\\" and index + 1 < len(value):
            pair = value[index + 1 : index + 3]
            if re.fullmatch(r"[0-9A-Fa-f]{2}", pair):
                out.append(int(pair, 16))
                index += 3
                continue
            out.extend(value[index + 1].encode())
            index += 2
            continue
        out.extend(character.encode())
        index += 1
    return out.decode("utf-8", "replace")


# DER (X.690) tags used by an X.501 Name.
TAG_SEQUENCE: Final = 0x30
TAG_SET: Final = 0x31
TAG_OID: Final = 0x06
STRING_TAGS: Final[dict[int, str]] = {
    0x0C: "utf-8",  # UTF8String
    0x13: "ascii",  # PrintableString
    0x14: "latin-1",  # TeletexString, read as Latin-1 like OpenSSL does
    0x16: "ascii",  # IA5String
    0x1A: "ascii",  # VisibleString
    0x1C: "utf-32-be",  # UniversalString
    0x1E: "utf-16-be",  # BMPString
}


def _der_item(data: bytes, offset: int) -> tuple[int, bytes, int]:
    """(tag, content, next offset) of the DER element at ``offset``; ValueError if bad."""
    if offset + 2 > len(data):
        raise ValueError("truncated DER element")
    tag = data[offset]
    length = data[offset + 1]
    offset += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or offset + count > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[offset : offset + count], "big")
        offset += count
    end = offset + length
    if end > len(data):
        raise ValueError("DER element overruns its container")
    return tag, data[offset:end], end


def _decode_oid(content: bytes) -> str:
    if not content:
        raise ValueError("empty OID")
    first = content[0]
    numbers = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    value = 0
    for byte in content[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            numbers.append(value)
            value = 0
    return ".".join(str(number) for number in numbers)


def decode_name(der: bytes) -> Subject:
    """A DER X.501 Name (as lb sends in its CHAIN_SUBJECTS TLV), normalized. ValueError."""
    tag, content, end = _der_item(der, 0)
    if tag != TAG_SEQUENCE or end != len(der):
        raise ValueError("not a DER Name")
    pairs: list[tuple[str, str]] = []
    offset = 0
    while offset < len(content):
        tag, relative_name, offset = _der_item(content, offset)
        if tag != TAG_SET:
            raise ValueError("RDN is not a SET")
        inner = 0
        while inner < len(relative_name):
            tag, attribute, inner = _der_item(relative_name, inner)
            if tag != TAG_SEQUENCE:
                raise ValueError("attribute is not a SEQUENCE")
            oid_tag, oid, position = _der_item(attribute, 0)
            value_tag, value, _ = _der_item(attribute, position)
            if oid_tag != TAG_OID:
                raise ValueError("attribute type is not an OID")
            encoding = STRING_TAGS.get(value_tag)
            text = value.hex() if encoding is None else value.decode(encoding, "replace")
            pairs.append((_decode_oid(oid), text))
    return normalized(pairs)
