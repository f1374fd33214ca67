"""Issue 9, items 3 and 5, with real faults on a real daemon: the ledger's disk filled up, the ledger locked by
another process for longer than SQLite's busy timeout, the ledger deleted while the daemon runs, start-up
obstacles (a file where a folder should be, an immutable ledger, a read-only outbox, an outbox inside the inbox),
a malformed reference sidecar, SIGHUP, and file names that try to forge log lines or reach the terminal.

Mounting a tmpfs and `chattr` need root (or CAP_SYS_ADMIN / CAP_LINUX_IMMUTABLE); where they are not allowed
those tests skip and say so.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.analysis.critique import DIMENSIONS
from tests.harness import Daemon, hold_ledger_lock, ledger_jobs, make_home, mondrian, photo, status, wait_for
from tests.test_faults import FAST, _mount, _umount, read_only
from tests.test_faults import test_signal_requeues_the_photo_in_hand_and_exits_0_quickly as _graceful_stop


def _state(home: Path, name: str) -> str | None:
    return getattr(ledger_jobs(home).get(name), "state", None)


def _fill(folder: Path) -> Path:
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == 28  # ENOSPC
    return filler


# -- the ledger's own faults, while the daemon runs --------------------------------------------------------

def test_ledger_disk_full_is_waited_out_and_nothing_is_lost(tmp_path, smoke_model_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    var = home / "var"
    var.mkdir()
    if _mount("-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(var)).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        photo(home / "inbox" / "before.jpg", seed=1, size=(64, 48))
        with Daemon(home, smoke_model_path) as d:
            wait_for(lambda: _state(home, "before.jpg") == "done", 90, what="first photo done")
            filler = _fill(var)  # the ledger's disk is full now: its WAL cannot grow
            photo(home / "inbox" / "during.jpg", seed=2, size=(64, 48))
            time.sleep(11)  # two heartbeats and several backoffs: the daemon stays up, and logs it once
            assert d.proc.poll() is None, "a full disk must not stop the daemon:\n" + d.output()
            info = wait_for(lambda: status(home, smoke_model_path)["ledger_fault"], 30, what="status shows it")
            assert "full" in info["reason"] or "I/O" in info["reason"], info
            text = mondrian(home, smoke_model_path, "status").stdout
            assert "Ledger:  cannot be written since" in text, text
            assert _state(home, "during.jpg") in (None, "queued", "running")
            filler.unlink()  # space again: everything goes on by itself
            wait_for(lambda: _state(home, "during.jpg") == "done", 90, what="the photo dropped meanwhile done")
            wait_for(lambda: status(home, smoke_model_path)["ledger_fault"] is None, 30, what="fault cleared")
            photo(home / "inbox" / "after.jpg", seed=3, size=(64, 48))
            wait_for(lambda: _state(home, "after.jpg") == "done", 90, what="a later photo done")
            assert d.stop() == 0, d.output()
        log = d.output()
    finally:
        _umount(var)
    assert "Traceback" not in log, log
    said = log.count("cannot be written (")
    assert 1 <= said <= 3, log  # once per distinct reason, not once per loop
    assert "can be written again" in log
    # nothing lost, nothing twice (the ledger went with its tmpfs: the outbox and the inbox say it)
    reports = sorted(p.parent.name for p in (home / "outbox").glob("*/report.json"))
    assert reports == ["after", "before", "during"], reports
    assert not list((home / "inbox").iterdir())
    print(f"\nledger disk full: daemon stayed up, fault logged {said}x and shown in status; "
          f"3/3 photos reported once each")


def test_ledger_made_immutable_while_running_is_waited_out(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    wal = home / "var" / "ledger.db-wal"
    photo(home / "inbox" / "before.jpg", seed=8, size=(64, 48))
    with Daemon(home, smoke_model_path) as d:
        wait_for(lambda: _state(home, "before.jpg") == "done", 90, what="first photo done")
        if subprocess.run(["chattr", "+i", str(wal)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not allowed here")
        try:
            photo(home / "inbox" / "during.jpg", seed=9, size=(64, 48))
            time.sleep(6)  # a heartbeat or two
            assert d.proc.poll() is None, "an unwritable ledger must not stop the daemon:\n" + d.output()
            info = wait_for(lambda: status(home, smoke_model_path)["ledger_fault"], 30, what="status shows it")
        finally:
            subprocess.run(["chattr", "-i", str(wal)], capture_output=True)
        wait_for(lambda: _state(home, "during.jpg") == "done", 90, what="the photo dropped meanwhile done")
        assert d.stop() == 0, d.output()
    assert "Traceback" not in d.output(), d.output()
    assert sorted(p.parent.name for p in (home / "outbox").glob("*/report.json")) == ["before", "during"]
    print(f"\nledger's log made immutable while running: daemon stayed up, status said {info['reason']!r}, "
          f"then went on")


def test_ledger_locked_longer_than_sqlites_busy_timeout(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    db = home / "var" / "ledger.db"
    hold_s = 40  # longer than the 30 s busy timeout that used to end the daemon
    with Daemon(home, smoke_model_path) as d:
        wait_for(lambda: "model ready" in d.output(), 60, what="model ready")
        holder = hold_ledger_lock(db, hold_s)
        try:
            t0 = time.monotonic()
            photo(home / "inbox" / "locked out.jpg", seed=4, size=(64, 48))
            time.sleep(33)  # past SQLite's 30 s busy timeout
            assert d.proc.poll() is None, "a lock held by another program must not stop the daemon:\n" + d.output()
            info = status(home, smoke_model_path)["ledger_fault"]  # read while the lock is still held
            assert info and "locked" in info["reason"], info
            holder.wait(hold_s + 30)
            assert d.proc.poll() is None, d.output()
        finally:
            if holder.poll() is None:
                holder.kill()
        wait_for(lambda: _state(home, "locked out.jpg") == "done", 90, what="the photo dropped meanwhile done")
        waited = time.monotonic() - t0
        assert status(home, smoke_model_path)["ledger_fault"] is None
        assert d.stop() == 0, d.output()
    log = d.output()
    assert "Traceback" not in log, log
    assert log.count("cannot be written (database is locked") == 1, log
    print(f"\nledger locked {hold_s}s by another process: daemon stayed up, status said so, the photo dropped "
          f"meanwhile was done {waited:.0f}s later")


def test_stop_while_the_ledger_is_locked_is_quick_and_loses_nothing(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    with Daemon(home, smoke_model_path) as d:
        wait_for(lambda: "model ready" in d.output(), 60, what="model ready")
        holder = hold_ledger_lock(home / "var" / "ledger.db", 60)
        try:
            photo(home / "inbox" / "waiting.jpg", seed=10, size=(64, 48))
            time.sleep(5)  # the photo is seen, and its queueing waits for the lock
            t0 = time.monotonic()
            d.signal(signal.SIGTERM)
            rc = d.wait(30)
            took = time.monotonic() - t0
        finally:
            holder.kill()
            holder.wait()
    log = d.output()
    # well inside the daemon's own 20 s grace and launchd's 60 s ExitTimeOut, even on a loaded machine
    assert rc == 0 and took < 15, (rc, took, log)
    assert "database is locked" in log and "Traceback" not in log, log
    with Daemon(home, smoke_model_path, "--once") as d:
        assert d.wait(120) == 0, d.output()
    assert _state(home, "waiting.jpg") == "done"
    print(f"\nSIGTERM while another process holds the ledger locked: exit 0 in {took:.1f}s; the photo was done "
          f"after the restart")


@pytest.mark.parametrize("which", ["db", "db+wal+shm"])
def test_deleted_ledger_is_noticed_written_back_and_the_daemon_restarts_on_it(tmp_path, smoke_model_path, which):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    db = home / "var" / "ledger.db"
    photo(home / "inbox" / "first.jpg", seed=5, size=(64, 48))
    with Daemon(home, smoke_model_path) as d:
        wait_for(lambda: _state(home, "first.jpg") == "done", 90, what="first photo done")
        for suffix in ("", "-wal", "-shm") if which == "db+wal+shm" else ("",):
            os.unlink(f"{db}{suffix}")
        # The user looks at once: status must not make a new, empty ledger in its place (the daemon would take it
        # for a replacement, keep it aside as junk, and status would show an empty history).
        looked = mondrian(home, smoke_model_path, "status")
        assert "Traceback" not in looked.stderr, looked.stderr
        assert looked.returncode == 0 or "is not there while Mondrian" in looked.stderr, looked.stderr
        photo(home / "inbox" / "second.jpg", seed=6, size=(64, 48))  # recorded in the deleted file meanwhile
        rc = d.wait(60)
    log = d.output()
    assert not list(db.parent.glob("ledger.db.replaced-*")), log
    assert rc == 75, log  # EX_TEMPFAIL: launchd/systemd start it again
    assert "was deleted while Mondrian was using it" in log and "written back" in log, log
    assert "Traceback" not in log, log
    jobs = ledger_jobs(home)
    assert jobs["first.jpg"].state == "done", {k: j.state for k, j in jobs.items()}
    with Daemon(home, smoke_model_path, "--once") as d:
        assert d.wait(120) == 0, d.output()
    jobs = ledger_jobs(home)
    assert sorted(jobs) == ["first.jpg", "second.jpg"] and {j.state for j in jobs.values()} == {"done"}
    reports = sorted(p.parent.name for p in (home / "outbox").glob("*/report.json"))
    assert reports == ["first", "second"], reports
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    print(f"\nledger deleted ({which}) while running: noticed, written back, exit 75; after restart 2/2 photos "
          f"done once each")


def test_a_ledger_written_over_in_place_stops_the_daemon_with_what_to_do(tmp_path, smoke_model_path):
    """Truncated where it lies (the same file, so not "replaced"): it stops (78) with one line and commands that
    work when pasted. They moved the -wal and -shm with `&&`, and SQLite removes those when it closes the ledger:
    pasted, they failed with "cannot stat". After them, it starts anew and the photo waiting is critiqued."""
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    db = home / "var" / "ledger.db"
    photo(home / "inbox" / "first.jpg", seed=15, size=(64, 48))
    with Daemon(home, smoke_model_path) as d:
        wait_for(lambda: _state(home, "first.jpg") == "done", 90, what="first photo done")
        with open(db, "r+b") as fh:
            fh.truncate(0)
        photo(home / "inbox" / "second.jpg", seed=16, size=(64, 48))
        rc = d.wait(90)
    log = d.output()
    assert rc == 78, log[-3000:]
    assert log.count("error in the worker loop") <= 3, log[-3000:]
    assert "written back" not in log and "is not a SQLite database, or is damaged" in log, log[-3000:]
    advice = log.split("move it aside (", 1)[1].split(") and start Mondrian again", 1)[0]
    assert subprocess.run(advice, shell=True, capture_output=True, text=True).returncode == 0, advice
    with Daemon(home, smoke_model_path, "--once") as d:
        assert d.wait(120) == 0, d.output()
    assert (home / "outbox" / "second" / "report.json").is_file()
    assert (home / "outbox" / "first" / "report.json").is_file()


# -- start-up obstacles: exit 78 with one line saying what to fix --------------------------------------------

def _obstacle_file(home: Path, name: str) -> str:
    (home / "outbox" / name).write_text("in the way")
    return f"{home / 'outbox' / name} should be a folder"


def _immutable_ledger(home: Path, smoke_model_path: Path) -> str:
    assert mondrian(home, smoke_model_path, "status").returncode == 0  # creates the ledger
    db = home / "var" / "ledger.db"
    if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not allowed here")
    return f"cannot open the ledger {db}"


def _outbox_in_inbox(home: Path, _model: Path) -> str:
    with open(home / "mondrian.toml", "a") as fh:
        fh.write('outbox = "inbox/reports"\n')
    return "is inside the inbox"


def _inbox_in_outbox(home: Path, _model: Path) -> str:
    with open(home / "mondrian.toml", "a") as fh:
        fh.write('inbox = "outbox/drop"\n')
    return "is inside the outbox"


def _overlapping(setting: str):
    def write(home: Path, _model: Path) -> str:
        with open(home / "mondrian.toml", "a") as fh:
            fh.write(setting + "\n")
        return "overlap"  # one inside the other took its own lock for another daemon's ("Stop that one")
    return write


OBSTACLES = {
    "var_dir is the outbox": _overlapping('var_dir = "outbox"'),
    "outbox inside var_dir": _overlapping('outbox = "var/reports"'),
    "file at outbox/failed": lambda home, _m: _obstacle_file(home, "failed"),
    "file at outbox/.staging": lambda home, _m: _obstacle_file(home, ".staging"),
    "immutable ledger": _immutable_ledger,
    "outbox inside inbox": _outbox_in_inbox,
    "inbox inside outbox": _inbox_in_outbox,
}


@pytest.mark.parametrize("obstacle", list(OBSTACLES))
def test_start_up_obstacles_exit_78_with_one_line(tmp_path, smoke_model_path, obstacle):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    photo(home / "inbox" / "waiting.jpg", seed=7, size=(64, 48))
    want = OBSTACLES[obstacle](home, smoke_model_path)
    try:
        out = mondrian(home, smoke_model_path, "run", "--once", timeout=60)
    finally:
        subprocess.run(["chattr", "-i", str(home / "var" / "ledger.db")], capture_output=True)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 78, out.stderr
    assert len(lines) == 1 and want in lines[0] and "Traceback" not in out.stderr, out.stderr
    assert (home / "inbox" / "waiting.jpg").exists()  # nothing was touched
    assert not [p.name for p in (home / "outbox").iterdir() if p.name.startswith(("daemon", "ledger"))]
    print(f"\n{obstacle}: exit 78, {lines[0].split(': ', 1)[1][:110]}…")


def test_read_only_outbox_exits_78_with_one_line(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    for sub in ("failed", ".staging"):
        (home / "outbox" / sub).mkdir()
    with read_only(home / "outbox"):
        out = mondrian(home, smoke_model_path, "run", "--once", timeout=60)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 78 and len(lines) == 1 and "cannot be written" in lines[0], out.stderr
    print(f"\nread-only outbox: exit 78, {lines[0].split(': ', 1)[1][:110]}…")


# -- SIGHUP: a graceful stop like SIGTERM, then a restart by the service manager ---------------------------

def test_sighup_requeues_the_photo_in_hand_and_exits_75_quickly(tmp_path, smoke_model_path):
    _graceful_stop(tmp_path, smoke_model_path, signal.SIGHUP)


# -- one malformed reference sidecar is that reference's own failure ----------------------------------------

BAD_SIDECARS = {
    "nan.jpg": '{"scores": {' + ", ".join(f'"{d}": NaN' for d in DIMENSIONS) + "}}",
    "huge.jpg": "{" + ", ".join(f'"{d}": 1e999' for d in DIMENSIONS) + "}",
    "deep.jpg": "[" * 50_000 + "]" * 50_000,
}


def _portfolio(refs: Path) -> None:
    for i, name in enumerate(["good one.jpg", "good two.jpg", *BAD_SIDECARS]):
        photo(refs / name, seed=30 + i, size=(64, 48))
    (refs / "good two.json").write_text(json.dumps({"scores": {d: 6 for d in DIMENSIONS}}))
    for name, text in BAD_SIDECARS.items():
        (refs / name).with_suffix(".json").write_text(text)
    old = time.time() - 60
    for p in refs.iterdir():
        os.utime(p, (old, old))


def test_a_malformed_reference_sidecar_skips_only_that_reference(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    refs = home / "advisors" / "ansel" / "references"
    _portfolio(refs)
    cartier = home / "advisors" / "cartier" / "references"
    photo(cartier / "rue.jpg", seed=40, size=(64, 48))
    os.utime(cartier / "rue.jpg", (time.time() - 60,) * 2)

    out = mondrian(home, smoke_model_path, "references", "index", timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr  # 1: some were skipped
    assert "3 indexed" in out.stderr and "3 skipped" in out.stderr, out.stderr
    listing = json.loads(mondrian(home, smoke_model_path, "references", "list", "--json").stdout)
    assert sorted(r["file"] for r in listing["ansel"]["references"]) == ["good one.jpg", "good two.jpg"]
    assert [r["file"] for r in listing["cartier"]["references"]] == ["rue.jpg"]
    skipped = {e["file"]: e["reason"] for e in listing["ansel"]["skipped"]}
    assert sorted(skipped) == sorted(BAD_SIDECARS), skipped
    assert "nests too deeply" in skipped["deep.jpg"] and "whole numbers" in skipped["nan.jpg"]
    text = mondrian(home, smoke_model_path, "references", "list").stdout
    assert "skipped: nan.jpg:" in text, text

    # The daemon: a fresh ledger, the same portfolio; the good ones index, status lists the bad ones.
    (home / "var" / "ledger.db").unlink()
    for suffix in ("-wal", "-shm"):
        (home / "var" / f"ledger.db{suffix}").unlink(missing_ok=True)
    with Daemon(home, smoke_model_path) as d:
        info = wait_for(lambda: (lambda s: s if len(s["reference_errors"]) == 3 else None)(
            status(home, smoke_model_path)), 90, what="status lists the bad references")
        listing = wait_for(lambda: (lambda ls: ls if len(ls["ansel"]["references"]) == 2
                                    and ls["cartier"]["references"] else None)(
            json.loads(mondrian(home, smoke_model_path, "references", "list", "--json").stdout)),
            90, what="the good references indexed")
        time.sleep(3)  # a few more steps: no traceback loop
        assert d.proc.poll() is None
        assert d.stop() == 0
    log = d.output()
    assert "Traceback" not in log and "indexing references failed" not in log, log
    assert sorted(e["file"] for e in info["reference_errors"]) == sorted(BAD_SIDECARS)
    text = mondrian(home, smoke_model_path, "status").stdout
    assert "References skipped:" in text and "deep.jpg" in text, text
    print(f"\nmalformed sidecars (NaN, 1e999, 50,000 nested brackets): 3 skipped with reasons, "
          f"{len(listing['ansel']['references']) + len(listing['cartier']['references'])} others indexed")


# -- what reaches a terminal -------------------------------------------------------------------------------

def test_control_characters_in_names_are_escaped_in_log_and_status(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    forged = "12:00:00 ERROR   mondrian.daemon: forged"
    name = f"evil\n{forged}\x1b[2J\x1b]0;owned\x07\u202e.jpg"
    (home / "inbox" / name).write_bytes(b"not a photo at all")
    with Daemon(home, smoke_model_path, "--once") as d:
        assert d.wait(120) == 0, d.output()
    log = d.output()
    assert _state(home, name) == "failed"
    text = mondrian(home, smoke_model_path, "status").stdout
    for where, out in (("log", log), ("status", text)):
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out, (where, out)
        assert not any(line.startswith(forged) for line in out.splitlines()), (where, out)
        assert "evil\\n12:00:00" in out and "\\x1b[2J" in out, (where, out)
    print("\ncontrol characters in a file name: escaped in the log and in `mondrian status` (no forged line, "
          "no escape sequence)")


def test_an_inbox_removed_while_running_is_made_again_and_served(tmp_path, smoke_model_path):
    """Attack: `rm -rf inbox` while the daemon ran: the inbox was never made again (the log blamed an unplugged
    drive) until a restart, while the README says folders inside the home are made as needed. It is made again at
    the next rescan, and a photo dropped into it is analysed."""
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    with Daemon(home, smoke_model_path) as d:
        wait_for(lambda: "watching" in d.output().lower() or status(home, smoke_model_path)["daemon"]["running"],
                 120, what="the daemon to start")
        import shutil

        shutil.rmtree(home / "inbox")
        wait_for(lambda: (home / "inbox").is_dir(), 60, what="the inbox made again")
        photo(home / "inbox" / "back.jpg", seed=3, size=(64, 48))
        wait_for(lambda: ledger_jobs(home).get("back.jpg") is not None
                 and ledger_jobs(home)["back.jpg"].state == "done", 180, what="the photo analysed")
        assert d.stop() == 0
    assert "not connected" not in d.output(), d.output()
