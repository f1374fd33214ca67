"""`mondrian retry --failed`: put failed photos back in the inbox, queued, with a fresh attempt count."""

from __future__ import annotations

import os
from pathlib import Path

from .config import Config
from .inbox import unique_path
from .ledger import Ledger


def retry_failed(cfg: Config, ids: list[int] | None = None) -> list[str]:
    ledger = Ledger(cfg.db_path)
    done: list[str] = []
    for job in ledger.retry_failed(ids):
        kept = Path(job.output_dir) if job.output_dir else None
        if kept is not None and os.path.lexists(kept):
            back = cfg.inbox / job.rel_path
            back.parent.mkdir(parents=True, exist_ok=True)
            back = unique_path(back.parent, back.stem, back.suffix)
            # Move first, then queue: killed in between, the photo sits in the inbox (the watcher or the next
            # retry picks it up) instead of being queued at a path where nothing is yet.
            os.rename(kept, back)
            ledger.requeue_failed(job.id, back)
            Path(f"{kept}.error.json").unlink(missing_ok=True)
        elif os.path.lexists(job.source_path):
            ledger.requeue_failed(job.id, Path(job.source_path))
        else:
            continue  # nothing left to analyse
        done.append(f"job {job.id}: {job.rel_path}")
    return done
