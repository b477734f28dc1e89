"""Diagnostics for the haproxy.cfg language and the `lb -c` report.

This module owns how a configuration problem is described and printed: an
`Origin` (file and line), a `Diagnostic` (one error or warning with the
keyword it concerns), the `ConfigError` raised when a configuration cannot be
used, and `format_report`, which renders diagnostics the way `haproxy -c`
does (HAProxy 2.6 src/errors.c: `[ALERT]    (pid) : config : parsing
[file:line] : ...` on stderr, `Configuration file is valid` on stdout).

Other modules (the TLS checks of `lb -c`, for instance) build their own
diagnostics with `Diagnostic.error(...)` / `Diagnostic.warning(...)` and pass
them to `format_report` together with the parser's.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class Severity(enum.Enum):
    """How bad a diagnostic is; the value is HAProxy's label for it."""

    ERROR = "ALERT"
    WARNING = "WARNING"
    #: An explanation for a valid choice with a cost worth knowing (lb's own keywords):
    #: printed like HAProxy's [NOTICE] lines, never "Warnings were found", never fatal
    #: under -dW.
    NOTICE = "NOTICE"


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a configuration object was written: a file and a 1-based line."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One configuration error or warning.

    `line` is None for problems that concern a whole file (it cannot be read)
    or no file at all; `keyword` is the directive the message is about
    (`'bind'`, `'server'`, ...) and is printed quoted before the message.
    `section` names the section (`"frontend emqx-tls"`) for filtering; it is
    not printed separately because messages that need it already say it.
    """

    file: str | None
    line: int | None
    severity: Severity
    keyword: str | None
    message: str
    section: str | None = None

    @classmethod
    def error(
        cls,
        file: str | None,
        line: int | None,
        keyword: str | None,
        message: str,
        section: str | None = None,
    ) -> Diagnostic:
        return cls(file, line, Severity.ERROR, keyword, message, section)

    @classmethod
    def warning(
        cls,
        file: str | None,
        line: int | None,
        keyword: str | None,
        message: str,
        section: str | None = None,
    ) -> Diagnostic:
        return cls(file, line, Severity.WARNING, keyword, message, section)

    @classmethod
    def notice(
        cls,
        file: str | None,
        line: int | None,
        keyword: str | None,
        message: str,
        section: str | None = None,
    ) -> Diagnostic:
        return cls(file, line, Severity.NOTICE, keyword, message, section)

    @property
    def is_error(self) -> bool:
        return self.severity is Severity.ERROR

    @property
    def is_warning(self) -> bool:
        return self.severity is Severity.WARNING

    @property
    def position(self) -> tuple[int, str, int]:
        """Sort key of a report: file-less problems first, then by file and line (as
        `haproxy -c`, which reports while it reads)."""
        if self.file is None:
            return (0, "", 0)
        return (1, self.file, self.line or 0)

    @property
    def text(self) -> str:
        """The message as `haproxy -c` prints it after `config : `."""
        body = f"'{self.keyword}' : {self.message}" if self.keyword else self.message
        if self.file is None:
            return body
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"parsing [{where}] : {body}"

    def __str__(self) -> str:
        return self.text


class ConfigError(Exception):
    """A configuration that cannot be used; carries every diagnostic found."""

    def __init__(self, diagnostics: Iterable[Diagnostic]) -> None:
        self.diagnostics: tuple[Diagnostic, ...] = tuple(diagnostics)
        errors = [d.text for d in self.diagnostics if d.is_error]
        super().__init__("\n".join(errors) or "invalid configuration")


def _label(severity: Severity, pid: int) -> str:
    # HAProxy pads "[LABEL]" to 10 columns before " (pid) : ".
    return f"{'[' + severity.value + ']':<10} ({pid}) : config : "


def format_report(diagnostics: Iterable[Diagnostic], pid: int) -> tuple[str, str, int]:
    """Render diagnostics like `haproxy -c -f FILE`.

    Returns (stderr_text, stdout_text, exit_code): exit 0 when there is no
    error (warnings allowed), 1 otherwise.
    """
    items = list(diagnostics)
    stderr_lines = [_label(d.severity, pid) + d.text for d in items]
    error_files: list[str] = []
    for diagnostic in items:
        if diagnostic.is_error and diagnostic.file and diagnostic.file not in error_files:
            error_files.append(diagnostic.file)
    has_errors = any(d.is_error for d in items)
    has_warnings = any(d.is_warning for d in items)
    for file in error_files:
        stderr_lines.append(
            _label(Severity.ERROR, pid) + f"Error(s) found in configuration file : {file}"
        )
    if has_errors:
        stderr_lines.append(_label(Severity.ERROR, pid) + "Fatal errors found in configuration.")
        stdout = ""
    else:
        stdout = ("Warnings were found.\n" if has_warnings else "") + (
            "Configuration file is valid\n"
        )
    stderr = "".join(line + "\n" for line in stderr_lines)
    return stderr, stdout, 1 if has_errors else 0
