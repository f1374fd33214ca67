"""`mondrian analyze PHOTO`: one photo, now, in this process, through the same worker code as the daemon.

The photo stays where it is (a copy goes into the report folder); the job is recorded in the ledger like
any other, created already running so a daemon on the same home never claims it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import Config
from .ledger import Ledger, job_dict
from .supervisor import default_runtime_factory
from .worker import Worker


def analyze_one(cfg: Config, photo: Path, *, mode: str | None = None, advisor: str | None = None) -> dict[str, Any]:
    cfg.ensure_dirs()
    photo = photo.expanduser().absolute()
    ledger = Ledger(cfg.db_path)
    job = ledger.start_direct(photo, photo.name, advisor or cfg.default_advisor,
                              "command" if advisor else "default")
    worker = Worker(cfg, ledger, default_runtime_factory(cfg))
    if not photo.exists():
        ledger.fail(job.id, f"{photo} does not exist", None)
    else:
        worker.process(job, keep_original=True, mode_override=mode)
    return job_dict(ledger.get(job.id))
