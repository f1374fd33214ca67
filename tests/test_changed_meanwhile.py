"""A photo whose outcome was published just before a kill is still in the inbox until the next start (the original is
moved last). Meanwhile the photographer may export it again under the same name, or delete it. The next start must
not file the new bytes under the old outcome (a report of photo A beside photo B, B in duplicates/ as "the same
photo", a good re-export in failed/ for the old file's fault), nor keep a report whose photo was deleted before it
was filed: each such outcome is withdrawn and the file taken as it is now. And while the daemon runs: a photo removed
as it is being read is gone, not failed; a `.mode` sidecar that arrives while its photo is analysed is obeyed.

Real `mondrian run --once` subprocesses, real SIGKILLs at the named points (`MONDRIAN_TEST_CRASH_AT`) and a real
SIGSTOP (`MONDRIAN_TEST_STOP_AT`), the smoke model, real files.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Daemon, make_home, mondrian, photo, reports, wait_for


def _jobs(home: Path) -> list[dict[str, Any]]:
    con = sqlite3.connect(home / "var" / "ledger.db")
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute('SELECT * FROM "job" ORDER BY id')]
    finally:
        con.close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _home(tmp_path: Path, model: Path) -> Path:
    return make_home(tmp_path / "home", model, max_pixels=56 * 56, comment_max_chars=8, max_tokens=400)


def _k_about_to(home: Path, smoke_model_path: Path, point: str, seed: int) -> None:
    """`k.jpg` in the inbox as the crash or stop `point` needs it: a twin of a photo analysed first (dup_recorded),
    a broken export (fail_recorded), or a photo of its own (renamed)."""
    inbox, outbox = home / "inbox", home / "outbox"
    if point == "dup_recorded":
        photo(inbox / "first.jpg", seed=seed)
        assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0
        (inbox / "k.jpg").write_bytes((outbox / "first" / "first.jpg").read_bytes())
    elif point == "fail_recorded":
        (inbox / "k.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole JPEG")
    else:
        photo(inbox / "k.jpg", seed=seed + 1)


@pytest.mark.parametrize("point", ["renamed", "dup_recorded", "fail_recorded"])
def test_a_photo_exported_again_while_mondrian_was_down_is_not_filed_under_the_old_outcome(
        tmp_path: Path, smoke_model_path: Path, point: str) -> None:
    home = _home(tmp_path, smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    # killed after its duplicate record, its failure record, or its report folder's rename, before the original moved
    _k_about_to(home, smoke_model_path, point, seed=70)
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=180, MONDRIAN_TEST_CRASH_AT=point)
    assert out.returncode == -9, (out.returncode, out.stderr)
    assert (inbox / "k.jpg").is_file()  # the outcome is published, the original not yet taken

    again = photo(tmp_path / "again.jpg", seed=72)  # the photographer's new export, under the same name
    os.replace(again, inbox / "k.jpg")
    new = _sha(inbox / "k.jpg")
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=180)
    assert out.returncode == 0, out.stderr

    (folder,) = [r.parent for r in reports(outbox) if r.parent.name != "first"]
    report = json.loads((folder / "report.json").read_text())
    assert report["photo"]["sha256"] == new and _sha(folder / report["photo"]["file"]) == new
    assert not (inbox / "k.jpg").exists()
    assert not [p for p in outbox.glob("duplicates/*")] and not [p for p in outbox.glob("failed/*")]
    states = {j["rel_path"]: j["state"] for j in _jobs(home)}
    assert states["k.jpg"] == "done" and list(states.values()).count("done") == len(states)


@pytest.mark.parametrize("point", ["renamed", "dup_recorded", "fail_recorded"])
def test_a_photo_deleted_while_mondrian_was_down_leaves_no_outcome_without_it(tmp_path: Path,
                                                                             smoke_model_path: Path,
                                                                             point: str) -> None:
    home = _home(tmp_path, smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    _k_about_to(home, smoke_model_path, point, seed=73)
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=180, MONDRIAN_TEST_CRASH_AT=point)
    assert out.returncode == -9, (out.returncode, out.stderr)
    (inbox / "k.jpg").unlink()
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=180)
    assert out.returncode == 0, out.stderr

    assert [r.parent.name for r in reports(outbox)] == (["first"] if point == "dup_recorded" else [])
    assert not [p for p in outbox.glob("duplicates/*")] and not [p for p in outbox.glob("failed/*")]
    (job,) = [j for j in _jobs(home) if j["rel_path"] == "k.jpg"]
    assert job["state"] == "gone" and "removed" in job["error"], job


def test_the_file_crashed_on_is_still_filed_when_it_did_not_change(tmp_path: Path, smoke_model_path: Path) -> None:
    """The same kill with the photo left as it was: its report is finished with it, not analysed again."""
    home = _home(tmp_path, smoke_model_path)
    shot = photo(home / "inbox" / "k.jpg", seed=75)
    sha = _sha(shot)
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=180,
                    MONDRIAN_TEST_CRASH_AT="renamed").returncode == -9
    (folder,) = [r.parent for r in reports(home / "outbox")]
    published = (folder / "report.json").read_bytes()
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0
    assert (folder / "report.json").read_bytes() == published and _sha(folder / "k.jpg") == sha
    (job,) = _jobs(home)
    assert job["state"] == "done"  # finished from what was published: the report above is the same bytes


def test_a_photo_removed_as_it_is_read_is_gone_not_failed(tmp_path: Path, smoke_model_path: Path) -> None:
    home = _home(tmp_path, smoke_model_path)
    shot = photo(home / "inbox" / "r.jpg", seed=76)
    with Daemon(home, smoke_model_path, MONDRIAN_TEST_STOP_AT="reading") as d:
        wait_for(lambda: open(f"/proc/{d.proc.pid}/stat").read().split(")")[1].split()[0] == "T",
                 timeout=120, what="the daemon held just before reading the photo")
        shot.unlink()
        os.kill(d.proc.pid, signal.SIGCONT)
        wait_for(lambda: any(j["state"] != "running" for j in _jobs(home)), 60, what="the job settled")
        assert d.stop() == 0, d.output()
    (job,) = _jobs(home)
    assert job["state"] == "gone" and "removed" in job["error"], job
    assert not list((home / "outbox").glob("failed/*"))


def test_a_mode_sidecar_that_arrives_during_the_analysis_is_obeyed(tmp_path: Path, smoke_model_path: Path) -> None:
    """Dropped after the photo was read, before its report: the report is of the mode the sidecar asks for (not the
    default, with the sidecar riding along into the report folder as if it had been obeyed)."""
    home = _home(tmp_path, smoke_model_path)
    photo(home / "inbox" / "IMG_1.jpg", seed=77)
    with Daemon(home, smoke_model_path, MONDRIAN_TEST_STOP_AT="analysing") as d:
        wait_for(lambda: open(f"/proc/{d.proc.pid}/stat").read().split(")")[1].split()[0] == "T",
                 timeout=120, what="the daemon held in the middle of the analysis")
        (home / "inbox" / "IMG_1.mode").write_text("rag\n")
        os.kill(d.proc.pid, signal.SIGCONT)
        wait_for(lambda: d.proc.poll() is not None or (home / "outbox" / "IMG_1" / "report.json").exists(), 120,
                 what="the report")
        assert d.stop() == 0, d.output()
    report = json.loads((home / "outbox" / "IMG_1" / "report.json").read_text())
    assert (report["mode"]["requested"], report["mode"]["source"]) == ("rag", "sidecar"), report["mode"]
    assert (home / "outbox" / "IMG_1" / "IMG_1.mode").read_text() == "rag\n"
    (job,) = _jobs(home)
    assert job["state"] == "done" and job["requested_mode"] == "rag"


def _held(d: Daemon) -> bool:
    return open(f"/proc/{d.proc.pid}/stat").read().split(")")[1].split()[0] == "T"


@pytest.mark.parametrize("point", ["dup_recorded", "fail_recorded"])
def test_a_file_saved_over_after_its_outcome_is_recorded_is_not_filed_under_it(tmp_path: Path, smoke_model_path: Path,
                                                                                point: str) -> None:
    """While the daemon runs: an edit saved over a duplicate after it was found to be one, or a good copy over a
    broken file after it failed to be read, in the moment before the file is filed. It was filed anyway (the edited
    photo in duplicates/, never critiqued; a good JPEG in failed/ as "not a photo"). It is now read again as it is."""
    home = _home(tmp_path, smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    _k_about_to(home, smoke_model_path, point, seed=80)
    with Daemon(home, smoke_model_path, MONDRIAN_TEST_STOP_AT=point) as d:
        wait_for(lambda: _held(d), timeout=120, what=f"the daemon held at {point}")
        edited = photo(tmp_path / "edited.jpg", seed=81)
        os.replace(edited, inbox / "k.jpg")
        sha = _sha(inbox / "k.jpg")
        os.kill(d.proc.pid, signal.SIGCONT)
        wait_for(lambda: (outbox / "k" / "report.json").exists(), 120, what="the edited photo's report")
        assert d.stop() == 0, d.output()
    assert _sha(outbox / "k" / "k.jpg") == sha
    assert not list(outbox.glob("duplicates/k*")) and not list(outbox.glob("failed/k*"))
    k = [j for j in _jobs(home) if j["rel_path"] == "k.jpg"]
    assert [j["state"] for j in k] == ["done"], k


def test_a_photo_renamed_as_it_is_moved_into_its_report_is_not_filed_twice(tmp_path: Path,
                                                                          smoke_model_path: Path) -> None:
    """A photo manager renames the photo in the moment between the last look at it and the move into its report
    folder: the report was recorded as done with no original in it, and the photo, queued again under its new name,
    was filed as a duplicate of that empty report. The report is withdrawn; the renamed photo gets the one report."""
    home = _home(tmp_path, smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    photo(inbox / "t1.jpg", seed=82)
    with Daemon(home, smoke_model_path, MONDRIAN_TEST_STOP_AT="checked") as d:
        wait_for(lambda: _held(d), timeout=120, what="the daemon held before moving the photo in")
        os.rename(inbox / "t1.jpg", inbox / "t1-renamed.jpg")
        os.kill(d.proc.pid, signal.SIGCONT)
        wait_for(lambda: (outbox / "t1-renamed" / "report.json").exists(), 120, what="the renamed photo's report")
        assert d.stop() == 0, d.output()
    assert [r.parent.name for r in reports(outbox)] == ["t1-renamed"]
    assert (outbox / "t1-renamed" / "t1-renamed.jpg").is_file() and not list(outbox.glob("duplicates/*"))
    states = {j["rel_path"]: j["state"] for j in _jobs(home)}
    assert states == {"t1.jpg": "gone", "t1-renamed.jpg": "done"}, states


def test_a_mode_sidecar_that_arrives_while_the_report_is_filed_is_not_swallowed(tmp_path: Path,
                                                                                smoke_model_path: Path) -> None:
    """`IMG_2.mode` saved after the last look at it, as the photo moves into its report: it rode along into a report
    of another mode, and the photo was never critiqued in the mode it asks for. It stays in the inbox now, where
    `status` names it, and the report folder holds no sidecar that contradicts its report."""
    home = _home(tmp_path, smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    photo(inbox / "IMG_2.jpg", seed=83)
    with Daemon(home, smoke_model_path, MONDRIAN_TEST_STOP_AT="checked") as d:
        wait_for(lambda: _held(d), timeout=120, what="the daemon held before moving the photo in")
        (inbox / "IMG_2.mode").write_text("lora\n")
        os.kill(d.proc.pid, signal.SIGCONT)
        wait_for(lambda: (outbox / "IMG_2" / "IMG_2.jpg").exists(), 120, what="the photo filed")
        assert d.stop() == 0, d.output()
    report = json.loads((outbox / "IMG_2" / "report.json").read_text())
    assert report["mode"]["source"] == "default"
    assert not (outbox / "IMG_2" / "IMG_2.mode").exists()
    assert (inbox / "IMG_2.mode").read_text() == "lora\n"
    said = mondrian(home, smoke_model_path, "status", MONDRIAN_TEST_STRAY_SECONDS="0").stdout
    assert "IMG_2.mode" in said, said


def test_the_same_bytes_dropped_again_after_a_kill_are_a_duplicate_not_deleted(tmp_path: Path,
                                                                               smoke_model_path: Path) -> None:
    """Killed after the photo moved into its report folder, before the job was recorded; meanwhile the same photo
    is copied into the inbox again. On one disk a move is a rename, which never leaves two copies, yet the copy was
    taken for the remains of a killed move across disks and deleted, with no record. It is a duplicate now."""
    home = _home(tmp_path, smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    shot = photo(inbox / "same.jpg", seed=84)
    data = shot.read_bytes()
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=180, MONDRIAN_TEST_CRASH_AT="moved")
    assert out.returncode == -9, (out.returncode, out.stderr)
    assert (outbox / "same" / "same.jpg").read_bytes() == data and not shot.exists()
    shot.write_bytes(data)  # a new file (a new inode), the same bytes
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0
    jobs = [j for j in _jobs(home) if j["rel_path"] == "same.jpg"]
    assert [j["state"] for j in jobs] == ["done", "done"] and jobs[1]["duplicate_of"] == jobs[0]["id"], jobs
    assert (outbox / "duplicates" / "same.jpg").read_bytes() == data and not shot.exists()
