"""The `lb -c` report mimics `haproxy -c` (HAProxy 2.6 src/errors.c)."""

from __future__ import annotations

import pytest

from lb.config import ConfigError, load_config_text
from lb.config.errors import Diagnostic, Severity, format_report


def test_valid() -> None:
    assert format_report([], 42) == ("", "Configuration file is valid\n", 0)


def test_warnings_only() -> None:
    warning = Diagnostic.warning("x.cfg", 3, "server", "'s1' has a problem")
    stderr, stdout, code = format_report([warning], 42)
    assert (
        stderr == "[WARNING]  (42) : config : parsing [x.cfg:3] : 'server' : 's1' has a problem\n"
    )
    assert stdout == "Warnings were found.\nConfiguration file is valid\n"
    assert code == 0


def test_errors_and_warnings() -> None:
    diagnostics = [
        Diagnostic.error("x.cfg", 12, "bind", "unknown option 'vrify'"),
        Diagnostic.warning("x.cfg", 13, None, "something odd"),
        Diagnostic.error("y.cfg", 1, None, "unknown keyword 'foo' out of section"),
        Diagnostic.error(None, None, None, "Could not open configuration file z.cfg : gone"),
    ]
    stderr, stdout, code = format_report(diagnostics, 7)
    assert stderr.splitlines() == [
        "[ALERT]    (7) : config : parsing [x.cfg:12] : 'bind' : unknown option 'vrify'",
        "[WARNING]  (7) : config : parsing [x.cfg:13] : something odd",
        "[ALERT]    (7) : config : parsing [y.cfg:1] : unknown keyword 'foo' out of section",
        "[ALERT]    (7) : config : Could not open configuration file z.cfg : gone",
        "[ALERT]    (7) : config : Error(s) found in configuration file : x.cfg",
        "[ALERT]    (7) : config : Error(s) found in configuration file : y.cfg",
        "[ALERT]    (7) : config : Fatal errors found in configuration.",
    ]
    assert stdout == ""
    assert code == 1


def test_file_level_diagnostic() -> None:
    diagnostic = Diagnostic.error("certs/a.pem", None, "bind", "no such file")
    assert diagnostic.text == "parsing [certs/a.pem] : 'bind' : no such file"
    assert diagnostic.severity is Severity.ERROR and diagnostic.is_error


def test_load_result_raises_with_every_diagnostic() -> None:
    result = load_config_text("global\n    maxconn x\n    nbthread y\n", "t.cfg")
    with pytest.raises(ConfigError) as raised:
        result.config_or_raise()
    assert len(raised.value.diagnostics) == 2
    assert str(raised.value).splitlines() == [
        "parsing [t.cfg:2] : 'maxconn' : expects an integer >= 1, got 'x'",
        "parsing [t.cfg:3] : 'nbthread' : expects an integer from 1 to 4096, got 'y'",
    ]


def test_diagnostics_are_sorted_by_file_and_line() -> None:
    result = load_config_text(
        "frontend fe\n    bind :1\n    default_backend nope\n    bind :1 vrify none\n", "t.cfg"
    )
    assert [(d.line, d.severity) for d in result.diagnostics] == [
        (3, Severity.ERROR),
        (4, Severity.ERROR),
    ]
