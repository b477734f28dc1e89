"""Lexer vectors: quoting, escapes, comments and environment variables."""

from __future__ import annotations

import pytest

from lb.config.lexer import Line, tokenize

ENVIRON = {"HOME": "/home/lb", "EMPTY": "", "SPACED": "a b"}

VECTORS = [
    ("bind *:8091", ("bind", "*:8091")),
    ("  \tbind\t  *:8091   ", ("bind", "*:8091")),
    ("maxconn 100 # comment", ("maxconn", "100")),
    ("pidfile /tmp/a#b", ("pidfile", "/tmp/a")),
    ("log-format 'a b'", ("log-format", "a b")),
    ("x 'it\\s'", ("x", "it\\s")),  # no escapes in single quotes
    ("x '${HOME}'", ("x", "${HOME}")),  # no variables in single quotes
    ('x "a b"', ("x", "a b")),
    ('x "q\\"x"', ("x", 'q"x')),
    ('x "${HOME}/certs"', ("x", "/home/lb/certs")),
    ("x ${HOME}", ("x", "/home/lb")),
    ('x "${SPACED}"', ("x", "a b")),
    ("x ${SPACED}", ("x", "a b")),  # one word: expansion happens inside the word
    ('x ""', ("x", "")),
    ("x ''", ("x", "")),
    ('x a"b c"d', ("x", "ab cd")),
    ("x a\\ b", ("x", "a b")),
    ("x a\\#b", ("x", "a#b")),
    ("x \\\\", ("x", "\\")),
    ("x \\$HOME", ("x", "$HOME")),
    ("x $HOME", ("x", "$HOME")),  # only ${VAR} is expanded
    ('x "\\t\\r\\n"', ("x", "\t\r\n")),
    ("x \\x41\\x7a", ("x", "Az")),
    ("x \\q", ("x", "\\q")),  # unknown escapes are kept
    ("x '#' \"#\"", ("x", "#", "#")),
    ("x ${NOPE-fallback}", ("x", "fallback")),
    ("x ${EMPTY}y", ("x", "y")),
]


@pytest.mark.parametrize(("text", "words"), VECTORS)
def test_vectors(text: str, words: tuple[str, ...]) -> None:
    lines, errors = tokenize(text, "t.cfg", ENVIRON)
    assert errors == ()
    assert lines == (Line("t.cfg", 1, words),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x 'open", "unmatched quote at position 3"),
        ('x "open', "unmatched quote at position 3"),
        ("x ${NOPE}", "environment variable 'NOPE' is not set"),
        ('x "${NOPE}"', "environment variable 'NOPE' is not set"),
        ("x ${HOME", "missing '}' after '${' at position 3"),
        ("x ${A B}", "invalid environment variable name 'A B' in '${A B}'"),
        ("x a\\", "backslash at end of line (line continuation is not supported)"),
    ],
)
def test_errors(text: str, message: str) -> None:
    lines, errors = tokenize(text, "t.cfg", ENVIRON)
    assert lines == ()
    assert [(e.file, e.line, e.message) for e in errors] == [("t.cfg", 1, message)]


def test_line_numbers_skip_blank_and_comment_lines() -> None:
    text = "# header\n\nglobal\n   # indented comment\n    maxconn 10\n"
    lines, errors = tokenize(text, "t.cfg", {})
    assert errors == ()
    assert [(line.lineno, line.words) for line in lines] == [
        (3, ("global",)),
        (5, ("maxconn", "10")),
    ]


def test_every_bad_line_is_reported_and_the_rest_kept() -> None:
    text = "a 'x\nb ok\nc ${NOPE}\nd ok\n"
    lines, errors = tokenize(text, "t.cfg", {})
    assert [line.words[0] for line in lines] == ["b", "d"]
    assert [error.line for error in errors] == [1, 3]


def test_lines_end_at_lf_only() -> None:
    # Found by the fuzzer (tests/fuzz, target haproxy-cfg): str.splitlines also broke lines
    # at FS, VT, FF, NEL and U+2028, so a stray control character split one line into two
    # and every later error named the wrong line. Like HAProxy, only LF ends a line (with
    # the CR of a CRLF); other control characters are part of a word.
    text = "global\r\n    maxconn\x1c10\x0c\n\n  nbthread 2\u2028x\r\n"
    lines, errors = tokenize(text, "t.cfg", {})
    assert errors == ()
    assert [(line.lineno, line.words) for line in lines] == [
        (1, ("global",)),
        (2, ("maxconn\x1c10\x0c",)),
        (4, ("nbthread", "2\u2028x")),
    ]
