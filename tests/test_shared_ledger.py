"""The ledger's leases, fencing tokens and unique active jobs, on both engines: the SQLite file and a real PostgreSQL
server (tests/pgserver.py). Two Ledger objects on one database stand for two worker processes."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.config import ConfigError, load_config
from daemon.ledger import DONE, QUEUED, RUNNING, LeaseLost, Ledger


def two(tmp_path: Path, url: str | None, lease: float = 60.0) -> tuple[Ledger, Ledger]:
    db = tmp_path / "ledger.db"
    return (Ledger(db, url=url, lease_seconds=lease), Ledger(db, url=url, lease_seconds=lease))


def queue(ledger: Ledger, tmp_path: Path, name: str = "a.jpg") -> int:
    job = ledger.enqueue(tmp_path / "inbox" / name, name, "ansel", "default", 10, 1.0)
    assert job is not None
    return job.id


def test_a_stale_claim_cannot_finish_fail_or_publish(tmp_path: Path, ledger_url: str | None) -> None:
    a, b = two(tmp_path, ledger_url, lease=1.0)
    job_id = queue(a, tmp_path)
    first = a.claim()
    assert first is not None and first.lease_token == 1
    a.set_hash(job_id, "ab")  # while the claim is current, its writes go through
    # a stalls past its lease: b puts the job back and takes it, with the next token.
    assert [j.id for j in b.requeue_expired(now=time.time() + 2)] == [job_id]
    second = b.claim()
    assert second is not None and second.id == job_id and second.lease_token == 2
    for write in (lambda: a.reserve_output(job_id, tmp_path / "outbox" / "a"),
                  lambda: a.finish(job_id, effective_mode="baseline", fallbacks=[], report_json=tmp_path / "r.json",
                                   report_html=tmp_path / "r.html", grade=5, adapter=None, analysis_s=1.0,
                                   output_dir=tmp_path / "outbox" / "a")):
        with pytest.raises(LeaseLost, match="another worker"):
            write()
    with pytest.raises(LeaseLost):  # refused once, refused always: never a write of a claim found stale
        a.fail(job_id, "boom", None)
    a.requeue(job_id, "stopping")  # giving back a job it no longer holds changes nothing
    assert b.get(job_id).state == RUNNING and b.get(job_id).worker == b.worker_id()
    assert any(k.startswith(f"refused:{job_id}:1") for k in b.events())
    b.finish(job_id, effective_mode="baseline", fallbacks=[], report_json=tmp_path / "r.json",
             report_html=tmp_path / "r.html", grade=7, adapter=None, analysis_s=1.0, output_dir=tmp_path / "o")
    assert b.get(job_id).state == DONE and b.get(job_id).grade == 7


def test_the_workers_table_shows_a_claim_and_its_end_without_waiting_for_a_beat(tmp_path: Path,
                                                                                ledger_url: str | None) -> None:
    """`mondrian workers` showed a node as idle for up to a third of a lease after it claimed a photo (its row was
    written only by the heartbeat), and a finished photo as still in hand."""
    a, b = two(tmp_path, ledger_url)
    a.beat()
    first, second = queue(a, tmp_path, "one.jpg"), queue(a, tmp_path, "two.jpg")
    assert a.claim().id == first
    row = next(w for w in b.workers() if w.id == a.worker_id())
    assert (row.job_id, row.photo, row.done) == (first, "one.jpg", 0)
    a.finish(first, effective_mode="baseline", fallbacks=[], report_json=tmp_path / "r.json",
             report_html=tmp_path / "r.html", grade=5, adapter=None, analysis_s=1.0, output_dir=tmp_path / "o")
    row = next(w for w in b.workers() if w.id == a.worker_id())
    assert (row.job_id, row.photo, row.done) == (None, None, 1)
    assert b.claim().id == second
    assert [w.id for w in b.workers() if w.job_id is not None] == [], "a worker without a row gets none from a claim"


def test_a_lease_that_ends_puts_the_job_back_and_a_renewed_one_does_not(tmp_path: Path,
                                                                        ledger_url: str | None) -> None:
    a, b = two(tmp_path, ledger_url, lease=30.0)
    stalled, alive = queue(a, tmp_path, "s.jpg"), queue(a, tmp_path, "l.jpg")
    assert a.claim().id == stalled and b.claim().id == alive
    later = time.time() + 20
    b.renew_leases(now=later)  # b's heartbeat beats; a's does not
    expired = a.requeue_expired(now=later + 15)
    assert [j.id for j in expired] == [], "a requeues neither its own job (lease ended) nor b's (renewed)"
    requeued = b.requeue_expired(now=later + 15)
    assert [j.id for j in requeued] == [stalled]
    job = b.get(stalled)
    assert job.state == QUEUED and job.worker is None and job.lease_until is None
    assert b.get(alive).state == RUNNING
    assert b.orphaned_running() == []  # nothing else is orphaned: b's own lease is current


def test_one_active_job_per_inbox_file(tmp_path: Path, ledger_url: str | None) -> None:
    """The engine refuses a second waiting or running job of one file, even when the check before the insert
    passed on both sides (two nodes scanning one inbox at the same moment)."""
    a, b = two(tmp_path, ledger_url)
    src = tmp_path / "inbox" / "a.jpg"
    # Both nodes' reads find no job; both insert. Forced here by skipping the read on b.
    assert a.enqueue(src, "a.jpg", "ansel", "default", 1, 1.0) is not None
    rows = list(b.Job.insert(source_path=str(src), rel_path="a.jpg", advisor="ansel", advisor_source="default",
                             enqueued_at=time.time()).on_conflict_ignore().returning(b.Job).execute())
    assert rows == []
    assert b.enqueue(src, "a.jpg", "ansel", "default", 1, 1.0) is None
    assert b.enqueue_many([(src, "a.jpg", "ansel", "default", 1, 1.0, None),
                           (tmp_path / "inbox" / "b.jpg", "b.jpg", "ansel", "default", 1, 1.0, None)])[0] is None
    assert len([j for j in a.jobs() if j.source_path == str(src)]) == 1
    # Many threads (each its own connection) queueing the same files at once: one job per file, no error.
    errors: list[BaseException] = []

    def scan() -> None:
        try:
            led = Ledger(tmp_path / "ledger.db", url=ledger_url)
            led.enqueue_many([(tmp_path / "inbox" / f"c{i}.jpg", f"c{i}.jpg", "ansel", "default", 1, 1.0, None)
                              for i in range(20)])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=scan) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    paths = [j.source_path for j in a.jobs()]
    assert len(paths) == len(set(paths)) == 22


def test_claims_from_many_workers_never_share_a_job(tmp_path: Path, ledger_url: str | None) -> None:
    a = Ledger(tmp_path / "ledger.db", url=ledger_url)
    a.enqueue_many([(tmp_path / "inbox" / f"{i}.jpg", f"{i}.jpg", "ansel", "default", 1, 1.0, None)
                    for i in range(40)])
    got: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        led = Ledger(tmp_path / "ledger.db", url=ledger_url, stop=threading.Event())
        while (job := led.claim()) is not None:
            with lock:
                got.append(job.id)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(j.id for j in a.jobs())


def test_a_shared_ledger_needs_inbox_and_outbox_on_one_filesystem(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a second filesystem (/dev/shm)")
    other = Path(__import__("tempfile").mkdtemp(dir=shm))
    try:
        (tmp_path / "mondrian.toml").write_text(f'inbox = "{other}"\nledger_url = "postgresql://x@/y"\n')
        cfg = load_config(tmp_path, env={})
        cfg.ensure_dirs()
        with pytest.raises(ConfigError, match="different filesystems.*same share"):
            cfg.check_shared_storage()
        (tmp_path / "mondrian.toml").write_text(f'inbox = "{other}"\n')  # one machine: allowed, as before
        load_config(tmp_path, env={}).check_shared_storage()
    finally:
        __import__("shutil").rmtree(other, ignore_errors=True)


def test_ledger_url_must_be_postgresql(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PostgreSQL URL"):
        load_config(tmp_path, env={"MONDRIAN_LEDGER_URL": "mysql://x"})
    assert load_config(tmp_path, env={"MONDRIAN_LEDGER_URL": "postgresql://u@h/db"}).shared


def test_training_takes_turns_across_nodes_on_a_shared_ledger(tmp_path: Path, pg_server: Any) -> None:
    from jobs.nightly import NightlyTrainer

    url = pg_server.new_database()
    (tmp_path / "mondrian.toml").write_text(f'ledger_url = "{url}"\n')
    cfg = load_config(tmp_path, env={})
    cfg.ensure_dirs()
    a, b = Ledger.for_config(cfg), Ledger.for_config(cfg)
    night = NightlyTrainer(cfg, b, train_fn=lambda advisor: None)
    with a.training_turn() as mine:
        assert mine
        with b.training_turn() as theirs:
            assert not theirs
        assert night.run_check() == [] and night.runs == 0  # another node trains: this one leaves it
    night.run_check()
    assert night.runs == 1  # its turn once the other is done
    with b.training_turn() as again:
        assert again  # released after the check



def test_an_older_ledger_with_two_waiting_jobs_of_one_file_still_opens(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "l.db"
    Ledger(db).close()
    con = sqlite3.connect(db)
    con.executescript('DROP INDEX job_active_source; DROP TABLE worker; DELETE FROM schema_version WHERE version > 5;')
    for _ in range(2):
        con.execute("INSERT INTO job (source_path, rel_path, advisor, advisor_source, state, attempts, not_before, "
                    "enqueued_at, owns_file, kept) VALUES ('/in/a.jpg', 'a.jpg', 'ansel', 'default', 'queued', 0, 0, "
                    "1, 1, 0)")
    con.commit()
    con.close()
    ledger = Ledger(db)
    assert [j.state for j in ledger.jobs()] == ["queued", "gone"]
    assert ledger.enqueue(Path("/in/a.jpg"), "a.jpg", "ansel", "default", 1, 1.0) is None


def test_a_report_renamed_in_by_a_worker_that_lost_the_job_is_adopted_not_doubled(tmp_path: Path,
                                                                                    pg_server: Any) -> None:
    """The window after the last check: worker A passed its check (the reservation), stalled, lost the job, and
    renamed its report into the reserved folder while B was analysing the photo again. B adopts that report."""
    import json

    from daemon.pipeline.outbox_index import OutboxIndex
    from daemon.pipeline.publish import Publisher
    from tests.harness import photo

    url = pg_server.new_database()
    (tmp_path / "mondrian.toml").write_text(f'ledger_url = "{url}"\nlease_seconds = 1\n')
    cfg = load_config(tmp_path, env={})
    cfg.ensure_dirs()
    src = photo(cfg.inbox / "a.jpg", seed=3)
    a, b = Ledger.for_config(cfg), Ledger.for_config(cfg)
    job_id = a.enqueue(src, "a.jpg", "ansel", "default", src.stat().st_size, src.stat().st_mtime).id
    assert a.claim().id == job_id
    folder = cfg.outbox / "a"
    a.reserve_output(job_id, folder)  # A's last check passes; A stalls here
    b.requeue_expired(now=time.time() + 5)
    again = b.claim()
    assert again.id == job_id and again.output_dir == str(folder)
    folder.mkdir()  # A wakes and renames its report in
    report = {"job_id": job_id, "photo": {"file": "a.jpg"}, "mode": {"effective": "baseline", "fallbacks": []},
              "overall_grade": 6, "model": {"adapter": None}, "timings": {"analysis_s": 1.0}}
    (folder / "report.json").write_text(json.dumps(report))
    staging = cfg.staging_dir / "job-1.2"
    staging.mkdir()
    publisher = Publisher(cfg, b, OutboxIndex(cfg, b))
    assert publisher._adopt(again, staging, keep_original=False)
    job = b.get(job_id)
    assert (job.state, job.output_dir, job.grade) == (DONE, str(folder), 6)
    assert (folder / "a.jpg").exists() and not src.exists() and not staging.exists()
    assert sorted(p.name for p in cfg.outbox.iterdir() if not p.name.startswith(".")) == ["a", "failed",
                                                                                          "index.html"]
    with pytest.raises(LeaseLost):  # and A's own finishing write is refused
        a.finish(job_id, effective_mode="baseline", fallbacks=[], report_json=folder / "report.json",
                 report_html=folder / "report.html", grade=1, adapter=None, analysis_s=1.0, output_dir=folder)


def test_a_worker_that_missed_two_beats_is_shown_silent_before_it_is_lost(tmp_path: Path,
                                                                          ledger_url: str | None) -> None:
    """A SIGSTOPped daemon (or a Mac asleep) read as alive and busy in `mondrian workers` for a whole lease."""
    from daemon.cli.workers import worker_lines, worker_rows

    a, b = two(tmp_path, ledger_url)
    a.beat()
    beat_at = next(w for w in b.workers() if w.id == a.worker_id()).beat_at
    for after, silent, lost in ((10, False, False), (45, True, False), (61, False, True)):
        row = next(r for r in worker_rows(b, now=beat_at + after) if r["worker"] == a.worker_id())
        assert (row["silent"], row["lost"]) == (silent, lost), after
    shown = "\n".join(worker_lines(worker_rows(b, now=beat_at + 45)))
    assert "(1 silent)" in shown and "SILENT: no heartbeat for 45 s" in shown and "60 s lease" in shown, shown


def test_a_photo_put_back_is_new_work_when_the_servers_clock_runs_ahead(tmp_path: Path) -> None:
    """A file's ctime is this machine's clock and a failure's `finished_at` the database server's: with the server
    five minutes ahead, a photo put back from failed/ (as its record says) seemed to have come back before it failed,
    and stayed in the inbox for good. The ctime is put on the ledger's clock first."""
    import glob

    from tests.pgserver import PgServer, pg_bin_dir

    pytest.importorskip("psycopg", reason="pip install 'psycopg[binary]' (the postgres extra) for shared-ledger tests")
    faketime = (glob.glob("/usr/lib/*/faketime/libfaketime.so.1") or [None])[0]
    if faketime is None or pg_bin_dir() is None:
        pytest.skip("needs libfaketime and PostgreSQL (`bash tests/system_deps.sh` installs them)")
    server = PgServer(pg_bin_dir(), LD_PRELOAD=faketime, FAKETIME="+300s", DONT_FAKE_MONOTONIC="1")
    server.start()
    try:
        ledger = Ledger(tmp_path / "ledger.db", url=server.new_database())
        assert ledger.clock() - time.time() > 250  # the server's clock is ahead indeed
        inbox, failed = tmp_path / "inbox", tmp_path / "failed"
        inbox.mkdir()
        failed.mkdir()
        src = inbox / "bad.jpg"
        src.write_bytes(b"not a photo")
        st = src.stat()
        job = ledger.enqueue(src, "bad.jpg", "ansel", "default", st.st_size, st.st_mtime, st.st_ctime)
        assert job is not None and ledger.claim() is not None
        ledger.fail(job.id, "not a photo", failed / "bad.jpg")
        # Never left the inbox (its outbox could not be written): not queued again on every rescan.
        assert ledger.failed_in_place(src, st.st_size, st.st_mtime, st.st_ctime) is not None
        assert ledger.enqueue(src, "bad.jpg", "ansel", "default", st.st_size, st.st_mtime, st.st_ctime) is None
        time.sleep(0.05)
        src.rename(failed / "bad.jpg")
        (failed / "bad.jpg").rename(src)  # `mv` there and back, as the record says: the ctime moves on
        back = src.stat()
        assert (back.st_size, back.st_mtime) == (st.st_size, st.st_mtime) and back.st_ctime > st.st_ctime
        assert ledger.failed_in_place(src, back.st_size, back.st_mtime, back.st_ctime) is None
        (again,) = ledger.enqueue_many([(src, "bad.jpg", "ansel", "default", back.st_size, back.st_mtime,
                                         back.st_ctime)])
        assert again is not None and again.id != job.id
        ledger.close()
    finally:
        server.stop()


def test_a_ledger_url_is_shown_without_its_password_and_postgres_scheme_works(tmp_path: Path, pg_server,
                                                                            smoke_model_path: Path) -> None:
    """`postgres://` (libpq's other spelling) went to the local server as a database *name*, the whole URL with its
    password in the error and the server's log; a `?password=` parameter and a DSN's `password=` were shown as
    written in status, logs and errors."""
    from tests.harness import make_home, mondrian

    url = pg_server.new_database()
    assert url.startswith("postgresql://mondrian@/")
    secret = "S3cr3t-Pw"
    with_password = url.replace("postgresql://", "postgres://", 1) + f"&password={secret}"  # trust: not checked
    home = make_home(tmp_path / "home", smoke_model_path, ledger_url=with_password)
    out = mondrian(home, smoke_model_path, "status")
    assert out.returncode == 0, out.stderr
    assert "Ledger:  shared, postgresql://mondrian@/" in out.stdout and "password=***" in out.stdout, out.stdout
    assert secret not in out.stdout + out.stderr
    unreachable = make_home(tmp_path / "other", smoke_model_path,
                            ledger_url=f"postgresql://studio:{secret}@Leak@127.0.0.1:1/none")
    out = mondrian(unreachable, smoke_model_path, "status")
    assert out.returncode == 78 and "postgresql://studio:***@127.0.0.1:1/none" in out.stderr, out.stderr
    assert secret not in out.stderr and "Leak" not in out.stderr and "@ as %40" in out.stderr, out.stderr
    (unreachable / "mondrian.toml").write_text(f'ledger_url = "postgresql://studio:{secret}@127.0.0.1:1/none"\n')
    out = mondrian(unreachable, smoke_model_path, "status")
    assert out.returncode == 78 and "postgresql://studio:***@127.0.0.1:1/none" in out.stderr, out.stderr
    assert secret not in out.stderr and "cannot open the shared ledger" in out.stderr, out.stderr
    (unreachable / "mondrian.toml").write_text(f'ledger_url = "postgresql://studio:{secret}?x@127.0.0.1:1/none"\n')
    out = mondrian(unreachable, smoke_model_path, "status")  # libpq reads `?` in a password as part of it
    assert out.returncode == 78 and "postgresql://studio:***@127.0.0.1:1/none" in out.stderr, out.stderr
    assert secret not in out.stderr, out.stderr
    dsn = make_home(tmp_path / "dsn", smoke_model_path, ledger_url=f"host=127.0.0.1 password={secret} dbname=x")
    out = mondrian(dsn, smoke_model_path, "status")
    assert out.returncode == 78 and "password=***" in out.stderr and secret not in out.stderr, out.stderr


def test_a_shared_ledger_from_a_newer_mondrian_names_the_url_and_advice_that_works(tmp_path: Path, pg_server,
                                                                                  smoke_model_path: Path) -> None:
    """It named a SQLite file the node does not use and advised db_path, which does nothing while ledger_url is
    set: followed, the same error named the new file."""
    from tests.harness import make_home, mondrian

    url = pg_server.new_database()
    ledger = Ledger(tmp_path / "unused.db", url=url)
    ledger.SchemaVersion.create(version=99, applied_at=time.time())
    ledger.close()
    home = make_home(tmp_path / "home", smoke_model_path, ledger_url=url)
    out = mondrian(home, smoke_model_path, "status")
    assert out.returncode == 78, out.stderr
    assert f"the ledger {url} was written by a newer Mondrian (schema 99" in out.stderr, out.stderr
    assert "on every Mac that shares it" in out.stderr and "point ledger_url at another database" in out.stderr
    assert "db_path" not in out.stderr and "ledger.db" not in out.stderr, out.stderr


def test_a_lost_worker_promises_its_photo_back_only_while_it_still_holds_it(tmp_path: Path,
                                                                            ledger_url: str | None) -> None:
    """A node killed with a photo in hand, whose photo another node took over and finished: `workers` still said
    "its photo returns to the queue when its lease ends", about a photo that was done."""
    from daemon.cli.workers import worker_lines, worker_rows

    a, b = two(tmp_path, ledger_url, lease=1.0)
    job_id = queue(a, tmp_path)
    assert a.claim() is not None
    a.beat()
    later = time.time() + 5

    def a_line() -> str:
        (row,) = [r for r in worker_rows(b, now=later) if r["worker"] == a.worker_id()]
        assert row["lost"]
        return next(line for line in worker_lines([row]) if "LOST" in line)

    assert "its photo returns to the queue when its lease ends" in a_line()
    assert [j.id for j in b.requeue_expired(now=time.time() + 2)] == [job_id]
    assert b.claim() is not None
    b.finish(job_id, effective_mode="baseline", fallbacks=[], report_json=tmp_path / "r.json",
             report_html=tmp_path / "r.html", grade=7, adapter=None, analysis_s=1.0, output_dir=tmp_path / "o")
    assert "its last photo (a.jpg) was finished or taken over since" in a_line()


def test_a_job_whose_worker_died_max_attempts_times_is_not_queued_again(tmp_path: Path,
                                                                        ledger_url: str | None) -> None:
    """A photo that kills the process analysing it, claimed again each time its lease ends, went round every worker
    for ever. Past max_attempts it is left for the crash check of the next start (one Mac), or set aside as failed
    with its reason where no start comes (a shared ledger: the other Macs keep running)."""
    a, b = two(tmp_path, ledger_url, lease=1.0)
    job_id = queue(a, tmp_path)
    assert a.claim() is not None  # attempt 1; a dies with it in hand
    assert b.requeue_expired(now=time.time() + 2, max_attempts=1) == []
    job = b.get(job_id)
    if b.shared:
        assert job.state == "failed" and "retry --failed" in job.error and "stopped 1 time(s)" in job.error, job.error
    else:
        assert job.state == RUNNING  # the next start's recovery judges it
    assert b.claim() is None


def test_a_shared_ledger_made_before_sizes_were_64_bit_takes_a_3_gib_file_once_opened(tmp_path: Path,
                                                                                    pg_server) -> None:
    """A PostgreSQL ledger made by an earlier Mondrian has a 32-bit size column: opening it widens the column."""
    from daemon.ledger import SCHEMA_VERSION

    url = pg_server.new_database()
    old = Ledger(tmp_path / "unused.db", url=url)
    old.db.execute_sql('ALTER TABLE "job" ALTER COLUMN "size" TYPE INTEGER')
    old.SchemaVersion.delete().where(old.SchemaVersion.version == SCHEMA_VERSION).execute()
    with pytest.raises(Exception, match="out of range"):
        with old.db.atomic():
            old.enqueue(tmp_path / "inbox" / "pano.tif", "pano.tif", "ansel", "default", 3 << 30, 1.0)
    old.close()
    ledger = Ledger(tmp_path / "unused.db", url=url)
    assert ledger.schema_version() == SCHEMA_VERSION
    job = ledger.enqueue(tmp_path / "inbox" / "pano.tif", "pano.tif", "ansel", "default", 3 << 30, 1.0)
    assert job is not None and ledger.jobs()[0].size == 3 << 30
    ledger.close()
