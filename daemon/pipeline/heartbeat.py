"""The worker's heartbeat: a thread that only talks to the ledger, never to the model.

Every third of a lease it renews the leases of the jobs this process holds, writes its row in the workers table
(`mondrian workers`), and puts back in the queue the jobs of workers whose lease ended (killed, stopped, cut off
from the network). A process stalled as a whole (SIGSTOP, a sleeping laptop) stops beating with it, so its lease
ends and another worker takes the photo over; the fencing token then refuses whatever it writes when it wakes.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from ..ledger import Ledger, LedgerUnavailable, outside_fault

log = logging.getLogger("mondrian.daemon")


class Heartbeat:
    def __init__(self, ledger: Ledger, stop: threading.Event, on_requeued: Callable[[], None],
                 max_attempts: int | None = None):
        self.ledger = ledger
        self.max_attempts = max_attempts
        self.stop = stop
        self.on_requeued = on_requeued
        self.interval = ledger.lease_seconds / 3
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()  # listed at once, not a third of a lease later
        self._thread.start()

    def beat(self) -> None:
        self.ledger.renew_leases()
        self.ledger.beat()
        if self.ledger.requeue_expired(max_attempts=self.max_attempts):
            self.on_requeued()

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.beat()
            except LedgerUnavailable:
                return  # stopping
            except Exception as exc:  # the heartbeat must outlive a bad moment of the server
                why = outside_fault(exc)
                if why is not None:  # the server restarting, unreachable: a line, not a traceback every beat
                    log.warning("heartbeat failed (%s); trying again in %.0f s", " ".join(why.split()), self.interval)
                else:
                    log.exception("heartbeat failed; trying again in %.0f s", self.interval)

    def retire(self) -> None:
        """A clean stop: no more beats, and this worker leaves the workers table."""
        self._thread.join(timeout=5)
        try:
            self.ledger.retire()
        except LedgerUnavailable:
            pass
