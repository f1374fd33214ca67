"""`mondrian workers` (and the workers block of `mondrian status`): every process that runs jobs on this ledger, as
its heartbeat last wrote it. With a shared ledger that is every node of the studio; a worker whose heartbeat stopped
for longer than its lease is lost, and its photo goes back to the queue (daemon/pipeline/heartbeat.py)."""

from __future__ import annotations

import json
from typing import Any

from ..config import Config
from ..ledger import RUNNING, Ledger
from ..hints import mondrian


def worker_rows(ledger: Ledger, now: float | None = None) -> list[dict[str, Any]]:
    now = ledger.clock() if now is None else now  # the beats were stamped by the ledger's clock (the server's)
    rows = []
    for w in ledger.workers():
        job = ledger.Job.get_or_none(ledger.Job.id == w.job_id) if w.job_id is not None else None
        up_s = max(now - w.started_at, 1.0)
        beat_age = now - w.beat_at
        renewed = job.lease_until - w.lease_seconds if job is not None and job.lease_until else None
        # A lost worker's photo is still its own only while the job runs under its name: finished or taken over
        # since, "its photo returns to the queue" was a promise about nothing.
        holds = job is not None and job.state == RUNNING and job.worker == w.id
        rows.append({"worker": w.id, "host": w.host, "pid": w.pid, "job_id": w.job_id, "photo": w.photo,
                     "holds_photo": holds,
                     "on_photo_s": round(now - w.claimed_at, 1) if w.claimed_at else None,
                     "lease_age_s": round(now - renewed, 1) if renewed is not None else None,
                     "last_beat_s": round(beat_age, 1), "lease_s": w.lease_seconds, "done": w.done,
                     "photos_per_hour": round(w.done * 3600 / up_s, 1), "up_s": round(up_s, 1),
                     "lost": beat_age > w.lease_seconds,
                     # two beats missed (one comes every third of a lease): stalled (SIGSTOP, a Mac asleep), or hung
                     "silent": w.lease_seconds * 2 / 3 + 1 < beat_age <= w.lease_seconds})
    return rows


def worker_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line a worker, for a person."""
    if not rows:
        return [f"Workers: none running on this ledger (a daemon that stopped leaves it; start one with "
                f"`{mondrian()} run`)"]
    lines = [f"Workers: {sum(not r['lost'] for r in rows)} alive" +
             (f" ({sum(r['silent'] for r in rows)} silent)" if any(r["silent"] for r in rows) else "") +
             (f", {sum(r['lost'] for r in rows)} lost" if any(r["lost"] for r in rows) else "")]
    for r in rows:
        what = (f"{r['photo']} for {r['on_photo_s']:.0f} s (lease renewed {r['lease_age_s']:.0f} s ago)"
                if r["photo"] and r["lease_age_s"] is not None else r["photo"] or "idle")
        lost = f"LOST: no heartbeat for {r['last_beat_s']:.0f} s; "
        state = (what if not r["lost"] else
                 lost + "its photo returns to the queue when its lease ends" if r["holds_photo"] else
                 lost + f"its last photo ({r['photo']}) was finished or taken over since" if r["photo"] else
                 lost + "it held no photo")
        if r.get("silent"):
            state += (f" · SILENT: no heartbeat for {r['last_beat_s']:.0f} s (stopped, asleep or hung?); lost if it "
                      f"stays silent past its {r['lease_s']:.0f} s lease")
        lines.append(f"  {r['host']} pid {r['pid']}: {state} · {r['done']} done, {r['photos_per_hour']:g} photos/hour")
    return lines


def list_workers(cfg: Config, as_json: bool) -> str:
    ledger = Ledger.for_config(cfg)
    try:
        rows = worker_rows(ledger)
    finally:
        ledger.close()
    return json.dumps({"ledger": ledger.where, "workers": rows}, indent=2) if as_json else "\n".join(
        [f"Ledger:  {ledger.where}", *worker_lines(rows)])
