"""Text from file names (or any outside source) made safe to show on a terminal or write as one log line.

A newline in a file name would forge a log line, and ANSI escapes would reach the terminal of whoever reads the
log or `mondrian status`. Control characters (and other non-printable ones: bidi overrides, line separators)
are shown escaped, as Python writes them in a string literal; printable text, accents and CJK included, is kept.
"""

from __future__ import annotations

import logging
import unicodedata
from typing import Any

import wcwidth


def column(text: str, width: int) -> str:
    """`text` in a column `width` cells wide, as a terminal draws it: its end kept where it is too wide (a file's
    name ends with what tells it apart), padded where it is narrower. Cells, not characters: a name saved in NFD
    (`Café` as `e` + a combining accent, as macOS names files) or in CJK used to shift every column after it."""
    cells = wcwidth.wcswidth(text)
    if cells < 0:  # something with no width a terminal agrees on: `shown` has escaped control characters already
        cells = len(text)
    while cells > width:
        text = text[1:]
        cells = max(wcwidth.wcswidth(text), 0)
    while text and unicodedata.combining(text[0]):  # an accent cut from its letter
        text = text[1:]
    return text + " " * (width - max(wcwidth.wcswidth(text), 0))


def shown(text: Any, keep: str = "") -> str:
    """`text` with every non-printable character except those in `keep` escaped (`\\n`, `\\x1b`, `\\u202e`)."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else c.encode("unicode_escape").decode("ascii")
                   for c in text)


class SafeFormatter(logging.Formatter):
    """One record, one line: the message is escaped; a traceback keeps its own line breaks, nothing else."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = shown(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return shown(super().formatException(ei), keep="\n")

    def formatStack(self, stack_info: str) -> str:
        return shown(super().formatStack(stack_info), keep="\n")
