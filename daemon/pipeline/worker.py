"""The worker: claims one job at a time from the ledger, analyses it, hands the outcome to the publisher.

It runs on the single thread that owns the model runtime (MLX is not thread-safe). This module is the job's
state machine only: claim, recover, decode, analyse, and what each way of ending means (done, duplicate, failed,
retry later, back to the queue). Where the outcome goes, crash-safely, is publish.py; what a report holds is
report.py. Publishing is ordered so that a SIGKILL at any point is recoverable, and a job whose folder already
holds its own report is finished rather than analysed again, so nothing is ever processed twice.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .. import testhooks
from ..analysis import AnalysisContext, AnalysisResult, Strategy, build_strategies, context_key, resolve
from ..analysis.advisors import Advisor, UnknownAdvisor, get_advisor
from ..config import Config
from ..errors import Cancelled, Permanent, TimedOut, Transient, is_permanent
from ..fsutil import holds, identity
from ..intake.images import ImageRejected, LoadedImage, PhotoTruncated, load_photo
from ..intake.inbox import SidecarError, read_sidecar, sidecar_for
from ..ledger import DONE, FAILED, Job, LeaseLost, Ledger, LedgerUnavailable, outside_fault
from .costs import JobCosts
from .isolation import check_alone
from ..outbox_room import OutboxBlocked, OutboxGone, outbox_room
from .publish import OUTSIDE_INBOX, Publisher
from .outbox_index import OutboxIndex, published_report
from .report import SMOKE_NOTICE, assemble, earlier_report_links
from ..hints import mondrian

if TYPE_CHECKING:
    from ..model.protocol import Runtime

log = logging.getLogger("mondrian.worker")


@dataclass
class Prepared:
    """A claimed job, checked and decoded, that needs the model (`Worker.prepare`)."""

    job: Job
    src: Path
    photo: LoadedImage
    advisor: Advisor
    requested: str
    source: str
    before: Any  # the file's identity when it was read
    decode_s: float
    key: str  # the context key planned without the model
    keep_original: bool
    planned: Strategy


# A photo that ends early is looked at again for this many quiet times (default 2 s: a minute) before it fails: a
# copy that paused longer than the quiet time is still arriving.
TRUNCATED_GRACE = 30


class Worker:
    def __init__(self, cfg: Config, ledger: Ledger, runtime_factory: Callable[[], Runtime],
                 stop: threading.Event | None = None):
        self.cfg = cfg
        self.ledger = ledger
        self._runtime_factory = runtime_factory
        self.runtime: Runtime | None = None
        self.stop = stop or threading.Event()
        self.strategies = build_strategies(cfg, ledger)
        self.current: Job | None = None
        self.batch: list[Job] = []  # the jobs of the batch in hand (batching.py)
        self.busy = threading.Event()
        index = OutboxIndex(cfg, ledger)
        self.out = Publisher(cfg, ledger, index)
        self.costs = JobCosts()  # off unless a benchmark asks (MONDRIAN_COSTS_FILE)
        self.outbox_blocked = ""  # why the outbox cannot take reports (said once, until it can), or ""
        self._look_at_outbox_at = 0.0  # while it cannot, no photo is claimed before this time.monotonic()
        self._room_reserved = 0  # bytes of outbox room the photos of this claim take (`_outbox_ready`)
        self.waiting_for_room: set[int] = set()  # jobs whose own copy does not fit the outbox's disk now
        self._truncated: dict[int, tuple[tuple[int, float], float]] = {}  # job -> (size, mtime), first seen ending early

    # -- lifecycle ----------------------------------------------------------------------------
    def load_runtime(self) -> Runtime:
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
                if job.output_dir and self.out.resume(job, False):
                    pass  # its outcome was already published: finish it, never record it twice
                else:
                    self._judge(job)
            else:
                self.ledger.requeue(job.id, "interrupted (Mondrian stopped while analysing it); queued again",
                                    keep_place=True)
            n += 1
        self.ledger.sweep_run_locks()
        self.out.sweep_staging()
        self.out.index.refresh()  # what changed while no daemon ran (reports deleted, older failures without pages)
        return n

    def recover_interrupted_analyses(self) -> int:
        """While the daemon runs: finish or fail the jobs of `mondrian analyze` processes killed meanwhile (start-up
        recovery does it for those killed before). They need no analysis and their photos are never moved; inbox
        jobs are only ever run by this daemon, so none of them can be left by a process that died since."""
        jobs = [j for j in self.ledger.orphaned_running(proven=True) if not j.owns_file]
        for job in jobs:
            log.info("`%s analyze` of %s (job %d) was stopped before it finished", mondrian(), job.rel_path, job.id)
            self._recover_direct(job)
        return len(jobs)

    def _recover_direct(self, job: Job) -> None:
        """A killed `mondrian analyze`: finish it from its published report, else fail it. Never take it over as
        an inbox job: its photo is the user's and stays where it is."""
        if job.output_dir and self.out.resume(job, True):
            return
        self.out.fail(job, f"`{mondrian()} analyze` was stopped before it finished; the photo was left where it is. "
                           f"Run `{mondrian()} analyze` on it again", kind="transient")

    def _judge(self, job: Job) -> None:
        """Mondrian died `max_attempts` times with this photo in hand: it may be the photo, or the machine (a
        restarted service, the OOM killer, a forced shutdown). Only an analysis of it alone can tell."""
        log.warning("Mondrian stopped %d times while analysing %s; checking whether the photo itself is the cause",
                    job.attempts, job.rel_path)
        verdict = check_alone(self.cfg, job.id, self.stop)
        if verdict.crashed:
            self.out.fail(job, f"Mondrian stopped {_times(job.attempts)} while analysing this photo, and an analysis "
                               f"of it alone in a separate process broke too ({verdict.detail}); it was set aside so "
                               f"the rest of the inbox can go on. Export it again (another format or size) and drop "
                               f"the new file into the inbox", kind="permanent")
        elif verdict.crashed is False:
            log.info("%s is not the cause of the crashes: %s; queued again", job.rel_path, verdict.detail)
            self.ledger.requeue(job.id, f"Mondrian stopped {_times(job.attempts)} while analysing it, but the photo is "
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
            photo = load_photo(src, self.cfg.max_pixels, timeout_s=self.cfg.job_timeout_seconds,
                               max_bytes=self.cfg.max_file_bytes)
            self._analyse(job, src, photo, advisor, requested)
        except Exception as exc:  # not a crash: `process` will meet it again and deal with it
            return f"{type(exc).__name__}: {exc}"
        return "analysed"

    def batch_size(self) -> int:
        """Photos to claim and analyse together: the setting, or with `batch_size = 0` what the loaded model's device
        suggests (one at a time until the model is loaded: the first photo loads it)."""
        if self.cfg.batch_size:
            return self.cfg.batch_size
        return self.runtime.suggested_batch_size if self.runtime is not None else 1

    def run_once(self) -> bool:
        """Claim and process one job (several, in one batch, when the queue is deep: batching.py). Returns False
        when nothing was due."""
        if self.outbox_blocked and not self._outbox_back():
            return False  # claiming each photo only to put it back would write the ledger twice a photo, for nothing
        self.costs.starting()
        job = self.ledger.claim()
        if job is None:
            self.costs.idle()
            self.out.index.flush()  # nothing to do: the index shows every job published so far
            return False
        if self.batch_size() > 1:
            from .batching import run_batch

            return run_batch(self, job)
        self.current = job
        self.busy.set()
        try:
            with self.outcome(job):
                testhooks.crashpoint("claimed")
                # A mode asked for with the photo (an API request) is part of the job; inbox photos read their sidecar.
                self.process(job, mode_override=job.requested_mode if job.mode_source == "command" else None)
        finally:
            self.current = None
            self.busy.clear()
            self.costs.finished(job.id)
        return True

    @contextlib.contextmanager
    def outcome(self, job: Job) -> Iterator[None]:
        """What an exception out of the block means for `job`: retry later, back to the queue, or failed."""
        from ..model.adapter_store import AdapterUnusable  # no MLX: the store's module only reads files

        try:
            yield
        except Transient as exc:
            self.out.clean_staging(job)
            self.out.transient(job, str(exc))
        except Cancelled:
            log.info("stopping: photo %s goes back to the queue", job.rel_path)
            self.out.clean_staging(job)
            self.ledger.requeue(job.id, "Mondrian was stopped while analysing it; queued again",
                                undo_attempt=True, keep_place=True)
        except LeaseLost as exc:
            # Stalled past its lease: another worker has the photo now and publishes its one report. Nothing of this
            # claim may stay (the ledger refused it, and said so in the log).
            self.out.clean_staging(job)
            log.warning("discarded this worker's work on %s: %s", job.rel_path, exc)
        except AdapterUnusable as exc:
            # The adapter, not the photo nor the machine: LoraStrategy marked it (by its files' identity), so the
            # photo is analysed again at once in the fallback mode, whose report says why. No attempt is spent on
            # it and no traceback logged: it is a known state with a known remedy, said in the report.
            log.warning("%s: the adapter could not be used (%s); analysing it again without it", job.rel_path, exc)
            self.out.clean_staging(job)
            self.ledger.requeue(job.id, f"the adapter could not be used ({exc}); analysed again without it",
                                undo_attempt=True, keep_place=True)
        except LedgerUnavailable:
            # Stopping while the ledger cannot be written: the job stays running there, and the next start
            # finishes it from what was published, or analyses it again. Nothing is recorded twice.
            log.warning("stopping: %s stays in progress and is taken up again at the next start", job.rel_path)
            raise
        except Exception as exc:  # one photo must never take the worker down
            try:
                if is_permanent(exc):
                    self.out.fail(self.ledger.get(job.id), f"the model could not produce a critique: {exc}")
                elif (fault := outside_fault(exc)) is not None:  # the ledger's server restarting, not the photo
                    log.warning("%s: the ledger could not be read (%s); trying it again later", job.rel_path, fault)
                    self.out.transient(job, f"the ledger could not be read ({fault})")
                else:
                    log.exception("unexpected error on %s", job.rel_path)
                    self.out.transient(job, f"unexpected error: {type(exc).__name__}: {exc}")
            except Exception as again:
                if outside_fault(again) is None:
                    raise
                # Not even that could be recorded (reads, unlike writes, do not wait for the ledger): kept, the
                # claim would be renewed for ever by the heartbeat with nothing working on it. Let go instead: its
                # lease ends and the photo is claimed again once the ledger answers.
                self.out.clean_staging(job)
                self.ledger.let_go(job.id)
                log.warning("%s: the ledger cannot be reached (%s); the photo is taken up again once it can be",
                            job.rel_path, outside_fault(again))

    def in_hand(self) -> list[Job]:
        """The jobs this worker has claimed and not finished (a batch holds several)."""
        return list(self.batch) if self.batch else [self.current] if self.current is not None else []

    # -- one job ------------------------------------------------------------------------------
    def process(self, job: Job, *, keep_original: bool = False, mode_override: str | None = None) -> None:
        self._room_reserved = 0  # one photo alone: only a batch's photos reserve room for one another (run_batch)
        prep = self.prepare(job, keep_original=keep_original, mode_override=mode_override)
        if prep is None:
            return
        t1 = time.perf_counter()
        try:
            strategy, fallbacks, result = self._analyse(job, prep.src, prep.photo, prep.advisor, prep.requested)
        except TimedOut:
            self.timed_out(prep)
            return
        self.finish(prep, strategy, fallbacks, result, time.perf_counter() - t1)

    def prepare(self, job: Job, *, keep_original: bool = False, mode_override: str | None = None) -> Prepared | None:
        """Everything before the model: the checks, the decoded photo, its hash, a duplicate found without the
        model. None when that already settled the job (resumed, gone, failed, a duplicate, changed meanwhile)."""
        testhooks.crashpoint("preparing")
        keep_original = keep_original or not job.owns_file
        if not self._outbox_ready(job, room=False):
            return None
        if job.output_dir and self.out.resume(job, keep_original):
            return None  # (a report published before a stop: only its photo's move was left, which takes no room)
        if not self._outbox_ready(job):
            return None
        src = Path(job.source_path)
        if not keep_original and job.owns_file and job.mode_source != "command" and \
                not self.out.inside_inbox(src) and not src.is_relative_to(self.cfg.inbox):
            # Queued from the inbox before its setting changed (`inbox = …` edited with photos waiting): not a link
            # out of the inbox. (An upload's mode_source is "command": its spool is no inbox.) Moved along with the
            # folder, the photo is taken where it is now; left behind, it stays there, said so.
            moved = self.cfg.inbox / job.rel_path
            if os.path.lexists(moved):
                if not self.ledger.move_source(job.id, moved):
                    self.ledger.mark_gone(job.id, f"queued again from the new inbox ({moved})")
                    return None
                log.info("%s: the inbox moved to %s, and the photo with it", job.rel_path, self.cfg.inbox)
                src = moved
            elif os.path.lexists(src):
                self.out.fail(job, f"it was queued from {src.parent}, which is no longer the inbox (the `inbox` "
                                   f"setting changed since); it was left where it is. Move it into the inbox "
                                   f"({self.cfg.inbox}) to have it analysed")
                return None
        if not os.path.lexists(src):
            self.ledger.mark_gone(job.id, "the file was removed from the inbox before it was analysed")
            log.info("gone before analysis: %s", job.rel_path)
            return None
        if job.size is not None and os.path.isdir(src) and not os.path.islink(src):
            # The file it was queued for was replaced by a folder of that name (an album being copied in): the file
            # is gone, and the folder's photos are queued as themselves. Failing it would move the album, with a
            # photo still arriving in it, into failed/.
            self.ledger.mark_gone(job.id, "the file was replaced by a folder of the same name before it was "
                                          "analysed; the photos in that folder are analysed as themselves")
            log.info("gone before analysis (a folder took its name): %s", job.rel_path)
            return None
        if not keep_original and not self.out.inside_inbox(src):
            self.out.fail(job, OUTSIDE_INBOX)
            return None
        if not keep_original and not self._settled(job, src):
            return None
        if not keep_original and self._link_within_inbox(job, src):
            return None
        why = None if keep_original else self._cannot_take(src, moves=not job.kept)
        if why:
            # Analysed now, it could never be moved out of the inbox, so it would be analysed again and again.
            self.out.fail(job, why, keep_original=True)
            return None
        before = None
        try:
            if not keep_original:
                self._check_symlink(src)
            requested, source = self._requested_mode(src, mode_override)
            self.ledger.set_mode(job.id, requested, source)
            advisor = self._advisor(job.advisor)
            t0 = time.perf_counter()
            testhooks.crashpoint("reading")
            before = identity(src)
            photo = load_photo(src, self.cfg.max_pixels, timeout_s=self.cfg.job_timeout_seconds,
                               max_bytes=self.cfg.max_file_bytes)
            decode_s = time.perf_counter() - t0
        except (Permanent, SidecarError, ImageRejected) as exc:
            if not keep_original and not os.path.lexists(src):
                # Removed between the checks above and its reading: gone, as a moment earlier, not a photo to fix.
                self.ledger.mark_gone(job.id, "the file was removed from the inbox before it was analysed")
                log.info("gone before analysis (removed as it was read): %s", job.rel_path)
                return None
            if isinstance(exc, ImageRejected) and not keep_original and self._maybe_still_arriving(job, src, exc):
                return None
            why = str(exc)
            if isinstance(exc, PhotoTruncated) and self._uploaded(src):  # "copy it again" is for a card's copy
                why = ("the photo is truncated (the file ends early): it was damaged before it was sent; send the "
                       "original again")
            self.out.fail(job, why, keep_original=keep_original, before=before)
            return None
        self._truncated.pop(job.id, None)
        self.ledger.set_hash(job.id, photo.sha256)
        # The mode this photo would get now, and the version of what that mode reads, without the model: a report
        # made with the same of both (and the same bytes and advisor) is this photo's critique already.
        planned, planned_fallbacks = resolve(requested, advisor, self.strategies)
        inputs = planned.inputs(advisor)
        key = context_key(photo.sha256, advisor, planned.name, inputs, self.cfg)
        first = self._report_of(key, job)
        analysed_as = self.ledger.original_sha(photo.sha256) if first is None else None
        if analysed_as is not None:  # the outbox's copy, its report's XMP inside (xmp_embed): the photo analysed
            first = self._report_of(context_key(analysed_as, advisor, planned.name, inputs, self.cfg), job)
        if first is not None and not keep_original:
            self.out.duplicate(job, first, src, planned_fallbacks, before=before, sha256=photo.sha256)
            return None
        if self.stop.is_set():
            raise Cancelled()
        return Prepared(job, src, photo, advisor, requested, source, before, decode_s, key, keep_original, planned)

    def timed_out(self, prep: Prepared) -> None:
        self.out.clean_staging(prep.job)
        self.out.fail(prep.job, f"analysis took longer than {self.cfg.job_timeout_seconds:g} s "
                                f"(job_timeout_seconds) and was stopped so the rest of the inbox can go on",
                      kind="transient", keep_original=prep.keep_original)  # a busy machine, a limit: not the photo

    def finish(self, prep: Prepared, strategy: Strategy, fallbacks: list[dict[str, str]], result: AnalysisResult,
               analysis_s: float) -> None:
        """Everything after the model: the photo still the one analysed, the key it is kept under, the report."""
        job, src, photo, advisor, keep_original = prep.job, prep.src, prep.photo, prep.advisor, prep.keep_original
        if not keep_original and not holds(src, prep.before, photo.sha256):
            # Overwritten while it was analysed: the report must describe the final bytes, so start over.
            self.ledger.requeue(job.id, "the file changed while it was analysed; it will be analysed again",
                                delay_s=self.cfg.quiet_seconds, undo_attempt=True)
            log.info("changed during analysis, queued again: %s", job.rel_path)
            return
        if not keep_original and prep.source != "command" and self._mode_now(src) != (prep.requested, prep.source):
            # A .mode sidecar that came (or changed, or went) while the photo was analysed: the report must be of the
            # mode it now asks for, and the sidecar moves into the report folder with the photo.
            self.ledger.requeue(job.id, "its .mode sidecar changed while it was analysed; it will be analysed again",
                                delay_s=self.cfg.quiet_seconds, undo_attempt=True)
            log.info("mode sidecar changed during analysis, queued again: %s", job.rel_path)
            return
        # What the analysis actually used (resolved again once the model was loaded, e.g. an adapter found to be for
        # another base model; the index may have changed meanwhile): the key the report is kept under. If a report
        # with that key exists, this is its duplicate after all: never two reports of one key.
        inputs = result.inputs if result.inputs is not None else strategy.inputs(advisor)
        context = {"key": context_key(photo.sha256, advisor, strategy.name, inputs, self.cfg),
                   "inputs": inputs}
        # Looked up again even when the key is the one checked before the analysis: another process on this ledger
        # (`mondrian analyze`, a second Mac) may have published a report of the same photo meanwhile.
        first = self._report_of(context["key"], job)
        if first is not None and not keep_original:
            self.out.duplicate(job, first, src, fallbacks, before=prep.before, sha256=photo.sha256)
            return
        earlier = earlier_report_links(self.cfg, self.ledger.earlier_reports(photo.sha256, exclude=job.id),
                                       moved=self.out.index.folders)
        report = assemble(self.runtime, job, src, photo, advisor, prep.requested, prep.source, strategy.name,
                          fallbacks, result, {"decode_s": prep.decode_s, "analysis_s": analysis_s, **result.timings},
                          context=context, earlier=earlier, original="copied" if keep_original else None)
        self.out.publish(job, src, photo, report, result.files, keep_original, before=prep.before)

    def _analyse(self, job: Job, src: Path, photo: LoadedImage, advisor: Advisor,
                 requested: str) -> tuple[Strategy, list[dict[str, str]], AnalysisResult]:
        """The model's part of a job, where a native crash would happen: shared by `process` and the isolation
        check (daemon/pipeline/isolation.py), so that the check runs exactly what crashed the daemon."""
        runtime = self.loaded_runtime()
        strategy, fallbacks = resolve(requested, advisor, self.strategies)
        log.info("analysing %s as %s (%s%s)", job.rel_path, advisor.name, strategy.name,
                 f", asked for {requested}" if strategy.name != requested else "")
        testhooks.crashpoint("analysing")
        testhooks.poison_point(src.name)
        with self.costs.model():
            result = strategy.analyse(AnalysisContext(runtime=runtime, cfg=self.cfg, advisor=advisor, photo=photo,
                                                      cancel=self.stop,
                                                      deadline=time.monotonic() + self.cfg.job_timeout_seconds))
        return strategy, fallbacks, result

    def loaded_runtime(self) -> Runtime:
        try:
            return self.load_runtime()
        except Exception as exc:  # a model that fails to load may load next time (memory, disk, a mount)
            log.error("could not load the model: %s: %s", type(exc).__name__, exc)
            raise Transient(f"the model could not be loaded ({type(exc).__name__}: {exc})") from exc

    def _report_of(self, key: str, job: Job) -> Job | None:
        """The latest report made with this analysis context, if its report is still there: a photo whose report
        folder the photographer deleted is critiqued again, not filed as a duplicate of a page that is gone. "Still
        there" is the index's rule (`published_report`): a report.json corrupted or replaced by another job's is
        gone too, as it is gone from outbox/index.html, so "see outbox/x/report.html" never names a page the index
        dropped."""
        first = self.ledger.find_done(key, exclude=job.id)
        if first is None or not first.report_json or published_report(Path(first.report_json), first.id) is None:
            return None
        if not Path(first.report_json).is_relative_to(self.cfg.outbox):
            return None  # another Mac's own outbox (a shared ledger): this photographer would get no critique
        return first

    def _uploaded(self, src: Path) -> bool:
        """Whether `src` came through the HTTP API (it waits in the spool, not in the inbox)."""
        return Path(src).is_relative_to(self.cfg.spool_dir)

    def _maybe_still_arriving(self, job: Job, src: Path, exc: ImageRejected) -> bool:
        """A photo that ends early may be a copy that paused for longer than the quiet time (a card reader, a
        network share). Look again a few times over `TRUNCATED_GRACE` quiet times before failing it: queued again
        (without blame) while its size and time keep the same, once it changes the usual settling takes over.
        Kept in memory: a restart gives it a fresh grace, which costs only a little waiting."""
        if not isinstance(exc, PhotoTruncated) or self._uploaded(src):
            return False  # an upload was received whole (its form closed) and synced: nothing more is coming
        try:
            st = os.lstat(src)
        except OSError:
            return False
        seen = (st.st_size, st.st_mtime)
        first = self._truncated.get(job.id)
        now = time.monotonic()
        if first is None or first[0] != seen:
            self._truncated[job.id] = (seen, now)
        elif now - first[1] >= self.cfg.quiet_seconds * TRUNCATED_GRACE:
            del self._truncated[job.id]
            return False
        self.ledger.requeue(job.id, "the photo ends early: waiting in case it is still being copied",
                            delay_s=self.cfg.quiet_seconds * TRUNCATED_GRACE / 4, undo_attempt=True)
        log.info("ends early, looking again shortly (still being copied?): %s", job.rel_path)
        return True

    def _outbox_ready(self, job: Job, *, room: bool = True) -> bool:
        """A report that cannot be written would only be analysed again: while the outbox's drive or share is away,
        or (`room`) its disk is full or read-only, the photo waits where it is, looked at again after rescan_seconds
        without an attempt counted against it, and no other photo is claimed meanwhile (`run_once`)."""
        copied = self._copied_bytes(job) if room else 0
        try:
            self.out.outbox_here()
            if room:
                # Photos of one batch are checked one by one: each reserves its room for the next one's check.
                self._room_reserved = outbox_room(self.cfg.outbox, self._room_reserved + copied)
        except OutboxGone as exc:
            if isinstance(exc, OutboxBlocked) and self._room_reserved and self._fits_alone(copied):
                # Turned away only by the room the photos before it in this batch took: first in line for the next
                # claim, when theirs is in use or given back.
                self.ledger.requeue(job.id, undo_attempt=True, keep_place=True)
                return False
            if not job.owns_file:  # `mondrian analyze` waits for nobody: its photo fails now, with the reason
                self.out.fail(job, exc.for_command() if isinstance(exc, OutboxBlocked) else str(exc),
                              keep_original=True)
                return False
            self.ledger.requeue(job.id, str(exc), delay_s=self.cfg.rescan_seconds, undo_attempt=True)
            if isinstance(exc, OutboxBlocked) and not exc.whole:  # smaller photos may still go
                if job.id not in self.waiting_for_room:
                    log.warning("%s waits: %s", job.rel_path, exc)
                self.waiting_for_room.add(job.id)
                return False
            if not self.outbox_blocked:  # said once, until it can take reports again
                log.warning("%s; photos wait meanwhile", exc)
            self.outbox_blocked = f"{exc.reason}; {exc.fix}" if isinstance(exc, OutboxBlocked) else str(exc)
            self._look_at_outbox_at = time.monotonic() + self.cfg.rescan_seconds
            return False
        if room:
            self.waiting_for_room.discard(job.id)
            if self.outbox_blocked:
                log.info("the outbox %s can take reports again; carrying on", self.cfg.outbox)
                self.outbox_blocked = ""
        return True

    def _fits_alone(self, copied: int) -> bool:
        try:
            outbox_room(self.cfg.outbox, copied)
        except OSError:
            return False
        return True

    def _outbox_back(self) -> bool:
        """Whether the outbox that could not take reports can now (a look at the disk, no claim: cheap enough for
        every wake-up, so a photo uploaded once it is back does not wait for the next look)."""
        try:
            self.out.outbox_here()
            outbox_room(self.cfg.outbox)
        except OSError:  # still blocked, or a share that stopped answering (ESTALE, EIO): looked at again later
            self._look_at_outbox_at = time.monotonic() + self.cfg.rescan_seconds
            return False
        log.info("the outbox %s can take reports again; carrying on", self.cfg.outbox)
        self.outbox_blocked = ""
        return True

    def outbox_wait_s(self) -> float:
        """Seconds until the outbox that could not take reports is looked at again."""
        return max(0.0, self._look_at_outbox_at - time.monotonic())

    def waiting_for_room_now(self) -> int:
        """How many photos still wait because their own copy does not fit the outbox's disk (jobs since taken by
        another Mac, or gone, forgotten)."""
        for job_id in list(self.waiting_for_room):
            try:
                if self.ledger.get(job_id).state != "queued":
                    self.waiting_for_room.discard(job_id)
            except Exception:  # deleted from the ledger (`forget`): not waiting any more
                self.waiting_for_room.discard(job_id)
        return len(self.waiting_for_room)

    def _copied_bytes(self, job: Job) -> int:
        """The photo's own bytes its report folder will take: a copy from another disk, or the copy that xmp_embed
        rewrites when the original stays in the inbox. A move within one disk, or a hard link, takes none; an
        `analyze` photo stays where it is."""
        if not job.owns_file:
            return 0
        try:
            st = os.stat(job.source_path)
            across = st.st_dev != os.stat(self.cfg.outbox).st_dev
        except OSError:
            return 0  # gone, or the outbox: said by the checks that follow
        return st.st_size if across or (job.kept and self.cfg.xmp_embed) else 0

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

    def _link_within_inbox(self, job: Job, src: Path) -> bool:
        """A link in the inbox to something else in the inbox is not a photo of its own: what it points to is
        analysed as itself, by its own job. The link is removed (moved, a relative link would point at nothing
        or at something else) and recorded with what it pointed to; returns True if `src` was such a link."""
        if not src.is_symlink() or _a_loop(src):
            return False  # a loop of links points at no photo at all: refused with its reason (_check_symlink)
        inbox = Path(os.path.realpath(self.cfg.inbox))
        target = Path(os.path.realpath(src))
        if not target.is_relative_to(inbox) or target == inbox:
            return False  # a link out of the inbox is refused with its reason (_check_symlink)
        try:
            if not stat.S_ISREG(os.stat(target).st_mode):
                return False  # a link to a pipe or a device fails with what it points to, as the target does
        except OSError:
            if not self.ledger.taken_in(target):
                return False  # it points at no photo taken in here: refused as a dangling link
        shown = Path(self.cfg.inbox.name, target.relative_to(inbox)).as_posix()
        try:
            os.unlink(src)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.out.fail(job, f"this is a link to {shown}, which is analysed as itself; the link could not be "
                               f"removed ({exc.strerror or exc}): remove it yourself", keep_original=True)
            return True
        self.ledger.mark_gone(job.id, f"this was a link to {shown} in the inbox, not a photo of its own: "
                                      f"{shown} is analysed as itself, and the link was removed")
        log.info("%s is a link to %s: not analysed itself; the link was removed", job.rel_path, shown)
        return True

    def _cannot_take(self, src: Path, moves: bool = True) -> str | None:
        """Why the original could not be read, or (`moves`: it leaves the inbox, keep_originals is off) moved out of
        its folder once its report is written (folder permissions), in words that say what to do; None if it can."""
        folder = src.parent
        shown = Path(self.cfg.inbox.name, os.path.relpath(folder, self.cfg.inbox)).as_posix().removesuffix("/.")
        if moves and not os.access(folder, os.W_OK | os.X_OK):
            return (f"Mondrian cannot move this photo out of {shown}/ (no write permission on that folder), so it "
                    f"was left where it is and not analysed: make the folder writable (chmod u+w) and run "
                    f"`{mondrian()} retry --failed`")
        if not src.is_symlink() and not os.access(src, os.R_OK):
            return ("Mondrian cannot read this photo (no read permission), so it was left where it is: make it "
                    f"readable (chmod u+r); it is picked up again then, or run `{mondrian()} retry --failed`")
        return None

    def _check_symlink(self, src: Path) -> None:
        if not src.is_symlink():
            return
        if _a_loop(src):
            raise Permanent("this is a link that leads back to itself (a loop of links), so there is no photo "
                            "behind it; delete it and copy the photo itself into the inbox")
        target = Path(os.path.realpath(src))
        if not target.is_relative_to(self.cfg.inbox.resolve()):
            if target.is_dir():
                raise Permanent("this is a link to a folder outside the inbox; Mondrian does not follow such "
                                "links. Copy the folder's photos themselves into the inbox")
            raise Permanent("this is a link to a file outside the inbox; Mondrian does not follow such "
                            "links. Copy the photo itself into the inbox")
        if not target.exists():
            raise Permanent("this is a link whose target no longer exists; copy the photo itself into "
                                   "the inbox")

    def _mode_now(self, src: Path) -> tuple[str, str] | None:
        """The mode the photo's sidecar (or the default) asks for now; None for a sidecar that cannot be read, which
        `prepare` reports as the photo's failure."""
        try:
            return self._requested_mode(src, None)
        except SidecarError:
            return None

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
            raise Permanent(str(exc.args[0] if exc.args else exc)) from exc


def _times(n: int) -> str:
    return "once" if n == 1 else "twice" if n == 2 else f"{n} times"


__all__ = ["Worker", "SMOKE_NOTICE", "DONE", "FAILED"]


def _a_loop(link: Path) -> bool:
    """Whether following `link` comes back to a link already passed (`a.jpg -> b.jpg -> a.jpg`, `x -> x`): its
    resolved path (os.path.realpath stops at the loop) lies in the inbox and may even be queued, yet no photo is
    there. Taken for a link to another inbox photo, all the loop's links were deleted with no record."""
    try:
        os.stat(link)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False
