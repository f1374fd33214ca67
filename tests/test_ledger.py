"""The ledger on real SQLite files: atomic claims across processes, intake rules, schema versioning."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from daemon.ledger import DONE, QUEUED, RUNNING, SCHEMA_VERSION, Ledger

CLAIMER = textwrap.dedent("""
    import json, sys, time
    from daemon.ledger import Ledger
    ledger = Ledger(sys.argv[1])
    got = []
    while True:
        job = ledger.claim()
        if job is None:
            break
        got.append(job.id)
        ledger.finish(job.id, effective_mode="baseline", fallbacks=[], report_json="r.json",
                      report_html="r.html", grade=5, adapter=None, analysis_s=0.0, output_dir="o")
    print(json.dumps(got))
""")


def test_concurrent_claims_never_hand_out_a_job_twice(tmp_path):
    db = tmp_path / "ledger.db"
    ledger = Ledger(db)
    for i in range(300):
        ledger.enqueue(tmp_path / f"p{i}.jpg", f"p{i}.jpg", "ansel", "default", 1, 1.0)
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(db)], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    claimed = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    flat = [j for c in claimed for j in c]
    print(f"claims per worker: {[len(c) for c in claimed]}")
    assert sorted(flat) == list(range(1, 301)), "every job claimed exactly once"
    assert sum(1 for c in claimed if c) >= 2, "the work was actually shared"
    assert ledger.counts().by_state[DONE] == 300
    assert ledger.integrity_check() == "ok"


def test_claim_order_attempts_and_backoff(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    a = ledger.enqueue(tmp_path / "a.jpg", "a.jpg", "ansel", "default", 1, 1.0)
    b = ledger.enqueue(tmp_path / "b.jpg", "b.jpg", "ansel", "default", 1, 1.0)
    assert ledger.enqueue(tmp_path / "a.jpg", "a.jpg", "ansel", "default", 1, 1.0) is None, "same path, active"
    job = ledger.claim()
    assert (job.id, job.state, job.attempts) == (a.id, RUNNING, 1)
    ledger.retry_later(job.id, "disk full", delay_s=60)
    assert ledger.claim().id == b.id, "a job in backoff is not due"
    assert ledger.claim() is None
    assert 59 < ledger.next_due_in() <= 60
    assert ledger.get(a.id).state == QUEUED and ledger.get(a.id).error == "disk full"


def test_orphaned_running_jobs_are_those_of_dead_workers(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    ledger.enqueue(tmp_path / "a.jpg", "a.jpg", "ansel", "default", 1, 1.0)
    ledger.enqueue(tmp_path / "b.jpg", "b.jpg", "ansel", "default", 1, 1.0)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    mine = ledger.claim()
    theirs = ledger.claim(worker=f"{socket.gethostname()}:{dead.stdout.strip()}")
    assert [j.id for j in ledger.orphaned_running()] == [theirs.id]
    assert mine.id != theirs.id


def test_schema_is_versioned_and_refuses_a_newer_ledger(tmp_path):
    db = tmp_path / "l.db"
    Ledger(db).close()
    Ledger(db).close()  # reopening migrates nothing twice
    con = sqlite3.connect(db)
    versions = [r[0] for r in con.execute("select version from schema_version order by version")]
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    assert con.execute("pragma journal_mode").fetchone()[0] == "wal"
    con.execute("insert into schema_version(version, applied_at) values (?, 0)", (SCHEMA_VERSION + 1,))
    con.commit()
    con.close()
    with pytest.raises(RuntimeError, match="newer Mondrian"):
        Ledger(db)


def test_two_ledgers_keep_their_own_databases(tmp_path):
    a = Ledger(tmp_path / "a.db")
    a.enqueue(tmp_path / "one.jpg", "one.jpg", "ansel", "default", 1, 1.0)
    b = Ledger(tmp_path / "b.db")
    assert a.counts().by_state[QUEUED] == 1, "opening a second ledger must not move the first onto its file"
    assert b.counts().by_state[QUEUED] == 0
    b.enqueue(tmp_path / "two.jpg", "two.jpg", "ansel", "default", 1, 1.0)
    b.enqueue(tmp_path / "three.jpg", "three.jpg", "ansel", "default", 1, 1.0)
    assert [j.rel_path for j in a.jobs()] == ["one.jpg"]
    assert [j.rel_path for j in b.jobs()] == ["two.jpg", "three.jpg"]
    assert a.claim().rel_path == "one.jpg" and a.claim() is None
    assert b.counts().by_state[QUEUED] == 2


def test_a_ledger_from_before_analysis_contexts_is_migrated_and_its_reports_are_not_duplicates(tmp_path):
    """Schema 3 (no context key, no kept photos): the migration adds both; its reports, whose context was never
    recorded, are nobody's duplicate (a photo dropped again is analysed once more and links them)."""
    db = tmp_path / "l.db"
    Ledger(db).close()
    con = sqlite3.connect(db)
    con.executescript('DROP INDEX job_context_key; DROP INDEX job_source_path; ALTER TABLE job DROP COLUMN context_key;'
                      'ALTER TABLE job DROP COLUMN kept; DROP INDEX job_embedded_sha256;'
                      'ALTER TABLE job DROP COLUMN embedded_sha256; DELETE FROM schema_version WHERE version > 3;')
    con.execute("INSERT INTO job (source_path, rel_path, advisor, advisor_source, state, attempts, not_before, sha256,"
                " enqueued_at, owns_file) VALUES ('/in/a.jpg', 'a.jpg', 'ansel', 'default', 'done', 1, 0, 'ab', 1, 1)")
    con.commit()
    con.close()
    ledger = Ledger(db)
    assert ledger.schema_version() == SCHEMA_VERSION
    [old] = ledger.jobs()
    assert old.context_key is None and old.kept is False and old.embedded_sha256 is None
    assert ledger.original_sha("ab") is None
    assert ledger.find_done("k" * 64, exclude=0) is None
    assert [j.id for j in ledger.earlier_reports("ab", exclude=0)] == [old.id]
    indexes = {r[1] for r in ledger.db.execute_sql('PRAGMA index_list("job")').fetchall()}
    assert {"job_context_key", "job_source_path", "job_embedded_sha256"} <= indexes
    # a kept photo is done while it is unchanged; edited (another size or mtime) it is new work
    job = ledger.enqueue(tmp_path / "k.jpg", "k.jpg", "ansel", "default", 10, 5.0, kept=True)
    assert ledger.kept_in_place(tmp_path / "k.jpg", 10, 5.0) is None  # queued, not done yet
    ledger.claim()
    ledger.finish(job.id, effective_mode="baseline", fallbacks=[], report_json=tmp_path / "r.json",
                  report_html=tmp_path / "r.html", grade=5, adapter=None, analysis_s=1.0, output_dir=tmp_path / "r",
                  context_key="c" * 64)
    assert ledger.kept_in_place(tmp_path / "k.jpg", 10, 5.0).id == job.id
    assert ledger.kept_in_place(tmp_path / "k.jpg", 11, 5.0) is None
    assert ledger.kept_in_place(tmp_path / "k.jpg", 10, 6.0) is None
    assert ledger.find_done("c" * 64, exclude=0).id == job.id and ledger.find_done("c" * 64, exclude=job.id) is None
    ledger.close()


def test_a_card_of_photos_is_queued_in_one_transaction(tmp_path) -> None:
    """Issue 11 item 10: the files that settle in one poll reach the ledger together (`enqueue_many`: one commit,
    not one per photo), with the same refusals as one at a time; a batch that fails is queued file by file."""
    import time

    from daemon.intake.watcher import InboxWatcher
    from tests.harness import photo

    inbox = tmp_path / "inbox"
    for i in range(5):
        photo(inbox / f"card/IMG_{i}.jpg", seed=i)
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.enqueue(inbox / "card/IMG_0.jpg", "card/IMG_0.jpg", "ansel", "default", 1, 1.0)  # already queued
    calls: list[list[str]] = []

    def many(paths: list[Path]) -> None:
        calls.append(sorted(p.name for p in paths))
        jobs = ledger.enqueue_many([(p, p.name, "ansel", "default", 1, 1.0, None) for p in paths])
        assert all(j is not None for j in jobs)

    one_by_one: list[str] = []
    watcher = InboxWatcher(inbox, lambda p: one_by_one.append(p.name), 0.0, is_known=ledger.is_active,
                           on_stable_many=many)
    watcher.rescan()
    time.sleep(0.05)
    assert watcher.poll() == 5
    assert calls == [["IMG_1.jpg", "IMG_2.jpg", "IMG_3.jpg", "IMG_4.jpg"]] and one_by_one == []
    assert ledger.enqueue_many([(inbox / "card/IMG_1.jpg", "x", "ansel", "default", 1, 1.0, None)]) == [None]

    def broken(paths: list[Path]) -> None:
        raise OSError("disk hiccup")

    for i in range(5, 7):
        photo(inbox / f"card/IMG_{i}.jpg", seed=i)
    watcher.on_stable_many = broken
    watcher.rescan()
    time.sleep(0.05)
    watcher.poll()
    assert sorted(one_by_one) == ["IMG_5.jpg", "IMG_6.jpg"]


def test_a_ledger_outside_the_home_is_not_rebased_by_each_home_that_opens_it(tmp_path: Path) -> None:
    """`db_path` may name a file outside the home, which two homes can both name: opening it from the other home must
    not rewrite the first one's paths (only a ledger inside its home moves with it). It is refused, saying so: a
    second home's daemon on it took the first home's photos (tests/test_config_and_status.py)."""
    from daemon.ledger import LedgerUnavailable
    from daemon.config import load_config

    shared = tmp_path / "ledgers" / "one.db"
    homes = [tmp_path / name for name in ("a", "b")]
    for home in homes:
        (home / "inbox").mkdir(parents=True)
        (home / "mondrian.toml").write_text(f'db_path = "{shared}"\n')
    a, b = (load_config(home, env={}) for home in homes)
    ledger = Ledger.for_config(a)
    src = a.inbox / "x.jpg"
    ledger.enqueue(src, "x.jpg", "ansel", "default", 1, 1.0)
    ledger.close()
    for cfg in (b, a, b):
        if cfg is b:
            with pytest.raises(LedgerUnavailable, match="two homes cannot share one ledger"):
                Ledger.for_config(cfg)
        else:
            Ledger.for_config(cfg).close()
    [job] = Ledger(shared).jobs()
    assert job.source_path == str(src)

    inside = load_config(tmp_path / "c", env={})  # the default: inside its home, recorded, followed when moved
    (inside.inbox).mkdir(parents=True)
    ledger = Ledger.for_config(inside)
    ledger.enqueue(inside.inbox / "y.jpg", "y.jpg", "ansel", "default", 1, 1.0)
    ledger.close()
    (tmp_path / "c").rename(tmp_path / "d")
    moved = load_config(tmp_path / "d", env={})
    ledger = Ledger.for_config(moved)
    [job] = ledger.jobs()
    ledger.close()
    assert job.source_path == str(moved.inbox / "y.jpg")


def test_a_damaged_open_ledger_is_never_written_back_as_if_whole(tmp_path):
    """Truncated in place and its -wal gone: `replaced()` sees the lost log and the daemon would write back what
    the open connection holds. A copy of a damaged database is no rescue: it is refused, and the file stays."""
    import os

    from peewee import DatabaseError

    db = tmp_path / "ledger.db"
    ledger = Ledger(db)
    for i in range(400):
        ledger.enqueue(tmp_path / f"{i}-{'x' * 200}.jpg", f"{i}.jpg", "ansel", "default", 1, 1.0)
    ledger.db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    ledger.db.execute_sql("PRAGMA cache_size = 1")  # what a long-running daemon no longer holds in memory
    ledger.db.execute_sql("PRAGMA shrink_memory")
    with open(db, "r+b") as fh:
        fh.truncate(8192)  # the first pages only: the rest cut off by another program
    os.unlink(f"{db}-wal")
    assert ledger.replaced() is not None
    with pytest.raises(DatabaseError, match="damaged too"):
        ledger.rescue()
    assert db.stat().st_size == 8192 and not list(tmp_path.glob(".ledger.db.rescue*"))


def test_clearing_a_failure_leaves_a_job_that_moved_on_alone(tmp_path):
    """`retry --failed` lists the failures, then clears those whose photo is gone; a failure put back in the queue
    meanwhile (by another retry, or the photo dropped in again) must not be cleared as gone."""
    ledger = Ledger(tmp_path / "ledger.db")
    job = ledger.enqueue(tmp_path / "inbox" / "a.jpg", "a.jpg", "ansel", "default", 1, 1.0)
    assert ledger.claim().id == job.id
    ledger.fail(job.id, "undecodable", None)
    listed = ledger.get(job.id)
    ledger.requeue_failed(job.id, tmp_path / "inbox" / "a.jpg")
    assert ledger.mark_gone(listed.id, "not there when retry looked", was="failed") is False
    assert ledger.get(job.id).state == QUEUED
    assert ledger.claim().id == job.id
    ledger.fail(job.id, "undecodable again", None)
    assert ledger.mark_gone(job.id, "not there when retry looked", was="failed") is True
    assert ledger.get(job.id).state == "gone"
