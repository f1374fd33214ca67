"""Issue 3, promise 1: crash safety. The real daemon over 100 photos, SIGKILLed at least 20 times and restarted
each time, then run to the end. Afterwards every photo has exactly one report or one failure (or duplicate)
record, every report is complete and schema-valid, the ledger passes `PRAGMA integrity_check`, no original is
lost or left twice. Prints `photos=N kills=K lost=0 duplicates=0`.

Half of the kills come from outside at random moments (start-up and recovery, claiming, analysing, publishing).
The other half land in the narrow windows of publishing that a random kill rarely hits, with the worker's
test-only `MONDRIAN_TEST_CRASH_AT=<point>[:n]`, which makes the daemon SIGKILL itself there: after the report is
staged, after its folder name is reserved, after the rename into place, after the original is moved, after a
failure or duplicate record is written and after its original is moved.
"""

from __future__ import annotations

import collections
import hashlib
import json
import random
import signal
import time
from pathlib import Path

import jsonschema

from daemon.ledger import Ledger
from daemon.report import SCHEMA_PATH
from tests.harness import Daemon, make_home, photo, wait_for

SCHEMA = json.loads(SCHEMA_PATH.read_text())
# max_attempts is raised because a job interrupted by a kill is claimed first after the restart, so a run of
# random kills tends to land on the same photo, and 4 in a row would (rightly) set it aside as a poison photo.
FAST = dict(max_pixels=56 * 56, comment_max_chars=8, max_tokens=400, quiet_seconds=0.2, rescan_seconds=2,
            retry_base_seconds=0.2, max_attempts=12)
CRASH_POINTS = ["claimed", "staged", "reserved", "renamed", "moved", "fail_recorded", "fail_moved",
                "dup_recorded", "dup_moved"]
N_UNIQUE, N_DUPLICATE, N_BAD = 40, 30, 30
MIN_KILLS = 20
REPORT_FILES = {"report.json", "report.html", "preview.jpg", "thumb.jpg"}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _make_photos(inbox: Path, tmp: Path) -> dict[str, bytes]:
    rng = random.Random(3)
    photos: dict[str, bytes] = {}
    uniques = []
    for i in range(N_UNIQUE):
        data = photo(tmp / f"u{i}.jpg", seed=100 + i, size=(64, 48)).read_bytes()
        uniques.append(data)
        photos[f"photo {i:03d}.jpg"] = data
    for i in range(N_DUPLICATE):  # the same bytes under another name: one report, one duplicate record
        photos[f"copy {i:03d}.jpg"] = uniques[rng.randrange(N_UNIQUE)]
    for i in range(N_BAD):  # refused at once: one failure record each
        good = photo(tmp / f"b{i}.jpg", seed=500 + i, size=(64, 48)).read_bytes()
        photos[f"broken {i:03d}.jpg"] = good[: len(good) // 2] if i % 2 else b"not a photo %d" % i
    for name, data in photos.items():
        (inbox / name).write_bytes(data)
    return photos


def _all_terminal(db: Path, n: int) -> bool:
    if not db.exists():
        return False
    ledger = Ledger(db)
    try:
        c = ledger.counts().by_state
    finally:
        ledger.close()
    return c["queued"] == 0 and c["running"] == 0 and c["done"] + c["failed"] + c["gone"] >= n


def test_sigkill_soak_loses_nothing_and_does_nothing_twice(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    inbox, outbox, db = home / "inbox", home / "outbox", home / "var" / "ledger.db"
    photos = _make_photos(inbox, tmp_path)
    rng = random.Random(20260325)
    kills: collections.Counter[str] = collections.Counter()
    started = time.monotonic()

    points = list(CRASH_POINTS)
    rng.shuffle(points)
    retried: set[str] = set()
    round_no = 0
    while sum(kills.values()) < MIN_KILLS and not _all_terminal(db, len(photos)):
        round_no += 1
        if round_no % 2 == 0 and points:
            point = points.pop()
            nth = rng.randint(1, 2) if point in ("claimed", "staged") else 1  # rarer points: the first time
            with Daemon(home, smoke_model_path, MONDRIAN_TEST_CRASH_AT=f"{point}:{nth}") as d:
                try:
                    d.proc.wait(timeout=20)  # it kills itself when the worker reaches the point
                    assert d.proc.returncode == -signal.SIGKILL, d.output()[-3000:]
                    kills[f"self:{point}"] += 1
                except Exception:  # the point was not reached in time (e.g. no failure left to record)
                    d.kill()
                    kills["outside:late"] += 1
                    if point not in retried:  # try it once more later
                        retried.add(point)
                        points.insert(0, point)
        else:
            with Daemon(home, smoke_model_path) as d:
                if rng.random() < 0.25:  # during start-up and recovery
                    time.sleep(rng.uniform(0.5, 6.0))
                else:  # while it works: claiming, analysing, writing the report, moving the original
                    wait_for(lambda: "model ready" in d.output() or d.proc.poll() is not None, 60,
                             interval=0.05, what="model ready")
                    time.sleep(rng.uniform(0.0, 2.5))
                assert d.proc.poll() is None, "the daemon died by itself:\n" + d.output()[-3000:]
                d.proc.send_signal(signal.SIGKILL)
                d.wait()
                kills["outside:random"] += 1
    n_kills = sum(kills.values())
    assert n_kills >= MIN_KILLS, f"the inbox emptied after only {n_kills} kills: make the soak bigger"
    hit = {k.split(":", 1)[1] for k in kills if k.startswith("self:")}
    assert len(hit) >= len(CRASH_POINTS) - 2, f"only these publishing windows were hit: {sorted(hit)}"

    # Then let it finish in peace.
    with Daemon(home, smoke_model_path, "--once") as d:
        assert d.wait(400) == 0, d.output()[-4000:]
        last_log = d.output()
    elapsed = time.monotonic() - started
    assert "Traceback" not in last_log, last_log[-4000:]

    # -- the ledger: one row per photo, each terminal; the database intact ---------------------------------
    ledger = Ledger(db)
    assert ledger.integrity_check() == "ok"
    rows = collections.defaultdict(list)
    for job in ledger.jobs():
        rows[job.rel_path].append(job)
    assert set(rows) == set(photos), set(rows) ^ set(photos)
    assert all(len(v) == 1 for v in rows.values()), {k: len(v) for k, v in rows.items() if len(v) > 1}
    states = collections.Counter(v[0].state for v in rows.values())
    assert set(states) <= {"done", "failed"}, states

    # -- the outbox: exactly one record per photo; every report complete and valid -------------------------
    records: dict[str, list[str]] = collections.defaultdict(list)
    analysed: collections.Counter[str] = collections.Counter()
    for rj in outbox.glob("*/report.json"):
        folder = rj.parent
        report = json.loads(rj.read_text())
        jsonschema.validate(report, SCHEMA)
        name = report["photo"]["file"]
        records[name].append(f"report {folder.name}")
        analysed[report["photo"]["sha256"]] += 1
        job = rows[name][0]
        assert job.state == "done" and job.duplicate_of is None and Path(job.output_dir) == folder
        assert report["job_id"] == job.id
        assert set(p.name for p in folder.iterdir()) == REPORT_FILES | {name}, sorted(folder.iterdir())
        assert (folder / name).read_bytes() == photos[name]
        assert report["photo"]["sha256"] == _sha(photos[name])
    for ej in (outbox / "failed").glob("*.error.json"):
        record = json.loads(ej.read_text())
        records[record["file"]].append(f"failure {ej.name}")
        kept = Path(str(ej).removesuffix(".error.json"))
        assert kept.read_bytes() == photos[record["file"]], f"original of {record['file']} not kept"
        assert rows[record["file"]][0].state == "failed" and rows[record["file"]][0].error == record["reason"]
    for dj in (outbox / "duplicates").glob("*.duplicate.json"):
        record = json.loads(dj.read_text())
        records[record["file"]].append(f"duplicate {dj.name}")
        kept = Path(str(dj).removesuffix(".duplicate.json"))
        assert kept.read_bytes() == photos[record["file"]]
        assert rows[record["file"]][0].duplicate_of == record["duplicate_of_job"]

    lost = [n for n in photos if not records.get(n)]
    twice = {n: r for n, r in records.items() if len(r) > 1}
    twice.update({f"sha {h[:12]}": ["analysed"] * k for h, k in analysed.items() if k > 1})
    # every original exists exactly once (beside its report, in failed/ or in duplicates/), none in the inbox
    copies = collections.Counter(_sha(p.read_bytes()) for p in outbox.rglob("*")
                                 if p.is_file() and p.name not in REPORT_FILES and not p.name.endswith(".json")
                                 and p.name != "index.html")
    for name, data in photos.items():
        want = sum(1 for d in photos.values() if d == data)
        assert copies[_sha(data)] == want, f"{name}: {copies[_sha(data)]} copies of its bytes, want {want}"
    left = [p for p in inbox.rglob("*") if p.is_file()]
    staging = list((outbox / ".staging").iterdir())
    strays = [p.name for p in outbox.iterdir()
              if p.name not in {"failed", "duplicates", ".staging", "index.html"} and not (p / "report.json").exists()]
    temp_files = [str(p) for p in outbox.rglob("*") if p.name.endswith((".tmp", ".moving"))]
    assert not left and not staging and not strays and not temp_files, (left, staging, strays, temp_files)
    assert {len(v) for v in rows.values()} == {1}

    print(f"\ncrash soak: photos={len(photos)} kills={n_kills} lost={len(lost)} duplicates={len(twice)} "
          f"reports={states['done'] - sum(1 for v in rows.values() if v[0].duplicate_of)} "
          f"duplicate_records={sum(1 for v in rows.values() if v[0].duplicate_of)} failed={states['failed']} "
          f"elapsed={elapsed:.0f}s")
    print("  kills by moment: " + ", ".join(f"{k}={v}" for k, v in sorted(kills.items())))
    assert not lost, lost
    assert not twice, twice
