"""Cooperative limits on one analysis: a stop request (SIGTERM/SIGINT) and a per-photo deadline.

The model runtime checks them between decoded tokens (`check`), so a stuck or very long generation ends
within one token of the limit instead of holding the queue. Kept free of MLX so the worker can import it.
"""

from __future__ import annotations

import os
import threading
import time


class AnalysisInterrupted(Exception):
    """The analysis was ended early; nothing was produced."""


class AnalysisCancelled(AnalysisInterrupted):
    """The daemon is stopping: the photo goes back to the queue."""


class AnalysisTimedOut(AnalysisInterrupted):
    """The per-photo time limit passed: the photo is failed so the queue moves on."""


def check(cancel: threading.Event | None, deadline: float | None) -> None:
    """Raise if `cancel` is set or the `time.monotonic()` deadline has passed."""
    # Test-only: MONDRIAN_TEST_TOKEN_SECONDS=<s> makes every token take at least that long, so a test of the time
    # limit does not depend on how fast the machine is. Unset (always, outside tests) it costs one dict lookup.
    slow = os.environ.get("MONDRIAN_TEST_TOKEN_SECONDS")
    if slow:
        time.sleep(float(slow))
    if cancel is not None and cancel.is_set():
        raise AnalysisCancelled("stop requested")
    if deadline is not None and time.monotonic() >= deadline:
        raise AnalysisTimedOut("deadline passed")
