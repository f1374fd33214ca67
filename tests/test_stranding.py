"""Issue 9, promise 2: every file dropped into the inbox reaches a terminal state, with a reason.

The real daemon (`mondrian run --once`, which exits only when every photo is finished) on real folders, fed the
things a hostile tester drops in: wrong clocks, photos the user puts back after a failure, named pipes and
sockets, a folder named like a sidecar, long multibyte names, paths longer than the system allows, photos named
like the outbox's own folders, and absurd aspect ratios. Each test bounds the run with a timeout (a stranded file
keeps `run --once` from exiting) and then checks that every file sits in exactly one terminal place with a reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from tests.harness import Daemon, ledger_jobs, make_home, mondrian, named, photo, reports, status, wait_for
from tests.test_faults import read_only

RUN_TIMEOUT = 180  # generous: a stranded file never lets `run --once` exit, however long this is


def _run_once(home: Path, model: Path, timeout: float = RUN_TIMEOUT, **env: str) -> str:
    try:
        out = mondrian(home, model, "run", "--once", timeout=timeout, **env)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-3000:]
        raise AssertionError(f"`mondrian run --once` did not exit within {timeout} s: a file is stranded.\n"
                             f"{tail.decode(errors='replace') if isinstance(tail, bytes) else tail}") from None
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr


def _left_in(folder: Path) -> list[str]:
    """Everything but folders under `folder` (links, pipes and sockets included), relative."""
    left = []
    for dirpath, dirnames, filenames in os.walk(folder):
        left += [os.path.relpath(os.path.join(dirpath, n), folder) for n in filenames]
        left += [os.path.relpath(os.path.join(dirpath, n), folder) for n in dirnames
                 if os.path.islink(os.path.join(dirpath, n))]
    return sorted(left)


def _assert_terminal(home: Path) -> dict[str, object]:
    """Every job finished: done with its report, or failed with a reason and (when moved) its error record."""
    jobs = ledger_jobs(home)
    for rel, job in jobs.items():
        assert job.state in ("done", "failed", "gone"), (rel, job.state)
        if job.state == "failed":
            assert job.error, rel
            if job.output_dir:
                record = json.loads(Path(f"{job.output_dir}.error.json").read_text())
                assert record["reason"] == job.error and record["file"] == Path(rel).name
                assert os.path.lexists(job.output_dir), f"{rel}: the original is not beside its record"
        if job.state == "done" and job.duplicate_of is None:
            assert (Path(job.output_dir) / "report.json").is_file(), rel
    return jobs


# -- 1. clocks ------------------------------------------------------------------------------------------------

def test_photos_with_mtimes_in_the_future_or_far_past_are_analysed(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox = home / "inbox"
    now = time.time()
    stamps = {"tomorrow.jpg": now + 86400, "camera clock 2045.jpg": now + 20 * 365 * 86400,
              "from 1971.jpg": 365 * 86400.0}
    for i, (name, t) in enumerate(stamps.items()):
        photo(inbox / name, seed=i)
        os.utime(inbox / name, (t, t))  # a camera with a wrong clock, `cp -p`, unzip
    _run_once(home, smoke_model_path, timeout=120)
    jobs = _assert_terminal(home)
    assert {rel: j.state for rel, j in jobs.items()} == {name: "done" for name in stamps}
    assert _left_in(inbox) == []
    assert sorted(p.parent.name for p in reports(home / "outbox")) == sorted(Path(n).stem for n in stamps)


def test_a_reference_with_an_mtime_in_the_future_is_indexed(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    refs = home / "advisors" / "ansel" / "references"
    photo(refs / "future.jpg", seed=1)
    t = time.time() + 86400
    os.utime(refs / "future.jpg", (t, t))
    out = mondrian(home, smoke_model_path, "references", "index", "--advisor", "ansel", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "1 indexed" in out.stderr and "0 still being written" in out.stderr, out.stderr


# -- 2. a failed photo put back by the user -------------------------------------------------------------------

def test_a_failed_photo_put_back_by_the_user_is_analysed(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox, failed = home / "inbox", home / "outbox" / "failed"
    for i, name in enumerate(("moved back", "copied back")):
        photo(inbox / f"{name}.jpg", seed=i)
        (inbox / f"{name}.mode").write_text("fancy\n")  # an unknown mode: a permanent failure
    _run_once(home, smoke_model_path)
    jobs = _assert_terminal(home)
    assert {j.state for j in jobs.values()} == {"failed"} and len(jobs) == 2
    record = json.loads((failed / "moved back.jpg.error.json").read_text())
    assert "fancy" in record["reason"] and "drop it into the inbox again" in record["what_to_do"]

    # As the record says: fix the sidecar and put the photo back, keeping its mtime (mv; cp -p).
    time.sleep(0.05)
    os.rename(failed / "moved back.jpg", inbox / "moved back.jpg")
    shutil.copy2(failed / "copied back.jpg", inbox / "copied back.jpg")
    for name in ("moved back", "copied back"):
        (failed / f"{name}.mode").unlink()
        (inbox / f"{name}.mode").write_text("baseline\n")
    _run_once(home, smoke_model_path)
    assert _left_in(inbox) == [], "a photo put back into the inbox was ignored"
    assert sorted(p.parent.name for p in reports(home / "outbox")) == ["copied back", "moved back"]
    _assert_terminal(home)


def test_a_failed_photo_that_cannot_leave_the_inbox_is_skipped_with_a_log_line(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, rescan_seconds=1)
    inbox = home / "inbox"
    (inbox / "notes").mkdir()
    (inbox / "notes" / "notes.jpg").write_text("not a photo")
    # Its folder is read-only (a card reader's mount, a share Mondrian may read only): the failure cannot move it out,
    # so it stays, failed, in the inbox, where every rescan finds it again.
    with read_only(inbox / "notes"):
        with Daemon(home, smoke_model_path) as d:
            wait_for(lambda: [j.state for j in ledger_jobs(home).values()] == ["failed"], 60, what="notes.jpg failed")
            wait_for(lambda: "left in the inbox: notes/notes.jpg failed" in d.output(), 30,
                     what="a log line saying why notes.jpg is not queued again")
            time.sleep(3)  # several more rescans: still one job, and the line is not repeated on every rescan
            log = d.output()
            assert d.stop() == 0, d.output()
    assert [j.state for j in ledger_jobs(home).values()] == ["failed"]
    assert _left_in(inbox) == ["notes/notes.jpg"], _left_in(inbox)
    assert named(home, "retry --failed") in log and log.count("left in the inbox: notes/notes.jpg failed") == 1, \
        log[-2000:]


# -- 3. pipes, sockets and links to them ----------------------------------------------------------------------

def test_pipes_sockets_and_links_to_them_fail_with_a_reason_and_never_block(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox = home / "inbox"
    photo(inbox / "good.jpg", seed=1)
    os.mkfifo(inbox / "pipe.jpg")
    (inbox / "sub").mkdir()
    os.mkfifo(inbox / "sub" / "hidden pipe.jpg")
    os.symlink("sub/hidden pipe.jpg", inbox / "link to a pipe.jpg")
    try:  # like /dev/zero: reading it would never end
        os.mknod(inbox / "zero.jpg", stat.S_IFCHR | 0o600, os.makedev(1, 5))
        device = True
    except OSError:  # not allowed here (not root, or a container without mknod)
        device = False
    sock_path = inbox / "s.jpg"
    server = None
    if len(os.fsencode(sock_path)) < 100:  # AF_UNIX paths are short
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(sock_path))
    try:
        _run_once(home, smoke_model_path, timeout=120)
    finally:
        if server is not None:
            server.close()
    jobs = _assert_terminal(home)
    assert jobs["good.jpg"].state == "done"
    for rel in ("pipe.jpg", "sub/hidden pipe.jpg", "link to a pipe.jpg"):
        assert jobs[rel].state == "failed" and "named pipe" in jobs[rel].error, (rel, jobs[rel].error)
        assert jobs[rel].attempts == 1
    if server is not None:
        assert jobs["s.jpg"].state == "failed" and "socket" in jobs["s.jpg"].error
    if device:
        assert jobs["zero.jpg"].state == "failed" and "device file" in jobs["zero.jpg"].error
    assert _left_in(inbox) == []


def test_references_index_skips_pipes_with_a_reason_and_indexes_the_rest(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    refs = home / "advisors" / "ansel" / "references"
    photo(refs / "good.jpg", seed=1)
    os.mkfifo(refs / "pipe.jpg")
    os.symlink("pipe.jpg", refs / "link to a pipe.jpg")
    photo(refs / "odd.jpg", seed=2)
    os.mkfifo(refs / "odd.json")  # its sidecar
    try:
        out = mondrian(home, smoke_model_path, "references", "index", "--advisor", "ansel", timeout=90)
    except subprocess.TimeoutExpired:
        raise AssertionError("`mondrian references index` hangs on a named pipe") from None
    assert out.returncode == 1, out.stderr  # some were skipped
    assert "skipped: ansel: pipe.jpg: this is a named pipe" in out.stderr, out.stderr
    assert "skipped: ansel: link to a pipe.jpg: this is a named pipe" in out.stderr, out.stderr
    assert "skipped: ansel: odd.jpg:" in out.stderr and "named pipe" in out.stderr
    assert "1 indexed" in out.stderr, out.stderr


# -- 4. a folder named like a sidecar -------------------------------------------------------------------------

def test_a_folder_named_like_a_sidecar_holds_ordinary_photos(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox, failed = home / "inbox", home / "outbox" / "failed"
    photo(inbox / "x.jpg", seed=1)
    photo(inbox / "x.mode" / "a.jpg", seed=2)
    photo(inbox / "X.MODE" / "b.jpg", seed=3)
    (inbox / "y.jpg").write_text("not a photo")  # fails: its folder y.mode/ must not go with it
    photo(inbox / "y.mode" / "c.jpg", seed=4)
    _run_once(home, smoke_model_path)
    jobs = _assert_terminal(home)
    assert {rel: j.state for rel, j in jobs.items()} == {
        "x.jpg": "done", "x.mode/a.jpg": "done", "X.MODE/b.jpg": "done", "y.jpg": "failed", "y.mode/c.jpg": "done"}
    assert jobs["x.jpg"].mode_source == "default"
    assert sorted(os.listdir(failed)) == ["y.jpg", "y.jpg.error.html", "y.jpg.error.json"]
    assert _left_in(inbox) == [] and sorted(os.listdir(inbox)) == ["X.MODE", "x.mode", "y.mode"]


# -- 5. long multibyte names ----------------------------------------------------------------------------------

def test_long_multibyte_names_get_a_record_and_temporary_names_stay_short(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    not_photo = "写" * 78 + ".jpg"  # 238 bytes: fits, but not with `.tmp`/`.error.json` endings added to it
    real = "真" * 80 + ".jpg"
    long_suffix = "a." + "é" * 120  # the suffix alone is 241 bytes
    assert max(len(n.encode()) for n in (not_photo, real, long_suffix)) <= 255
    (inbox / not_photo).write_text("not a photo")
    (inbox / long_suffix).write_text("not a photo either")
    photo(inbox / real, seed=1, fmt="JPEG")
    _run_once(home, smoke_model_path)
    assert _left_in(inbox) == [], "a file was left in the inbox without a record"
    jobs = _assert_terminal(home)
    assert jobs[real].state == "done"
    assert jobs[not_photo].state == "failed" and jobs[long_suffix].state == "failed"
    for path in outbox.rglob("*"):
        assert len(os.fsencode(path.name)) <= 255

    # A temporary file of an atomic write whose writer died, under the new short name, is swept at start-up.
    from daemon.fsutil import temp_name

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = outbox / "failed" / temp_name(not_photo + ".error.json", f"{dead.pid}.0123abcd.tmp")
    assert len(os.fsencode(leftover.name)) < 100
    leftover.write_text("torn")
    _run_once(home, smoke_model_path)
    assert not os.path.lexists(leftover), "a dead writer's temporary file was not swept"


# -- 6. paths longer than the system allows -------------------------------------------------------------------

def _deep_tree(inbox: Path, data: bytes) -> tuple[str, str]:
    """A folder whose path is just short enough, holding a file whose path is too long, and a folder below it
    whose own path is too long (with a photo inside). Built with directory descriptors, as `mkdir -p` in a loop
    with `cd` would. Returns the two relative paths that cannot be reached."""
    limit = os.pathconf(inbox, "PC_PATH_MAX")
    fd = os.open(inbox, os.O_RDONLY)
    rel: list[str] = []
    try:
        while len(os.fsencode(inbox)) + sum(len(p) + 1 for p in rel) + 201 < limit:
            name = "d" * 200
            os.mkdir(name, dir_fd=fd)
            fd, old = os.open(name, os.O_RDONLY, dir_fd=fd), fd
            os.close(old)
            rel.append(name)
        here = len(os.fsencode(inbox)) + sum(len(p) + 1 for p in rel)
        long_name = "f" * (limit - here + 10 - 4) + ".jpg"  # its full path passes the limit by 10 bytes
        w = os.open(long_name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(w, data)
        os.close(w)
        os.mkdir("deeper", dir_fd=fd)
        deeper = os.open("deeper", os.O_RDONLY, dir_fd=fd)
        w = os.open("deep.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=deeper)
        os.write(w, data)
        os.close(w)
        os.close(deeper)
    finally:
        os.close(fd)
    return "/".join(rel + [long_name]), "/".join(rel + ["deeper"])


def test_paths_longer_than_the_system_allows_are_failed_with_a_reason(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox = home / "inbox"
    photo(inbox / "shallow.jpg", seed=1)
    long_file, deep_folder = _deep_tree(inbox, photo(tmp_path / "p.jpg", seed=2).read_bytes())
    log = _run_once(home, smoke_model_path)
    jobs = _assert_terminal(home)
    assert jobs["shallow.jpg"].state == "done"
    for rel in (long_file, deep_folder):
        assert rel in jobs, f"no record for a path of {len(rel)} bytes"
        assert jobs[rel].state == "failed" and "nested so deeply" in jobs[rel].error, jobs[rel].error
        assert "move it nearer the top of the inbox" in jobs[rel].error
    assert log.count("nested so deeply") == 2, log[-3000:]
    info = status(home, smoke_model_path)
    assert info["counts"]["failed"] == 2
    assert sum("nested so deeply" in f["reason"] for f in info["recent_failures"]) == 2
    # A second run records them no second time.
    _run_once(home, smoke_model_path)
    assert status(home, smoke_model_path)["counts"]["failed"] == 2


# -- 7. names the outbox uses itself ----------------------------------------------------------------------------

def test_photos_named_like_the_outboxs_own_folders_do_not_take_them_over(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    names = ["duplicates.jpg", "Failed.jpg", "index.html.jpg", "staging.png"]
    for i, name in enumerate(names):
        photo(inbox / name, seed=10 + i)
    _run_once(home, smoke_model_path)
    # Then a duplicate and a failure, which need outbox/duplicates/ and outbox/failed/ for themselves.
    first = Path(ledger_jobs(home)["duplicates.jpg"].output_dir)
    shutil.copyfile(first / "duplicates.jpg", inbox / "again.jpg")
    (inbox / "junk.jpg").write_text("not a photo")
    _run_once(home, smoke_model_path)
    jobs = _assert_terminal(home)
    assert jobs["again.jpg"].duplicate_of == jobs["duplicates.jpg"].id
    assert jobs["junk.jpg"].state == "failed"
    for name in names:
        folder = Path(jobs[name].output_dir)
        assert folder.parent == outbox and folder.name.lower() not in {"duplicates", "failed", "index.html",
                                                                       ".staging"}, folder
    assert (outbox / "index.html").is_file()
    assert sorted(os.listdir(outbox / "duplicates")) == ["again.jpg", "again.jpg.duplicate.json"]
    assert sorted(os.listdir(outbox / "failed")) == ["junk.jpg", "junk.jpg.error.html", "junk.jpg.error.json"]
    assert _left_in(inbox) == []


# -- 8. absurd aspect ratios ----------------------------------------------------------------------------------

def test_extreme_aspect_ratios_are_never_transient_failures(tmp_path, smoke_model_path):
    """The model's processor refuses images past 200:1, which no retry cures. Photos are analysed at a size within
    that limit (the hostile corpus holds that a 20000 x 6 panorama is analysed), so a 60000 x 1 line is analysed
    once, at once, instead of failing as transient four times."""
    home = make_home(tmp_path / "home", smoke_model_path, max_pixels=448 * 448, retry_base_seconds=0.2)
    inbox = home / "inbox"
    Image.new("RGB", (60000, 1), (10, 200, 30)).save(inbox / "wide.png")
    Image.new("RGB", (1, 60000), (200, 10, 30)).save(inbox / "tall.png")
    Image.new("RGB", (11000, 55), (30, 10, 200)).save(inbox / "panorama.png")  # 200:1, rounded past it before
    log = _run_once(home, smoke_model_path)
    jobs = _assert_terminal(home)
    for rel in ("wide.png", "tall.png", "panorama.png"):
        assert jobs[rel].state == "done" and jobs[rel].attempts == 1, (rel, jobs[rel].error)
        report = json.loads((Path(jobs[rel].output_dir) / "report.json").read_text())
        w, h = report["photo"]["analysed_width"], report["photo"]["analysed_height"]
        assert max(w, h) <= 200 * min(w, h) and w * h <= 448 * 448, (rel, w, h)
    assert "will retry" not in log
    assert _left_in(inbox) == []


def test_a_photo_the_models_preprocessing_refuses_is_a_permanent_failure(tmp_path, smoke_model_path):
    """The safety net behind fit_size: whatever the processor refuses (here 10000 x 28, past its 200:1 limit) is
    the photo's own problem, so the worker fails it at once (`Permanent`) instead of retrying it as transient."""
    from daemon.errors import is_permanent
    from daemon.model.runtime import ModelRuntime

    runtime = ModelRuntime.load(str(smoke_model_path), var_dir=tmp_path / "var", max_pixels=448 * 448)
    try:
        runtime.encode(Image.new("RGB", (10000, 28), (10, 200, 30)))
    except Exception as exc:  # noqa: BLE001 - what matters is how the worker will classify it
        assert is_permanent(exc), f"{type(exc).__name__}: {exc}"
        assert "aspect ratio" in str(exc)
    else:
        raise AssertionError("the processor accepted a 10000 x 28 image; this test no longer tests anything")


# -- what a hostile tester found in the inbox (2026-12-02) ------------------------------------------------------

QUICK = dict(max_pixels=56 * 56, comment_max_chars=8, max_tokens=400, quiet_seconds=1.0, rescan_seconds=1,
             retry_base_seconds=0.2)


def test_a_copy_that_pauses_longer_than_the_quiet_time_is_analysed_from_its_final_bytes(tmp_path, smoke_model_path):
    """A card reader or a network share stalls mid-file: the half that arrived looks truncated. It must wait for the
    rest (TRUNCATED_GRACE quiet times), not fail and be moved into failed/ while the copy still writes to it."""
    home = make_home(tmp_path / "home", smoke_model_path, **QUICK)
    data = photo(tmp_path / "src.jpg", seed=41, size=(160, 120)).read_bytes()
    with Daemon(home, smoke_model_path) as d:
        wait_for(lambda: "model ready" in d.output(), 60, what="model ready")
        with open(home / "inbox" / "card.jpg", "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            wait_for(lambda: "ends early, looking again" in d.output(), 30, what="the half copy looked at")
            time.sleep(1.5)
            fh.write(data[len(data) // 2:])
        wait_for(lambda: reports(home / "outbox"), 90, what="the report of the whole photo")
        assert d.stop() == 0
    (job,) = ledger_jobs(home).values()
    assert job.state == "done" and job.sha256 == hashlib.sha256(data).hexdigest()
    assert not any((home / "outbox" / "failed").iterdir())


def test_a_photo_that_stays_truncated_still_fails_after_the_grace(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **{**QUICK, "quiet_seconds": 0.2})
    data = photo(tmp_path / "src.jpg", seed=42, size=(160, 120)).read_bytes()
    (home / "inbox" / "cut.jpg").write_bytes(data[: len(data) // 2])
    log = _run_once(home, smoke_model_path)
    (job,) = ledger_jobs(home).values()
    assert job.state == "failed" and "truncated" in job.error and job.attempts == 1, (job.state, job.error)
    assert log.count("ends early, looking again") >= 2, log[-3000:]


def test_a_queued_photo_replaced_by_a_folder_of_its_name_is_gone_and_the_album_stays(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **QUICK)
    inbox = home / "inbox"
    with Daemon(home, smoke_model_path, MONDRIAN_TEST_TOKEN_SECONDS="0.1") as d:  # the first photo takes a while
        photo(inbox / "first.jpg", seed=43, size=(64, 48))
        wait_for(lambda: "analysing first.jpg" in d.output(), 60, what="the worker busy with its first photo")
        photo(inbox / "Trip.jpg", seed=44, size=(64, 48))
        wait_for(lambda: "Trip.jpg" in ledger_jobs(home), 30, what="Trip.jpg queued")
        assert ledger_jobs(home)["Trip.jpg"].state == "queued", "the worker took it too soon for this test"
        (inbox / "Trip.jpg").unlink()
        photo(tmp_path / "album" / "day1.jpg", seed=45, size=(64, 48))
        os.rename(tmp_path / "album", inbox / "Trip.jpg")  # an album copied in under the photo's old name
        wait_for(lambda: getattr(ledger_jobs(home).get("Trip.jpg/day1.jpg"), "state", None) == "done", 180,
                 what="the album's photo analysed")
        assert d.stop() == 0
    jobs = ledger_jobs(home)
    assert jobs["Trip.jpg"].state == "gone" and "replaced by a folder" in jobs["Trip.jpg"].error
    assert not (home / "outbox" / "failed" / "Trip.jpg").exists()


def test_a_photo_whose_report_folder_was_deleted_is_critiqued_again(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **QUICK)
    data = photo(tmp_path / "src.jpg", seed=46, size=(64, 48)).read_bytes()
    (home / "inbox" / "keep.jpg").write_bytes(data)
    _run_once(home, smoke_model_path)
    (first,) = reports(home / "outbox")
    shutil.rmtree(first.parent)
    (home / "inbox" / "keep.jpg").write_bytes(data)
    _run_once(home, smoke_model_path)
    assert len(reports(home / "outbox")) == 1, "the photo dropped again has no report"
    assert not (home / "outbox" / "duplicates").exists() or not any((home / "outbox" / "duplicates").iterdir())
    index = (home / "outbox" / "index.html").read_text()
    assert reports(home / "outbox")[0].parent.name in index


def test_a_file_in_place_of_the_duplicates_folder_is_a_reason_not_a_traceback(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **{**QUICK, "max_attempts": 2})
    data = photo(tmp_path / "src.jpg", seed=47, size=(64, 48)).read_bytes()
    (home / "inbox" / "one.jpg").write_bytes(data)
    _run_once(home, smoke_model_path)
    (home / "outbox" / "duplicates").write_text("not a folder")
    (home / "inbox" / "again.jpg").write_bytes(data)
    log = _run_once(home, smoke_model_path)
    job = ledger_jobs(home)["again.jpg"]
    assert job.state == "failed" and "is a file, not a folder" in job.error, job.error
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]
    assert (home / "outbox" / "failed" / "again.jpg").is_file()  # one visible place, beside its reason
