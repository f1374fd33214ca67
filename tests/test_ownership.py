"""Mondrian never moves, renames or deletes a file outside its home (issue 9, item 1).

Real daemon and CLI subprocesses on real folders, real SIGKILLs (`MONDRIAN_TEST_CRASH_AT` makes the process kill
itself at a named step), real symlinks. Each test takes a picture of everything outside the home (and where it
matters, of the whole temporary folder) before the attack and checks it afterwards, byte for byte.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Daemon, make_home, mondrian, named, photo, reports, wait_for


def _tree(root: Path, skip: Path | None = None) -> dict[str, Any]:
    """Every entry under `root` (links not followed): file bytes, link targets, folders."""
    out: dict[str, Any] = {}
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        if skip is not None and (here == skip or skip in here.parents):
            dirs[:] = []
            continue
        for name in dirs + files:
            p = here / name
            rel = str(p.relative_to(root))
            if skip is not None and p == skip:
                continue
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", p.read_bytes())
    return out


def _jobs(home: Path) -> list[dict[str, Any]]:
    """The ledger's jobs, read with plain sqlite3 (no migration, nothing created)."""
    db = home / "var" / "ledger.db"
    if not db.exists():
        return []
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute('SELECT * FROM "job" ORDER BY id')]
    except sqlite3.OperationalError:  # no job table yet
        return []
    finally:
        con.close()


def _one_line(stderr: str) -> str:
    """The one line that says what went wrong (informational log lines such as the BLAS one aside)."""
    lines = [line for line in stderr.splitlines() if line.strip() and not re.match(r"^(\d{4}-\d\d-\d\d )?\d\d:\d\d:\d\d INFO ", line)]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


# -- `mondrian analyze`: the photo is the user's, wherever it lies -----------------------------------------

def test_analyze_failure_then_retry_failed_never_moves_the_original(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.jpg").write_text("not a photo at all\n")
    photo(elsewhere / "kept.jpg", seed=4)
    before = _tree(elsewhere)

    out = mondrian(home, smoke_model_path, "analyze", str(elsewhere / "notes.jpg"))
    assert out.returncode == 1 and "failed:" in out.stderr, out.stderr
    assert _tree(elsewhere) == before
    assert not (home / "outbox" / "failed" / "notes.jpg").exists()

    retry = mondrian(home, smoke_model_path, "retry", "--failed")
    assert retry.returncode == 0, retry.stderr
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=120)
    assert out.returncode == 0, out.stderr
    assert _tree(elsewhere) == before, "retry --failed handed an analyze job's photo to the daemon, which moved it"
    assert named(home, "analyze") in retry.stderr and "0 photo(s) queued again" in retry.stderr, retry.stderr
    assert not list((home / "outbox" / "failed").glob("notes*.jpg")), "a file from outside landed in failed/"
    jobs = _jobs(home)
    assert [j["state"] for j in jobs] == ["failed"], jobs
    print(f"\nanalyze of a non-photo, then retry --failed and run --once: original untouched, "
          f"job {jobs[0]['state']}: {jobs[0]['error']}")


@pytest.mark.parametrize("point", ["staged", "reserved", "renamed"])
def test_analyze_killed_mid_analysis_then_daemon_starts_leaves_the_original(tmp_path, smoke_model_path, point):
    home = make_home(tmp_path / "home", smoke_model_path)
    elsewhere = tmp_path / "elsewhere"
    src = photo(elsewhere / "portrait.jpg", seed=5)
    before = _tree(elsewhere)

    out = mondrian(home, smoke_model_path, "analyze", str(src), MONDRIAN_TEST_CRASH_AT=point)
    assert out.returncode == -9, (out.returncode, out.stderr)  # SIGKILLed while the job was running
    assert [j["state"] for j in _jobs(home)] == ["running"]

    out = mondrian(home, smoke_model_path, "run", "--once", timeout=120)
    assert out.returncode == 0, out.stderr
    assert _tree(elsewhere) == before, f"start-up recovery took over an analyze job killed at {point!r}"
    assert not list((home / "outbox").rglob("portrait*.jpg")) or point == "renamed"
    (job,) = _jobs(home)
    if point == "renamed":  # its report was published: finished from it, with a copy, the original left alone
        assert job["state"] == "done", job
        assert [r.parent.name for r in reports(home / "outbox")] == ["portrait"]
    else:
        assert job["state"] == "failed" and named(home, "analyze") in job["error"], job
        assert reports(home / "outbox") == []
    print(f"\nanalyze SIGKILLed at {point}, daemon started: original untouched, job {job['state']}")


@pytest.mark.parametrize("what", ["pattern", "quoted-pattern", "literal-star", "missing", "missing-among-photos",
                                  "empty-folder"])
def test_analyze_of_what_is_not_photos_says_what_to_do_and_creates_no_job(tmp_path, smoke_model_path, what):
    home = make_home(tmp_path / "home", smoke_model_path)
    elsewhere = tmp_path / "elsewhere"
    photo(elsewhere / "album" / "a.jpg", seed=1)
    photo(elsewhere / "album" / "b.jpg", seed=2)
    photo(elsewhere / "empty" / ".hidden.jpg", seed=3)  # hidden names are not photos to analyse
    args, words = {"pattern": ([str(elsewhere / "album" / "*.png")], "did not expand"),
                   # matches, but the shell did not expand it: refused rather than guessed
                   "quoted-pattern": ([str(elsewhere / "album" / "*.jpg")], "did not expand"),
                   "literal-star": (["*"], "did not expand"),
                   "missing": ([str(elsewhere / "nothing.jpg")], "does not exist"),
                   "missing-among-photos": ([str(elsewhere / "album" / "a.jpg"), str(elsewhere / "nothing.jpg"),
                                             str(elsewhere / "album")], "does not exist"),
                   "empty-folder": ([str(elsewhere / "empty")], "holds no photos")}[what]
    before = _tree(tmp_path, skip=home)

    out = mondrian(home, smoke_model_path, "analyze", *args)
    assert out.returncode not in (0, None), out
    line = _one_line(out.stderr)
    assert words in line and "cannot analyze" in line, line
    assert _jobs(home) == [], "a job was created, though the command was refused"
    out = mondrian(home, smoke_model_path, "retry", "--failed")
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=120)
    assert out.returncode == 0, out.stderr
    assert _tree(tmp_path, skip=home) == before
    print(f"\nanalyze {what}: {line}")


def test_analyze_of_a_folder_and_several_photos_moves_nothing_and_leaves_no_job_behind(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    elsewhere = tmp_path / "elsewhere"
    album = elsewhere / "album"
    photo(album / "a.jpg", seed=1)
    photo(album / "sub" / "b.png", seed=2, fmt="PNG")
    photo(album / ".hidden" / "c.jpg", seed=3)
    photo(album / "d.jpg.part", seed=4, fmt="JPEG")
    (album / "broken.jpg").write_text("not a photo\n")
    (album / "notes.txt").write_text("not a photo name\n")
    single = photo(elsewhere / "e.jpg", seed=5)
    before = _tree(tmp_path, skip=home)

    out = mondrian(home, smoke_model_path, "analyze", str(album), str(single), str(album / "a.jpg"), timeout=300)
    assert out.returncode == 1, out.stderr  # one photo failed; the others were analysed all the same
    assert _tree(tmp_path, skip=home) == before, "analyze moved, renamed or deleted one of the user's files"
    states = {Path(j["source_path"]).name: j["state"] for j in _jobs(home)}
    assert states == {"a.jpg": "done", "b.png": "done", "broken.jpg": "failed", "e.jpg": "done"}, states
    assert out.stdout.count("/10  ") == 3 and out.stdout.count("report.html") == 3, out.stdout
    assert "failed: " in out.stderr and "broken.jpg" in out.stderr and "3 of 4 photo(s) analysed" in out.stderr

    mondrian(home, smoke_model_path, "retry", "--failed", "--all")
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=120)
    assert out.returncode == 0, out.stderr
    assert _tree(tmp_path, skip=home) == before
    assert not [j for j in _jobs(home) if j["state"] in ("queued", "running")]


@pytest.mark.parametrize("model", ["garbage", "missing"])
def test_analyze_with_a_model_that_does_not_load_leaves_no_job_in_progress(tmp_path, smoke_model_path, model):
    home = make_home(tmp_path / "home", smoke_model_path)
    path = tmp_path / "model"
    if model == "garbage":
        shutil.copytree(smoke_model_path, path)
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])  # a damaged download
    src = photo(tmp_path / "elsewhere" / "p.jpg", seed=6)
    before = src.read_bytes()

    out = mondrian(home, path, "analyze", str(src))
    assert out.returncode != 0
    line = _one_line(out.stderr)
    assert "model" in line, line
    active = [j for j in _jobs(home) if j["state"] in ("running", "queued")]
    assert active == [], f"a job stayed in progress: {active}"
    assert src.read_bytes() == before
    print(f"\nanalyze with a {model} model: exit {out.returncode}: {line}")


# -- a folder of the inbox that turns into a link out of it ------------------------------------------------

def _break_model(tmp_path: Path, smoke_model_path: Path) -> Path:
    path = tmp_path / "broken-model"
    shutil.copytree(smoke_model_path, path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return path


def _swap_for_link(folder: Path, target: Path) -> None:
    shutil.rmtree(folder)
    folder.symlink_to(target, target_is_directory=True)


def test_inbox_folder_replaced_by_a_link_outside_before_processing(tmp_path, smoke_model_path):
    """Queued from the inbox, then the folder becomes a link to a folder outside: nothing there is moved."""
    home = make_home(tmp_path / "home", smoke_model_path, retry_base_seconds=1, max_attempts=6)
    album = home / "inbox" / "album"
    for i, name in enumerate(("a.jpg", "b.jpg", "notes.jpg")):
        photo(album / name, seed=20 + i)
    outside = tmp_path / "outside"
    photo(outside / "a.jpg", seed=30)
    photo(outside / "b.jpg", seed=31)
    (outside / "notes.jpg").write_text("a note, not a photo\n")
    for p in outside.iterdir():  # long settled: only the folder check can stop them
        os.utime(p, (p.stat().st_atime, p.stat().st_mtime - 7200))

    # A model that cannot load keeps the photos queued (retried with backoff) without processing them.
    with Daemon(home, _break_model(tmp_path, smoke_model_path)) as d:
        wait_for(lambda: len([j for j in _jobs(home) if j["state"] == "queued" and j["attempts"] >= 1]) == 3,
                 90, what="three queued jobs that tried once")
        assert d.stop() == 0
    _swap_for_link(album, outside)
    before = _tree(outside)

    # A long quiet time keeps the link itself from being queued (and failed first, which would leave the three
    # jobs nothing to claim): the three queued jobs meet the link on their own path.
    make_home(home, smoke_model_path, quiet_seconds=3600, retry_base_seconds=1, max_attempts=6)
    with Daemon(home, smoke_model_path) as d:
        wait_for(lambda: all(j["state"] in ("done", "failed", "gone") for j in _jobs(home)
                             if j["rel_path"].startswith("album/")), 120, what="the three jobs finished")
        assert d.stop() == 0
    assert _tree(outside) == before, "files outside the home were moved through a link in the inbox"
    by_name = {j["rel_path"]: j for j in _jobs(home)}
    for name in ("a.jpg", "b.jpg", "notes.jpg"):
        job = by_name[f"album/{name}"]
        assert job["state"] == "failed" and "inside the inbox" in job["error"], job
        assert Path(f"{job['output_dir']}.error.json").exists(), "the failure is recorded"
    assert reports(home / "outbox") == []
    print("\nfolder swapped for a link out of the inbox while queued: 3 failed with a reason, outside untouched")


@pytest.mark.parametrize("point", ["renamed", "moved"])
def test_inbox_folder_replaced_by_a_link_after_the_report_was_published(tmp_path, smoke_model_path, point):
    """Killed after publishing the report (before or after moving the original in); the folder becomes a link out
    meanwhile. Recovery touches nothing outside, and never deletes an original already moved in."""
    home = make_home(tmp_path / "home", smoke_model_path)
    album = home / "inbox" / "album"
    photo(album / "a.jpg", seed=40)
    outside = tmp_path / "outside"
    photo(outside / "a.jpg", seed=41)

    original = (album / "a.jpg").read_bytes()
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=120, MONDRIAN_TEST_CRASH_AT=point)
    assert out.returncode == -9, (out.returncode, out.stderr)
    _swap_for_link(album, outside)
    before = _tree(outside)

    out = mondrian(home, smoke_model_path, "run", "--once", timeout=120)
    assert out.returncode == 0, out.stderr
    assert _tree(outside) == before, "recovery moved a file outside the home through a link in the inbox"
    (job,) = [j for j in _jobs(home) if j["rel_path"] == "album/a.jpg"]
    if point == "renamed":
        assert job["state"] == "failed" and "inside the inbox" in job["error"], job
        assert reports(home / "outbox") == [], "the report of a file Mondrian could not take in is withdrawn"
    else:  # the original was moved in before the link appeared: the job is finished with it
        assert job["state"] == "done", job
        (report,) = reports(home / "outbox")
        assert (report.parent / "a.jpg").read_bytes() == original
        assert sorted(p.name for p in report.parent.iterdir() if p.suffix == ".jpg") == \
            ["a.jpg", "preview.jpg", "thumb.jpg"]
    print(f"\nfolder swapped for a link out after {point}: job {job['state']}, outside untouched")


# -- advisor ids: checked once, before any path is made of them ---------------------------------------------

@pytest.mark.parametrize("command", [
    ["adapters", "rollback", "--advisor", "../../x"],
    ["adapters", "rollback", "--advisor", "nobody"],
    ["adapters", "rollback", "--advisor", "ansel\n"],
    ["adapters", "--advisor", "../../x"],
    ["train", "--advisor", "../../x"],
    ["evaluate", "--advisor", "../x"],
    ["references", "index", "--advisor", "../x"],
    ["references", "list", "--advisor", "../x"],
    ["analyze", "PHOTO", "--advisor", "../x"],
], ids=lambda c: " ".join(c[:2]) + " " + ascii(c[-1]))
def test_an_unknown_or_invalid_advisor_is_one_line_and_nothing_is_created(tmp_path, smoke_model_path, command):
    home = make_home(tmp_path / "a" / "b" / "home", smoke_model_path)
    src = photo(tmp_path / "elsewhere" / "p.jpg", seed=7)
    command = [str(src) if c == "PHOTO" else c for c in command]
    before = _tree(tmp_path)

    out = mondrian(home, smoke_model_path, *command)
    assert _tree(tmp_path) == before, "a command with a bad --advisor created or changed files"
    assert out.returncode == 2, (out.returncode, out.stderr)
    line = _one_line(out.stderr)
    assert "known advisors: " in line and "ansel" in line, line
    print(f"\n{' '.join(command[:2])}: {line}")


def test_a_ledger_from_before_ownership_marks_analyze_jobs_as_not_owning_their_file(tmp_path):
    """The migration: rows that `mondrian analyze` made (queued and started at the same instant) own nothing."""
    from daemon.ledger import MIGRATIONS, SCHEMA_VERSION, Ledger, _add_job_owns_file

    db = tmp_path / "ledger.db"
    ledger = Ledger(db)
    inbox_job = ledger.enqueue(tmp_path / "inbox" / "a.jpg", "a.jpg", "ansel", "default", 1, 1.0)
    ledger.claim()
    direct = ledger.start_direct(tmp_path / "elsewhere" / "b.jpg", "b.jpg", "ansel", "default")
    ledger.close()
    con = sqlite3.connect(db)  # back to the schema before the column, as an older Mondrian left it
    con.execute('DROP INDEX "job_active_source"')  # a later migration's index, which reads the column
    con.execute('ALTER TABLE "job" DROP COLUMN "owns_file"')
    con.execute("DELETE FROM schema_version WHERE version > ?", (MIGRATIONS.index(_add_job_owns_file),))
    con.commit()
    con.close()

    ledger = Ledger(db)
    try:
        assert ledger.schema_version() == SCHEMA_VERSION
        assert ledger.get(inbox_job.id).owns_file is True
        assert ledger.get(direct.id).owns_file is False
    finally:
        ledger.close()


def test_retry_failed_never_moves_a_photo_back_through_a_link_out_of_the_inbox(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    album = home / "inbox" / "album"
    album.mkdir(parents=True)
    (album / "notes.jpg").write_text("not a photo\n")
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=120)
    assert out.returncode == 0 and (home / "outbox" / "failed" / "notes.jpg").exists(), out.stderr
    outside = tmp_path / "outside"
    photo(outside / "kept.jpg", seed=50)
    _swap_for_link(album, outside)
    before = _tree(outside)

    # --all: a damaged file is a permanent failure that plain `retry --failed` skips; forced, it must still not
    # go back through the link
    out = mondrian(home, smoke_model_path, "retry", "--failed", "--all")
    assert _tree(outside) == before, "retry --failed put a file outside the home through a link in the inbox"
    assert out.returncode == 0 and "yourself" in out.stderr, out.stderr
    assert (home / "outbox" / "failed" / "notes.jpg").exists()
