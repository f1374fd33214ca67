"""`claims`: the shared ledger's queue under several workers (issue 15). A throw-away PostgreSQL server of its own
(tests/pgserver.py: initdb in a temporary folder, a unix socket) unless `--ledger-url` names one, and a SQLite file.

  claims_per_s_<engine>_<n>      photos claimed and finished per second (first claim to last finish) by n worker
                                 processes (1, 4, 16) over
                                 JOBS queued photos, each "analysed" by the null model: a fixed sleep
                                 (`--null-model SECONDS`, default 0.01), nothing else. Each worker runs the ledger's
                                 own protocol: `claim` (FOR UPDATE SKIP LOCKED on PostgreSQL), lease renewal by its
                                 heartbeat, `finish` checked against its fencing token
  claim_p99_ms_<engine>_<n>      99th percentile of one `claim` call's latency over all the workers' claims
  photos_per_min_postgres_<n>    end to end: n `mondrian run` daemons (the smoke model) on one shared inbox and
                                 outbox through PostgreSQL, PHOTOS small photos dropped in at once, from the drop
                                 until every photo's report is published (model loading excluded: the daemons
                                 are up and beating before the drop)

The null model is this benchmark's only: the daemon has no such switch, so no setting can make it skip analysis.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from . import emit, note

ACCEPTS_ARGS = True
JOBS = 1600
WORKERS = (1, 4, 16)
NODES = (1, 2, 3)
PHOTOS = 24
REPO = Path(__file__).resolve().parent.parent


def worker(url: str | None, db: str, null_s: float, out: str) -> None:
    """One worker process: claim, sleep (the null model), finish, until the queue is empty."""
    from daemon.ledger import Ledger
    from daemon.pipeline.heartbeat import Heartbeat

    stop = threading.Event()
    ledger = Ledger(Path(db), url=url or None, lease_seconds=30.0, stop=stop)
    beat = Heartbeat(ledger, stop, lambda: None)
    beat.start()
    latencies = []
    first = time.time()
    while True:
        t = time.perf_counter()
        job = ledger.claim()
        latencies.append(time.perf_counter() - t)
        if job is None:
            break
        time.sleep(null_s)
        ledger.finish(job.id, effective_mode="null", fallbacks=[], report_json=Path("r.json"),
                      report_html=Path("r.html"), grade=0, adapter=None, analysis_s=null_s, output_dir=Path("o"))
    last = time.time()
    stop.set()
    beat.retire()
    # The last claim found the queue empty; the span leaves out the interpreter's start-up.
    Path(out).write_text(json.dumps({"latencies": latencies[:-1], "first": first, "last": last}))


def _claims(engine: str, url: str | None, tmp: Path, n: int, null_s: float) -> tuple[float, float]:
    from daemon.ledger import Ledger

    db = tmp / f"{engine}-{n}.db"
    ledger = Ledger(db, url=url)
    inbox = tmp / "inbox"
    for lo in range(0, JOBS, 500):
        ledger.enqueue_many([(inbox / f"{engine}{n}-{i}.jpg", f"{i}.jpg", "ansel", "default", 1, 1.0, None)
                             for i in range(lo, min(lo + 500, JOBS))])
    outs = [tmp / f"lat-{engine}-{n}-{i}.json" for i in range(n)]
    procs = [subprocess.Popen([sys.executable, "-m", "bench.claims", "--worker", url or "", str(db), str(null_s),
                               str(out)], cwd=REPO) for out in outs]
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError(f"a claims worker failed ({p.returncode})")
    runs = [json.loads(out.read_text()) for out in outs]
    wall = max(r["last"] for r in runs) - min(r["first"] for r in runs)  # first claim to last finish, any worker
    latencies = sorted(x for r in runs for x in r["latencies"])
    done = sum(j.state == "done" for j in ledger.jobs())
    ledger.close()
    if done != JOBS or len(latencies) != JOBS:
        raise RuntimeError(f"{engine} x{n}: {done} done, {len(latencies)} claims for {JOBS} jobs")
    return JOBS / wall, statistics.quantiles(latencies, n=100)[98] * 1e3


def _end_to_end(pg: Any, tmp: Path, nodes: int) -> float:
    from daemon.ledger import Ledger
    from daemon.model.smoke import ensure_smoke_model
    from tests.harness import Daemon, make_home, photo, wait_for

    model = ensure_smoke_model(tmp / "smoke")
    url = pg.new_database()
    share = tmp / f"share{nodes}"
    inbox, outbox = share / "inbox", share / "outbox"
    inbox.mkdir(parents=True)
    homes = [make_home(tmp / f"e2e{nodes}-{i}", model, inbox=str(inbox), outbox=str(outbox), ledger_url=url,
                       quiet_seconds=0.2, rescan_seconds=1) for i in range(nodes)]
    camera = tmp / f"camera{nodes}"
    for i in range(PHOTOS):
        photo(camera / f"p{i:03d}.jpg", seed=9000 + i, size=(160, 120))
    ledger = Ledger(homes[0] / "var" / "ledger.db", url=url)
    daemons = [Daemon(h, model) for h in homes]
    try:
        wait_for(lambda: len(ledger.workers()) == nodes and all(
            "model ready" in d.output() for d in daemons), timeout=300, what="daemons up")
        started = time.perf_counter()
        for p in sorted(camera.iterdir()):
            p.rename(inbox / p.name)
        wait_for(lambda: sum(j.state == "done" for j in ledger.jobs()) == PHOTOS, timeout=1200, interval=0.2,
                 what="every photo done")
        return PHOTOS / (time.perf_counter() - started) * 60
    finally:
        for d in daemons:
            d.stop()
        ledger.close()


def run(size: str, argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench claims")
    p.add_argument("--null-model", type=float, default=0.01, metavar="SECONDS",
                   help="what the null model's analysis of one photo takes (a sleep)")
    p.add_argument("--ledger-url", help="a PostgreSQL server to measure (default: a throw-away one of its own)")
    p.add_argument("--no-end-to-end", action="store_true", help="only the claims figures")
    args = p.parse_args(argv or [])
    from tests.pgserver import PgServer, pg_bin_dir

    figures: dict[str, Any] = {"null_model_s": emit("null_model_s", args.null_model), "jobs": emit("jobs", JOBS)}
    server = None
    if not args.ledger_url:
        bin_dir = pg_bin_dir()
        if bin_dir is None:
            raise SystemExit("bench claims: PostgreSQL is not installed (initdb not found): "
                             "`bash tests/system_deps.sh` installs it, or pass --ledger-url")
        server = PgServer(bin_dir)
        server.start()
    try:
        with tempfile.TemporaryDirectory(prefix="mondrian-bench-claims-") as tmp_s:
            tmp = Path(tmp_s)
            for engine in ("postgres", "sqlite"):
                for n in WORKERS:
                    url = None if engine == "sqlite" else (server.new_database() if server else args.ledger_url)
                    rate, p99 = _claims(engine, url, tmp, n, args.null_model)
                    figures[f"claims_per_s_{engine}_{n}"] = emit(f"claims_per_s_{engine}_{n}", round(rate, 1))
                    figures[f"claim_p99_ms_{engine}_{n}"] = emit(f"claim_p99_ms_{engine}_{n}", round(p99, 2))
            if not args.no_end_to_end and server is not None:
                figures["photos"] = emit("photos", PHOTOS)
                for nodes in NODES:
                    note(f"claims: end to end with {nodes} smoke daemon(s)")
                    rate = _end_to_end(server, tmp, nodes)
                    figures[f"photos_per_min_postgres_{nodes}"] = emit(f"photos_per_min_postgres_{nodes}",
                                                                      round(rate, 1))
    finally:
        if server is not None:
            server.stop()
    return figures


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:4], float(sys.argv[4]), sys.argv[5])
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        print(run("smoke", sys.argv[1:]))
