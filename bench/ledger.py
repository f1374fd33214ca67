"""`ledger`: the ledger at 100,000 photos (issue 11, item 10). No model.

A real ledger file on this disk, filled through `Ledger`'s own methods as the daemon would: every photo
queued, claimed and finished (1 in 100 failed, 1 in 50 a duplicate), the last 1,000 still queued.

  enqueue_per_s        photos queued per second the way the daemon queues a card (`Ledger.enqueue_many`: the
                       files that settled in one poll, one transaction, each with its duplicate checks), filling
                       the ledger to ~98,000 jobs in batches of 500
  enqueue_one_per_s    one file at a time (`Ledger.enqueue`, a transaction each: a single photo dropped in),
                       over the last 2,000 queued into the ledger already holding ~98,000 jobs
  status_ms_100k       `mondrian status --json`'s own work at 100,000 jobs (`cli.status.collect`), median of 5
  status_cli_ms        the whole `mondrian status --json` command, a fresh process (interpreter start included)
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import emit, note

JOBS = 100_000
TAIL = 2_000  # timed one by one at the end
BATCH = 500


def measure() -> dict[str, Any]:
    from daemon.cli.status import collect
    from daemon.config import PROJECT_ROOT, load_config
    from daemon.ledger import Ledger

    figures: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        figures[key] = emit(key, value)

    with tempfile.TemporaryDirectory(prefix="mondrian-bench-ledger-") as tmp:
        home = Path(tmp)
        cfg = load_config(home, env={})
        cfg.ensure_dirs()
        ledger = Ledger(cfg.db_path)
        inbox = cfg.inbox

        def item(i: int) -> tuple[Path, str, str, str, int, float, float]:
            name = f"shoot-{i // 400:03d}/IMG_{i:06d}.jpg"
            return inbox / name, name, "ansel", "default", 4_000_000 + i, 1.7e9 + i, 1.7e9 + i

        started = time.perf_counter()
        head = JOBS - TAIL
        for lo in range(0, head, BATCH):
            ledger.enqueue_many([item(i) for i in range(lo, min(lo + BATCH, head))])
        batch_s = time.perf_counter() - started
        note(f"ledger: {head} queued in batches in {batch_s:.1f} s; finishing them")
        # Through the worker's own calls: claim, then done / failed / duplicate. Done in one transaction per
        # thousand (the worker does one per photo; only the resulting rows matter here).
        finished = 0
        first_done = None
        while finished < head - 1_000:
            with ledger.db.atomic():
                for _ in range(1_000):
                    job = ledger.claim()
                    if job is None:
                        break
                    n = job.id
                    if n % 100 == 0:
                        ledger.fail(job.id, "the photo is damaged: export it again", None)
                    elif n % 50 == 0 and first_done is not None:
                        ledger.finish_duplicate(job.id, first_done, inbox)
                    else:
                        ledger.finish(job.id, effective_mode="baseline", fallbacks=[], report_json=inbox / "r.json",
                                      report_html=inbox / "r.html", grade=7, adapter=None, analysis_s=1.0,
                                      output_dir=inbox)
                        first_done = first_done or ledger.get(job.id)
                    finished += 1
        t, c = time.perf_counter(), time.process_time()
        for i in range(head, JOBS):
            ledger.enqueue(*item(i))
        one_s, one_cpu = time.perf_counter() - t, time.process_time() - c
        ledger.close()
        put("jobs", JOBS)
        put("enqueue_per_s", round(head / batch_s))
        put("enqueue_one_per_s", round(TAIL / one_s))
        put("enqueue_one_cpu_share", round(one_cpu / one_s, 2))  # below 1: the machine was busy (wall counts)
        times, cpu = [], []
        for _ in range(5):
            t, c = time.perf_counter(), time.process_time()
            out = collect(cfg)
            times.append((time.perf_counter() - t) * 1e3)
            cpu.append((time.process_time() - c) * 1e3)
        put("status_ms_100k", round(statistics.median(times), 1))
        put("status_cpu_ms_100k", round(statistics.median(cpu), 1))
        put("status_counts", ",".join(f"{k}:{v}" for k, v in out["counts"].items()))
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "daemon", "status", "--json"], cwd=PROJECT_ROOT,
                              env={**os.environ, "MONDRIAN_HOME": str(home)}, capture_output=True, text=True)
        put("status_cli_ms", round((time.perf_counter() - t) * 1e3, 1))
        if proc.returncode != 0:
            note(f"mondrian status failed: {proc.stderr[-500:]}")
    return figures


def run(size: str) -> dict[str, Any]:
    return measure()
