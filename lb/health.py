"""Health of a server: HAProxy's rise/fall counter and the words it logs.

The state machine is check.c's (HAProxy 2.6): a server's `health` runs from 0 to
`rise + fall - 1`; the server is UP while health >= rise. A passed check adds one and, on
reaching `rise`, jumps to the top; a failed check takes one off and, on dropping below
`rise`, falls to 0. A server starts UP at health = `rise` ("up, but will fall down at first
failure", server.c), so one failed check takes a server that never answered down at start,
while a server that has passed a check since needs `fall` failures. The next check comes
after `inter` at full health, `downinter` while down at 0, `fastinter` in between
(srv_getinter()).

Log lines are HAProxy's own (srv_append_status, check.c set_server_check_status,
set_backend_down), e.g.:
    Server be/s1 is DOWN, reason: Layer4 connection problem, info: "Connection refused",
    check duration: 0ms. 1 active and 0 backup servers left. 0 sessions active, 0 requeued,
    0 remaining in queue.
    backend be has no server available!
This module is pure: no clock, no sockets (the scheduler is lb.checks).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

Transition = Literal["UP", "DOWN"]


class CheckStatus(enum.Enum):
    """HAProxy's check status codes (HCHK_STATUS_*) that lb's checks can end with (a TCP
    connect, tcp-check rules, mqtt-chk), and get_check_status_description()."""

    L4OK = "Layer4 check passed"
    L4TOUT = "Layer4 timeout"
    L4CON = "Layer4 connection problem"
    SOCKERR = "Socket error"
    L7OK = "Layer7 check passed"
    L7RSP = "Layer7 invalid response"
    L7TOUT = "Layer7 timeout"
    L7STS = "Layer7 wrong status"

    @property
    def passed(self) -> bool:
        return self in (CheckStatus.L4OK, CheckStatus.L7OK)

    @property
    def has_code(self) -> bool:
        """srv_append_status prints ", code: N" from HCHK_STATUS_L57DATA on."""
        return self in (CheckStatus.L7OK, CheckStatus.L7STS)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of one check: status, optional info (the errno text, the step of a
    tcp-check), duration, and for Layer 7 statuses HAProxy's check code (mqtt-chk: the
    CONNACK's return or reason code)."""

    status: CheckStatus
    info: str = ""
    duration: float = 0.0  # seconds
    code: int = 0

    @property
    def passed(self) -> bool:
        return self.status.passed

    def describe(self) -> str:
        """', reason: ..., [code: N, ]info: "...", check duration: Nms' as srv_append_status."""
        text = f", reason: {self.status.value}"
        if self.status.has_code:
            text += f", code: {self.code}"
        if self.info:
            escaped = self.info.replace('"', '\\"')
            text += f', info: "{escaped}"'
        return text + f", check duration: {round(self.duration * 1000)}ms"


class HealthState:
    """rise/fall counting for one server."""

    __slots__ = ("fall", "health", "rise")

    def __init__(self, rise: int, fall: int, *, up: bool = True) -> None:
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be at least 1")
        self.rise = rise
        self.fall = fall
        self.health = rise if up else 0

    @property
    def top(self) -> int:
        return self.rise + self.fall - 1

    @property
    def up(self) -> bool:
        return self.health >= self.rise

    def record(self, passed: bool) -> tuple[bool, Transition | None]:
        """Count one check; (whether health changed, the transition if any)."""
        was_up = self.up
        changed = False
        if passed:
            if self.health < self.top:
                self.health += 1
                changed = True
                if self.health >= self.rise:
                    self.health = self.top
        elif self.health > 0:
            self.health -= 1
            changed = True
            if self.health < self.rise:
                self.health = 0
        now_up = self.up
        if now_up and not was_up:
            return changed, "UP"
        if was_up and not now_up:
            return changed, "DOWN"
        return changed, None

    def interval(self, inter: float, fastinter: float | None, downinter: float | None) -> float:
        """Delay before the next check (srv_getinter)."""
        if self.health == self.top:
            return inter
        if self.health == 0:
            return downinter if downinter is not None else inter
        return fastinter if fastinter is not None else inter

    def status_words(self, *, drain: bool = False) -> str:
        """'2/3 UP', '0/2 DOWN' as the "status:" of a health check log line."""
        if self.up:
            return f"{self.health - self.rise + 1}/{self.fall} {'DRAIN' if drain else 'UP'}"
        return f"{self.health}/{self.rise} DOWN"


def server_title(backend: str, server: str, *, backup: bool) -> str:
    return f"{'Backup ' if backup else ''}Server {backend}/{server}"


def down_line(
    backend: str,
    server: str,
    *,
    backup: bool,
    result: CheckResult | None,
    active: int,
    backups: int,
    sessions: int,
    requeued: int,
    remaining: int,
) -> str:
    reason = result.describe() if result is not None else ""
    running_on_backup = " Running on backup." if backups and not active else ""
    return (
        f"{server_title(backend, server, backup=backup)} is DOWN{reason}. {active} active and "
        f"{backups} backup servers left.{running_on_backup} {sessions} sessions active, "
        f"{requeued} requeued, {remaining} remaining in queue."
    )


def up_line(
    backend: str,
    server: str,
    *,
    backup: bool,
    result: CheckResult | None,
    active: int,
    backups: int,
    requeued: int,
    queued: int,
) -> str:
    reason = result.describe() if result is not None else ""
    running_on_backup = " Running on backup." if backups and not active else ""
    return (
        f"{server_title(backend, server, backup=backup)} is UP{reason}. {active} active and "
        f"{backups} backup servers online.{running_on_backup} {requeued} sessions requeued, "
        f"{queued} total in queue."
    )


def check_line(backend: str, server: str, *, backup: bool, result: CheckResult, status: str) -> str:
    """`option log-health-checks`: one line per change of the check's health or status."""
    verdict = "succeeded" if result.passed else "failed"
    prefix = "backup " if backup else ""
    return (
        f"Health check for {prefix}server {backend}/{server} {verdict}{result.describe()}, "
        f"status: {status}."
    )


def no_server_line(backend: str) -> str:
    return f"backend {backend} has no server available!"
