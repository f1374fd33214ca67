"""`mondrian retry --failed`: put failed photos back in the inbox, queued, with a fresh attempt count.

Only photos that came through the inbox: a `mondrian analyze` job's photo is never Mondrian's to move. A permanent
failure (a damaged photo, a bad sidecar, a folder Mondrian may not write) fails the same way until the person
changes something, so it is queued again only once its photo, its sidecar or (failed where it lay) its folder has
changed since it failed, or when asked for (`--all`, or its job id)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from .. import testhooks
from ..config import CONFIG_NAME, Config, ConfigError
from ..fsutil import folder_inside, is_folder, move
from ..analysis.advisors import advisor_folders
from ..intake.inbox import classify, editor_sidecars, is_ignored, same_name, sidecar_for, unique_path
from ..ledger import FAILED, Job, Ledger
from ..pipeline.failures import analyze_command, analyzed_as
from ..pipeline.outbox_index import OutboxIndex
from ..hints import mondrian


@dataclass
class Retried:
    queued: list[str] = field(default_factory=list)  # one line per job queued again
    left: list[str] = field(default_factory=list)  # what to do for those that could not be put back
    skipped: list[Job] = field(default_factory=list)  # permanent failures nothing has changed since


def unchanged_permanent(job: Job, settings_changed_at: float = 0.0) -> bool:
    """A permanent failure of an inbox photo that nothing has changed since: queued again, it would fail the same
    way. A change is a newer ctime (any write, rename or chmod sets it; `cp -p` cannot set it back) on the photo,
    its sidecar or, for a photo that failed where it lay, its folder (chmod u+w); the removal of the sidecar the
    failure was blamed on; or an edit of the settings file or of an advisor's definition since."""
    if job.error_kind != "permanent" or not job.owns_file or job.finished_at is None:
        return False
    if settings_changed_at > job.finished_at:
        return False  # mondrian.toml was edited since (max_file_mb, say)
    src = Path(job.source_path)
    if is_folder(src):
        return False  # an unreadable inbox folder: retry looks at it itself
    kept = Path(job.output_dir) if job.output_dir else None
    photo = kept if kept is not None and os.path.lexists(kept) else src
    sidecar = sidecar_for(photo)
    if sidecar is None and "sidecar" in (job.error or ""):
        return False  # the sidecar it was blamed on has been removed: that is the change
    looked = [photo, sidecar] + ([photo.parent] if photo == src else [])
    for path in looked:
        try:
            if path is not None and os.lstat(path).st_ctime > job.finished_at:
                return False
        except OSError:
            continue
    return True


def _settings_changed_at(cfg: Config) -> float:
    """When the settings last changed: mondrian.toml, or an advisor's definition (a photo failed for a broken
    advisor.toml, or an advisor folder misnamed, is fine once that is fixed)."""
    places = [cfg.home / CONFIG_NAME, cfg.advisors_dir]
    try:
        places += [p for d in cfg.advisors_dir.iterdir() for p in (d, d / "advisor.toml")]
    except OSError:
        pass
    newest = 0.0
    for place in places:
        try:
            newest = max(newest, os.stat(place).st_ctime)
        except OSError:
            continue
    return newest


def failed_now(cfg: Config) -> tuple[int, int]:
    """(failures `retry --failed` would look at, those of them it would skip as unchanged permanent ones)."""
    jobs = Ledger.for_config(cfg).retry_failed(None)
    changed = _settings_changed_at(cfg)
    return len(jobs), sum(1 for j in jobs if unchanged_permanent(j, changed))


@contextlib.contextmanager
def _one_retry_at_a_time(cfg: Config) -> Iterator[None]:
    """Two `retry` at once (two terminals, a script and a person) each read the same failed jobs and each counted
    them as put back, one of them with "could not be put back" for every photo the other had moved. The second
    waits for the first, then finds what is still failed."""
    try:
        fd = os.open(cfg.var_dir / "retry.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError:  # a var/ that cannot be written: the ledger's own check says so, in its words
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def retry_failed(cfg: Config, ids: list[int] | None = None, *, everything: bool = False) -> Retried:
    """Queue failed inbox photos again. Those named by `ids` (or all, with `everything`) are queued whatever
    their kind; otherwise permanent failures nothing has changed since are skipped. One photo that cannot be
    put back is said so, and the rest go on."""
    with _one_retry_at_a_time(cfg):
        return _retry_failed(cfg, ids, everything=everything)


def _retry_failed(cfg: Config, ids: list[int] | None, *, everything: bool) -> Retried:
    ledger = Ledger.for_config(cfg)
    out = Retried()
    done, left = out.queued, out.left
    changed = _settings_changed_at(cfg)
    jobs = ledger.retry_failed(None if ids is None else [i for i in ids if 0 < i < 2**63])
    testhooks.crashpoint("retry_listed")
    for missing in sorted(set(ids or ()) - {j.id for j in jobs}):
        left.append(_not_retryable(ledger, missing))
    if jobs:
        ledger.check_writable()  # else a photo would be back in the inbox with its job still failed
    for job in jobs:
        if ids is None and not everything and unchanged_permanent(job, changed):
            out.skipped.append(job)
            continue
        try:
            line = _retry_one(cfg, ledger, job, left)
        except OSError as exc:
            line = None
            left.append(f"job {job.id}: {job.rel_path} could not be put back into the inbox "
                        f"({exc.strerror or exc}{': ' + exc.filename if isinstance(exc.filename, str) else ''}); "
                        f"clear the way (a file where its folder was?) and run `{mondrian()} retry --failed` again, or "
                        f"move it from {cfg.failed_dir.name}/ into the inbox yourself")
        if line:
            done.append(line)
    if done or left:
        OutboxIndex(cfg, ledger).refresh()  # failures put back or cleared leave the outbox index now, not after a job
    return out


def _advisor_now(cfg: Config, job: Job, photo: Path) -> str | None:
    """The advisor the photo's inbox folder names now, for a photo whose advisor came from its folder: it may have
    failed because that advisor's definition was misnamed (`advisors/Claude Monet/`), since renamed."""
    if job.advisor_source != "folder" or not photo.is_relative_to(cfg.inbox):
        return None
    intake = classify(photo, cfg.inbox, advisor_folders(cfg), cfg.default_advisor)
    return intake.advisor if intake.advisor_source == "folder" else None


def _not_retryable(ledger: Ledger, job_id: int) -> str:
    """Why a job named on the command line was not queued again: a typo must not read as success."""
    try:
        job = ledger.get(job_id) if 0 < job_id < 2**63 else None
    except ledger.Job.DoesNotExist:
        job = None
    if job is None:
        return (f"job {job_id}: there is no such job in this home's ledger; `{mondrian()} status --json` lists the "
                f"failed ones")
    if job.state == FAILED:
        return (f"job {job_id}: {job.rel_path} was put back already and has a later job; `{mondrian()} status` says "
                f"where it stands")
    return f"job {job_id}: {job.rel_path} has not failed (it is {job.state}); nothing to retry"


def _drop_record(kept: Path) -> None:
    """The failure's record and its page: it no longer stands."""
    for suffix in (".error.json", ".error.html"):
        Path(f"{kept}{suffix}").unlink(missing_ok=True)


def _retry_one(cfg: Config, ledger: Ledger, job: Job, left: list[str]) -> str | None:
    if not job.owns_file:
        # Its photo is the user's, wherever it lies: queueing it would make the daemon move it into the outbox.
        if not os.path.lexists(job.source_path):  # deleted since: the advice to analyse it again cannot be followed
            if not ledger.mark_gone(job.id, "its photo was not there any more when `retry --failed` looked for it",
                                    was=FAILED):
                return None  # no longer a failure (settled meanwhile): nothing to clear
            left.append(f"job {job.id}: {job.rel_path} is not at {job.source_path} any more (deleted or moved?), so "
                        f"its entry is cleared; to have it critiqued, run `{mondrian()} analyze` on it where it is now")
            if job.output_dir:
                _drop_record(Path(job.output_dir))
            return None
        again = analyze_command(**analyzed_as(job))
        left.append(f"job {job.id}: {job.rel_path} was analysed with `{mondrian()} analyze` and stays where it is; "
                    f"run `{again}` again (or copy it into the inbox)")
        return None
    src = Path(job.source_path)
    here = cfg.inbox / job.rel_path
    if not os.path.lexists(src) and os.path.lexists(here) and folder_inside(here, cfg.inbox):
        # The inbox moved since (a new `inbox` in mondrian.toml, its folder moved along, as the README allows): a
        # photo that failed where it lay (a read-only folder) is at its place in the inbox now.
        src = here
    if is_folder(src):
        # An inbox folder that could not be read (the watcher's failure): its photos are queued on their own
        # once it can be; a folder itself is never queued, so it is never moved.
        if not os.access(src, os.R_OK | os.X_OK):
            left.append(f"job {job.id}: the folder {job.rel_path} still cannot be read; make it readable "
                        f"(chmod u+rwx) and run `{mondrian()} retry --failed` again")
            return None
        ledger.mark_gone(job.id, "the folder can be read now; its photos are queued on their own", was=FAILED)
        return f"job {job.id}: {job.rel_path}/ can be read now; its photos are queued by the daemon"
    kept = Path(job.output_dir) if job.output_dir else None
    if kept is not None and os.path.lexists(kept) and is_ignored(cfg.inbox / job.rel_path, cfg.inbox):
        # Failed before Mondrian knew it is no photo (a Live Photo's `.mov`, taken for one before it rode along):
        # put back, it would only be queued and failed again as "not a photo".
        if ledger.mark_gone(job.id, "not a photo: Mondrian no longer takes a file of this kind for one", was=FAILED):
            _drop_record(kept)
            left.append(f"job {job.id}: {job.rel_path} is not a photo (a Live Photo's video, say), which Mondrian no "
                        f"longer takes for one: it stays in {cfg.failed_dir.name}/ (move it where you keep it) and "
                        f"its failure is cleared")
        return None
    if kept is not None and os.path.lexists(kept) and not kept.is_relative_to(cfg.failed_dir):
        # Another Mac's own outbox on a shared ledger, or an outbox this home used before: not this one's to empty.
        left.append(f"job {job.id}: {job.rel_path} waits in {kept.parent}, not in this outbox's "
                    f"{cfg.failed_dir.name}/ (another Mac's outbox on the shared ledger, or an outbox used before): "
                    f"run `{mondrian()} retry --failed` where that outbox is used, or move it into the inbox yourself")
        return None
    if kept is not None and os.path.lexists(kept):
        back = cfg.inbox / job.rel_path
        if not (folder_inside(kept, cfg.failed_dir) and folder_inside(back, cfg.inbox)):
            left.append(f"job {job.id}: {job.rel_path}: a folder on its way back into the inbox is a link to "
                        f"somewhere else; move it from {cfg.failed_dir.name}/ into the inbox yourself")
            return None
        try:
            # An inbox on a drive that is not connected: making its folders would put them (and the photo) on the
            # startup disk where the drive mounts. The rule every folder Mondrian makes follows (config.py).
            cfg._refuse_unmounted(back.parent, within=(cfg.home, Path.home(), Path(platformdirs.user_data_dir())))
        except ConfigError as exc:
            left.append(f"job {job.id}: {job.rel_path} stays in {cfg.failed_dir.name}/: {exc}")
            return None
        back.parent.mkdir(parents=True, exist_ok=True)
        back = unique_path(back.parent, back.stem, back.suffix)
        # The sidecar the error record told the user to fix comes back with its photo, before it, so the
        # watcher never sees the photo without it.
        moved: list[tuple[Path, Path]] = []
        sidecar = sidecar_for(kept)
        if sidecar is not None:
            target = back.with_name(back.stem + sidecar.suffix)
            if os.path.lexists(target):
                left.append(f"job {job.id}: its sidecar {sidecar.name} stays in {cfg.failed_dir.name}/, because "
                            f"{target.name} is already in the inbox; the photo is queued without it")
            else:
                move(sidecar, target)  # the outbox may be on another disk than the inbox
                moved.append((sidecar, target))
        for theirs in editor_sidecars(kept):  # the photographer's own (.xmp, .AAE): back with it, or left there
            target = back.with_name((back.name if same_name(theirs.stem, kept.name) else back.stem) + theirs.suffix)
            if not os.path.lexists(target):
                move(theirs, target)
                moved.append((theirs, target))
        # Move first, then queue: killed in between, the photo sits in the inbox (the watcher or the next
        # retry picks it up) instead of being queued at a path where nothing is yet.
        try:
            move(kept, back)
            moved.append((kept, back))
            ledger.requeue_failed(job.id, back, _advisor_now(cfg, job, back))
        except BaseException:
            # Not moved, or not recorded (a full disk: taking the write lock, which check_writable did, needs no
            # space; writing does): everything goes back to failed/, where its record says it is, and the command
            # changes nothing.
            for src, dst in reversed(moved):
                with contextlib.suppress(OSError):
                    move(dst, src)
            raise
        _drop_record(kept)
    elif os.path.lexists(src) and src != Path(job.source_path) and (later := ledger.later_job_at(str(src), job.id)):
        # Moved into the new inbox as its failure advised, and queued there by the daemon already: that job is its
        # job now. Queueing this one too gave one file two jobs (the ledger refused: "damaged, move it aside").
        if ledger.mark_gone(job.id, f"its photo was queued again at its place in the inbox (job {later.id})",
                            was=FAILED):
            if kept is not None:
                _drop_record(kept)
            left.append(f"job {job.id}: {job.rel_path} is already queued at its place in the inbox (job {later.id}, "
                        f"{later.state}); its old failure is cleared")
        return None
    elif os.path.lexists(src):
        ledger.requeue_failed(job.id, src, _advisor_now(cfg, job, src))
        if kept is not None:  # failed where it lay (e.g. a read-only folder): only its record is in failed/
            _drop_record(kept)
    elif not cfg.failed_dir.is_dir():  # the outbox moved away, or its drive is not connected: it may come back
        left.append(f"job {job.id}: {job.rel_path} is not in the inbox, and {cfg.failed_dir} is not there (the "
                    f"outbox moved, or its drive is not connected?); put the outbox back and run this again, or drop "
                    f"the photo into the inbox again")
        return None
    else:  # deleted (or moved away) since it failed: nothing left to analyse, and that is worth a line
        # Else `status` would list it, advising this very command, for ever.
        if not ledger.mark_gone(job.id, f"not in {cfg.failed_dir.name}/ nor in the inbox when `retry --failed` looked "
                                        f"for it (deleted or moved away)", was=FAILED):
            return None  # no longer a failure (settled meanwhile): nothing to clear
        left.append(f"job {job.id}: {job.rel_path} is neither in {cfg.failed_dir.name}/ nor in the inbox any more "
                    f"(deleted or moved?), so its entry is cleared; to have it critiqued, drop the photo into the "
                    f"inbox again")
        if kept is not None:  # its record would name a photo that is gone
            _drop_record(kept)
        return None
    return f"job {job.id}: {job.rel_path}"
