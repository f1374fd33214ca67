"""`mondrian demo` shows all three modes: the real command, in a temporary home, once (and once again)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from daemon.references.sidecar import parse_sidecar
from tests.harness import REPO, env_for, make_home, mondrian, photo, reports, wait_for


def _by_photo(outbox: Path) -> dict[str, dict]:
    out = {}
    for path in reports(outbox):
        report = json.loads(path.read_text())
        out.setdefault(report["photo"]["file"], report)
    return out


def test_the_demo_shows_baseline_rag_and_lora_and_runs_again(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home")  # the fast test settings: small photos, short comments
    out = mondrian(home, smoke_model_path, "demo", "--model", str(smoke_model_path), timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "without the quality gate" in out.stderr

    # A sample portfolio with curator sidecars in the README's format, indexed.
    portfolio = home / "advisors" / "ansel" / "references" / "mondrian-demo"
    sidecars = sorted(portfolio.glob("*.json"))
    assert len(sidecars) == 5 and all(parse_sidecar(json.loads(p.read_text()))[0] for p in sidecars)

    # One report per mode, each really served by that mode.
    got = _by_photo(home / "outbox")
    modes = {name: (r["mode"]["requested"], r["mode"]["effective"]) for name, r in got.items()}
    assert set(modes.values()) == {("baseline", "baseline"), ("rag", "rag"), ("lora", "lora")}, modes
    rag = next(r for r in got.values() if r["mode"]["effective"] == "rag")
    # The rag photo is itself one of the five references: it is compared with the other four, never with itself
    assert rag["references"] and rag["portfolio"]["count"] == 4
    assert rag["photo"]["file"] not in {Path(r["name"]).name for r in rag["references"]}
    lora = next(r for r in got.values() if r["mode"]["effective"] == "lora")
    assert lora["model"]["adapter"] == "ansel/v0001"
    metrics = json.loads((home / "adapters" / "ansel" / "v0001" / "metrics.json").read_text())
    assert metrics["decision"]["promoted"] and "without the quality gate" in metrics["decision"]["reason"]
    index = (home / "outbox" / "index.html").read_text()
    assert 'data-mode="rag"' in index and 'data-mode="lora"' in index and "ansel/v0001" in index
    assert 'data-mode="baseline"' in index

    # Again, in the same home: nothing set up twice, the adapter used as it is, and it still ends well.
    before = {p.name: p.stat().st_mtime_ns for p in portfolio.iterdir()}
    again = mondrian(home, smoke_model_path, "demo", "--model", str(smoke_model_path), timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "used as it is" in again.stderr and "already in place" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in portfolio.iterdir()} == before
    assert sorted(p.name for p in (home / "adapters" / "ansel").iterdir() if p.name.startswith("v")) == ["v0001"]
    assert "lora" in again.stdout and "ansel/v0001" in again.stdout


def test_the_demo_never_mixes_its_samples_into_a_portfolio_of_the_users_own(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home")
    mine = home / "advisors" / "ansel" / "references" / "mine.jpg"
    mine.parent.mkdir(parents=True)
    mine.write_bytes((Path(__file__).resolve().parent.parent / "samples" / "camera.jpg").read_bytes())
    out = mondrian(home, smoke_model_path, "demo", "--model", str(smoke_model_path), timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "does not mix its samples" in out.stderr
    assert sorted(p.name for p in mine.parent.iterdir()) == ["mine.jpg"]  # nothing added beside the user's own
    assert not (home / "adapters" / "ansel").exists() or not any((home / "adapters" / "ansel").glob("v*"))
    assert len(reports(home / "outbox")) == 5  # the samples are still analysed, each saying which mode it got


def test_demo_serve_keeps_its_daemon_up_for_the_seeds_api_check(tmp_path, smoke_model_path):
    """`mondrian demo --serve`: after the demo the daemon stays up, and the seed's own fallback check (its curl
    command, verbatim but for the port) names lora, the mode the demo's adapter serves. SIGTERM ends it with 0."""
    from tests.test_api import SEED_PORT, curl, free_port, run_seed

    port = free_port(SEED_PORT)
    home = make_home(tmp_path / "home", api_port=port)
    work = tmp_path / "work"
    photo(work / "x.jpg", seed=7)
    log = (tmp_path / "demo.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "demo", "--serve", "--model", str(smoke_model_path)],
                            env=env_for(home, smoke_model_path), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        def serving() -> bool:
            assert proc.poll() is None, (tmp_path / "demo.log").read_text()
            try:
                code, _, body = curl(f"http://127.0.0.1:{port}/health", timeout=10)
                return code == 200 and json.loads(body)["model"]["loaded"]
            except (AssertionError, OSError, ValueError, subprocess.SubprocessError):
                return False
        wait_for(serving, timeout=900, what="the demo's daemon to serve the API")
        out = run_seed("### Mode fallback occurring", work, port)
        assert out.stdout.strip() == "< X-Analysis-Mode: lora", out.stdout + out.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "demo.log").read_text()
    assert "Serving the inbox and the /analyze API" in text


def test_demo_serve_with_its_port_taken_says_so_before_the_demo(tmp_path, smoke_model_path):
    """It ran the whole demo (a minute, more on a first run), printed "Serving ... try: curl", then exited 78."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        home = make_home(tmp_path / "home", api_port=port)
        out = mondrian(home, smoke_model_path, "demo", "--serve", "--model", str(smoke_model_path), timeout=300)
    assert out.returncode == 78 and "Traceback" not in out.stderr, out.stderr
    assert f"--serve: the API port 127.0.0.1:{port} is taken by another program" in out.stderr, out.stderr
    assert "Serving" not in out.stdout + out.stderr and reports(home / "outbox") == [], out.stdout


def test_ctrl_c_in_the_demo_says_what_is_left_and_running_it_again_finishes(tmp_path, smoke_model_path):
    """Ctrl-C while the demo's photos were analysed printed "not analysed" five times and exited 0, its samples left
    in the inbox unexplained. It says the demo stopped, what waits where, exits 130, and a second run finishes."""
    home = make_home(tmp_path / "home")
    demo = subprocess.Popen([sys.executable, "-m", "daemon", "demo", "--model", str(smoke_model_path)], cwd=REPO,
                            env=env_for(home, smoke_model_path, MONDRIAN_TEST_STOP_AT="analysing"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def held() -> bool:  # stopped by the hook as its first photo is about to be analysed
            with open(f"/proc/{demo.pid}/stat") as fh:
                return fh.read().rsplit(")", 1)[1].split()[0] == "T"
        wait_for(held, 600, what="the demo's daemon at its first photo")
        demo.send_signal(signal.SIGINT)
        demo.send_signal(signal.SIGCONT)
        out, err = demo.communicate(timeout=120)
    finally:
        demo.kill()
    assert demo.returncode == 130, out + err
    assert "The demo was stopped before it finished" in err and "demo` again" in err, err
    again = mondrian(home, smoke_model_path, "demo", "--model", str(smoke_model_path), timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert not [p for p in (home / "inbox").iterdir() if p.suffix.lower() == ".jpg"]
    # The samples that waited are the ones critiqued: not five more copies beside them, filed as duplicates.
    assert not list((home / "outbox").glob("duplicates/*")), again.stdout
    assert not [r for r in reports(home / "outbox") if r.parent.name.endswith("-2")], again.stdout
    assert "not analysed yet" not in again.stdout and "same as an earlier" not in again.stdout, again.stdout
    assert again.stdout.count(" grade ") == 5, again.stdout


def test_ctrl_c_before_the_demo_queues_its_photos_says_so_and_leaves_nothing_half_made(tmp_path, smoke_model_path):
    """Ctrl-C while the demo trains its adapter (before any sample photo is queued): it says where it stopped, exits
    130, queues nothing and makes no adapter current; the references it indexed stay indexed."""
    import threading

    home = make_home(tmp_path / "home")
    # SIGINT as a terminal leaves it: a suite started in the background (`cmd &`, CI) runs with SIGINT ignored, which
    # every child inherits, and Python then never turns it into KeyboardInterrupt.
    demo = subprocess.Popen([sys.executable, "-u", "-m", "daemon", "demo", "--model", str(smoke_model_path)],
                            cwd=REPO, env=env_for(home, smoke_model_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(demo.stderr), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("Training a small LoRA adapter" in line for line in err), 600, what="the demo's training")
        demo.send_signal(signal.SIGINT)
        demo.wait(timeout=120)
        out = demo.stdout.read()  # stderr is the reader thread's alone: communicate() would take its last lines
    finally:
        demo.kill()
    reader.join(10)
    text = "".join(err)
    assert demo.returncode == 130, out + text
    assert "stopped with Ctrl-C before its sample photos were queued" in text and "demo` again" in text, text
    assert "Traceback" not in text, text
    assert not [p for p in (home / "inbox").rglob("*") if p.is_file()]
    assert not (home / "adapters" / "ansel" / "current").exists()
    listed = mondrian(home, smoke_model_path, "references", "list", "--advisor", "ansel", "--json")
    assert json.loads(listed.stdout)["count"] == 5, listed.stdout + listed.stderr
