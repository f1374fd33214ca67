"""Settings, the ledger file and `mondrian status` under hostile use: real daemon and CLI processes on real homes.

- Every setting of mondrian.toml (and its environment overrides) is checked at start: NaN, infinities, values out of
  range, wrong types, unknown keys (with a suggestion) and an unknown default advisor exit 78 with one line.
- A ledger that is garbage, truncated or a folder: one line that says how to set it aside; following it works.
- A `mondrian analyze` killed while a daemon runs is noticed: `status` says interrupted, and the daemon (also a
  `run --once` that was waiting for it) records it, never moving the photo.
- `status` names only failure records that exist; a failure whose photo was fixed and put back no longer counts;
  a stopped daemon is "not responding"; a mistyped MONDRIAN_HOME creates nothing.
- Advisor folders are matched whatever their case (`inbox/Cartier/`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import (REPO, Daemon, env_for, ledger_jobs, make_home, mondrian, named, photo, reports, status,
                           wait_for)
from tests.test_faults import read_only
from tests.test_recovery import _wait_stopped

FAST = dict(max_pixels=56 * 56, comment_max_chars=8, max_tokens=400, quiet_seconds=0.2, rescan_seconds=1,
            retry_base_seconds=0.2)


def _one_line(out: subprocess.CompletedProcess) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


# -- every setting is checked at start (attack 26) ---------------------------------------------------------------

BAD_SETTINGS = {  # a line of mondrian.toml (or NAME=value in the environment): what the one line must say
    "quiet_seconds = nan": "quiet_seconds (seconds) must be at least 0",
    "quiet_seconds = inf": "quiet_seconds (seconds) must be at least 0",
    "quiet_seconds = -1": "quiet_seconds (seconds) must be at least 0",
    "rescan_seconds = nan": "rescan_seconds (seconds) must be more than 0",
    "rescan_seconds = 0": "rescan_seconds (seconds) must be more than 0",
    "job_timeout_seconds = 0": "job_timeout_seconds (seconds) must be more than 0",
    "job_timeout_seconds = nan": "job_timeout_seconds (seconds) must be more than 0",
    "retry_base_seconds = -1": "retry_base_seconds (seconds) must be at least 0",
    "max_tokens = 0": "max_tokens must be at least 1",
    "max_tokens = inf": "max_tokens must be a whole number",
    "comment_max_chars = -1": "comment_max_chars must be at least 1",
    "max_attempts = -3": "max_attempts must be at least 1",
    "rag_k = -1": "rag_k must be at least 1",
    "rag_reference_weight = 1.5": "rag_reference_weight must be at least 0 and at most 1",
    "max_pixels = 1e12": "max_pixels must be at least 784 and at most",
    "max_pixels = 5.5": "max_pixels must be a whole number",
    'expose_paths = "nope"': "expose_paths must be true or false",
    'train_time = "25:99"': "is not a time of day",
    'default_mode = "fast"': "the mode is unknown",
    'default_advisor = "nobody"': "unknown advisor 'nobody'",
    'default_advisor = "../../etc"': "is not an advisor id",
    'default_advisor = ""': "default_advisor is empty; name an advisor id",
    "MONDRIAN_MODEL= ": "model is empty; name a Hugging Face model id",
    'default_mod = "rag"': "unknown setting `default_mod`",
    "quiet_secnds = 5": "did you mean `quiet_seconds`?",
    'analysis_mode = "rag"': "did you mean `default_mode`?",  # the original design's name (ANALYSIS_MODE)
    "lora = 5": "`lora` is a section",
    # Hand edits that are not TOML: the line quoted, with what to do in plain words.
    "quiet_seconds = 1\nquiet_seconds = 2": "`quiet_seconds = 2` is not valid TOML: a setting is given twice",
    "api_port = off": "`api_port = off` is not valid TOML: a value is a number, true or false, or text in double",
    "MONDRIAN_QUIET_SECONDS=nan": "MONDRIAN_QUIET_SECONDS='nan' (environment): quiet_seconds (seconds) must be",
    "MONDRIAN_JOB_TIMEOUT=-5": "MONDRIAN_JOB_TIMEOUT='-5' (environment): job_timeout_seconds (seconds) must be",
    "MONDRIAN_ADVISOR=nobody": "unknown advisor 'nobody'",
    # [lora] is read by training, but a bad value stops the daemon at start, not the first training at night.
    "[lora]\nrnak = 8": "unknown setting `rnak` in the [lora] section",
    "[lora]\nrank = -1": "[lora] rank = -1",
    "[lora]\nlearning_rate = -1": "[lora] learning_rate = -1.0",
    "[lora]\nvariants = -3": "[lora] variants = -3",
    'var_dir = "~"': "needs a folder of its own",  # its leftovers swept out of the user's own folders
    'var_dir = ".."': "is a folder above the home; Mondrian keeps its ledger",
    "[lora]\nrank = 8.9": "[lora] rank = 8.9 in",  # not trained at rank 8: as strict as the top-level settings
    "[lora]\nrank = true": "rank must be a whole number",
    '[lora]\naugment = "flase"': "augment must be true or false",
    "[lora]\nalpha = inf": "it must be a finite number, at least 0.001",  # not "at least 0.001" alone: inf is
}


@pytest.mark.parametrize("setting", list(BAD_SETTINGS))
def test_a_bad_setting_exits_78_with_one_line_and_touches_nothing(tmp_path, smoke_model_path, setting):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    env: dict[str, str] = {}
    if " = " in setting:
        key = setting.split(" = ")[0]
        kept = [line for line in (home / "mondrian.toml").read_text().splitlines() if not line.startswith(key + " ")]
        (home / "mondrian.toml").write_text("\n".join(kept + [setting]) + "\n")
    else:
        name, value = setting.split("=", 1)
        env[name] = value
    waiting = photo(home / "inbox" / "waiting.jpg", seed=7, size=(64, 48))
    try:
        out = mondrian(home, smoke_model_path, "run", "--once", timeout=60, **env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{setting}: `run --once` did not exit within 60 s (the setting was taken as it is)")
    assert out.returncode == 78, f"{setting}: rc {out.returncode}\n{out.stderr[-2000:]}"
    line = _one_line(out)
    assert BAD_SETTINGS[setting] in line, line
    assert waiting.exists() and not (home / "outbox" / "failed" / "waiting.jpg").exists()
    print(f"\n{setting}: exit 78, {line.split('configuration problem: ', 1)[-1][:140]}")


def test_valid_settings_and_sections_still_load(tmp_path, smoke_model_path):
    from daemon.config import load_config

    home = tmp_path / "home"
    home.mkdir()
    (home / "mondrian.toml").write_text('quiet_seconds = 0\nexpose_paths = "no"\ndefault_mode = "RAG "\n'
                                        'train_time = "2:30"\nmax_pixels = 1e4\n[lora]\nrank = 4\nnightly = false\n')
    cfg = load_config(home, env={"MONDRIAN_QUIET_SECONDS": "0.5", "EMBEDDINGS_ENABLED": "off"})
    assert (cfg.quiet_seconds, cfg.expose_paths, cfg.default_mode, cfg.max_pixels, cfg.embeddings_enabled) == \
        (0.5, False, "rag", 10000, False)
    assert cfg.extra["lora"] == {"rank": 4, "nightly": False}


# -- a damaged ledger: one line, and its advice works (attack 17) --------------------------------------------------

def _damage(db: Path, kind: str) -> None:
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    if kind == "garbage":
        db.write_bytes(os.urandom(20000))
    elif kind == "truncated":
        with open(db, "r+b") as f:
            f.truncate(3000)
    else:
        db.unlink()
        db.mkdir()


@pytest.mark.parametrize("kind", ["garbage", "truncated", "folder"])
def test_a_damaged_ledger_is_one_line_and_its_advice_works(tmp_path, smoke_model_path, kind):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    photo(home / "inbox" / "first.jpg", seed=1, size=(64, 48))
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0
    (first_report,) = reports(home / "outbox")
    db = home / "var" / "ledger.db"
    _damage(db, kind)
    earlier = home / "var" / "ledger.db.broken"  # set aside after an earlier incident, as this advice says
    earlier.write_bytes(b"the ledger of an earlier incident")
    photo(home / "inbox" / "second.jpg", seed=2, size=(64, 48))

    lines = {}
    for cmd in (["status"], ["retry", "--failed"], ["run", "--once"]):
        out = mondrian(home, smoke_model_path, *cmd, timeout=60)
        assert out.returncode == 78, f"{cmd}: rc {out.returncode}\n{out.stderr[-2000:]}"
        lines[cmd[0]] = _one_line(out)
    line = lines["run"]
    assert ("is a folder" if kind == "folder" else "is not a SQLite database, or is damaged") in line, line
    assert "writable" not in line, line

    # Follow the advice literally: the commands it gives, then start again.
    commands = re.search(r"\((mv .*?)\) ", line).group(1)
    subprocess.run(commands, shell=True, check=True)
    assert not os.path.lexists(db)
    assert earlier.read_bytes() == b"the ledger of an earlier incident"  # not replaced by this one
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert ledger_jobs(home)["second.jpg"].state == "done"
    assert first_report.exists() and len(reports(home / "outbox")) == 2
    # What the message says of the reports already there holds: the index still lists them.
    assert "outbox/index.html still lists them" in line, line
    index = (home / "outbox" / "index.html").read_text()
    assert f'href="{first_report.parent.name}/report.html"' in index, index[-2000:]
    print(f"\n{kind}: {line.split(': ', 1)[1][:160]}… then `{commands}` and a fresh start")


# -- a `mondrian analyze` killed while a daemon runs (attack 24) -----------------------------------------------------

def _analyze_held(home: Path, model: Path, target: Path) -> subprocess.Popen:
    """`mondrian analyze` holding itself mid-analysis (SIGSTOP at the test point), its job running in the ledger."""
    an = subprocess.Popen([sys.executable, "-m", "daemon", "analyze", str(target)],
                          env=env_for(home, model, MONDRIAN_TEST_STOP_AT="analysing"), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_stopped(an.pid, "mondrian analyze", an)
    return an


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.communicate()


def _state(home: Path, name: str) -> str | None:
    job = ledger_jobs(home).get(name)
    return job.state if job is not None else None


def _gave_up(home: Path, name: str) -> bool:
    job = ledger_jobs(home).get(name)
    return job is not None and job.state == "failed" and f"`{named(home, 'analyze')}` was stopped" in (job.error or "")


def test_a_killed_analyze_is_interrupted_in_status_and_recorded_by_the_running_daemon(tmp_path, smoke_model_path,
                                                                                     ledger_url):
    # On a shared ledger too: an analyze job holds no lease, and one killed on this Mac stayed "in progress" for
    # ever there, with `run --once` waiting for it.
    home = make_home(tmp_path / "home", smoke_model_path, **{**FAST, "rescan_seconds": 2},
                     **({"ledger_url": ledger_url} if ledger_url else {}))
    outside = tmp_path / "elsewhere"
    one, two, three = (photo(outside / f"{n}.jpg", seed=i, size=(64, 48)) for i, n in enumerate(["one", "two", "three"]))
    before = {p: p.read_bytes() for p in (one, two, three)}

    # Killed with no daemon: status says interrupted, not in progress.
    _kill(_analyze_held(home, smoke_model_path, one))
    text = mondrian(home, smoke_model_path, "status").stdout
    assert "0 in progress · 1 interrupted" in text and "Interrupted: one.jpg" in text and "Now:" not in text, text
    info = status(home, smoke_model_path)
    assert [r["file"] for r in info["interrupted"]] == ["one.jpg"] and info["running"] == [], info

    # A `run --once` waiting for a live analyze: when that analyze is killed, the run records it and exits.
    an = _analyze_held(home, smoke_model_path, two)
    try:
        with Daemon(home, smoke_model_path, "--once") as d:
            wait_for(lambda: "model ready" in d.output(), 120, what="the daemon past its start-up recovery")
            assert ledger_jobs(home)["two.jpg"].state == "running"
            _kill(an)
            try:
                rc = d.wait(60)
            except subprocess.TimeoutExpired:
                pytest.fail(f"`run --once` never exited after the analyze it waited for was killed:\n{d.output()[-2000:]}")
            assert rc == 0, d.output()
    finally:
        if an.poll() is None:
            _kill(an)
    assert _gave_up(home, "one.jpg") and _gave_up(home, "two.jpg")

    # A daemon that keeps running notices it at its next rescan.
    with Daemon(home, smoke_model_path) as d:
        wait_for(lambda: "model ready" in d.output(), 120, what="the daemon to start")
        an = _analyze_held(home, smoke_model_path, three)
        _kill(an)
        wait_for(lambda: _gave_up(home, "three.jpg"), 30, what="the running daemon to record the killed analyze")
        assert status(home, smoke_model_path)["interrupted"] == []
        assert d.stop() == 0, d.output()
    assert {p: p.read_bytes() for p in (one, two, three)} == before  # never moved, never changed
    assert not any(p.suffix == ".jpg" for p in (home / "outbox" / "failed").iterdir())


# -- status names only records that exist (attack 16) ----------------------------------------------------------------

def test_status_names_a_failure_record_only_if_it_was_written(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    with Daemon(home, smoke_model_path) as d:
        wait_for(lambda: "model ready" in d.output(), 120, what="the daemon to start")
        with read_only(home / "outbox" / "failed"):
            (home / "inbox" / "notaphoto.jpg").write_text("not a photo at all")
            wait_for(lambda: _state(home, "notaphoto.jpg") == "failed", 60, what="the non-photo to fail")
            info = status(home, smoke_model_path)
            text = mondrian(home, smoke_model_path, "status").stdout
        # Written, then cleared away by the photographer: status says so, not that it could not be written.
        (home / "inbox" / "readthen.jpg").write_text("not a photo either")
        wait_for(lambda: _state(home, "readthen.jpg") == "failed", 60, what="the second non-photo to fail")
        # its page is written at the index's next refresh, a moment after the failure is recorded
        wait_for(lambda: (home / "outbox" / "failed" / "readthen.jpg.error.html").exists(), 30, what="its page")
        for name in ("readthen.jpg", "readthen.jpg.error.json", "readthen.jpg.error.html"):
            (home / "outbox" / "failed" / name).unlink()
        cleared = status(home, smoke_model_path)["recent_failures"][0]
        d.stop()
    (failure,) = info["recent_failures"]
    assert failure["record"] is None, failure
    assert "no failure record in" in failure["note"] and "it could not be written: the folder cannot be written" \
        in failure["note"] and "retry --failed" in failure["note"], failure
    assert "notaphoto.jpg.error.json" not in text and "no failure record in" in text, text
    assert (home / "inbox" / "notaphoto.jpg").exists()
    assert cleared["file"] == "readthen.jpg" and cleared["record"] is None, cleared
    assert cleared["note"].startswith("its failure record was moved or deleted from"), cleared


def test_a_file_where_the_failed_folder_was_is_named_as_such_and_the_advice_works(tmp_path, smoke_model_path):
    """`outbox/failed` replaced by a file while the daemon ran: status blamed permissions ("the folder cannot be
    written") and `retry --failed` failed the same way."""
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    failed = home / "outbox" / "failed"
    with Daemon(home, smoke_model_path) as d:
        wait_for(lambda: "model ready" in d.output(), 120, what="the daemon to start")
        if failed.is_dir():
            failed.rmdir()
        failed.write_text("a note someone saved as outbox/failed")
        (home / "inbox" / "z2.jpg").write_text("not a photo")
        wait_for(lambda: _state(home, "z2.jpg") == "failed", 60, what="the non-photo to fail")
        (note,) = [f["note"] for f in status(home, smoke_model_path)["recent_failures"]]
        assert "failed is a file, not a folder" in note and "cannot be written" not in note, note
        failed.unlink()  # as the note says
        # Still not a photo: `--all`, as plain `retry --failed` advises for a failure nothing has changed since.
        assert mondrian(home, smoke_model_path, "retry", "--failed", "--all").returncode == 0
        wait_for(lambda: (failed / "z2.jpg.error.json").exists(), 60, what="the failure recorded in failed/")
        assert d.stop() == 0, d.output()


# -- a failure fixed and put back no longer counts (attack 02) -------------------------------------------------------

def test_a_failure_whose_photo_was_fixed_and_put_back_no_longer_counts(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    photo(home / "inbox" / "p.jpg", seed=1, size=(64, 48))
    (home / "inbox" / "p.mode").write_text("bogus\n")
    photo(home / "inbox" / "q.jpg", seed=2, size=(64, 48))
    (home / "inbox" / "q.MODE").write_text("bogus\n")
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0
    assert status(home, smoke_model_path)["counts"]["failed"] == 2

    failed = home / "outbox" / "failed"
    os.replace(failed / "p.jpg", home / "inbox" / "p.jpg")  # as the record says: fixed (no sidecar) and put back
    (failed / "p.mode").unlink()
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0
    info = status(home, smoke_model_path)
    assert info["counts"]["failed"] == 1 and info["resolved_failures"] == 1 and info["counts"]["done"] == 1, info
    assert [f["file"] for f in info["recent_failures"]] == ["q.jpg"], info["recent_failures"]
    text = mondrian(home, smoke_model_path, "status").stdout
    assert "1 failed (1 earlier failure(s) since put back and analysed)" in text and "  p.jpg:" not in text, text


def test_retry_leaves_a_failure_whose_photo_was_put_back_and_queued_again(tmp_path, smoke_model_path):
    from daemon.ledger import Ledger

    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    back = photo(home / "inbox" / "p.jpg", seed=1, size=(64, 48))
    st = back.stat()
    ledger = Ledger(home / "var" / "ledger.db")
    try:
        old = ledger.enqueue(back, "p.jpg", "ansel", "default", st.st_size, st.st_mtime - 60)
        ledger.claim()
        ledger.fail(old.id, "the sidecar p.mode asks for mode 'bogus'", None)
        new = ledger.enqueue(back, "p.jpg", "ansel", "default", st.st_size, st.st_mtime)  # put back, fixed
        assert new is not None
    finally:
        ledger.close()
    out = mondrian(home, smoke_model_path, "retry", "--failed", timeout=60)
    assert out.returncode == 0 and "0 photo(s) queued again" in out.stderr, out.stderr
    jobs = sorted(ledger_jobs_all(home), key=lambda j: j.id)
    assert [(j.id, j.state) for j in jobs] == [(old.id, "failed"), (new.id, "queued")], [(j.id, j.state) for j in jobs]


def ledger_jobs_all(home: Path) -> list:
    from daemon.ledger import Ledger

    ledger = Ledger(home / "var" / "ledger.db")
    try:
        return ledger.jobs()
    finally:
        ledger.close()


# -- advisor folders whatever their case (attack 43) ----------------------------------------------------------------

def test_advisor_folders_are_matched_whatever_their_case(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    photo(home / "inbox" / "Cartier" / "c.jpg", seed=1, size=(64, 48))
    photo(home / "inbox" / "LEIBOVITZ" / "l.jpg", seed=2, size=(64, 48))
    photo(home / "inbox" / "аnsel" / "cyrillic.jpg", seed=3, size=(64, 48))  # a Cyrillic "а": not an advisor
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0
    jobs = ledger_jobs(home)
    got = {name: (job.advisor, job.advisor_source, job.state) for name, job in jobs.items()}
    assert got == {"Cartier/c.jpg": ("cartier", "folder", "done"), "LEIBOVITZ/l.jpg": ("leibovitz", "folder", "done"),
                   "аnsel/cyrillic.jpg": ("ansel", "default", "done")}, got
    for job in jobs.values():
        assert json.loads(Path(job.report_json).read_text())["advisor"]["id"] == job.advisor


# -- a stopped daemon is not responding (attack 34) ------------------------------------------------------------------

def test_a_stopped_daemon_is_shown_as_not_responding(tmp_path, smoke_model_path):
    from daemon.cli.status import STALE_AFTER_SECONDS

    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    for i, name in enumerate(("a.jpg", "b.jpg", "c.jpg")):  # one done (a pace to go by), one stopped, one waiting
        photo(home / "inbox" / name, seed=1 + i, size=(64, 48))
    with Daemon(home, smoke_model_path, MONDRIAN_TEST_STOP_AT="analysing:2") as d:
        _wait_stopped(d.proc.pid, "the daemon", d.proc, d.output())
        stopped_at = time.monotonic()
        info = status(home, smoke_model_path)
        assert info["daemon"]["responding"], info["daemon"]  # just stopped: not stale yet
        time.sleep(max(0.0, STALE_AFTER_SECONDS + 3 - (time.monotonic() - stopped_at)))
        info = status(home, smoke_model_path)
        text = mondrian(home, smoke_model_path, "status").stdout
        d.signal(signal.SIGCONT)
        wait_for(lambda: status(home, smoke_model_path)["daemon"]["responding"], 30, what="a fresh heartbeat")
        assert d.stop() == 0, d.output()
    assert info["daemon"]["running"] and not info["daemon"]["responding"], info["daemon"]
    assert info["daemon"]["last_heartbeat_s"] > STALE_AFTER_SECONDS
    assert "Daemon:  not responding (pid" in text and f"kill -CONT {d.proc.pid}" in text, text
    # run by hand, not as a service: `service restart` would start nothing
    assert "service restart" not in text and f"`kill {d.proc.pid}`, then start it again with" in text, text
    # Nothing moves while it is stopped: no time left is promised (it said "about 1 s left for 2 photo(s)").
    assert "Queue:   about" not in text and "Queue:   2 photo(s) wait for the daemon, which is not responding" \
        in text, text


# -- status does not create a home (attack 27) -----------------------------------------------------------------------

def test_status_with_a_mistyped_home_creates_nothing(tmp_path, smoke_model_path):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "empty").mkdir()
    for typo in (tmp_path / "missing" / "deep", tmp_path / "a-file", tmp_path / "empty"):
        for cmd in (["status"], ["status", "--json"], ["retry", "--failed"], ["references", "list"],
                    ["references", "index"], ["adapters"], ["adapters", "rollback", "--advisor", "ansel"],
                    ["train", "--advisor", "ansel"], ["workers"]):
            out = mondrian(typo, smoke_model_path, *cmd, timeout=60)
            assert out.returncode == 78, f"{typo} {cmd}: rc {out.returncode}\n{out.stderr}"
            line = _one_line(out)
            assert f"no Mondrian home at {typo}" in line and "MONDRIAN_HOME" in line, line
            if typo.name == "a-file":  # following the advice must work: `init` cannot make a folder of a file
                assert "it is a file, not a folder" in line and f"init {typo}" not in line, line
    for cmd in (["run", "--once"], ["demo"]):  # commands that create a home say the same of a file in its place
        out = mondrian(tmp_path / "a-file", smoke_model_path, *cmd, timeout=60)
        assert out.returncode == 78 and "it is a file, not a folder" in _one_line(out), (cmd, out.stderr)
    assert not (tmp_path / "missing").exists() and list((tmp_path / "empty").iterdir()) == []
    assert (tmp_path / "a-file").read_text() == "x"
    print(f"\n{line.split('configuration problem: ', 1)[-1]}")


def test_home_may_follow_the_command(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    out = subprocess.run([sys.executable, "-m", "daemon", "status", "--json", "--home", str(home)],
                         env={k: v for k, v in env_for(home, smoke_model_path).items() if k != "MONDRIAN_HOME"},
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout)["home"] == str(home), out.stderr[-2000:]


def test_a_typo_in_the_lora_section_is_refused_with_a_suggestion(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    with open(home / "mondrian.toml", "a") as f:
        f.write("[lora]\nrnak = 4\n")
    out = mondrian(home, smoke_model_path, "train", "--advisor", "ansel", timeout=120)
    assert out.returncode == 78 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "unknown setting `rnak` in the [lora] section" in out.stderr and "did you mean `rank`?" in out.stderr
    # A top-level setting written below `[lora]` belongs to it: the message says where the line goes.
    (home / "mondrian.toml").write_text((home / "mondrian.toml").read_text().replace("rnak = 4", 'default_mode = "rag"'))
    out = mondrian(home, smoke_model_path, "train", "--advisor", "ansel", timeout=120)
    assert out.returncode == 78 and "move its line above the [lora] line" in out.stderr, out.stderr[-2000:]


# -- what a hostile tester found in the CLI (2026-12-02) ------------------------------------------------------------

def test_a_ledger_from_a_newer_mondrian_and_a_missing_postgres_driver_are_one_line(tmp_path, smoke_model_path):
    import sqlite3

    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    assert mondrian(home, smoke_model_path, "status").returncode == 0  # the ledger exists
    with sqlite3.connect(home / "var" / "ledger.db") as db:
        db.execute("UPDATE schema_version SET version = 99")
    for args in (("status",), ("run", "--once"), ("retry", "--failed")):
        out = mondrian(home, smoke_model_path, *args)
        assert out.returncode == 78, (args, out.stderr[-2000:])
        assert "written by a newer Mondrian (schema 99" in _one_line(out) and "git pull" in out.stderr
    with sqlite3.connect(home / "var" / "ledger.db") as db:  # left as it was: nothing migrated it down
        assert db.execute("SELECT MAX(version) FROM schema_version").fetchone() == (99,)

    # ledger_url on an install without the [postgres] extra: the driver's absence, as Python sees it.
    other = make_home(tmp_path / "pg", smoke_model_path, **FAST)
    with open(other / "mondrian.toml", "a") as f:
        f.write('ledger_url = "postgresql://studio:secret@nas.local/mondrian"\n')
    missing = tmp_path / "no-driver"
    for name in ("psycopg", "psycopg2"):
        (missing / name).mkdir(parents=True)
        (missing / name / "__init__.py").write_text("raise ImportError('not installed')\n")
    for args in (("status",), ("run", "--once")):
        out = mondrian(other, smoke_model_path, *args, PYTHONPATH=str(missing))
        assert out.returncode == 78 and "driver is not installed" in _one_line(out), (args, out.stderr[-2000:])
        assert "mondrian[postgres]" in out.stderr and "secret" not in out.stderr


def test_status_speaks_plain_ascii_and_says_what_a_dead_training_run_did(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    # A terminal or log that cannot encode Mondrian's dashes (LANG=C under cron or ssh): no traceback.
    out = mondrian(home, smoke_model_path, "status", PYTHONIOENCODING="ascii")
    assert out.returncode == 0 and "Traceback" not in out.stderr and "Daemon:" in out.stdout, out.stderr[-2000:]

    # A training run that ends without recording its end (its process SIGKILLed after its first progress event):
    # status must not say "running" until the next training. (A run refused for a bad setting records nothing.)
    dies = ("import os, signal, sys\nfrom daemon.ledger import Ledger\nfrom jobs.nightly import ProgressRecorder\n"
            "r = ProgressRecorder(Ledger(sys.argv[1]), 'ansel')\n"
            "r({'event': 'progress', 'phase': 'training', 'step': 3, 'steps': 10})\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    out = subprocess.run([sys.executable, "-c", dies, str(home / "var" / "ledger.db")], cwd=REPO,
                         env=env_for(home, smoke_model_path), capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    info = status(home, smoke_model_path)
    assert info["training"]["state"] == "stopped", info["training"]  # recorded as starting, then the process died
    text = mondrian(home, smoke_model_path, "status").stdout
    assert "Training: ansel stopped" in text and named(home, "train --advisor ansel") in text, text


def test_status_promises_no_time_without_a_daemon_and_retry_names_unknown_jobs(tmp_path, smoke_model_path):
    from daemon.ledger import Ledger

    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    photo(home / "inbox" / "first.jpg", seed=1, size=(64, 48))
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=300).returncode == 0  # a typical photo time
    ledger = Ledger(home / "var" / "ledger.db")
    try:  # two photos queued by a daemon that has stopped since
        for name in ("a.jpg", "b.jpg"):
            p = photo(home / "inbox" / name, seed=2, size=(64, 48))
            st = p.stat()
            ledger.enqueue(p, name, "ansel", "default", st.st_size, st.st_mtime)
    finally:
        ledger.close()
    text = mondrian(home, smoke_model_path, "status").stdout
    assert "2 photo(s) wait for the daemon" in text and " left for " not in text, text

    out = mondrian(home, smoke_model_path, "retry", "--failed", "9999", "-5")
    assert out.returncode == 2, out.stderr  # EX_USAGE: nothing was what it named
    assert "job 9999: there is no such job" in out.stderr and "job -5: there is no such job" in out.stderr
    done = next(j for j in ledger_jobs(home).values() if j.state == "done")
    out = mondrian(home, smoke_model_path, "retry", "--failed", str(done.id))
    assert out.returncode == 2 and "has not failed (it is done)" in out.stderr, out.stderr


def test_status_advises_on_the_sidecar_when_the_sidecar_is_what_failed(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    photo(home / "inbox" / "m.jpg", seed=3, size=(64, 48))
    (home / "inbox" / "m.mode").write_text("fast\n")
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=300).returncode == 0
    text = mondrian(home, smoke_model_path, "status").stdout
    step = next(line for line in text.splitlines() if line.strip().startswith("next:"))
    assert "sidecar" in step and "re-export" not in step, text


def test_the_queue_eta_of_photos_analysed_in_batches_is_their_throughput(tmp_path, smoke_model_path):
    """With `batch_size = 8` eight photos share each 16 s pass: the queue goes at a photo every 2 s, not every 16 s
    (status once said "about 8 h" for a queue that took 65 min), and a photo in progress is timed by its batch."""
    from daemon.fsutil import hold_lock
    from daemon.ledger import Ledger

    home = make_home(tmp_path / "home", smoke_model_path, **FAST, batch_size=8)
    ledger = Ledger(home / "var" / "ledger.db")
    daemon_lock = None
    try:
        jobs = [ledger.enqueue(home / "inbox" / f"P{i:04d}.jpg", f"P{i:04d}.jpg", "ansel", "default", 1, 1.0)
                for i in range(24 + 8 + 100)]
        now = time.time()
        # Three batches done, back to back, as the worker runs them: 8 claims in a row, one pass, 8 reports in a
        # row. The latest 20 photos are two whole batches and half of the oldest one.
        for i, job in enumerate(jobs[:24]):
            batch, k = divmod(i, 8)
            start = now - 100 + batch * 17 + k * 0.01
            assert ledger.claim(now=start).id == job.id
            ledger.Job.update(state="done", started_at=start, finished_at=start + 16.0).where(
                ledger.Job.id == job.id).execute()
        for job in jobs[24:32]:  # the batch in hand, claimed 5 s ago by this (live) process
            assert ledger.claim(now=now - 5).id == job.id
        daemon_lock = hold_lock(home / "var" / "daemon.lock")  # a daemon runs: status gives a time left
        info = status(home, smoke_model_path)
        text = mondrian(home, smoke_model_path, "status").stdout
    finally:
        if daemon_lock is not None:
            os.close(daemon_lock)
        ledger.close()

    eta = info["eta"]
    # (8 in hand with about 11 s left each + 100 waiting x 16 s) / 8 at a time: about 3.5 min, not 28 min.
    assert 180 <= eta["queue_s"] <= 230, eta
    assert eta["typical_photo_s"] == 16.0 and eta["based_on_photos"] == 20 and eta["photos_at_once"] == 8, eta
    assert len(info["running"]) == 8 and all(5 <= r["eta_s"] <= 11 for r in info["running"]), info["running"]
    now_lines = [line for line in text.splitlines() if line.startswith("Now:")]
    assert len(now_lines) == 8 and all(" left" in line and "longer" not in line for line in now_lines), text
    assert "left for 108 photo(s) (about 8 photos at a time, each about 16 s: one every 2 s" in text, text


def test_status_names_the_model_run_would_load_not_only_the_last_one(tmp_path, smoke_model_path):
    """After `mondrian demo` (the smoke model) in a home whose settings name a real model, `status` showed the smoke
    model, and the `run` it advised loaded the other one. With no daemon running it names the model `run` loads
    now, and the one the last run used."""
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    photo(home / "inbox" / "a.jpg", seed=1, size=(64, 48))
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0
    same = mondrian(home, smoke_model_path, "status").stdout
    assert "smoke model" in same and "last run used" not in same, same
    settings = home / "mondrian.toml"
    settings.write_text(settings.read_text() + 'model = "mlx-community/Qwen2-VL-2B-Instruct-4bit"\n')
    text = mondrian(home, smoke_model_path, "status", MONDRIAN_MODEL="").stdout
    line = next(line for line in text.splitlines() if line.startswith("Model:"))
    assert line.startswith("Model:   mlx-community/Qwen2-VL-2B-Instruct-4bit") and "the last run used" in line, line


def test_two_homes_on_one_var_dir_are_refused_not_mixed(tmp_path, smoke_model_path):
    """Two homes whose mondrian.toml name one var_dir shared one ledger: the second home's daemon took the first's
    queued photo and failed it as outside its inbox, and the first's daemon then passed it by as failed, stranded.
    The second is refused with what to do; the first goes on, its photo critiqued."""
    shared = tmp_path / "shared-var"
    a = make_home(tmp_path / "a", smoke_model_path, var_dir=str(shared), **FAST)
    b = make_home(tmp_path / "b", smoke_model_path, var_dir=str(shared), **FAST)
    assert mondrian(a, smoke_model_path, "status").returncode == 0  # a's ledger, in the shared folder
    photo(a / "inbox" / "a.jpg", seed=1, size=(64, 48))
    from daemon.ledger import Ledger

    ledger = Ledger(shared / "ledger.db")
    try:
        src = a / "inbox" / "a.jpg"
        ledger.enqueue(src, "a.jpg", "ansel", "default", src.stat().st_size, src.stat().st_mtime)
    finally:
        ledger.close()
    out = mondrian(b, smoke_model_path, "run", "--once", timeout=120)
    assert out.returncode == 78 and "two homes cannot share one ledger" in out.stderr, out.stderr
    assert "var_dir" in out.stderr and str(b / "mondrian.toml") in out.stderr, out.stderr
    assert mondrian(a, smoke_model_path, "run", "--once", timeout=180).returncode == 0
    assert [p.name for p in reports(a / "outbox")] == ["report.json"]


def test_one_home_reached_by_two_spellings_is_not_two_homes(tmp_path, smoke_model_path):
    """A Mac's disk takes `~/pictures/mondrian` for `~/Pictures/Mondrian` (and é composed or not): the one-ledger-one-
    home check compared the two spellings as text and refused the home its own ledger. (Here: a bind mount, one
    folder at two paths.)"""
    import shutil as _shutil

    if os.geteuid() != 0 or _shutil.which("mount") is None:
        pytest.skip("needs root to bind-mount a folder at a second path")
    home = make_home(tmp_path / "Pictures" / "Mondrian", smoke_model_path, var_dir=str(tmp_path / "var"), **FAST)
    other = tmp_path / "pictures" / "mondrian"
    other.mkdir(parents=True)
    if subprocess.run(["mount", "--bind", str(home), str(other)]).returncode != 0:
        pytest.skip("bind mounts are not allowed here")
    try:
        assert mondrian(home, smoke_model_path, "status").returncode == 0
        out = mondrian(other, smoke_model_path, "status")
        assert out.returncode == 0 and "two homes" not in out.stderr, out.stderr
    finally:
        subprocess.run(["umount", str(other)], check=True)
