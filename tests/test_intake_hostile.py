"""The inbox watcher against what photographers and hostile users do to a watched folder: albums moved in holding links
to folders, an inbox that comes and goes (a flaky drive), an inbox that is itself a link, Finder's leftovers. Each test
drives the real daemon, its real watchdog observer on real folders and the smoke model."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.harness import Daemon, ledger_jobs, make_home, mondrian, photo, reports, wait_for

FAST = {"quiet_seconds": 0.3}


def _settled(home: Path, names: set[str]) -> dict:
    jobs = ledger_jobs(home)
    if names <= set(jobs) and all(jobs[n].state in ("done", "failed", "gone") for n in jobs):
        return jobs
    return {}


def test_an_album_moved_in_with_links_to_folders_queues_each_photo_once_under_its_own_name(tmp_path, smoke_model_path):
    """An album moved (renamed) into the inbox holding `up -> ..` and a link to a folder outside the inbox: watchdog
    reports those links as created folders, and walking them queued every photo of the inbox a second time under
    `album/up/...` (each then "removed from the inbox before it was analysed", or analysed under the wrong name and
    advisor if it got there first), and every photo of the outside folder. Each photo is queued once, as itself; each
    link is refused as a link."""
    home = make_home(tmp_path / "home", smoke_model_path, **FAST, rescan_seconds=30)
    inbox = home / "inbox"
    outside = tmp_path / "elsewhere"
    photo(outside / "private.jpg", seed=9)
    stage = tmp_path / "stage" / "album"
    photo(stage / "b.jpg", seed=2)
    os.symlink("..", stage / "up")
    os.symlink(outside, stage / "ext")
    with Daemon(home, smoke_model_path) as daemon:
        wait_for(lambda: "model ready" in daemon.output(), 120, what="the daemon to start")
        photo(inbox / "a.jpg", seed=1)
        wait_for(lambda: _settled(home, {"a.jpg"}), 60, what="a.jpg to be analysed")
        photo(inbox / "c.jpg", seed=3)  # still settling when the album arrives
        os.rename(stage, inbox / "album")
        jobs = wait_for(lambda: _settled(home, {"a.jpg", "c.jpg", "album/b.jpg", "album/up", "album/ext"}), 90,
                        what="the album to be finished")
        time.sleep(2)  # anything queued late through a link would show up now
        jobs = ledger_jobs(home)
        assert daemon.proc.poll() is None, daemon.output()
    assert set(jobs) == {"a.jpg", "c.jpg", "album/b.jpg", "album/up", "album/ext"}, sorted(jobs)
    assert {n: jobs[n].state for n in ("a.jpg", "c.jpg", "album/b.jpg")} == dict.fromkeys(
        ("a.jpg", "c.jpg", "album/b.jpg"), "done")
    assert jobs["album/up"].state == "failed" and jobs["album/ext"].state == "failed", (jobs["album/up"].error,
                                                                                      jobs["album/ext"].error)
    assert (outside / "private.jpg").exists(), "a photo outside the inbox was touched"
    # Named for what it is: "this is a folder" sent people looking for a folder in the album.
    assert "this is a symbolic link to a folder (..)" in jobs["album/up"].error, jobs["album/up"].error


def test_an_inbox_that_vanishes_again_after_coming_back_does_not_stop_the_daemon(tmp_path, smoke_model_path):
    """A flaky drive: the inbox goes, comes back, and goes again before the next rescan. The observer watching the
    first inbox died with it, so the rescan restarts it, on a folder that is not there: that OSError escaped the main
    loop and the daemon died with a traceback. It now waits, and watches the inbox again once it is back."""
    inbox = tmp_path / "drive" / "inbox"  # on the drive: an inbox inside the home that goes is made again
    inbox.mkdir(parents=True)
    home = make_home(tmp_path / "home", smoke_model_path, **FAST, rescan_seconds=2, inbox=str(inbox))
    with Daemon(home, smoke_model_path) as daemon:
        wait_for(lambda: "model ready" in daemon.output(), 120, what="the daemon to start")
        os.rmdir(inbox)
        wait_for(lambda: "is not there" in daemon.output(), 30, what="the daemon to notice the inbox is gone")
        inbox.mkdir()
        wait_for(lambda: "is back; looking at what it holds" in daemon.output(), 30, 0.05,
                 what="the daemon to see the inbox back")
        os.rmdir(inbox)  # before the next rescan, which finds the observer's canary unseen
        time.sleep(5)  # two rescans
        assert daemon.proc.poll() is None, daemon.output()
        inbox.mkdir()
        photo(inbox / "a.jpg", seed=1)
        jobs = wait_for(lambda: _settled(home, {"a.jpg"}), 60, what="a photo dropped once the inbox is back")
        assert jobs["a.jpg"].state == "done", jobs["a.jpg"].error
        assert "Traceback" not in daemon.output(), daemon.output()
        assert daemon.stop() == 0, daemon.output()


def test_an_inbox_deleted_and_made_again_is_watched_at_once(tmp_path, smoke_model_path):
    """`rmdir inbox; mkdir inbox` (a sync tool, a script that "cleans up") between two rescans: the daemon locked the
    new folder, yet its observer still watched the old one, so photos dropped there waited for a rescan (up to two)
    while `status` called them arriving. The observer moves to the new folder when the daemon locks it."""
    home = make_home(tmp_path / "home", smoke_model_path, **FAST, rescan_seconds=600)
    inbox = home / "inbox"
    with Daemon(home, smoke_model_path) as daemon:
        wait_for(lambda: "model ready" in daemon.output(), 120, what="the daemon to start")
        os.rmdir(inbox)
        inbox.mkdir()
        wait_for(lambda: "made anew while Mondrian ran" in daemon.output(), 30, what="the daemon to lock it again")
        time.sleep(1)
        photo(inbox / "a.jpg", seed=1)
        jobs = wait_for(lambda: _settled(home, {"a.jpg"}), 60, 0.1, what="a photo dropped into the new inbox")
        assert jobs["a.jpg"].state == "done", jobs["a.jpg"].error
        assert daemon.proc.poll() is None and "Traceback" not in daemon.output(), daemon.output()
        assert daemon.stop() == 0, daemon.output()


def test_an_inbox_replaced_by_a_link_to_a_folder_is_watched(tmp_path, smoke_model_path):
    """While Mondrian runs, the inbox is moved aside and replaced by a link to a folder on a drive (`inbox ->
    /Volumes/Photos/inbox`). Watchdog watched the link itself, which brings no event from inside the folder: the
    observer was taken for stalled and restarted at every rescan (a warning each time, forever) and photos were seen
    only by the rescans. It is restarted once, on the folder the link leads to, and photos are seen at once."""
    drive = tmp_path / "drive" / "inbox"
    drive.mkdir(parents=True)
    home = make_home(tmp_path / "home", smoke_model_path, **FAST, rescan_seconds=2)
    inbox = home / "inbox"
    with Daemon(home, smoke_model_path) as daemon:
        wait_for(lambda: "model ready" in daemon.output(), 120, what="the daemon to start")
        inbox.rename(home / "inbox.old")
        os.symlink(drive, inbox)
        time.sleep(7)  # a few rescans: the first finds the observer watching the old folder, and restarts it
        restarts = daemon.output().count("restarting it")
        assert restarts <= 1, daemon.output()
        photo(drive / "a.jpg", seed=1)
        photo(inbox / "album" / "b.jpg", seed=2)
        jobs = wait_for(lambda: _settled(home, {"a.jpg", "album/b.jpg"}), 60, 0.1, what="the photos to be analysed")
        assert {jobs[n].state for n in jobs} == {"done"}, {n: (j.state, j.error) for n, j in jobs.items()}
        time.sleep(5)  # more rescans, each of which checks the observer
        assert daemon.output().count("restarting it") == restarts, daemon.output()
        assert daemon.proc.poll() is None and "Traceback" not in daemon.output(), daemon.output()
        assert daemon.stop() == 0, daemon.output()
    assert (home / "outbox" / "a" / "report.json").exists() and not (drive / "a.jpg").exists()


def test_finders_folder_icon_file_and_windows_thumbnail_caches_are_left_alone(tmp_path, smoke_model_path):
    """An album copied from a Mac holds `Icon\\r`, the empty file Finder keeps a folder's custom icon in (hidden in
    Finder). Taken for a photo, it failed as "the file is empty (0 bytes); copy the photo again". One copied from a
    PC holds Explorer's `Thumbs.db` and `desktop.ini`, which failed as "not a photo" and were moved to failed/."""
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    stage = tmp_path / "stage" / "Holiday"
    photo(stage / "a.jpg", seed=1)
    (stage / "Icon\r").write_bytes(b"")
    (stage / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(4088))  # an OLE2 file
    (stage / "desktop.ini").write_text("[.ShellClassInfo]\r\nIconResource=C:\\icon.ico,0\r\n")
    (tmp_path / "stage" / "Icon\r").write_bytes(b"")
    with Daemon(home, smoke_model_path) as daemon:
        wait_for(lambda: "model ready" in daemon.output(), 120, what="the daemon to start")
        os.rename(stage, home / "inbox" / "Holiday")
        os.rename(tmp_path / "stage" / "Icon\r", home / "inbox" / "Icon\r")
        wait_for(lambda: _settled(home, {"Holiday/a.jpg"}), 60, what="the album to be analysed")
        time.sleep(13)  # an empty file is waited for 10 s before it is handed on
        jobs = ledger_jobs(home)
        assert daemon.stop() == 0, daemon.output()
    assert set(jobs) == {"Holiday/a.jpg"}, {n: (j.state, j.error) for n, j in jobs.items()}
    assert jobs["Holiday/a.jpg"].state == "done"
    assert (home / "inbox" / "Holiday" / "Icon\r").exists() and (home / "inbox" / "Icon\r").exists()
    assert (home / "inbox" / "Holiday" / "Thumbs.db").exists() and (home / "inbox" / "Holiday" / "desktop.ini").exists()
    assert not (home / "outbox" / "failed").exists() or not any((home / "outbox" / "failed").iterdir())


def test_a_mode_sidecar_named_in_another_unicode_form_still_speaks_for_its_photo(tmp_path, smoke_model_path):
    """A Mac writes `é` decomposed (NFD) in names it copies; the photo exported elsewhere has it composed (NFC). On
    APFS either finds the other; on Linux the two are different names, and the sidecar was left in the inbox while
    its photo got the default mode."""
    import json
    import unicodedata

    home = make_home(tmp_path / "home", smoke_model_path)
    photo(home / "inbox" / unicodedata.normalize("NFC", "café.jpg"), seed=12)
    sidecar = home / "inbox" / unicodedata.normalize("NFD", "café.mode")
    sidecar.write_text("rag\n")
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0
    (report,) = reports(home / "outbox")
    mode = json.loads(report.read_text())["mode"]
    assert (mode["requested"], mode["source"]) == ("rag", "sidecar"), mode
    assert not sidecar.exists() and [p.read_text() for p in report.parent.glob("*.mode")] == ["rag\n"]


def test_a_canary_left_by_a_killed_daemon_is_swept_and_nothing_else(tmp_path, smoke_model_path):
    """The watcher's liveness canary (`.mondrian-watch.<12 hex>`) lives for an instant; a SIGKILL in that instant left
    it in the inbox for good. The next start removes it, and never a look-alike that is not an empty file."""
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox = home / "inbox"
    (inbox / ".mondrian-watch.0123456789ab").write_bytes(b"")
    (inbox / ".mondrian-watch.notacanary").write_bytes(b"")
    (inbox / ".mondrian-watch.aaaaaaaaaaaa").write_bytes(b"someone's")
    (tmp_path / "theirs").write_bytes(b"")
    (inbox / ".mondrian-watch.bbbbbbbbbbbb").symlink_to(tmp_path / "theirs")
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0
    assert sorted(p.name for p in inbox.iterdir()) == [".mondrian-watch.aaaaaaaaaaaa", ".mondrian-watch.bbbbbbbbbbbb",
                                                       ".mondrian-watch.notacanary"]
    assert (tmp_path / "theirs").exists()


def test_a_mode_sidecar_of_two_lines_is_said_plainly_and_escaped_once(tmp_path):
    """`baseline` then `lora` on two lines: the reason says there is more than one line and shows the break once
    escaped (`baseline\\nlora`), not twice as repr of an escaped text did (`baseline\\\\nlora` in the record)."""
    from daemon.intake.inbox import SidecarError, read_sidecar

    sidecar = tmp_path / "p.mode"
    sidecar.write_text("baseline\nlora\n")
    with pytest.raises(SidecarError) as e:
        read_sidecar(sidecar)
    assert "more than one line ('baseline\\nlora')" in str(e.value), str(e.value)
    sidecar.write_text("fast\x07")
    with pytest.raises(SidecarError) as e:
        read_sidecar(sidecar)
    assert "asks for mode 'fast\\x07', which is unknown" in str(e.value), str(e.value)
