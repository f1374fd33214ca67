"""`mondrian analyze` over several photos (issue 13): `--json` lines, `--adapter VERSION`, and the one progress bar
style of the long commands (analyze, references index) on a real terminal, silent into a pipe."""

from __future__ import annotations

import json
import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import ledger_jobs, make_home, mondrian, photo
from tests.terminal_run import in_terminal, torn_lines


def test_analyze_adapter_uses_that_version_and_an_unknown_one_lists_the_versions(tmp_path, smoke_model_path):
    import mlx_vlm

    from daemon.config import load_config
    from tests.lora_helpers import install_version, random_adapter

    home = make_home(tmp_path / "home", smoke_model_path, embeddings_enabled=False)
    cfg = load_config(home, env={}, model=str(smoke_model_path))
    model, _ = mlx_vlm.load(str(smoke_model_path))
    for seed in (1, 2):  # v0001, then v0002, which becomes current
        install_version(cfg, "ansel", random_adapter(tmp_path / f"a{seed}", model, seed=seed),
                        model_path=smoke_model_path)
    pics = [photo(tmp_path / "elsewhere" / f"p{i}.jpg", seed=i, size=(64, 48)) for i in range(2)]

    out = mondrian(home, smoke_model_path, "analyze", *map(str, pics), "--adapter", "v1", "--json")
    assert out.returncode == 0, out.stderr
    jobs = [json.loads(line) for line in out.stdout.splitlines()]  # one object a line, one line a photo
    assert [Path(j["source_path"]).name for j in jobs] == ["p0.jpg", "p1.jpg"]
    assert all((j["state"], j["effective_mode"], j["adapter"]) == ("done", "lora", "ansel/v0001") for j in jobs), jobs
    assert all(j["summary"] is not None and j["grade"] is not None for j in jobs)
    report = json.loads(Path(jobs[0]["report_json"]).read_text())
    assert report["model"]["adapter"] == "ansel/v0001" and report["mode"]["fallbacks"] == []

    current = json.loads(mondrian(home, smoke_model_path, "analyze", str(pics[0]), "--mode", "lora", "--json").stdout)
    assert current["adapter"] == "ansel/v0002"  # without --adapter: the current one

    before = len(ledger_jobs(home))
    out = mondrian(home, smoke_model_path, "analyze", str(pics[0]), "--adapter", "v0009")
    assert out.returncode == 2, out.stderr
    assert "no usable adapter version 'v0009'" in out.stderr and "v0001, v0002 (current)" in out.stderr, out.stderr
    out = mondrian(home, smoke_model_path, "analyze", str(pics[0]), "--adapter", "v1", "--mode", "rag")
    assert out.returncode == 2 and "--mode lora" in out.stderr, out.stderr
    out = mondrian(home, smoke_model_path, "analyze", str(pics[0]), "--adapter", "v1", "--advisor", "cartier")
    assert out.returncode == 2 and "cartier has no usable adapter version" in out.stderr, out.stderr
    # Asked for by name, a version cut short or trained for another base model is refused, not replaced by rag
    v1 = home / "adapters" / "ansel" / "v0001"
    manifest = json.loads((v1 / "manifest.json").read_text())
    manifest["base_model"] = {**(manifest.get("base_model") or {}), "fingerprint": "another", "spec": "other-2B"}
    (v1 / "manifest.json").write_text(json.dumps(manifest))
    out = mondrian(home, smoke_model_path, "analyze", str(pics[0]), "--adapter", "v1")
    assert out.returncode == 2 and "v0001 (trained for base model other-2B)" in out.stderr, out.stderr
    weights = home / "adapters" / "ansel" / "v0002" / "adapters.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    out = mondrian(home, smoke_model_path, "analyze", str(pics[0]), "--adapter", "v2")
    assert out.returncode == 2 and "no usable adapter version 'v2'" in out.stderr, out.stderr
    assert len(ledger_jobs(home)) == before, "a refused --adapter created a job"


def test_long_commands_draw_one_bar_style_on_a_terminal_without_tearing_log_lines(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    album = tmp_path / "album"
    for i in range(3):
        photo(album / f"p{i}.jpg", seed=i, size=(64, 48))
    refs = home / "advisors" / "ansel" / "references"
    for i in range(2):
        photo(refs / f"r{i}.jpg", seed=10 + i, size=(64, 48))
        old = time.time() - 120
        os.utime(refs / f"r{i}.jpg", (old, old))

    rc, out = in_terminal(home, smoke_model_path, "analyze", str(album), timeout=300)
    assert rc == 0, out
    assert re.search(r"3/3 \|█+\|", out), out  # the bar, finished
    assert "loading model" in out, out  # the model load is part of the progress
    assert " INFO " in out and torn_lines(out) == [], torn_lines(out)
    assert out.count("/10  ") == 3, out

    rc, refs_out = in_terminal(home, smoke_model_path, "references", "index", timeout=300)
    assert rc == 0, refs_out
    assert re.search(r"2/2 \|█+\|", refs_out) and torn_lines(refs_out) == [], refs_out

    piped = mondrian(home, smoke_model_path, "analyze", str(album), timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert "█" not in piped.stderr and "\r" not in piped.stderr, piped.stderr  # not a terminal: no bar at all
    assert "3 of 3 photo(s) analysed" in piped.stderr
    # The grades printed come from the smoke model: said once (on stderr), as each of its reports says it.
    assert piped.stderr.count("note: These scores come from Mondrian's smoke model") == 1, piped.stderr
    assert len(piped.stdout.splitlines()) == 6, piped.stdout  # a grade line and a report line a photo, for scripts
    lines = mondrian(home, smoke_model_path, "analyze", str(album), "--json", timeout=300).stdout.splitlines()
    assert [json.loads(line)["notice"].startswith("These scores come from") for line in lines] == [True] * 3, lines


def test_train_shows_steps_and_each_evaluation_as_bars_on_a_terminal(tmp_path, smoke_model_path):
    from daemon.config import load_config
    from tests.lora_helpers import index_references, synthetic_advisor

    home = make_home(tmp_path / "home", smoke_model_path, embeddings_enabled=False, comment_max_chars=16)
    synthetic_advisor(home, "synth", n=6, comment="Ok.")
    index_references(load_config(home, env={}, model=str(smoke_model_path)), ["synth"]).close()
    with open(home / "mondrian.toml", "a") as fh:
        fh.write('\n[lora]\niters = 6\neval_every = 3\nvariants = 0\nholdout_fraction = 0.34\nbatch_size = 2\n')

    rc, out = in_terminal(home, smoke_model_path, "train", "--advisor", "synth", timeout=400)
    assert rc in (0, 3), out  # promoted, or trained and evaluated but not promoted: both ran every stage
    assert re.search(r"step 6/6 \|█+\|", out), out
    assert re.search(r"evaluating candidate: (\d+)/\1 \|█+\|", out), out
    assert re.search(r"evaluating base: (\d+)/\1 \|█+\|", out), out
    assert torn_lines(out) == [], torn_lines(out)


def test_analyze_of_the_outbox_critiques_the_originals_not_the_images_mondrian_wrote_beside_them(
        tmp_path, smoke_model_path):
    """Re-critiquing earlier photos (say with another advisor) by naming the outbox or a report folder takes each
    report's original, never the preview, thumbnail or reference images of the report itself."""
    home = make_home(tmp_path / "home", smoke_model_path, embeddings_enabled=False)
    photo(home / "inbox" / "a.jpg", seed=1)
    photo(home / "inbox" / "thumb.jpg", seed=2)  # its report folder holds it as thumb-original.jpg
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=180)
    assert out.returncode == 0, out.stderr
    outbox = home / "outbox"
    assert sorted(p.name for p in (outbox / "thumb").iterdir() if p.suffix == ".jpg") == [
        "preview.jpg", "thumb-original.jpg", "thumb.jpg"]

    out = mondrian(home, smoke_model_path, "analyze", str(home))
    assert out.returncode == 2, out
    assert "holds no photos" in out.stderr and "outbox/ and var/ inside it were left out" in out.stderr, out.stderr

    out = mondrian(home, smoke_model_path, "analyze", str(outbox / "a"), "--advisor", "cartier", "--json",
                   timeout=180)
    assert out.returncode == 0, out.stderr
    jobs = [json.loads(line) for line in out.stdout.splitlines()]
    assert [Path(j["source_path"]).relative_to(outbox).as_posix() for j in jobs] == ["a/a.jpg"], jobs

    out = mondrian(home, smoke_model_path, "analyze", str(outbox), "--json", timeout=300)
    assert out.returncode == 0, out.stderr
    names = sorted(Path(json.loads(line)["source_path"]).name for line in out.stdout.splitlines())
    assert names == ["a.jpg", "a.jpg", "thumb-original.jpg"], names  # a/, the cartier copy's folder, thumb/


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS refuses file names that are not UTF-8")
def test_analyze_names_a_photo_whose_name_is_not_utf8_before_analysing_anything(tmp_path, smoke_model_path):
    """A photo copied from an old Windows or Linux system named in Latin-1 (`No\\xebl.jpg`), among others in a folder
    given to `analyze`: it crashed halfway (the ledger records names as text), and the photos after it were never
    analysed. It is named with a rename that works, before anything runs; renamed, the command goes through."""
    home = make_home(tmp_path / "home", smoke_model_path, max_pixels=56 * 56, comment_max_chars=8, max_tokens=400)
    shoot = tmp_path / "shoot"
    photo(shoot / "a.jpg", seed=1, size=(64, 48))
    bad = os.fsdecode(bytes(shoot) + b"/No\xebl.jpg")
    photo(Path(bad), seed=2, size=(64, 48))
    photo(shoot / "z.jpg", seed=3, size=(64, 48))
    for given in (str(shoot), bad):
        out = mondrian(home, smoke_model_path, "analyze", given, timeout=120)
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
        assert "is not valid UTF-8" in out.stderr and "nothing was analysed" in out.stderr, out.stderr
    assert ledger_jobs(home) == {}
    [mv] = re.findall(r"`(mv [^`]+)`", out.stderr)
    assert subprocess.run(["bash", "-c", mv], capture_output=True).returncode == 0
    out = mondrian(home, smoke_model_path, "analyze", str(shoot), timeout=300)
    assert out.returncode == 0, out.stderr
    assert sorted(ledger_jobs(home)) == ["No_ebl.jpg", "a.jpg", "z.jpg"], ledger_jobs(home)


def test_a_photo_exported_again_while_analyze_runs_is_not_filed_beside_the_old_critique(tmp_path, smoke_model_path):
    """Attack: a photo re-exported (written anew) while `mondrian analyze` ran on it: the report of the old bytes was
    filed with a copy of the new ones beside it, its report.json naming the old hash. The report is withdrawn and
    the photo named as changed, with the command to run again."""
    from tests.harness import env_for

    home = make_home(tmp_path / "home", smoke_model_path)
    shot = photo(tmp_path / "shoot" / "z.jpg", seed=1, size=(64, 48))
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "analyze", str(shot)], cwd=Path(__file__).parents[1],
                            env=env_for(home, smoke_model_path, MONDRIAN_TEST_TOKEN_SECONDS="0.2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120

    def running() -> bool:
        try:
            return ledger_jobs(home)["z.jpg"].state == "running"
        except Exception:  # no ledger, or no job in it yet
            return False

    while time.monotonic() < deadline and not running():
        time.sleep(0.1)
    time.sleep(1)  # the photo read: it is being analysed, a pass every 200 ms
    new = tmp_path / "new.jpg"
    photo(new, seed=2, size=(64, 48))
    os.replace(new, shot)  # exported again: a new file under the same name
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, (out, err)
    assert "changed or went while it was analysed" in err and "analyze" in err, err
    assert not list((home / "outbox").glob("z*/report.json")), list((home / "outbox").iterdir())


def test_analyze_of_an_inbox_photo_the_daemon_filed_first_names_the_daemons_report(tmp_path, smoke_model_path):
    """Attack: `mondrian analyze inbox/p.jpg` while the daemon analyses that photo: the daemon filed it before
    `analyze` read it, and `analyze` said it was "removed from the inbox before it was analysed", as if it were lost.
    It names the daemon's report now."""
    from tests.harness import Daemon, env_for, wait_for

    home = make_home(tmp_path / "home", smoke_model_path)
    shot = photo(home / "inbox" / "p.jpg", seed=1, size=(64, 48))

    def held(pid: int) -> bool:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "T"

    with Daemon(home, smoke_model_path, MONDRIAN_TEST_STOP_AT="analysing") as d:
        assert wait_for(lambda: held(d.proc.pid), 120)  # the daemon has the photo in hand
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "analyze", str(shot)], cwd=Path(__file__).parents[1],
                                env=env_for(home, smoke_model_path, MONDRIAN_TEST_STOP_AT="preparing"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert wait_for(lambda: proc.poll() is not None or held(proc.pid), 120)  # its job recorded, photo unread
            os.kill(d.proc.pid, signal.SIGCONT)
            assert wait_for(lambda: _states(home) == ["done", "running"], 120), _states(home)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
        assert d.stop() == 0, d.output()
    assert proc.returncode == 1, (out, err)
    assert "the daemon analysed it first" in err and str(home / "outbox" / "p" / "report.html") in err, err
    assert "removed from the inbox" not in err, err


def _states(home: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(home / "var" / "ledger.db")) as db:
        return sorted(state for (state,) in db.execute("SELECT state FROM job"))


def test_analyze_of_a_photo_removed_meanwhile_never_names_an_earlier_photos_report(tmp_path, smoke_model_path):
    """The daemon's report is named only for a job that had the file in hand while `analyze` ran: IMG_0001.JPG of an
    earlier card, critiqued last week, is another photo, and a photo deleted meanwhile is said to be removed."""
    from tests.harness import env_for, wait_for

    home = make_home(tmp_path / "home", smoke_model_path)
    photo(home / "inbox" / "p.jpg", seed=1, size=(64, 48))
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=180).returncode == 0  # last week's card
    shot = photo(home / "inbox" / "p.jpg", seed=2, size=(64, 48))  # this week's, same name
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "analyze", str(shot)], cwd=Path(__file__).parents[1],
                            env=env_for(home, smoke_model_path, MONDRIAN_TEST_STOP_AT="preparing"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: proc.poll() is not None or
                        Path(f"/proc/{proc.pid}/stat").read_text().split(")")[1].split()[0] == "T", 120)
        shot.unlink()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, (out, err)
    assert "removed from the inbox" in err and "the daemon" not in err, err


def test_analyze_of_a_folder_takes_the_photos_the_daemon_takes(tmp_path, smoke_model_path):
    """Attack: a folder holding `trail.jpg ` (a trailing space a Mac allows) and `web.jfif` (a browser's JPEG): the
    daemon critiqued both, `analyze FOLDER` said the folder "holds no photos". Both are analysed now, and the report
    page links the .jfif original as it links a .jpg. A JPEG named `x.jpg_large` is known by its first bytes."""
    home = make_home(tmp_path / "home", smoke_model_path)
    shoot = tmp_path / "shoot"
    photo(shoot / "trail.jpg ", seed=1, size=(64, 48), fmt="JPEG")
    photo(shoot / "web.jfif", seed=2, size=(64, 48), fmt="JPEG")
    photo(shoot / "tweet.jpg_large", seed=3, size=(64, 48), fmt="JPEG")  # as Twitter saves it: known by its bytes
    (shoot / "notes.txt").write_text("shot at dawn")  # no photo: left out, as are sidecars
    (shoot / "trail.mode").write_text("baseline")
    out = mondrian(home, smoke_model_path, "analyze", str(shoot), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "3 of 3 photo(s) analysed" in out.stderr, out.stderr[-2000:]
    assert (home / "outbox" / "tweet" / "report.json").exists(), sorted(p.name for p in (home / "outbox").iterdir())
    page = (home / "outbox" / "web" / "report.html").read_text()
    assert 'href="web.jfif"' in page, page[:3000]
