"""The nightly job: retrain an advisor's adapter when their reference set has changed.

APScheduler's BackgroundScheduler fires a CronTrigger at `train_time` (default 02:30, local time) with
`coalesce=True` and no misfire grace limit: if the fire time passes while the process is suspended (a
Mac asleep), the job runs once when it wakes instead of being skipped. Because a sleeping Mac stops the
monotonic clock the scheduler waits on, a small thread pokes `scheduler.wakeup()` every minute so the
wall-clock time is looked at again soon after waking. A run missed while the daemon was not running
at all (recorded in the ledger's `nightly` event) is caught up at start-up.

A check trains an advisor only when their reference set (photos and profiles: `jobs.dataset.fingerprint`)
differs from the set their current adapter was trained on, and from the set of the latest attempt (so a
refused or rolled-back candidate is not retrained every night on unchanged references), or when the
configured base model is not the one the current adapter was trained on (an adapter for another base is
never served, so without retraining lora would fall back to rag for ever). Training runs
in a child process (jobs.train), one advisor at a time, while the daemon keeps serving the inbox.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any, Callable

from daemon.config import Config, ConfigError, time_of_day

log = logging.getLogger("mondrian.nightly")

JOB_ID = "nightly-lora"
EVENT = "nightly"
TRAINING_EVENT = "training"
WAKE_SECONDS = 60.0


class ScheduleError(ValueError):
    pass


def parse_train_time(text: str) -> tuple[int, int, int]:
    try:
        return time_of_day(text)  # the one parser: load_config checks train_time with it at start
    except ConfigError as exc:
        raise ScheduleError(str(exc)) from None


def previous_fire(train_time: str, now: datetime | None = None) -> datetime:
    """The latest scheduled time at or before `now` (local time)."""
    now = now or datetime.now().astimezone()
    h, m, s = parse_train_time(train_time)
    t = now.replace(hour=h, minute=m, second=s, microsecond=0)
    return t if t <= now else t - timedelta(days=1)


@dataclass
class Due:
    advisor: str
    reason: str
    references: int


def nightly_enabled(cfg: Config) -> bool:
    """Whether this home trains adapters at night (`[train] nightly`); the daemon asks here, not jobs.train."""
    from .train import TrainSettings

    return TrainSettings.from_config(cfg).nightly


def due_advisors(cfg: Config, ledger: Any, store: Any | None = None) -> list[Due]:
    """Advisors whose reference set changed since their current adapter (and latest attempt) was trained."""
    from daemon.analysis.advisors import load_advisors
    from daemon.model.adapter_store import AdapterStore

    from .dataset import MIN_REFERENCES, DatasetError, collect_references, fingerprint, training_references
    from .train import TrainSettings

    store = store or AdapterStore(cfg.adapters_dir)
    base = configured_base(cfg)
    settings = TrainSettings.from_config(cfg)
    use_model_scores = settings.use_model_scores
    wanted = _training_settings(asdict(settings))
    out = []
    for advisor_id in sorted(load_advisors(cfg)):
        try:
            refs = collect_references(cfg, advisor_id, ledger)
        except DatasetError as exc:
            log.info("nightly: %s skipped (%s)", advisor_id, exc)
            continue
        usable, _ = training_references(refs, use_model_scores)
        if len(usable) < MIN_REFERENCES:
            continue  # too few curator-scored references: training would refuse (mondrian train says why)
        fp = fingerprint(refs)
        current, latest = store.current(advisor_id), store.latest(advisor_id)
        if current is not None and current.fingerprint == fp and _same_base(current, base) \
                and not _settings_changed(current, wanted):
            continue
        if latest is not None and latest.fingerprint == fp and _same_base(latest, base) \
                and not _settings_changed(latest, wanted) and not latest.decision.get("references_moved"):
            continue  # already tried on exactly these references, base and settings (refused, or rolled back since)
        last = latest if latest is not None and latest.fingerprint == fp and _same_base(latest, base) else current
        if current is None and latest is None:
            reason = f"first adapter ({len(refs)} references)"
        elif latest is not None and latest.fingerprint == fp and latest.decision.get("references_moved"):
            reason = f"test photos were moved while {latest.name} was judged"
        elif last is not None and last.fingerprint == fp and _same_base(last, base):
            # What the refusal's own advice leads to (`lower [lora] min_test_photos`): tried again, not skipped
            # for references that did not change.
            reason = (f"the [lora] settings changed since {last.name} was trained "
                      f"({', '.join(_settings_changed(last, wanted))})")
        elif current is not None and current.fingerprint == fp:
            reason = f"the base model changed since {current.name} was trained"
        elif current is None:
            reason = f"references changed since the last attempt {latest.name}"
        else:
            reason = f"references changed since {current.name} was trained"
        out.append(Due(advisor_id, reason, len(refs)))
    return out


def configured_base(cfg: Config) -> str | None:
    """The fingerprint of the configured base model (None when it cannot be resolved here and now)."""
    from daemon.model.adapter_store import base_model_fingerprint
    from daemon.model.runtime import resolve_model_path
    from daemon.model.smoke import DIR_NAMES, SMOKE_ALIAS

    try:
        if cfg.model.strip() == SMOKE_ALIAS:  # never build a model here: this is not the thread that owns MLX
            path = cfg.var_dir / "models" / DIR_NAMES["smoke"]
            return base_model_fingerprint(path) if (path / "config.json").is_file() else None
        return base_model_fingerprint(resolve_model_path(cfg.model, cfg.var_dir))
    except Exception as exc:  # noqa: BLE001 - a missing model is reported by the worker; here it changes nothing
        log.info("nightly: cannot fingerprint the base model %s (%s)", cfg.model, exc)
        return None


# Settings that change no adapter: when the nightly check runs, and how many versions are kept.
_NOT_TRAINING = frozenset({"nightly", "keep_versions"})


def _training_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in _NOT_TRAINING}


def _settings_changed(version: Any, wanted: dict[str, Any]) -> list[str]:
    """The [lora] settings that differ from those `version` was trained with (none known: none, so an adapter
    from before versions recorded them is not retrained for that alone)."""
    trained = version.manifest.get("settings")
    if not isinstance(trained, dict):
        return []
    return sorted(k for k, v in wanted.items() if k in trained and trained[k] != v)


def _same_base(version: Any, base: str | None) -> bool:
    trained_on = (version.manifest.get("base_model") or {}).get("fingerprint")
    return base is None or trained_on is None or trained_on == base


class ProgressRecorder:
    """Turns the trainer's progress events into the ledger's `training` event (throttled).

    There is one `training` event for every run, so a run that never trained leaves another's alone: a second
    `mondrian train --advisor ansel` (or the nightly check) refused because ansel is being trained by another process
    (adapter_store.Busy) once wrote "ansel failed" over the running one's progress, and `status` said so until that
    one's next event. Progress events come from the trainer's child, which only runs while the advisor's lock is
    held, so a run that heard none never held it."""

    def __init__(self, ledger: Any, advisor: str, every_s: float = 1.0) -> None:
        self.ledger, self.advisor, self.every_s = ledger, advisor, every_s
        # Who records it: `mondrian status` tells a run whose recorder died (SIGKILL, a crash, a refused setting)
        # from one still going, instead of showing "running" until the next training.
        self.state: dict[str, Any] = {"advisor": advisor, "state": "running", "phase": "starting",
                                      "started_at": time.time(), "recorder_pid": os.getpid(),
                                      "host": socket.gethostname()}
        self._last = 0.0
        self.heard = False  # a progress event came: this run holds the advisor's lock
        if not _being_trained(ledger, advisor):
            # Recorded at once, so a run that dies before its first event (a refused setting) reads "stopped"; while
            # another process trains this advisor, only once this run gets the lock (its first event), if ever.
            self.ledger.set_event(TRAINING_EVENT, self.state)

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("event") == "phase":  # a new stretch of work: the last one's steps are not its own
            for key in ("step", "steps", "eta_s"):
                self.state.pop(key, None)
        if event.get("phase", "training") != "training":
            self.state.pop("eta_s", None)  # the training's time left, 0 s at its last step, is not the evaluation's
        for key in ("phase", "step", "steps", "loss", "val_loss", "best_val_loss", "eta_s", "elapsed_s",
                    "train_rows", "validation", "held_out", "curator", "model_scored", "reason", "pid"):
            if key in event and event[key] is not None:
                self.state[key] = event[key]
        now = time.monotonic()
        if not self.heard or event.get("event") == "phase" or now - self._last >= self.every_s:
            self.heard = True
            self._last = now
            self.ledger.set_event(TRAINING_EVENT, self.state)

    def finish(self, outcome: Any) -> None:
        if not self.heard and not self._recorded_is_mine():
            # Never trained (refused for the lock, as a rule) and the record is another run's: that one's to keep.
            log.info("training %s: not recorded (%s); the training event stays the other run's", self.advisor,
                     outcome.reason)
            return
        self.state.update(state=("promoted" if outcome.promoted else "refused") if outcome.ok
                          else "stopped" if getattr(outcome, "stopped", False) else "failed",
                          version=outcome.version, reason=outcome.reason, finished_at=time.time(),
                          seconds=round(outcome.seconds, 1))
        self.state.pop("eta_s", None)
        self.state.pop("pid", None)
        self.ledger.set_event(TRAINING_EVENT, self.state)

    def _recorded_is_mine(self) -> bool:
        t = self.ledger.events().get(TRAINING_EVENT, (None, None))[0]
        return isinstance(t, dict) and all(t.get(k) == self.state[k] for k in ("recorder_pid", "host", "started_at"))


def _being_trained(ledger: Any, advisor: str) -> bool:
    """Whether the `training` event says another process is training `advisor` now (as `mondrian status` reads it:
    running, its recorder alive on this machine; one on another machine sharing the ledger cannot be looked at)."""
    from daemon.fsutil import pid_alive

    t = ledger.events().get(TRAINING_EVENT, (None, None))[0]
    if not isinstance(t, dict) or t.get("state", "running") != "running" or t.get("advisor") != advisor:
        return False
    pid, host = t.get("recorder_pid"), t.get("host")
    if host != socket.gethostname():
        return True
    return isinstance(pid, int) and pid != os.getpid() and pid_alive(pid)


def train_and_record(cfg: Config, ledger: Any, advisor: str, stop: threading.Event | None = None,
                     **kwargs: Any) -> Any:
    from .train import run_training

    recorder = ProgressRecorder(ledger, advisor)
    outcome = run_training(cfg, advisor, on_progress=recorder, stop=stop, **kwargs)
    recorder.finish(outcome)
    log.info("training %s: %s%s", advisor, ("promoted " if outcome.promoted else "not promoted ")
             if outcome.ok else "stopped " if outcome.stopped else "failed: ",
             (outcome.version + " " if outcome.version else "") + f"({outcome.reason})")
    return outcome


class NightlyTrainer:
    """Owns the BackgroundScheduler. `train_fn(advisor)` defaults to training in a child process."""

    def __init__(self, cfg: Config, ledger: Any, *, train_fn: Callable[[str], Any] | None = None,
                 wake_seconds: float = WAKE_SECONDS) -> None:
        self.cfg, self.ledger = cfg, ledger
        self.stop_event = threading.Event()
        self._record_lock = threading.Lock()
        self.train_fn = train_fn or (lambda advisor: train_and_record(cfg, ledger, advisor, stop=self.stop_event))
        self.wake_seconds = wake_seconds
        self.scheduler: Any = None
        self.runs = 0
        self._lock = threading.Lock()
        self._waker: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.cron import CronTrigger

        h, m, s = parse_train_time(self.cfg.train_time)
        self.scheduler = BackgroundScheduler(daemon=True, job_defaults={
            "coalesce": True, "misfire_grace_time": None, "max_instances": 1})
        self.scheduler.add_job(self.run_check, CronTrigger(hour=h, minute=m, second=s), id=JOB_ID,
                               name="retrain LoRA adapters whose references changed",
                               coalesce=True, misfire_grace_time=None, max_instances=1)
        catch_up = self._missed_run()
        if catch_up:
            self.scheduler.add_job(self.run_check, "date", run_date=datetime.now().astimezone(),
                                   id=f"{JOB_ID}-catch-up", misfire_grace_time=None, coalesce=True)
        self.scheduler.start()
        self._record(armed=True)
        self._waker = threading.Thread(target=self._wake_loop, daemon=True, name="nightly-wake")
        self._waker.start()
        log.info("nightly training check at %s local time%s", self.cfg.train_time,
                 f"; catching up the run missed at {catch_up:%Y-%m-%d %H:%M}" if catch_up else "")

    def stop(self) -> None:
        self.stop_event.set()
        if self.scheduler is not None:
            try:
                self.scheduler.shutdown(wait=False)
            except Exception:  # already stopped
                pass

    def next_run(self) -> datetime | None:
        job = self.scheduler.get_job(JOB_ID) if self.scheduler is not None else None
        return job.next_run_time if job is not None else None

    def _wake_loop(self) -> None:
        while not self.stop_event.wait(self.wake_seconds):
            try:
                self.scheduler.wakeup()
            except Exception:
                return

    # -- the ledger record -----------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        try:
            value = self.ledger.events().get(EVENT, (None, None))[0]
        except Exception:
            value = None
        return value if isinstance(value, dict) else {}

    def _record(self, **changes: Any) -> None:
        # Read, changed and written under a lock: a catch-up check starts on the scheduler's thread while `start`
        # records itself armed, and either would write back the record without the other's change.
        with self._record_lock:
            state = self._state()
            if changes.pop("armed", False):
                state.setdefault("armed_at", time.time())
            state.update(changes)
            state["train_time"] = self.cfg.train_time
            nxt = self.next_run()
            state["next_run_at"] = nxt.timestamp() if nxt else None
            self.ledger.set_event(EVENT, state)

    def _missed_run(self) -> datetime | None:
        """The scheduled time that passed while no daemon was running, if any."""
        state = self._state()
        armed = state.get("armed_at")
        if not armed:
            return None  # first start: nothing was promised yet
        prev = previous_fire(self.cfg.train_time)
        # The last check that ran to its end: one cut short by a stop (a service restart, a logout, a shutdown at
        # night) is caught up at the next start, not a day later.
        last = max(float(state.get("last_finished_at") or 0), float(armed))
        return prev if prev.timestamp() > last else None

    # -- the job ---------------------------------------------------------------------------------
    def run_check(self) -> list[Any]:
        if not self._lock.acquire(blocking=False):
            return []
        try:
            with self.ledger.training_turn() as mine:
                if not mine:
                    log.info("nightly check: another machine sharing the ledger is training now; this one leaves "
                             "it to that one (the adapters folder is shared, so every node serves what it promotes)")
                    return []
                return self._check()
        finally:
            self._lock.release()

    def _check(self) -> list[Any]:
        """One check: train the advisors whose references changed, one after another."""
        self.runs += 1
        self._record(last_run_at=time.time())
        due = due_advisors(self.cfg, self.ledger)
        log.info("nightly check: %s", ", ".join(f"{d.advisor} ({d.reason})" for d in due) or
                 "no advisor's references changed")
        outcomes = []
        for d in due:
            if self.stop_event.is_set():
                break
            try:
                outcomes.append(self.train_fn(d.advisor))
            except Exception:
                log.exception("nightly training of %s failed", d.advisor)
        if self.stop_event.is_set():
            log.info("nightly check stopped before it finished; it runs again at the next start")
            self._record(last_stopped_at=time.time())
            return outcomes
        self._record(last_finished_at=time.time(), last_trained=[d.advisor for d in due])
        return outcomes
