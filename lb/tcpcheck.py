"""tcp-check rules and `option mqtt-chk`, run as a sans-IO state machine (no sockets, no
clock): lb.checks does the connecting, sending, reading and timing, and asks `next()` what
to do; the machine answers Connect, Send, Receive or Finished with the check's result.

The semantics are HAProxy 2.6's (src/tcpcheck.c, src/check.c):

- A ruleset that does not start with `connect` gets an implicit one first, "step 0", which
  uses the server's check settings (check-send-proxy); an explicit `connect` sends a PROXY
  header only with `send-proxy`, or with `default` and the server's check-send-proxy.
- A `send` empties the input buffer (tcpcheck_eval_send); each `expect` matches the whole
  buffer (string/binary: a substring; rstring: a regex; rbinary: a regex over the upper
  case hex dump), waiting for more while it does not match and the connection is open,
  the buffer not full (tune.bufsize, 16384) and `min-recv` unset; `!` inverts it. A match
  consumes nothing: the next expect sees the same bytes.
- Words (tcpcheck_expect_onerror_message, chk_report_conn_err): a mismatch is "Layer7
  invalid response" with "TCPCHK did not match content 'OK' at step 3"; a close before any
  byte "TCPCHK got an empty response at step 3"; a timeout "Layer7 timeout" (Layer4 while
  connecting) with " at step 3 of tcp-check (expect string 'OK')"; a refused connection
  "Layer4 connection problem", "Connection refused at step 1 of tcp-check (connect)". The
  step of a rule is its place among the section's tcp-check lines, comments included.
- The last rule decides success: an expect or a send gives "Layer7 check passed" (code 0,
  info "(tcp-check)"), a connect "Layer4 check passed".

`option mqtt-chk` (ours) is a ruleset of its own: the implicit connect (so the PROXY header
of check-send-proxy, then) a CONNECT, and an expect of a CONNACK (lb.mqtt_check) that
accepts ("Layer7 check passed", its words as info), refuses ("Layer7 wrong status", the
code and its words) or is not one ("Layer7 invalid response"); after success the driver
sends DISCONNECT (`Finished.farewell`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from lb.config.model import MqttCheck, TcpCheckRule
from lb.health import CheckResult, CheckStatus
from lb.mqtt_check import (
    MQTT_CHECK_KEEPALIVE,
    NEED_MORE,
    ConnackError,
    encode_connect,
    encode_disconnect,
    parse_connack,
)

__all__ = [
    "BUFFER_SIZE",
    "Connect",
    "Finished",
    "Receive",
    "Send",
    "TcpCheck",
    "mqtt_check",
]

#: HAProxy's check buffers are tune.bufsize (16384) bytes; a full one ends the reading.
BUFFER_SIZE: Final = 16384


@dataclass(frozen=True, slots=True)
class ConnackStep:
    """mqtt-chk's expect: a whole CONNACK."""

    index: int
    level: int
    comment: str | None = None
    action: Literal["connack"] = "connack"


Step = TcpCheckRule | ConnackStep


@dataclass(frozen=True, slots=True)
class Connect:
    """Connect (closing any connection of an earlier step). `rule` is None for the implicit
    connect; the driver decides the target and the PROXY header from it and the server."""

    rule: TcpCheckRule | None


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class Receive:
    """Read what comes (report it with `received`, `closed`, `read_failed` or `timed_out`)."""


@dataclass(frozen=True, slots=True)
class Finished:
    """The check is over; its result (the driver sets the duration) and the bytes to send
    before closing (mqtt-chk's DISCONNECT after a CONNACK that accepted)."""

    result: CheckResult
    farewell: bytes = b""


RECEIVE: Final = Receive()
Action = Connect | Send | Receive | Finished


def mqtt_check(check: MqttCheck, client_id: str) -> TcpCheck:
    """The run of `option mqtt-chk`: [implicit connect,] CONNECT, expect CONNACK."""
    level = 5 if check.version == "5.0" else 4
    connect = encode_connect(level, client_id, MQTT_CHECK_KEEPALIVE)
    steps: list[Step] = [
        TcpCheckRule(check.origin, "send", 0, comment="CONNECT", data=connect),
        ConnackStep(1, level, comment="CONNACK"),
    ]
    return TcpCheck(steps, name="mqtt-chk", farewell=encode_disconnect(level))


class TcpCheck:
    """One run of a ruleset against one server (see the module docstring)."""

    __slots__ = (
        "buffer",
        "current",
        "eof",
        "farewell",
        "finished",
        "is_connected",
        "must_read",
        "name",
        "position",
        "steps",
    )

    def __init__(
        self, rules: Sequence[Step], *, name: str = "tcp-check", farewell: bytes = b""
    ) -> None:
        steps: list[Step | None] = list(rules)
        first = next((step for step in steps if step is None or step.action != "comment"), None)
        if first is None or first.action != "connect":
            steps.insert(0, None)  # the implicit connect, "step 0"
        self.steps = steps
        self.name = name
        self.farewell = farewell
        self.position = 0
        self.current: Step | None = None
        self.buffer = bytearray()
        self.eof = False
        self.must_read = False
        self.is_connected = False
        self.finished: Finished | None = None

    # -- what to do next ---------------------------------------------------------------------

    def next(self) -> Action:
        if self.finished is not None:
            return self.finished
        while self.position < len(self.steps):
            step = self.steps[self.position]
            if step is not None and step.action == "comment":
                self.position += 1
                continue
            self.current = step
            if step is None or step.action == "connect":
                assert step is None or isinstance(step, TcpCheckRule)
                return Connect(step)
            if step.action == "send":
                assert isinstance(step, TcpCheckRule)
                return Send(step.data)
            action = self._expect(step)
            if action is not None:
                return action
            self.position += 1
        return self._finish(self._success())

    def _success(self) -> CheckResult:
        last = next((s for s in reversed(self.steps) if s is None or s.action != "comment"), None)
        if last is None:
            return CheckResult(CheckStatus.L4OK)
        if last.action == "connect":
            return CheckResult(CheckStatus.L4OK, "(tcp-check)")
        return CheckResult(CheckStatus.L7OK, "(tcp-check)")

    # -- what happened -------------------------------------------------------------------------

    def connected(self) -> None:
        self.is_connected = True
        self.buffer = bytearray()
        self.eof = False
        self.must_read = True
        self.position += 1

    def connect_failed(self, words: str) -> None:
        self._finish(CheckResult(CheckStatus.L4CON, words + self._where()))

    def sent(self) -> None:
        # tcpcheck_eval_send: "Always release input buffer when a new send is evaluated".
        self.buffer = bytearray()
        self.must_read = True
        self.position += 1

    def send_failed(self, words: str) -> None:
        self._finish(CheckResult(CheckStatus.SOCKERR, words + self._where()))

    def received(self, data: bytes) -> None:
        room = BUFFER_SIZE - len(self.buffer)
        self.buffer += data[:room]
        self.must_read = False

    def closed(self) -> None:
        self.eof = True
        self.must_read = False

    def read_failed(self, words: str) -> None:
        """A reset or other error while reading: with no byte in, a socket error; with some,
        HAProxy judges what came ("an RST ... is reported as an error just after the last
        data chunk")."""
        if not self.buffer:
            self._finish(CheckResult(CheckStatus.SOCKERR, words + self._where()))
        else:
            self.closed()

    def timed_out(self) -> None:
        connecting = not self.is_connected or (
            self.current is None or self.current.action == "connect"
        )
        status = CheckStatus.L4TOUT if connecting else CheckStatus.L7TOUT
        self._finish(CheckResult(status, self._where()))

    # -- expect ------------------------------------------------------------------------------

    def _expect(self, step: Step) -> Action | None:
        """Receive, a Finished failure, or None when the expectation holds."""
        if self.must_read and not self.buffer and not self.eof:
            return RECEIVE
        if not self.buffer and self.eof and isinstance(step, ConnackStep):
            words = f"no CONNACK: the connection was closed{self._where()}"
            return self._finish(CheckResult(CheckStatus.L7RSP, words))
        if not self.buffer and self.eof:
            words = f"TCPCHK got an empty response at step {step.index + 1}"
            if step.comment:
                words += f" comment: '{step.comment}'"
            return self._finish(CheckResult(CheckStatus.L7RSP, words))
        last_read = self.eof or len(self.buffer) >= BUFFER_SIZE
        if isinstance(step, ConnackStep):
            return self._expect_connack(step, last_read)
        buffer = self.buffer
        if not last_read:
            if step.match in ("string", "binary") and len(buffer) < len(step.pattern):
                return RECEIVE
            if step.min_recv > 0 and len(buffer) < step.min_recv:
                return RECEIVE
        if step.match in ("string", "binary"):
            matched = step.pattern in buffer
        elif step.match == "rstring":
            matched = re.search(step.pattern, bytes(buffer)) is not None
        else:  # rbinary: over the hex dump, as HAProxy's dump_binary
            matched = re.search(step.pattern, buffer.hex().upper().encode()) is not None
        if not matched and not last_read and step.min_recv == -1:
            return RECEIVE
        if matched != step.inverse:
            return None
        return self._finish(CheckResult(CheckStatus.L7RSP, _mismatch(step, matched)))

    def _expect_connack(self, step: ConnackStep, last_read: bool) -> Action | None:
        try:
            connack = parse_connack(self.buffer, step.level)
        except ConnackError as error:
            return self._finish(CheckResult(CheckStatus.L7RSP, f"{error}{self._where()}"))
        if connack == NEED_MORE or isinstance(connack, str):
            if last_read:
                return self._finish(
                    CheckResult(
                        CheckStatus.L7RSP, f"connection closed inside a CONNACK{self._where()}"
                    )
                )
            return RECEIVE
        if not connack.accepted:
            return self._finish(CheckResult(CheckStatus.L7STS, connack.words, code=connack.code))
        self.position += 1
        self.finished = Finished(CheckResult(CheckStatus.L7OK, connack.words), self.farewell)
        return self.finished

    # -- words -----------------------------------------------------------------------------

    def _finish(self, result: CheckResult) -> Finished:
        self.finished = Finished(result)
        return self.finished

    def _where(self) -> str:
        """chk_report_conn_err's " at step N of tcp-check (...)" for the current step."""
        step = self.current
        if step is None:
            return f" at initial connection step of {self.name}"
        text = f" at step {step.index + 1} of {self.name}"
        if isinstance(step, ConnackStep):
            text += " (expect CONNACK)"
        elif step.action == "connect":
            text += f" (connect port {step.port})" if step.port else " (connect)"
        elif step.action == "send":
            text += " (send)"
        elif step.match == "string":
            text += f" (expect string '{_c_string(step.pattern)}')"
        elif step.match == "binary":
            text += f" (expect binary '{_c_string(step.pattern)}')"
        elif step.match == "rstring":
            text += " (expect regex)"
        else:
            text += " (expect binary regex)"
        if step.comment and not isinstance(step, ConnackStep):
            text += f" comment: '{step.comment}'"
        return text


def _mismatch(rule: TcpCheckRule, matched: bool) -> str:
    """tcpcheck_expect_onerror_message's words for an expect that failed."""
    text = "TCPCHK matched unwanted content" if matched else "TCPCHK did not match content"
    step = rule.index + 1
    if rule.match == "string":
        text += f" '{_c_string(rule.pattern)}' at step {step}"
    elif rule.match == "binary":
        text += f" (binary) at step {step}"
    elif rule.match == "rstring":
        text += f" (regex) at step {step}"
    else:
        text += f" (binary regex) at step {step}"
    if rule.comment:
        text += f" comment: {rule.comment}"
    return text


def _c_string(pattern: bytes) -> str:
    """How HAProxy's "%.*s" of a pattern reads in its log: up to the first NUL, with other
    control bytes as <XX> (its log encoding)."""
    text = []
    for byte in pattern.split(b"\x00", 1)[0]:
        text.append(chr(byte) if 0x20 <= byte < 0x7F else f"<{byte:02X}>")
    return "".join(text)
