"""Issue 3, promise 3: hostile and odd images. The real daemon (subprocess, real watchdog observer, smoke
Qwen2-VL through mlx_vlm) over a generated corpus of more than 300 files. It never crashes; every file ends
in exactly one terminal state with a reason; HEIC is analysed; upright sizes follow EXIF; duplicates point at
one report; hidden and temporary names are left alone. Prints how many files ended in each state."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import time
from pathlib import Path

import jsonschema

from daemon.ledger import Ledger
from daemon.pipeline.report import SCHEMA_PATH
from tests.corpus import build
from tests.harness import Daemon, make_home, status, wait_for

SCHEMA = json.loads(SCHEMA_PATH.read_text())
# Tiny images and two-word comments: each analysis is about a second on 2 CPU cores.
FAST = dict(max_pixels=56 * 56, comment_max_chars=8, max_tokens=400, quiet_seconds=0.3, rescan_seconds=2)


def test_hostile_corpus_every_file_ends_once_with_a_reason(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    inbox, outbox = home / "inbox", home / "outbox"
    items = build(inbox)
    by_name = {it.name: it for it in items}
    expected_jobs = [it for it in items if it.expect != "ignored"]
    assert len(items) >= 300, len(items)

    started = time.monotonic()
    with Daemon(home, smoke_model_path) as d:
        def finished():
            s = status(home, smoke_model_path)
            c = s["counts"]
            settled = c["done"] + c["failed"] + c["gone"] >= len(expected_jobs)
            return s if settled and not c["queued"] and not c["running"] else None

        info = wait_for(finished, 420, interval=1.0, what="every corpus file in a terminal state")
        assert d.proc.poll() is None, "the daemon crashed:\n" + d.output()[-4000:]
        assert d.stop() == 0
    elapsed = time.monotonic() - started
    log = d.output()
    assert "Traceback" not in log and "unexpected error" not in log, log[-6000:]

    ledger = Ledger(home / "var" / "ledger.db")
    rows = collections.defaultdict(list)
    for job in ledger.jobs():
        rows[job.rel_path].append(job)
    assert ledger.integrity_check() == "ok"

    outcome: dict[str, str] = {}
    reasons = collections.Counter()
    for it in items:
        jobs = rows.get(it.name, [])
        if it.expect == "ignored":
            assert not jobs, f"{it.name!r} should have been ignored"
            assert (inbox / it.name).read_bytes() == it.data, f"{it.name!r} was touched"
            outcome[it.name] = "ignored"
            continue
        assert len(jobs) == 1, f"{it.name!r} has {len(jobs)} jobs"
        job = jobs[0]
        assert not (inbox / it.name).exists(), f"{it.name!r} is still in the inbox"
        if job.state == "failed":
            assert job.error, it.name
            record = json.loads(Path(f"{job.output_dir}.error.json").read_text())
            assert record["reason"] == job.error and record["file"] == Path(it.name).name
            assert Path(job.output_dir).read_bytes() == it.data, f"original of {it.name!r} not kept in failed/"
            reasons[job.error.split(";")[0].split("(")[0].strip()[:70]] += 1
            outcome[it.name] = "failed"
        elif job.state == "done" and job.duplicate_of:
            record = json.loads(Path(f"{job.output_dir}.duplicate.json").read_text())
            assert record["duplicate_of_job"] == job.duplicate_of
            assert Path(job.output_dir).read_bytes() == it.data
            outcome[it.name] = "duplicate"
        elif job.state == "done":
            folder = Path(job.output_dir)
            report = json.loads((folder / "report.json").read_text())
            jsonschema.validate(report, SCHEMA)
            assert report["photo"]["file"] == Path(it.name).name
            assert report["photo"]["sha256"] == hashlib.sha256(it.data).hexdigest()
            assert (folder / Path(it.name).name).read_bytes() == it.data, "original moved next to its report"
            for key in ("width", "height", "format"):
                if key in it.checks:
                    assert report["photo"][key] == it.checks[key], (it.name, key, report["photo"])
            outcome[it.name] = "done"
        else:
            raise AssertionError(f"{it.name!r} ended {job.state}: {job.error}")

    # what each kind of file was expected to do
    wrong = []
    for name, got in outcome.items():
        want = by_name[name].expect
        if want == "terminal":
            continue
        if want in ("done", "duplicate"):
            ok = got in ("done", "duplicate")  # whichever copy is claimed first is analysed, the other points at it
        else:
            ok = got == want
        if not ok:
            wrong.append((name, want, got, rows[name][0].error if rows.get(name) else None))
    assert not wrong, wrong

    # one report per distinct content: never analysed twice
    analysed = collections.Counter(hashlib.sha256(by_name[n].data).hexdigest()
                                   for n, got in outcome.items() if got == "done")
    assert all(v == 1 for v in analysed.values()), [k for k, v in analysed.items() if v > 1]
    good = {hashlib.sha256(it.data).hexdigest() for it in items if it.expect in ("done", "duplicate")}
    good |= {hashlib.sha256(by_name[n].data).hexdigest() for n, got in outcome.items()
             if by_name[n].expect == "terminal" and got == "done"}  # damaged JPEGs a decoder still reads
    assert set(analysed) == good  # every good photo analysed, exactly once
    heic = [n for n in outcome if by_name[n].kind == "heic"]
    assert heic and all(outcome[n] in ("done", "duplicate") for n in heic)

    states = collections.Counter(outcome.values())
    kinds = collections.Counter((by_name[n].kind, got) for n, got in outcome.items())
    print(f"\nhostile corpus: files={len(items)} " + " ".join(f"{k}={states[k]}" for k in
                                                          ("done", "duplicate", "failed", "ignored"))
          + f" crashed=0 elapsed={elapsed:.0f}s status_counts={info['counts']}")
    for (kind, got), n in sorted(kinds.items()):
        print(f"  {kind:28} {got:9} {n}")
    print("  failure reasons:")
    for reason, n in reasons.most_common():
        print(f"    {n:3}  {reason}")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its threads so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_report_folder_dropped_back_into_the_inbox_critiques_its_original_only(tmp_path, smoke_model_path):
    """Dragging a report folder into `inbox/cartier/` to hear another advisor: the original is critiqued again; the
    preview, thumbnail and pages Mondrian wrote are neither critiqued as photos nor failed as "not a photo", even
    when the copy brings report.json last, after the watcher has seen the preview."""
    import shutil

    from tests.harness import ledger_jobs, mondrian, photo

    from tests.test_editor_sidecars import THEIRS

    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    inbox, outbox = home / "inbox", home / "outbox"
    photo(inbox / "IMG_7.jpg", seed=7)
    (inbox / "IMG_7.xmp").write_bytes(THEIRS)  # the photographer's own, kept in the report as IMG_7.original.xmp
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0
    assert (outbox / "IMG_7" / "IMG_7.original.xmp").read_bytes() == THEIRS
    with Daemon(home, smoke_model_path) as daemon:
        wait_for(lambda: "watching" in daemon.output(), timeout=120, what="the daemon watching")
        copy = inbox / "cartier" / "IMG_7"
        copy.mkdir(parents=True)
        names = sorted(p.name for p in (outbox / "IMG_7").iterdir())
        for name in sorted(names, key=lambda n: n == "report.json"):  # report.json last
            shutil.copy2(outbox / "IMG_7" / name, copy / name)
            time.sleep(0.1)  # the watcher sees each file arrive, the preview before its report.json
        (inbox / "notmine").mkdir()  # a folder of the user's that happens to use the same names: photos as usual
        photo(inbox / "notmine" / "preview.jpg", seed=8)
        (inbox / "notmine" / "report.json").write_text('{"title": "my notes"}')
        wait_for(lambda: len(ledger_jobs(home)) >= 4 and status(home, smoke_model_path)["counts"]["queued"] == 0
                 and status(home, smoke_model_path)["counts"]["running"] == 0, timeout=120, what="the copies done")
        # A rescan or two: nothing else turns up, and the daemon is idle with the old report's files in the inbox
        # (reading one to know it for a report made two inotify events, which made it read it again: a full core).
        before = _cpu_seconds(daemon.proc.pid)
        time.sleep(2 * FAST["rescan_seconds"])
        busy = _cpu_seconds(daemon.proc.pid) - before
        assert busy < FAST["rescan_seconds"] / 2, f"{busy:.2f} s of CPU in {2 * FAST['rescan_seconds']} s idle"
        assert daemon.stop() == 0
    jobs = {rel: (j.state, j.advisor) for rel, j in ledger_jobs(home).items()}
    assert jobs == {"IMG_7.jpg": ("done", "ansel"), "cartier/IMG_7/IMG_7.jpg": ("done", "cartier"),
                    "notmine/preview.jpg": ("done", "ansel"), "notmine/report.json": ("failed", "ansel")}, jobs
    left = sorted(p.name for p in copy.iterdir())
    # the old report's own files, its XMP among them: Mondrian's, not the photographer's (that one went on with the
    # photo, under its own name, and no stray sidecar is left)
    assert left == ["IMG_7.xmp", "preview.jpg", "report.html", "report.json", "thumb.jpg"], left
    again = next(p.parent for p in outbox.glob("*/report.json") if p.parent.name != "IMG_7"
                 and json.loads(p.read_text())["advisor"]["id"] == "cartier")
    assert (again / "IMG_7.original.xmp").read_bytes() == THEIRS, sorted(p.name for p in again.iterdir())
    from daemon.intake.inbox import stray_sidecars

    assert stray_sidecars(inbox, older_than_s=-1) == [], "the old report's XMP is no stray sidecar of the user's"
