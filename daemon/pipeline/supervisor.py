"""The daemon: the watcher and periodic rescans on the main thread, the worker (and MLX) on one thread.

Never daemonizes (launchd and systemd supervise it). SIGTERM/SIGINT finish or requeue the photo in hand
and exit 0; a fatal start-up problem (model missing, another daemon on the same home or inbox) exits 78
(EX_CONFIG) with a line saying what to fix. launchd and systemd start it again every 30 s (ThrottleInterval,
RestartSec) until it is fixed: a drive plugged in or a setting corrected needs no one to restart it.
SIGHUP, which admins send to make a daemon read its settings again, stops it the same way but exits 75
(EX_TEMPFAIL): launchd and systemd then start it again, and the new process reads them. (Exiting 0 left the service
stopped until the next login.)
A ledger deleted or replaced while the daemon runs is written back whole, then the daemon exits 75
(EX_TEMPFAIL) so its supervisor starts it again on the restored file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..analysis.advisors import advisor_folders
from ..config import Config, ConfigError
from ..errors import EX_CONFIG, EX_TEMPFAIL
from ..fsutil import LockHeld, NotOwn, hold_lock, lock_folder
from ..intake.inbox import SIDECAR_SUFFIX, SidecarError, classify, read_sidecar, sidecar_for
from ..ledger import FAULT_NOTE, Ledger, LedgerUnavailable, outside_fault
from .heartbeat import Heartbeat
from .share import SharedOutbox
from .worker import Worker
from ..hints import mondrian, program

if TYPE_CHECKING:
    from ..model.protocol import Runtime

log = logging.getLogger("mondrian.daemon")

STOP_GRACE_SECONDS = 20.0
ADVISORS_TTL_S = 2.0
# How often the idle worker looks at the ledger: this process's own queueing wakes it at once; other processes'
# writes (`mondrian retry`) are seen within this. Each look costs ~1 ms of CPU: at 0.5 s it was a third of the idle CPU.
IDLE_POLL_SECONDS = 2.0
IDLE_TICK_SECONDS = 1.0  # the main loop's pace with no file settling in the inbox


class StartupError(RuntimeError):
    pass


def _lock_home(cfg: Config) -> list[int]:
    """Exclusive locks on the home (its var/ folder), and on the inbox and the outbox, which another home may name
    too: two daemons serving one inbox would both analyse and move the same photos, and two writing one outbox
    would take each other's reports. Returns the descriptors to keep."""
    cfg.var_dir.mkdir(parents=True, exist_ok=True)
    try:
        home_fd = hold_lock(cfg.var_dir / "daemon.lock", str(cfg.home))
    except LockHeld as exc:
        raise StartupError(f"another Mondrian daemon (pid {exc.pid if exc.pid > 0 else '?'}) is already serving "
                           f"{cfg.home}; stop it first (Ctrl-C where it runs, or `{mondrian()} service stop` if it "
                           f"runs as the service), or give this command another home (--home)") from None
    except NotOwn as exc:
        raise StartupError(str(exc)) from None
    if cfg.shared:
        return [home_fd]  # several nodes serve one inbox on purpose: the shared ledger decides who takes which photo
    try:
        inbox_fd = lock_folder(cfg.inbox)  # nothing is written into the user's inbox
    except LockHeld as exc:
        os.close(home_fd)
        who = f" (pid {exc.pid})" if exc.pid > 0 else ""
        raise StartupError(f"another Mondrian daemon{who}, of another home, is already serving the inbox "
                           f"{cfg.inbox}; two daemons would analyse and move the same photos. Stop that one "
                           f"(`{program()} --home <its home> status` shows it"
                           f"{f'; `ps -p {exc.pid} -o args=` names its command' if exc.pid > 0 else ''}), or set `inbox` in {cfg.home / 'mondrian.toml'} to a folder of this "
                           f"home's own") from None
    except OSError as exc:  # a filesystem without locks (some network mounts): the home lock still holds
        log.warning("could not lock the inbox %s (%s); make sure no other Mondrian home uses it", cfg.inbox,
                    exc.strerror or exc)
        inbox_fd = None
    fds = [home_fd] + ([inbox_fd] if inbox_fd is not None else [])
    try:
        # Two homes writing one outbox number their jobs alike: each would take the other's staging folder
        # (`job-1`) for its own, file one photo's critique beside another photo, and sweep the other's work away.
        fds.append(lock_folder(cfg.outbox))
    except LockHeld as exc:
        _unlock_home(fds)
        who = f" (pid {exc.pid})" if exc.pid > 0 else ""
        raise StartupError(f"another Mondrian daemon{who}, of another home, is already writing to the outbox "
                           f"{cfg.outbox}; the two would take each other's reports. Stop that one "
                           f"(`{program()} --home <its home> status` shows it), or set `outbox` in "
                           f"{cfg.home / 'mondrian.toml'} to a folder of this home's own") from None
    except OSError as exc:
        log.warning("could not lock the outbox %s (%s); make sure no other Mondrian home uses it", cfg.outbox,
                    exc.strerror or exc)
    return fds


class FolderLocks:
    """The locks on the inbox and the outbox, kept on the folders there now. A lock holds the folder it was taken
    on: one deleted and made again, or a drive plugged back, is another folder, and another home's daemon could
    start on it and serve the same photos. `check` locks the new one, or says which daemon took it first."""

    def __init__(self, cfg: Config, fds: list[int]):
        self.cfg, self.fds = cfg, fds
        self.held: dict[Path, int] = {}
        self.made_anew: set[Path] = set()  # folders locked again since the caller last looked
        for folder in (cfg.inbox, cfg.outbox):
            with contextlib.suppress(OSError):
                st = os.stat(folder)
                for fd in fds:
                    fst = os.fstat(fd)
                    if (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino):
                        self.held[folder] = fd

    def check(self) -> str | None:
        """None while every folder is this daemon's; else why it must stop."""
        for folder, fd in list(self.held.items()):
            try:
                st, fst = os.stat(folder), os.fstat(fd)
            except OSError:
                continue  # away (a drive unplugged): the watcher says so, and it is locked again once back
            if (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino):
                continue
            what = "inbox" if folder == self.cfg.inbox else "outbox"
            try:
                new = lock_folder(folder)
            except LockHeld as exc:
                who = f" (pid {exc.pid})" if exc.pid > 0 else ""
                return (f"the {what} {folder} was made anew while Mondrian ran (deleted and made again, or its drive "
                        f"plugged back), and another Mondrian daemon{who}, of another home, now serves it: two "
                        f"daemons would take the same photos, so this one stops. Stop that one, or set `{what}` in "
                        f"{self.cfg.home / 'mondrian.toml'} to a folder of this home's own")
            except OSError:
                continue
            self.fds.remove(fd)
            os.close(fd)
            self.fds.append(new)
            self.held[folder] = new
            self.made_anew.add(folder)
            log.info("the %s %s was made anew while Mondrian ran; it is this daemon's again", what, folder)
        return None


def _unlock_home(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def default_runtime_factory(cfg: Config) -> Callable[[], Runtime]:
    def load() -> Any:
        from ..model.runtime import ModelRuntime

        return ModelRuntime.load(cfg.model, var_dir=cfg.var_dir, max_pixels=cfg.max_pixels)

    return load


class Daemon:
    def __init__(self, cfg: Config, *, once: bool = False, runtime_factory: Callable[[], Runtime] | None = None):
        self.cfg = cfg
        self.once = once
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.recheck = threading.Event()  # asks the worker thread to look for jobs of processes killed meanwhile
        self.ready = threading.Event()
        self.fatal: str | None = None
        # This daemon's model, as /health tells it: the ledger's "model" event is the last node's on a shared ledger.
        self.model_state: dict[str, Any] | None = None
        self.waiting_for_outbox = 0  # photos a --once run left queued: the outbox could not take their reports
        self._left_waiting: tuple[int, str] = (0, "")  # what `_idle` found waiting, and why
        self.conflict: str | None = None  # another home's daemon took this one's inbox or outbox (FolderLocks)
        self.ledger_lost: str | None = None
        self.reload = False  # SIGHUP: exit 75 so the service manager starts a process that reads the settings anew
        self.ledger = Ledger.for_config(cfg, stop=self.stop, note=cfg.var_dir / FAULT_NOTE)
        self.heartbeat = Heartbeat(self.ledger, self.stop, self.wake.set, max_attempts=self.cfg.max_attempts)
        self.worker = Worker(cfg, self.ledger, runtime_factory or default_runtime_factory(cfg), self.stop)
        self._advisors_seen: tuple[float, dict[str, str]] = (float("-inf"), {})
        from ..intake.watcher import InboxWatcher

        self.watcher = InboxWatcher(cfg.inbox, self._enqueue, cfg.quiet_seconds, is_known=self._is_known,
                                    on_unreachable=self._unreachable, on_stable_many=self._enqueue_many,
                                    make_within=cfg.home)
        self.worker.out.left_behind = self.watcher.note
        self._skipped: dict[Path, tuple[int, float, float]] = {}  # said once in the log, per path and version
        self._listings: dict[Path, tuple[int, set[str]]] = {}  # folder -> (its mtime, sidecar names): _may_have_sidecar
        self._told: dict[str, float] = {}  # watcher times last written to the ledger (_beat)
        from ..references.watcher import ReferenceWatcher

        self.references = ReferenceWatcher(cfg, self.ledger)  # advisors/*/references, indexed between jobs
        self._thread = threading.Thread(target=self._work, name="mlx-worker", daemon=True)

    def _advisors(self) -> dict[str, str]:
        """The advisor folders the inbox may hold, looked at again every few seconds: an advisor a studio adds (or
        whose definition it breaks) while Mondrian runs counts from then on. A bulk drop asks once per photo."""
        at, ids = self._advisors_seen
        if time.monotonic() - at > ADVISORS_TTL_S:
            ids = advisor_folders(self.cfg)
            self._advisors_seen = (time.monotonic(), ids)
        return ids

    # -- watcher -> ledger --------------------------------------------------------------------
    def _enqueue(self, path: Path) -> None:
        intake = classify(path, self.cfg.inbox, self._advisors(), self.cfg.default_advisor)
        try:
            st = os.lstat(path)
        except OSError:
            return
        if self._kept_and_done(path, st):
            return
        try:
            job = self.ledger.enqueue(path, intake.rel_path, intake.advisor, intake.advisor_source,
                                      st.st_size, st.st_mtime, st.st_ctime, kept=self.cfg.keep_originals)
        except LedgerUnavailable:
            return  # stopping: the photo stays in the inbox and the next start's rescan queues it
        self._queued(path, intake, st, job)

    def _is_known(self, path: Path) -> bool:
        """Whether the photo is queued or in progress already. A ledger that cannot be read this moment (a shared
        ledger's server restarting) logged a traceback per photo; the photo is taken as known now and looked at
        again at the next rescan, which queues it once the ledger answers."""
        try:
            return self.ledger.is_active(path)
        except Exception as exc:
            why = outside_fault(exc)
            if why is None:
                raise
            log.warning("could not look %s up in the ledger now (%s); the next rescan looks again", path.name,
                        " ".join(why.split()))
            return True

    def _enqueue_many(self, paths: list[Path]) -> None:
        """A card's worth of settled files in one ledger transaction (one commit instead of one each)."""
        found = []
        for path in paths:
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not self._kept_and_done(path, st):  # as `_enqueue`: a kept photo analysed as it is now is done
                found.append((path, classify(path, self.cfg.inbox, self._advisors(), self.cfg.default_advisor), st))
        try:
            jobs = self.ledger.enqueue_many([(p, i.rel_path, i.advisor, i.advisor_source, st.st_size, st.st_mtime,
                                              st.st_ctime) for p, i, st in found], kept=self.cfg.keep_originals)
        except LedgerUnavailable:
            return  # stopping: the photos stay in the inbox and the next start's rescan queues them
        for (path, intake, st), job in zip(found, jobs):
            self._queued(path, intake, st, job)

    def _queued(self, path: Path, intake: Any, st: os.stat_result, job: Any) -> None:
        if job is not None:
            self._skipped.pop(path, None)
            log.info("queued %s for %s (job %d)", intake.rel_path, intake.advisor, job.id)
            self.wake.set()
            return
        failed = self.ledger.failed_in_place(path, st.st_size, st.st_mtime, st.st_ctime)
        version = (st.st_size, st.st_mtime, st.st_ctime)
        if failed is not None and self._skipped.get(path) != version:
            self._skipped[path] = version  # every rescan finds it again: say it once, not every few seconds
            log.warning("left in the inbox: %s failed (job %d: %s) and has not changed since; it is not queued "
                        f"again. Fix it and drop it in again, or run `{mondrian()} retry --failed`",
                        intake.rel_path, failed.id, failed.error)

    def _kept_and_done(self, path: Path, st: os.stat_result) -> bool:
        """A photo left in the inbox under keep_originals and analysed as it is now: every rescan and restart finds
        it again, and it is done. Its sidecar asking for another mode since makes it new work (it cannot be dropped
        in again: it never left); so does editing it (another size or mtime)."""
        try:
            done = self.ledger.kept_in_place(path, st.st_size, st.st_mtime)
        except (LedgerUnavailable, OSError):
            return False  # the enqueue that follows meets the same fault and deals with it
        if done is None:
            return False
        if not self._may_have_sidecar(path):
            return True
        sidecar = sidecar_for(path)
        if sidecar is None:
            return True
        try:
            return read_sidecar(sidecar) == done.requested_mode
        except SidecarError:
            return False  # new work, which fails saying why (and is then left alone until something changes)

    def _may_have_sidecar(self, path: Path) -> bool:
        """Whether the photo's folder holds any name like its sidecar, from a listing kept per folder until the
        folder changes: a rescan of thousands of kept photos must not list their folder once per photo."""
        folder = path.parent
        try:
            stamp = os.stat(folder).st_mtime_ns
            cached = self._listings.get(folder)
            if cached is None or cached[0] != stamp:
                cached = (stamp, {n.lower() for n in os.listdir(folder) if n.lower().endswith(SIDECAR_SUFFIX)})
                if time.time_ns() - stamp > 2_000_000_000:  # a coarse mtime (1 s) may not show a change made now
                    self._listings[folder] = cached
        except OSError:
            return True
        names = cached[1]
        return (path.stem + SIDECAR_SUFFIX).lower() in names or (path.name + SIDECAR_SUFFIX).lower() in names

    def _unreachable(self, path: Path, reason: str) -> None:
        intake = classify(path, self.cfg.inbox, self._advisors(), self.cfg.default_advisor)
        job = self.ledger.record_unreachable(path, intake.rel_path, intake.advisor, reason)
        log.warning("failed: %s: %s (job %d; left where it is)", intake.rel_path, reason, job.id)

    # -- the MLX thread -----------------------------------------------------------------------
    def _work(self) -> None:
        try:
            self._serve()
        finally:
            self.worker.out.index.flush()  # stopping between two refreshes: the last jobs are listed too
            if self.worker.runtime is not None:
                from ..model.runtime import release_thread

                release_thread()

    def _serve(self) -> None:
        loading = False
        try:
            recovered = self.worker.recover()
            if recovered:
                log.info("recovered %d photo(s) interrupted by the last stop", recovered)
            from ..model.adapter_store import AdapterStore

            store = AdapterStore(self.cfg.adapters_dir)
            for advisor in store.advisors():  # a promotion the last stop cut short: its lora photos use it now
                store.settle(advisor)
            t0 = time.perf_counter()
            loading = True
            rt = self.worker.load_runtime()
            loading = False
            log.info("model ready: %s (%.1f s)%s", rt.model_id, time.perf_counter() - t0,
                     " — smoke model: scores are NOT meaningful" if rt.is_smoke else "")
            self.model_state = {"id": rt.model_id, "smoke": bool(rt.is_smoke), "configured": self.cfg.model}
            self.ledger.set_event("model", self.model_state)
        except LedgerUnavailable:
            return  # stopping while the ledger cannot be written: nothing was lost, the next start goes on
        except Exception as exc:
            from ..model.runtime import ModelNotFoundError

            if isinstance(exc, ModelNotFoundError) or not loading:
                self.fatal = f"{exc}"  # a setting to fix: exit 78 and say what to do
                self.stop.set()
                return
            # Anything else (out of memory, a damaged or busy file) may pass: stay up, and let each job try to
            # load the model again, retried with backoff and failed after max_attempts with this reason.
            log.error("could not load the model (%s: %s); photos will be retried with backoff",
                      type(exc).__name__, exc)
            self.model_state = {"id": self.cfg.model, "loaded": False, "error": f"{type(exc).__name__}: {exc}"}
            self.ledger.set_event("model", self.model_state)
        finally:
            self.ready.set()
        while not self.stop.is_set():
            try:
                if self.recheck.is_set():  # on this thread: recovery publishes, as the worker does
                    self.recheck.clear()
                    self.worker.recover_interrupted_analyses()
                    self.worker.out.index.follow_outbox()
                more = False
                if self.worker.runtime is not None:  # references need the model; never index without it
                    more = self.references.step(self.worker.runtime, stop=self.stop)  # between jobs, this thread
                if not self.worker.run_once() and not more:
                    # Photos due now wait while the outbox cannot take reports: sleep until it is looked at again.
                    due = self.worker.outbox_wait_s() if self.worker.outbox_blocked else self.ledger.next_due_in()
                    self.wake.wait(timeout=min(IDLE_POLL_SECONDS, due) if due is not None else IDLE_POLL_SECONDS)
                    self.wake.clear()
            except LedgerUnavailable:
                return  # stopping; the ledger keeps its last good state (see Ledger._write)
            except Exception as exc:  # the one worker thread must not die silently
                try:
                    self.ledger.found_damage(exc)  # a read found the file damaged: stopping
                except LedgerUnavailable:
                    self.wake.set()
                    return
                why = outside_fault(exc)
                if why is not None:  # a read while the ledger cannot answer (a shared ledger's server restarting)
                    log.warning("could not read the ledger (%s); trying again in 1 s", " ".join(why.split()))
                else:
                    log.exception("error in the worker loop; continuing in 1 s")
                self.stop.wait(1.0)

    # -- main thread --------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGHUP:
            self.reload = True
            log.info("received SIGHUP: finishing up, then exiting 75 so the service manager starts Mondrian again "
                     "with its settings read anew")
        else:
            log.info("received %s: finishing up", signal.Signals(signum).name)
        self.stop.set()
        self.wake.set()

    def _idle(self) -> bool:
        counts = self.ledger.counts().by_state
        if counts["running"] and not all(self.ledger.job_is_live(j) for j in self.ledger.running()):
            self._ask_recheck()  # a killed `mondrian analyze` would keep a --once run waiting forever
            return False
        if self.watcher.pending() or counts["running"] or self.worker.busy.is_set() or self.references.busy.is_set():
            return False
        # Photos waiting for an outbox that cannot take reports (full, read-only, unplugged) end a --once run too:
        # they stay queued, and the run says so and exits 75 (try again later). One look, kept for that message.
        blocked = self.worker.outbox_blocked
        self._left_waiting = (0, "")
        if counts["queued"] and blocked:
            self._left_waiting = (counts["queued"], blocked)
        elif counts["queued"] and counts["queued"] == self.worker.waiting_for_room_now():  # only those that do not fit
            self._left_waiting = (counts["queued"], "each needs more room than the outbox's disk has free now "
                                                    "(the log names them)")
        elif counts["queued"]:
            return False
        return True

    def _ask_recheck(self) -> None:
        self.recheck.set()
        self.wake.set()

    def run(self) -> int:
        self.cfg.ensure_dirs()
        try:
            self.cfg.check_shared_storage()
            lock_fds = _lock_home(self.cfg)
        except (ConfigError, StartupError) as exc:
            log.error("cannot start: %s", exc)
            return EX_CONFIG
        folders = FolderLocks(self.cfg, lock_fds)
        share = SharedOutbox(self.cfg, self.ledger) if self.cfg.shared else None
        if share is not None:
            conflict = share.conflict_at_start(self.stop.wait)
            if conflict:
                log.error("cannot start: %s", conflict)
                _unlock_home(lock_fds)
                return EX_CONFIG
            share.plant()
        try:
            api = self._start_api()
        except OSError as exc:  # the port is taken, or the spool cannot be made: a setting or a folder to fix
            log.error("cannot start: %s", exc)
            _unlock_home(lock_fds)
            return EX_CONFIG
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.ledger.set_event("daemon", {"pid": os.getpid(), "started_at": time.time(), "once": self.once})
        log.info("watching %s; reports go to %s", self.cfg.inbox, self.cfg.outbox)
        self.heartbeat.start()
        self.watcher.start()
        self.references.start()
        self.watcher.rescan()
        self.ledger.set_event("last_rescan", self.watcher.last_rescan_at)
        self._thread.start()
        nightly = self._start_nightly()
        from ..service.logrotate import StdStreamRotator

        rotator = StdStreamRotator.from_env()
        next_rescan = time.monotonic() + self.cfg.rescan_seconds
        next_beat = 0.0
        try:
            while not self.stop.is_set():
                self.watcher.poll()
                now = time.monotonic()
                if now >= next_rescan:
                    self.watcher.ensure_alive()
                    self.watcher.rescan()
                    self.references.ensure_alive()
                    self.references.mark_dirty()
                    self._ask_recheck()
                    next_rescan = now + self.cfg.rescan_seconds
                if now >= next_beat:
                    conflict = folders.check()
                    if self.cfg.inbox in folders.made_anew:
                        folders.made_anew.clear()
                        self.watcher.renew()
                    if share is not None and not conflict:
                        share.keep()
                        conflict = share.conflict()
                    if conflict:
                        self.conflict = conflict
                        break
                    self._beat()
                    if rotator is not None:
                        rotator.maybe_rotate()
                    next_beat = now + 5.0
                if self.once and self.ready.is_set() and self._idle():
                    self.waiting_for_outbox, why = self._left_waiting
                    if self.waiting_for_outbox:
                        log.warning("%d queued photo(s) wait: %s; run Mondrian again then", self.waiting_for_outbox,
                                    why)
                    else:
                        log.info("inbox is empty and every photo is finished")
                    break
                # Files settling are looked at every 0.2 s; with none, once a second: a new file's quiet time runs from
                # its event, so with the default 2 s it is queued no later (with quiet_seconds under 1, <= 1 s later).
                self.stop.wait(0.2 if self.once or self.watcher.pending() else IDLE_TICK_SECONDS)
        except LedgerUnavailable:
            pass  # only raised once stopping: the ledger keeps its last good state, recovered at the next start
        finally:
            self.stop.set()
            self.wake.set()
            self.watcher.stop()
            self.references.stop()
            if nightly is not None:
                nightly.stop()  # also stops a training child process, which never holds a photo
            self._finish_worker()  # meanwhile the API answers 503, and 202 to requests waiting for a report
            self.heartbeat.retire()
            if share is not None:
                share.remove()
            if api is not None:
                api.stop()
            self._last_words()
            _unlock_home(lock_fds)
        if self.fatal:
            log.error("cannot start: %s", self.fatal)
            return EX_CONFIG
        if self.ledger.damaged:
            return EX_CONFIG  # said when found (Ledger.found_damage); launchd's next start says it again
        if self.conflict:
            log.error("%s", self.conflict)
            return EX_CONFIG
        if self.ledger_lost or self.reload or self.waiting_for_outbox:
            return EX_TEMPFAIL
        return 0

    def _last_words(self) -> None:
        """The stop record, and a deleted ledger written back whole (no thread writes any more)."""
        self.ledger_lost = self.ledger_lost or self.ledger.replaced()  # a --once run may end between beats
        try:
            self.ledger.set_event("daemon", {"pid": None, "stopped_at": time.time()})
        except LedgerUnavailable as exc:
            log.warning("%s; the next start recovers the photo that was in progress", exc)
        if self.ledger_lost:
            try:
                kept = self.ledger.rescue()
            except Exception as exc:
                log.error("could not write the ledger back to %s (%s: %s)", self.cfg.db_path, type(exc).__name__, exc)
                return
            aside = f"; the file found there was kept as {kept.name}" if kept != self.cfg.db_path else ""
            log.error("%s: everything it held was written back to it%s. Mondrian stops so that it restarts on "
                      "that file (launchd and systemd restart it; otherwise run it again)", self.ledger_lost, aside)

    def _model_now(self) -> dict[str, Any] | None:
        """This daemon's model for /health: loaded (also when a later photo loaded it), or why not."""
        rt = self.worker.runtime
        if rt is not None:
            return {"id": rt.model_id, "smoke": bool(rt.is_smoke), "configured": self.cfg.model}
        return self.model_state

    def _start_api(self) -> Any:
        """The HTTP API (daemon/api/), bound now so that a taken port stops the start-up; not in --once runs, which
        end when the inbox is empty and could not promise a caller its answer."""
        if self.once or not self.cfg.api_serves:
            return None
        from ..api.app import Door
        from ..api.server import ApiServer
        from ..api.spool import Spool, spool_tag

        server = ApiServer(Door(self.cfg, self.ledger, self.stop, self.wake.set,
                                Spool(self.cfg.spool_dir, spool_tag(self.cfg.var_dir)), self._model_now))
        server.start()
        return server

    def _start_nightly(self) -> Any:
        """LoRA retraining at cfg.train_time (jobs/nightly.py), in a child process; never in --once runs."""
        if self.once:
            return None
        try:
            from jobs.nightly import NightlyTrainer, nightly_enabled  # the one way in from training

            if not nightly_enabled(self.cfg):
                return None
            nightly = NightlyTrainer(self.cfg, self.ledger)
            nightly.start()
            return nightly
        except Exception as exc:  # a bad train_time must not stop the inbox from being served
            log.error("nightly adapter training is off: %s", exc)
            return None

    def _beat(self) -> None:
        lost = self.ledger.replaced()
        if lost and not self.ledger_lost:
            self.ledger_lost = lost
            log.error("%s; finishing up, then writing it back", lost)
            self.stop.set()
            self.wake.set()
            return
        self.ledger.set_event("heartbeat", {"pid": os.getpid(), "pending": self.watcher.pending(),
                                            "observer_alive": self.watcher.observer_alive(),
                                            "observer_restarts": self.watcher.restarts})
        # Only what changed since the last beat: each write is a transaction synced to disk, every 5 s.
        for key, at in (("last_event", self.watcher.last_event_at), ("last_rescan", self.watcher.last_rescan_at)):
            if at and self._told.get(key) != at:
                self.ledger.set_event(key, at)
                self._told[key] = at

    def _finish_worker(self) -> None:
        self._thread.join(timeout=STOP_GRACE_SECONDS)
        if self._thread.is_alive():
            for job in self.worker.in_hand():
                try:
                    self.ledger.requeue(job.id, "Mondrian was stopped while analysing it; queued again",
                                        undo_attempt=True, keep_place=True)
                    log.info("stopping: %s goes back to the queue", job.rel_path)
                except LedgerUnavailable as exc:
                    log.warning("%s; %s stays in progress and is queued again at the next start", exc, job.rel_path)
            self._last_words()
            logging.shutdown()
            os._exit(EX_TEMPFAIL if self.ledger_lost else 0)  # MLX is mid-computation on the worker thread


def run_daemon(cfg: Config, *, once: bool = False) -> int:
    from jobs.nightly import nightly_enabled  # the one way in from training

    nightly_enabled(cfg)  # reads [lora]: a bad value stops the start (exit 78), not the first training at night
    cfg.ensure_dirs()  # a ConfigError names the folder in the way: exit 78 with that line (daemon/cli/main.py)
    return Daemon(cfg, once=once).run()
