"""`mondrian status`: what is happening, for a person (text) or a script (--json)."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, TextIO

import platformdirs

from .. import testhooks
from ..config import CONFIG_NAME, Config, ConfigError, refuse_file_as_home
from ..fsutil import is_folder, lock_holder, pid_alive
from ..ledger import DONE, FAULT_NOTE, FaultNote, Job, Ledger
from ..hints import mondrian, program, shell_word
from ..intake.inbox import LIVE_PHOTO_VIDEO, STRAY_SIDECAR_SECONDS, inbox_files, stale_downloads, stray_sidecars
from ..pipeline.failures import advice, analyze_command, analyzed_as, cause_of
from ..outbox_room import OutboxBlocked, outbox_room
from .terminal import shown

# Causes where the photo itself is fine (its sidecar, the advisor asked for): a different next step than a photo's.
PHOTO_IS_FINE = frozenset({"sidecar", "mode_command", "advisor_folder", "advisor_command", "advisor_definition"})
# Failures a setting or the model caused: "fix the cause (disk, permissions)" sent a timed-out photo round again
# unchanged, to time out again; their record's advice names the setting (job_timeout_seconds) or the model.
SETTING_OR_MODEL = frozenset({"timeout", "model", "too_large"})

BEAT_SECONDS = 5.0  # the daemon's heartbeat (daemon/pipeline/supervisor.py)
STALE_AFTER_SECONDS = 30.0  # six missed beats: stopped (SIGSTOP, a debugger, a frozen laptop) or hung
RECENT_PHOTOS = 20  # ETAs come from this many of the latest analysed photos
SHOWN_DELAYED = 5


def daemon_pid(cfg: Config) -> int | None:
    """The pid holding the home's lock, i.e. a live daemon (-1 if it wrote none); None if nobody holds it."""
    return lock_holder(cfg.var_dir / "daemon.lock")


def require_home(cfg: Config) -> None:
    """A command that only looks (status) must not create a home where a mistyped MONDRIAN_HOME points."""
    home = cfg.home
    if home.is_dir() and any(p.exists() for p in (home / CONFIG_NAME, cfg.db_path, cfg.inbox)):
        return
    refuse_file_as_home(home)
    if not home.exists():  # on a drive that is not connected, `init` would make it where the drive mounts: say so
        try:
            cfg._refuse_unmounted(home, within=(Path.home(), Path(platformdirs.user_data_dir())))
        except ConfigError as exc:
            raise ConfigError(f"no Mondrian home at {home}: {exc}") from None
    from .init import containing_home

    inside = containing_home(home)
    if inside is not None:  # `--home ~/Mondrian/inbox`: the home meant is the one above
        above, name = inside
        raise ConfigError(f"{home} is the {name} (or a folder in it) of the Mondrian home {above}, not a home: "
                          f"give that home, `{program()} --home {shell_word(above)} …`")
    what = "has no mondrian.toml, ledger or inbox" if home.exists() else "does not exist"
    raise ConfigError(f"no Mondrian home at {home} (it {what}): run `{program()} init {shell_word(home)}` to "
                      f"create one there, or set MONDRIAN_HOME (or --home) to the home you have")


def next_step(j: Job, advisors: Iterable[str] = (), cfg: Config | None = None) -> str:
    """What the person can do about a failure, in a few words (the reason and the record say more). `advisors`:
    the known ones, which an unknown advisor's advice lists."""
    cause = cause_of(j.error or "", advisor_source=j.advisor_source, mode_source=j.mode_source)
    if cause.key in PHOTO_IS_FINE | SETTING_OR_MODEL:  # re-exporting the photo would not help: the record's own
        return advice(cause, from_inbox=bool(j.owns_file), advisors=advisors, cfg=cfg, **analyzed_as(j))
    if cause.key == "link":  # `retry --failed --all` would only bring the link back, to fail again
        return ("copy the photo itself (not a link or an alias) into the inbox under the same name; its failure is "
                "cleared once the copy is taken in")
    if is_folder(Path(j.source_path)):  # an inbox folder Mondrian could not look into: no photo, no record
        return f"make the folder readable (`chmod u+rwx`: its photos are moved out of it too); its photos are queued then, and `{mondrian()} retry " \
               f"--failed` clears this entry"
    if not j.owns_file:
        return f"fix what the reason says, then run `{analyze_command(**analyzed_as(j))}` again"
    if j.error_kind != "permanent":
        return f"fix the cause (disk, permissions), then `{mondrian()} retry --failed`"
    kept = Path(j.output_dir) if j.output_dir else None
    if (kept is None or not os.path.lexists(kept)) and os.path.lexists(j.source_path):
        return f"do what the reason says, then `{mondrian()} retry --failed`"
    return (f"fix or re-export the photo and drop it into the inbox again (`{mondrian()} retry --failed` skips it "
            f"until it changes; `{mondrian()} retry --failed --all` forces it)")


def _known_advisors(cfg: Config, jobs: list[Job]) -> list[str]:
    """The advisors an unknown advisor's next step lists (as its failure record does), read only when one failed
    so: without them the advice said "Known advisors: none"."""
    if not any(cause_of(j.error or "").key == "advisor_folder" for j in jobs):
        return []
    try:
        from ..analysis.advisors import load_advisors

        return sorted(load_advisors(cfg))
    except Exception:  # a broken definition is the daemon's to report; the advice then lists none
        return []


def _failure(cfg: Config, j: Job, advisors: Iterable[str] = (), later: Job | None = None) -> dict[str, Any]:
    """A failure as status shows it, pointing at its record only if that record was really written. `later`: a file
    of the same name analysed since, while this one's photo is still in failed/ (it stands: two cards' IMG_0001.JPG
    are two photos; a photo put back fixed leaves its broken copy there)."""
    record = Path(f"{j.output_dir}.error.json") if j.output_dir else None
    step = next_step(j, advisors, cfg)
    if later is not None and j.output_dir:
        done = "critiqued" if later.duplicate_of is None else f"filed as a duplicate of job {later.duplicate_of}"
        step = (f"a later {Path(j.rel_path).name} was {done} (job {later.id}): if that was this photo, fixed, delete "
                f"`{shell_word(Path(j.output_dir))}` and its record; if it is another photo, `{mondrian()} retry "
                f"--failed {j.id}` brings this one back beside it")
    out: dict[str, Any] = {"job_id": j.id, "file": j.rel_path, "reason": j.error, "kind": j.error_kind,
                           "failed_at": j.finished_at, "record": None, "note": None, "next_step": step}
    if record is not None and record.exists():
        out["record"] = str(record)
    elif is_folder(Path(j.source_path)):
        pass  # a folder's failure is its ledger entry alone: no record was ever meant to be written
    elif j.owns_file and os.path.lexists(j.source_path):
        out["note"] = (f"no failure record in {cfg.failed_dir} ({_missing(cfg.failed_dir)}); the photo is still in "
                       f"the inbox: once that is fixed, run `{mondrian()} retry --failed`")
    elif j.owns_file and not j.kept and record is not None:  # the photo moves to failed/ only after its record
        out["note"] = f"its failure record was moved or deleted from {cfg.failed_dir} since"
    elif record is not None:
        out["note"] = f"no failure record in {cfg.failed_dir} ({_missing(cfg.failed_dir)})"
    return out


def _missing(folder: Path) -> str:
    """Why a record may be missing from `folder`, as far as can be seen now."""
    if os.path.lexists(folder) and not os.path.isdir(folder):  # statvfs and access would answer for the file
        return (f"it could not be written: {folder.name} is a file, not a folder; move the file out of the way (the "
                f"daemon makes the folder again)")
    try:
        st = os.statvfs(folder)
        if st.f_bavail == 0 or (st.f_files and st.f_favail == 0):
            return "it could not be written: its disk is full"
    except OSError as exc:
        return f"it could not be written: {exc.strerror or exc}"
    if not os.access(folder, os.W_OK | os.X_OK):
        return "it could not be written: the folder cannot be written"
    return "removed since, or it could not be written then: the daemon's log says which"


def _liveness(pid: int | None, events: dict[str, tuple[Any, float]], now: float) -> dict[str, Any]:
    """Whether the daemon holding the home lock still beats: a stopped or hung process keeps its lock."""
    if pid is None:
        return {"running": False, "pid": None}
    beats = [at for key in ("heartbeat", "daemon") for value, at in [events.get(key, ({}, 0.0))]
             if isinstance(value, dict) and value.get("pid") == pid]
    age = round(now - max(beats), 1) if beats else None  # None: it has only just started
    return {"running": True, "pid": pid, "last_heartbeat_s": age,
            "responding": age is None or age <= STALE_AFTER_SECONDS}


def _typical(durations: list[float]) -> float | None:
    """What a photo takes here: the median of the latest ones (one slow first photo, the model loading, does not
    skew it)."""
    return round(statistics.median(durations), 1) if durations else None


def _recent_spans(ledger: Ledger, limit: int) -> list[tuple[float, float]]:
    """(claimed, finished) of the latest analysed photos: the photos `Ledger.recent_durations` times, with when
    each ran, so that photos analysed together (a batch) can be told from photos analysed one after another."""
    job = ledger.Job
    q = (job.select(job.started_at, job.finished_at)
         .where((job.state == DONE) & job.duplicate_of.is_null() & job.started_at.is_null(False)
                & job.finished_at.is_null(False))
         .order_by(job.finished_at.desc()).limit(limit))
    return [(start, end) for start, end in q.tuples() if end >= start]


def _at_once(spans: list[tuple[float, float]]) -> float:
    """How many photos were analysed at a time: per busy stretch (photos whose claim-to-finish times overlap: a
    batch, or several workers), the photo-seconds over the stretch's length; the median of the stretches, so that
    the oldest batch, of which only a part is among the latest photos, does not skew it. 1 for one after another."""
    ratios: list[float] = []
    stretch: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if stretch and start >= max(e for _, e in stretch):  # claimed after the stretch ended: a new one begins
            ratios.append(_overlap(stretch))
            stretch = []
        stretch.append((start, end))
    if stretch:
        ratios.append(_overlap(stretch))
    ratios = [r for r in ratios if r > 0]  # photos that took no time (timestamps to the same instant) say nothing
    return max(1.0, round(statistics.median(ratios), 1)) if ratios else 1.0


def _overlap(stretch: list[tuple[float, float]]) -> float:
    """Photo-seconds over the stretch's length: how many photos were in progress at once, on average."""
    length = max(e for _, e in stretch) - min(s for s, _ in stretch)
    return sum(e - s for s, e in stretch) / length if length > 0 else 0.0


def _estimates(ledger: Ledger, running: list[dict[str, Any]], waiting: int) -> dict[str, Any]:
    """ETAs from the latest photos' durations: per photo in progress, and for the whole queue.

    A photo's own ETA is its claim-to-finish time (in a batch, the batch's); the queue's is throughput: photos
    analysed together share that time, so it is divided by how many ran at a time (`batch_size` 8 once made the
    queue's ETA 8x too long)."""
    spans = _recent_spans(ledger, RECENT_PHOTOS)
    typical = _typical([end - start for start, end in spans])
    at_once = _at_once(spans)
    for r in running:
        r["eta_s"] = None if typical is None else round(max(0.0, typical - r["elapsed_s"]), 1)
    queue_s = None
    if typical is not None:
        queue_s = round((sum(r["eta_s"] for r in running) + waiting * typical) / at_once, 1)
    return {"typical_photo_s": typical, "based_on_photos": len(spans), "queue_s": queue_s,
            "photos_at_once": at_once, "photo_every_s": None if typical is None else round(typical / at_once, 1)}


def collect(cfg: Config) -> dict[str, Any]:
    require_home(cfg)
    # Refuses a ledger deleted under the running daemon (it is written back soon); reads a copy of one this user
    # cannot write while no daemon runs.
    with Ledger.for_reading(cfg) as ledger:
        with ledger.snapshot():  # counted and listed at one moment: a photo starting meanwhile is not in both states
            counts = ledger.counts()
            testhooks.crashpoint("status_counted")
            events = ledger.events()
            now = time.time()
            at = ledger.clock()  # jobs' times are the ledger's (a shared ledger's server's), not this Mac's
            running, interrupted = [], []
            for j in ledger.running():
                entry = {"job_id": j.id, "file": j.rel_path, "advisor": j.advisor, "mode": j.requested_mode,
                         "owns_file": j.owns_file, "started_at": j.started_at, "analyze_again": None if j.owns_file
                         else analyze_command(**analyzed_as(j)),
                         "elapsed_s": round(at - (j.started_at or at), 1)}
                # A job whose process is gone (a killed `mondrian analyze`) is not in progress, whatever the ledger
                # says.
                (running if ledger.job_is_live(j) else interrupted).append(entry)
            delayed = [{"job_id": j.id, "file": j.rel_path, "attempts": j.attempts, "next_try_at": j.not_before,
                        "next_try_in_s": round(j.not_before - at, 1), "reason": j.error} for j in ledger.delayed(at)]
            recent = list(ledger.recent_failures(superseded=counts.superseded))
            known = _known_advisors(cfg, recent)
            failures = [_failure(cfg, j, known, ledger.later_done(j.source_path, j.id)) for j in recent]
            queue = {"queued": counts.by_state["queued"] - len(delayed), "delayed": len(delayed),
                     "running": len(running), "failed": counts.by_state["failed"]}
            eta = _estimates(ledger, running, queue["queued"])
            extra = _extra_sections(cfg, ledger)
            schema_version = ledger.schema_version()
        waiting = _inbox_waiting(cfg, ledger, now)
        read_only = ledger.read_only_copy
    model = events.get("model", (None, None))[0]
    pid = daemon_pid(cfg)
    fault = FaultNote.read(cfg.var_dir / FAULT_NOTE)
    if fault is not None and (pid is None or fault.get("pid") != pid):
        fault = None  # left by a daemon that has stopped since
    daemon = _liveness(pid, events, now)
    if not daemon["running"] or not daemon.get("responding", True):  # both advise how to start it again
        daemon["service_installed"] = _service_serves(cfg)
    if fault is not None:
        daemon["responding"] = True  # it cannot write its heartbeat: the fault line says why
    return {
        "home": str(cfg.home),
        "inbox": str(cfg.inbox),
        "quiet_seconds": cfg.quiet_seconds,
        "outbox": str(cfg.outbox),
        "daemon": daemon,
        "model": _model(cfg, model, daemon),
        "default_advisor": cfg.default_advisor,
        "default_mode": cfg.default_mode,
        "counts": counts.by_state,
        "queue": queue,  # queued here is what can start now; delayed waits for its next try
        "delayed": delayed,
        "eta": eta,
        "duplicates": counts.duplicates,
        "resolved_failures": counts.resolved,
        "running": running,
        "interrupted": interrupted,
        "recent_failures": failures,
        "inbox_waiting": waiting,  # photos in the inbox the ledger does not know yet
        "inbox_missing": not cfg.inbox.is_dir(),  # an unplugged drive, a share not mounted
        "stale_downloads": [{"file": name, "unchanged_s": round(age)} for name, age in
                            stale_downloads(cfg.inbox, STALE_DOWNLOAD_SECONDS)] if cfg.inbox.is_dir() else [],
        "stray_sidecars": stray_sidecars(cfg.inbox, testhooks.stray_sidecar_seconds(STRAY_SIDECAR_SECONDS))
        if cfg.inbox.is_dir() else [],
        "outbox_missing": not cfg.outbox.is_dir(),
        "outbox_blocked": _outbox_blocked(cfg.outbox),  # full, read-only or not ours to write: photos wait
        "last_event_at": events.get("last_event", (None, None))[0],
        "last_rescan_at": events.get("last_rescan", (None, None))[0],
        "heartbeat": events.get("heartbeat", ({}, None))[0],
        "ledger_fault": fault,
        "reference_errors": events.get("reference_errors", ([], None))[0],
        "schema_version": schema_version,
        "ledger_read_only": read_only,
    } | extra


INBOX_LOOK_LIMIT = 10_000  # files looked at in the inbox per `status`: enough to say "10,000 or more"


def _outbox_blocked(outbox: Path) -> str | None:
    """Why the outbox cannot take reports now (the daemon's own check before each photo), or None."""
    try:
        outbox_room(outbox)
    except OutboxBlocked as exc:
        return str(exc)
    except OSError:  # not there: `outbox_missing` says so
        return None
    return None


STALE_DOWNLOAD_SECONDS = 3600.0  # a download or copy still unfinished after an hour has failed


def _inbox_waiting(cfg: Config, ledger: Ledger, now: float) -> dict[str, Any]:
    """Photos sitting in the inbox that are not queued: no daemon has taken them in yet (not running, the ledger
    locked or its disk full, a copy still arriving). Without this, a full inbox and an empty one both read
    "0 queued"."""
    if not cfg.inbox.is_dir():
        return {"count": 0, "more": False, "examples": [], "last_change_s": None}
    files, more = inbox_files(cfg.inbox, INBOX_LOOK_LIMIT)
    # A name that is not UTF-8 (Linux) is never in the ledger (the watcher leaves it, saying to rename it), and no
    # amount of waiting makes it "arriving": it is counted apart, each with the `mv` that fixes it.
    from ..references.indexer import not_utf8

    named: list[tuple[Path, os.stat_result]] = []
    unnamed: list[tuple[Path, os.stat_result]] = []
    for p, st in files:
        (named if _is_utf8(p) else unnamed).append((p, st))
    known = ledger.accounted_for([(p, st.st_size, st.st_mtime) for p, st in named]) if named else set()
    left = [(p, st) for p, st in named if str(p) not in known]
    newest = max((max(st.st_mtime, st.st_ctime) for _, st in left), default=None)
    return {"count": len(left), "more": more,
            "examples": [p.relative_to(cfg.inbox).as_posix() for p, _ in left[:5]],
            "last_change_s": None if newest is None else round(max(0.0, now - newest), 1),
            "not_utf8": len(unnamed), "rename": [not_utf8(cfg.inbox, p) for p, _ in unnamed[:3]]}


def _is_utf8(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _unnamed_line(w: dict[str, Any]) -> str | None:
    if not w or not w.get("not_utf8"):
        return None
    how = "; ".join(w["rename"]) + ("; …" if w["not_utf8"] > len(w["rename"]) else "")
    return f"Inbox:   {w['not_utf8']:,} file(s) left alone: {how}"


def _inbox_line(w: dict[str, Any], d: dict[str, Any], quiet_s: float) -> str | None:
    if not w or not w.get("count"):
        return None
    n = f"{w['count']:,}{' or more' if w.get('more') else ''}"
    shown = ", ".join(w["examples"][:3]) + (", …" if w["count"] > 3 else "")
    if not d["running"]:
        return f"Inbox:   {n} photo(s) not queued yet ({shown}): the daemon takes them in when it runs"
    if w["last_change_s"] is not None and w["last_change_s"] < max(60.0, 5 * quiet_s):
        return f"Inbox:   {n} photo(s) arriving ({shown}): each is queued once it has stopped changing"
    return (f"Inbox:   {n} photo(s) not queued ({shown}), though the daemon runs and they have not changed for "
            f"{_span(w['last_change_s'])}: the lines below or the daemon's log say why")


def _extra_sections(cfg: Config, ledger: Ledger) -> dict[str, Any]:
    """Sections later features add (training progress, references); empty until they exist."""
    events = ledger.events()
    out: dict[str, Any] = {}
    if "training" in events:
        out["training"] = _training_state(events["training"][0], cfg)
    out["adapters"] = _adapters(cfg)
    from .workers import worker_rows

    out["workers"] = worker_rows(ledger)
    out["shared_ledger"] = ledger.where if ledger.shared else None
    return out


def _adapters(cfg: Config) -> dict[str, dict[str, Any]]:
    """Each advisor's current adapter version as the lora mode finds it (a rollback since the last training, a
    `current` deleted or copied): what the last training's outcome alone does not say."""
    from ..model.adapter_store import AdapterStore, AdapterStoreError

    store = AdapterStore(cfg.adapters_dir)
    out: dict[str, dict[str, Any]] = {}
    try:
        for advisor in store.advisors():
            if store.versions(advisor):
                current = store.current(advisor)
                problem = store.current_problem(advisor)
                out[advisor] = {"current": current.name if current else None, "problem": problem,
                                "remedy": store.remedy(advisor) if problem else None}
    except (AdapterStoreError, OSError):  # an adapters folder that cannot be read: the lora fallback says why
        pass
    return out


def _adapters_line(adapters: dict[str, dict[str, Any]]) -> str | None:
    parts = []
    for advisor, a in sorted(adapters.items()):
        if a.get("problem"):
            parts.append(f"{advisor}: current points at {a['problem']} (its lora photos fall back; "
                         f"{a.get('remedy') or f'`{mondrian()} adapters rollback --advisor {advisor}` repairs it'})")
        elif a.get("current"):
            parts.append(f"{advisor} {a['current']}")
        else:
            parts.append(f"{advisor}: none promoted yet")
    return "Adapters: " + "; ".join(parts) if parts else None


def _training_state(t: Any, cfg: Config) -> Any:
    """The training event, marked `stopped` when it says running but the process that recorded it on this machine
    is gone (killed, crashed, or refused a setting before it began): it will never say otherwise by itself."""
    if not isinstance(t, dict) or t.get("state", "running") != "running":
        return t
    pid, host = t.get("recorder_pid"), t.get("host")
    if isinstance(pid, int) and host == socket.gethostname() and not pid_alive(pid):
        gone = f"the process that ran it (pid {pid}) is gone before it finished"
        kept = _kept_by(t, cfg) if t.get("phase") in ("promoting", "refusing") else None
        if kept is None:
            return {**t, "state": "stopped", "finished_at": None,
                    "reason": f"{gone}; nothing was promoted. `{mondrian()} train --advisor {t.get('advisor')}` runs "
                              f"it again"}
        # Killed as it recorded its result: the version was kept all the same, and `adapters` (or the daemon's
        # start) finishes a promotion cut short. "Nothing was promoted" contradicted `adapters`.
        version, promoted, current, since = kept
        if not promoted:
            what = f"{version} was kept without being promoted"
        elif current:
            what = f"{version} was promoted and is current"
        elif since:
            what = f"{version} was promoted, and {since} has been made current since"
        else:
            what = (f"{version} was promoted but not yet made current: `{mondrian()} adapters --advisor "
                    f"{t.get('advisor')}` (or the daemon's next start) finishes it")
        return {**t, "state": "stopped", "finished_at": None, "version": version, "reason": f"{gone}; {what}"}
    return t


def _kept_by(t: dict[str, Any], cfg: Config) -> tuple[str, bool, bool, str | None] | None:
    """The version a training that died while recording its result had committed (decided after it began), if
    any: its name, whether it was promoted, whether it is current, and the version made current since (a rollback,
    or a promotion the history records, which `adapters` will not undo), if any."""
    from ..model.adapter_store import AdapterStore, AdapterStoreError

    store = AdapterStore(cfg.adapters_dir)
    try:
        started, advisor = float(t.get("started_at") or 0), str(t.get("advisor"))
        ours = [v for v in store.versions(advisor) if float(v.decision.get("decided_at") or 0) >= started]
        if not ours:
            return None
        v, current = ours[-1], store.current(advisor)
        is_current = current is not None and current.name == v.name
        settled = v.rolled_back or any(v.name in (r.get("version"), r.get("from"), r.get("to"))
                                       for r in store.history(advisor))  # as finish_promotion reads it
        since = current.name if settled and not is_current and current is not None else None
        return v.name, v.promoted, is_current, since
    except (AdapterStoreError, OSError, TypeError, ValueError):
        return None


def _training_line(t: dict[str, Any]) -> str:
    """LoRA training (jobs/nightly.py writes the event): progress while it runs, the outcome after."""
    state = t.get("state", "running")
    if state != "running":
        version = f" {t.get('version')}" if t.get("version") else ""
        when = f" at {_clock(t.get('finished_at'))}" if t.get("finished_at") else ""
        return (f"Training: {t.get('advisor')}{version} {state}{when}"
                + (f" ({t.get('reason')})" if t.get("reason") else ""))
    line = f"Training: {t.get('advisor')} ({t.get('phase', 'running')})"
    if t.get("step") is not None and t.get("steps"):
        # Evaluating counts the test photos scored (jobs/train.py), not training steps.
        line += f" {'photo' if t.get('phase') == 'evaluating' else 'step'} {t.get('step')}/{t.get('steps')}"
    if isinstance(t.get("loss"), (int, float)):
        line += f" loss {t['loss']:.3f}"
    # The time left is the training steps' own: evaluating (and promoting) after the last step once read "about
    # 0 min 0 s left" for as long as it took (a record written by an earlier Mondrian still carries it).
    if isinstance(t.get("eta_s"), (int, float)) and t.get("phase", "training") == "training":
        line += f", about {int(t['eta_s'] // 60)} min {int(t['eta_s'] % 60)} s left"
    return line


def _clock(ts: float | None, short: bool = False) -> str:
    if not ts:
        return "never"
    when = datetime.fromtimestamp(ts)
    return when.strftime("%H:%M:%S" if short and when.date() == datetime.now().date() else "%Y-%m-%d %H:%M:%S")


def _span(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _eta_words(eta_s: float | None, typical: float | None, elapsed: float) -> str:
    if eta_s is None or typical is None:
        return ""
    # Only once it shows: "15 s so far, longer than the usual 15 s" (a batch's photos all finish about the usual
    # time, a fraction of a second either way) says the opposite of what is happening.
    if _span(elapsed) != _span(typical) and elapsed > typical:
        return f", longer than the usual {_span(typical)}"
    return f", about {_span(eta_s)} left" if eta_s >= 1 else ", about to finish"


def _interrupted_next(job: dict[str, Any], daemon_runs: bool) -> str:
    if job.get("owns_file", True):
        return "the daemon's next start queues it again"
    when = "at its next rescan" if daemon_runs else f"when it next starts (`{mondrian()} run`)"
    return (f"the daemon records it {when} (from its report if one was written, else as failed); the photo stays "
            f"where it is: run `{job.get('analyze_again') or mondrian() + ' analyze'}` again if it is not done")


def _service_serves(cfg: Config) -> bool:
    """Whether a launchd agent or systemd unit is installed for this home (then `service start` is the advice;
    else it would only answer "not installed")."""
    try:
        from ..service.install import bare_spec, installed_home

        return installed_home(bare_spec(home=cfg.home)) == cfg.home
    except Exception:  # an unknown platform, an unreadable file: no service to name
        return False


def _model(cfg: Config, recorded: dict[str, Any] | None, daemon: dict[str, Any]) -> dict[str, Any]:
    """The model a running daemon loaded; with none running, the one `run` would load now (a demo's home showed the
    smoke model its demo had used, while `run` there loads the configured one), and the one the last run used."""
    configured = {"id": cfg.model, "smoke": cfg.model == "smoke", "loaded": False}
    if not recorded:
        return configured
    if daemon.get("running"):
        return recorded
    was = recorded.get("configured")
    same = was == cfg.model if was is not None else bool(recorded.get("smoke")) == (cfg.model == "smoke")
    return recorded if same else {**configured, "last_run": recorded.get("id")}


def _daemon_line(d: dict[str, Any]) -> str:
    if not d["running"]:
        if d.get("service_installed"):
            return f"not running  — start it with `{mondrian()} service start` (or `{mondrian()} run`)"
        return (f"not running  — start it with `{mondrian()} run`, or at every login with "
                f"`{mondrian()} service install`")
    if not d.get("responding", True):
        restart = (f"`{mondrian()} service restart`" if d.get("service_installed") else
                   f"`kill {d['pid']}`, then start it again with `{mondrian()} run`")
        return (f"not responding (pid {d['pid']}; last heartbeat {d['last_heartbeat_s']:.0f} s ago, it beats every "
                f"{BEAT_SECONDS:.0f} s): stopped (`kill -STOP`, a debugger) or hung. `kill -CONT {d['pid']}` if it "
                f"was stopped, else restart it ({restart})")
    return f"running (pid {d['pid']})"


def render(info: dict[str, Any]) -> str:
    d = info["daemon"]
    c = info["counts"]
    m = info["model"]
    interrupted = info.get("interrupted", [])
    resolved = info.get("resolved_failures", 0)
    q = info.get("queue") or {"delayed": 0}
    delayed = info.get("delayed", [])
    eta = info.get("eta") or {}
    held = (f" ({q['delayed']} delayed after a fault, next try {_clock(delayed[0]['next_try_at'], short=True)})"
            if q["delayed"] else "")
    lines = [f"Mondrian home: {info['home']}",
             f"Daemon:  {_daemon_line(d)}",
             f"Model:   {m.get('id')}" + ("  (smoke model: scores are NOT meaningful)" if m.get("smoke") else "")
             + (f"  (what `run` loads now; the last run used {m['last_run']})" if m.get("last_run") else ""),
             f"Photos:  {c['queued']} queued{held} · {c['running'] - len(interrupted)} in progress"
             + (f" · {len(interrupted)} interrupted" if interrupted else "")
             + f" · {c['done']} done ({info['duplicates']} duplicates) · {c['failed']} failed"
             + (f" ({resolved} earlier failure(s) since put back and analysed)" if resolved else "")
             # Gone from where they were queued: deleted, or moved or renamed (then queued under the new name).
             + (f" · {c['gone']} left their place before analysis (moved, renamed or deleted)" if c.get("gone")
                else "")]
    waiting = info.get("inbox_waiting") or {}
    for inbox in (_inbox_line(waiting, d, info.get("quiet_seconds", 2.0)), _unnamed_line(waiting)):
        if inbox:
            lines.append(inbox)
    paused = "" if d.get("responding", True) else " (the daemon is not responding)"
    typical = eta.get("typical_photo_s")
    for r in info["running"]:
        lines.append(f"Now:     {r['file']} for {r['advisor']} ({r['mode'] or '…'}), {_span(r['elapsed_s'])} so far"
                     + _eta_words(r.get("eta_s"), typical, r["elapsed_s"]) + paused)
    if info.get("shared_ledger"):
        from .workers import worker_lines

        lines.append(f"Ledger:  shared, {info['shared_ledger']} (every machine's photos are counted above)")
        lines.extend(worker_lines(info.get("workers") or []))
    if not d["running"] and not info.get("shared_ledger") and q.get("queued"):
        # No daemon here: a time left would be a promise nothing keeps (a shared ledger's other Macs may work it).
        lines.append(f"Queue:   {q['queued']} photo(s) wait for the daemon; they are analysed once it runs")
    elif not d.get("responding", True) and not info.get("shared_ledger") and (q.get("queued") or info["running"]):
        # Stopped (kill -STOP, a debugger) or hung: nothing moves, so no time left is promised either.
        lines.append(f"Queue:   {q['queued'] + len(info['running'])} photo(s) wait for the daemon, which is not "
                     f"responding (above); they are analysed once it works again")
    elif typical is not None and (q.get("queued") or info["running"]):
        at_once = eta.get("photos_at_once") or 1
        pace = (f"a photo takes about {_span(typical)}" if at_once <= 1 else
                f"about {at_once:g} photos at a time, each about {_span(typical)}: one every "
                f"{eta.get('photo_every_s'):g} s")
        lines.append(f"Queue:   about {_span(eta['queue_s'])} left for {q['queued'] + len(info['running'])} photo(s) "
                     f"({pace}, from the last {eta['based_on_photos']})")
    for r in delayed[:SHOWN_DELAYED]:
        lines.append(f"Delayed: {r['file']}: try {r['attempts'] + 1} at {_clock(r['next_try_at'], short=True)}"
                     + (f" after: {r['reason']}" if r.get("reason") else ""))
    if len(delayed) > SHOWN_DELAYED:
        lines.append(f"Delayed: … and {len(delayed) - SHOWN_DELAYED} more")
    for r in interrupted:
        lines.append(f"Interrupted: {r['file']} (job {r['job_id']}): the process analysing it stopped before it "
                     f"finished; " + _interrupted_next(r, d["running"]))
    if info.get("training"):
        t = info["training"]
        lines.append(_training_line(t))
    adapters = _adapters_line(info.get("adapters") or {})
    if adapters:
        lines.append(adapters)
    lines.append(f"Watcher: last event {_clock(info['last_event_at'])} · last rescan {_clock(info['last_rescan_at'])}")
    for key, name, meanwhile in (("inbox_missing", "inbox", "photos dropped there are picked up once it is back"),
                                 ("outbox_missing", "outbox", "photos wait in the inbox until it is back")):
        if info.get(key):
            lines.append(f"{name.capitalize() + ':':<8} {info[name]} is not there (a drive or network share that is "
                         f"not connected?): {meanwhile}")
    if info.get("outbox_blocked"):
        lines.append(f"Outbox:  {info['outbox_blocked']} (photos wait in the inbox meanwhile)")
    for left in info.get("stale_downloads") or []:
        lines.append(f"Inbox:   {left['file']} has not changed for {_span(left['unchanged_s'])}: an unfinished "
                     f"download or copy, which Mondrian takes only once it is renamed to the photo's own name; "
                     f"download or copy the photo again, then delete this leftover")
    for name in info.get("stray_sidecars") or []:
        if name.lower().endswith(LIVE_PHOTO_VIDEO):
            lines.append(f"Video:   inbox/{name} has no photo beside it: Mondrian critiques photos, and a video rides "
                         f"along only with its Live Photo's still (same name); it stays here: move it elsewhere")
            continue
        lines.append(f"Sidecar: inbox/{name} has no photo beside it, so nothing uses it (it came after its photo "
                     f"was taken in, or its photo was removed): to have a photo analysed with it, drop the photo "
                     f"again together with it; otherwise delete it")
    if info.get("ledger_read_only"):
        lines.append("Ledger:  this user cannot write it (a read-only disk or folder, or another account's), so a copy "
                     "of it was read: as Mondrian last wrote it")
    fault = info.get("ledger_fault")
    if fault:
        lines.append(f"Ledger:  cannot be written since {_clock(fault.get('since'))}: {fault.get('reason')} — "
                     f"the daemon waits and carries on by itself once it can write again (see its log)")
    if info.get("reference_errors"):
        lines.append("References skipped:")
        for e in info["reference_errors"]:
            lines.append(f"  {e.get('advisor')}: {e.get('file')}: {e.get('reason')}")
    if info["recent_failures"]:
        lines.append("Recent failures:")
        for f in info["recent_failures"]:
            rec = f" → {Path(f['record']).relative_to(info['outbox']) if f['record'] and Path(f['record']).is_relative_to(info['outbox']) else f['record']}"
            lines.append(f"  {f['file']}: {f['reason']}{rec if f['record'] else ''}"
                         + (f" ({f['note']})" if f.get("note") else ""))
            if f.get("next_step"):
                lines.append(f"    next: {f['next_step']}")
    lines.append(f"Reports: {Path(info['outbox']) / 'index.html'}")
    return "\n".join(shown(line) for line in lines)  # one line each: a name cannot forge a line or send escapes


CLEAR_SCREEN = "\x1b[H\x1b[2J"  # cursor home, clear: each snapshot replaces the last one on a terminal


def watch(cfg: Config, every_s: float, as_json: bool, out: TextIO = sys.stdout) -> int:
    """`status --watch`: a snapshot every `every_s` seconds until Ctrl-C. On a terminal each one replaces the
    last; into a pipe or a file they follow one another (text: a dated rule between them; --json: one object a
    line), so a log of them can be read back."""
    in_place = out.isatty() and not as_json
    # Ctrl-C (or a TERM) only asks the loop to end after the snapshot in hand: a KeyboardInterrupt raised at an
    # arbitrary point (inside a ledger query, between a lock's acquire and its release) once left the process
    # unable to exit.
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.is_set():
            info = collect(cfg)
            if as_json:
                out.write(json.dumps(info, default=str) + "\n")
            elif in_place:
                out.write(CLEAR_SCREEN + render(info) + f"\n\n(every {every_s:g} s; Ctrl-C to stop)\n")
            else:
                out.write(f"--- {datetime.now():%Y-%m-%d %H:%M:%S} ---\n{render(info)}\n")
            out.flush()
            stop.wait(every_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if in_place:
        out.write("\n")
    return 0
