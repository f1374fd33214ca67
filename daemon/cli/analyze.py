"""`mondrian analyze PHOTO|FOLDER ...`: photos, now, in this process, through the same worker code as the daemon.

The photos stay where they are, whatever happens (a copy goes into each report folder): each job is recorded in
the ledger as not owning its file, created already running so a daemon on the same home never claims it. A folder
is searched recursively for photos, skipping hidden and temporary names as the inbox does. Every argument is
checked before anything is analysed: a path that does not exist, a pattern the shell did not expand, a folder with
no photo, a model that does not load, an unknown `--adapter` version: the command says what to do instead, and no
job is created at all. Once analysis starts, one photo's failure does not stop the others.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..analysis.advisors import get_advisor
from ..intake.images import PHOTO_SUFFIXES, image_format
from ..config import Config
from ..errors import EX_CONFIG, EX_USAGE, Transient, is_permanent
from ..intake.inbox import is_report_file, is_temporary_name
from ..ledger import DONE, FAILED, GONE, RUNNING, Ledger, job_dict
from ..pipeline.supervisor import default_runtime_factory
from ..pipeline.worker import Worker
from ..references.indexer import not_utf8
from ..model.adapter_store import AdapterUnusable
from ..hints import mondrian, shell_word

log = logging.getLogger("mondrian.analyze")



class AnalyzeRefused(Exception):
    """Nothing was analysed and no job was created; the message says what to do instead."""

    def __init__(self, message: str, exit_code: int = EX_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Request:
    """What to analyse and how: checked in full before the first photo."""

    photos: list[Path]
    advisor: str
    advisor_source: str  # command | default
    mode: str | None  # None: the photo's sidecar or default_mode
    adapter: str | None  # a version name (vNNNN) of the advisor's adapter, instead of its current one


def photos_in(cfg: Config, folder: Path) -> list[Path]:
    """The photos under `folder`, recursively, by name: hidden and temporary names skipped (as in the inbox),
    folder links not followed, Mondrian's own outbox and var/ left out when walked into from above (copies of
    photos already analysed). Named directly, a report folder (or the outbox) gives its originals only: the
    preview, thumbnail and reference images Mondrian wrote beside them are not photos of the user's."""
    own = {os.path.realpath(p) for p in (cfg.outbox, cfg.var_dir)}
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not is_temporary_name(d)
                             and os.path.realpath(os.path.join(dirpath, d)) not in own)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            # (`trail.jpg ` with a space a Mac allows is a photo too: the daemon takes it, and so does this)
            if is_temporary_name(name) or not path.is_file() or is_report_file(path):
                continue
            # By name, or by its first bytes where the name says nothing (`x.jpg_large` as Twitter saves it): the
            # daemon takes any file dropped into the inbox (and fails what is no photo; here it is left out).
            if name.lower().rstrip(" ").endswith(PHOTO_SUFFIXES) or (
                    os.access(path, os.R_OK) and image_format(path) is not None):
                found.append(path)
    return found


def _left_out(cfg: Config, folder: Path) -> str:
    """Which of Mondrian's own folders a walk of `folder` skipped, for the message when it found nothing."""
    inside = [p for p in (cfg.outbox, cfg.var_dir)
              if Path(os.path.realpath(folder)) in Path(os.path.realpath(p)).parents]
    if not inside:
        return ""
    names = " and ".join(f"{p.name}/" for p in inside)
    return (f"; Mondrian's own {names} inside it {'was' if len(inside) == 1 else 'were'} left out (photos already "
            f"analysed: to critique them again, name the outbox or a report folder)")


def _expanded(arg: str) -> str:
    """The command with `arg` as a pattern the shell expands: its folder quoted, its pattern not (`analyze FOLDER`,
    pasted as printed, looked for a folder called FOLDER). Only where the pattern's parts need no quoting."""
    parts = Path(os.path.expanduser(arg)).absolute().parts
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    rest = parts[first:]
    if not all(re.fullmatch(r"[\w.*?\[\]!-]+", part, re.ASCII) for part in rest):
        return ""
    return f": `{mondrian()} analyze {shell_word(Path(*parts[:first]))}/{'/'.join(rest)}`"


def check_paths(cfg: Config, given: list[str]) -> list[Path]:
    """Every photo the arguments name, in order and once each (by real path); AnalyzeRefused, naming the first
    argument that is not a photo or a folder of photos, before anything is analysed."""
    photos: list[Path] = []
    seen: set[str] = set()
    for arg in given:
        path = Path(arg).expanduser().absolute()
        if not os.path.lexists(path):
            if glob.has_magic(arg):
                matches = len(glob.glob(os.path.expanduser(arg)))
                found = f"{matches} files match it" if matches else "no file matches it"
                raise AnalyzeRefused(f"{arg!r} is a pattern the shell did not expand ({found}); give photos or "
                                     f"folders (a folder is searched for photos){_expanded(arg) if matches else ''}")
            raise AnalyzeRefused(f"{arg!r} does not exist; give photos or folders of photos (nothing was analysed)")
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise AnalyzeRefused(f"cannot read {arg!r} ({exc.strerror}); give photos or folders of photos") from None
        if stat.S_ISDIR(mode):
            found = photos_in(cfg, path)
            if not found:
                raise AnalyzeRefused(f"the folder {arg!r} holds no photos ({', '.join(PHOTO_SUFFIXES)}; hidden and "
                                     f"temporary names are skipped{_left_out(cfg, path)}); nothing was analysed")
        elif stat.S_ISREG(mode):
            found = [path]
        else:
            raise AnalyzeRefused(f"{arg!r} is not a regular file or a folder; give photos or folders of photos")
        for photo in found:
            why = not_utf8(path if stat.S_ISDIR(mode) else photo.parent, photo)
            if why:  # the ledger records names as text: found now, not as a crash halfway through the photos
                raise AnalyzeRefused(f"cannot analyse {shell_word(photo)}: {why}; then run the command again "
                                     f"(nothing was analysed)")
            key = os.path.realpath(photo)
            if key not in seen:
                seen.add(key)
                photos.append(photo)
    return photos


def adapter_version(cfg: Config, advisor_id: str, wanted: str) -> str:
    """The version name `wanted` means (`v3`, `3` and `v0003` alike) if the advisor has that complete adapter;
    else AnalyzeRefused listing the versions there are."""
    from ..model.adapter_store import AdapterStore, configured_base, version_name

    store = AdapterStore(cfg.adapters_dir)
    name = version_name(wanted)
    versions = store.versions(advisor_id)
    current = store.current_name(advisor_id)
    base = configured_base(cfg)

    def why_not(v: Any) -> str | None:  # asked for by name: never quietly served by rag instead
        trained_on = (v.manifest.get("base_model") or {}).get("fingerprint")
        if base and trained_on and trained_on != base:
            return f"trained for base model {(v.manifest.get('base_model') or {}).get('spec', 'another model')}"
        return v.problem()

    for v in versions:
        if v.name == name and why_not(v) is None:
            return v.name
    listing = ", ".join(v.name + (" (current)" if v.name == current else "")
                        + (f" ({why_not(v)})" if why_not(v) else "") for v in versions)
    have = f"its versions: {listing}" if versions else \
        f"it has none yet (train one: `{mondrian()} train --advisor {advisor_id}`)"
    raise AnalyzeRefused(f"{advisor_id} has no usable adapter version {wanted!r}; {have}. `{mondrian()} adapters "
                         f"--advisor {advisor_id}` lists them")


def prepare(cfg: Config, given: list[str], *, mode: str | None = None, advisor: str | None = None,
            adapter: str | None = None) -> Request:
    """Check everything the command was given; AnalyzeRefused (nothing analysed, no job) at the first problem.
    UnknownAdvisor for an advisor id that is not known."""
    photos = check_paths(cfg, given)
    advisor_id = get_advisor(cfg, advisor).id if advisor else cfg.default_advisor
    if adapter is not None:
        if mode not in (None, "lora"):
            raise AnalyzeRefused(f"--adapter picks the LoRA adapter, so it goes with --mode lora, not --mode {mode}")
        adapter, mode = adapter_version(cfg, advisor_id, adapter), "lora"
    return Request(photos, advisor_id, "command" if advisor else "default", mode, adapter)


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


def _result(ledger: Ledger, job_id: int) -> dict[str, Any]:
    """The job as `--json` gives it, with the report's summary when there is one."""
    out = job_dict(ledger.get(job_id))
    out["summary"] = out["notice"] = None
    if out["state"] == "done" and out.get("report_json"):
        try:
            import json

            report = json.loads(Path(out["report_json"]).read_text(encoding="utf-8"))
            out["summary"] = report.get("summary")
            # The grade printed beside it must carry the report's own warning (the smoke model's scores mean nothing).
            out["notice"] = (report.get("model") or {}).get("notice")
        except (OSError, ValueError, AttributeError):
            pass
    return out


def _taken_by_the_daemon(cfg: Config, ledger: Ledger, path: Path, job_id: int) -> str | None:
    """Why a photo in the inbox was gone before `analyze` read it, where the daemon took it: its report is the
    answer, not "removed from the inbox"."""
    try:
        if not path.resolve().is_relative_to(cfg.inbox.resolve()):
            return None
    except OSError:
        return None
    theirs = ledger.other_job_at({str(path), str(path.resolve())}, job_id)
    mine = ledger.get(job_id)
    # Only a job that had the file in hand while this one ran: one that ended before (IMG_0001.JPG of an earlier
    # card) is another photo's.
    if theirs is None or not (theirs.state == RUNNING or (theirs.finished_at or 0) >= (mine.enqueued_at or 0)):
        return None
    if theirs.state == FAILED:
        return (f"the daemon took it from the inbox first (job {theirs.id}) and could not analyse it: "
                f"`{mondrian()} status` says why")
    if theirs.state == DONE and theirs.report_html:
        return f"the daemon analysed it first (job {theirs.id}): its report is {theirs.report_html}"
    if theirs.state == DONE and theirs.duplicate_of:
        return (f"the daemon took it first (job {theirs.id}): the same photo was critiqued before (job "
                f"{theirs.duplicate_of}); `{mondrian()} status` and the outbox's index show it")
    return (f"the daemon took it from the inbox first (job {theirs.id}, {theirs.state}): `{mondrian()} status` shows "
            f"where it is; its report lands in {cfg.outbox}")


def analyze_many(cfg: Config, request: Request, *, on_loading: Callable[[], None] = lambda: None,
                 on_start: Callable[[Path], None] = lambda p: None,
                 on_result: Callable[[dict[str, Any]], None] = lambda r: None) -> list[dict[str, Any]]:
    """Analyse the request's photos one after another with one loaded model; returns their jobs. The model is
    loaded first (AnalyzeRefused, and no job, if it cannot be). A photo that fails is recorded and the next one
    goes on; Ctrl-C fails the photo in hand as interrupted and stops."""
    cfg.ensure_dirs()
    ledger = Ledger.for_config(cfg)
    worker = Worker(cfg, ledger, default_runtime_factory(cfg))
    if request.adapter is not None:
        worker.strategies["lora"].pinned[request.advisor] = request.adapter
    on_loading()
    _load_model(worker, cfg)
    results = []
    try:
        for path in request.photos:
            on_start(path)
            job = ledger.start_direct(path, path.name, request.advisor, request.advisor_source)
            try:
                try:
                    worker.process(job, keep_original=True, mode_override=request.mode)
                except AdapterUnusable as exc:
                    # The adapter failed to load (the lora strategy marked it, by its files): this photo, not only
                    # the next one, is analysed again in the fallback mode, whose report says why.
                    log.warning("%s: the adapter could not be used (%s); analysing it again without it", path, exc)
                    worker.process(job, keep_original=True, mode_override=request.mode)
            except BaseException as exc:  # Ctrl-C or a fault: never leave the job "in progress"
                log.debug("analysis failed", exc_info=True)
                if ledger.get(job.id).state != RUNNING:
                    pass
                elif isinstance(exc, Exception) and is_permanent(exc):
                    # The model's own failure (max_tokens, the advisor's prompt): recorded as the daemon records it,
                    # with the record and page whose next step names the setting, never "it was stopped".
                    worker.out.fail(ledger.get(job.id), f"the model could not produce a critique: {exc}")
                elif not isinstance(exc, Exception):
                    ledger.fail(job.id, f"`{mondrian()} analyze` stopped: interrupted; run it again", None,
                                kind="transient")
                elif isinstance(exc, Transient):  # the outbox, the disk: said as the daemon says it
                    ledger.fail(job.id, f"{exc}; run it again", None, kind="transient")
                else:
                    ledger.fail(job.id, f"unexpected error: {type(exc).__name__}: {exc}", None, kind="transient")
                if not isinstance(exc, Exception):
                    raise
            results.append(_result(ledger, job.id))
            if results[-1]["state"] == GONE:
                results[-1]["error"] = _taken_by_the_daemon(cfg, ledger, path, job.id) or results[-1]["error"]
            on_result(results[-1])
    finally:
        worker.out.index.flush()  # the reports not listed yet (a large outbox is refreshed every few photos)
    return results

