"""outbox/index.html lists reports and failures (counts, links, a filter and a grade sort without scripts); each
failure has a page whose advice fits its cause; the index is rebuilt incrementally and stays true to the outbox."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from daemon.analysis.advisors import UnknownAdvisor, get_advisor
from daemon.config import load_config
from daemon.pipeline.failures import advice, cause_of
from daemon.pipeline.outbox_index import OutboxIndex
from daemon.pipeline.report import write_report_folder
from tests.harness import ledger_jobs, make_home, mondrian, photo
from tests.test_report_html import make_image, sample_report

CARD = re.compile(r'<li class="card (report|failure)[^"]*" data-(folder|failure)="([^"]+)"(?: data-cause="([^"]+)")?')


def cards(outbox: Path) -> dict[str, tuple[str, str | None]]:
    """{folder or failed file name: (kind, cause)} as listed by outbox/index.html."""
    html = (outbox / "index.html").read_text(encoding="utf-8")
    return {m.group(3): (m.group(1), m.group(4)) for m in CARD.finditer(html)}


def page(outbox: Path, name: str) -> str:
    return (outbox / "failed" / f"{name}.error.html").read_text(encoding="utf-8")


# -------------------------------------------------------------------------------- the real daemon, a real home


def test_failures_are_listed_with_counts_links_and_advice_that_fits_the_cause(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, max_file_mb=1)
    inbox, outbox = home / "inbox", home / "outbox"
    photo(inbox / "good.jpg", seed=1)
    photo(inbox / "fine.jpg", seed=2)
    (inbox / "notes.jpg").write_text("a shopping list, not a photo")  # unreadable
    photo(inbox / "moded.jpg", seed=3)
    (inbox / "moded.mode").write_text("fast\n")  # a wrong sidecar: the photo is fine
    with open(inbox / "huge.jpg", "wb") as fh:  # over max_file_mb: refused before it is read
        fh.truncate(3 * 1024 * 1024)
    outside = photo(tmp_path / "elsewhere.jpg", seed=4)
    (inbox / "link.jpg").symlink_to(outside)  # a link out of the inbox
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=240)
    assert out.returncode == 0, out.stderr

    listed = cards(outbox)
    assert {k: v[0] for k, v in listed.items()} == {"good": "report", "fine": "report", "notes.jpg": "failure",
                                                    "moded.jpg": "failure", "huge.jpg": "failure",
                                                    "link.jpg": "failure"}, listed
    causes = {k: v[1] for k, v in listed.items() if v[0] == "failure"}
    assert causes == {"notes.jpg": "unreadable", "moded.jpg": "sidecar", "huge.jpg": "too_large",
                      "link.jpg": "link"}, causes
    html = (outbox / "index.html").read_text(encoding="utf-8")
    assert 'id="count-reports">2<' in html and 'id="count-failures">4<' in html
    for name in causes:
        assert f'href="failed/{name}.error.html"' in html
        record = json.loads((outbox / "failed" / f"{name}.error.json").read_text())
        assert record["cause"] == causes[name]
        text = page(outbox, name)
        assert f'data-cause="{causes[name]}"' in text and record["reason"].split("(")[0].strip()[:40] in \
            text.replace("&#39;", "'")
    # The advice fits: only a photo at fault is told to re-export it; a sidecar is told to fix the sidecar.
    assert "export it again" in page(outbox, "notes.jpg")
    assert "baseline, rag, lora" in page(outbox, "moded.jpg") and "photo app" not in page(outbox, "moded.jpg")
    assert "max_file_mb" in page(outbox, "huge.jpg")
    assert "Copy the photo itself" in page(outbox, "link.jpg")
    # The page links the original kept in failed/, but never a link that leads out of the outbox.
    assert 'href="notes.jpg"' in page(outbox, "notes.jpg") and 'href="link.jpg"' not in page(outbox, "link.jpg")
    assert "<code>mondrian retry --failed</code>" in page(outbox, "moded.jpg")  # no path in a page: status adds it

    # A report folder the user deletes leaves the index at the next job; the new report appears.
    shutil.rmtree(outbox / "fine")
    photo(inbox / "later.jpg", seed=5)
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=240).returncode == 0
    listed = cards(outbox)
    assert "fine" not in listed and listed["later"] == ("report", None) and listed["good"] == ("report", None)

    # A failure put back with `retry --failed` leaves the index (and its page goes) at once, before any job runs.
    (outbox / "failed" / "moded.mode").write_text("baseline\n")
    out = mondrian(home, smoke_model_path, "retry", "--failed")
    assert out.returncode == 0, out.stderr
    assert not (outbox / "failed" / "moded.jpg.error.html").exists()
    assert "moded.jpg" not in cards(outbox)


def test_a_failure_recorded_before_pages_existed_gets_its_page_and_its_cause_at_the_next_start(tmp_path,
                                                                                           smoke_model_path):
    """Homes made by an older Mondrian (records without a cause, no page), or a kill between record and page."""
    home = make_home(tmp_path / "home", smoke_model_path)
    (home / "inbox" / "notes.jpg").write_text("not a photo")
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=240).returncode == 0
    failed = home / "outbox" / "failed"
    record = json.loads((failed / "notes.jpg.error.json").read_text())
    for key in ("cause", "next_step", "what_to_do", "advisor_source", "mode_source", "from_inbox"):
        record.pop(key)
    (failed / "notes.jpg.error.json").write_text(json.dumps(record))  # as an older Mondrian wrote it
    (failed / "notes.jpg.error.html").unlink()
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=240).returncode == 0
    assert 'data-cause="unreadable"' in page(home / "outbox", "notes.jpg")
    assert cards(home / "outbox") == {"notes.jpg": ("failure", "unreadable")}


# ------------------------------------------------------------------------------------ causes and their advice


def _unknown_advisor_reason(tmp_path: Path) -> str:
    cfg = load_config(make_home(tmp_path / "h"), env={})
    with pytest.raises(UnknownAdvisor) as exc:
        get_advisor(cfg, "ansle")
    return str(exc.value).strip("'\"")  # as the worker records it


@pytest.mark.parametrize("reason, sources, cause", [
    ("analysis took longer than 600 s (job_timeout_seconds) and was stopped so the rest of the inbox can go on",
     {}, "timeout"),
    ("Mondrian stopped 4 times while analysing this photo, and an analysis of it alone in a separate process broke "
     "too (killed by SIGKILL twice); it was set aside", {}, "crash"),
    ("the model could not produce a critique: GenerationError: the model produced nothing", {}, "model"),
    ("`mondrian analyze` was stopped before it finished; the photo was left where it is. Run `mondrian analyze` on "
     "it again", {}, "interrupted"),
    ("this is a FIFO (named pipe), not a file with a photo in it; Mondrian reads only regular files", {},
     "not_a_file"),
    ("Mondrian cannot read this photo (no read permission), so it was left where it is: make it readable (chmod u+r)",
     {}, "permission"),
    ("the model's image preprocessing refused the photo (aspect ratio); export it at a more ordinary size and shape",
     {}, "shape"),
    ("could not write the report to outbox/ (No space left on device); gave up after 4 attempts. Fix the cause, "
     "then run `mondrian retry --failed`", {}, "outbox"),
    ("something nobody foresaw", {}, "other"),
])
def test_each_cause_is_recognised_from_the_reason_the_project_writes(reason, sources, cause):
    assert cause_of(reason, **sources).key == cause


def test_a_mistyped_advisor_on_the_command_line_is_not_a_photo_problem(tmp_path):
    reason = _unknown_advisor_reason(tmp_path)
    typed = cause_of(reason, advisor_source="command")
    folder = cause_of(reason, advisor_source="folder")
    assert (typed.key, folder.key) == ("advisor_command", "advisor_folder")
    text = advice(typed, from_inbox=False, advisors=["ansel", "cartier", "leibovitz"])
    assert "--advisor" in text and "ansel, cartier, leibovitz" in text and "mondrian analyze" in text
    assert "photo app" not in text and "export" not in text.lower() and not typed.photo_at_fault
    assert "advisor.toml" in advice(folder, from_inbox=True, advisors=["ansel"])
    mode = cause_of("unknown mode 'fsat'", mode_source="command")
    assert mode.key == "mode_command" and "--mode" in advice(mode, from_inbox=False)


# ------------------------------------------------------------------------------- the index is incremental


class OpenCounter:
    """Counts the report.json files this process opens (a Python audit hook: what `open` really did)."""

    installed: "OpenCounter | None" = None

    def __init__(self) -> None:
        self.paths: list[str] = []
        if OpenCounter.installed is None:
            sys.addaudithook(lambda event, args: OpenCounter.installed and OpenCounter.installed._hook(event, args))
        OpenCounter.installed = self

    def _hook(self, event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            name = os.fsdecode(args[0])
            if name.endswith(("report.json", ".error.json")):
                self.paths.append(name)

    def take(self) -> list[str]:
        out, self.paths = self.paths, []
        return out


def _report_folder(outbox: Path, name: str, grade: int, seed: int, day: int = 1) -> None:
    r = sample_report(overall_grade=grade, created_at=f"2026-11-{day:02d}T10:00:00+00:00")
    r["photo"]["file"] = f"{name}.jpg"
    write_report_folder(outbox / name, r, make_image(64, 48, seed=seed))


def test_refreshing_the_index_reads_only_what_is_new_and_stays_true_to_the_outbox(tmp_path):
    home = make_home(tmp_path / "home")
    cfg = load_config(home, env={})
    cfg.ensure_dirs()
    outbox = cfg.outbox
    for i in range(30):
        _report_folder(outbox, f"IMG_{i:02d}", grade=i % 11, seed=i)
    opens = OpenCounter()
    index = OutboxIndex(cfg)
    index.refresh()
    assert len(opens.take()) == 30 and len(cards(outbox)) == 30  # a cold start reads every report once

    index.refresh()
    assert opens.take() == [], "an unchanged outbox is not read again"
    _report_folder(outbox, "IMG_new", grade=9, seed=99)
    OutboxIndex(cfg).refresh()  # another process (`mondrian analyze`) shares the summary file
    assert [Path(p).parent.name for p in opens.take()] == ["IMG_new"]
    assert "IMG_new" in cards(outbox)

    shutil.rmtree(outbox / "IMG_03")  # deleted by the user
    (outbox / "IMG_07" / "report.json").write_text(json.dumps({**sample_report(overall_grade=1),
                                                               "photo": {"file": "edited.jpg"}}))  # rewritten
    (outbox / "stray").mkdir()  # not a report folder
    opens.take()
    index.refresh()
    assert [Path(p).parent.name for p in opens.take()] == ["IMG_07"]
    listed = cards(outbox)
    assert "IMG_03" not in listed and "stray" not in listed and len(listed) == 30
    assert 'data-folder="IMG_07" data-grade="1"' in (outbox / "index.html").read_text()

    (cfg.var_dir / "outbox-index.json").write_text("{ damaged")  # a summary file cut short: rebuilt
    index.refresh()
    assert len(opens.take()) == 30 and len(cards(outbox)) == 30

    cache = json.loads((cfg.var_dir / "outbox-index.json").read_text())
    cache["reports"]["IMG_00"]["entry"] = {"grade": 3, "surprise": True}  # right key, wrong summary: read again
    (cfg.var_dir / "outbox-index.json").write_text(json.dumps(cache))
    opens.take()
    index.refresh()
    assert [Path(p).parent.name for p in opens.take()] == ["IMG_00"] and len(cards(outbox)) == 30


def test_a_report_page_deleted_while_its_report_json_stays_is_written_again(tmp_path):
    """The index and a later duplicate's record link a report's page: deleted by hand, it was a dead link."""
    home = make_home(tmp_path / "home")
    cfg = load_config(home, env={})
    cfg.ensure_dirs()
    for i in range(3):
        _report_folder(cfg.outbox, f"IMG_{i}", grade=i, seed=i)
    index = OutboxIndex(cfg)
    index.refresh()
    page = cfg.outbox / "IMG_1" / "report.html"
    assert page.is_file()
    page.unlink()
    opens = OpenCounter()
    index.refresh()
    assert page.is_file() and "IMG_1" in page.read_text(), "written again from report.json"
    assert [Path(p).parent.name for p in opens.take()] == ["IMG_1"]  # only its report.json read to do it
    index.refresh()
    assert opens.take() == []


def test_a_failure_record_is_read_once_and_its_page_rewritten_if_deleted(tmp_path):
    home = make_home(tmp_path / "home")
    cfg = load_config(home, env={})
    cfg.ensure_dirs()
    record = {"job_id": 1, "file": "x.jpg", "reason": "the photo is truncated (the file ends early); copy it again",
              "kind": "permanent", "advisor": "ansel", "failed_at": "2026-12-01T10:00:00+00:00"}
    (cfg.failed_dir / "x.jpg").write_bytes(b"\xff\xd8broken")
    (cfg.failed_dir / "x.jpg.error.json").write_text(json.dumps(record))
    opens = OpenCounter()
    index = OutboxIndex(cfg)  # no ledger: every record stands
    index.refresh()
    assert len(opens.take()) == 1 and cards(cfg.outbox) == {"x.jpg": ("failure", "unreadable")}
    (cfg.failed_dir / "x.jpg.error.html").unlink()
    index.refresh()
    assert opens.take() == [] and (cfg.failed_dir / "x.jpg.error.html").exists()


def test_a_file_named_like_a_failure_record_is_a_failed_file_not_a_record(tmp_path, smoke_model_path):
    """A photographer's file that happens to be called `x.jpg.error.json` (another tool's, even holding a record's
    fields) fails as what it is, not a photo; in failed/ it sits beside its own record and is listed once, under
    its own name, never as a failure of an `x.jpg` that was never dropped."""
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    fake = {"job_id": 99, "file": "x.jpg", "reason": "made up", "kind": "permanent", "advisor": "ansel",
            "failed_at": "2026-12-01T10:00:00+00:00"}
    (inbox / "x.jpg.error.json").write_text(json.dumps(fake))
    photo(inbox / "good.jpg", seed=1)
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=240)
    assert out.returncode == 0, out.stderr
    assert (outbox / "failed" / "x.jpg.error.json.error.json").exists()
    assert {k: v[0] for k, v in cards(outbox).items()} == {"good": "report", "x.jpg.error.json": "failure"}
    assert not (outbox / "failed" / "x.jpg.error.html").exists()  # no page for a failure that never was
    assert "made up" not in (outbox / "index.html").read_text(encoding="utf-8")


def test_a_failure_whose_photo_was_put_back_and_analysed_leaves_the_index(tmp_path, smoke_model_path):
    """A file of the failed one's name is dropped into the inbox by hand (not `retry`) and analysed. It may be the
    photo fixed, or another photo of that name (two cards' IMG_0001.JPG): while the failed one still lies in failed/,
    its failure stands, and status says how to tell which; following that advice (deleting it), it leaves the index."""
    import subprocess

    home = make_home(tmp_path / "home", smoke_model_path)
    (home / "inbox" / "p.jpg").write_text("not yet a photo")
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=240).returncode == 0
    assert cards(home / "outbox") == {"p.jpg": ("failure", "unreadable")}
    photo(home / "inbox" / "p.jpg", seed=3)  # the fixed photo, put back
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=240).returncode == 0
    assert ledger_jobs(home)["p.jpg"].state == "done"
    assert cards(home / "outbox") == {"p": ("report", None), "p.jpg": ("failure", "unreadable")}
    info = json.loads(mondrian(home, smoke_model_path, "status", "--json").stdout)
    (failure,) = info["recent_failures"]
    assert "a later p.jpg was critiqued" in failure["next_step"], failure
    delete = re.search(r"delete `([^`]+)`", failure["next_step"]).group(1)
    done = subprocess.run(["bash", "-c", f"rm {delete} {delete}.error.json {delete}.error.html"], cwd=home,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=240).returncode == 0
    assert cards(home / "outbox") == {"p": ("report", None)}
    assert json.loads(mondrian(home, smoke_model_path, "status", "--json").stdout)["recent_failures"] == []


def test_a_failure_put_back_as_a_duplicate_is_not_called_critiqued(tmp_path, smoke_model_path):
    """Put back as a copy of a photo already critiqued, the later file was filed as a duplicate: "a later q.jpg was
    critiqued" sent the person looking for a report that was never made."""
    home = make_home(tmp_path / "home", smoke_model_path)
    photo(home / "inbox" / "good.jpg", seed=4)
    (home / "inbox" / "q.jpg").write_text("not yet a photo")
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=240).returncode == 0
    (home / "inbox" / "q.jpg").write_bytes((home / "outbox" / "good" / "good.jpg").read_bytes())
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=240).returncode == 0
    jobs = ledger_jobs(home)
    assert jobs["q.jpg"].state == "done" and jobs["q.jpg"].duplicate_of == jobs["good.jpg"].id
    (failure,) = json.loads(mondrian(home, smoke_model_path, "status", "--json").stdout)["recent_failures"]
    assert f"a later q.jpg was filed as a duplicate of job {jobs['good.jpg'].id}" in failure["next_step"], failure


def test_a_report_whose_report_json_was_corrupted_is_gone_for_the_index_and_for_duplicates_alike(tmp_path,
                                                                                                 smoke_model_path):
    """Attack: `echo '{junk' > outbox/icc/report.json` dropped the report from the index, yet the same photo dropped
    again was filed as "the same photo as job 1; see outbox/icc/report.html". One rule now: a report.json that
    cannot be read as that job's report is gone, as a deleted folder is, so the photo is critiqued again."""
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    original = photo(tmp_path / "icc.jpg", seed=5)

    def drop() -> str:
        shutil.copy2(original, inbox / "icc.jpg")
        out = mondrian(home, smoke_model_path, "run", "--once", timeout=240)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stderr

    drop()
    assert cards(outbox) == {"icc": ("report", None)}
    for corrupt, folder, again in (("{junk\n", "icc", "icc-2"), ("[]\n", "icc-2", "icc-3")):
        (outbox / folder / "report.json").write_text(corrupt)
        log = drop()
        assert not list(outbox.glob("duplicates/*.duplicate.json")) and "same photo as job" not in log, log[-2000:]
        report = json.loads((outbox / again / "report.json").read_text())
        assert report["photo"]["file"] == "icc.jpg" and "earlier_reports" not in report  # nor linked as earlier
        assert cards(outbox) == {again: ("report", None)}  # the index agrees: only the new one is a report


# ---------------------------------------------------------------------------------------- headless Chromium

VISIBLE = """() => [...document.querySelectorAll('#entries > li')].filter(e => e.offsetParent !== null)
  .map(e => { const r = e.getBoundingClientRect();
              return [Math.round(r.top), Math.round(r.left), e.dataset.folder ? Number(e.dataset.grade) : 'F']; })"""
LAYOUT = """() => ({overflow: document.documentElement.scrollWidth - window.innerWidth,
  background: getComputedStyle(document.body).backgroundColor, scripts: document.scripts.length,
  injected: document.querySelectorAll('[onerror], b').length})"""


def _visual_order(items: list) -> list:
    return [g for _, _, g in sorted(items)]


def _outbox_with_failures(tmp_path: Path):
    home = make_home(tmp_path / "home")
    cfg = load_config(home, env={})
    cfg.ensure_dirs()
    long_name = "IMG_" + "panorama" * 12  # one unbreakable word wider than a phone
    for day, (name, grade) in enumerate((("IMG_1", 5), ("IMG_2", 9), (long_name, 2), ("IMG_4", 7)), start=1):
        _report_folder(cfg.outbox, name, grade, seed=grade, day=day)
    reasons = {"notes.jpg": "this file is not a photo Mondrian can read (JPEG, PNG, TIFF, HEIC, WebP, GIF)",
               "x" * 90 + ".jpg": "the sidecar " + "x" * 90 + ".mode asks for mode '<img src=x onerror=alert(1)>`"
                                  "<b>`', which is unknown; use one of: baseline, rag, lora"}
    for i, (name, reason) in enumerate(reasons.items()):
        cause = cause_of(reason)
        (cfg.failed_dir / name).write_bytes(b"not a photo")
        (cfg.failed_dir / f"{name}.error.json").write_text(json.dumps({
            "job_id": i + 1, "file": name, "reason": reason, "kind": "permanent", "advisor": "ansel",
            "failed_at": f"2026-12-0{i + 2}T10:00:00+00:00", "cause": cause.key,
            "next_step": advice(cause, from_inbox=True), "what_to_do": advice(cause, from_inbox=True)}))
    OutboxIndex(cfg).refresh()
    return cfg.outbox, sorted(reasons)


@pytest.mark.parametrize("width", [390, 1280])
def test_index_and_failure_pages_in_chromium_mobile_and_desktop_light_and_dark(tmp_path, width):
    from tests.browser import Screens, require_playwright

    require_playwright()
    outbox, failed = _outbox_with_failures(tmp_path)
    with Screens() as screens:
        _check_pages(screens, outbox, failed, width, tmp_path / "shots")


def _check_pages(screens, outbox: Path, failed: list[str], width: int, shots: Path) -> None:
    from tests.browser import urls_outside

    screenshot = screens.shot
    index = (outbox / "index.html").as_uri()
    shots.mkdir()
    backgrounds = {}
    for scheme in ("light", "dark"):
        shown = screenshot(index, shots / f"index-{width}-{scheme}.png", width=width, color_scheme=scheme,
                           evaluate=LAYOUT)
        assert shown.value["overflow"] <= 0, f"index scrolls sideways at {width}px ({scheme})"
        assert shown.value["scripts"] == 0 and urls_outside(shown.requests, outbox) == []
        fail_page = (outbox / "failed" / f"{failed[-1]}.error.html").as_uri()  # the long name
        other = screenshot(fail_page, shots / f"failure-{width}-{scheme}.png", width=width, color_scheme=scheme,
                           evaluate=LAYOUT)
        assert other.value["overflow"] <= 0, f"failure page scrolls sideways at {width}px ({scheme})"
        assert urls_outside(other.requests, outbox) == [] and shown.dialogs == other.dialogs == []
        assert shown.value["injected"] == other.value["injected"] == 0, "a reason's markup was not escaped"
        backgrounds[scheme] = (shown.value["background"], other.value["background"])
    assert backgrounds["light"][0] != backgrounds["dark"][0] and backgrounds["light"][1] != backgrounds["dark"][1]
    assert all(p.stat().st_size > 0 for p in shots.iterdir())

    # The filter and the sort work by clicking their labels, with no script.
    every = screenshot(index, shots / "all.png", width=width, evaluate=VISIBLE).value
    assert _visual_order(every) == ["F", "F", 7, 2, 9, 5]  # newest first: failures are the newest here
    only_failures = screenshot(index, shots / "failures.png", width=width, evaluate=VISIBLE,
                               clicks=('label[for="show-failures"]',)).value
    assert [g for _, _, g in only_failures] == ["F", "F"]
    only_reports = screenshot(index, shots / "reports.png", width=width, evaluate=VISIBLE,
                              clicks=('label[for="show-reports"]',)).value
    assert sorted(g for _, _, g in only_reports) == [2, 5, 7, 9]
    best = screenshot(index, shots / "best.png", width=width, evaluate=VISIBLE, clicks=('label[for="sort-best"]',))
    assert _visual_order(best.value) == [9, 7, 5, 2, "F", "F"]
    worst = screenshot(index, shots / "worst.png", width=width, evaluate=VISIBLE,
                       clicks=('label[for="show-reports"]', 'label[for="sort-worst"]'))
    assert _visual_order(worst.value) == [2, 5, 7, 9]


# ------------------------------------------------------------------- a bounded share of each job (issue 11, item 9)


def _bare_report(outbox: Path, name: str) -> None:
    """All the index reads of a report folder: its report.json."""
    (outbox / name).mkdir()
    (outbox / name / "report.json").write_text(json.dumps({**sample_report(), "photo": {"file": f"{name}.jpg"}}))


def test_a_growing_outbox_is_refreshed_every_few_jobs_not_after_each_and_completely_on_flush(tmp_path):
    """A refresh renders every entry: after each of 200 jobs that would be 20,100 entries rendered (quadratic). Jobs
    say `changed()`; the index refreshes at once while it is small, then once the new jobs are a twentieth of it."""
    home = make_home(tmp_path / "home")
    cfg = load_config(home, env={})
    cfg.ensure_dirs()
    index = OutboxIndex(cfg)
    index.refresh()
    for i in range(200):
        _bare_report(cfg.outbox, f"IMG_{i:03d}")
        index.changed()
        if i < 20:
            assert len(cards(cfg.outbox)) == i + 1, "a small outbox is listed after every job"
    assert index.refreshes <= 80, f"{index.refreshes} refreshes for 200 jobs"
    assert 0 < index.pending < 200 // 20 and len(cards(cfg.outbox)) == 200 - index.pending
    index.flush()
    assert index.pending == 0 and len(cards(cfg.outbox)) == 200
    refreshes = index.refreshes
    index.flush()
    assert index.refreshes == refreshes, "nothing new: no refresh"


def test_the_jobs_of_a_run_are_all_listed_when_it_ends_however_large_the_outbox(tmp_path, smoke_model_path):
    """45 reports already there: the two new photos' refreshes are deferred (2 < 45 / 20), and the worker lists them
    when the queue runs dry (`run --once` ends then), as `mondrian analyze` does when it is done."""
    home = make_home(tmp_path / "home", smoke_model_path)
    outbox = home / "outbox"
    for i in range(45):
        _bare_report(outbox, f"OLD_{i:02d}")
    photo(home / "inbox" / "a.jpg", seed=1)
    photo(home / "inbox" / "b.jpg", seed=2)
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=240)
    assert out.returncode == 0, out.stderr
    assert {"a", "b"} <= set(cards(outbox)) and len(cards(outbox)) == 47
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    photo(elsewhere / "c.jpg", seed=3)
    photo(elsewhere / "d.jpg", seed=4)
    out = mondrian(home, smoke_model_path, "analyze", str(elsewhere), timeout=240)
    assert out.returncode == 0, out.stderr
    assert {"c", "d"} <= set(cards(outbox)) and len(cards(outbox)) == 49


def test_a_report_folder_deleted_while_the_daemon_idles_leaves_the_index_at_the_next_rescan(tmp_path,
                                                                                           smoke_model_path):
    """The photographer deletes a report folder (or renames it) while the inbox is empty: the index kept its card, a
    dead link, until the next photo came, which may be days. The daemon's periodic rescan now notices."""
    from tests.harness import Daemon, wait_for

    home = make_home(tmp_path / "home", smoke_model_path, rescan_seconds=1, quiet_seconds=0.2, api_port=0)
    for name, seed in (("keep.jpg", 1), ("bin.jpg", 2)):
        photo(home / "inbox" / name, seed=seed, size=(64, 48))
    index = home / "outbox" / "index.html"
    with Daemon(home, smoke_model_path) as d:
        wait_for(lambda: index.exists() and 'href="bin/report.html"' in index.read_text()
                 and 'href="keep/report.html"' in index.read_text(), 120, what="both reports on the index")
        shutil.rmtree(home / "outbox" / "bin")
        os.rename(home / "outbox" / "keep", home / "outbox" / "keep-best")
        wait_for(lambda: 'href="bin/report.html"' not in index.read_text(), 30, what="the deleted report gone")
        text = index.read_text()
        assert 'href="keep-best/report.html"' in text and 'href="keep/report.html"' not in text, text[-2000:]
        assert d.stop() == 0, d.output()
