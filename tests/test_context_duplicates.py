"""A duplicate is the same bytes *and* the same analysis context (advisor, effective mode, reference set, adapter):
dropping a photo again after adding references gives a new rag critique that links the earlier one. Real daemon,
real smoke model, real reference indexing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import jsonschema

from daemon.analysis.critique import DIMENSIONS
from daemon.pipeline.report import SCHEMA_PATH
from tests.harness import Daemon, make_home, photo, reports, wait_for

SCHEMA = json.loads(SCHEMA_PATH.read_text())


def _report(folder: Path) -> dict:
    data = json.loads((folder / "report.json").read_text())
    jsonschema.validate(data, SCHEMA)
    return data


def test_the_reference_fingerprint_is_the_index_content_not_its_paths() -> None:
    from types import SimpleNamespace

    from daemon.analysis.rag import reference_fingerprint

    def row(path: str, sha: str, score: int, source: str = "human") -> SimpleNamespace:
        return SimpleNamespace(path=path, sha256=sha, scores={k: score for k in DIMENSIONS}, comments=None,
                               source=source)

    base = reference_fingerprint([row("/r/a.jpg", "aa", 8), row("/r/b.jpg", "bb", 5)])
    assert reference_fingerprint([row("/r/b.jpg", "bb", 5), row("/r/sub/a2.jpg", "aa", 8)]) == base  # order, renames
    assert reference_fingerprint([row("/r/a.jpg", "aa", 8), row("/r/b.jpg", "bb", 6)]) != base  # rescored
    assert reference_fingerprint([row("/r/a.jpg", "aa", 8)]) != base  # removed
    assert reference_fingerprint([row("/r/a.jpg", "aa", 8), row("/r/b.jpg", "bb", 5, "model")]) != base


def _outcomes(outbox: Path) -> tuple[list[Path], list[Path]]:
    return reports(outbox), sorted((outbox / "duplicates").glob("*.duplicate.json"))


def _next_outcome(outbox: Path, before: tuple[list[Path], list[Path]], d: Daemon) -> tuple[list[Path], list[Path]]:
    """Wait until one more report or one more duplicate record exists (whichever the daemon decides), and return
    what is new, so a wrong decision fails at once with what was decided instead of timing out."""
    def changed():
        assert d.proc.poll() is None, d.output()
        now = _outcomes(outbox)
        return now if now != before else None

    now = wait_for(changed, 120, what="the next outcome")
    return [p for p in now[0] if p not in before[0]], [p for p in now[1] if p not in before[1]]


def test_a_photo_dropped_again_after_references_are_added_gets_a_new_rag_critique(tmp_path: Path,
                                                                                   smoke_model_path: Path) -> None:
    home = make_home(tmp_path / "home", smoke_model_path, default_mode="rag")
    inbox, outbox = home / "inbox", home / "outbox"
    original = photo(tmp_path / "IMG_1.jpg", seed=31)

    with Daemon(home, smoke_model_path) as d:
        # 1. rag asked for, no references yet: a baseline critique, saying why
        shutil.copy2(original, inbox / "IMG_1.jpg")
        [first_json], dups = _next_outcome(outbox, ([], []), d)
        assert not dups
        first = _report(first_json.parent)
        assert first["mode"]["requested"] == "rag" and first["mode"]["effective"] == "baseline"
        assert "earlier_reports" not in first

        # 2. references added (as the report advises) and indexed by the running daemon
        refs = home / "advisors" / "ansel" / "references"
        photo(refs / "moonrise.jpg", seed=41)
        (refs / "moonrise.json").write_text(json.dumps({"scores": {k: 8 for k in DIMENSIONS}}))
        photo(refs / "dunes.jpg", seed=42)
        (refs / "dunes.json").write_text(json.dumps({"scores": {k: 5 for k in DIMENSIONS}}))
        old = time.time() - 30
        for p in refs.iterdir():
            os.utime(p, (old, old))
        from daemon.ledger import Ledger

        ledger = Ledger(home / "var" / "ledger.db")
        try:
            wait_for(lambda: len(ledger.references("ansel")) == 2, 60, what="the references indexed")
        finally:
            ledger.close()

        # 3. the same bytes again: a new rag critique, linking the first
        before = _outcomes(outbox)
        shutil.copy2(original, inbox / "IMG_1.jpg")
        new, dups = _next_outcome(outbox, before, d)
        assert not dups, f"analysed as a duplicate of the baseline report: {dups[0].read_text()}"
        [second_json] = new
        second = _report(second_json.parent)
        assert second["photo"]["sha256"] == first["photo"]["sha256"]
        assert second["mode"]["effective"] == "rag" and second["portfolio"]["count"] == 2
        assert second["context"]["key"] != first["context"]["key"]
        [link] = second["earlier_reports"]
        assert link["job_id"] == first["job_id"] and link["mode"] == "baseline" and link["advisor"] == "ansel"
        assert (second_json.parent / link["report"]).resolve() == (first_json.parent / "report.html").resolve()
        html = (second_json.parent / "report.html").read_text()
        assert f'href="../{first_json.parent.name}/report.html"' in html and "Earlier critiques" in html

        # 4. a third time, nothing changed since the rag critique: a duplicate of it, not of the first
        before = _outcomes(outbox)
        shutil.copy2(original, inbox / "IMG_1 copy.jpg")
        new, [dup] = _next_outcome(outbox, before, d)
        assert not new
        record = json.loads(dup.read_text())
        assert record["duplicate_of_job"] == second["job_id"]
        assert (dup.parent / record["report"]).resolve() == (second_json.parent / "report.html").resolve()
        assert Path(str(dup).removesuffix(".duplicate.json")).is_file()  # the original moved in beside it

        # 5. the same bytes for another advisor: a critique of its own, linking both earlier ones
        before = _outcomes(outbox)
        (inbox / "cartier").mkdir(exist_ok=True)
        shutil.copy2(original, inbox / "cartier" / "IMG_1.jpg")
        [cartier_json], dups = _next_outcome(outbox, before, d)
        assert not dups
        cartier = _report(cartier_json.parent)
        assert cartier["advisor"]["id"] == "cartier" and cartier["mode"]["effective"] == "baseline"
        assert [e["job_id"] for e in cartier["earlier_reports"]] == [first["job_id"], second["job_id"]]
        assert d.stop() == 0

    ledger = Ledger(home / "var" / "ledger.db")
    try:
        jobs = ledger.jobs()
    finally:
        ledger.close()
    assert len(reports(outbox)) == 3 and len(jobs) == 4  # three reports and one duplicate, nothing twice
    assert [j.state for j in jobs] == ["done"] * 4 and sum(1 for j in jobs if j.duplicate_of) == 1
    assert not any(p.is_file() for p in inbox.rglob("*"))


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_a_reference_set_changed_during_the_analysis_counts_as_what_was_read(tmp_path: Path,
                                                                            smoke_model_path: Path) -> None:
    """The decision is taken before the analysis; the key a report is kept under is what the analysis read. When
    the two differ and a report with the second exists already, the photo is its duplicate: never two reports of
    one key."""
    from daemon.ledger import Ledger

    home = make_home(tmp_path / "home", smoke_model_path, default_mode="rag")
    inbox, outbox = home / "inbox", home / "outbox"
    refs = home / "advisors" / "ansel" / "references"
    original = photo(tmp_path / "P.jpg", seed=72)

    def add_reference(name: str, seed: int) -> None:
        photo(refs / f"{name}.jpg", seed=seed)
        (refs / f"{name}.json").write_text(json.dumps({"scores": {k: seed % 10 for k in DIMENSIONS}}))
        old = time.time() - 30
        for p in (refs / f"{name}.jpg", refs / f"{name}.json"):
            os.utime(p, (old, old))

    def indexed() -> int:
        ledger = Ledger(home / "var" / "ledger.db")
        try:
            return len(ledger.references("ansel"))
        finally:
            ledger.close()

    add_reference("a", 71)
    with Daemon(home, smoke_model_path) as d:
        wait_for(lambda: indexed() == 1, 60, what="the first reference indexed")
        shutil.copy2(original, inbox / "P.jpg")
        [first_json], _ = _next_outcome(outbox, ([], []), d)
        add_reference("b", 73)
        wait_for(lambda: indexed() == 2, 60, what="the second reference indexed")
        assert d.stop() == 0
    first = _report(first_json.parent)
    assert first["mode"]["effective"] == "rag" and first["portfolio"]["count"] == 1

    with Daemon(home, smoke_model_path, MONDRIAN_TEST_STOP_AT="analysing") as d:
        before = _outcomes(outbox)
        shutil.copy2(original, inbox / "P.jpg")  # decided with two references: not a duplicate of the first
        wait_for(lambda: d.proc.poll() is not None or _stopped(d.proc.pid), 120, what="the daemon held mid-analysis")
        for p in (refs / "b.jpg", refs / "b.json"):
            p.unlink()
        ledger = Ledger(home / "var" / "ledger.db")
        try:
            assert ledger.remove_reference("ansel", refs / "b.jpg")  # what `references index` would do now
        finally:
            ledger.close()
        d.signal(signal.SIGCONT)
        new, dups = _next_outcome(outbox, before, d)  # analysed with one reference: the first report's key
        assert not new, f"a second report with the first one's key: {_report(new[0].parent)['context']}"
        [record] = [json.loads(p.read_text()) for p in dups]
        assert record["duplicate_of_job"] == first["job_id"]
        assert d.stop() == 0


def test_a_photo_dropped_again_after_its_advisor_or_the_settings_changed_gets_a_new_critique(
        tmp_path: Path, smoke_model_path: Path) -> None:
    """The same photo dropped again after the studio rewrote its advisor's prompt, or changed a setting that shapes
    a critique (comment_max_chars), was filed as a duplicate of the critique in the old voice. A setting that does
    not shape one (quiet_seconds) still finds the duplicate."""
    from tests.harness import mondrian

    home = make_home(tmp_path / "home", smoke_model_path, max_pixels=56 * 56, comment_max_chars=8, max_tokens=400,
                     quiet_seconds=0.2, api_port=0, default_mode="baseline")
    monet = home / "advisors" / "monet" / "advisor.toml"
    monet.parent.mkdir(parents=True)
    monet.write_text('id = "monet"\nname = "Claude Monet"\nprompt = "You are Monet; judge the light."\n')
    shot = photo(tmp_path / "lilies.jpg", seed=9, size=(64, 48))

    def drop_and_run() -> str:
        target = home / "inbox" / "monet" / "lilies.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target)
        out = mondrian(home, smoke_model_path, "run", "--once", timeout=180)
        assert out.returncode == 0, out.stderr[-3000:]
        latest = max(every_job(home), key=lambda j: j.id)  # the harness's ledger_jobs keeps one job a path
        return "duplicate" if latest.duplicate_of is not None else latest.state

    def every_job(home: Path) -> list:
        from daemon.ledger import Ledger

        ledger = Ledger(home / "var" / "ledger.db")
        try:
            return list(ledger.jobs())
        finally:
            ledger.close()

    assert drop_and_run() == "done"
    assert drop_and_run() == "duplicate"  # nothing changed
    monet.write_text('id = "monet"\nname = "Claude Monet"\nprompt = "You are Monet; judge the colour."\n')
    assert drop_and_run() == "done"  # another voice
    settings = home / "mondrian.toml"
    settings.write_text(settings.read_text().replace("quiet_seconds = 0.2", "quiet_seconds = 0.3"))
    assert drop_and_run() == "duplicate"  # when a file counts as settled shapes no critique
    settings.write_text(settings.read_text().replace("comment_max_chars = 8", "comment_max_chars = 12"))
    assert drop_and_run() == "done"
