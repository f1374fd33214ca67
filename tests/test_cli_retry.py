"""`mondrian retry` (issue 13): permanent failures are skipped until something changed (or `--all`), and plain
`retry` explains itself. Real daemon runs, real files changed the way a person fixes them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import hold_ledger_lock, ledger_jobs, make_home, mondrian, photo, status
from tests.test_rag import _scores, _sidecar


def _transient_failure(home: Path, name: str) -> None:
    """A photo that gave up after transient faults (a full disk, say), as the worker records it."""
    from daemon.ledger import Ledger

    src = photo(home / "inbox" / name, seed=7, size=(64, 48))
    ledger = Ledger(home / "var" / "ledger.db")
    try:
        job = ledger.enqueue(src, name, "ansel", "default", src.stat().st_size, src.stat().st_mtime)
        assert ledger.claim().id == job.id
        ledger.fail(job.id, "the outbox could not be written (No space left on device); gave up after 4 attempts",
                    None, kind="transient")
    finally:
        ledger.close()


def test_retry_skips_unchanged_permanent_failures_unless_all_and_plain_retry_explains(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    failed = home / "outbox" / "failed"
    (home / "inbox" / "corrupt.jpg").write_text("not a photo\n")
    (home / "inbox" / "fixme.jpg").write_text("not a photo either\n")
    out = mondrian(home, smoke_model_path, "run", "--once")
    assert out.returncode == 0, out.stderr
    assert {n: (j.state, j.error_kind) for n, j in ledger_jobs(home).items()} == {
        "corrupt.jpg": ("failed", "permanent"), "fixme.jpg": ("failed", "permanent")}
    _transient_failure(home, "busy.jpg")

    plain = mondrian(home, smoke_model_path, "retry")
    assert plain.returncode == 0, plain.stderr
    assert "nothing was queued" in plain.stdout and "3 photo(s) failed, 2 of them permanently" in plain.stdout, \
        plain.stdout
    assert "--failed --all" in plain.stdout
    assert all(j.state == "failed" for j in ledger_jobs(home).values())

    photo(failed / "fixme.jpg", seed=3, size=(64, 48))  # the person re-exported it where the record is
    retried = mondrian(home, smoke_model_path, "retry", "--failed")
    assert retried.returncode == 0, retried.stderr
    assert "fixme.jpg" in retried.stdout and "busy.jpg" in retried.stdout, retried.stdout
    assert "corrupt.jpg" not in retried.stdout, retried.stdout
    assert "skipped 1 permanent failure(s)" in retried.stderr and "corrupt.jpg" in retried.stderr, retried.stderr
    assert "--failed --all" in retried.stderr and "2 photo(s) queued again" in retried.stderr, retried.stderr
    assert (failed / "corrupt.jpg").exists() and (failed / "corrupt.jpg.error.json").exists()

    out = mondrian(home, smoke_model_path, "run", "--once")
    assert out.returncode == 0, out.stderr
    jobs = ledger_jobs(home)
    assert (jobs["fixme.jpg"].state, jobs["busy.jpg"].state, jobs["corrupt.jpg"].state) == ("done", "done", "failed")

    again = mondrian(home, smoke_model_path, "retry", "--failed", "--all")
    assert again.returncode == 0 and "corrupt.jpg" in again.stdout and "skipped" not in again.stderr, again.stderr
    assert ledger_jobs(home)["corrupt.jpg"].state == "queued"
    print(f"\n$ mondrian retry\n{plain.stdout}$ mondrian retry --failed\n{retried.stderr}")


def test_hints_name_the_home_they_came_from_so_following_them_works(tmp_path, smoke_model_path):
    """A home given with --home (a studio's, a second one) and no MONDRIAN_HOME in the shell: every command a message
    names carries that --home, so pasting it acts on this home, not on the default one."""
    import json
    import os
    import shlex
    from daemon import hints
    from daemon.config import default_home
    from tests.harness import REPO

    home = make_home(tmp_path / "my photos" / "Mondrian home", smoke_model_path)  # a space: the hint must quote it
    env = {k: v for k, v in os.environ.items() if k not in ("MONDRIAN_HOME", "ANALYSIS_MODE")}
    env.update(MONDRIAN_MODEL=str(smoke_model_path), HF_HUB_OFFLINE="1")

    def pasted(command: str) -> subprocess.CompletedProcess:
        """Run a command as a person pastes it from a message, from another folder."""
        words = shlex.split(command)
        assert words[0] == "mondrian", command
        return subprocess.run([sys.executable, "-m", "daemon", *words[1:]], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=180)

    photo(home / "inbox" / "fixme.jpg", seed=3, size=(64, 48))
    (home / "inbox" / "fixme.mode").write_text("portrait\n")  # not a mode: the photo fails, the sidecar is at fault
    ran = pasted(f"mondrian --home {shlex.quote(str(home))} run --once")
    assert ran.returncode == 0, ran.stderr
    quoted = shlex.quote(str(home))
    # The record and its page name no path (pages are shared; a home may move): the terminal gives the flag.
    for name in ("fixme.jpg.error.json", "fixme.jpg.error.html", "index.html"):
        text = (home / "outbox" / ("" if name == "index.html" else "failed") / name).read_text()
        assert str(home) not in text and "mondrian retry --failed" in text, (name, text)
    [failure] = json.loads(pasted(f"mondrian --home {quoted} status --json").stdout)["recent_failures"]
    assert f"`mondrian --home {quoted} retry --failed`" in failure["next_step"], failure

    (home / "outbox" / "failed" / "fixme.mode").write_text("baseline\n")  # fixed, as the record says
    hint = next(part for part in failure["next_step"].split("`") if part.startswith("mondrian "))
    retried = pasted(hint)
    assert retried.returncode == 0 and "fixme.jpg" in retried.stdout, (hint, retried.stdout, retried.stderr)
    assert ledger_jobs(home)["fixme.jpg"].state == "queued"

    shown_status = pasted(f"mondrian status --home {quoted}")  # the flag after the command names the same home
    assert f"mondrian --home {quoted} " in shown_status.stdout, shown_status.stdout

    hints.serve(default_home({}))  # the home a plain shell reaches: no flag to add
    try:
        assert hints.mondrian() == "mondrian"
    finally:
        hints.serve(default_home({}))


def _references(home: Path) -> list[tuple[str, float]]:
    import sqlite3

    with sqlite3.connect(home / "var" / "ledger.db") as db:
        return db.execute("SELECT path, indexed_at FROM reference").fetchall()


@pytest.mark.parametrize("ledger", ["recorded", "from an earlier version"])
def test_a_moved_home_keeps_its_failures_reports_and_retry(tmp_path, smoke_model_path, ledger):
    """`mv home elsewhere` (a new disk, Dropbox): the ledger moves with it and its paths follow, so status finds the
    failure records, retry finds the photos and a photo dropped again is a duplicate of its moved report. A ledger of
    an earlier version (no home recorded) finds its old place from its latest job."""
    import shutil
    import sqlite3

    home = make_home(tmp_path / "home", smoke_model_path)
    photo(home / "inbox" / "ok.jpg", seed=1, size=(64, 48))
    photo(home / "inbox" / "bad.jpg", seed=2, size=(64, 48))
    (home / "inbox" / "bad.mode").write_text("portrait\n")
    (home / "inbox" / "corrupt.jpg").write_text("not a photo\n")
    ref = home / "advisors" / "ansel" / "references" / "dunes.jpg"
    photo(ref, seed=9, size=(64, 48))
    _sidecar(ref.with_suffix(".json"), _scores(7))
    assert mondrian(home, smoke_model_path, "run", "--once").returncode == 0
    [indexed] = _references(home)
    # The latest job is one of `mondrian analyze`: its photo lies outside the home, its report inside.
    analysed = mondrian(home, smoke_model_path, "analyze", str(photo(tmp_path / "mine" / "own.jpg", seed=4)))
    assert analysed.returncode == 0, analysed.stderr
    if ledger != "recorded":
        with sqlite3.connect(home / "var" / "ledger.db") as db:
            assert db.execute("DELETE FROM event WHERE key = 'home'").rowcount == 1
    with sqlite3.connect(home / "var" / "ledger.db") as db:  # a reason naming a command for this home
        db.execute("UPDATE job SET error = error || ? WHERE rel_path = 'corrupt.jpg'",
                   (f" (or run `mondrian --home {home} retry --failed`)",))
    moved = tmp_path / "new disk 100%_x" / "Mondrian"  # odd characters a shell and SQL must both take
    moved.parent.mkdir()
    shutil.move(home, moved)

    if ledger == "recorded":  # locked while it must follow: one line and exit 78, not a status of stale paths
        holder = hold_ledger_lock(moved / "var" / "ledger.db", 120)
        try:
            refused = mondrian(moved, smoke_model_path, "status", timeout=90)
        finally:
            holder.kill()
            holder.wait()
        lines = [line for line in refused.stderr.splitlines() if line.strip()]
        assert refused.returncode == 78 and len(lines) == 1, (refused.stdout, refused.stderr)
        assert f"this home was at {home} before" in lines[0] and "run the command again" in lines[0], lines

    failures = status(moved, smoke_model_path)["recent_failures"]
    assert _references(moved) == [(str(moved / indexed[0][len(str(home)) + 1:]), indexed[1])]  # not indexed again
    assert {f["file"]: f["note"] for f in failures} == {"bad.jpg": None, "corrupt.jpg": None}, failures
    assert {Path(f["record"]).parent for f in failures} == {moved / "outbox" / "failed"}, failures
    reason = next(f["reason"] for f in failures if f["file"] == "corrupt.jpg")
    assert f"--home {moved} retry" in reason and f"--home {home} " not in reason, reason

    (moved / "outbox" / "failed" / "bad.mode").write_text("baseline\n")
    retried = mondrian(moved, smoke_model_path, "retry", "--failed")
    assert retried.returncode == 0 and "bad.jpg" in retried.stdout, (retried.stdout, retried.stderr)
    assert (moved / "inbox" / "bad.jpg").exists() and not (moved / "outbox" / "failed" / "bad.jpg").exists()

    photo(moved / "inbox" / "again.jpg", seed=1, size=(64, 48))  # the same bytes as ok.jpg
    assert mondrian(moved, smoke_model_path, "run", "--once").returncode == 0
    jobs = ledger_jobs(moved)
    assert jobs["bad.jpg"].state == "done" and Path(jobs["bad.jpg"].report_json).is_file(), jobs["bad.jpg"]
    assert jobs["again.jpg"].duplicate_of == jobs["ok.jpg"].id, jobs["again.jpg"]
    assert Path(jobs["ok.jpg"].report_json).is_relative_to(moved), jobs["ok.jpg"].report_json

    # The whole outbox away (moved, a drive not connected): not taken for the photo deleted, its entry kept.
    (moved / "outbox").rename(moved / "outbox-away")
    away = mondrian(moved, smoke_model_path, "retry", "--failed", str(jobs["corrupt.jpg"].id))
    (moved / "outbox-away").rename(moved / "outbox")
    assert "failed is not there (the outbox moved" in away.stderr, away.stderr
    assert ledger_jobs(moved)["corrupt.jpg"].state == "failed"
    # A failed photo deleted since: retrying it by its id says so, rather than "0 queued" and nothing else.
    (moved / "outbox" / "failed" / "corrupt.jpg").unlink()
    gone = mondrian(moved, smoke_model_path, "retry", "--failed", str(jobs["corrupt.jpg"].id))
    assert gone.returncode == 2 and "neither in failed/ nor in the inbox" in gone.stderr, gone.stderr
    # ...and its entry is cleared: status no longer lists it with this very command as the next step.
    assert "so its entry is cleared" in gone.stderr, gone.stderr
    assert "corrupt.jpg" not in {f["file"] for f in status(moved, smoke_model_path)["recent_failures"]}


def test_retry_with_the_ledger_locked_moves_nothing_and_says_what_to_do(tmp_path, smoke_model_path):
    """Another program holds the ledger's write lock (an open `sqlite3` shell): retry must not put the photo back in
    the inbox with its job still failed; it waits, then says what holds it, and a later retry does the work."""
    home = make_home(tmp_path / "home", smoke_model_path)
    photo(home / "inbox" / "bad.jpg", seed=2, size=(64, 48))
    (home / "inbox" / "bad.mode").write_text("portrait\n")
    assert mondrian(home, smoke_model_path, "run", "--once").returncode == 0
    failed = home / "outbox" / "failed"
    (failed / "bad.mode").write_text("baseline\n")
    holder = hold_ledger_lock(home / "var" / "ledger.db", 120)
    try:
        refused = mondrian(home, smoke_model_path, "retry", "--failed", timeout=90)
    finally:
        holder.kill()
        holder.wait()
    assert refused.returncode == 78, (refused.stdout, refused.stderr)
    lines = [line for line in refused.stderr.splitlines() if "ERROR" in line]
    assert len(lines) == 1 and "locked" in lines[0] and "run the command again" in lines[0], refused.stderr
    assert "carries on by itself" not in refused.stderr, refused.stderr  # a command does not wait on its own
    assert (failed / "bad.jpg").exists() and (failed / "bad.jpg.error.json").exists()
    assert not (home / "inbox" / "bad.jpg").exists() and ledger_jobs(home)["bad.jpg"].state == "failed"

    again = mondrian(home, smoke_model_path, "retry", "--failed")
    assert again.returncode == 0 and "bad.jpg" in again.stdout, again.stderr
    assert (home / "inbox" / "bad.jpg").exists() and ledger_jobs(home)["bad.jpg"].state == "queued"


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS refuses file names that are not UTF-8")
@pytest.mark.parametrize("name,escaped", [(b"ph\xffoto", "\\xff"), (b"new\nline", "\\x0a")])
def test_a_home_whose_name_is_not_utf8_gets_hints_a_shell_can_paste(tmp_path, smoke_model_path, name, escaped):
    """The terminal shows a stray byte, or a line break in a folder's name, escaped; the hint must still give the
    shell the exact name back (a line break inside '...' showed as `\\n`: pasted, a backslash and an n)."""
    import os
    import shlex

    home = make_home(tmp_path / os.fsdecode(name), smoke_model_path)
    env = {k: v for k, v in os.environ.items() if k not in ("MONDRIAN_HOME", "ANALYSIS_MODE")}
    env.update(MONDRIAN_MODEL=str(smoke_model_path), HF_HUB_OFFLINE="1")
    shown = subprocess.run([sys.executable, "-m", "daemon", "--home", str(home), "status"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    hint = next(part for part in shown.stdout.split("`") if part.startswith("mondrian --home"))
    assert escaped in hint and "\\udcff" not in hint, hint
    # Pasted into bash (zsh reads $'...' the same way): it names this home, not a new one.
    command = f"{shlex.quote(sys.executable)} -m daemon {hint.split(' ', 1)[1].replace(' run', ' status')}"
    pasted = subprocess.run(["bash", "-c", command], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert pasted.returncode == 0 and "Mondrian home:" in pasted.stdout, (command, pasted.stdout, pasted.stderr)


def test_a_failure_stands_when_another_file_of_its_name_comes_and_retry_brings_it_back_from_another_disk(
        tmp_path, smoke_model_path):
    """Two cards both hold IMG_0001.JPG: the first failed, the second was critiqued. The first's failure (its photo
    still in outbox/failed/) then vanished from `status`, the index and `retry --failed --all` ("put back already,
    has a later job"). And with the outbox on another disk (an external drive, a NAS), `retry --failed` failed
    with "Invalid cross-device link" and advice that did not fit."""
    import json
    import shutil
    import tempfile

    outbox = Path(tempfile.mkdtemp(prefix="mondrian-outbox-", dir="/dev/shm"))
    try:
        assert os.stat(outbox).st_dev != os.stat(tmp_path).st_dev, "needs the outbox on another filesystem"
        home = make_home(tmp_path / "home", smoke_model_path, outbox=str(outbox))
        (home / "inbox" / "IMG_0001.JPG").write_bytes(b"the first card's copy was damaged")
        assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0
        assert (outbox / "failed" / "IMG_0001.JPG").exists()
        photo(home / "inbox" / "IMG_0001.JPG", seed=11, size=(64, 48), fmt="JPEG")  # the second card's
        assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0

        info = status(home, smoke_model_path)
        assert info["counts"]["failed"] == 1, info["counts"]
        assert [f["file"] for f in info["recent_failures"]] == ["IMG_0001.JPG"], info["recent_failures"]
        index = (outbox / "index.html").read_text()
        assert "failed/IMG_0001.JPG.error.html" in index

        again = mondrian(home, smoke_model_path, "retry", "--failed", "--all", timeout=60)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "Invalid cross-device link" not in again.stdout + again.stderr, again.stdout + again.stderr
        back = home / "inbox" / "IMG_0001.JPG"
        assert back.read_bytes() == b"the first card's copy was damaged"
        assert not (outbox / "failed" / "IMG_0001.JPG").exists()
        assert json.loads(mondrian(home, smoke_model_path, "status", "--json").stdout)["counts"]["queued"] == 1
    finally:
        shutil.rmtree(outbox, ignore_errors=True)


def test_photos_queued_before_the_inbox_setting_changed_follow_it_or_say_where_they_are(tmp_path, smoke_model_path):
    """`inbox = …` edited while photos waited: they failed as "its folder is no longer inside the inbox (a folder on
    its path was replaced by a link …)", and retry queued them again where they failed the same way. A photo moved
    along with the inbox is critiqued where it is now; one left behind fails saying so, left where it is."""
    from daemon.ledger import Ledger

    home = make_home(tmp_path / "home", smoke_model_path)
    ledger = Ledger(home / "var" / "ledger.db")
    try:
        for name, seed in (("moved.jpg", 1), ("left.jpg", 2), ("deleted.jpg", 3)):
            src = photo(home / "inbox" / name, seed=seed, size=(64, 48))
            ledger.enqueue(src, name, "ansel", "default", src.stat().st_size, src.stat().st_mtime)
    finally:
        ledger.close()
    new_inbox = tmp_path / "new inbox"
    new_inbox.mkdir()
    settings = home / "mondrian.toml"
    settings.write_text(settings.read_text() + f'inbox = "{new_inbox}"\n')
    os.rename(home / "inbox" / "moved.jpg", new_inbox / "moved.jpg")
    (home / "inbox" / "deleted.jpg").unlink()

    out = mondrian(home, smoke_model_path, "run", "--once", timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = ledger_jobs(home)
    assert jobs["moved.jpg"].state == "done", jobs["moved.jpg"].error
    left = jobs["left.jpg"]
    assert left.state == "failed" and "the `inbox` setting changed" in left.error, left.error
    assert "replaced by a link" not in left.error and (home / "inbox" / "left.jpg").exists()
    assert jobs["deleted.jpg"].state == "gone", (jobs["deleted.jpg"].state, jobs["deleted.jpg"].error)
    from tests.harness import reports

    # once: the start-up rescan queued it again in the new inbox, and its old job gave way (no traceback, no failure)
    assert [p.parent.name for p in reports(home / "outbox")] == ["moved"]
    assert "Traceback" not in out.stderr and "IntegrityError" not in out.stderr, out.stderr[-3000:]
    assert not (home / "outbox" / "failed" / "moved.jpg.error.json").exists()


def test_two_retries_at_once_put_each_photo_back_once_and_count_it_once(tmp_path, smoke_model_path):
    """Two `retry --failed --all` at once (two terminals, a script and a person): the first is stopped right after
    listing the failed jobs while the second runs. Each photo is put back once, the two outputs name each photo
    once between them, and neither says a photo "could not be put back" because the other had moved it."""
    from tests.harness import env_for
    from tests.test_cli_status import _stopped

    home = make_home(tmp_path / "home", smoke_model_path)
    for i in range(6):
        (home / "inbox" / f"bad-{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole JPEG %d" % i)
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0
    assert len(list((home / "outbox" / "failed").glob("*.error.json"))) == 6
    cmd = [sys.executable, "-m", "daemon", "retry", "--failed", "--all"]
    first = subprocess.Popen(cmd, env=env_for(home, smoke_model_path, MONDRIAN_TEST_STOP_AT="retry_listed"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _stopped(first.pid) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _stopped(first.pid), "the first retry never reached its listing"
        second = subprocess.Popen(cmd, env=env_for(home, smoke_model_path), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            second.wait(timeout=8)  # waits for the first (or, without the lock, is done by now)
        except subprocess.TimeoutExpired:
            pass
    finally:
        os.kill(first.pid, signal.SIGCONT)
    outs = [first.communicate(timeout=120), second.communicate(timeout=120)]
    assert [first.returncode, second.returncode] == [0, 0], outs
    named = [line for out, _ in outs for line in out.splitlines() if "bad-" in line]
    assert len(named) == 6 and len(set(named)) == 6, outs
    assert not any("could not be put back" in out + err for out, err in outs), outs
    assert sorted(p.name for p in (home / "inbox").iterdir()) == [f"bad-{i}.jpg" for i in range(6)]
    assert {j.state for j in ledger_jobs(home).values()} == {"queued"}


def test_retry_on_a_full_ledger_disk_leaves_every_photo_where_its_record_says(tmp_path, smoke_model_path):
    """The ledger's disk full: `retry` took the write lock (which needs no space), moved the photo and its sidecar
    into the inbox, then could not record it: the photo sat in the inbox with its job still failed and its record
    in failed/ pointing at nothing. Now the command changes nothing, says why, and works once there is space."""
    from tests.test_faults import _mount, _umount
    from tests.test_resilience import _fill

    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    home = make_home(tmp_path / "home", smoke_model_path)
    var = home / "var"
    var.mkdir()
    if _mount("-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(var)).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (home / "inbox" / "j.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole JPEG")
        (home / "inbox" / "j.mode").write_text("baseline\n")
        assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0
        failed = home / "outbox" / "failed"
        assert (failed / "j.jpg").is_file() and (failed / "j.mode").is_file()
        # A reader keeps the ledger open (a running `status --watch`, the daemon): its -wal and -shm stay, so
        # opening it and taking the write lock work on the full disk, and only writing fails.
        reader = subprocess.Popen([sys.executable, "-c", (
            "import sqlite3, sys, time\n"
            f"c = sqlite3.connect({str(var / 'ledger.db')!r}); c.execute('select count(*) from job').fetchall()\n"
            "print('open', flush=True); time.sleep(300)\n")], stdout=subprocess.PIPE, text=True)
        assert reader.stdout.readline().strip() == "open"
        filler = _fill(var)
        out = mondrian(home, smoke_model_path, "retry", "--failed", "--all", timeout=120)
        assert out.returncode == 78 and "Traceback" not in out.stderr, (out.stdout, out.stderr)
        assert "full" in out.stderr, out.stderr
        assert sorted(p.name for p in (home / "inbox").iterdir()) == []
        assert (failed / "j.jpg").is_file() and (failed / "j.mode").is_file() and (failed / "j.jpg.error.json").is_file()
        filler.unlink()
        assert ledger_jobs(home)["j.jpg"].state == "failed"
        out = mondrian(home, smoke_model_path, "retry", "--failed", "--all", timeout=120)
        assert out.returncode == 0 and "j.jpg" in out.stdout, out.stderr
        assert sorted(p.name for p in (home / "inbox").iterdir()) == ["j.jpg", "j.mode"]
        assert ledger_jobs(home)["j.jpg"].state == "queued"
    finally:
        if "reader" in locals():
            reader.kill()
            reader.wait()
        _umount(var)


def test_a_failure_whose_photo_was_deleted_since_is_cleared_by_retry_with_its_record(tmp_path, smoke_model_path):
    """A photo `analyze` failed on, deleted since: status advised "run analyze on it again", which cannot work, and
    `retry --failed` only repeated that, so the failure stood in status and the index for good. An inbox photo
    cleared the same way left its failure record in failed/. Both are cleared, records and pages too."""
    home = make_home(tmp_path / "home", smoke_model_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "gone.jpg").write_bytes(b"junk, not a photo")
    assert mondrian(home, smoke_model_path, "analyze", str(outside / "gone.jpg"), timeout=120).returncode != 0
    (home / "inbox" / "lost.jpg").write_bytes(b"junk too")
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0
    failed = home / "outbox" / "failed"
    assert (failed / "gone.jpg.error.json").is_file() and (failed / "lost.jpg.error.json").is_file()
    (outside / "gone.jpg").unlink()
    (failed / "lost.jpg").unlink()
    out = mondrian(home, smoke_model_path, "retry", "--failed", "--all")
    assert "gone.jpg is not at" in out.stdout + out.stderr and "its entry is cleared" in out.stdout + out.stderr, out
    assert status(home, smoke_model_path)["recent_failures"] == []
    assert sorted(p.name for p in failed.iterdir() if not p.name.startswith(".")) == []
    assert {j.state for j in ledger_jobs(home).values()} == {"gone"}
    index = (home / "outbox" / "index.html").read_text()
    assert "gone.jpg" not in index and "lost.jpg" not in index


def test_a_failure_moved_into_the_new_inbox_as_advised_and_queued_there_is_cleared_not_queued_twice(tmp_path,
                                                                                                  smoke_model_path):
    """Attack: `inbox` changed in mondrian.toml, a failure advising "move it into the inbox (…/inbox2)", the photo
    moved there and queued by the daemon, then `retry --failed` as the failure also advised: it queued the old job
    at the same path, the ledger refused (one file, two jobs), and the command called the ledger damaged and advised
    moving it aside, throwing away its history. The old failure is now cleared in favour of the new job."""
    from daemon.ledger import Ledger

    home = make_home(tmp_path / "home", smoke_model_path)
    _transient_failure(home, "ib1.jpg")
    settings = home / "mondrian.toml"
    settings.write_text('inbox = "inbox2"\n' + settings.read_text())
    (home / "inbox2").mkdir()
    (home / "inbox" / "ib1.jpg").rename(home / "inbox2" / "ib1.jpg")
    moved = home / "inbox2" / "ib1.jpg"
    ledger = Ledger(home / "var" / "ledger.db")
    try:  # queued at its new place, as the daemon's watcher does
        ledger.enqueue(moved, "ib1.jpg", "ansel", "default", moved.stat().st_size, moved.stat().st_mtime)
    finally:
        ledger.close()
    out = mondrian(home, smoke_model_path, "retry", "--failed")
    assert out.returncode == 0 and "damaged" not in out.stdout + out.stderr, out.stdout + out.stderr
    assert "already queued at its place in the inbox" in out.stdout + out.stderr, out.stdout + out.stderr
    states = sorted(j.state for j in Ledger(home / "var" / "ledger.db").jobs())
    assert states == ["gone", "queued"], states
    assert status(home, smoke_model_path)["counts"].get("failed", 0) == 0
