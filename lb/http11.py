"""Small HTTP/1.1 servers on asyncio streams with h11 (the sans-IO parser STYLE.md takes as
its model): lb's Prometheus endpoint (lb.prometheus) and the broker's admin API
(broker.admin). Not a hot path (STYLE.md rule 6): streams are fine.

:func:`read_request` returns the next request once its body is in, bounded: a head over
``max_head`` bytes raises h11's RemoteProtocolError with status hint 431, a body over
``max_body`` one with 413, garbage one with 400; :func:`respond` writes a whole response.
:func:`basic_credentials` reads an ``Authorization: Basic`` header.

A leaf module (nothing else of lb), so the broker imports it (tests/test_layering.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import http
from collections.abc import Sequence

import h11

__all__ = ["Headers", "basic_credentials", "header", "read_request", "respond", "respond_error"]

Headers = Sequence[tuple[bytes, bytes]]


async def read_request(
    reader: asyncio.StreamReader, connection: h11.Connection, max_head: int, max_body: int
) -> h11.Request | None:
    """The next request of ``connection`` once its body (dropped) is in; None at EOF.

    h11 checks its max_incomplete_event_size only on a head it has not parsed yet, so it is
    fed at most one byte past ``max_head`` before the request is in: a large head that
    arrives whole gets 431 too. The connection should be made with
    ``max_incomplete_event_size=max_head``.
    """
    request: h11.Request | None = None
    body = 0
    fed = 0
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            if connection.they_are_waiting_for_100_continue:
                raise h11.RemoteProtocolError("Expect: 100-continue is not supported", 417)
            size = 16384 if request is not None else max_head + 1 - fed
            data = await reader.read(max(size, 1))
            fed += len(data)
            connection.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += len(event.data)
            if body > max_body:
                raise h11.RemoteProtocolError("request body too large", 413)
        elif isinstance(event, h11.EndOfMessage):
            return request
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def respond(
    writer: asyncio.StreamWriter,
    connection: h11.Connection,
    status: int,
    content_type: str,
    body: bytes,
    headers: Sequence[tuple[str, str]] = (),
    send_body: bool = True,
) -> None:
    """One whole response; ``send_body`` False for HEAD (the length is still the body's)."""
    fields = [
        ("content-type", content_type),
        ("content-length", str(len(body))),
        ("cache-control", "no-cache"),
        *headers,
    ]
    response = h11.Response(
        status_code=status, headers=fields, reason=http.HTTPStatus(status).phrase.encode()
    )
    data = connection.send(response) or b""
    if send_body and body:
        data += connection.send(h11.Data(data=body)) or b""
    data += connection.send(h11.EndOfMessage()) or b""
    writer.write(data)
    await writer.drain()


async def respond_error(
    writer: asyncio.StreamWriter, connection: h11.Connection, error: h11.RemoteProtocolError
) -> None:
    """Answer a request h11 refused (431, 413, 400), when it is still our turn to answer."""
    if connection.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    status = error.error_status_hint
    await respond(
        writer,
        connection,
        status,
        "text/plain",
        f"{status} {http.HTTPStatus(status).phrase}: {error}\n".encode(),
        (("connection", "close"),),
    )


def header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case, as h11 gives names)."""
    return next((value for key, value in headers if key == name), None)


def basic_credentials(headers: Headers) -> tuple[str, bytes] | None:
    """(user, password) of an ``Authorization: Basic`` header (RFC 7617), or None."""
    value = header(headers, b"authorization")
    if value is None:
        return None
    scheme, _, credentials = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, separator, password = decoded.partition(b":")
    if not separator:
        return None
    return user.decode("utf-8", "replace"), password
