"""Where a photo ends up, and under what name: fixes from the red-team pass (attacks 05, 06, 09, 13, 15, 46, 47).

The real daemon and CLI on real folders. Permission attacks drop the root capabilities that ignore file modes
(`setpriv`), so a read-only folder is read-only for the daemon as it would be for any user.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import (REPO, Daemon, env_for, ledger_jobs, make_home, mondrian, named, photo, reports, status,
                           wait_for)

RUN_TIMEOUT = 180  # generous: a stranded photo never lets `run --once` exit, however long this is
NO_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search,-fowner",
          "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def _as_user() -> list[str]:
    """A command prefix under which file modes apply to this process (root ignores them)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None or subprocess.run([*NO_DAC, "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot drop root's file-permission override here (setpriv)")
    return NO_DAC


def _run_once(home: Path, model: Path, *, prefix: list[str] | None = None, **env: str) -> str:
    try:
        out = subprocess.run([*(prefix or []), sys.executable, "-m", "daemon", "run", "--once"],
                             env=env_for(home, model, **env), cwd=REPO, capture_output=True, text=True,
                             timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"`mondrian run --once` did not exit within {RUN_TIMEOUT} s: a photo is stranded") \
            from exc
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr


def _assert_reports_hold_their_originals(outbox: Path) -> dict[str, dict]:
    """Every report folder holds the original its report names, byte for byte; returns the reports by folder."""
    import hashlib

    found = {}
    for rj in reports(outbox):
        report = json.loads(rj.read_text())
        original = rj.parent / report["photo"]["file"]
        assert original.is_file() and not original.is_symlink(), f"{rj.parent.name}/ has no original {original.name}"
        assert hashlib.sha256(original.read_bytes()).hexdigest() == report["photo"]["sha256"], \
            f"{rj.parent.name}/{original.name} is not the original (a generated file took its name?)"
        found[rj.parent.name] = report
    return found


def _chmod_back(*paths: Path) -> None:
    for p in paths:
        if os.path.lexists(p):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)


# ------------------------------------------------------------------------------------------------ 15
def test_a_photo_that_cannot_be_moved_out_or_read_fails_once_in_place_and_retry_finishes_it(tmp_path,
                                                                                              smoke_model_path):
    """Attack 15: a photo in a read-only folder was analysed 4 times, leaving 4 report folders without originals
    and an "unexpected error: PermissionError"; an unreadable folder got only a log line."""
    prefix = _as_user()
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    photo(inbox / "ok.jpg", 1)
    locked = photo(inbox / "locked.jpg", 2)
    secret, ro, listed = inbox / "secret", inbox / "rofolder", inbox / "listonly"
    photo(secret / "s.jpg", 3)
    photo(ro / "r.jpg", 4)
    photo(listed / "l.jpg", 5)
    locked.chmod(0o000)
    secret.chmod(0o000)
    ro.chmod(0o555)
    listed.chmod(0o644)  # `chmod -R 644`: its names can be listed, its files not looked at
    try:
        _run_once(home, smoke_model_path, prefix=prefix)
        jobs = ledger_jobs(home)
        r = jobs["rofolder/r.jpg"]
        assert r.state == "failed" and r.error_kind == "permanent" and r.attempts == 1, (r.state, r.error)
        assert "rofolder" in r.error and "chmod u+w" in r.error and named(home, "retry --failed") in r.error
        assert "PermissionError" not in r.error
        assert jobs["locked.jpg"].state == "failed" and "chmod u+r" in jobs["locked.jpg"].error
        assert (ro / "r.jpg").exists() and locked.exists(), "left where they are"
        assert sorted(_assert_reports_hold_their_originals(outbox)) == ["ok"], "no report without its original"
        failures = {f["file"]: f for f in status(home, smoke_model_path)["recent_failures"]}
        assert "secret" in failures and "chmod u+rwx" in failures["secret"]["reason"], failures
        assert "listonly" in failures and "cannot look inside the folder inbox/listonly/" in \
            failures["listonly"]["reason"], failures
        # A folder has no failure record to miss, and its next step is about the folder, not a photo.
        assert failures["secret"]["note"] is None and failures["secret"]["record"] is None, failures["secret"]
        assert failures["secret"]["next_step"].startswith("make the folder readable"), failures["secret"]

        # Not requeued by the next runs: nothing is analysed again while nothing changed.
        _run_once(home, smoke_model_path, prefix=prefix)
        assert sorted(_assert_reports_hold_their_originals(outbox)) == ["ok"]
        assert ledger_jobs(home)["rofolder/r.jpg"].attempts == 1

        # Follow the messages: make them readable / writable, `mondrian retry --failed`.
        _chmod_back(locked, secret, ro, listed)
        out = mondrian(home, smoke_model_path, "retry", "--failed")
        assert out.returncode == 0, out.stderr
        _run_once(home, smoke_model_path, prefix=prefix)
    finally:
        _chmod_back(locked, secret, ro, listed)
    done = _assert_reports_hold_their_originals(outbox)
    assert sorted(done) == ["l", "locked", "ok", "r", "s"], sorted(done)  # each analysed once: no r-2
    assert not list((outbox / "failed").iterdir()), "records of fixed failures are gone"
    assert status(home, smoke_model_path)["counts"]["failed"] == 0


def test_a_photo_that_failed_where_it_lay_is_retried_after_the_inbox_moved(tmp_path, smoke_model_path):
    """The README lets a studio move its inbox (`inbox` in mondrian.toml, the folder moved along). A photo that
    failed where it lay (a read-only folder) was then "neither in failed/ nor in the inbox" for `retry --failed`,
    which cleared its entry: it is found at its place in the new inbox and critiqued."""
    prefix = _as_user()
    home = make_home(tmp_path / "home", smoke_model_path)
    ro = home / "inbox" / "rofolder"
    photo(ro / "r.jpg", 4)
    ro.chmod(0o555)
    try:
        _run_once(home, smoke_model_path, prefix=prefix)
        assert ledger_jobs(home)["rofolder/r.jpg"].state == "failed"
    finally:
        _chmod_back(ro)
    moved = tmp_path / "Shoots inbox"
    (home / "inbox").rename(moved)
    with open(home / "mondrian.toml", "a") as fh:
        fh.write(f'inbox = "{moved}"\n')
    out = mondrian(home, smoke_model_path, "retry", "--failed")
    assert out.returncode == 0 and "1 photo(s) queued again" in out.stderr, out.stdout + out.stderr
    _run_once(home, smoke_model_path, prefix=prefix)
    job = ledger_jobs(home)["rofolder/r.jpg"]
    assert job.state == "done", (job.state, job.error)
    assert sorted(_assert_reports_hold_their_originals(home / "outbox")) == ["r"]
    assert not (moved / "rofolder" / "r.jpg").exists()


def test_an_original_that_cannot_be_moved_after_its_report_is_written_withdraws_the_report(tmp_path,
                                                                                           smoke_model_path):
    """Attack 15, the race: the folder turns read-only after the checks, while the photo is being analysed."""
    prefix = _as_user()
    home = make_home(tmp_path / "home", smoke_model_path)
    ro = home / "inbox" / "rofolder"
    photo(ro / "r.jpg", 4)
    log = tmp_path / "daemon.log"
    # Every forward pass takes 0.2 s, so the analysis lasts seconds: the folder turns read-only well within it.
    with open(log, "wb") as fh:
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "daemon", "run", "--once"],
                                env=env_for(home, smoke_model_path, MONDRIAN_TEST_TOKEN_SECONDS="0.2"), cwd=REPO,
                                stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "analysing rofolder/r.jpg" in log.read_text(), timeout=120, what="the analysis to start")
        ro.chmod(0o555)
        assert proc.wait(timeout=RUN_TIMEOUT) == 0, log.read_text()[-3000:]
        assert "analysing rofolder/r.jpg" in log.read_text() and not (home / "outbox" / "r" / "r.jpg").exists()
        job = ledger_jobs(home)["rofolder/r.jpg"]
        assert job.state == "failed" and "chmod u+w" in job.error and job.attempts == 1, (job.state, job.error)
        assert "withdrawn" in job.error
        assert (ro / "r.jpg").exists()
        assert [p.name for p in (home / "outbox").iterdir() if p.is_dir() and p.name not in
                ("failed", ".staging")] == [], "no report folder left behind"
        ro.chmod(0o755)
        assert mondrian(home, smoke_model_path, "retry", "--failed").returncode == 0
        _run_once(home, smoke_model_path, prefix=prefix)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ro.chmod(0o755)
    assert sorted(_assert_reports_hold_their_originals(home / "outbox")) == ["r"]


def test_failures_and_duplicates_named_alike_but_for_case_or_form_stay_apart_on_a_mac(tmp_path, smoke_model_path):
    """`IMG_5.JPG` and `img_5.jpg` (or `Café` in its two Unicode forms) are two files on Linux, and were filed in
    failed/ and duplicates/ under those names: once the outbox is synced to a Mac (or copied to an exFAT disk) they
    are one name, and one photo overwrote the other. Report folders were kept apart already; now these are too."""
    import unicodedata

    home = make_home(tmp_path / "home", smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    nfc, nfd = "Caf\u00e9.jpg", "Cafe\u0301.jpg"
    for name in ("IMG_5.JPG", "img_5.jpg", nfc, nfd):
        (inbox / name).write_bytes(b"\xff\xd8\xff\xe0 not a whole JPEG " + name.encode())
    first = photo(inbox / "pic.jpg", seed=8)
    _run_once(home, smoke_model_path)
    for name in ("DUP.jpg", "dup.jpg"):
        (inbox / name).write_bytes((outbox / "pic" / "pic.jpg").read_bytes())
    _run_once(home, smoke_model_path)
    assert not first.exists() and not list(inbox.iterdir())

    def as_a_mac_sees(folder):
        return [unicodedata.normalize("NFD", p.name).casefold() for p in folder.iterdir()]

    for folder, count in ((outbox / "failed", 4 * 3), (outbox / "duplicates", 2 * 2)):  # each with its records
        names = as_a_mac_sees(folder)
        assert len(names) == count and len(set(names)) == count, sorted(p.name for p in folder.iterdir())
    jobs = ledger_jobs(home)
    assert {jobs[n].state for n in ("IMG_5.JPG", "img_5.jpg", nfc, nfd)} == {"failed"}
    assert {jobs[n].state for n in ("DUP.jpg", "dup.jpg")} == {"done"}


# ------------------------------------------------------------------------------------------------ 13
def test_a_file_larger_than_max_file_mb_is_refused_before_it_is_read(tmp_path, smoke_model_path):
    """Attack 13: a sparse 10 GB `.jpg` was read whole into memory; MemoryError was retried as transient."""
    home = make_home(tmp_path / "home", smoke_model_path, max_file_mb=2)
    photo(home / "inbox" / "ok.jpg", 1)
    with open(home / "inbox" / "huge.jpg", "wb") as f:
        f.truncate(3 * 1024 * 1024)  # sparse: the size is what counts, not the bytes on disk
    refs = home / "advisors" / "ansel" / "references"
    photo(refs / "fine.jpg", 5)
    with open(refs / "vast.jpg", "wb") as f:
        f.truncate(3 * 1024 * 1024)
    t = time.time() - 30
    for p in refs.iterdir():
        os.utime(p, (t, t))
    out = mondrian(home, smoke_model_path, "references", "index", "--advisor", "ansel")
    assert "vast.jpg" in out.stderr and "max_file_mb" in out.stderr, out.stderr
    assert "1 indexed" in out.stderr, out.stderr
    _run_once(home, smoke_model_path)
    huge = ledger_jobs(home)["huge.jpg"]
    assert huge.state == "failed" and huge.error_kind == "permanent" and huge.attempts == 1, (huge.state, huge.error)
    assert "3 MB" in huge.error and "max_file_mb" in huge.error, huge.error
    assert "no photo is that large" not in huge.error  # at 2 MB, lowered on purpose, many photos are
    assert (home / "outbox" / "failed" / "huge.jpg").exists()
    (failure,) = status(home, smoke_model_path)["recent_failures"]
    assert "raise `max_file_mb`" in failure["next_step"], failure  # not "fix or re-export the photo"
    assert sorted(_assert_reports_hold_their_originals(home / "outbox")) == ["ok"]


# ------------------------------------------------------------------------------------------------ 47
def test_photos_named_like_the_report_files_keep_their_originals(tmp_path, smoke_model_path):
    """Attack 47: `analyze thumb.jpg` left no copy of the original; `preview.jpg` was stored as `preview-2.jpg`
    while the report's `file` named the generated preview."""
    home = make_home(tmp_path / "home", smoke_model_path)
    for i, name in enumerate(("preview.jpg", "thumb.jpg", "Preview.JPG", "ref-1.jpg", "THUMB.jpg")):
        photo(home / "inbox" / name, 10 + i)
    _run_once(home, smoke_model_path)
    outside = photo(tmp_path / "elsewhere" / "thumb.jpg", 30)
    out = mondrian(home, smoke_model_path, "analyze", str(outside))
    assert out.returncode == 0, out.stderr
    assert outside.exists()
    found = _assert_reports_hold_their_originals(home / "outbox")
    assert len(found) == 6, sorted(found)
    for folder, report in found.items():
        names = sorted(p.name for p in (home / "outbox" / folder).iterdir())
        assert {"preview.jpg", "thumb.jpg", "report.json", "report.html", report["photo"]["file"]} <= set(names)


# ------------------------------------------------------------------------------------------------ 09
def test_a_link_to_another_inbox_photo_is_not_analysed_and_its_target_is_analysed_as_itself(tmp_path,
                                                                                            smoke_model_path):
    """Attack 09: `alias.jpg -> album/real.jpg` was moved into the outbox dangling, and the real photo was filed
    as a duplicate of it."""
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    photo(inbox / "album" / "real.jpg", 1)
    os.symlink("album/real.jpg", inbox / "alias.jpg")  # claimed before its target
    os.symlink("album/real.jpg", inbox / "zlink.jpg")  # claimed after it: dangles by then
    _run_once(home, smoke_model_path)
    found = _assert_reports_hold_their_originals(outbox)
    assert sorted(found) == ["real"], sorted(found)
    assert not (outbox / "duplicates").exists() or not list((outbox / "duplicates").iterdir())
    dangling = [p for p in outbox.rglob("*") if p.is_symlink()]
    assert dangling == [], dangling
    jobs = ledger_jobs(home)
    assert jobs["album/real.jpg"].state == "done" and jobs["album/real.jpg"].duplicate_of is None
    for link in ("alias.jpg", "zlink.jpg"):
        assert jobs[link].state == "gone" and "inbox/album/real.jpg" in jobs[link].error, jobs[link].error
        assert not os.path.lexists(inbox / link)


def test_a_loop_of_links_is_a_failure_with_its_reason_not_deleted_in_silence(tmp_path, smoke_model_path):
    """`a.jpg -> b.jpg -> a.jpg` and `self.jpg -> self.jpg`: each was taken for a link to another inbox photo (the
    loop's resolved path lies in the inbox, and is even queued) and deleted, with "analysed as itself" recorded and
    nothing in the outbox. Each fails, with its reason, in failed/."""
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox, failed = home / "inbox", home / "outbox" / "failed"
    os.symlink("b.jpg", inbox / "a.jpg")
    os.symlink("a.jpg", inbox / "b.jpg")
    os.symlink("self.jpg", inbox / "self.jpg")
    photo(inbox / "real.jpg", 1)
    _run_once(home, smoke_model_path)
    jobs = ledger_jobs(home)
    assert jobs["real.jpg"].state == "done"
    # The loop's first link fails as one; the second then points at a file filed in failed/: a link to nothing.
    reasons = ("loop of links", "target no longer exists")
    for name in ("a.jpg", "b.jpg", "self.jpg"):
        job = jobs[name]
        assert job.state == "failed" and any(r in job.error for r in reasons), (name, job.state, job.error)
        record = json.loads((failed / f"{name}.error.json").read_text())
        assert record["reason"] == job.error, record
        assert os.path.islink(failed / name) and not os.path.lexists(inbox / name)
    assert "loop of links" in jobs["self.jpg"].error
    assert sum("loop of links" in jobs[n].error for n in ("a.jpg", "b.jpg")) >= 1


# ------------------------------------------------------------------------------------------------ 05
def test_retry_brings_back_the_sidecar_the_user_fixed_in_failed(tmp_path, smoke_model_path):
    """Attack 05: the record says "fix the sidecar"; the fixed `failed/r.mode` was left behind by `retry`."""
    home = make_home(tmp_path / "home", smoke_model_path)
    photo(home / "inbox" / "r.jpg", 1)
    (home / "inbox" / "r.mode").write_text("bogus\n")
    _run_once(home, smoke_model_path)
    failed = home / "outbox" / "failed"
    record = json.loads((failed / "r.jpg.error.json").read_text())
    assert "sidecar" in record["reason"]
    (failed / "r.mode").write_text("rag\n")
    out = mondrian(home, smoke_model_path, "retry", "--failed")
    assert out.returncode == 0, out.stderr
    _run_once(home, smoke_model_path)
    report = _assert_reports_hold_their_originals(home / "outbox")["r"]
    assert report["mode"]["requested"] == "rag" and report["mode"]["source"] == "sidecar", report["mode"]
    assert sorted(p.name for p in failed.iterdir()) == []


def test_a_failed_photo_in_a_name_taken_in_failed_keeps_its_own_sidecar(tmp_path, smoke_model_path):
    """The sidecar is named after where its photo went in failed/ (r-2.jpg, r-2.mode): retry pairs them again."""
    home = make_home(tmp_path / "home", smoke_model_path)
    failed = home / "outbox" / "failed"
    photo(home / "inbox" / "a" / "r.jpg", 1)
    (home / "inbox" / "a" / "r.mode").write_text("bogus\n")
    photo(home / "inbox" / "b" / "r.jpg", 2)
    (home / "inbox" / "b" / "r.mode").write_text("nonsense\n")
    _run_once(home, smoke_model_path)
    names = sorted(p.name for p in failed.iterdir())
    assert names == ["r-2.jpg", "r-2.jpg.error.html", "r-2.jpg.error.json", "r-2.mode", "r.jpg", "r.jpg.error.html",
                     "r.jpg.error.json", "r.mode"], names
    for stem in ("r", "r-2"):
        (failed / f"{stem}.mode").write_text("baseline\n")
    assert mondrian(home, smoke_model_path, "retry", "--failed").returncode == 0
    _run_once(home, smoke_model_path)
    found = _assert_reports_hold_their_originals(home / "outbox")
    assert len(found) == 2 and all(r["mode"]["source"] == "sidecar" for r in found.values())


# ------------------------------------------------------------------------------------------------ 06
def test_a_sidecar_goes_with_the_photo_whose_stem_it_matches_exactly(tmp_path, smoke_model_path):
    """Attack 06: with `x.jpg`, `X.jpg` and `X.MODE`, `x.jpg` (analysed first) took `X.MODE`."""
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox = home / "inbox"
    photo(inbox / "x.jpg", 3)
    (inbox / "X.MODE").write_text("rag\n")
    (inbox / "X.jpg").write_bytes(b"")  # still being copied: waited for while x.jpg is analysed
    with Daemon(home, smoke_model_path) as d:
        wait_for(lambda: (home / "outbox" / "x" / "report.json").exists(), timeout=120, what="x.jpg's report")
        photo(tmp_path / "X.jpg", 4).replace(inbox / "X.jpg")
        # `X` would be the same folder as `x` on a Mac, so X.jpg's report gets the next free name.
        wait_for(lambda: (home / "outbox" / "X-2" / "report.json").exists(), timeout=120, what="X.jpg's report")
        assert d.stop() == 0
    found = _assert_reports_hold_their_originals(home / "outbox")
    assert (found["x"]["mode"]["requested"], found["x"]["mode"]["source"]) == ("baseline", "default")
    assert (found["X-2"]["mode"]["requested"], found["X-2"]["mode"]["source"]) == ("rag", "sidecar")
    assert (home / "outbox" / "X-2" / "X.MODE").exists()


def test_one_mode_sidecar_speaks_for_every_photo_of_its_stem(tmp_path, smoke_model_path):
    """IMG_3.jpg, IMG_3.png and one IMG_3.mode: whichever is analysed first must not take the sidecar away from the
    other, which would then run on the default mode without a word."""
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox = home / "inbox"
    photo(inbox / "IMG_3.jpg", 5)
    photo(inbox / "IMG_3.png", 6)
    (inbox / "IMG_3.mode").write_text("rag\n")
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    found = _assert_reports_hold_their_originals(home / "outbox")
    assert len(found) == 2
    for folder, report in found.items():
        assert (report["mode"]["requested"], report["mode"]["source"]) == ("rag", "sidecar"), folder
        assert (home / "outbox" / folder / "IMG_3.mode").read_text() == "rag\n"
    assert not any(inbox.iterdir())


def test_a_sidecar_suffix_in_another_case_still_goes_with_its_photo(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    photo(home / "inbox" / "IMG_1.jpg", 3)
    (home / "inbox" / "IMG_1.MODE").write_text("rag\n")
    photo(home / "inbox" / "b.jpg", 4)
    (home / "inbox" / "B.mode").write_text("rag\n")  # no photo is named exactly B: it is b.jpg's
    _run_once(home, smoke_model_path)
    found = _assert_reports_hold_their_originals(home / "outbox")
    assert found["IMG_1"]["mode"]["source"] == "sidecar" and found["b"]["mode"]["source"] == "sidecar"


def test_a_mode_sidecar_named_after_the_whole_file_is_read_and_goes_with_that_photo(tmp_path, smoke_model_path):
    """`IMG_1.jpg.mode`, named as editors name their XMP (`IMG_1.NEF.xmp`): the photo ran on the default mode without
    a word, and the sidecar stayed in the inbox, not even listed as stray. It is read; beside IMG_4.png it is
    IMG_4.jpg's alone."""
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox = home / "inbox"
    photo(inbox / "IMG_1.jpg", 7)
    (inbox / "IMG_1.jpg.mode").write_text("rag\n")
    photo(inbox / "IMG_4.jpg", 8)
    photo(inbox / "IMG_4.png", 9)
    (inbox / "IMG_4.jpg.mode").write_text("baseline\n")  # the default's mode: one batch, the .jpg published first
    _run_once(home, smoke_model_path)
    found = _assert_reports_hold_their_originals(home / "outbox")
    assert (found["IMG_1"]["mode"]["requested"], found["IMG_1"]["mode"]["source"]) == ("rag", "sidecar")
    by_file = {r["photo"]["file"]: r for r in found.values()}
    assert by_file["IMG_4.jpg"]["mode"]["source"] == "sidecar"
    assert by_file["IMG_4.png"]["mode"]["source"] == "default"
    assert (home / "outbox" / "IMG_1" / "IMG_1.mode").read_text() == "rag\n"
    assert not any(inbox.iterdir()), sorted(inbox.iterdir())

    # Whichever is published first (the order is the queue's): IMG_4.jpg.mode is not shared with IMG_4.png, so
    # IMG_4.jpg takes it along rather than a copy that would stay behind in the inbox.
    from daemon.config import load_config
    from daemon.ledger import Ledger
    from daemon.pipeline.outbox_index import OutboxIndex
    from daemon.pipeline.publish import Publisher

    cfg = load_config(home, env={})
    ledger = Ledger(cfg.db_path)
    publisher = Publisher(cfg, ledger, OutboxIndex(cfg, ledger))
    photo(inbox / "IMG_5.jpg", 10)
    photo(inbox / "IMG_5.png", 11)
    (inbox / "IMG_5.jpg.mode").write_text("rag\n")
    (inbox / "IMG_5.mode").write_text("rag\n")
    assert not publisher._shared(inbox / "IMG_5.jpg", inbox / "IMG_5.jpg.mode")
    assert publisher._shared(inbox / "IMG_5.jpg", inbox / "IMG_5.mode")


# ------------------------------------------------------------------------------------------------ 46
def test_retry_says_which_photo_it_cannot_put_back_and_goes_on_with_the_rest(tmp_path, smoke_model_path):
    """Attack 46: a file now sits where the photo's inbox folder was; `retry --failed` died with FileExistsError."""
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox, failed = home / "inbox", home / "outbox" / "failed"
    photo(inbox / "album" / "x.jpg", 1)
    (inbox / "album" / "x.mode").write_text("bogus\n")
    photo(inbox / "y.jpg", 2)
    (inbox / "y.mode").write_text("bogus\n")
    _run_once(home, smoke_model_path)
    for p in failed.glob("*.mode"):
        p.unlink()
    (inbox / "album").rmdir()
    (inbox / "album").write_text("a note\n")
    out = mondrian(home, smoke_model_path, "retry", "--failed")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert "album/x.jpg could not be put back" in out.stderr and "1 photo(s) queued again" in out.stderr, out.stderr
    assert (inbox / "y.jpg").exists() and (failed / "x.jpg").exists()
    jobs = ledger_jobs(home)
    assert jobs["y.jpg"].state == "queued" and jobs["album/x.jpg"].state == "failed"


def test_earlier_critiques_link_only_reports_still_in_their_folders_never_the_page_itself(tmp_path, smoke_model_path):
    """Attack: the report folder of alpha.png deleted (or renamed), the same bytes dropped again: the new report went
    into the freed outbox/alpha/ and its "Earlier critiques" linked `../alpha/report.html` (itself) as the old job.
    An earlier report is linked only while its folder holds that job's report."""
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    original = photo(tmp_path / "alpha.png", seed=7)

    def drop(rel: str = "alpha.png", folder: str = "alpha") -> dict:
        shutil.copy2(original, inbox / rel)
        _run_once(home, smoke_model_path)
        return json.loads((outbox / folder / "report.json").read_text())

    first = drop()
    shutil.rmtree(outbox / "alpha")  # deleted: analysed again (under a name of its own: see the test below)
    second = drop(folder="alpha-2")
    assert second["job_id"] != first["job_id"] and "earlier_reports" not in second, second.get("earlier_reports")
    (outbox / "alpha-2").rename(outbox / "kept")  # renamed: the ledger still names outbox/alpha-2/
    third = drop(folder="alpha-3")
    assert third["job_id"] not in (first["job_id"], second["job_id"])
    # The renamed folder is followed where it is now (it was once not linked at all); the deleted one is gone.
    assert [(e["job_id"], e["report"]) for e in third["earlier_reports"]] == [(second["job_id"], "../kept/report.html")]
    # The same bytes for another advisor: a critique of its own, linking the earlier reports still in place.
    (inbox / "cartier").mkdir()
    fourth = drop("cartier/alpha.png", folder="alpha-4")
    links = [(e["job_id"], e["report"]) for e in fourth["earlier_reports"]]
    assert links == [(second["job_id"], "../kept/report.html"), (third["job_id"], "../alpha-3/report.html")]
    # Renamed or deleted after they were linked: the pages that link them follow (the index's next look at the
    # outbox renders them again), so no "Earlier critiques" link leads nowhere.
    (outbox / "kept").rename(outbox / "kept again")
    shutil.rmtree(outbox / "alpha-3")
    photo(inbox / "other.png", seed=8)
    _run_once(home, smoke_model_path)
    page = (outbox / "alpha-4" / "report.html").read_text(encoding="utf-8")
    assert 'href="../kept%20again/report.html"' in page and "../alpha-3/" not in page and "../kept/" not in page, page
    # A copy of the linked folder (sorted before it) does not take the link away from it.
    shutil.copytree(outbox / "kept again", outbox / "A copy")
    photo(inbox / "other2.png", seed=9)
    _run_once(home, smoke_model_path)
    assert 'href="../kept%20again/report.html"' in (outbox / "alpha-4" / "report.html").read_text(encoding="utf-8")
    # The index's cache lost, then a folder renamed back to the name report.json records: the page, which links
    # the name it was last given, follows. (alpha-5 links kept again and alpha-4, both there.)
    (inbox / "leibovitz").mkdir()
    fifth = drop("leibovitz/alpha.png", folder="alpha-5")
    assert [e["report"] for e in fifth["earlier_reports"]] == ["../kept%20again/report.html".replace("%20", " "),
                                                               "../alpha-4/report.html"], fifth["earlier_reports"]
    (outbox / "alpha-4").rename(outbox / "alpha four")
    photo(inbox / "other3.png", seed=10)
    _run_once(home, smoke_model_path)
    assert 'href="../alpha%20four/report.html"' in (outbox / "alpha-5" / "report.html").read_text(encoding="utf-8")
    (home / "var" / "outbox-index.json").unlink()
    (outbox / "alpha four").rename(outbox / "alpha-4")
    photo(inbox / "other4.png", seed=11)
    _run_once(home, smoke_model_path)
    page = (outbox / "alpha-5" / "report.html").read_text(encoding="utf-8")
    assert 'href="../alpha-4/report.html"' in page and "alpha%20four" not in page, page


def test_a_report_folders_name_is_never_given_to_another_photo(tmp_path, smoke_model_path):
    """Attack: alpha.png critiqued by Ansel (outbox/alpha/) and by Cartier (outbox/alpha-2/, whose page links
    `../alpha/report.html` as the earlier critique); outbox/alpha/ deleted; then another photo also named alpha.png
    went into the freed outbox/alpha/, and Cartier's page opened a stranger's report as alpha's earlier critique."""
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    shutil.copy2(photo(tmp_path / "a.png", seed=7), inbox / "alpha.png")
    _run_once(home, smoke_model_path)
    first = json.loads((outbox / "alpha" / "report.json").read_text())
    (inbox / "cartier").mkdir()
    shutil.copy2(photo(tmp_path / "a.png", seed=7), inbox / "cartier" / "alpha.png")
    _run_once(home, smoke_model_path)
    cartier = json.loads((outbox / "alpha-2" / "report.json").read_text())
    assert [(e["job_id"], e["report"]) for e in cartier["earlier_reports"]] == [(first["job_id"],
                                                                                 "../alpha/report.html")]
    shutil.rmtree(outbox / "alpha")
    shutil.copy2(photo(tmp_path / "b.png", seed=8), inbox / "alpha.png")  # another photo, the same name
    _run_once(home, smoke_model_path)
    stranger = json.loads((outbox / "alpha-3" / "report.json").read_text())
    assert stranger["job_id"] not in (first["job_id"], cartier["job_id"])
    assert not (outbox / "alpha").exists(), "the stranger's report took the name a page links to"
    assert sorted(p.name for p in outbox.glob("alpha*")) == ["alpha-2", "alpha-3"]


def test_a_report_folders_name_is_not_given_to_a_photo_whose_name_differs_only_in_case(tmp_path, smoke_model_path):
    """Attack: Alpha.png and Été.png critiqued, their folders deleted, then other photos named ALPHA.png and ÉTÉ.png
    took outbox/ALPHA/ and outbox/ÉTÉ/. On a Mac (and a studio's SMB share) those are the very folders the first
    reports' links open: case does not tell names apart there."""
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    shutil.copy2(photo(tmp_path / "a.png", seed=7), inbox / "Alpha.png")
    shutil.copy2(photo(tmp_path / "b.png", seed=8), inbox / "Été.png")
    _run_once(home, smoke_model_path)
    assert sorted(p.name for p in outbox.iterdir() if p.is_dir() and (p / "report.json").exists()) == ["Alpha", "Été"]
    shutil.rmtree(outbox / "Alpha")
    shutil.rmtree(outbox / "Été")
    shutil.copy2(photo(tmp_path / "c.png", seed=9), inbox / "ALPHA.png")
    shutil.copy2(photo(tmp_path / "d.png", seed=10), inbox / "ÉTÉ.png")
    _run_once(home, smoke_model_path)
    assert sorted(p.name for p in outbox.iterdir() if p.is_dir() and (p / "report.json").exists()) \
        == ["ALPHA-2", "ÉTÉ-2"]
