"""Cooperative limits on one analysis: a stop request (SIGTERM/SIGINT) and a per-photo deadline.

The model runtime checks them between decoded tokens (`check`), so a stuck or very long generation ends
within one token of the limit instead of holding the queue. Kept free of MLX so the worker can import it.
"""

from __future__ import annotations

import threading
import time

from . import testhooks
from .errors import Cancelled, Interrupted, TimedOut

# The names the model runtime and its tests know these by (daemon/errors.py holds the one definition).
AnalysisInterrupted, AnalysisCancelled, AnalysisTimedOut = Interrupted, Cancelled, TimedOut


def check(cancel: threading.Event | None, deadline: float | None) -> None:
    """Raise if `cancel` is set or the `time.monotonic()` deadline has passed."""
    testhooks.slow_token()
    if cancel is not None and cancel.is_set():
        raise Cancelled("stop requested")
    if deadline is not None and time.monotonic() >= deadline:
        raise TimedOut("deadline passed")
