"""The worker: claims one job at a time from the ledger, analyses it, publishes the result.

It runs on the single thread that owns the model runtime (MLX is not thread-safe). Publishing is ordered
so that a SIGKILL at any point is recoverable: reports are written into a staging folder, the final
folder name is recorded in the ledger, the staging folder is renamed into place, the original is moved in,
and only then is the job marked done. A job whose folder already holds its own report is finished rather
than analysed again, so nothing is ever processed twice.
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import hashlib
import json
import logging
import os
import re
import resource
import shutil
import signal
import stat
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from ..analysis.advisors import Advisor, UnknownAdvisor, get_advisor, load_advisors
from ..config import Config
from ..intake.images import ImageRejected, LoadedImage, load_photo
from ..intake.inbox import (OUTBOX_RESERVED, RECORD_SUFFIXES, SidecarError, read_sidecar, safe_stem, sidecar_for,
                    unique_path)
from .isolation import check_alone
from ..ledger import DONE, FAILED, Job, Ledger, LedgerUnavailable
from ..limits import AnalysisCancelled, AnalysisTimedOut
from .report import IndexEntry, atomic_write_text, temp_name, write_index, write_report_folder
from ..analysis import AnalysisContext, AnalysisResult, Strategy, build_strategies, resolve

log = logging.getLogger("mondrian.worker")

SMOKE_NOTICE = ("These scores come from Mondrian's smoke model: a tiny, randomly initialised network used for "
                "tests and the offline demo. They are not meaningful. Set MONDRIAN_MODEL to a real Qwen2-VL "
                "model for real critiques.")


class PermanentFailure(Exception):
    """The photo itself is the problem: retrying cannot help."""


class Cancelled(Exception):
    """The daemon is stopping; the job goes back to the queue."""


class TransientFailure(Exception):
    """Something outside the photo failed (model load, disk): retry later with backoff."""


class OutsideInbox(PermanentFailure):
    """The photo's folder, every link resolved, is not inside the inbox: nothing there may be moved or deleted."""


OUTSIDE_INBOX = ("its folder is no longer inside the inbox (a folder on its path was replaced by a link to "
                 "somewhere else); Mondrian never moves, renames or deletes anything outside its inbox, so the "
                 "file was left where it is. Copy the photos themselves into the inbox")


# Test-only fault injection (issue 3's crash soak): `MONDRIAN_TEST_CRASH_AT=<point>[:<n>]` makes the process
# SIGKILL itself the n-th time (default 1st) it reaches <point>, to hit the narrow windows of publishing that
# random external kills rarely land in. `MONDRIAN_TEST_STOP_AT=<point>[:<n>]` makes it SIGSTOP itself there
# (the n-th time only), so a test can act while a photo is in hand (kill it from outside, overwrite the photo)
# whatever the machine's speed, then SIGCONT or SIGKILL it. The point "analysing" (the photo decoded, the model
# about to run) is reached by the isolation check's child process too. Unset (always, outside tests) they cost one
# dict lookup.
_CRASH_AT = os.environ.get("MONDRIAN_TEST_CRASH_AT", "")
_STOP_AT = os.environ.get("MONDRIAN_TEST_STOP_AT", "")
_crash_hits: dict[str, int] = {}


def _crashpoint(name: str) -> None:
    if not (_CRASH_AT or _STOP_AT):
        return
    _crash_hits[name] = _crash_hits.get(name, 0) + 1
    point, _, nth = _CRASH_AT.partition(":")
    if point == name and _crash_hits[name] >= int(nth or 1):
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
    point, _, nth = _STOP_AT.partition(":")
    if point == name and _crash_hits[name] == int(nth or 1):
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGSTOP)


# Test-only: `MONDRIAN_TEST_POISON=<file name>` makes the analysis of a photo of that name kill the process with
# SIGABRT (as a native crash in a decoder or in the model would), or with `MONDRIAN_TEST_POISON_SIGNAL` (KILL: as
# the OOM killer would), in the daemon and in the isolation check's child alike: a truly poisonous photo, which
# must be set aside while the others are served.
_POISON = os.environ.get("MONDRIAN_TEST_POISON", "")
_POISON_SIGNAL = os.environ.get("MONDRIAN_TEST_POISON_SIGNAL", "ABRT")


def _poison_point(src: Path) -> None:
    if _POISON and src.name == _POISON:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file from a deliberate crash
        logging.shutdown()
        os.kill(os.getpid(), signal.Signals[f"SIG{_POISON_SIGNAL}"])


def _now_iso(ts: float | None = None) -> str:
    return datetime.fromtimestamp(ts or time.time(), tz=timezone.utc).isoformat(timespec="seconds")


def _move(src: Path, dst: Path) -> None:
    """Rename when possible (atomic); across filesystems copy to a temporary name, rename, then unlink."""
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = dst.with_name(temp_name(dst.name, "moving"))
        try:
            shutil.copy2(src, tmp, follow_symlinks=False)
            os.replace(tmp, dst)
        except BaseException:
            try:
                os.unlink(tmp)  # a full disk must not leave half a copy behind
            except OSError:
                pass
            raise
        _crashpoint("move_copied")
        os.unlink(src)


_ATOMIC_TMP = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$", re.S)  # report.temp_name(name, "PID.HEX.tmp")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _identity(path: Path) -> tuple[int, int, int, int, int] | None:
    """What changes when a file's bytes do: ctime too, because a rewrite can keep inode and size and put the old
    mtime back (`os.utime`, `touch -r`, `cp -p` onto the same file), but nothing can set ctime back."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _holds(path: Path, before: tuple[int, int, int, int, int] | None, sha256: str) -> bool:
    """Whether `path` still holds the bytes that were analysed (`before` was its identity before they were read,
    `sha256` their hash). Only ctime moved: metadata (permissions, extended attributes, a hard link) or a rewrite
    that put the old mtime back, which only the content tells apart."""
    now = _identity(path)
    if now == before:
        return True
    if now is None or before is None or now[:4] != before[:4]:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # never wait on a FIFO swapped in meanwhile
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != now[:2]:
            return False
        return hashlib.file_digest(f, "sha256").hexdigest() == sha256


def _same_content(a: Path, b: Path) -> bool:
    """True if `b` is already a complete copy of `a` (a cross-filesystem move killed before its unlink)."""
    try:
        sa, sb = os.lstat(a), os.lstat(b)
        if os.path.islink(a) or os.path.islink(b):
            return os.path.islink(a) and os.path.islink(b) and os.readlink(a) == os.readlink(b)
        return sa.st_size == sb.st_size and filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def folder_inside(path: Path, root: Path) -> bool:
    """Whether `path` lies in a folder that, with every link on its path resolved, is inside the real `root`.
    The file itself may be a link: moving a link moves the link, never its target."""
    return Path(os.path.realpath(path.parent)).is_relative_to(os.path.realpath(root))


def _move_once(src: Path, dest: Path) -> None:
    """Move `src` to `dest` (or a free `dest`-2, -3 ... name); nothing to do if it is gone or already there."""
    if not os.path.lexists(src):
        return
    if os.path.lexists(dest):
        if _same_content(src, dest):
            os.unlink(src)  # a cross-filesystem move was killed between its copy and its unlink
            return
        dest = unique_path(dest.parent, Path(dest.name).stem, Path(dest.name).suffix)
    _move(src, dest)


class Worker:
    def __init__(self, cfg: Config, ledger: Ledger, runtime_factory: Callable[[], Any],
                 stop: threading.Event | None = None):
        self.cfg = cfg
        self.ledger = ledger
        self._runtime_factory = runtime_factory
        self.runtime: Any = None
        self.stop = stop or threading.Event()
        self.strategies = build_strategies(cfg, ledger)
        self.current: Job | None = None
        self.busy = threading.Event()
        self._smoke_cache: dict[tuple[str, int, int], bool] = {}

    # -- lifecycle ----------------------------------------------------------------------------
    def load_runtime(self) -> Any:
        if self.runtime is None:
            self.runtime = self._runtime_factory()
        return self.runtime

    def recover(self) -> int:
        """Requeue jobs a dead process left running; set aside a photo shown to crash the analysis by itself."""
        n = 0
        for job in self.ledger.orphaned_running():
            if not job.owns_file:
                self._recover_direct(job)
            elif job.attempts >= self.cfg.max_attempts:
                if job.output_dir and self._resume(job, False):
                    pass  # its outcome was already published: finish it, never record it twice
                else:
                    self._judge(job)
            else:
                self.ledger.requeue(job.id, "interrupted (Mondrian stopped while analysing it); queued again",
                                    keep_place=True)
            n += 1
        self.ledger.sweep_run_locks()
        self._sweep_staging()
        return n

    def _recover_direct(self, job: Job) -> None:
        """A killed `mondrian analyze`: finish it from its published report, else fail it. Never take it over as
        an inbox job: its photo is the user's and stays where it is."""
        if job.output_dir and self._resume(job, True):
            return
        self._fail(job, "`mondrian analyze` was stopped before it finished; the photo was left where it is. Run "
                        "`mondrian analyze` on it again", kind="transient")

    def _judge(self, job: Job) -> None:
        """Mondrian died `max_attempts` times with this photo in hand: it may be the photo, or the machine (a
        restarted service, the OOM killer, a forced shutdown). Only an analysis of it alone can tell."""
        log.warning("Mondrian stopped %d times while analysing %s; checking whether the photo itself is the cause",
                    job.attempts, job.rel_path)
        verdict = check_alone(self.cfg, job.id, self.stop)
        if verdict.crashed:
            self._fail(job, f"Mondrian stopped {job.attempts} times while analysing this photo, and an analysis of it "
                            f"alone in a separate process broke too ({verdict.detail}); it was set aside so the rest "
                            f"of the inbox can go on. Export it again (another format or size) and drop the new file "
                            f"into the inbox", kind="permanent")
        elif verdict.crashed is False:
            log.info("%s is not the cause of the crashes: %s; queued again", job.rel_path, verdict.detail)
            self.ledger.requeue(job.id, f"Mondrian stopped {job.attempts} times while analysing it, but the photo is "
                                        f"not the cause: {verdict.detail}; queued again", reset_attempts=True)
        elif not self.stop.is_set():
            log.warning("could not tell whether %s crashes the analysis: %s; queued again", job.rel_path,
                        verdict.detail)
            self.ledger.requeue(job.id, f"interrupted; whether the photo itself crashes the analysis is not known "
                                        f"yet ({verdict.detail}); queued again")
        # Stopping: the job stays as the crash left it, and the next start checks it again.

    def analyse_alone(self, job: Job) -> str:
        """Decode and analyse `job`'s photo as `process` would, publishing nothing and writing nothing to the
        ledger (the isolation check's child); returns how it went, in words. A crash here is the verdict."""
        src = Path(job.source_path)
        override = job.requested_mode if job.mode_source == "command" else None
        try:
            self._check_symlink(src)  # what `process` refuses to read, the check does not read either
            requested, _ = self._requested_mode(src, override)
            advisor = self._advisor(job.advisor)
            photo = load_photo(src, self.cfg.max_pixels, timeout_s=self.cfg.job_timeout_seconds)
            self._analyse(job, src, photo, advisor, requested)
        except Exception as exc:  # not a crash: `process` will meet it again and deal with it
            return f"{type(exc).__name__}: {exc}"
        return "analysed"

    def _sweep_staging(self) -> None:
        """Remove staging folders left by killed runs (a live `mondrian analyze` keeps its own)."""
        live = {f"job-{j.id}" for j in self.ledger.running()}
        try:
            entries = list(os.scandir(self.cfg.staging_dir))
        except OSError:
            entries = []
        for entry in entries:
            if entry.name not in live:
                shutil.rmtree(entry.path, ignore_errors=True)
        # Temporary files of atomic writes (`.<start of NAME>.PID.HEX.tmp`) whose writer was killed before its rename.
        for folder in (self.cfg.outbox, self.cfg.failed_dir, self.cfg.outbox / "duplicates"):
            try:
                names = os.listdir(folder)
            except OSError:
                continue
            for name in names:
                m = _ATOMIC_TMP.match(name)
                if m and not _pid_alive(int(m.group(1))):
                    try:
                        os.unlink(folder / name)
                    except OSError:
                        pass

    def run_once(self) -> bool:
        """Claim and process one job. Returns False when nothing was due."""
        job = self.ledger.claim()
        if job is None:
            return False
        self.current = job
        self.busy.set()
        try:
            _crashpoint("claimed")
            self.process(job)
        except TransientFailure as exc:
            self._clean_staging(job)
            self._transient(job, str(exc))
        except (Cancelled, AnalysisCancelled):
            log.info("stopping: photo %s goes back to the queue", job.rel_path)
            self._clean_staging(job)
            self.ledger.requeue(job.id, "Mondrian was stopped while analysing it; queued again",
                                undo_attempt=True, keep_place=True)
        except LedgerUnavailable:
            # Stopping while the ledger cannot be written: the job stays running there, and the next start
            # finishes it from what was published, or analyses it again. Nothing is recorded twice.
            log.warning("stopping: %s stays in progress and is taken up again at the next start", job.rel_path)
            raise
        except Exception as exc:  # one photo must never take the worker down
            if getattr(exc, "permanent", False):
                self._fail(self.ledger.get(job.id), f"the model could not produce a critique: {exc}")
            else:
                log.exception("unexpected error on %s", job.rel_path)
                self._transient(job, f"unexpected error: {type(exc).__name__}: {exc}")
        finally:
            self.current = None
            self.busy.clear()
        return True

    # -- one job ------------------------------------------------------------------------------
    def process(self, job: Job, *, keep_original: bool = False, mode_override: str | None = None) -> None:
        keep_original = keep_original or not job.owns_file
        if job.output_dir and self._resume(job, keep_original):
            return
        src = Path(job.source_path)
        if not os.path.lexists(src):
            self.ledger.mark_gone(job.id, "the file was removed from the inbox before it was analysed")
            log.info("gone before analysis: %s", job.rel_path)
            return
        if not keep_original and not self._inside_inbox(src):
            self._fail(job, OUTSIDE_INBOX)
            return
        if not keep_original and not self._settled(job, src):
            return
        try:
            if not keep_original:
                self._check_symlink(src)
            requested, source = self._requested_mode(src, mode_override)
            self.ledger.set_mode(job.id, requested, source)
            advisor = self._advisor(job.advisor)
            t0 = time.perf_counter()
            before = _identity(src)
            photo = load_photo(src, self.cfg.max_pixels, timeout_s=self.cfg.job_timeout_seconds)
            decode_s = time.perf_counter() - t0
        except (PermanentFailure, SidecarError, ImageRejected) as exc:
            self._fail(job, str(exc), keep_original=keep_original)
            return
        self.ledger.set_hash(job.id, photo.sha256)
        first = self.ledger.find_done(photo.sha256, advisor.id, requested, exclude=job.id)
        if first is not None and not keep_original:
            self._duplicate(job, first, src)
            return
        if self.stop.is_set():
            raise Cancelled()
        t1 = time.perf_counter()
        try:
            strategy, fallbacks, result = self._analyse(job, src, photo, advisor, requested)
        except AnalysisTimedOut:
            self._clean_staging(job)
            self._fail(job, f"analysis took longer than {self.cfg.job_timeout_seconds:g} s (job_timeout_seconds) "
                            f"and was stopped so the rest of the inbox can go on", keep_original=keep_original)
            return
        analysis_s = time.perf_counter() - t1
        if not keep_original and not _holds(src, before, photo.sha256):
            # Overwritten while it was analysed: the report must describe the final bytes, so start over.
            self.ledger.requeue(job.id, "the file changed while it was analysed; it will be analysed again",
                                delay_s=self.cfg.quiet_seconds, undo_attempt=True)
            log.info("changed during analysis, queued again: %s", job.rel_path)
            return
        report = self._assemble(job, src, photo, advisor, requested, source, strategy.name, fallbacks, result,
                                {"decode_s": decode_s, "analysis_s": analysis_s, **result.timings})
        self._publish(job, src, photo, report, result.files, keep_original)

    def _analyse(self, job: Job, src: Path, photo: LoadedImage, advisor: Advisor,
                 requested: str) -> tuple[Strategy, list[dict[str, str]], AnalysisResult]:
        """The model's part of a job, where a native crash would happen: shared by `process` and the isolation
        check (daemon/isolation.py), so that the check runs exactly what crashed the daemon."""
        try:
            runtime = self.load_runtime()
        except Exception as exc:  # a model that fails to load may load next time (memory, disk, a mount)
            log.error("could not load the model: %s: %s", type(exc).__name__, exc)
            raise TransientFailure(f"the model could not be loaded ({type(exc).__name__}: {exc})") from exc
        strategy, fallbacks = resolve(requested, advisor, self.strategies)
        log.info("analysing %s as %s (%s%s)", job.rel_path, advisor.name, strategy.name,
                 f", asked for {requested}" if strategy.name != requested else "")
        _crashpoint("analysing")
        _poison_point(src)
        result = strategy.analyse(AnalysisContext(runtime=runtime, cfg=self.cfg, advisor=advisor, photo=photo,
                                                  cancel=self.stop,
                                                  deadline=time.monotonic() + self.cfg.job_timeout_seconds))
        return strategy, fallbacks, result

    def _settled(self, job: Job, src: Path) -> bool:
        """Unchanged since it was queued (the watcher had already seen it still for the quiet time): go on.
        Changed since: remember what it is now and look again after the quiet time, so it is analysed once it
        stays still between two looks. Never compares the mtime with the clock: a camera with a wrong clock,
        `cp -p` and unzip give mtimes far in the future or the past."""
        try:
            st = os.lstat(src)  # as the watcher saw it when it queued the job
        except OSError:
            return True  # vanished: the checks that follow say so properly
        if job.size is None or (st.st_size, st.st_mtime) == (job.size, job.mtime):
            return True
        self.ledger.requeue_changed(job.id, st.st_size, st.st_mtime, delay_s=self.cfg.quiet_seconds)
        return False

    def _inside_inbox(self, src: Path) -> bool:
        return folder_inside(src, self.cfg.inbox)

    def _check_symlink(self, src: Path) -> None:
        if not src.is_symlink():
            return
        target = Path(os.path.realpath(src))
        if not target.is_relative_to(self.cfg.inbox.resolve()):
            raise PermanentFailure("this is a link to a file outside the inbox; Mondrian does not follow such "
                                   "links. Copy the photo itself into the inbox")
        if not target.exists():
            raise PermanentFailure("this is a link whose target no longer exists; copy the photo itself into "
                                   "the inbox")

    def _requested_mode(self, src: Path, override: str | None) -> tuple[str, str]:
        if override:
            return override, "command"
        sidecar = sidecar_for(src)
        if sidecar is not None:
            return read_sidecar(sidecar), "sidecar"
        return self.cfg.default_mode, "default"

    def _advisor(self, advisor_id: str) -> Advisor:
        try:
            return get_advisor(self.cfg, advisor_id)
        except UnknownAdvisor as exc:
            raise PermanentFailure(str(exc).strip("'\"")) from exc

    # -- reports ------------------------------------------------------------------------------
    def _assemble(self, job: Job, src: Path, photo: LoadedImage, advisor: Advisor, requested: str,
                  source: str, effective: str, fallbacks: list[dict[str, str]], result: Any,
                  timings: dict[str, float]) -> dict[str, Any]:
        rt = self.runtime
        model = {"id": rt.model_id, "adapter": result.adapter, "smoke": bool(rt.is_smoke)}
        if rt.is_smoke:
            model["notice"] = SMOKE_NOTICE
        critique = result.critique
        report: dict[str, Any] = {
            "schema_version": 1,
            "job_id": job.id,
            "photo": {"file": src.name, "sha256": photo.sha256, "width": photo.width, "height": photo.height,
                      "analysed_width": photo.image.width, "analysed_height": photo.image.height,
                      "format": photo.format},
            "advisor": {"id": advisor.id, "name": advisor.name},
            "mode": {"requested": requested, "effective": effective, "source": source, "fallbacks": fallbacks},
            "model": model,
            "dimensions": critique["dimensions"],
            "overall_grade": critique["overall_grade"],
            "summary": critique["summary"],
            "timings": {k: round(float(v), 4) for k, v in timings.items()},
            "created_at": _now_iso(),
        }
        report.update(result.extras)
        return report

    def _publish(self, job: Job, src: Path, photo: LoadedImage, report: dict[str, Any],
                 files: dict[str, Path], keep_original: bool) -> None:
        staging = self.cfg.staging_dir / f"job-{job.id}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir(parents=True)
            for name, source in files.items():
                shutil.copyfile(source, staging / name)
            write_report_folder(staging, report, photo.image)
            _crashpoint("staged")
            # A reservation of this very job (killed before its rename) is reused, not skipped as taken.
            final = unique_path(self.cfg.outbox, safe_stem(src.name), taken=self._taken(job),
                                reserved=OUTBOX_RESERVED)
            self.ledger.reserve_output(job.id, final)
            _crashpoint("reserved")
            os.rename(staging, final)
            _crashpoint("renamed")
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            self._transient(job, f"could not write the report to {self.cfg.outbox.name}/ ({exc.strerror or exc})")
            return
        job = self.ledger.get(job.id)
        self._complete(job, final, report, keep_original)

    def _complete(self, job: Job, final: Path, report: dict[str, Any], keep_original: bool) -> None:
        src = Path(job.source_path)
        if keep_original:
            if src.exists() and not (final / src.name).exists():
                shutil.copy2(src, final / src.name)
        else:
            try:
                self._move_with_sidecar(src, final)
            except OutsideInbox as exc:
                # Its folder turned into a link out of the inbox after the claim. If the original is not in the
                # report folder yet (a move only picks another name when this one is taken), the report of a file
                # Mondrian cannot take in is withdrawn and the job fails with the reason; else it was moved in
                # before the link appeared and the job is finished.
                if not os.path.lexists(final / src.name):
                    shutil.rmtree(final, ignore_errors=True)
                    self._fail(job, str(exc))
                    return
            _crashpoint("moved")
        self.ledger.finish(job.id, effective_mode=report["mode"]["effective"], fallbacks=report["mode"]["fallbacks"],
                           report_json=final / "report.json", report_html=final / "report.html",
                           grade=report["overall_grade"], adapter=report["model"]["adapter"],
                           analysis_s=report["timings"].get("analysis_s", 0.0), output_dir=final)
        log.info("done: %s -> %s (grade %s)", job.rel_path, self._shown(final / "report.html"),
                 report["overall_grade"])
        self.refresh_index()

    def _move_with_sidecar(self, src: Path, dest_dir: Path, dest: Path | None = None) -> None:
        """Move the original (to `dest`, else its own name in `dest_dir`) and its sidecar. Safe to repeat after a
        kill: a sidecar left behind by a kill between the two moves is still found, and a copy completed by a
        killed cross-filesystem move is recognised instead of being copied a second time. Refuses (OutsideInbox)
        when the file's folder is not inside the real inbox, whatever links lie on its path."""
        if not self._inside_inbox(src):
            raise OutsideInbox(OUTSIDE_INBOX)
        sidecar = sidecar_for(src)
        _move_once(src, dest or dest_dir / src.name)
        if sidecar is not None and os.path.lexists(sidecar):
            _move_once(sidecar, dest_dir / sidecar.name)

    def _taken(self, job: Job) -> set[str]:
        """Output names reserved by other active jobs (this job's own earlier reservation may be reused)."""
        return self.ledger.reserved_outputs() - {job.output_dir}

    def _resume(self, job: Job, keep_original: bool) -> bool:
        """Finish a job whose outcome was published before a crash instead of analysing it again."""
        keep_original = keep_original or not job.owns_file
        out = Path(job.output_dir)
        report_file = out / "report.json"
        error_file = Path(f"{out}.error.json")
        try:
            if report_file.exists():
                report = json.loads(report_file.read_text(encoding="utf-8"))
                if report.get("job_id") == job.id:
                    self._complete(job, out, report, keep_original)
                    return True
            if error_file.exists():
                record = json.loads(error_file.read_text(encoding="utf-8"))
                if record.get("job_id") == job.id:
                    if not keep_original:
                        with contextlib.suppress(OutsideInbox):  # recorded as failed; the file stays put
                            self._move_with_sidecar(Path(job.source_path), out.parent, out)
                    self.ledger.fail(job.id, record["reason"], out, kind=record.get("kind", "permanent"))
                    return True
            dup_file = Path(f"{out}.duplicate.json")
            if dup_file.exists() and not keep_original:
                record = json.loads(dup_file.read_text(encoding="utf-8"))
                if record.get("job_id") == job.id:
                    self._move_duplicate(job, out)
                    return True
        except (OSError, ValueError, LookupError):
            pass
        return False

    def _duplicate(self, job: Job, first: Job, src: Path) -> None:
        dup_dir = self.cfg.outbox / "duplicates"
        dup_dir.mkdir(parents=True, exist_ok=True)
        dest = unique_path(dup_dir, safe_stem(src.name), Path(src.name).suffix, self._taken(job),
                           companions=RECORD_SUFFIXES)
        self.ledger.reserve_output(job.id, dest)
        record = {"job_id": job.id, "file": src.name, "duplicate_of_job": first.id,
                  "report": os.path.relpath(first.report_html, dup_dir) if first.report_html else None,
                  "reason": "the same photo was already analysed for this advisor and mode"}
        atomic_write_text(Path(f"{dest}.duplicate.json"), json.dumps(record, indent=2, ensure_ascii=False))
        _crashpoint("dup_recorded")
        if self._move_duplicate(job, dest):
            log.info("duplicate: %s is the same photo as job %s; see %s", job.rel_path, first.id,
                     self._shown(Path(first.report_html or "")))

    def _move_duplicate(self, job: Job, dest: Path) -> bool:
        """Move a recorded duplicate into duplicates/ and finish it; fail it instead if it left the inbox."""
        try:
            self._move_with_sidecar(Path(job.source_path), dest.parent, dest)
        except OutsideInbox as exc:
            if not os.path.lexists(dest):  # else it was moved in before its folder became a link out
                Path(f"{dest}.duplicate.json").unlink(missing_ok=True)
                self._fail(job, str(exc))
                return False
        _crashpoint("dup_moved")
        record = json.loads(Path(f"{dest}.duplicate.json").read_text(encoding="utf-8"))
        self.ledger.finish_duplicate(job.id, self.ledger.get(record["duplicate_of_job"]), dest)
        return True

    # -- failures -----------------------------------------------------------------------------
    def _transient(self, job: Job, reason: str) -> None:
        job = self.ledger.get(job.id)
        if job.attempts >= self.cfg.max_attempts:
            self._fail(job, f"{reason}; gave up after {job.attempts} attempts. Fix the cause, then run "
                            f"`mondrian retry --failed`", kind="transient")
            return
        delay = self.cfg.retry_base_seconds * (2 ** (job.attempts - 1))
        log.warning("will retry %s in %g s: %s", job.rel_path, delay, reason)
        self.ledger.retry_later(job.id, reason, delay)

    def _fail(self, job: Job, reason: str, kind: str = "permanent", keep_original: bool = False) -> None:
        keep_original = keep_original or not job.owns_file
        src = Path(job.source_path)
        failed = self.cfg.failed_dir
        dest: Path | None = None
        try:
            failed.mkdir(parents=True, exist_ok=True)
            dest = unique_path(failed, safe_stem(src.name), Path(src.name).suffix, self._taken(job),
                               companions=RECORD_SUFFIXES)
            self.ledger.reserve_output(job.id, dest)
            record = {"job_id": job.id, "file": src.name, "reason": reason, "kind": kind,
                      "advisor": job.advisor, "failed_at": _now_iso(),
                      "what_to_do": "Fix the photo (or the sidecar) and drop it into the inbox again." if job.owns_file
                      else "The photo was left where it is: fix it, then run `mondrian analyze` on it again."}
            atomic_write_text(Path(f"{dest}.error.json"), json.dumps(record, indent=2, ensure_ascii=False))
            _crashpoint("fail_recorded")
            if not keep_original:
                self._move_with_sidecar(src, failed, dest)
                _crashpoint("fail_moved")
        except OutsideInbox:
            log.warning("left %s where it is: its folder is no longer inside the inbox", job.rel_path)
        except OSError as exc:
            log.error("could not move %s to %s: %s", job.rel_path, failed, exc)
        self.ledger.fail(job.id, reason, dest, kind=kind)
        log.warning("failed: %s: %s", job.rel_path, reason)

    def _clean_staging(self, job: Job) -> None:
        shutil.rmtree(self.cfg.staging_dir / f"job-{job.id}", ignore_errors=True)

    # -- outbox index -------------------------------------------------------------------------
    def _report_is_smoke(self, report_json: Path) -> bool:
        """Whether that report came from the smoke model: its own record, not the model loaded now (a studio
        that moves from the demo to the real model keeps the demo's reports marked)."""
        try:
            st = report_json.stat()
            key = (str(report_json), st.st_mtime_ns, st.st_size)
            if key not in self._smoke_cache:
                model = json.loads(report_json.read_text()).get("model") or {}
                self._smoke_cache[key] = bool(model.get("smoke"))
            return self._smoke_cache[key]
        except (OSError, ValueError, AttributeError):
            return bool(self.runtime and self.runtime.is_smoke)  # unreadable: assume the present model

    def refresh_index(self) -> None:
        names = {a.id: a.name for a in load_advisors(self.cfg).values()}
        entries = []
        for j in self.ledger.reports():
            if not j.output_dir or not Path(j.output_dir).is_relative_to(self.cfg.outbox):
                continue
            entries.append(IndexEntry(folder=Path(j.output_dir).name, file=Path(j.rel_path).name,
                                      advisor_id=j.advisor, advisor_name=names.get(j.advisor, j.advisor),
                                      mode_requested=j.requested_mode or "", mode_effective=j.effective_mode or "",
                                      grade=j.grade if j.grade is not None else 0,
                                      created_at=_now_iso(j.finished_at),
                                      smoke=self._report_is_smoke(Path(j.report_json or ""))))
        try:
            write_index(self.cfg.outbox, entries)
        except OSError as exc:
            log.warning("could not update %s: %s", self.cfg.outbox / "index.html", exc)

    def _shown(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.cfg.home))
        except ValueError:
            return str(path)


__all__ = ["Worker", "PermanentFailure", "Cancelled", "SMOKE_NOTICE", "DONE", "FAILED"]
