"""Links (and deleted lock files) where Mondrian keeps its own files and folders, against the real daemon.

Anyone who can write into the inbox (a shared or synced folder) or the home (a restore from a backup that kept
links, a sync tool) can plant a symbolic link where Mondrian creates a file or folder of its own. Mondrian must
never write, truncate, move into or delete through such a link: each test compares every file outside the home
byte for byte. And one home or one inbox is served by one daemon, whatever lock file is deleted.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness import Daemon, ledger_jobs, make_home, mondrian, photo, status, wait_for

import pytest


def _victim(root: Path) -> Path:
    """A folder of the user's, outside the home: a document, a hidden file, a photo in a subfolder."""
    root.mkdir(parents=True)
    (root / "thesis.docx").write_text("precious\n" * 500)
    (root / ".hidden-old").write_text("keep me\n")
    (root / "0123456789abcdef.lock").write_text("named like a run lock, but the user's\n")
    photo(root / "projects" / "holiday.jpg", seed=11)
    (root / "job-1").mkdir()  # named like a staging folder, but the user's
    (root / "job-1" / "draft.txt").write_text("a draft\n")
    return root


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under `root` (links not followed) with its bytes, or its link target."""
    found: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            found[rel] = ("-> " + os.readlink(p)) if p.is_symlink() else (p.read_bytes() if p.is_file() else "dir")
    return found


def _one_line_78(out, *needles: str) -> str:
    text = out.stdout + out.stderr
    assert out.returncode == 78, text
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if "ERROR" in line]
    assert len(lines) == 1, text
    for needle in needles:
        assert needle in lines[0], text
    return lines[0]


def _wait_started(daemon: Daemon) -> None:
    wait_for(lambda: "model ready" in daemon.output() or daemon.proc.poll() is not None, 120, what="the daemon")
    assert daemon.proc.poll() is None, daemon.output()


# -- 48: the liveness canary ---------------------------------------------------------------------------


def test_the_inbox_canary_never_opens_a_link_planted_under_its_name(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    victim = _victim(tmp_path / "victim")
    before = _snapshot(victim)
    (home / "inbox" / ".mondrian-watch").symlink_to(victim / "thesis.docx")
    with Daemon(home, smoke_model_path) as daemon:
        _wait_started(daemon)
        photo(home / "inbox" / "a.jpg", seed=1)
        wait_for(lambda: status(home, smoke_model_path)["counts"]["done"] == 1, 120, what="a.jpg done")
        first = status(home, smoke_model_path)["last_rescan_at"]
        # Each rescan after the first sends a canary (rescan_seconds = 2): wait for two more.
        wait_for(lambda: (status(home, smoke_model_path)["last_rescan_at"] or 0) > first + 3, 60, what="rescans")
        assert daemon.stop() == 0, daemon.output()
    assert _snapshot(victim) == before, "a file outside the home was changed through the canary's name"
    assert (home / "inbox" / ".mondrian-watch").is_symlink(), "the planted link is not Mondrian's to remove"
    assert "stopped delivering events" not in daemon.output(), "the canary must still reach the observer"


# -- 45: var/daemon.lock and var/ledger-fault.json -------------------------------------------------------


@pytest.mark.parametrize("name,how", [("daemon.lock", "symlink"), ("daemon.lock", "hardlink"),
                                      ("ledger-fault.json", "symlink"), ("ledger-fault.json", "hardlink")])
def test_a_link_at_mondrians_own_file_in_var_stops_the_start_and_changes_nothing(tmp_path, smoke_model_path,
                                                                                  name, how):
    home = make_home(tmp_path / "home", smoke_model_path)
    victim = _victim(tmp_path / "victim")
    before = _snapshot(victim)
    (home / "var").mkdir()
    planted = home / "var" / name
    if how == "symlink":
        planted.symlink_to(victim / "thesis.docx")
    else:
        os.link(victim / "thesis.docx", planted)
    photo(home / "inbox" / "x.jpg", seed=1)
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=120)
    line = _one_line_78(out, str(planted), "link")
    assert ("rm " if how == "symlink" else "Move it elsewhere") in line
    assert _snapshot(victim) == before
    assert (home / "inbox" / "x.jpg").exists()


# -- 40: var/ledger.db.runs ------------------------------------------------------------------------------


def test_a_runs_folder_that_is_a_link_stops_the_start_and_deletes_nothing(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    victim = _victim(tmp_path / "victim")
    before = _snapshot(victim)
    (home / "var").mkdir()
    (home / "var" / "ledger.db.runs").symlink_to(victim)
    photo(home / "inbox" / "a.jpg", seed=2)
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=120)
    _one_line_78(out, "ledger.db.runs", "symbolic link", "rm ")
    assert _snapshot(victim) == before
    assert (home / "inbox" / "a.jpg").exists()


def test_the_run_lock_sweep_removes_only_run_locks(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    runs = home / "var" / "ledger.db.runs"
    runs.mkdir(parents=True)
    (runs / "notes.txt").write_text("not a lock\n")
    (runs / "0123456789abcdef.lock").symlink_to(tmp_path / "victim-file")
    (tmp_path / "victim-file").write_text("precious\n")
    (runs / "fedcba9876543210.lock").write_text("123\n")  # a dead process's run lock: Mondrian's to sweep
    photo(home / "inbox" / "a.jpg", seed=2)
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=120)
    assert out.returncode == 0, out.stderr
    assert (runs / "notes.txt").read_text() == "not a lock\n"
    assert (runs / "0123456789abcdef.lock").is_symlink()
    assert (tmp_path / "victim-file").read_text() == "precious\n"
    assert not (runs / "fedcba9876543210.lock").exists()


# -- 39, 44: the outbox's own folders --------------------------------------------------------------------


@pytest.mark.parametrize("folder", [".staging", "failed", "duplicates"])
def test_an_outbox_folder_of_mondrians_that_is_a_link_stops_the_start(tmp_path, smoke_model_path, folder):
    """... and its advice, pasted into a shell, removes only the link, even in a home whose name has a space (the
    unquoted `rm /Users/me/My Photos/...` would have removed `/Users/me/My` and `Photos/...`)."""
    home = make_home(tmp_path / "My Photos" / "home", smoke_model_path)
    victim = _victim(tmp_path / "victim")
    before = _snapshot(victim)
    (home / "outbox" / folder).symlink_to(victim)
    photo(home / "inbox" / "a.jpg", seed=3)
    shutil.copyfile(home / "inbox" / "a.jpg", home / "inbox" / "a-copy.jpg")  # a duplicate
    (home / "inbox" / "bad.jpg").write_text("not a photo\n")  # a failure
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=120)
    line = _one_line_78(out, str(home / "outbox" / folder), "symbolic link", "rm ")
    assert _snapshot(victim) == before
    assert sorted(p.name for p in (home / "inbox").iterdir()) == ["a-copy.jpg", "a.jpg", "bad.jpg"]
    done = subprocess.run(["bash", "-c", re.search(r"`(rm [^`]+)`", line).group(1)], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0 and not os.path.lexists(home / "outbox" / folder), done.stderr
    assert _snapshot(victim) == before and (tmp_path / "My Photos" / "home" / "inbox").is_dir()


@pytest.mark.parametrize("folder", ["failed", "duplicates", ".staging"])
def test_an_outbox_folder_replaced_by_a_link_while_running_carries_nothing_out(tmp_path, smoke_model_path,
                                                                               folder):
    home = make_home(tmp_path / "home", smoke_model_path, max_attempts=2)
    victim = _victim(tmp_path / "victim")
    before = _snapshot(victim)
    inbox, outbox = home / "inbox", home / "outbox"
    with Daemon(home, smoke_model_path) as daemon:
        _wait_started(daemon)
        if folder == "duplicates":
            photo(inbox / "a.jpg", seed=4)
            wait_for(lambda: status(home, smoke_model_path)["counts"]["done"] == 1, 120, what="a.jpg done")
        target = outbox / folder
        if target.exists():
            target.rmdir()
        target.symlink_to(victim)
        if folder == "failed":
            (inbox / "bad.jpg").write_text("not a photo\n")
        elif folder == "duplicates":
            photo(inbox / "a-copy.jpg", seed=4)
        else:
            photo(inbox / "b.jpg", seed=5)
        wait_for(lambda: status(home, smoke_model_path)["counts"]["queued"] == 0
                 and status(home, smoke_model_path)["counts"]["running"] == 0
                 and len(ledger_jobs(home)) == (2 if folder == "duplicates" else 1)
                 and all(j.state in ("done", "failed") for j in ledger_jobs(home).values()), 180,
                 what="the photo's last state")
        assert daemon.stop() == 0, daemon.output()
    assert _snapshot(victim) == before, daemon.output()
    jobs = ledger_jobs(home)
    assert all(j.state == "failed" for name, j in jobs.items() if name != "a.jpg"), jobs
    assert re.search(r"symbolic link", daemon.output()), daemon.output()
    if folder == "failed":
        assert (inbox / "bad.jpg").exists(), "a failed file that cannot be recorded stays in the inbox"


# -- 33, 19: one daemon per home, one daemon per inbox ------------------------------------------------------


def test_a_deleted_lock_file_does_not_let_a_second_daemon_serve_the_home(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    with Daemon(home, smoke_model_path) as first:
        _wait_started(first)
        info = status(home, smoke_model_path)["daemon"]
        assert (info["running"], info["pid"]) == (True, first.proc.pid), info
        (home / "var" / "daemon.lock").unlink()  # a "clean up stale pid files" script
        second = mondrian(home, smoke_model_path, "run", "--once", timeout=120)
        pid = f"pid {first.proc.pid}" if sys.platform.startswith("linux") else "pid ?"  # /proc/locks tells
        _one_line_78(second, "another Mondrian daemon", pid, str(home))
        info = status(home, smoke_model_path)["daemon"]
        assert info["running"] and info["pid"] in (first.proc.pid, -1), "status still sees the daemon"
        assert first.stop() == 0, first.output()
    info = status(home, smoke_model_path)["daemon"]
    assert (info["running"], info["pid"]) == (False, None), info


def _two_homes(tmp_path: Path, model: Path, folder: str) -> tuple[Path, Path, Path]:
    """(the one folder, home A, home B): two homes whose settings name the same `folder` ("inbox" or "outbox")."""
    shared = tmp_path / f"shared-{folder}"
    shared.mkdir()
    return (shared, make_home(tmp_path / "homeA", model, **{folder: str(shared)}),
            make_home(tmp_path / "homeB", model, **{folder: str(shared)}))


def test_two_homes_with_the_same_inbox_are_not_served_twice(tmp_path, smoke_model_path):
    shared, home_a, home_b = _two_homes(tmp_path, smoke_model_path, "inbox")
    with Daemon(home_a, smoke_model_path) as first:
        _wait_started(first)
        second = mondrian(home_b, smoke_model_path, "run", "--once", timeout=120)
        pid = f"pid {first.proc.pid}" if sys.platform.startswith("linux") else "another Mondrian daemon"
        line = _one_line_78(second, "another Mondrian daemon", pid, str(shared))
        assert str(home_b / "mondrian.toml") in line
        if sys.platform.startswith("linux"):  # a command that names the other daemon, not a placeholder to fill in
            ps = line.split("`ps ", 1)[1].split("`", 1)[0]
            named_cmd = subprocess.run(["ps", *ps.split()], capture_output=True, text=True).stdout
            assert "daemon" in named_cmd and "run" in named_cmd, (line, named_cmd)
        photo(shared / "p.jpg", seed=6)
        wait_for(lambda: status(home_a, smoke_model_path)["counts"]["done"] == 1, 120, what="p.jpg done")
        assert first.stop() == 0, first.output()
    assert not [p for p in shared.iterdir()], "nothing of Mondrian's is left in the inbox"
    # Once the first has stopped, the other home may serve the inbox.
    photo(shared / "q.jpg", seed=7)
    out = mondrian(home_b, smoke_model_path, "run", "--once", timeout=120)
    assert out.returncode == 0, out.stderr
    assert status(home_b, smoke_model_path)["counts"]["done"] == 1


def test_two_homes_with_the_same_outbox_are_not_served_twice(tmp_path, smoke_model_path):
    """Their ledgers number jobs alike, so both would stage `job-1` in the one outbox and file one photo's critique
    beside the other's photo: the second is refused, with what to change."""
    shared, home_a, home_b = _two_homes(tmp_path, smoke_model_path, "outbox")
    with Daemon(home_a, smoke_model_path) as first:
        _wait_started(first)
        photo(home_b / "inbox" / "b.jpg", seed=8)
        second = mondrian(home_b, smoke_model_path, "run", "--once", timeout=120)
        line = _one_line_78(second, "another Mondrian daemon", "already writing to the outbox", str(shared))
        assert str(home_b / "mondrian.toml") in line
        assert (home_b / "inbox" / "b.jpg").is_file()  # untouched: it waits for a home of its own outbox
        assert first.stop() == 0, first.output()
    out = mondrian(home_b, smoke_model_path, "run", "--once", timeout=120)  # the first stopped: it may now
    assert out.returncode == 0, out.stderr
    assert status(home_b, smoke_model_path)["counts"]["done"] == 1


# -- the same class elsewhere in the home: an advisor's adapter lock ---------------------------------------------


def test_an_adapter_lock_that_is_a_link_is_not_written_through(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    victim = _victim(tmp_path / "victim")
    before = _snapshot(victim)
    (home / "adapters" / "ansel").mkdir(parents=True)
    (home / "adapters" / "ansel" / ".lock").symlink_to(victim / "thesis.docx")
    out = mondrian(home, smoke_model_path, "adapters", "rollback", "--advisor", "ansel")
    assert _snapshot(victim) == before, "a file outside the home was truncated through the adapter lock"
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "symbolic link" in out.stderr and "rm " in out.stderr, out.stderr


def test_an_adapter_lock_that_is_a_folder_is_named_not_the_folder_above(tmp_path, smoke_model_path):
    """Attack: a folder at adapters/ansel/.lock: "cannot write in the adapters folder …/ansel (Is a directory):
    check that it exists and is writable", which it was. The message names `.lock` and what to do."""
    home = make_home(tmp_path / "home", smoke_model_path)
    (home / "adapters" / "ansel" / ".lock").mkdir(parents=True)
    out = mondrian(home, smoke_model_path, "adapters", "rollback", "--advisor", "ansel")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"{home / 'adapters' / 'ansel' / '.lock'} is a folder" in out.stderr and "Move it" in out.stderr, out.stderr


@pytest.mark.parametrize("folder", ["var", "var/logs", "var/models", "var/cache", "var/datasets", "adapters",
                                    "adapters/ansel", "advisors"])
def test_a_folder_of_mondrians_in_var_or_adapters_that_is_a_link_stops_the_start(tmp_path, smoke_model_path,
                                                                                 folder):
    home = make_home(tmp_path / "home", smoke_model_path)
    victim = _victim(tmp_path / "victim")
    before = _snapshot(victim)
    (home / folder).parent.mkdir(parents=True, exist_ok=True)
    (home / folder).symlink_to(victim)
    photo(home / "inbox" / "a.jpg", seed=3)
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=120)
    _one_line_78(out, str(home / folder), "symbolic link", "rm ")
    assert _snapshot(victim) == before


@pytest.mark.parametrize("folder", ["inbox", "outbox"])
def test_an_inbox_or_outbox_made_anew_while_running_is_not_served_by_a_second_home(tmp_path, smoke_model_path, folder):
    """The lock held the folder Mondrian started on: deleted and made again (or a drive plugged back), the new one
    was free, another home's daemon started on it, and photos were critiqued by both. The running daemon locks the
    new folder within seconds, so the second is refused; and a second that got in first stops the first, saying
    why (exit 78), rather than both serving it."""
    shared, home_a, home_b = _two_homes(tmp_path, smoke_model_path, folder)
    with Daemon(home_a, smoke_model_path) as first:
        _wait_started(first)
        shutil.rmtree(shared)
        shared.mkdir()
        time.sleep(7)  # the first daemon's next look at its folders (every 5 s)
        second = mondrian(home_b, smoke_model_path, "run", "--once", timeout=120)
        _one_line_78(second, "another Mondrian daemon", str(shared))
        assert first.proc.poll() is None, first.output()

        # The other way round: the second home starts on the new folder before the first has looked (held stopped
        # meanwhile: a second daemon starting on a loaded machine took longer than the first's 5 s between looks).
        first.signal(signal.SIGSTOP)
        try:
            shutil.rmtree(shared)
            shared.mkdir()
            with Daemon(home_b, smoke_model_path) as other:
                try:
                    _wait_started(other)
                finally:
                    first.signal(signal.SIGCONT)
                assert first.wait(30) == 78, first.output()
                assert "made anew while Mondrian ran" in first.output() and "this one stops" in first.output()
                assert other.proc.poll() is None
                assert other.stop() == 0
        finally:
            first.signal(signal.SIGCONT)
