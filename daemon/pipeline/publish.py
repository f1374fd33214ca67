"""Publishing a job's outcome, crash-safely: the report folder (staged, reserved in the ledger, renamed into the
outbox), the original moved next to it, failed/ with an `.error.json` record, duplicates/ with a
`.duplicate.json` record, and the recovery of an outcome published just before a crash (`resume`).

Every step is safe to repeat after a kill: the ledger reservation, the records and `move_once` let the next start
finish what was published instead of doing it twice.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any, Callable

from .. import testhooks
from ..analysis.advisors import load_advisors
from ..config import Config
from ..outbox_room import OutboxGone
from ..errors import Permanent, Transient
from ..fsutil import (ATOMIC_TMP, NotOwn, atomic_write_text, content_is, folder_inside, fsync_files, holds, identity,
                      move, own_folder_inside, pid_alive, read_regular_file, same_content)
from ..intake.images import LoadedImage
from ..intake.inbox import (OUTBOX_RESERVED, RECORD_SUFFIXES, SIDECAR_SUFFIX, SidecarError, editor_sidecars,
                            fitted_name, is_ignored, read_sidecar, same_name, safe_stem, sidecar_for, unique_path)
from ..ledger import RUNNING, Job, Ledger, TwinFirst
from .failures import Cause, advice, analyzed_as, cause_of, where_it_is
from .outbox_index import OutboxIndex, published_report
from .report import now_iso, write_report_folder
from .xmp import EMBED_FORMATS, embed, write_sidecar
from ..hints import mondrian, without_home

log = logging.getLogger("mondrian.worker")


SHARED_TMP_AGE_S = 3600.0
PUBLISHED_PREFIX_CHARS = 32  # of a report folder's stem: unique_path keeps at least this much of it (Publisher.taken)
THEIR_XMP_MAX_BYTES = 4 * 1024 * 1024  # a Lightroom sidecar is a few kB; a larger one is not merged (still moved)


class OutsideInbox(Permanent):
    """The photo's folder, every link resolved, is not inside the inbox: nothing there may be moved or deleted."""


OUTSIDE_INBOX = ("its folder is no longer inside the inbox (a folder on its path was replaced by a link to "
                 "somewhere else); Mondrian never moves, renames or deletes anything outside its inbox, so the "
                 "file was left where it is. Copy the photos themselves into the inbox")


class LinkedOutbox(Transient):
    """One of the outbox's own folders (`.staging`, `failed`, `duplicates`, a report folder) was replaced by a link
    (or leads out of the outbox) while Mondrian runs: nothing is written, moved or deleted through it."""


def move_once(src: Path, dest: Path) -> Path | None:
    """Move `src` to `dest` (or a free `dest`-2, -3 ... name); nothing to do if it is gone or already there.
    Where it went; None if `src` was not there (renamed or removed meanwhile)."""
    if not os.path.lexists(src):
        return dest if os.path.lexists(dest) else None
    if os.path.lexists(dest):
        if _left_by_a_killed_move(src, dest):
            os.unlink(src)  # a cross-filesystem move was killed between its copy and its unlink
            return dest
        if same_content(src, dest):
            return dest  # the same bytes dropped again after a move on one disk: a photo of its own, left in place
        dest = unique_path(dest.parent, Path(dest.name).stem, Path(dest.name).suffix)
    try:
        move(src, dest, on_copied=lambda: testhooks.crashpoint("move_copied"))
    except FileNotFoundError:
        if os.path.lexists(src):
            raise
        return None  # renamed or removed between the look and the move
    return dest


def _left_by_a_killed_move(src: Path, dest: Path) -> bool:
    """Whether `src` is what a move across disks killed between its copy and its unlink left behind: the same bytes
    at `dest` on another filesystem. On one filesystem a move is a rename, which never leaves two: the same bytes
    at `src` then are a copy the photographer dropped again, a photo of its own (critiqued as a duplicate)."""
    try:
        other_disk = os.lstat(src).st_dev != os.lstat(dest).st_dev
    except OSError:
        return False
    return other_disk and same_content(src, dest)


def another_photo_at(src: Path, filed: Path) -> bool:
    """Whether the file at the inbox path `src` is another photo than the one already filed at `filed` (moved in
    before a kill, then a new photo dropped under its name). What a move across disks killed between its copy and
    its unlink left is not: `move_once` finishes that move."""
    return os.path.lexists(filed) and os.path.lexists(src) and not _left_by_a_killed_move(src, filed)


def link_or_copy(src: Path, dest: Path, *, copy: bool = False) -> str:
    """Put the original kept in the inbox (keep_originals) into its report folder without moving it: a hard link
    where it can be made, else a copy (another disk, or a filesystem without hard links). Returns "linked" or
    "copied", as report.json's `photo.original` says.

    A hard link rather than a symbolic one: it is the same file under a second name, so it survives the original
    being moved or renamed (Lightroom's Move, Rename), deleted, or the outbox being moved; a symbolic link breaks
    on each of these. The price: it shares the bytes, so nothing may write into it in place. `copy`: a copy in any
    case (xmp_embed rewrites it as a new file, which a link would not stay)."""
    try:
        if copy:
            raise OSError(errno.EXDEV, "a copy is asked for")
        os.link(src, dest, follow_symlinks=False)
        how = "linked"
    except OSError:
        shutil.copy2(src, dest, follow_symlinks=False)
        how = "copied"
    if not stat.S_ISREG(os.lstat(dest).st_mode):  # swapped for a link since the checks: never keep one
        os.unlink(dest)
        raise OSError(errno.EINVAL, f"{src.name} is no longer a plain file")
    return how


def staging_name(job: Job) -> str:
    """A claim's own staging folder: after a lease ends, the worker that lost the job and the one that took it over
    may both be staging it, and neither may write into (or rename) the other's. (`job` is the claimed row: its
    token is the claim's, whatever the ledger holds now.)"""
    return f"job-{job.id}" if not job.lease_token else f"job-{job.id}.{job.lease_token}"


class Publisher:
    """Where a job's outcome goes: outbox/, failed/ or duplicates/, recorded in the ledger."""

    def __init__(self, cfg: Config, ledger: Ledger, index: OutboxIndex):
        self.cfg = cfg
        self.ledger = ledger
        self.index = index
        # Told of a file found at a finished job's inbox path (another photo dropped under its name while Mondrian
        # was down): the daemon's watcher queues it once the job is recorded. Thread-safe (the worker calls it).
        self.left_behind: Callable[[Path], None] = lambda path: None

    def sweep_staging(self) -> None:
        """Remove staging folders left by killed runs (a live `mondrian analyze` keeps its own)."""
        live = {staging_name(j) for j in self.ledger.running()}
        try:
            entries = list(os.scandir(self.cfg.staging_dir)) if self.is_own(self.cfg.staging_dir) else []
        except OSError:
            entries = []
        for entry in entries:
            if entry.name not in live:
                shutil.rmtree(entry.path, ignore_errors=True)  # refuses a link: never deletes through one
        # Temporary files of atomic writes (`.<start of NAME>.PID.HEX.tmp`) whose writer was killed before its rename;
        # report folders too, where embedding XMP rewrites the original after the folder was published.
        try:
            reports = [Path(e.path) for e in os.scandir(self.cfg.outbox)
                       if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
        except OSError:
            reports = []
        for folder in (self.cfg.outbox, self.cfg.failed_dir, self.cfg.outbox / "duplicates", *reports):
            if not self.is_own(folder):
                continue
            try:
                names = os.listdir(folder)
            except OSError:
                continue
            for name in names:
                m = ATOMIC_TMP.match(name)
                if m and self.cfg.shared and not self._old(folder / name):
                    continue  # its pid may be another machine's: only a file left for long is surely abandoned
                if m and not pid_alive(int(m.group(1))):
                    try:
                        os.unlink(folder / name)
                    except OSError:
                        pass

    @staticmethod
    def _old(path: Path) -> bool:
        try:
            return time.time() - os.lstat(path).st_mtime > SHARED_TMP_AGE_S
        except OSError:
            return False

    def publish(self, job: Job, src: Path, photo: LoadedImage, report: dict[str, Any],
                 files: dict[str, Path], keep_original: bool, before: Any = None) -> None:
        """`before`: the photo's file identity when it was read (fsutil.identity), so that the last look before its
        move is by identity, not a second read of the whole file."""
        staging = self.cfg.staging_dir / staging_name(job)
        try:
            self.outbox_here()
            self.cfg.staging_dir.mkdir(parents=True, exist_ok=True)
            self.own(self.cfg.staging_dir)  # LinkedOutbox (transient): nothing below may go through a link
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            for name, source in files.items():
                shutil.copyfile(source, staging / name)
            written = [staging / name for name in files]
            if job.kept and not keep_original:
                # With xmp_embed a link would be replaced by the embedded copy once published: said as a copy.
                rewritten = self.cfg.xmp_embed and report["photo"].get("format") in EMBED_FORMATS
                report["photo"]["original"] = link_or_copy(src, staging / report["photo"]["file"], copy=rewritten)
                if report["photo"]["original"] == "copied":
                    written.append(staging / report["photo"]["file"])
            written += write_report_folder(staging, report, photo.image, durable=False).values()
            # in staging: it appears with the report
            sidecar = write_sidecar(staging, report, theirs=self.their_xmp(src), durable=False)
            # Nobody reads staging: every file is synced in one pass, before the one rename that publishes them.
            fsync_files(written + ([sidecar] if sidecar else []), staging)
            testhooks.crashpoint("staged")
            if self._adopt(job, staging, keep_original):
                return
            # A reservation of this very job (killed before its rename) is reused, not skipped as taken.
            stem = safe_stem(src.name)
            final = unique_path(self.cfg.outbox, stem, taken=self.taken(job, published_as=stem),
                                reserved=OUTBOX_RESERVED)
            try:  # refused (LeaseLost) if another worker has the job now; TwinFirst: see Ledger.reserve_output
                self.ledger.reserve_output(job.id, final, None if keep_original else
                                           (report.get("context") or {}).get("key"), still_there=self._still_there)
            except TwinFirst as twin:
                shutil.rmtree(staging, ignore_errors=True)
                self._after_twin(job, twin.twin, src)
                return
            testhooks.crashpoint("reserved")
            # A worker that lost the job after passing its own check may still rename its report into the reserved
            # folder: before this node's rename (then this rename onto a full folder fails, the job is retried, and
            # `resume` adopts that report), or after it (then that one fails). What remains: that worker renaming
            # in the instant between `_adopt` and `unique_path` above makes this node pick the next free name, and
            # the photo gets two report folders (one of them recorded). It takes a worker stopped exactly between
            # its check and its rename, woken in that instant.
            os.rename(staging, final)
            testhooks.crashpoint("renamed")
        except OutboxGone as exc:  # unplugged while the photo was analysed: it waits, as the worker makes it
            shutil.rmtree(staging, ignore_errors=True)
            self.ledger.requeue(job.id, str(exc), delay_s=self.cfg.quiet_seconds, undo_attempt=True)
            return
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            self.transient(job, f"could not write the report to {self.cfg.outbox.name}/ ({exc.strerror or exc})")
            return
        job = self.ledger.get(job.id)
        self.complete(job, final, report, keep_original, before=before)

    def _still_there(self, job: Job) -> bool:
        """Whether a twin's report stands for this photo's: in this outbox (on a shared ledger, a Mac with an outbox
        of its own publishes where this one's photographer never looks), and being published or still in its
        folder (the index's rule: a deleted or replaced one is not)."""
        if not job.output_dir or not Path(job.output_dir).is_relative_to(self.cfg.outbox):
            return False
        return job.state == RUNNING or (bool(job.report_json) and
                                        published_report(Path(job.report_json), job.id) is not None)

    def _after_twin(self, job: Job, twin: Job, src: Path) -> None:
        """The same photo, taken at the same moment by another worker (a second Mac, a copy dropped beside it),
        reserved its report first: this one is its duplicate, filed now if that report is published, else once it
        is (queued again, without spending a try: the next look finds the report before the model runs)."""
        if twin.state == DONE:
            self.duplicate(job, twin, src)
            return
        log.info("%s: the same photo (%s) is being published by another worker; filed as its duplicate once it is",
                 job.rel_path, twin.rel_path)
        self.ledger.requeue(job.id, f"the same photo ({twin.rel_path}) was being published at the same moment",
                            delay_s=max(1.0, self.cfg.quiet_seconds), undo_attempt=True)

    def _clear_old_failure_records(self, job: Job) -> None:
        """A photo that failed while kept in the inbox (keep_originals), or through `analyze`, was fixed where it is
        and is analysed now: its old failure record in failed/ would go on saying it failed. Removed, but only a
        record that is that job's (a later failure may have taken the name) and whose photo is not in failed/."""
        try:
            for old in self.ledger.earlier_failures(job.source_path, job.id):
                if not old.output_dir or Path(old.output_dir).parent != self.cfg.failed_dir:
                    continue
                spot = Path(old.output_dir)
                record = Path(f"{spot}.error.json")
                if os.path.lexists(spot) or not self.is_own(self.cfg.failed_dir):
                    continue  # the photo itself lies in failed/: its record explains it
                try:
                    if json.loads(read_regular_file(record, max_bytes=1 << 20)).get("job_id") != old.id:
                        continue
                except (OSError, ValueError, AttributeError):
                    continue
                for stale in (record, Path(f"{spot}.error.html")):
                    stale.unlink(missing_ok=True)
                log.info("%s: removed its old failure record %s (it is analysed now)", job.rel_path,
                         self.shown(record))
        except Exception as exc:  # tidying only: never a reason to fail a photo that is done
            log.warning("%s: its old failure records could not be tidied (%s)", job.rel_path, exc)

    def _adopt(self, job: Job, staging: Path, keep_original: bool) -> bool:
        """A shared ledger: the report a worker that lost this job renamed into place meanwhile (it names this job)
        is this job's report; this node's staged one is dropped, so the photo keeps one report."""
        if not (self.cfg.shared and job.output_dir):
            return False
        try:
            report = json.loads((Path(job.output_dir) / "report.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        if not isinstance(report, dict) or report.get("job_id") != job.id:
            return False
        shutil.rmtree(staging, ignore_errors=True)
        log.info("%s: adopted the report another worker published for it before losing it", job.rel_path)
        self.complete(self.ledger.get(job.id), Path(job.output_dir), report, keep_original)
        return True

    def complete(self, job: Job, final: Path, report: dict[str, Any], keep_original: bool, before: Any = None) -> None:
        src = Path(job.source_path)
        other: Path | None = None
        sha = report["photo"].get("sha256")
        original = final / report["photo"]["file"]  # never one of the report's own files (report.original_name)
        if job.kept and not keep_original:
            # Linked (or copied) in staging; only a folder the user emptied since needs it again.
            if not os.path.lexists(original) and os.path.isfile(src):
                link_or_copy(src, original)
        elif keep_original:
            if not os.path.lexists(original) and before is not None and sha and not holds(src, before, sha):
                # `mondrian analyze`: the photo was exported again, or filed by the daemon, while it was analysed. A
                # copy now would file other bytes beside this critique (or none, while the report says "copied").
                shutil.rmtree(final, ignore_errors=True)
                self.index.changed()
                self.ledger.fail(job.id, f"the photo changed or went while it was analysed (exported again, or "
                                         f"filed by the daemon): run `{mondrian()} analyze` on it again", None,
                                 kind="transient")
                log.info("%s changed or went while it was analysed: its report is withdrawn", job.rel_path)
                return
            if src.exists() and not original.exists():
                shutil.copy2(src, original)
        elif another_photo_at(src, original):
            # The original went in before a kill; the file at its inbox path now is another photo dropped since.
            # It stays for the inbox, to be critiqued as itself, rather than filed in this folder as `-2`. (The same
            # bytes are a move across disks killed between its copy and its unlink: finished below.)
            other = src
        elif not os.path.lexists(original) and not (holds(src, before, sha) if before is not None and sha
                                                    else self._holds_what_was_published(job, sha)):
            # Replaced or renamed in the moment between the analysis and this move (an export overwriting the file,
            # a rename): the report describes bytes that are not there. Withdrawn; the file is taken as it is now.
            self._withdraw(job, final, src)
            return
        else:
            try:
                asked = report.get("mode") or {}  # a report another worker wrote may be an older one's
                mode = (asked["requested"], asked.get("source", "")) if asked.get("requested") else None
                testhooks.crashpoint("checked")  # the file looked at, about to be moved in
                if not self.move_with_sidecar(src, final, original, mode) and not os.path.lexists(original):
                    # Renamed in the moment between that look and the move (a photo manager's rename): the file
                    # is queued under its new name; this report of nothing is withdrawn, never filed as done.
                    self._withdraw(job, final, src)
                    return
            except OutsideInbox as exc:
                # Its folder turned into a link out of the inbox after the claim. If the original is not in the
                # report folder yet (a move only picks another name when this one is taken), the report of a file
                # Mondrian cannot take in is withdrawn and the job fails with the reason; else it was moved in
                # before the link appeared and the job is finished.
                if not os.path.lexists(original):
                    shutil.rmtree(final, ignore_errors=True)
                    self.fail(job, str(exc))
                    return
            except OSError as exc:
                if not os.path.lexists(original):
                    # The original cannot be moved out (its folder turned read-only after the checks): a report
                    # without its original, unrecorded, would be made again at every attempt. Withdraw it.
                    shutil.rmtree(final, ignore_errors=True)
                    self._not_moved(job, src, exc)
                    return
                log.warning("%s: its sidecar could not be moved into %s (%s)", job.rel_path, self.shown(final),
                            exc.strerror or exc)  # the photo is in: the job is done
            testhooks.crashpoint("moved")
        embedded = None
        if self.cfg.xmp_embed and self.is_own(final) and os.path.lexists(original):
            embedded = embed(original, report)  # after the move, as a new file: again after a crash, the same bytes
        self.ledger.finish(job.id, effective_mode=report["mode"]["effective"], fallbacks=report["mode"]["fallbacks"],
                           report_json=final / "report.json", report_html=final / "report.html",
                           grade=report["overall_grade"], adapter=report["model"]["adapter"],
                           analysis_s=report["timings"].get("analysis_s", 0.0), output_dir=final,
                           context_key=(report.get("context") or {}).get("key"), embedded_sha256=embedded)
        log.info("done: %s -> %s (grade %s)", job.rel_path, self.shown(final / "report.html"),
                 report["overall_grade"])
        if other is not None:
            log.info("%s: another photo was dropped under its name meanwhile; it is critiqued as itself", job.rel_path)
            self.left_behind(other)
        self._clear_old_failure_records(job)
        self.index.changed()

    def _withdraw(self, job: Job, final: Path, src: Path) -> None:
        shutil.rmtree(final, ignore_errors=True)
        self.index.changed()
        if os.path.lexists(src):
            self.ledger.requeue(job.id, "the file changed while its report was written; it will be analysed "
                                        "again", delay_s=self.cfg.quiet_seconds, undo_attempt=True)
        else:
            self.ledger.mark_gone(job.id, "the file was renamed or removed from the inbox while its report was "
                                          "written (a renamed file is critiqued under its new name)")
        log.info("%s changed or went while its report was written: the report is withdrawn", job.rel_path)

    def _not_moved(self, job: Job, src: Path, exc: OSError) -> None:
        """The original could not be moved out of the inbox after its report was written (and withdrawn)."""
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            folder = Path(self.cfg.inbox.name, os.path.relpath(src.parent, self.cfg.inbox)).as_posix()
            self.fail(job, f"Mondrian cannot move this photo out of {folder}/ ({exc.strerror}), so its report was "
                           f"withdrawn and the photo left where it is: make the folder writable (chmod u+w) and run "
                           f"`{mondrian()} retry --failed`", keep_original=True)
        else:
            self.transient(job, f"the photo could not be moved out of the inbox ({exc.strerror or exc}); its report "
                                f"was withdrawn")

    def move_with_sidecar(self, src: Path, dest_dir: Path, dest: Path | None = None,
                          mode: tuple[str, str] | None = None) -> bool:
        """Move the original (to `dest`, else its own name in `dest_dir`) and its sidecar. Safe to repeat after a
        kill: a sidecar left behind by a kill between the two moves is still found, and a copy completed by a
        killed cross-filesystem move is recognised instead of being copied a second time. Refuses (OutsideInbox)
        when the file's folder is not inside the real inbox, whatever links lie on its path. False, and nothing
        moved, when the original was not there (renamed or removed meanwhile): its sidecars stay with it.
        `mode`: the mode (and where it came from) the report was made in; a `.mode` that came or changed since
        does not describe the report, and stays in the inbox, where `status` names it."""
        if not self.inside_inbox(src):
            raise OutsideInbox(OUTSIDE_INBOX)
        self.own(dest_dir)
        sidecar = sidecar_for(src)
        if sidecar is not None and mode is not None and mode[1] != "command" and not self._says(sidecar, mode):
            log.warning("%s: its sidecar %s came or changed while its report was written, so it does not describe "
                        "that report (%s, %s) and stays in the inbox; to have the photo critiqued in that mode, put "
                        "the photo back beside it", src.name, sidecar.name, mode[0],
                        "from its sidecar" if mode[1] == "sidecar" else "the default")
            sidecar = None
        dest = dest or dest_dir / src.name
        if move_once(src, dest) is None:
            return False
        if sidecar is not None and os.path.lexists(sidecar):
            # Named after where the photo went (failed/x-2.jpg -> failed/x-2.mode), so that the pair is found
            # again together: `mondrian retry --failed` brings back the sidecar the user fixed there.
            target = dest_dir / fitted_name(dest.stem, Path(sidecar.name).suffix)
            if self._shared(src, sidecar):
                # IMG_3.jpg and IMG_3.png with one IMG_3.mode: it speaks for both, so the first one out takes a copy
                # and the last one the file (moved away with the first, it would leave the other on the default).
                if not os.path.lexists(target):
                    shutil.copy2(sidecar, target, follow_symlinks=False)
            else:
                move_once(sidecar, target)
        for theirs in editor_sidecars(src):
            suffix = theirs.suffix
            target = dest_dir / fitted_name(dest.name if same_name(theirs.stem, src.name) else dest.stem, suffix)
            if os.path.lexists(target):
                # Mondrian's own `<stem>.xmp`, which holds theirs merged: their file, byte for byte, sits beside it.
                target = target.with_name(fitted_name(dest.stem, f".original{suffix}"))
            if not os.path.lexists(theirs) or os.path.lexists(target):
                continue
            if same_name(theirs.stem, src.stem) and self._shared(src, theirs):
                # IMG_1.xmp beside IMG_1.jpg and IMG_1.png describes both (the .mode rule above): a copy goes with
                # each photo but the last, which takes the file, so every report merges the photographer's keywords.
                shutil.copy2(theirs, target, follow_symlinks=False)
            else:
                move_once(theirs, target)
        return True

    @staticmethod
    def _says(sidecar: Path, mode: tuple[str, str]) -> bool:
        """Whether `sidecar` is the one the mode was read from and still asks for it."""
        if mode[1] != "sidecar":
            return False
        try:
            return read_sidecar(sidecar) == mode[0]
        except SidecarError:
            return False

    def _shared(self, photo: Path, sidecar: Path) -> bool:
        """Whether another photo waiting in `photo`'s folder has the same stem (and so the same `.mode`). A sidecar
        named after the whole file (`IMG_3.jpg.mode`) is that photo's alone."""
        if sidecar.name.lower() == (photo.name + SIDECAR_SUFFIX).lower():
            return False
        try:
            names = [e.name for e in os.scandir(photo.parent) if not e.is_dir(follow_symlinks=False)]
        except OSError:
            return False
        return any(Path(n).stem == photo.stem and n not in (photo.name, sidecar.name)
                   and not is_ignored(photo.parent / n, self.cfg.inbox) for n in names)

    def their_xmp(self, src: Path) -> bytes | None:
        """The photographer's own XMP sidecar that came with `src` (`IMG_1.xmp`), to merge into Mondrian's."""
        for theirs in editor_sidecars(src):
            # A link is not read: its target may be anyone's file, anywhere (the link itself still rides along).
            if theirs.suffix.lower() == ".xmp" and not same_name(theirs.stem, src.name) and not theirs.is_symlink():
                try:
                    return read_regular_file(theirs, max_bytes=THEIR_XMP_MAX_BYTES, timeout_s=5.0)
                except OSError as exc:  # a pipe, a link to one, too large, unreadable: not merged, still moved
                    log.warning("%s: its XMP sidecar %s could not be read (%s)", src.name, theirs.name, exc)
        return None

    def taken(self, job: Job, published_as: str | None = None) -> set[str]:
        """Output names reserved by other active jobs (this job's own earlier reservation may be reused); with
        `published_as` (a report folder's stem), also every report folder of that stem any job was published to.

        A report folder's name is never given to another photo, even once its folder is deleted: pages already
        written link to it (earlier critiques), and so may the photographer's bookmarks and messages; reused, those
        links would open another photo's report."""
        taken = self.ledger.reserved_outputs()
        if published_as is not None:
            # A prefix every fitted candidate keeps (unique_path shortens only names near the 255-byte limit).
            # SQLite's LIKE folds ASCII letters only, and a Mac's folders fold every letter (`ÉTÉ` is `Été`): the
            # prefix stops before the first other letter that has a case.
            prefix = published_as[:PUBLISHED_PREFIX_CHARS]
            prefix = prefix[:next((i for i, c in enumerate(prefix) if ord(c) > 127 and c.lower() != c.upper()),
                                  len(prefix))]
            taken |= self.ledger.outputs_starting(self.cfg.outbox / prefix)
        return taken - {job.output_dir}

    def resume(self, job: Job, keep_original: bool) -> bool:
        """Finish a job whose outcome was published before a crash instead of analysing it again. False (analyse
        it) where nothing of it was published, or where what was published describes other bytes than the file
        it would take now: that outcome is withdrawn first (`_holds_what_was_published`)."""
        keep_original = keep_original or not job.owns_file
        out = Path(job.output_dir)
        report_file = out / "report.json"
        error_file = Path(f"{out}.error.json")
        try:
            if report_file.exists():
                report = json.loads(report_file.read_text(encoding="utf-8"))
                if report.get("job_id") == job.id:
                    if not os.path.lexists(out / report["photo"]["file"]) and \
                            not self._holds_what_was_published(job, report["photo"].get("sha256")):
                        shutil.rmtree(out)
                        return self._withdrawn(job, "report")
                    self.complete(job, out, report, keep_original)
                    return True
            if error_file.exists():
                record = json.loads(error_file.read_text(encoding="utf-8"))
                if record.get("job_id") == job.id:
                    if not keep_original and not job.kept:
                        if not os.path.lexists(out) and not self._holds_what_was_published(job, job.sha256):
                            for suffix in (".error.json", ".error.html"):
                                Path(f"{out}{suffix}").unlink(missing_ok=True)
                            return self._withdrawn(job, "failure record")
                        if not another_photo_at(Path(job.source_path), out):
                            with contextlib.suppress(OutsideInbox):  # recorded as failed; the file stays put
                                self.move_with_sidecar(Path(job.source_path), out.parent, out)
                    self.ledger.fail(job.id, record["reason"], out, kind=record.get("kind", "permanent"))
                    if not keep_original and not job.kept and os.path.lexists(job.source_path):
                        self.left_behind(Path(job.source_path))
                    return True
            dup_file = Path(f"{out}.duplicate.json")
            if dup_file.exists() and not keep_original:
                record = json.loads(dup_file.read_text(encoding="utf-8"))
                if record.get("job_id") == job.id:
                    if not job.kept and not os.path.lexists(out) and \
                            not self._holds_what_was_published(job, job.sha256):
                        dup_file.unlink()
                        return self._withdrawn(job, "duplicate record")
                    self.move_duplicate(job, out)
                    return True
        except (OSError, ValueError, LookupError):
            pass
        return False

    def _holds_what_was_published(self, job: Job, sha256: str | None) -> bool:
        """Whether the file at the job's inbox path is still the one its published outcome describes. A kill between
        publishing and moving the original leaves the original in the inbox until the next start, and meanwhile it
        may be exported again under its name or removed: another file must not be filed under that outcome. By
        content where it was hashed; else (a file that could not be decoded) by the size and mtime it was queued
        with. A false "changed" costs one more analysis, never a photo."""
        src = Path(job.source_path)
        if sha256:
            return content_is(src, sha256)
        try:
            st = os.stat(src)
        except OSError:
            return False
        return job.size is None or (st.st_size == job.size and st.st_mtime == job.mtime)

    def _withdrawn(self, job: Job, what: str) -> bool:
        log.info("%s changed or was removed while Mondrian was down, before it was filed with its %s: that %s is "
                 "withdrawn and the file taken as it is now", job.rel_path, what, what)
        self.index.changed()
        return False

    def duplicate(self, job: Job, first: Job, src: Path, fallbacks: list[dict[str, str]] | None = None, *,
                  before: Any = None, sha256: str | None = None) -> None:
        """File `src` as a duplicate of `first`'s photo. `before` and `sha256`: the identity and hash it had when
        it was found to be one, checked again just before it is filed (see `move_duplicate`)."""
        dup_dir = self.cfg.outbox / "duplicates"
        try:
            self.outbox_here()
            dup_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise Transient(f"{self.shown(dup_dir)} is a file, not a folder: move it out of the way; the photo waits "
                            f"in the inbox meanwhile") from None
        self.own(dup_dir)
        dest = unique_path(dup_dir, safe_stem(src.name), Path(src.name).suffix, self.taken(job),
                           companions=RECORD_SUFFIXES, as_a_mac_sees=True)
        self.ledger.reserve_output(job.id, dest)
        record = {"job_id": job.id, "file": src.name, "duplicate_of_job": first.id,
                  "report": os.path.relpath(first.report_html, dup_dir) if first.report_html else None,
                  "reason": "the same photo was already analysed with the same advisor, mode, reference photos "
                            "and adapter; add references or train an adapter, then drop it again for a new critique",
                  "fallbacks": fallbacks}  # this request's own way to the mode used (it may have asked another)
        if job.kept:
            record["kept"] = "the photo was left where it is in the inbox (keep_originals)"
        atomic_write_text(Path(f"{dest}.duplicate.json"), json.dumps(record, indent=2, ensure_ascii=False))
        testhooks.crashpoint("dup_recorded")
        if self.move_duplicate(job, dest, before=before, sha256=sha256):
            log.info("duplicate: %s is the same photo as job %s; see %s", job.rel_path, first.id,
                     self.shown(Path(first.report_html or "")))
            self.index.changed()

    def move_duplicate(self, job: Job, dest: Path, *, before: Any = None, sha256: str | None = None) -> bool:
        """Move a recorded duplicate into duplicates/ (unless it is kept in the inbox) and finish it; fail it
        instead if it left the inbox. Given `before` and `sha256`, a file changed since it was hashed (an edit
        saved over it) is no duplicate any more: its record is withdrawn and it is analysed as it is now."""
        src = Path(job.source_path)
        if (before is not None and sha256 and not job.kept and os.path.lexists(src) and not os.path.lexists(dest)
                and not holds(src, before, sha256)):
            Path(f"{dest}.duplicate.json").unlink(missing_ok=True)
            self.ledger.requeue(job.id, "the file changed after it was found to be a duplicate; it will be "
                                        "analysed again", delay_s=self.cfg.quiet_seconds, undo_attempt=True)
            log.info("%s changed after it was found to be a duplicate: it is analysed as it is now", job.rel_path)
            return False
        try:
            # Not when it is in duplicates/ already (a kill after the move): a file at its inbox path now is another
            # photo, dropped since, which must not be filed (or deleted as "the same bytes") under this record.
            if not job.kept and not another_photo_at(Path(job.source_path), dest):
                self.move_with_sidecar(Path(job.source_path), dest.parent, dest)
        except OutsideInbox as exc:
            if not os.path.lexists(dest):  # else it was moved in before its folder became a link out
                Path(f"{dest}.duplicate.json").unlink(missing_ok=True)
                self.fail(job, str(exc))
                return False
        testhooks.crashpoint("dup_moved")
        record = json.loads(Path(f"{dest}.duplicate.json").read_text(encoding="utf-8"))
        first = self.ledger.get(record["duplicate_of_job"])
        self.ledger.finish_duplicate(job.id, first, dest, fallbacks=record.get("fallbacks"))
        if not job.kept and os.path.lexists(job.source_path):
            self.left_behind(Path(job.source_path))  # another photo under its name (see above)
        if Path(job.source_path).is_relative_to(self.cfg.spool_dir) and (
                self._has_its_original(first) or self._a_copy_kept(first, job)):
            # Sent through the API: the client keeps its file, and the report folder (or an earlier resend's copy)
            # has these very bytes. A script that sends a photo again to read its critique must not fill
            # duplicates/ with copies.
            for name in (dest, Path(f"{dest}.duplicate.json")):
                name.unlink(missing_ok=True)
        return True

    def _a_copy_kept(self, first: Job, job: Job) -> bool:
        """Whether an earlier duplicate of `first` still lies in duplicates/ with its bytes: one copy is enough,
        however often a script sends the photo again."""
        return bool(first.sha256) and any(
            other.id != job.id and other.output_dir and content_is(Path(other.output_dir), first.sha256)
            for other in self.ledger.duplicates_of(first.id))

    def _has_its_original(self, first: Job) -> bool:
        """Whether `first`'s report folder still holds the photo it critiqued: its original may have been moved
        into a photo library or edited since, and then this copy is the only one Mondrian has (kept in
        duplicates/, as an inbox photo's)."""
        try:
            report = json.loads(Path(first.report_json).read_text(encoding="utf-8"))
            original = Path(first.output_dir) / report["photo"]["file"]
        except (OSError, TypeError, ValueError, KeyError):
            return False
        return any(digest and content_is(original, digest) for digest in (first.sha256, first.embedded_sha256))

    def transient(self, job: Job, reason: str) -> None:
        job = self.ledger.get(job.id)
        if job.attempts >= self.cfg.max_attempts:
            self.fail(job, f"{reason}; gave up after {job.attempts} attempts. Fix the cause, then run "
                           f"`{mondrian()} retry --failed`", kind="transient")
            return
        delay = self.cfg.retry_base_seconds * (2 ** (job.attempts - 1))
        log.warning("will retry %s in %g s: %s", job.rel_path, delay, reason)
        self.ledger.retry_later(job.id, reason, delay)

    def fail(self, job: Job, reason: str, kind: str = "permanent", keep_original: bool = False, *,
             before: Any = None) -> None:
        """Record the failure and file the photo in failed/. `before`: the file's identity when it was read; a
        file changed since (a good copy saved over a broken one) is not filed under a reason that is not its own:
        it is read again instead."""
        keep_original = keep_original or not job.owns_file or job.kept
        src = Path(job.source_path)
        failed = self.cfg.failed_dir
        dest: Path | None = None
        try:
            self.outbox_here()
            failed.mkdir(parents=True, exist_ok=True)
            self.own(failed)
            dest = unique_path(failed, safe_stem(src.name), Path(src.name).suffix, self.taken(job),
                               companions=RECORD_SUFFIXES, as_a_mac_sees=True)
            self.ledger.reserve_output(job.id, dest)
            cause = cause_of(reason, advisor_source=job.advisor_source, mode_source=job.mode_source)
            step = self._next_step(job, cause)
            where = where_it_is(from_inbox=bool(job.owns_file), kept_in_inbox=keep_original)
            record = {"job_id": job.id, "file": src.name, "reason": reason, "kind": kind,
                      "advisor": job.advisor, "failed_at": now_iso(), "cause": cause.key, "next_step": step,
                      "what_to_do": f"{step} {where}",
                      "advisor_source": job.advisor_source, "mode_source": job.mode_source,
                      "from_inbox": bool(job.owns_file)}
            record = {k: without_home(v) if isinstance(v, str) else v for k, v in record.items()}
            atomic_write_text(Path(f"{dest}.error.json"), json.dumps(record, indent=2, ensure_ascii=False))
            testhooks.crashpoint("fail_recorded")
            if not keep_original and before is not None and os.path.lexists(src) and identity(src) != before:
                for suffix in RECORD_SUFFIXES:
                    Path(f"{dest}{suffix}").unlink(missing_ok=True)
                self.ledger.requeue(job.id, "the file changed after it could not be read; it will be read again",
                                    delay_s=self.cfg.quiet_seconds, undo_attempt=True)
                log.info("%s changed after its failure: it is read again", job.rel_path)
                return
            if not keep_original:
                self.move_with_sidecar(src, failed, dest)
                testhooks.crashpoint("fail_moved")
        except OutsideInbox:
            log.warning("left %s where it is: its folder is no longer inside the inbox", job.rel_path)
        except (OSError, LinkedOutbox) as exc:
            log.error("could not move %s to %s: %s", job.rel_path, failed, exc)
        self.ledger.fail(job.id, reason, dest, kind=kind)
        log.warning("failed: %s: %s", job.rel_path, reason)
        self.index.changed()  # listed, and its page written, at the next refresh: at once while the outbox is small

    def _next_step(self, job: Job, cause: Cause) -> str:
        """The next step that fits the cause (failures.py): an unknown advisor lists the known ones."""
        known = load_advisors(self.cfg) if cause.key.startswith("advisor") else {}
        return advice(cause, from_inbox=bool(job.owns_file), advisors=known, cfg=self.cfg, outbox=True,
                      **analyzed_as(job, name_only=True))

    def clean_staging(self, job: Job) -> None:
        if self.is_own(self.cfg.staging_dir):
            shutil.rmtree(self.cfg.staging_dir / staging_name(job), ignore_errors=True)

    def shown(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.cfg.home))
        except ValueError:
            return str(path)

    def outbox_here(self) -> None:
        """An outbox removed while Mondrian runs is made again, but only where its parent folder still is: an
        outbox on a drive that was unplugged (`/Volumes/Photos/outbox`) must not come back as a plain folder on the
        startup disk, where the drive mounts. OutboxGone (an OSError: the photo is tried again later) instead."""
        outbox = self.cfg.outbox
        try:
            outbox.mkdir()
        except FileExistsError:
            pass
        except FileNotFoundError:
            raise OutboxGone(f"the outbox {outbox} is not there, nor {outbox.parent} (a drive or network share that "
                             f"is not connected?); connect it, and the photo goes on by itself") from None

    def own(self, folder: Path) -> None:
        """Raise LinkedOutbox unless `folder` is a real folder inside the outbox (see `fsutil.own_folder_inside`)."""
        try:
            own_folder_inside(folder, self.cfg.outbox)
        except NotOwn as exc:
            raise LinkedOutbox(str(exc)) from None

    def is_own(self, folder: Path) -> bool:
        try:
            self.own(folder)
        except (LinkedOutbox, OSError):
            return False
        return True

    def inside_inbox(self, src: Path) -> bool:
        """Whether `src` is a file Mondrian was given to move: in the inbox, or uploaded into its API spool."""
        return folder_inside(src, self.cfg.inbox) or folder_inside(src, self.cfg.spool_dir)
