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


# html.unescape's own pattern for one character reference (named, decimal or hex; the ';' optional)
_CHARREF = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")


class _Traced:
    """A text whose every character remembers the range [lo, hi) of the original text it came from."""

    def __init__(self, text: str) -> None:
        self.chars = list(text)
        self.lo = list(range(len(text)))
        self.hi = list(range(1, len(text) + 1))

    def sub(self, pattern: re.Pattern, repl) -> None:
        """re.sub(PATTERN, REPL, text) where REPL(match) -> str; the replacement's characters all come from
        the whole match's original range."""
        text = "".join(self.chars)
        chars, lo, hi, pos = [], [], [], 0
        for m in pattern.finditer(text):
            chars += self.chars[pos:m.start()]
            lo += self.lo[pos:m.start()]
            hi += self.hi[pos:m.start()]
            new = repl(m)
            chars += list(new)
            lo += [self.lo[m.start()]] * len(new)
            hi += [self.hi[m.end() - 1]] * len(new)
            pos = m.end()
        self.chars, self.lo, self.hi = chars + self.chars[pos:], lo + self.lo[pos:], hi + self.hi[pos:]

    def keep(self, start: int, end: int) -> None:
        self.chars, self.lo, self.hi = self.chars[start:end], self.lo[start:end], self.hi[start:end]


def clean_text_map(text: str | None, limit: int) -> tuple[str, list[tuple[int, int]] | None]:
    """`clean_text(TEXT, LIMIT)` and where each of its characters came from: for character i, the range
    [lo, hi) of TEXT it stands for (an unescaped entity or a space for a removed tag stands for the whole
    of it). None: TEXT's own positions (nothing was removed or replaced). A span [a, b) of the clean text
    is TEXT[map[a][0]:map[b - 1][1]]."""
    cleaned = clean_text(text, limit)
    if not text or cleaned == text:
        return cleaned, None
    traced = _Traced(text[: limit * 4])
    traced.sub(_SCRIPT, lambda m: " ")
    traced.sub(_TAG, lambda m: " ")
    traced.sub(_CHARREF, lambda m: html.unescape(m.group(0)))
    traced.chars = [" " if unicodedata.category(c)[0] == "C" else c for c in traced.chars]
    traced.sub(_SPACE, lambda m: " ")
    joined = "".join(traced.chars)
    start = len(joined) - len(joined.lstrip())
    traced.keep(start, start + len(joined.strip()))
    traced.keep(0, limit)
    out = "".join(traced.chars)
    if out != cleaned:  # the two paths must agree; a mismatch is a bug here, never bad input
        raise AssertionError(f"clean_text_map disagrees with clean_text on {text[:80]!r}")
    return out, list(zip(traced.lo, traced.hi))


def fmt(x: float | None, digits: int = 2) -> str:
    """X with DIGITS decimals, '-' for a missing figure."""
    return "-" if x is None else f"{x:.{digits}f}"


def describe_error(error: BaseException) -> str:
    """'Type: message' for a reject or a log line, without object reprs ('<_io.BytesIO object at
    0x7f...>' says nothing to a reader and differs on every run)."""
    return f"{type(error).__name__}: {_OBJECT_REPR.sub('', str(error))}"
