"""The whole path with real parts: the daemon subprocess, a real watchdog observer on real folders,
the smoke Qwen2-VL model through mlx_vlm.load, real SQLite, reports checked against the committed schema."""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from pathlib import Path

import jsonschema
import pytest

from daemon.pipeline.report import SCHEMA_PATH
from tests.harness import Daemon, make_home, mondrian, photo, reports, status, terminal_count, wait_for

SCHEMA = json.loads(SCHEMA_PATH.read_text())


def _report(folder: Path) -> dict:
    data = json.loads((folder / "report.json").read_text())
    jsonschema.validate(data, SCHEMA)
    return data


def test_inbox_to_outbox(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    photo(inbox / "IMG_1.jpg", seed=1)
    shutil.copyfile(inbox / "IMG_1.jpg", tmp_path / "copy.jpg")
    photo(inbox / "cartier" / "street.jpg", seed=2)
    photo(inbox / "Holiday 2026" / "beach.png", seed=3, fmt="PNG")
    photo(inbox / "asked_lora.jpg", seed=4)
    (inbox / "asked_lora.mode").write_text("  LoRA \n")
    photo(inbox / "bad_mode.jpg", seed=5)
    (inbox / "bad_mode.mode").write_text("fast")
    photo(inbox / "empty_mode.jpg", seed=6)
    (inbox / "empty_mode.mode").write_text("   \n")
    good = (inbox / "IMG_1.jpg").read_bytes()
    (inbox / "truncated.jpg").write_bytes(photo(tmp_path / "t.jpg", seed=7).read_bytes()[:400])
    (inbox / "notes.jpg").write_text("this is a shopping list, not a photo")
    (inbox / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (inbox / "download.jpg.crdownload").write_bytes(good[:100])

    with Daemon(home, smoke_model_path) as d:
        # a late sidecar: it lands after its photo but before the photo is stable, and still applies
        photo(inbox / "late.jpg", seed=8)
        time.sleep(0.15)
        (inbox / "late.mode").write_text("rag")
        # the same content again, under another name, once the first is done
        wait_for(lambda: (outbox / "IMG_1" / "report.json").exists(), 120, what="IMG_1 report")
        shutil.copyfile(tmp_path / "copy.jpg", inbox / "IMG_1 copy.jpg")
        info = wait_for(lambda: (lambda s: s if terminal_count(s) >= 10 and not s["counts"]["queued"]
                                 and not s["counts"]["running"] else None)(status(home, smoke_model_path)),
                        180, what="all photos finished")
        assert d.proc.poll() is None, d.output()

    # exactly where the issue says each one ends
    r1 = _report(outbox / "IMG_1")
    assert (outbox / "IMG_1" / "IMG_1.jpg").read_bytes() == good
    assert (outbox / "IMG_1" / "report.html").exists()
    assert r1["advisor"]["id"] == "ansel" and r1["model"]["smoke"] is True and "not meaningful" in r1["model"]["notice"]
    assert r1["mode"] == {"requested": "baseline", "effective": "baseline", "source": "default", "fallbacks": []}
    assert _report(outbox / "street")["advisor"] == {"id": "cartier", "name": "Henri Cartier-Bresson"}
    assert _report(outbox / "beach")["advisor"]["id"] == "ansel"
    lora = _report(outbox / "asked_lora")
    assert (lora["mode"]["requested"], lora["mode"]["effective"], lora["mode"]["source"]) == ("lora", "baseline", "sidecar")
    assert [(f["from"], f["to"]) for f in lora["mode"]["fallbacks"]] == [("lora", "rag"), ("rag", "baseline")]
    assert all(f["reason"] for f in lora["mode"]["fallbacks"])
    assert (outbox / "asked_lora" / "asked_lora.mode").exists()  # the sidecar travels with its photo
    late = _report(outbox / "late")
    assert (late["mode"]["requested"], late["mode"]["source"]) == ("rag", "sidecar")

    failed = outbox / "failed"
    reasons = {p.name.removesuffix(".error.json"): json.loads(p.read_text())["reason"]
               for p in failed.glob("*.error.json")}
    assert set(reasons) == {"bad_mode.jpg", "empty_mode.jpg", "truncated.jpg", "notes.jpg"}, reasons
    assert "bad_mode.mode" in reasons["bad_mode.jpg"] and "baseline, rag, lora" in reasons["bad_mode.jpg"]
    assert "empty_mode.mode" in reasons["empty_mode.jpg"] and "empty" in reasons["empty_mode.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "not a photo" in reasons["notes.jpg"]
    for name in reasons:
        assert (failed / name).exists(), f"original of {name} kept in failed/"

    # the duplicate points at the first report instead of being analysed again
    dup = json.loads((outbox / "duplicates" / "IMG_1 copy.jpg.duplicate.json").read_text())
    assert dup["duplicate_of_job"] == r1["job_id"]
    assert len(reports(outbox)) == 5

    # hidden and temporary names are left alone; everything else has left the inbox
    left = sorted(p.name for p in inbox.rglob("*") if p.is_file())
    assert left == [".DS_Store", "download.jpg.crdownload"]

    # status agrees with the folders
    assert info["counts"]["done"] == 6 and info["duplicates"] == 1 and info["counts"]["failed"] == 4
    assert {f["file"] for f in info["recent_failures"]} >= {"truncated.jpg", "notes.jpg"}
    text = mondrian(home, smoke_model_path, "status").stdout
    assert "6 done" in text and "4 failed" in text and "NOT meaningful" in text
    index = (outbox / "index.html").read_text()
    for name in ("IMG_1", "street", "beach", "asked_lora", "late"):
        assert f'href="{name}/report.html"' in index


def test_run_once_and_name_collisions(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    photo(home / "inbox" / "IMG_1.jpg", seed=1)
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=180)
    assert out.returncode == 0, out.stderr
    # As if the first report had come from the real model: the index marks each entry by its own report.
    first_json = home / "outbox" / "IMG_1" / "report.json"
    data = json.loads(first_json.read_text())
    data["model"]["smoke"] = False
    first_json.write_text(json.dumps(data))
    photo(home / "inbox" / "IMG_1.jpg", seed=2)  # another photo with a name already taken in the outbox
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=180)
    assert out.returncode == 0, out.stderr
    first, second = _report(home / "outbox" / "IMG_1"), _report(home / "outbox" / "IMG_1-2")
    assert first["photo"]["sha256"] != second["photo"]["sha256"]
    assert (home / "outbox" / "IMG_1-2" / "IMG_1.jpg").exists()
    cards = {m.group(1): m.group(0) for m in re.finditer(r'<li class="card report[^"]*" data-folder="([^"]+)"[^>]*>',
                                                         (home / "outbox" / "index.html").read_text())}
    assert set(cards) == {"IMG_1", "IMG_1-2"}
    assert 'data-smoke="true"' in cards["IMG_1-2"] and "data-smoke" not in cards["IMG_1"]


def test_killed_mid_job_is_finished_once_after_restart(tmp_path, smoke_model_path):
    # Bigger images and longer comments make each analysis take long enough to be caught in the act.
    home = make_home(tmp_path / "home", smoke_model_path, max_pixels=448 * 448, comment_max_chars=160,
                     max_tokens=2000)
    for i in range(3):
        photo(home / "inbox" / f"slow_{i}.jpg", seed=10 + i, size=(640, 480))
    with Daemon(home, smoke_model_path) as d:
        running = wait_for(lambda: status(home, smoke_model_path)["running"], 120, interval=0.05,
                           what="a job in progress")
        d.proc.send_signal(signal.SIGKILL)
        d.wait()
    victim = running[0]["file"]
    with Daemon(home, smoke_model_path, "--once") as d:
        assert d.wait(300) == 0, d.output()
        assert "recovered 1 photo" in d.output()
    done = reports(home / "outbox")
    assert sorted(p.parent.name for p in done) == ["slow_0", "slow_1", "slow_2"]
    assert all(_report(p.parent) for p in done)
    assert not list((home / "outbox" / ".staging").iterdir())
    info = status(home, smoke_model_path)
    assert info["counts"]["done"] == 3 and info["counts"]["queued"] == 0 and info["counts"]["running"] == 0
    assert victim in {p.parent.name + ".jpg" for p in done}


def test_analyze_command(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    src = photo(tmp_path / "elsewhere" / "portrait.jpg", seed=3)
    out = mondrian(home, smoke_model_path, "analyze", str(src), "--mode", "lora", "--advisor", "leibovitz")
    assert out.returncode == 0, out.stderr
    grade_line, path_line = out.stdout.strip().splitlines()  # grade and summary, then where the report is
    assert grade_line.split("/10  ")[1].startswith(str(src) + ": "), grade_line
    html = Path(path_line.strip())
    assert html.name == "report.html" and html.exists()
    rep = _report(html.parent)
    assert rep["advisor"]["id"] == "leibovitz" and rep["mode"]["source"] == "command"
    assert rep["mode"]["effective"] == "baseline" and len(rep["mode"]["fallbacks"]) == 2
    assert src.exists(), "analyze leaves the photo where it is"
    out = mondrian(home, smoke_model_path, "analyze", str(src), "--advisor", "nobody", "--json")
    assert out.returncode == 2  # checked before any job is made (tests/test_ownership.py)
    assert "unknown advisor 'nobody'" in out.stderr and "ansel" in out.stderr


def test_same_photo_analysed_twice_gives_the_same_report(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    src = photo(tmp_path / "p.jpg", seed=9)
    a = _report(Path(mondrian(home, smoke_model_path, "analyze", str(src)).stdout.split()[-1]).parent)
    b = _report(Path(mondrian(home, smoke_model_path, "analyze", str(src)).stdout.split()[-1]).parent)
    assert a["dimensions"] == b["dimensions"] and a["overall_grade"] == b["overall_grade"]


def test_missing_model_is_a_clear_fatal_error(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    photo(home / "inbox" / "a.jpg")
    out = mondrian(home, tmp_path / "no-such-model", "run", "--once", timeout=60)
    assert out.returncode == 78
    assert "MONDRIAN_MODEL" in out.stderr or "smoke" in out.stderr
    assert (home / "inbox" / "a.jpg").exists(), "nothing is lost when the model is missing"


def test_daemon_pages_render_offline_in_chromium(tmp_path, smoke_model_path):
    from tests.browser import render, require_browser, urls_outside

    require_browser()
    home = make_home(tmp_path / "home", smoke_model_path)
    photo(home / "inbox" / "IMG_1.jpg", seed=4)
    photo(home / "inbox" / "leibovitz" / "portrait.jpg", seed=5)
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0
    outbox = home / "outbox"
    rep = _report(outbox / "IMG_1")
    page = render((outbox / "IMG_1" / "report.html").as_uri(),
                  evaluate="() => [...document.querySelectorAll('[data-score]')]"
                           ".map(e => [e.dataset.dimension, Number(e.dataset.score)])")
    assert dict(page.value) == {d: v["score"] for d, v in rep["dimensions"].items()}
    assert "not meaningful" in page.dom and "Ansel Adams" in page.dom
    assert urls_outside(page.requests, outbox / "IMG_1") == []
    assert any(u.endswith("preview.jpg") for u in page.requests), "the photo itself is shown"
    index = render((outbox / "index.html").as_uri(),
                   evaluate="() => [...document.querySelectorAll('li[data-folder]')].map(e => e.dataset.folder)")
    assert sorted(index.value) == ["IMG_1", "portrait"]
    assert urls_outside(index.requests, outbox) == []
    assert str(home) not in (outbox / "IMG_1" / "report.html").read_text(), "no absolute paths in shared HTML"


def test_model_smoke_command_builds_a_loadable_checkpoint(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home")
    out = mondrian(home, smoke_model_path, "model", "smoke")
    assert out.returncode == 0, out.stderr
    built = Path(out.stdout.strip())
    assert built == home / "var" / "models" / "smoke-qwen2-vl"
    assert (built / "config.json").exists() and (built / "model.safetensors").exists()
    # same recipe, same seed: the same bytes as the session's model
    assert (built / "model.safetensors").read_bytes() == (smoke_model_path / "model.safetensors").read_bytes()
