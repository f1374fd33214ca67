"""`mondrian analyze PHOTO`: one photo, now, in this process, through the same worker code as the daemon.

The photo stays where it is, whatever happens (a copy goes into the report folder): the job is recorded in the
ledger as not owning its file, created already running so a daemon on the same home never claims it. Nothing
that cannot be analysed (a folder, a pattern that matched nothing, a missing file, a model that does not load)
gets a job at all: the command says what to do instead.
"""

from __future__ import annotations

import glob
import logging
import os
import stat
from pathlib import Path
from typing import Any

from ..analysis.advisors import get_advisor
from ..config import Config
from ..errors import EX_CONFIG, EX_USAGE
from ..ledger import RUNNING, Ledger, job_dict
from ..pipeline.supervisor import default_runtime_factory
from ..pipeline.worker import Worker

log = logging.getLogger("mondrian.analyze")



class AnalyzeRefused(Exception):
    """Nothing was analysed and no job was created; the message says what to do instead."""

    def __init__(self, message: str, exit_code: int = EX_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


def check_photo(cfg: Config, given: str) -> Path:
    """The absolute path of the one regular file `given` names, or AnalyzeRefused saying what to do instead."""
    photo = Path(given).expanduser().absolute()
    many = f"To analyse many photos or a folder, drop them into the inbox ({cfg.inbox})"
    if not os.path.lexists(photo):
        if glob.has_magic(given):
            matches = len(glob.glob(os.path.expanduser(given)))
            found = f"{matches} files match it" if matches else "no file matches it"
            raise AnalyzeRefused(f"{given!r} is a pattern ({found}); `mondrian analyze` takes one photo. {many}")
        raise AnalyzeRefused(f"{given!r} does not exist; give the path of one photo")
    try:
        mode = os.stat(photo).st_mode
    except OSError as exc:
        raise AnalyzeRefused(f"cannot read {given!r} ({exc.strerror}); give the path of one photo") from None
    if stat.S_ISDIR(mode):
        raise AnalyzeRefused(f"{given!r} is a folder; `mondrian analyze` takes one photo. {many}")
    if not stat.S_ISREG(mode):
        raise AnalyzeRefused(f"{given!r} is not a regular file; give the path of one photo")
    return photo


def _load_model(worker: Worker, cfg: Config) -> None:
    from ..model.runtime import ModelNotFoundError

    try:
        worker.load_runtime()
    except Exception as exc:
        log.debug("model load failed", exc_info=True)
        first_line = (str(exc).strip().splitlines() or [""])[0]
        code = EX_CONFIG if isinstance(exc, ModelNotFoundError) else 1
        raise AnalyzeRefused(f"could not load the model {cfg.model!r} ({type(exc).__name__}: {first_line}); "
                             f"check MONDRIAN_MODEL or --model ('smoke', a local model folder or a hub id)",
                             code) from None


def analyze_one(cfg: Config, photo: Path | str, *, mode: str | None = None,
                advisor: str | None = None) -> dict[str, Any]:
    """Analyse one photo in this process; returns its job. Raises AnalyzeRefused (and creates no job) when it
    cannot even start, UnknownAdvisor for an advisor id that is not known."""
    path = check_photo(cfg, str(photo))
    advisor_id = get_advisor(cfg, advisor).id if advisor else cfg.default_advisor
    cfg.ensure_dirs()
    ledger = Ledger(cfg.db_path)
    worker = Worker(cfg, ledger, default_runtime_factory(cfg))
    _load_model(worker, cfg)
    job = ledger.start_direct(path, path.name, advisor_id, "command" if advisor else "default")
    try:
        worker.process(job, keep_original=True, mode_override=mode)
    except BaseException as exc:  # Ctrl-C or a fault: never leave the job "in progress"
        log.debug("analysis failed", exc_info=True)
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        if ledger.get(job.id).state == RUNNING:
            ledger.fail(job.id, f"`mondrian analyze` stopped: {reason}; run it again", None, kind="transient")
        if not isinstance(exc, Exception):
            raise
    return job_dict(ledger.get(job.id))
