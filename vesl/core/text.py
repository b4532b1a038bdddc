"""Text hygiene shared by stages, readers and reports: control characters out, errors one line long."""

from __future__ import annotations

import html
import re
import unicodedata

# Reject messages are capped so one hostile input cannot bloat the rejects file.
MAX_MESSAGE_CHARS = 500

_SPACE = re.compile(r"\s+")
_TAG = re.compile(r"<[^>]{0,500}>")
_SCRIPT = re.compile(r"<(script|style)\b[^>]{0,500}>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")


def normalize_text(text: str) -> str:
    """Control and format characters (NUL, bidi overrides, ...) become spaces; whitespace runs collapse."""
    text = "".join(" " if unicodedata.category(c)[0] == "C" else c for c in text)
    return _SPACE.sub(" ", text).strip()


def clean_text(text: str | None, limit: int) -> str:
    """Plain text for tagging: scripts and styles, HTML tags and entities, control characters and runs
    of space removed; cut to LIMIT characters."""
    if not text:
        return ""
    return normalize_text(html.unescape(_TAG.sub(" ", _SCRIPT.sub(" ", text[: limit * 4]))))[:limit]


def fmt(x: float | None, digits: int = 2) -> str:
    """X with DIGITS decimals, '-' for a missing figure."""
    return "-" if x is None else f"{x:.{digits}f}"


def describe_error(error: BaseException) -> str:
    """'Type: message' for a reject or a log line, without object reprs ('<_io.BytesIO object at
    0x7f...>' says nothing to a reader and differs on every run)."""
    return f"{type(error).__name__}: {_OBJECT_REPR.sub('', str(error))}"
