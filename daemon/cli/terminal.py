"""Text from file names (or any outside source) made safe to show on a terminal or write as one log line.

A newline in a file name would forge a log line, and ANSI escapes would reach the terminal of whoever reads the
log or `mondrian status`. Control characters (and other non-printable ones: bidi overrides, line separators)
are shown escaped, as Python writes them in a string literal; printable text, accents and CJK included, is kept.
"""

from __future__ import annotations

import logging
from typing import Any


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
