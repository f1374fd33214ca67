"""`mondrian retry` (issue 13): permanent failures are skipped until something changed (or `--all`), and plain
`retry` explains itself. Real daemon runs, real files changed the way a person fixes them."""

from __future__ import annotations

from pathlib import Path

from tests.harness import ledger_jobs, make_home, mondrian, photo


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
