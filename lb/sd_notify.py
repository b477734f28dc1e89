"""systemd's service notification protocol (sd_notify(3)), spoken by lb's master and the broker.

A service of ``Type=notify`` tells systemd how it is doing with datagrams on the unix socket
named by ``$NOTIFY_SOCKET``: newline-separated ``KEY=VALUE`` assignments, of which we send
``READY=1`` (serving), ``RELOADING=1`` with ``MONOTONIC_USEC`` (reloading; systemd waits for
the next ``READY=1``), ``STOPPING=1`` and ``STATUS=`` (one line of free text that
``systemctl status`` shows). A socket path that starts with ``@`` is in the abstract
namespace. HAProxy sends the same messages with ``-Ws``.

Without ``$NOTIFY_SOCKET`` (not started by systemd) a :class:`Notifier` does nothing, as
sd_notify() returns 0 there. A failed send is logged once and never raised: a service must
not fail because its supervisor went away. The variable is taken out of the environment
when read, so that no child the service starts talks to systemd in its name.

This module depends on nothing else in lb or broker: both import it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

logger = logging.getLogger(__name__)

ENVIRONMENT_VARIABLE = "NOTIFY_SOCKET"
#: sd_notify(3) caps nothing, but a datagram socket does; STATUS= lines are cut to this.
MAX_STATUS = 1024


def encode(fields: Mapping[str, str | int]) -> bytes:
    """The datagram for ``fields``: ``KEY=VALUE`` lines. A value is one line (systemd reads
    a newline as the end of the assignment), so newlines in free text become spaces."""
    lines = []
    for key, value in fields.items():
        if not key or not key.replace("_", "").isalnum() or not key.isupper():
            raise ValueError(f"sd_notify: {key!r} is not a notification field name")
        text = str(value).replace("\n", " ")
        if key == "STATUS":
            text = text[:MAX_STATUS]
        lines.append(f"{key}={text}")
    return ("\n".join(lines) + "\n").encode()


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock RELOADING=1's MONOTONIC_USEC is read on."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def socket_address(value: str) -> str | bytes | None:
    """The address to send to for a ``$NOTIFY_SOCKET`` value; None for an unusable one."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None  # empty, relative, or vsock:CID:PORT (not a unix socket)


class Notifier:
    """Sends notifications to systemd; does nothing when not started by systemd."""

    __slots__ = ("_address", "_failed", "_socket")

    def __init__(self, address: str | bytes | None) -> None:
        self._address = address
        self._socket: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True
    ) -> Notifier:
        """The notifier ``$NOTIFY_SOCKET`` asks for (removed from ``environ`` by default)."""
        environment = os.environ if environ is None else environ
        if unset:
            value = environment.pop(ENVIRONMENT_VARIABLE, None)
        else:
            value = environment.get(ENVIRONMENT_VARIABLE)
        if value is None:
            return cls(None)
        address = socket_address(value)
        if address is None:
            logger.warning("%s=%r: not a unix socket; not notifying", ENVIRONMENT_VARIABLE, value)
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one notification; True when systemd's socket took it."""
        if self._address is None:
            return False
        data = encode(fields)
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto(data, self._address)
        except OSError as error:
            if not self._failed:
                logger.warning("sd_notify: cannot notify %r: %s", self._address, error)
                self._failed = True
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=status)

    def reloading(self, status: str) -> bool:
        return self.notify(RELOADING=1, MONOTONIC_USEC=monotonic_usec(), STATUS=status)

    def stopping(self, status: str) -> bool:
        return self.notify(STOPPING=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.notify(STATUS=status)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
