"""The ledger's files mistreated while Mondrian runs, with real SQLite files, real daemons and real signals: its -wal
or -shm deleted ("just temporary files"), the whole var/ folder deleted, a backup moved over it, its tables changed by
another program, and its times written by a clock that was ahead.

Each test says what a person did, and checks the promises: every photo ends in exactly one terminal place, once; the
daemon never dies with a traceback; every refusal says what to do next.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from daemon.ledger import Ledger
from tests.harness import Daemon, ledger_jobs, make_home, mondrian, photo, reports, wait_for
from tests.test_faults import FAST


def _state(home: Path, name: str) -> str | None:
    return getattr(ledger_jobs(home).get(name), "state", None)


def _both_photos_done_once_after_a_restart(home: Path, model: Path) -> None:
    """After the restart launchd/systemd would make: first.jpg and second.jpg each analysed once, the ledger sound."""
    with Daemon(home, model, "--once") as d:
        assert d.wait(120) == 0, d.output()
    jobs = ledger_jobs(home)
    assert sorted(jobs) == ["first.jpg", "second.jpg"] and {j.state for j in jobs.values()} == {"done"}, \
        {k: (j.state, j.error) for k, j in jobs.items()}
    assert sorted(p.parent.name for p in reports(home / "outbox")) == ["first", "second"]
    db = home / "var" / "ledger.db"
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# -- the ledger's -wal or -shm deleted while the daemon runs ---------------------------------------------------------

@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
def test_a_deleted_wal_or_shm_is_noticed_written_back_and_nothing_is_lost(tmp_path, smoke_model_path, suffix):
    # `rm var/ledger.db-wal` ("a stray temp file, 4 MB"): the daemon's latest changes live only in the deleted log
    # its process still holds open, until a checkpoint; a SIGKILL or a power cut then lost them, and a second process
    # opening the ledger made a new, empty log beside the live one (its reads failed with "disk I/O error", and a
    # write of `retry` would land where the daemon never looks). The daemon must notice it as it notices a deleted
    # ledger: write back what it holds, and restart on it.
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    db = home / "var" / "ledger.db"
    photo(home / "inbox" / "first.jpg", seed=11, size=(64, 48))
    with Daemon(home, smoke_model_path) as d:
        wait_for(lambda: _state(home, "first.jpg") == "done", 90, what="first photo done")
        d.signal(signal.SIGSTOP)  # between two of its beats, as long as the person takes to look
        try:
            os.unlink(f"{db}{suffix}")
            for command in (["status"], ["retry", "--failed"]):
                looked = mondrian(home, smoke_model_path, *command)
                # A refusal that says to wait: never "disk I/O error, make it writable", nor a new log or index
                # made beside the live one.
                assert looked.returncode == 78 and "run the command again in a minute" in looked.stderr, \
                    (command, looked.returncode, looked.stderr)
                assert "Traceback" not in looked.stderr and "writable" not in looked.stderr, looked.stderr
                assert not os.path.lexists(f"{db}{suffix}"), f"{command} made a new ledger.db{suffix}"
        finally:
            d.signal(signal.SIGCONT)
        photo(home / "inbox" / "second.jpg", seed=12, size=(64, 48))
        rc = d.wait(60)
    log = d.output()
    assert rc == 75, log  # EX_TEMPFAIL: launchd/systemd start it again
    assert f"lost its ledger.db{suffix} file" in log and "written back" in log, log
    assert "Traceback" not in log, log
    assert not list(db.parent.glob("ledger.db.replaced-*")), "its own file was kept aside as someone else's"
    _both_photos_done_once_after_a_restart(home, smoke_model_path)
    print(f"\nledger.db{suffix} deleted while running: status and retry said to wait, the daemon wrote the ledger "
          f"back and exited 75; after the restart 2/2 photos done once each")



def test_the_whole_var_folder_deleted_while_running_is_not_shown_as_a_stopped_daemon(tmp_path, smoke_model_path):
    # `rm -rf var` ("caches and logs, it says var"): the daemon's lock went with it, so status said "not running,
    # start it with `mondrian run`", showed no photos at all, and made a new, empty ledger there, which the daemon
    # then kept aside as a ledger.db.replaced-… of its own.
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    var = home / "var"
    photo(home / "inbox" / "first.jpg", seed=17, size=(64, 48))
    with Daemon(home, smoke_model_path) as d:
        wait_for(lambda: _state(home, "first.jpg") == "done", 90, what="first photo done")
        wait_for(lambda: (home / "outbox" / "index.html").exists(), 30, what="the index")
        d.signal(signal.SIGSTOP)
        try:
            shutil.rmtree(var)
            looked = mondrian(home, smoke_model_path, "status")
            assert looked.returncode == 78 and "run the command again in a minute" in looked.stderr, \
                (looked.returncode, looked.stdout, looked.stderr)
            assert "Traceback" not in looked.stderr and not var.exists(), looked.stderr
        finally:
            d.signal(signal.SIGCONT)
        rc = d.wait(60)
    log = d.output()
    assert rc == 75 and "was deleted while Mondrian was using it" in log and "Traceback" not in log, log
    assert not list(var.glob("ledger.db.replaced-*")), log
    photo(home / "inbox" / "second.jpg", seed=18, size=(64, 48))
    with Daemon(home, smoke_model_path, "--once") as d:
        assert d.wait(120) == 0, d.output()
    jobs = ledger_jobs(home)
    assert sorted(jobs) == ["first.jpg", "second.jpg"] and {j.state for j in jobs.values()} == {"done"}, \
        {k: (j.state, j.error) for k, j in jobs.items()}
    assert sorted(p.parent.name for p in reports(home / "outbox")) == ["first", "second"]
    print("\nvar/ deleted whole while running: status said to wait (not 'not running'), the daemon wrote its ledger "
          "back, and after the restart 2/2 photos are done once each")

# -- a ledger whose tables were changed by another program ------------------------------------------------------------

def _drop_column(c: sqlite3.Connection) -> None:
    c.execute("ALTER TABLE job DROP COLUMN lease_token")


def _add_required_column(c: sqlite3.Connection) -> None:
    # SQLite's ALTER TABLE cannot add a NOT NULL column without a default: the table is made again, as tools do.
    (ddl,) = c.execute("SELECT sql FROM sqlite_master WHERE name = 'job'").fetchone()
    body = ddl.replace('CREATE TABLE "job" (', 'CREATE TABLE "job_new" (', 1)
    c.execute(body[:body.rindex(")")] + ', "checked_by" TEXT NOT NULL)')  # only the table's own closing bracket
    columns = ", ".join(f'"{row[1]}"' for row in c.execute('PRAGMA table_info("job")'))
    c.execute(f'INSERT INTO job_new ({columns}, checked_by) SELECT {columns}, \'x\' FROM job')
    c.execute("DROP TABLE job")
    c.execute("ALTER TABLE job_new RENAME TO job")


LAYOUT_EDITS = {
    # a column dropped (`ALTER TABLE job DROP COLUMN`, a "cleanup" script): every query of jobs fails
    "a column dropped": (_drop_column, "its job table has no lease_token column"),
    # a column added that every insert must fill: every photo queued fails
    "a required column added": (_add_required_column, "that may not be left empty"),
}


@pytest.mark.parametrize("edit", list(LAYOUT_EDITS))
def test_a_ledger_whose_tables_were_edited_is_one_line_whose_advice_works(tmp_path, smoke_model_path, edit):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    photo(home / "inbox" / "first.jpg", seed=13, size=(64, 48))
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0
    db = home / "var" / "ledger.db"
    change, said = LAYOUT_EDITS[edit]
    c = sqlite3.connect(db)
    with c:
        change(c)
    c.close()
    photo(home / "inbox" / "second.jpg", seed=14, size=(64, 48))
    lines = {}
    for command in (["status"], ["retry", "--failed"], ["run", "--once"]):
        out = mondrian(home, smoke_model_path, *command, timeout=120)
        errors = [line for line in out.stderr.splitlines() if " ERROR " in line]
        assert out.returncode == 78 and len(errors) == 1 and "Traceback" not in out.stderr, (command, out.stderr)
        lines[command[0]] = errors[0]
    line = lines["run"]
    # What is wrong and what to do, not "make it writable" (the advice for a permissions problem).
    assert said in line and "writable" not in line and "Another program" in line, line
    assert (home / "inbox" / "second.jpg").exists()  # nothing was touched
    commands = re.search(r"\((mv .*?)\) ", line).group(1)
    subprocess.run(commands, shell=True, check=True)
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _state(home, "second.jpg") == "done"
    assert sorted(p.parent.name for p in reports(home / "outbox")) == ["first", "second"]
    print(f"\n{edit}: {line.split(': ', 1)[1][:150]}… then `{commands}` and a fresh start")


# -- another database put in the ledger's place while the daemon runs --------------------------------------------------

def test_a_backup_restored_over_the_running_ledger_is_left_as_it_was_and_nothing_is_lost(tmp_path, smoke_model_path):
    # A backup of the ledger put back with `mv` (or the Finder) while Mondrian runs. The daemon's -wal and -shm stay
    # beside it: `mondrian status` opened the backup with the daemon's live log, and on closing (the last to have
    # the backup open) checkpointed that log into the backup and deleted it. The daemon's records were lost (the
    # written-back ledger lacked the photo analysed before) and the backup kept aside was no longer the backup.
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    db = home / "var" / "ledger.db"
    assert mondrian(home, smoke_model_path, "status").returncode == 0  # makes the ledger
    backup = tmp_path / "ledger-backup.db"
    live, copy = sqlite3.connect(db), sqlite3.connect(backup)
    live.backup(copy)
    live.close()
    copy.close()
    saved = backup.read_bytes()
    photo(home / "inbox" / "first.jpg", seed=15, size=(64, 48))
    with Daemon(home, smoke_model_path) as d:
        wait_for(lambda: _state(home, "first.jpg") == "done", 90, what="first photo done")
        d.signal(signal.SIGSTOP)  # between two of its beats, as long as the person takes to look
        try:
            os.replace(backup, db)
            looked = mondrian(home, smoke_model_path, "status")
            assert looked.returncode == 78 and "run the command again in a minute" in looked.stderr, looked.stderr
            assert "Traceback" not in looked.stderr, looked.stderr
            assert db.read_bytes() == saved, "status changed the restored file"
        finally:
            d.signal(signal.SIGCONT)
        photo(home / "inbox" / "second.jpg", seed=16, size=(64, 48))
        rc = d.wait(60)
    log = d.output()
    assert rc == 75 and "was replaced by another file" in log and "Traceback" not in log, log
    kept = sorted(p.name for p in db.parent.glob("ledger.db.replaced-*"))
    # The backup alone: the daemon's log beside it would be replayed into it by whoever opens it.
    assert len(kept) == 1, f"the daemon's -wal or -shm was kept beside the backup: {kept}"
    assert (db.parent / kept[0]).read_bytes() == saved, "the file kept aside is not the one that was put there"
    _both_photos_done_once_after_a_restart(home, smoke_model_path)
    print("\na backup moved over the running ledger: status said to wait and left it unchanged; the daemon wrote its "
          "own back, kept the backup aside byte for byte, and after the restart 2/2 photos are done once each")


# -- the clock going back ---------------------------------------------------------------------------------------------

def test_a_photo_delayed_by_a_clock_that_ran_ahead_is_not_held_back_once_the_clock_is_set_right(tmp_path,
                                                                                                 smoke_model_path):
    # A Mac whose clock ran two hours ahead (a flat battery, a clock set by hand) is set right by the network. A
    # photo put back for a retry in 1 s just before that waited two hours and 1 s: its next try was written with the
    # wrong clock, and status showed it "delayed" until then. Written here as that clock would have written it.
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    src = photo(home / "inbox" / "held.jpg", seed=19, size=(64, 48))
    db = home / "var" / "ledger.db"
    db.parent.mkdir()
    st = src.stat()
    ledger = Ledger(db)
    job = ledger.enqueue(src, "held.jpg", "ansel", "default", st.st_size, st.st_mtime)
    ledger.close()
    ahead = time.time() + 2 * 3600
    c = sqlite3.connect(db)
    with c:
        c.execute("UPDATE job SET attempts = 1, started_at = ?, not_before = ?, error = 'the outbox was busy', "
                  "error_kind = 'transient' WHERE id = ?", (ahead - 5, ahead + 1, job.id))
    c.close()
    info = json.loads(mondrian(home, smoke_model_path, "status", "--json").stdout)
    assert info["queue"]["delayed"] == 0 and info["queue"]["queued"] == 1, info["queue"]
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=60)  # not two hours
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert _state(home, "held.jpg") == "done"
    assert [p.parent.name for p in reports(home / "outbox")] == ["held"]
    print("\na photo delayed by a clock two hours ahead: analysed at once once the clock was set right")


def test_a_wal_emptied_by_another_program_stops_the_daemon_and_the_restart_carries_on(tmp_path, smoke_model_path):
    """`: > var/ledger.db-wal` (a cleaner "emptying" temp files) while the daemon runs: its latest changes are gone
    with the log, every read of them failed ("disk I/O error", "file is not a database") a traceback a second for
    ever, and closing the ledger at stop copied the missing pages into ledger.db, which then could not be opened at
    all. The daemon now ends at once without closing it (exit 75, so launchd starts it again), and the restart
    carries on from the last checkpoint: the second photo is critiqued, the first is not analysed twice."""
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    db = home / "var" / "ledger.db"
    photo(home / "inbox" / "first.jpg", seed=11, size=(64, 48))
    with Daemon(home, smoke_model_path) as d:
        wait_for(lambda: _state(home, "first.jpg") == "done", 90, what="first photo done")
        with open(f"{db}-wal", "r+b") as wal:
            wal.truncate(0)
        photo(home / "inbox" / "second.jpg", seed=12, size=(64, 48))
        rc = d.wait(60)
    log = d.output()
    assert rc == 75, log
    assert "was emptied or cut by another program" in log and "the next start carries on" in log, log
    assert log.count("Traceback") < 10, "it stopped instead of logging a traceback a second"
    with Daemon(home, smoke_model_path, "--once") as again:
        assert again.wait(120) == 0, again.output()
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert ledger_jobs(home)["second.jpg"].state == "done"
    assert sorted(p.parent.name for p in reports(home / "outbox")) == ["first", "second"], "first analysed once"
