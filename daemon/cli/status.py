"""`mondrian status`: what is happening, for a person (text) or a script (--json)."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

from ..config import Config
from ..fsutil import lock_holder
from ..ledger import FAULT_NOTE, FaultNote, Ledger
from .terminal import shown


def daemon_pid(cfg: Config) -> int | None:
    """The pid holding the home's lock, i.e. a live daemon (-1 if it wrote none); None if nobody holds it."""
    return lock_holder(cfg.var_dir / "daemon.lock")


def collect(cfg: Config) -> dict[str, Any]:
    ledger = Ledger(cfg.db_path)
    counts = ledger.counts()
    events = ledger.events()
    now = time.time()
    running = [{"job_id": j.id, "file": j.rel_path, "advisor": j.advisor, "mode": j.requested_mode,
                "started_at": j.started_at, "elapsed_s": round(now - (j.started_at or now), 1)}
               for j in ledger.running()]
    failures = [{"job_id": j.id, "file": j.rel_path, "reason": j.error, "kind": j.error_kind,
                 "failed_at": j.finished_at, "record": f"{j.output_dir}.error.json" if j.output_dir else None}
                for j in ledger.recent_failures()]
    model = events.get("model", (None, None))[0]
    pid = daemon_pid(cfg)
    fault = FaultNote.read(cfg.var_dir / FAULT_NOTE)
    if fault is not None and (pid is None or fault.get("pid") != pid):
        fault = None  # left by a daemon that has stopped since
    return {
        "home": str(cfg.home),
        "inbox": str(cfg.inbox),
        "outbox": str(cfg.outbox),
        "daemon": {"running": pid is not None, "pid": pid},
        "model": model or {"id": cfg.model, "smoke": cfg.model == "smoke", "loaded": False},
        "default_advisor": cfg.default_advisor,
        "default_mode": cfg.default_mode,
        "counts": counts.by_state,
        "duplicates": counts.duplicates,
        "running": running,
        "recent_failures": failures,
        "last_event_at": events.get("last_event", (None, None))[0],
        "last_rescan_at": events.get("last_rescan", (None, None))[0],
        "heartbeat": events.get("heartbeat", ({}, None))[0],
        "ledger_fault": fault,
        "reference_errors": events.get("reference_errors", ([], None))[0],
        "schema_version": ledger.schema_version(),
    } | _extra_sections(cfg, ledger)


def _extra_sections(cfg: Config, ledger: Ledger) -> dict[str, Any]:
    """Sections later features add (training progress, references); empty until they exist."""
    events = ledger.events()
    out: dict[str, Any] = {}
    if "training" in events:
        out["training"] = events["training"][0]
    return out


def _training_line(t: dict[str, Any]) -> str:
    """LoRA training (jobs/nightly.py writes the event): progress while it runs, the outcome after."""
    state = t.get("state", "running")
    if state != "running":
        version = f" {t.get('version')}" if t.get("version") else ""
        return (f"Training: {t.get('advisor')}{version} {state} at {_clock(t.get('finished_at'))}"
                + (f" ({t.get('reason')})" if t.get("reason") else ""))
    line = f"Training: {t.get('advisor')} ({t.get('phase', 'running')})"
    if t.get("step") is not None and t.get("steps"):
        line += f" step {t.get('step')}/{t.get('steps')}"
    if isinstance(t.get("loss"), (int, float)):
        line += f" loss {t['loss']:.3f}"
    if isinstance(t.get("eta_s"), (int, float)):
        line += f", about {int(t['eta_s'] // 60)} min {int(t['eta_s'] % 60)} s left"
    return line


def _clock(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "never"


def render(info: dict[str, Any]) -> str:
    d = info["daemon"]
    c = info["counts"]
    m = info["model"]
    lines = [f"Mondrian home: {info['home']}",
             f"Daemon:  {'running (pid %s)' % d['pid'] if d['running'] else 'not running'}"
             + ("" if d["running"] else "  — start it with `mondrian run` or `mondrian service start`"),
             f"Model:   {m.get('id')}" + ("  (smoke model: scores are NOT meaningful)" if m.get("smoke") else ""),
             f"Photos:  {c['queued']} queued · {c['running']} in progress · {c['done']} done"
             f" ({info['duplicates']} duplicates) · {c['failed']} failed"
             + (f" · {c['gone']} removed before analysis" if c.get("gone") else "")]
    for r in info["running"]:
        lines.append(f"Now:     {r['file']} for {r['advisor']} ({r['mode'] or '…'}), {r['elapsed_s']:.0f} s so far")
    if info.get("training"):
        t = info["training"]
        lines.append(_training_line(t))
    lines.append(f"Watcher: last event {_clock(info['last_event_at'])} · last rescan {_clock(info['last_rescan_at'])}")
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
            lines.append(f"  {f['file']}: {f['reason']}{rec if f['record'] else ''}")
    lines.append(f"Reports: {Path(info['outbox']) / 'index.html'}")
    return "\n".join(shown(line) for line in lines)  # one line each: a name cannot forge a line or send escapes
