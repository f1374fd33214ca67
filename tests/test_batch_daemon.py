"""A deep inbox analysed in batches (issue 11 item 7): the real daemon, real files, and the smoke architecture with
plain random weights (`plain_model_path`), whose reports differ in length and words from photo to photo (the
smoke model's are alike), so a row given another photo's text, or cut at another length, shows."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

from daemon.analysis.critique import DIMENSIONS
from tests.harness import ledger_jobs, make_home, mondrian, photo, reports

N = 8
COPIES = ("p0-again.png", "p0-copy.png", "p0-once-more.png")


def _inbox(home: Path, copied: str | None) -> None:
    for i in range(N):
        photo(home / "inbox" / f"p{i}.png", seed=i, size=(160, 120) if i % 3 else (120, 160))
    for copy in COPIES if copied else ():  # the same photo four times: two of them share a batch
        shutil.copy(home / "inbox" / copied, home / "inbox" / copy)
    (home / "inbox" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")


def _references(home: Path, model: Path) -> None:
    """A curated portfolio for rag, indexed before the inbox is served (no model needed: every score is given)."""
    refs = home / "advisors" / "ansel" / "references"
    for i in range(4):
        photo(refs / f"ref{i}.jpg", seed=40 + i)
        scores = {d: (3 + 2 * i + j) % 11 for j, d in enumerate(DIMENSIONS)}
        (refs / f"ref{i}.json").write_text(json.dumps({"scores": scores, "comments": {"lighting": f"print {i}"}}))
    out = mondrian(home, model, "references", "index", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def _run(tmp_path: Path, model: Path, name: str, copied: str | None = None,
         **settings) -> tuple[dict, dict, str, dict]:
    home = make_home(tmp_path / name, model, **settings)
    if settings.get("default_mode") == "rag":
        _references(home, model)
    _inbox(home, copied)
    out = mondrian(home, model, "run", "--once", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = ledger_jobs(home)
    critiques, tokens = {}, {}
    for rel, job in jobs.items():
        if job.state == "done" and job.output_dir and (Path(job.output_dir) / "report.json").exists():
            report = json.loads((Path(job.output_dir) / "report.json").read_text())
            critiques[rel] = {k: report.get(k) for k in ("dimensions", "summary", "overall_grade", "mode", "profile",
                                                         "references")}
            tokens[rel] = report["timings"]["generated_tokens"]
    return jobs, critiques, out.stderr, tokens


@pytest.mark.parametrize("mode", ["baseline", "rag"])
def test_a_deep_inbox_in_batches_gets_the_reports_of_one_at_a_time(tmp_path: Path, plain_model_path: Path,
                                                                   mode: str) -> None:
    # baseline: a token budget some reports fit in and some do not; those fail, each alone and with its reason.
    # rag (its two passes batched): the default budget; the damaged file fails alone.
    probe = _run(tmp_path, plain_model_path, "probe", batch_size=1, default_mode=mode)[3]
    tokens = sorted(probe.values())
    assert tokens[0] < tokens[-1], tokens
    budget = {"max_tokens": tokens[len(tokens) // 2]} if mode == "baseline" else {}
    shortest = min(probe, key=probe.get)  # it fits the budget, so its copies are duplicates of its report
    one_jobs, one, _, _ = _run(tmp_path, plain_model_path, "one", shortest, batch_size=1, default_mode=mode, **budget)
    four_jobs, four, log, _ = _run(tmp_path, plain_model_path, "four", shortest, batch_size=4, default_mode=mode,
                                   **budget)

    assert f"photos together as Ansel Adams ({mode})" in log  # it did batch, in that mode
    assert {rel: j.state for rel, j in four_jobs.items()} == {rel: j.state for rel, j in one_jobs.items()}
    assert four == one  # scores and comments (rag: profile and references too), photo for photo
    assert all(c["mode"]["effective"] == mode for c in four.values())
    failed = {rel for rel, j in four_jobs.items() if j.state == "failed"}
    assert "broken.jpg" in failed
    assert len(one) >= 2, "too few photos succeeded to compare"
    for rel in failed:
        assert four_jobs[rel].error == one_jobs[rel].error, rel
    if mode == "baseline":
        assert failed - {"broken.jpg"}, "no photo failed inside a batch: raise the budget"
        assert any("max_tokens" in four_jobs[rel].error for rel in failed)
    # Every photo exactly once: one report each, the copies duplicates of the first.
    outputs = [j.output_dir for j in four_jobs.values() if j.state == "done"]
    assert len(outputs) == len(set(outputs))
    assert len(reports(tmp_path / "four" / "outbox")) == len(reports(tmp_path / "one" / "outbox")) == len(one)
    assert len(list((tmp_path / "four" / "outbox" / "duplicates").glob("*.duplicate.json"))) == len(COPIES)


def test_the_same_photo_twice_in_one_batch_gets_one_report(tmp_path: Path, plain_model_path: Path) -> None:
    """Claimed together, a photo and its copy: the copy waits for the first's report and is its duplicate."""
    import os

    from daemon.config import load_config
    from daemon.ledger import Ledger
    from daemon.model.runtime import ModelRuntime
    from daemon.pipeline.worker import Worker

    home = make_home(tmp_path / "home", plain_model_path, batch_size=4)
    cfg = load_config(home, env={}, model=str(plain_model_path))
    cfg.ensure_dirs()
    names = ["a.png", "a-copy.png", "b.png", "c.png"]
    for i, name in enumerate(names[:1] + names[2:]):
        photo(home / "inbox" / name, seed=i)
    shutil.copy(home / "inbox" / "a.png", home / "inbox" / "a-copy.png")
    ledger = Ledger(cfg.db_path)
    items = []
    for name in names:
        st = os.stat(home / "inbox" / name)
        items.append((home / "inbox" / name, name, "ansel", "default", st.st_size, st.st_mtime, st.st_ctime))
    ledger.enqueue_many(items)
    runtime = ModelRuntime.load(str(plain_model_path), var_dir=cfg.var_dir, max_pixels=cfg.max_pixels)
    worker = Worker(cfg, ledger, lambda: runtime)
    assert worker.run_once()  # one call: all four claimed together
    jobs = {j.rel_path: j for j in ledger.jobs()}
    assert all(j.state == "done" for j in jobs.values()), {r: (j.state, j.error) for r, j in jobs.items()}
    assert len(reports(cfg.outbox)) == 3
    assert list((cfg.outbox / "duplicates").glob("*.duplicate.json")) == \
        [cfg.outbox / "duplicates" / "a-copy.png.duplicate.json"]
    ledger.close()


def test_stopping_during_a_batch_puts_every_photo_of_it_back_in_the_queue(tmp_path: Path,
                                                                          plain_model_path: Path) -> None:
    import signal

    from tests.harness import Daemon, status, wait_for

    home = make_home(tmp_path / "home", plain_model_path, batch_size=4)
    for i in range(4):
        photo(home / "inbox" / f"p{i}.png", seed=i)
    with Daemon(home, plain_model_path, MONDRIAN_TEST_TOKEN_SECONDS="0.05") as d:
        wait_for(lambda: "photos together" in d.output(), 120, what="a batch in progress")
        assert len(status(home, plain_model_path)["running"]) == 4
        # `workers` named one photo of the four its worker held
        [row] = json.loads(mondrian(home, plain_model_path, "workers", "--json").stdout)["workers"]
        assert row["photo"] in {f"p{i}.png and 3 more" for i in range(4)}, row
        d.signal(signal.SIGTERM)
        assert d.wait(60) == 0, d.output()
    jobs = ledger_jobs(home)
    assert {j.state for j in jobs.values()} == {"queued"}, {r: (j.state, j.error) for r, j in jobs.items()}
    assert all(j.attempts == 0 for j in jobs.values())  # a stop is no attempt: nothing counts against them
    assert sorted(p.name for p in (home / "inbox").iterdir()) == [f"p{i}.png" for i in range(4)]


def test_batch_size_zero_follows_the_device_the_model_runs_on(tmp_path: Path, plain_model_path: Path) -> None:
    """The default, `batch_size = 0`: one photo at a time until the model is loaded, then what its runtime suggests
    for its device (1 on this CPU; a GPU runtime suggests 4, played here by setting the runtime's own answer)."""
    from daemon.config import Config, load_config
    from daemon.ledger import Ledger
    from daemon.model.runtime import ModelRuntime
    from daemon.pipeline.worker import Worker

    assert Config.__dataclass_fields__["batch_size"].default == 0
    home = make_home(tmp_path / "home", plain_model_path)
    cfg = load_config(home, env={}, model=str(plain_model_path))
    cfg.ensure_dirs()
    for i in range(5):
        photo(home / "inbox" / f"p{i}.png", seed=i)
    ledger = Ledger(cfg.db_path)
    items = []
    for i in range(5):
        path = home / "inbox" / f"p{i}.png"
        st = os.stat(path)
        items.append((path, path.name, "ansel", "default", st.st_size, st.st_mtime, st.st_ctime))
    ledger.enqueue_many(items)
    runtime = ModelRuntime.load(str(plain_model_path), var_dir=cfg.var_dir, max_pixels=cfg.max_pixels)
    assert runtime.suggested_batch_size == 1  # this machine has no GPU
    worker = Worker(cfg, ledger, lambda: runtime)
    assert worker.batch_size() == 1  # nothing loaded yet
    assert worker.run_once()  # the first photo loads the model, alone
    assert [j.state for j in ledger.jobs()].count("done") == 1
    runtime._suggested_batch = ModelRuntime.GPU_BATCH
    assert worker.batch_size() == ModelRuntime.GPU_BATCH == 4
    assert worker.run_once()  # one call: the other four together
    jobs = ledger.jobs()
    assert all(j.state == "done" for j in jobs), {j.rel_path: (j.state, j.error) for j in jobs}
    assert len(reports(cfg.outbox)) == 5
    worker.cfg = dataclasses.replace(cfg, batch_size=2)  # a number the user set wins over the device's
    assert worker.batch_size() == 2
    ledger.close()


def test_photos_analysed_together_share_their_time_limits(tmp_path: Path, plain_model_path: Path) -> None:
    """Attack: job_timeout_seconds is a photo's, yet a batch had one deadline for all its rows: 8 photos that took
    under 1 s each alone all failed a 3 s limit together (their batch took 4.5 s), and `retry` batched them again to
    fail again. Every pass here costs each row 20 ms (MONDRIAN_TEST_TOKEN_SECONDS), so a batch of four takes over
    four photos' time: a row takes a pass for each token the schema forces, which a photo alone takes several at a
    time, so each photo's share is about 1.5x its time alone. The limit is 2x the slowest photo alone (1.5x failed
    on a loaded machine), and the batch as a whole must take longer than it, or the test could not fail."""
    slow = {"MONDRIAN_TEST_TOKEN_SECONDS": "0.02"}

    def run(name: str, **settings) -> dict:
        home = make_home(tmp_path / name, plain_model_path, **settings)
        for i in range(4):
            photo(home / "inbox" / f"p{i}.png", seed=i)  # one size: one group, each pass for all four rows
        out = mondrian(home, plain_model_path, "run", "--once", timeout=600, **slow)
        assert out.returncode == 0, out.stderr[-3000:]
        return ledger_jobs(home)

    alone = run("alone", batch_size=1)
    assert {j.state for j in alone.values()} == {"done"}, {r: (j.state, j.error) for r, j in alone.items()}
    limit = round(2 * max(j.finished_at - j.started_at for j in alone.values()), 2)
    together = run("together", batch_size=4, job_timeout_seconds=limit)
    assert {j.state for j in together.values()} == {"done"}, (limit, {r: j.error for r, j in together.items()})
    timings = [json.loads((Path(j.output_dir) / "report.json").read_text())["timings"] for j in together.values()]
    assert {t["photos_analysed_together"] for t in timings} == {4}, timings
    assert timings[0]["analysis_s"] > limit, (limit, timings)  # one deadline for the batch would have failed them
    # Each report's generate_s is its own row's (rows of other lengths end passes apart), not the batch's.
    assert len({t["generated_tokens"] for t in timings}) > 1, timings
    assert max(t["generate_s"] for t in timings) - min(t["generate_s"] for t in timings) > 0.05, timings


def test_a_photo_that_times_out_alone_times_out_in_a_batch_too(tmp_path: Path, plain_model_path: Path) -> None:
    """Attack: a batch's photos shared the sum of their limits, so the first of four photos of different sizes
    (four groups, decoded one after another) ran on the others' share: it was critiqued in a batch where alone it
    timed out, while the next ones timed out. Each photo is now charged its own share of the time spent on it, and
    not the time it waits for the others: alone or together, a photo meets the same limit."""
    slow = {"MONDRIAN_TEST_TOKEN_SECONDS": "0.02"}

    def run(name: str, **settings) -> dict:
        home = make_home(tmp_path / name, plain_model_path, **settings)
        # Sizes in whole 28-pixel patches under the smoke model's max_pixels: 15, 16, 12 and 14 image tokens, so
        # four prompt lengths, four groups decoded one after another.
        for i, size in enumerate([(140, 84), (112, 112), (168, 56), (196, 56)]):
            photo(home / "inbox" / f"p{i}.png", seed=i, size=size)
        out = mondrian(home, plain_model_path, "run", "--once", timeout=600, **slow)
        assert out.returncode == 0, out.stderr[-3000:]
        return ledger_jobs(home)

    alone = run("alone", batch_size=1)
    assert {j.state for j in alone.values()} == {"done"}, {r: (j.state, j.error) for r, j in alone.items()}
    limit = round(0.9 * min(j.finished_at - j.started_at for j in alone.values()), 2)  # a batch row takes longer
    together = run("together", batch_size=4, job_timeout_seconds=limit)
    assert {r: j.state for r, j in together.items()} == {f"p{i}.png": "failed" for i in range(4)}, \
        (limit, {r: (j.state, j.error) for r, j in together.items()})
    assert all("job_timeout_seconds" in j.error for j in together.values()), {r: j.error for r, j in together.items()}

