"""Keeping the reference index current while the daemon runs: watchdog events under advisors/ mark it dirty,
`ReferenceWatcher.step` indexes on the worker thread between photo jobs."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..errors import Interrupted
from ..ledger import Ledger, LedgerUnavailable, outside_fault
from .indexer import ReferenceIndexer, problem

if TYPE_CHECKING:
    from ..model.protocol import Runtime

log = logging.getLogger("mondrian.references")

STEP_BUDGET_S = 30.0  # indexing between two photo jobs, at most (one reference always goes)


class _Hints:
    """watchdog handler: any event under advisors/ makes the next step look again. Never raises."""

    def __init__(self, watcher: "ReferenceWatcher"):
        self.watcher = watcher

    def dispatch(self, event: Any) -> None:
        try:
            self.watcher.mark_dirty()
        except Exception:  # pragma: no cover - an exception here would kill watchdog's thread
            pass


class ReferenceWatcher:
    """Keeps the index current while the daemon runs.

    Filesystem events (and the periodic rescan) only mark the index dirty; `step()` does the work, on the
    worker thread between photo jobs, one reference at a time, so indexing never runs alongside MLX work
    and a large new portfolio never holds the inbox up for long.
    """

    def __init__(self, cfg: Config, ledger: Ledger):
        self.cfg = cfg
        self.indexer = ReferenceIndexer(cfg, ledger)
        self._dirty = threading.Event()
        self._dirty.set()  # start-up: check everything once
        self._next_look = 0.0
        self._observer: Any = None
        self.busy = threading.Event()
        self.last_error: str | None = None
        self._recorded: list[dict[str, str]] | None = None  # the skipped references status shows

    def start(self) -> None:
        from watchdog.observers import Observer

        try:
            self.cfg.advisors_dir.mkdir(parents=True, exist_ok=True)
            observer = Observer()
            observer.schedule(_Hints(self), str(self.cfg.advisors_dir), recursive=True)
            observer.daemon = True
            observer.start()
            self._observer = observer
        except Exception as exc:  # periodic rescans still find new references
            log.warning("cannot watch %s (%s); references are checked at each rescan", self.cfg.advisors_dir, exc)

    def stop(self) -> None:
        if self._observer is not None:
            try:
                self._observer.stop()
                self._observer.join(timeout=5)
            except Exception:  # pragma: no cover
                pass
            self._observer = None

    def ensure_alive(self) -> None:
        if self._observer is not None and not self._observer.is_alive():
            log.warning("the references observer stopped; restarting it")
            self.stop()
            self.start()

    def mark_dirty(self) -> None:
        self._dirty.set()

    def step(self, runtime: Runtime, *, budget_s: float = STEP_BUDGET_S, stop: threading.Event | None = None) -> bool:
        """Apply removals, then index references for up to `budget_s` (at least one). True if more are waiting.

        Called by the worker thread between photo jobs: a small portfolio is indexed before the next photo,
        a large one alternates with the inbox.
        """
        if not self._dirty.is_set() and time.monotonic() < self._next_look:
            return False
        self.busy.set()
        started = time.monotonic()
        try:
            self._dirty.clear()  # before looking, so an event arriving meanwhile is not lost
            ix = self.indexer
            ix._runtime = runtime
            ix.cancel = stop
            plan = ix.plan(model_id=runtime.model_id)
            ix.remove(plan, keep_twins=True)
            known = ix.advisors()
            errors = [problem(self.cfg, a, p, r) for a, p, r in plan.errors]
            try:
                for n, work in enumerate(plan.index):
                    if n and (time.monotonic() - started >= budget_s or (stop is not None and stop.is_set())):
                        self._dirty.set()
                        return True
                    outcome = ix.index_one(work, known)
                    if outcome.action == "error":
                        errors.append(problem(self.cfg, outcome.advisor, outcome.path, outcome.reason))
            finally:
                self._record(errors)
            ix.remove(plan)
            self._next_look = time.monotonic() + (max(0.2, self.cfg.quiet_seconds / 2) if plan.waiting
                                                  else float("inf"))
            return False
        except (Interrupted, LedgerUnavailable):
            self._dirty.set()
            return False
        except Exception as exc:  # a bad reference must never take the worker down
            why = outside_fault(exc)
            if why is not None:  # the ledger could not answer this moment (a shared ledger's server restarting)
                log.warning("could not index references now (%s); looking again shortly", " ".join(why.split()))
            else:
                log.exception("indexing references failed")
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._next_look = time.monotonic() + max(5.0, self.cfg.quiet_seconds)
            return False
        finally:
            self.busy.clear()

    def _record(self, errors: list[dict[str, str]]) -> None:
        errors = sorted(errors, key=lambda e: (e["advisor"], e["file"]))
        if errors != self._recorded:
            self.indexer.ledger.set_event("reference_errors", errors)
            self._recorded = errors


__all__ = ["ReferenceWatcher", "STEP_BUDGET_S"]
