"""A deep inbox analysed in batches (issue 11 item 7): the real daemon, real files, and the smoke architecture with
plain random weights (`plain_model_path`), whose reports differ in length and words from photo to photo (the
smoke model's are alike), so a row given another photo's text, or cut at another length, shows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.harness import ledger_jobs, make_home, mondrian, photo

N = 9


def _inbox(home: Path) -> None:
    for i in range(N):
        photo(home / "inbox" / f"p{i}.png", seed=i, size=(160, 120) if i % 3 else (120, 160))
    shutil.copy(home / "inbox" / "p0.png", home / "inbox" / "p0-again.png")  # the same photo twice
    (home / "inbox" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")


def _run(tmp_path: Path, model: Path, name: str, **settings) -> tuple[dict, dict, str, dict]:
    home = make_home(tmp_path / name, model, **settings)
    _inbox(home)
    out = mondrian(home, model, "run", "--once", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = ledger_jobs(home)
    critiques, tokens = {}, {}
    for rel, job in jobs.items():
        if job.state == "done" and job.output_dir and (Path(job.output_dir) / "report.json").exists():
            report = json.loads((Path(job.output_dir) / "report.json").read_text())
            critiques[rel] = {k: report[k] for k in ("dimensions", "summary", "overall_grade")}
            tokens[rel] = report["timings"]["generated_tokens"]
    return jobs, critiques, out.stderr, tokens


def test_a_deep_inbox_in_batches_gets_the_reports_of_one_at_a_time(tmp_path: Path, plain_model_path: Path) -> None:
    # A token budget some reports fit in and some do not: those fail, each alone and with its reason.
    tokens = sorted(_run(tmp_path, plain_model_path, "probe", batch_size=1)[3].values())
    assert tokens[0] < tokens[-1], tokens
    budget = {"max_tokens": tokens[len(tokens) // 2]}
    one_jobs, one, _, _ = _run(tmp_path, plain_model_path, "one", batch_size=1, **budget)
    four_jobs, four, log, _ = _run(tmp_path, plain_model_path, "four", batch_size=4, **budget)

    assert "photos together" in log  # it did batch
    assert {rel: j.state for rel, j in four_jobs.items()} == {rel: j.state for rel, j in one_jobs.items()}
    assert four == one  # scores and comments, photo for photo
    failed = {rel for rel, j in four_jobs.items() if j.state == "failed"}
    assert "broken.jpg" in failed and failed - {"broken.jpg"}, "no photo failed inside a batch: raise the budget"
    assert len(one) >= 2, "too few photos succeeded to compare"
    for rel in failed:
        assert four_jobs[rel].error == one_jobs[rel].error, rel
    assert any("max_tokens" in four_jobs[rel].error for rel in failed)
    # Every photo exactly once: one report each, the copy a duplicate of the first.
    outputs = [j.output_dir for j in four_jobs.values() if j.state == "done"]
    assert len(outputs) == len(set(outputs))
    assert four_jobs["p0-again.png"].state == one_jobs["p0-again.png"].state
