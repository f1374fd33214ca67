"""`mondrian retry --failed`: put failed photos back in the inbox, queued, with a fresh attempt count.

Only photos that came through the inbox: a `mondrian analyze` job's photo is never Mondrian's to move."""

from __future__ import annotations

import os
from pathlib import Path

from ..config import Config
from ..intake.inbox import unique_path
from ..ledger import Ledger
from ..fsutil import folder_inside


def retry_failed(cfg: Config, ids: list[int] | None = None) -> tuple[list[str], list[str]]:
    """Queue failed inbox photos again. Returns (lines for the queued jobs, what to do for those left alone)."""
    ledger = Ledger(cfg.db_path)
    done: list[str] = []
    left: list[str] = []
    for job in ledger.retry_failed(ids):
        if not job.owns_file:
            # Its photo is the user's, wherever it lies: queueing it would make the daemon move it into the outbox.
            left.append(f"job {job.id}: {job.rel_path} was analysed with `mondrian analyze` and stays where it is; "
                        f"run `mondrian analyze` on it again (or copy it into the inbox)")
            continue
        kept = Path(job.output_dir) if job.output_dir else None
        if kept is not None and os.path.lexists(kept):
            back = cfg.inbox / job.rel_path
            if not (folder_inside(kept, cfg.failed_dir) and folder_inside(back, cfg.inbox)):
                left.append(f"job {job.id}: {job.rel_path}: a folder on its way back into the inbox is a link to "
                            f"somewhere else; move it from {cfg.failed_dir.name}/ into the inbox yourself")
                continue
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
    return done, left
