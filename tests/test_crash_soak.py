"""Issue 3, promise 1: crash safety. The real daemon over 100 photos (more when it empties the inbox before the
soak is over), SIGKILLed at least 20 times and restarted each time, then run to the end. Afterwards every photo
has exactly one report or one failure (or duplicate) record, every report is complete and schema-valid, the
ledger passes `PRAGMA integrity_check`, no original is lost or left twice. Prints
`photos=N kills=K lost=0 duplicates=0`.

Half of the kills come from outside at random moments (start-up and recovery, claiming, analysing, publishing).
The other half land in the narrow windows of publishing that a random kill rarely hits, with the worker's
test-only `MONDRIAN_TEST_CRASH_AT=<point>[:n]`, which makes the daemon SIGKILL itself there: after the report is
staged, after its folder name is reserved, after the rename into place, after the original is moved, after a
failure or duplicate record is written and after its original is moved. Every one of those windows is hit.

The soak is sized by what it must prove, not by how fast the machine is: it ends when it has killed the daemon
MIN_KILLS times and hit every window; whenever the daemon has emptied the inbox before that (a fast machine),
or no photo of the kind a window needs is left, more photos are dropped in (more each time a kill finds the
daemon idle). Kills of an idle daemon are not counted.
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
from daemon.pipeline.report import SCHEMA_PATH
from daemon.pipeline.xmp import sidecar_name
from tests.harness import Daemon, make_home, photo, wait_for

SCHEMA = json.loads(SCHEMA_PATH.read_text())
# max_attempts is raised because a job interrupted by a kill is claimed first after the restart, so a run of
# random kills tends to land on the same photo, and 4 in a row would (rightly) set it aside as a poison photo.
FAST = dict(max_pixels=56 * 56, comment_max_chars=8, max_tokens=400, quiet_seconds=0.2, rescan_seconds=2,
            retry_base_seconds=0.2, max_attempts=12)
# Each publishing window and the kind of photo that reaches it: one analysed, refused, or a duplicate.
CRASH_POINTS = {"claimed": "any", "staged": "analysed", "reserved": "analysed", "renamed": "analysed",
                "moved": "analysed", "fail_recorded": "refused", "fail_moved": "refused",
                "dup_recorded": "duplicate", "dup_moved": "duplicate"}
FIRST_INBOX = dict(unique=35, duplicate=40, bad=30)
# Dropped in whenever the inbox runs out before the soak is over; doubled each time a random kill finds the
# daemon idle (a machine fast enough to finish the inbox between two kills).
REFILL = dict(unique=4, duplicate=4, bad=3)
MIN_KILLS = 20
# Only against a soak that can never end (a window that is never reached): it needs ~2 * MIN_KILLS rounds.
MAX_ROUNDS = 20 * MIN_KILLS
REPORT_FILES = {"report.json", "report.html", "preview.jpg", "thumb.jpg"}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Inbox:
    """The photos dropped into the inbox so far, by name, and what kind of outcome each one is headed for."""

    def __init__(self, inbox: Path, tmp: Path) -> None:
        self.inbox, self.tmp = inbox, tmp
        self.photos: dict[str, bytes] = {}
        self.uniques: list[bytes] = []
        self.bad: set[str] = set()
        self.batches = 0
        self.rng = random.Random(3)

    def drop(self, unique: int, duplicate: int, bad: int) -> None:
        tag = "" if self.batches == 0 else f"more{self.batches} "
        self.batches += 1
        batch: dict[str, bytes] = {}
        new: list[bytes] = []
        for i in range(unique):
            seed = 100 + len(self.uniques)
            data = photo(self.tmp / f"u{seed}.jpg", seed=seed, size=(64, 48)).read_bytes()
            self.uniques.append(data)
            new.append(data)
            batch[f"{tag}photo {i:03d}.jpg"] = data
        # The same bytes under another name: one report, one duplicate record. Each new photo gets a copy, so
        # whichever of the two is analysed first, its twin is still waiting: a report published but not yet
        # recorded as done when the daemon is killed ("renamed", "moved") must be finished first after the
        # restart, or the twin is analysed a second time.
        for i in range(duplicate):
            batch[f"{tag}copy {i:03d}.jpg"] = new[i] if i < len(new) else \
                self.uniques[self.rng.randrange(len(self.uniques))]
        for i in range(bad):  # refused at once: one failure record each
            seed = 5000 + len(self.bad)
            good = photo(self.tmp / f"b{seed}.jpg", seed=seed, size=(64, 48)).read_bytes()
            name = f"{tag}broken {i:03d}.jpg"
            batch[name] = good[: len(good) // 2] if i % 2 else b"not a photo %d" % seed
            self.bad.add(name)
        for name, data in batch.items():
            (self.inbox / name).write_bytes(data)
        self.photos.update(batch)

    def waiting(self) -> set[str]:
        """What each photo still in the inbox can reach when it is processed: its crash points' kinds."""
        left = {p.name for p in self.inbox.iterdir() if p.name in self.photos}
        if not left:
            return set()
        twins = collections.Counter(self.photos.values())
        kinds = {"any"}
        for name in left:
            data = self.photos[name]
            if name in self.bad:
                kinds.add("refused")
            elif twins[data] > 1:
                kinds.add("duplicate")  # this one, or its twin, becomes a duplicate record
            if name not in self.bad and all(n in left for n, d in self.photos.items() if d == data):
                kinds.add("analysed")  # none of its copies was analysed yet
        return kinds


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
    box = _Inbox(inbox, tmp_path)
    box.drop(**FIRST_INBOX)
    rng = random.Random(20260325)
    kills: collections.Counter[str] = collections.Counter()
    started = time.monotonic()

    refill = dict(REFILL)
    missing = list(CRASH_POINTS)  # windows not hit yet
    rng.shuffle(missing)
    round_no = 0
    # Killing a daemon that has nothing left to do proves nothing: those kills are not counted.
    while sum(v for k, v in kills.items() if k != "outside:idle") < MIN_KILLS or missing:
        round_no += 1
        assert round_no <= MAX_ROUNDS, f"after {MAX_ROUNDS} rounds these windows were never hit: {missing}"
        if round_no % 2 == 0 and missing:
            point = missing[-1]
            if CRASH_POINTS[point] not in box.waiting():
                box.drop(**refill)
            nth = rng.randint(1, 2) if point in ("claimed", "staged") else 1
            with Daemon(home, smoke_model_path, MONDRIAN_TEST_CRASH_AT=f"{point}:{nth}") as d:
                # It kills itself when the worker reaches the point; or it finishes the inbox without reaching
                # it (the photo it needed was taken by an earlier round): then more photos, and again.
                wait_for(lambda: d.proc.poll() is not None or _all_terminal(db, len(box.photos)), 600,
                         what=f"the daemon to reach {point} or finish the inbox")
                if d.proc.poll() is None:
                    d.kill()
                    kills["outside:idle"] += 1
                else:
                    assert d.proc.returncode == -signal.SIGKILL, d.output()[-3000:]
                    kills[f"self:{point}"] += 1
                    missing.remove(point)
        else:
            if not box.waiting():  # nothing left to interrupt
                box.drop(**refill)
            with Daemon(home, smoke_model_path) as d:
                if rng.random() < 0.25:  # during start-up and recovery
                    time.sleep(rng.uniform(0.5, 6.0))
                else:  # while it works: claiming, analysing, writing the report, moving the original
                    wait_for(lambda: "model ready" in d.output() or d.proc.poll() is not None, 120,
                             interval=0.05, what="model ready")
                    time.sleep(rng.uniform(0.0, 2.5))
                assert d.proc.poll() is None, "the daemon died by itself:\n" + d.output()[-3000:]
                idle = _all_terminal(db, len(box.photos))
                d.proc.send_signal(signal.SIGKILL)
                d.wait()
                if idle:  # this machine finished the inbox before the kill: give it more work next time
                    kills["outside:idle"] += 1
                    refill = {kind: 2 * n for kind, n in refill.items()}
                else:
                    kills["outside:random"] += 1
    n_kills = sum(kills.values())
    photos = box.photos
    assert {k.split(":", 1)[1] for k in kills if k.startswith("self:")} == set(CRASH_POINTS)

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
        assert job.state == "done" and job.duplicate_of is None, (name, job.state, job.duplicate_of)
        own = Path(job.output_dir)
        assert own == folder, f"{name}: a second report, {folder.name}/ (its own is {own.name}/)"
        assert report["job_id"] == job.id
        # The XMP sidecar is staged with the report: no report is ever published without it.
        assert set(p.name for p in folder.iterdir()) == REPORT_FILES | {name, sidecar_name(name)}, \
            sorted(folder.iterdir())
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
                                 if p.is_file() and p.name not in REPORT_FILES and not p.name.endswith((".json", ".xmp"))
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
