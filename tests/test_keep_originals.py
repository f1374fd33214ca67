"""keep_originals = true: photos stay where they were dropped (a Lightroom catalogue's links survive), the report
folder gets a hard link to the original, and the ledger remembers them as done across rescans and restarts. Real
daemon, real smoke model, real files."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from daemon.ledger import Ledger
from tests.harness import Daemon, make_home, photo, reports, status, wait_for


def _jobs(home: Path) -> list:
    ledger = Ledger(home / "var" / "ledger.db")
    try:
        return ledger.jobs()
    finally:
        ledger.close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _settle_with_a_marker(home: Path, model: Path, d: Daemon, name: str, seed: int) -> None:
    """Wait for a rescan of this daemon, then drop a new photo and wait for its report: it was noticed after
    everything the rescan found, and jobs are taken in order, so anything the rescan queued has been decided."""
    started = time.time()
    wait_for(lambda: (status(home, model).get("last_rescan_at") or 0) > started, 60, what="a rescan")
    photo(home / "inbox" / name, seed=seed)
    wait_for(lambda: d.proc.poll() is not None or (home / "outbox" / Path(name).stem / "report.json").exists(),
             120, what=f"the report of {name}")
    assert d.proc.poll() is None, d.output()


def test_kept_originals_stay_in_the_inbox_and_are_analysed_once(tmp_path: Path, smoke_model_path: Path) -> None:
    home = make_home(tmp_path / "home", smoke_model_path, keep_originals=True)
    inbox, outbox = home / "inbox", home / "outbox"
    kept = photo(inbox / "cartier" / "IMG_2.jpg", seed=51)
    (inbox / "cartier" / "IMG_2.mode").write_text("baseline\n")
    broken = inbox / "broken.jpg"
    broken.write_bytes(b"not a photo at all")
    analysed = _sha(kept)

    with Daemon(home, smoke_model_path) as d:
        wait_for(lambda: d.proc.poll() is not None or ((outbox / "IMG_2" / "report.json").exists()
                                                       and list(outbox.glob("failed/*.error.json"))), 120,
                 what="the report and the failure")
        report = json.loads((outbox / "IMG_2" / "report.json").read_text())
        # the original and its sidecar stay where they were; the report folder holds the same file, hard-linked
        assert kept.is_file() and (inbox / "cartier" / "IMG_2.mode").is_file()
        in_report = outbox / "IMG_2" / report["photo"]["file"]
        assert report["photo"]["original"] == "linked" and os.path.samefile(in_report, kept)
        assert not in_report.is_symlink() and os.stat(kept).st_nlink == 2
        assert report["advisor"]["id"] == "cartier" and report["mode"]["source"] == "sidecar"
        # the report page and the index still show the photo
        assert (outbox / "IMG_2" / "preview.jpg").is_file() and (outbox / "IMG_2" / "thumb.jpg").is_file()
        assert 'src="preview.jpg"' in (outbox / "IMG_2" / "report.html").read_text()
        # (the index is refreshed once the job is recorded done, a moment after its folder appears)
        wait_for(lambda: 'IMG_2/thumb.jpg' in (outbox / "index.html").read_text(), 30, what="the index listing it")
        # a photo that fails stays where it is too, with its record in failed/
        assert broken.is_file()
        [record] = [json.loads(p.read_text()) for p in outbox.glob("failed/*.error.json")]
        assert record["file"] == "broken.jpg" and "left where it is" in record["what_to_do"]
        assert not any(p.is_file() for p in (outbox / "failed").iterdir()
                       if not p.name.endswith((".error.json", ".error.html")))
        assert d.stop() == 0

    # a restart rescans the inbox: the kept photo is done, the broken one failed; neither is taken up again
    with Daemon(home, smoke_model_path) as d:
        _settle_with_a_marker(home, smoke_model_path, d, "marker-1.jpg", seed=52)
        jobs = _jobs(home)
        assert sorted(j.rel_path for j in jobs) == ["broken.jpg", "cartier/IMG_2.jpg", "marker-1.jpg"], \
            [(j.rel_path, j.state, j.error) for j in jobs]
        assert not list(outbox.glob("duplicates/*")) and len(reports(outbox)) == 2

        # edited (an editor's save: a new file renamed over the old one): new work, a new report
        photo(tmp_path / "edited.jpg", seed=53)
        os.replace(tmp_path / "edited.jpg", kept)
        wait_for(lambda: d.proc.poll() is not None or (outbox / "IMG_2-2" / "report.json").exists(), 120,
                 what="the edited photo's report")
        second = json.loads((outbox / "IMG_2-2" / "report.json").read_text())
        assert second["photo"]["sha256"] == _sha(kept) != analysed
        assert os.path.samefile(outbox / "IMG_2-2" / "IMG_2.jpg", kept)
        assert _sha(outbox / "IMG_2" / "IMG_2.jpg") == analysed  # the first report keeps the bytes it describes

        # its sidecar asks for another mode: new work too (rag without references falls back to baseline, so it is
        # a duplicate of the report just made, recorded once and left in place)
        (inbox / "cartier" / "IMG_2.mode").write_text("rag\n")
        wait_for(lambda: d.proc.poll() is not None or list((outbox / "duplicates").glob("*.duplicate.json")), 120,
                 what="the duplicate record")
        [dup] = [json.loads(p.read_text()) for p in (outbox / "duplicates").glob("*.duplicate.json")]
        assert dup["duplicate_of_job"] == second["job_id"] and "kept" in dup
        assert kept.is_file() and not [p for p in outbox.glob("duplicates/*") if p.suffix != ".json"]
        _settle_with_a_marker(home, smoke_model_path, d, "marker-2.jpg", seed=54)
        assert d.stop() == 0

    jobs = _jobs(home)
    assert [j.rel_path for j in jobs].count("cartier/IMG_2.jpg") == 3  # analysed, edited, asked for rag: no more
    assert [j.state for j in jobs].count("failed") == 1 and len(reports(outbox)) == 4
    assert all(j.kept for j in jobs) and kept.is_file() and broken.is_file()


def test_a_kill_while_publishing_a_kept_photo_is_finished_once_at_the_next_start(tmp_path: Path,
                                                                                 smoke_model_path: Path) -> None:
    home = make_home(tmp_path / "home", smoke_model_path, keep_originals=True)
    inbox, outbox = home / "inbox", home / "outbox"
    seeds = {"staged": 61, "renamed": 63}
    for point, seed in seeds.items():
        kept = photo(inbox / f"{point}.jpg", seed=seed)
        with Daemon(home, smoke_model_path, MONDRIAN_TEST_CRASH_AT=point) as d:
            assert d.wait(120) == -9, d.output()  # SIGKILLed itself at that point
        with Daemon(home, smoke_model_path) as d:
            # (after "renamed" its report is there already: the ledger says when the job is finished)
            wait_for(lambda: d.proc.poll() is not None or any(j.rel_path == f"{point}.jpg" and j.state == "done"
                                                              for j in _jobs(home)), 120, what=f"{point}.jpg done")
            assert d.stop() == 0, d.output()
        report = json.loads((outbox / point / "report.json").read_text())
        assert kept.is_file() and os.path.samefile(outbox / point / f"{point}.jpg", kept)
        assert report["photo"]["original"] == "linked" and os.stat(kept).st_nlink == 2  # staging's link is gone
    # a duplicate killed after its record was written is finished, and stays in the inbox
    twin = inbox / "twin.jpg"
    twin.write_bytes((inbox / "renamed.jpg").read_bytes())
    with Daemon(home, smoke_model_path, MONDRIAN_TEST_CRASH_AT="dup_recorded") as d:
        assert d.wait(120) == -9, d.output()
    with Daemon(home, smoke_model_path) as d:
        _settle_with_a_marker(home, smoke_model_path, d, "marker.jpg", seed=64)
        assert d.stop() == 0
    jobs = _jobs(home)
    assert sorted(j.rel_path for j in jobs) == sorted([f"{p}.jpg" for p in seeds] + ["twin.jpg", "marker.jpg"])
    assert all(j.state == "done" for j in jobs) and [j.duplicate_of is not None for j in jobs].count(True) == 1
    assert twin.is_file() and len(reports(outbox)) == 3 and not list(outbox.glob(".staging/*"))
    assert [p.name for p in outbox.glob("duplicates/*")] == ["twin.jpg.duplicate.json"]


def test_a_kept_photo_fixed_where_it_is_takes_its_old_failure_record_away(tmp_path, smoke_model_path):
    from tests.harness import mondrian

    home = make_home(tmp_path / "home", smoke_model_path, keep_originals=True, max_pixels=56 * 56,
                     comment_max_chars=8, max_tokens=400, api_port=0)
    shot = home / "inbox" / "harbour.jpg"
    shot.write_bytes(b"\xff\xd8\xff\xe0 not a whole JPEG")  # an export that went wrong
    other = home / "inbox" / "other.jpg"
    other.write_bytes(b"\xff\xd8\xff\xe0 also broken")
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0
    failed = home / "outbox" / "failed"
    assert (failed / "harbour.jpg.error.json").is_file() and (failed / "other.jpg.error.json").is_file()
    assert shot.exists()  # kept where it was dropped

    photo(shot, seed=4, size=(64, 48))  # exported again, in place
    os.utime(shot, (time.time() + 1, time.time() + 1))
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0
    assert reports(home / "outbox") and (home / "outbox" / "harbour" / "report.json").is_file()
    # Its failure record is gone with it; the other photo, still broken, keeps its own.
    assert not (failed / "harbour.jpg.error.json").exists() and not (failed / "harbour.jpg.error.html").exists()
    assert (failed / "other.jpg.error.json").is_file()


def test_a_kept_photo_given_a_whole_name_sidecar_later_is_analysed_in_that_mode(tmp_path, smoke_model_path):
    """`IMG_3.jpg.mode` (named after the whole file, as editors name `IMG_3.NEF.xmp`) added to a kept photo that is
    done asks for another mode, as `IMG_3.mode` would: new work, not "done" because the folder's listing only
    knew the short name. A UTF-16 sidecar (TextEdit, Notepad) is read as text."""
    from tests.harness import mondrian

    home = make_home(tmp_path / "home", smoke_model_path, keep_originals=True, max_pixels=56 * 56,
                     comment_max_chars=8, max_tokens=400, api_port=0)
    shot = home / "inbox" / "IMG_3.jpg"
    photo(shot, seed=7, size=(64, 48))
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0
    assert [(j.rel_path, j.requested_mode) for j in _jobs(home)] == [("IMG_3.jpg", "baseline")]

    (home / "inbox" / "IMG_3.jpg.mode").write_bytes("rag\n".encode("utf-16"))
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0
    jobs = _jobs(home)
    assert [(j.rel_path, j.requested_mode) for j in jobs] == [("IMG_3.jpg", "baseline"), ("IMG_3.jpg", "rag")], \
        [(j.rel_path, j.requested_mode, j.state, j.error) for j in jobs]
    assert shot.is_file()


def test_a_kept_original_that_gets_the_xmp_embedded_is_a_copy_and_says_so(tmp_path: Path,
                                                                           smoke_model_path: Path) -> None:
    """keep_originals with xmp_embed: the hard link put into the report folder was replaced by the embedded copy once
    published (the inbox's file rightly untouched), yet report.json said `"original": "linked"`. A JPEG or TIFF
    that gets the XMP is copied and said to be; a PNG, which gets none, is still linked."""
    from tests.harness import mondrian

    home = make_home(tmp_path / "home", smoke_model_path, keep_originals=True, xmp_embed=True)
    jpeg = photo(home / "inbox" / "dune.jpg", seed=71)
    png = photo(home / "inbox" / "moon.png", seed=72, fmt="PNG")
    before = _sha(jpeg)
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    dune = json.loads((home / "outbox" / "dune" / "report.json").read_text())
    in_report = home / "outbox" / "dune" / dune["photo"]["file"]
    assert dune["photo"]["original"] == "copied", dune["photo"]
    assert _sha(jpeg) == before and os.stat(jpeg).st_nlink == 1  # the photographer's file: untouched, unshared
    assert _sha(in_report) != before and b"mondrian" in in_report.read_bytes()  # the XMP is inside the copy
    moon = json.loads((home / "outbox" / "moon" / "report.json").read_text())
    assert moon["photo"]["original"] == "linked" and os.path.samefile(home / "outbox" / "moon" / "moon.png", png)
