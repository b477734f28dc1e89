"""Lexer for the haproxy.cfg language: text -> `Line(file, lineno, words)`.

Owns HAProxy's word-splitting rules (HAProxy 2.6 src/tools.c `parse_line`,
configuration.txt section 2.2 "Quoting and escaping" and 2.3 "Environment
variables"):

- words are separated by spaces and tabs; `#` outside quotes starts a comment;
- `'...'` is taken verbatim (no escapes, no variables);
- `"..."` allows backslash escapes and `${VAR}` expansion;
- outside quotes, backslash escapes and `${VAR}` also apply;
- escapes: `\\\\`, `\\ `, `\\#`, `\\'`, `\\"`, `\\$`, `\\r`, `\\n`, `\\t`, `\\xHH`;
  any other backslash pair is kept as written, like HAProxy;
- `${VAR}` is replaced by the variable's value and `${VAR-default}` by the
  default when the variable is unset. Unlike HAProxy 2.6, which silently
  expands an unset variable to an empty string, an unset variable without a
  default is an error naming it;
- there is no line continuation: a backslash at the end of a line is an error.

Lines with a lexing error are reported as diagnostics and not yielded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from lb.config.errors import Diagnostic

_SIMPLE_ESCAPES = {
    "\\": "\\",
    " ": " ",
    "#": "#",
    "'": "'",
    '"': '"',
    "$": "$",
    "r": "\r",
    "n": "\n",
    "t": "\t",
}
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


@dataclass(frozen=True, slots=True)
class Line:
    """One non-empty configuration line split into words."""

    file: str
    lineno: int
    words: tuple[str, ...]


class _LexError(Exception):
    pass


def _expand_variable(text: str, start: int, environ: Mapping[str, str]) -> tuple[str, int]:
    """Expand `${...}` at text[start] (the `$`); return (value, index after `}`)."""
    end = text.find("}", start + 2)
    if end < 0:
        raise _LexError(f"missing '}}' after '${{' at position {start + 1}")
    body = text[start + 2 : end]
    name, has_default, default = body.partition("-")
    if not name or not all(c.isalnum() or c == "_" for c in name):
        raise _LexError(f"invalid environment variable name '{name}' in '${{{body}}}'")
    if name in environ:
        return environ[name], end + 1
    if has_default:
        return default, end + 1
    raise _LexError(f"environment variable '{name}' is not set")


def split_words(text: str, environ: Mapping[str, str]) -> tuple[str, ...]:
    """Split one line into words; raises `_LexError` on a lexing error."""
    words: list[str] = []
    current: list[str] = []
    in_word = False
    quote = ""  # "'" or '"' while inside quotes
    quote_start = 0
    index = 0
    length = len(text)
    while index < length:
        char = text[index]
        if quote == "'":
            if char == "'":
                quote = ""
            else:
                current.append(char)
            index += 1
            continue
        if char == "\\":
            if index + 1 >= length:
                raise _LexError("backslash at end of line (line continuation is not supported)")
            following = text[index + 1]
            if following in _SIMPLE_ESCAPES:
                current.append(_SIMPLE_ESCAPES[following])
                index += 2
            elif (
                following == "x"
                and index + 3 < length
                and text[index + 2] in _HEX_DIGITS
                and text[index + 3] in _HEX_DIGITS
            ):
                current.append(chr(int(text[index + 2 : index + 4], 16)))
                index += 4
            else:
                current.append(char + following)
                index += 2
            in_word = True
            continue
        if char == "$" and text.startswith("${", index):
            value, index = _expand_variable(text, index, environ)
            current.append(value)
            in_word = True
            continue
        if quote == '"':
            if char == '"':
                quote = ""
            else:
                current.append(char)
            index += 1
            continue
        if char in "'\"":
            quote = char
            quote_start = index
            in_word = True
            index += 1
            continue
        if char in " \t":
            if in_word:
                words.append("".join(current))
                current = []
                in_word = False
            index += 1
            continue
        if char == "#":
            break
        current.append(char)
        in_word = True
        index += 1
    if quote:
        raise _LexError(f"unmatched quote at position {quote_start + 1}")
    if in_word:
        words.append("".join(current))
    return tuple(words)


def tokenize(
    text: str, file: str, environ: Mapping[str, str]
) -> tuple[tuple[Line, ...], tuple[Diagnostic, ...]]:
    """Split a whole configuration text into lines of words.

    Blank and comment-only lines are dropped. Returns the lines and the
    lexing errors (one per faulty line).
    """
    lines: list[Line] = []
    errors: list[Diagnostic] = []
    # Lines end at LF (a CR before it belongs to the line break), as in HAProxy's
    # readcfgfile and in the editor that shows the operator the line number: str.splitlines
    # would also break at VT, FF, FS, GS, RS, NEL and U+2028, and count lines differently.
    for lineno, text_line in enumerate(text.split("\n"), start=1):
        raw = text_line.removesuffix("\r")
        try:
            words = split_words(raw, environ)
        except _LexError as error:
            errors.append(Diagnostic.error(file, lineno, None, str(error)))
            continue
        if words:
            lines.append(Line(file, lineno, words))
    return tuple(lines), tuple(errors)
