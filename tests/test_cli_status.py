"""`mondrian status` and `status --watch` (issue 13): what is queued, delayed, in progress (with an ETA), what failed
and what to do about it. Real daemon processes, a real SIGSTOP mid-analysis, real SIGINT."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.harness import REPO, Daemon, env_for, make_home, mondrian, photo, status, wait_for
from tests.terminal_run import in_terminal


def _stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP): state T in /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except OSError:
        return False


def _delay_a_job(home: Path, name: str, seconds: float) -> None:
    """A job waiting out a backoff, as a transient fault leaves it (queued, claimed, put back with a delay)."""
    from daemon.ledger import Ledger

    ledger = Ledger(home / "var" / "ledger.db")
    try:
        job = ledger.enqueue(home / "inbox" / name, name, "ansel", "default", 1, 1.0)
        assert ledger.claim().id == job.id
        ledger.retry_later(job.id, "the outbox could not be written (No space left on device)", seconds)
    finally:
        ledger.close()


def test_status_shows_delayed_jobs_the_photo_in_progress_with_an_eta_and_what_to_do(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox = home / "inbox"
    for i in range(3):
        photo(inbox / f"p{i}.jpg", seed=i, size=(64, 48))
    (inbox / "notes.jpg").write_text("not a photo\n")
    # The third photo to reach the model stops the daemon there: two are done, one is in progress.
    with Daemon(home, smoke_model_path, MONDRIAN_TEST_STOP_AT="analysing:3") as d:
        wait_for(lambda: _stopped(d.proc.pid) or d.proc.poll() is not None, 120, what="the third analysis")
        assert d.proc.poll() is None, d.output()
        _delay_a_job(home, "later.jpg", 3600)
        info = status(home, smoke_model_path)
        text = mondrian(home, smoke_model_path, "status").stdout
        d.kill()

    assert info["queue"] == {"queued": 0, "delayed": 1, "running": 1, "failed": 1}, info["queue"]
    (delayed,) = info["delayed"]
    assert delayed["file"] == "later.jpg" and delayed["next_try_at"] > time.time() + 3000, delayed
    assert "No space left" in delayed["reason"] and delayed["attempts"] == 1
    (now,) = info["running"]
    eta = info["eta"]
    assert eta["based_on_photos"] == 2 and eta["typical_photo_s"] is not None, eta
    assert now["eta_s"] is not None and eta["queue_s"] is not None, (now, eta)
    (failure,) = info["recent_failures"]
    assert failure["file"] == "notes.jpg" and "re-export" in failure["next_step"], failure

    assert "1 delayed after a fault, next try" in text, text
    assert "Delayed: later.jpg: try 2 at" in text and "No space left" in text, text
    now_line = text.split("Now:", 1)[1].splitlines()[0]
    assert any(words in now_line for words in (" left", "about to finish", "longer than the usual")), now_line
    assert "Queue:   about" in text and "left for 1 photo(s)" in text and "from the last 2" in text, text
    assert "    next: fix or re-export the photo" in text, text
    print("\n" + text)


def test_status_watch_prints_snapshots_until_ctrl_c_and_exits_cleanly(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    for as_json in (False, True):
        args = ["status", "--watch", "0.2"] + (["--json"] if as_json else [])
        proc = subprocess.Popen([sys.executable, "-m", "daemon", *args], env=env_for(home, smoke_model_path),
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            lines: list[str] = []
            marker = '{"home"' if as_json else "--- "
            while sum(line.startswith(marker) for line in lines) < 3:
                line = proc.stdout.readline()
                assert line, f"status --watch ended early: {proc.wait()}\n{proc.stderr.read()}"
                lines.append(line)
            # Ctrl-C, and a TERM (a supervisor, `kill`): either ends the watch cleanly after the snapshot in hand.
            proc.send_signal(signal.SIGTERM if as_json else signal.SIGINT)
            rc = proc.wait(timeout=30)
            err = proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert rc == 0 and "Traceback" not in err, (rc, err)
        if as_json:
            snapshots = [json.loads(line) for line in lines]
            assert all(s["home"] == str(home) and "queue" in s for s in snapshots)
        else:
            assert sum(line.startswith("Mondrian home:") for line in lines) >= 2, lines

    # On a terminal each snapshot replaces the last (the screen is cleared), and Ctrl-C ends it quietly.
    rc, out = in_terminal(home, smoke_model_path, "status", "--watch", "0.2", timeout=120,
                          signal_on=("\x1b[H\x1b[2J", 2))
    assert rc == 0 and "Traceback" not in out, out
    assert out.count("\x1b[H\x1b[2J") >= 2 and "Ctrl-C to stop" in out, out

    for wrong in ("0", "nan", "inf", "1e-300"):  # 1e-300 redrew with no pause until killed
        bad = mondrian(home, smoke_model_path, "status", "--watch", wrong)
        assert bad.returncode == 2 and "from 0.1 to 86400" in bad.stderr, bad.stderr


def test_status_counts_and_lists_the_ledger_of_one_moment(tmp_path, smoke_model_path):
    """Attack: a photo claimed between `status` counting the states and listing the jobs in progress was counted
    queued and listed in progress (running 0 beside one job in progress). Status reads one snapshot of the ledger:
    here it is stopped right after counting, the photo is claimed, and it goes on."""
    from daemon.ledger import Ledger

    home = make_home(tmp_path / "home", smoke_model_path)
    ledger = Ledger(home / "var" / "ledger.db")
    try:
        job = ledger.enqueue(home / "inbox" / "a.jpg", "a.jpg", "ansel", "default", 1, 1.0)
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "status", "--json"], cwd=REPO, text=True,
                                env=env_for(home, smoke_model_path, MONDRIAN_TEST_STOP_AT="status_counted"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: _stopped(proc.pid) or proc.poll() is not None, timeout=60, what="status to count")
            assert proc.poll() is None, proc.communicate()
            assert ledger.claim().id == job.id  # written while the status reads: the WAL lets it
        finally:
            proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
    finally:
        ledger.close()
    assert proc.returncode == 0, err
    shown = json.loads(out)
    listed = len(shown["running"]) + len(shown["interrupted"])
    assert (shown["counts"]["queued"], shown["counts"]["running"], listed) == (1, 0, 0), shown
    assert shown["queue"]["queued"] + shown["queue"]["delayed"] == shown["counts"]["queued"], shown


def test_a_sidecar_saved_after_its_photo_was_taken_in_is_named_by_status_not_left_unexplained(tmp_path,
                                                                                           smoke_model_path):
    """`IMG_9.mode` written a few seconds after IMG_9.jpg (Finder, then a text editor): the photo was analysed in
    the default mode and moved to its report; the sidecar stayed in the inbox with nothing to use it and nothing
    saying so. `status` names it and what to do, once it has been alone longer than a sidecar that merely came
    before its photo would be (a minute; the test hook shortens it)."""
    home = make_home(tmp_path / "home", smoke_model_path, max_pixels=56 * 56, comment_max_chars=8, max_tokens=400,
                     quiet_seconds=0.2, api_port=0)
    inbox = home / "inbox"
    photo(inbox / "IMG_9.jpg", seed=9, size=(64, 48))
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=240).returncode == 0
    assert not (inbox / "IMG_9.jpg").exists()
    (inbox / "IMG_9.mode").write_text("rag\n")
    (inbox / "album").mkdir()
    (inbox / "album" / "DSC_1.XMP").write_text("<x/>")  # an editor's sidecar left behind too
    photo(inbox / "waiting.jpg", seed=3, size=(64, 48))
    (inbox / "waiting.mode").write_text("rag\n")  # with its photo: not stray
    now = mondrian(home, smoke_model_path, "status", timeout=60)
    assert now.returncode == 0 and "Sidecar:" not in now.stdout, now.stdout  # just written: may precede its photo
    later = mondrian(home, smoke_model_path, "status", timeout=60, MONDRIAN_TEST_STRAY_SECONDS="0")
    lines = [line for line in later.stdout.splitlines() if line.startswith("Sidecar:")]
    assert len(lines) == 2, later.stdout
    assert "inbox/IMG_9.mode has no photo beside it" in lines[0] and "drop the photo again" in lines[0], lines
    assert "inbox/album/DSC_1.XMP" in lines[1], lines
    as_json = json.loads(mondrian(home, smoke_model_path, "status", "--json", timeout=60,
                                  MONDRIAN_TEST_STRAY_SECONDS="0").stdout)
    assert as_json["stray_sidecars"] == ["IMG_9.mode", "album/DSC_1.XMP"], as_json["stray_sidecars"]


def test_photos_sitting_in_the_inbox_unqueued_are_counted_not_shown_as_an_empty_queue(tmp_path, smoke_model_path):
    """Photos dropped while no daemon runs, or while it cannot write its ledger (another program holds a write
    lock), are in no queue yet: `status` counted them "0 queued", as for an empty inbox. It says how many wait in
    the inbox and why, and leaves out what the ledger answers for: a photo in progress, one kept in place and
    done (keep_originals), one that failed and was left where it is."""
    from tests.harness import hold_ledger_lock

    home = make_home(tmp_path / "home", smoke_model_path, keep_originals=True)
    inbox = home / "inbox"
    photo(inbox / "kept.jpg", seed=1)
    (inbox / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole JPEG")
    (inbox / "kept.mode").write_text("baseline\n")  # a sidecar is no photo of its own
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0
    assert status(home, smoke_model_path)["inbox_waiting"]["count"] == 0  # done in place, failed in place

    for i in range(4):
        photo(inbox / "cartier" / f"new-{i}.jpg", seed=10 + i)
    from daemon.ledger import Ledger

    ledger = Ledger(home / "var" / "ledger.db")  # one already queued, as a daemon stopped since left it
    try:
        queued = inbox / "cartier" / "new-3.jpg"
        ledger.enqueue(queued, "cartier/new-3.jpg", "cartier", "folder", queued.stat().st_size, queued.stat().st_mtime)
    finally:
        ledger.close()
    info = status(home, smoke_model_path)
    assert info["queue"]["queued"] == 1 and info["inbox_waiting"]["count"] == 3, info["inbox_waiting"]
    assert info["inbox_waiting"]["examples"] == ["cartier/new-0.jpg", "cartier/new-1.jpg", "cartier/new-2.jpg"]
    out = mondrian(home, smoke_model_path, "status").stdout
    assert "Inbox:   3 photo(s) not queued yet (cartier/new-0.jpg, cartier/new-1.jpg, cartier/new-2.jpg): the " \
           "daemon takes them in when it runs" in out, out

    # A daemon that cannot write its ledger: the photos are still in no queue, and said to be waiting.
    holder = hold_ledger_lock(home / "var" / "ledger.db", 60)
    try:
        with Daemon(home, smoke_model_path) as d:
            time.sleep(6)
            info = status(home, smoke_model_path)
            assert info["inbox_waiting"]["count"] == 3, info["inbox_waiting"]
            assert "Inbox:   3 photo(s)" in mondrian(home, smoke_model_path, "status").stdout
            holder.kill()
            holder.wait()
            # once it can write, it takes them in, and they are no longer waiting in the inbox
            wait_for(lambda: status(home, smoke_model_path)["counts"]["done"] == 5, 180, what="the four reports")
            assert status(home, smoke_model_path)["inbox_waiting"]["count"] == 0
            assert "Inbox:" not in mondrian(home, smoke_model_path, "status").stdout
            d.stop()
    finally:
        holder.kill()


def test_photos_moved_within_the_inbox_are_not_called_removed(tmp_path, smoke_model_path):
    """An album renamed while its photos were queued: each got its report under the new name, yet `status` said
    "6 removed before analysis"; nothing was removed."""
    home = make_home(tmp_path / "home", smoke_model_path)
    for i in range(2):
        photo(home / "inbox" / "album" / f"a{i}.jpg", seed=90 + i, size=(64, 48))
    with Daemon(home, smoke_model_path, MONDRIAN_TEST_STOP_AT="claimed") as d:
        wait_for(lambda: _stopped(d.proc.pid), 120, what="the daemon held with a photo claimed")
        (home / "inbox" / "album").rename(home / "inbox" / "album 2")
        d.signal(signal.SIGCONT)
        wait_for(lambda: status(home, smoke_model_path)["counts"]["done"] == 2, 120, what="both photos done")
        d.stop()
    said = mondrian(home, smoke_model_path, "status").stdout
    assert "removed" not in said and "left their place before analysis (moved, renamed or deleted)" in said, said


def test_a_name_that_is_not_utf8_is_said_to_be_left_alone_with_a_rename_that_works(tmp_path, smoke_model_path):
    """A name in another encoding (a Linux NAS, an old camera card) is left alone by the watcher, yet `status` called
    it "arriving: queued once it has stopped changing" for its first minute, then blamed an unexplained cause. It is
    counted apart at once, with the `mv` that fixes it; pasted, the photo is analysed."""
    import os
    import re

    home = make_home(tmp_path / "home", smoke_model_path, rescan_seconds=1)
    inbox = home / "inbox"
    bad = Path(os.fsdecode(bytes(inbox) + b"/No\xebl.jpg"))
    photo(bad, seed=3)
    with Daemon(home, smoke_model_path) as d:
        wait_for(lambda: "left alone" in d.output(), 60, what="the watcher's warning")
        out = mondrian(home, smoke_model_path, "status").stdout
        assert "arriving" not in out and "not queued" not in out, out
        line = next(line for line in out.splitlines() if "not valid UTF-8" in line)
        assert line.startswith("Inbox:   1 file(s) left alone"), line
        command = re.search(r"`(mv [^`]+)`", line).group(1)
        assert command in d.output(), d.output()[-2000:]  # the log gives the same advice
        assert subprocess.run(["bash", "-c", command], capture_output=True).returncode == 0
        wait_for(lambda: status(home, smoke_model_path)["counts"]["done"] == 1, 120, what="the renamed photo's report")
        assert "UTF-8" not in mondrian(home, smoke_model_path, "status").stdout
        assert d.stop() == 0


def test_a_link_out_of_the_inbox_gets_advice_that_works_when_followed(tmp_path, smoke_model_path):
    """Attack: a link to a photo outside the inbox failed rightly ("copy the photo itself"), but `status` said "fix or
    re-export the photo … `retry --failed --all` forces it": that brought the link back, to fail again. `status`
    says what the record says; following it, the photo is critiqued and the failure is gone from `status`."""
    import shutil

    home = make_home(tmp_path / "home", smoke_model_path)
    outside = photo(tmp_path / "elsewhere" / "linked.jpg", seed=3, size=(64, 48))
    (home / "inbox" / "linked.jpg").symlink_to(outside)
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0
    (failure,) = status(home, smoke_model_path)["recent_failures"]
    assert failure["next_step"].startswith("copy the photo itself (not a link or an alias) into the inbox"), failure
    assert "retry" not in failure["next_step"], failure
    shutil.copy2(outside, home / "inbox" / "linked.jpg")  # what it says
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0
    after = status(home, smoke_model_path)
    assert not after["recent_failures"] and after["counts"]["done"] == 1, after["recent_failures"]


def test_status_names_a_download_left_unfinished_in_the_inbox(tmp_path: Path, smoke_model_path: Path) -> None:
    """Attack: a browser download that failed (`x.jpg.crdownload`) or a copy cut off (`x.jpg.part`) sits in the inbox
    for good: Mondrian rightly waits for its real name, and nothing ever said so. After an hour unchanged, `status`
    names it and what to do; one still being written, or a hidden file, is not named."""
    import os

    home = make_home(tmp_path / "home", smoke_model_path)
    inbox = home / "inbox"
    (inbox / "trip").mkdir()
    old = time.time() - 3 * 3600
    for name in ("beach.jpg.crdownload", "trip/dunes.JPG.part"):
        (inbox / name).write_bytes(b"\xff\xd8\xff half a photo")
        os.utime(inbox / name, (old, old))
    (inbox / "arriving.jpg.part").write_bytes(b"\xff\xd8")  # still being written
    (inbox / ".hidden.jpg.part").write_bytes(b"\xff\xd8")
    os.utime(inbox / ".hidden.jpg.part", (old, old))
    info = status(home, smoke_model_path)
    assert [d["file"] for d in info["stale_downloads"]] == ["beach.jpg.crdownload", "trip/dunes.JPG.part"], info
    text = mondrian(home, smoke_model_path, "status").stdout
    assert re.search(r"Inbox:   beach\.jpg\.crdownload has not changed for 3 h 0\d min: an unfinished download", text), \
        text  # (a loaded machine may take a minute between the two)
    assert "trip/dunes.JPG.part" in text and "arriving.jpg.part" not in text and ".hidden" not in text, text
    assert "download or copy the photo again, then delete this leftover" in text
