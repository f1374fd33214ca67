"""Cooperative limits on one analysis: a stop request (SIGTERM/SIGINT) and a per-photo deadline.

The model runtime checks them between decoded tokens (`check`), so a stuck or very long generation ends
within one token of the limit instead of holding the queue. Kept free of MLX so the worker can import it.
"""

from __future__ import annotations

import threading
import time
from typing import Iterable

from . import testhooks
from .errors import Cancelled, Interrupted, TimedOut

# The names the model runtime and its tests know these by (daemon/errors.py holds the one definition).
AnalysisInterrupted, AnalysisCancelled, AnalysisTimedOut = Interrupted, Cancelled, TimedOut


class TimeShare:
    """A photo's own time limit (`job_timeout_seconds`) while photos are analysed together. A pass's time is split
    evenly between the photos in it, and a photo waiting for others (another group of the batch, or its turn alone)
    is not charged: each photo runs against its own limit, so one that would time out alone times out in a batch
    too, instead of running on the others' share once they have finished."""

    def __init__(self, seconds: float, among: int = 1) -> None:
        self.seconds = seconds
        self._spent = 0.0
        self._since = time.monotonic()
        self._among = among  # photos the time is shared between now; 0: waiting, not charged

    def among(self, n: int) -> None:
        """From now on the time goes to `n` photos, this one included (0: this one waits)."""
        now = time.monotonic()
        self._spent += self._charged(now)
        self._since, self._among = now, n

    def _charged(self, now: float) -> float:
        return (now - self._since) / self._among if self._among else 0.0

    def spent(self) -> float:
        return self._spent + self._charged(time.monotonic())

    def passed(self) -> bool:
        return self.spent() >= self.seconds


Deadline = float | TimeShare  # a time.monotonic() value, or a photo's share of a batch's time


def share_time(deadlines: Iterable[Deadline | None], among: int) -> None:
    """Tell each photo's TimeShare (others are fixed deadlines) how many photos the time goes to now."""
    for d in deadlines:
        if isinstance(d, TimeShare):
            d.among(among)


def check(cancel: threading.Event | None, deadline: Deadline | None) -> None:
    """Raise if `cancel` is set or the deadline has passed."""
    testhooks.slow_token()
    if cancel is not None and cancel.is_set():
        raise Cancelled("stop requested")
    if deadline is None:
        return
    if deadline.passed() if isinstance(deadline, TimeShare) else time.monotonic() >= deadline:
        raise TimedOut("deadline passed")
