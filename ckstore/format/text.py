"""Untrusted text: find and escape characters that a terminal or a log would act on.

Metric names, tag names, paths and messages can come from a store someone else
wrote. Printed raw, an escape sequence (``ESC ] 0 ; ...``) retitles or clears
the terminal, a newline forges a line of output, and a bidi override
(``U+202E``) reverses what the reader sees. Inputs holding such characters are
refused; output escapes them.
"""

from __future__ import annotations

import unicodedata

# Cc: C0/C1 controls and DEL; Cf: format (bidi overrides, zero-width); Zl/Zp: line and paragraph
# separators; Cs: lone surrogates (not text at all).
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def is_unsafe_char(ch: str) -> bool:
    return unicodedata.category(ch) in _UNSAFE_CATEGORIES


def has_unsafe_chars(text: str) -> bool:
    """True if ``text`` holds a control, format or line-separator character."""
    return not text.isprintable() and any(is_unsafe_char(ch) for ch in text)


def escape(text: str, *, keep_layout: bool = False) -> str:
    """``text`` with each unsafe character written as a Python escape (``\\x1b``, ``\\n``, ``\\u202e``).

    ``keep_layout`` leaves newlines and tabs alone, for text whose lines and
    columns the caller built from already escaped fields.
    """
    if text.isprintable():
        return text
    return "".join(
        ch if not is_unsafe_char(ch) or (keep_layout and ch in "\n\t") else ch.encode("unicode_escape", "backslashreplace").decode("ascii")
        for ch in text
    )
