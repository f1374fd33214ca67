"""A broken, dangling or unwritable adapter, as a hostile user leaves it: real adapters saved on the smoke model, real
files, the real `mondrian` command and daemon in subprocesses. Each case ends in a fallback or one line, never a
traceback, a failed photo or a spent attempt."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.harness import Daemon, ledger_jobs, mondrian, photo, wait_for
from tests.lora_helpers import adapter_home, install_version, random_adapter

_home = adapter_home


def _with_adapter(tmp_path: Path, smoke_model_path: Path, model, **settings):
    """A home whose ansel has a promoted, loadable v0001 (`current`) trained for this very smoke model."""
    cfg = _home(tmp_path, smoke_model_path, **settings)
    src = random_adapter(tmp_path / "src", model, seed=7)
    version = install_version(cfg, "ansel", src, model_path=smoke_model_path)
    return cfg, version.path, src


def _edit_config(folder: Path, change) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def _retarget_first_key(folder: Path) -> None:
    """Config and weights agree with each other, but name a module the model does not have: only loading the adapter
    into the model finds it (the file check cannot), so this exercises the failure at generation time."""
    config = json.loads((folder / "adapter_config.json").read_text())
    old = config["lora_parameters"]["keys"][0]
    new = old.rsplit(".", 1)[0] + ".zz_proj"
    config["lora_parameters"]["keys"][0] = new
    (folder / "adapter_config.json").write_text(json.dumps(config))
    raw = (folder / "adapters.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = {(k.replace(old + ".", new + ".", 1) if k.startswith(old + ".") else k): v
              for k, v in json.loads(raw[8:8 + n]).items()}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    (folder / "adapters.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


BREAKS = {
    "junk-config": lambda v: (v / "adapter_config.json").write_text('{"fine_tune_type": "lo'),
    "wrong-rank": lambda v: _edit_config(v, lambda c: c["lora_parameters"].update(rank=4)),
    "no-scale": lambda v: _edit_config(v, lambda c: c["lora_parameters"].pop("scale")),
    "truncated-weights": lambda v: os.truncate(v / "adapters.safetensors", 10_000),
    "unknown-module": _retarget_first_key,
    # Valid JSON to Python's reader: the logits turned NaN and every critique "ran out of tokens, raise max_tokens".
    "nan-scale": lambda v: _edit_config(v, lambda c: c["lora_parameters"].update(scale=float("nan"))),
}


@pytest.mark.parametrize("how", list(BREAKS))
def test_analyze_with_a_broken_adapter_falls_back_on_the_first_photo(how, tmp_path, smoke_model_path,
                                                                       smoke_model) -> None:
    cfg, folder, _ = _with_adapter(tmp_path, smoke_model_path, smoke_model)
    BREAKS[how](folder)
    p1, p2 = photo(tmp_path / "in" / "p1.jpg", seed=1), photo(tmp_path / "in" / "p2.jpg", seed=2)
    out = mondrian(cfg.home, smoke_model_path, "analyze", str(p1), str(p2), "--mode", "lora")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and "run it again" not in out.stdout + out.stderr, out.stderr
    for name in ("p1", "p2"):  # the first photo too, not only the ones after it
        report = json.loads((cfg.outbox / name / "report.json").read_text())
        assert report["mode"]["effective"] != "lora", report["mode"]
        step = report["mode"]["fallbacks"][0]
        assert step["from"] == "lora" and "adapter v0001 could not be loaded" in step["reason"], step
        # Where it is, relative to the home: a page never shows an absolute path.
        assert "adapters/ansel/v0001" in step["reason"], step
        page = (cfg.outbox / name / "report.html").read_text()
        for absolute in {str(cfg.home), str(cfg.home.resolve()), str(folder), str(folder.resolve())}:
            assert absolute not in page and absolute not in step["reason"], absolute


def test_daemon_falls_back_without_a_spent_attempt_and_tries_a_repaired_adapter(tmp_path, smoke_model_path,
                                                                                 smoke_model) -> None:
    cfg, folder, src = _with_adapter(tmp_path, smoke_model_path, smoke_model, default_mode="lora")
    _retarget_first_key(folder)  # found only when the model loads it: the photo is in hand by then
    with Daemon(cfg.home, smoke_model_path) as daemon:
        photo(cfg.inbox / "a1.jpg", seed=1)
        wait_for(lambda: (cfg.outbox / "a1" / "report.json").exists(), 120, what="a1's report")
        first = json.loads((cfg.outbox / "a1" / "report.json").read_text())
        assert first["mode"]["effective"] != "lora" and "could not be loaded" in first["mode"]["fallbacks"][0]["reason"]
        assert ledger_jobs(cfg.home)["a1.jpg"].attempts == 1  # the adapter's failure cost the photo nothing
        # Repaired (the user copies the good files back): the same folder, other files, tried again at once.
        for name in ("adapter_config.json", "adapters.safetensors"):
            shutil.copyfile(src / name, folder / name)
        photo(cfg.inbox / "a2.jpg", seed=2)
        wait_for(lambda: (cfg.outbox / "a2" / "report.json").exists(), 120, what="a2's report")
        second = json.loads((cfg.outbox / "a2" / "report.json").read_text())
        daemon.stop()
        log = daemon.output()
    assert second["mode"]["effective"] == "lora" and second["mode"]["fallbacks"] == [], second["mode"]
    assert second["model"]["adapter"] == "ansel/v0001"
    assert "Traceback" not in log and "unexpected error" not in log, log


def _two_versions(tmp_path: Path, smoke_model_path: Path):
    cfg = _home(tmp_path, smoke_model_path)
    install_version(cfg, "ansel", promoted=True, fingerprint="f1")
    install_version(cfg, "ansel", promoted=True, fingerprint="f2")
    return cfg, cfg.adapters_dir / "ansel"


def test_rollback_repairs_a_dangling_current(tmp_path, smoke_model_path) -> None:
    cfg, d = _two_versions(tmp_path, smoke_model_path)
    os.unlink(d / "current")
    os.symlink("v0009", d / "current")
    out = mondrian(cfg.home, smoke_model_path, "adapters", "--advisor", "ansel")
    assert out.returncode == 0 and "current points at v0009, which does not exist" in out.stdout, out.stdout
    out = mondrian(cfg.home, smoke_model_path, "evaluate", "--advisor", "ansel")  # names the remedy, not "no adapter"
    assert out.returncode != 0 and "points at v0009" in out.stderr and "adapters rollback" in out.stderr, out.stderr
    out = mondrian(cfg.home, smoke_model_path, "adapters", "rollback", "--advisor", "ansel")
    assert out.returncode == 0 and "now points at v0002" in out.stdout, out.stdout + out.stderr
    assert os.readlink(d / "current") == "v0002"


def test_rollback_repairs_an_incomplete_current(tmp_path, smoke_model_path) -> None:
    cfg, d = _two_versions(tmp_path, smoke_model_path)
    (d / "v0002" / "metrics.json").unlink()
    out = mondrian(cfg.home, smoke_model_path, "adapters", "--advisor", "ansel")
    assert out.returncode == 0 and "refused: None" not in out.stdout, out.stdout
    assert "incomplete (no metrics.json)" in out.stdout, out.stdout
    out = mondrian(cfg.home, smoke_model_path, "adapters", "rollback", "--advisor", "ansel")
    assert out.returncode == 0 and "now points at v0001" in out.stdout, out.stdout + out.stderr
    assert os.readlink(d / "current") == "v0001"


@pytest.fixture
def read_only_adapters(tmp_path, smoke_model_path):
    """The home's adapters folder bind-mounted read-only (root only), unmounted afterwards whatever happens."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to bind-mount a folder read-only")
    cfg, _ = _two_versions(tmp_path, smoke_model_path)
    target = str(cfg.adapters_dir)
    if subprocess.run(["mount", "--bind", target, target]).returncode != 0:
        pytest.skip("bind mounts are not allowed here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", target], check=True)
        yield cfg
    finally:
        subprocess.run(["umount", target], check=True)


@pytest.mark.parametrize("command", [("train", "--advisor", "ansel"), ("adapters", "rollback", "--advisor", "ansel")])
def test_a_read_only_adapters_folder_is_one_line(command, read_only_adapters, smoke_model_path) -> None:
    out = mondrian(read_only_adapters.home, smoke_model_path, *command)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert "read-only file system" in out.stderr and str(read_only_adapters.adapters_dir / "ansel") in out.stderr


def test_adapters_lists_a_manifest_with_a_date_string(tmp_path, smoke_model_path) -> None:
    cfg, d = _two_versions(tmp_path, smoke_model_path)
    manifest = json.loads((d / "v0001" / "manifest.json").read_text())
    manifest["created_at"] = "2026-01-02T03:04:05"
    (d / "v0001" / "manifest.json").write_text(json.dumps(manifest))
    out = mondrian(cfg.home, smoke_model_path, "adapters", "--advisor", "ansel")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "2026-01-02 03:04" in out.stdout, out.stdout


@pytest.mark.parametrize("how", ["truncated-weights", "unknown-module"])
def test_evaluate_with_a_broken_adapter_is_one_line(how, tmp_path, smoke_model_path, smoke_model) -> None:
    from tests.lora_helpers import index_references, synthetic_advisor

    cfg = _home(tmp_path, smoke_model_path)
    synthetic_advisor(cfg.home, "ansel", n=4)
    shas = [r.sha256 for r in index_references(cfg, ["ansel"]).references("ansel")][:2]
    src = random_adapter(tmp_path / "src", smoke_model, seed=7)
    folder = install_version(cfg, "ansel", src, model_path=smoke_model_path, splits={"test": shas}).path
    BREAKS[how](folder)
    out = mondrian(cfg.home, smoke_model_path, "evaluate", "--advisor", "ansel", "--version", "v0001")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "cannot evaluate" in out.stderr, out.stderr


def test_a_full_disk_while_writing_the_adapter_says_so(tmp_path, smoke_model) -> None:
    """MLX's own words for a full disk ("[write] Unable to write N bytes") become the folder and the cause."""
    import mlx.core as mx

    from jobs.train import out_of_space

    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("tmpfs mounts are not allowed here")
    try:
        with pytest.raises(Exception) as caught:
            mx.save_safetensors(str(disk / "adapters.safetensors"), {"w": mx.zeros((1024, 1024))})
        message = f"{type(caught.value).__name__}: {caught.value}"
        said = out_of_space(message, disk / ".staging-x")
        assert said is not None and str(disk) in said and "out of space" in said, (message, said)
        assert "failed" not in said
        assert out_of_space(message, tmp_path) is None  # plenty of room there: not blamed on space
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_training_that_fails_says_failed_once(tmp_path, smoke_model_path) -> None:
    """The child's error reaches the user as "Training failed: <why>", not "Training failed: training failed: …"."""
    cfg = _home(tmp_path, smoke_model_path)  # no references: the child stops at the dataset
    out = mondrian(cfg.home, smoke_model_path, "train", "--advisor", "ansel")
    assert out.returncode == 1 and "Training failed: DatasetError" in out.stderr, out.stderr
    assert out.stderr.lower().count("failed") == 1, out.stderr


def test_a_truncated_adapter_is_listed_as_unusable_and_rollback_passes_it_by(tmp_path, smoke_model_path) -> None:
    """A copy cut short leaves every file in place: `adapters` must not call the version fine while its photos fall
    back, and rollback must not point `current` at such a version either."""
    cfg, d = _two_versions(tmp_path, smoke_model_path)
    install_version(cfg, "ansel", promoted=True, fingerprint="f3")
    for name in ("v0002", "v0003"):
        os.truncate(d / name / "adapters.safetensors", 100)
    out = mondrian(cfg.home, smoke_model_path, "adapters", "--advisor", "ansel")
    assert out.returncode == 0, out.stderr
    rows = {line[2:].split()[1]: line for line in out.stdout.splitlines() if line[2:].startswith("ansel ")}
    assert "unusable: adapters.safetensors is truncated" in rows["v0003"], out.stdout
    assert "unusable" in rows["v0002"] and "unusable" not in rows["v0001"], out.stdout
    assert "current points at v0003, whose adapters.safetensors is truncated" in out.stdout, out.stdout
    assert "fall back to rag" in out.stdout and "adapters rollback" in out.stdout, out.stdout
    listed = json.loads(mondrian(cfg.home, smoke_model_path, "adapters", "--json").stdout)
    assert [r["version"] for r in listed if r["problem"]] == ["v0003", "v0002"], listed
    out = mondrian(cfg.home, smoke_model_path, "adapters", "rollback", "--advisor", "ansel")
    assert out.returncode == 0 and os.readlink(d / "current") == "v0001", out.stdout + out.stderr


def test_rollback_past_an_unusable_earlier_version_says_why_it_was_passed_by(tmp_path, smoke_model_path) -> None:
    """Attack: v0002 current, v0001 promoted before it but truncated since: rollback said "no earlier promoted
    adapter than v0002 (kept versions: v0001, v0002)", naming the very version it denied. It says why now."""
    cfg, d = _two_versions(tmp_path, smoke_model_path)
    os.truncate(d / "v0001" / "adapters.safetensors", 100)
    out = mondrian(cfg.home, smoke_model_path, "adapters", "rollback", "--advisor", "ansel")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "v0001 cannot be used: adapters.safetensors is truncated" in out.stderr, out.stderr
    assert os.readlink(d / "current") == "v0002"


def test_a_version_is_named_as_a_person_writes_it_and_a_wrong_one_lists_those_kept(tmp_path, smoke_model_path
                                                                                  ) -> None:
    cfg, _ = _two_versions(tmp_path, smoke_model_path)
    for command in (["evaluate"], ["adapters", "fuse"]):
        out = mondrian(cfg.home, smoke_model_path, *command, "--advisor", "ansel", "--version", "v9")
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert "no adapter version 'v9'; its versions are v0001, v0002" in out.stderr, out.stderr
        assert "adapters --advisor ansel" in out.stderr, out.stderr
    # `1` and `v1` are v0001 (as `analyze --adapter-version` takes them): found, then refused for what this home
    # lacks (references to evaluate on), not for its name.
    for name in ("1", "v1", "V0001"):
        out = mondrian(cfg.home, smoke_model_path, "evaluate", "--advisor", "ansel", "--version", name)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert "no adapter version" not in out.stderr and "reference photo" in out.stderr, (name, out.stderr)


def test_rollback_never_downloads_the_model_to_fingerprint_it(tmp_path, smoke_model_path) -> None:
    """With a hub id configured and not cached (a Mac set up for a model not fetched yet), `adapters rollback` only
    needs the base's fingerprint to pass by versions of another base: it must not start a multi-gigabyte download
    for it. The hub here is a local server that records what is asked of it."""
    import http.server
    import threading

    asked: list[str] = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            asked.append(self.path)
            self.send_error(404)

        do_HEAD = do_GET

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg, d = _two_versions(tmp_path, smoke_model_path)
        env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
               "HF_HOME": str(tmp_path / "hf"), "MONDRIAN_MODEL": "someone/Qwen2-VL-2B-Instruct-4bit"}
        out = mondrian(cfg.home, smoke_model_path, "adapters", "rollback", "--advisor", "ansel", **env)
        assert out.returncode == 0 and "current adapter is now v0001" in out.stdout, out.stdout + out.stderr
        assert asked == [], asked
    finally:
        server.shutdown()


def test_a_truncated_only_version_is_told_to_train_not_to_roll_back(tmp_path, smoke_model_path) -> None:
    """The only version's weights cut short: `adapters` advised `adapters rollback`, which, pasted, said there was
    no earlier version to roll back to. With nothing to go back to, the advice is to train a new one."""
    cfg = _home(tmp_path, smoke_model_path)
    v = install_version(cfg, "ansel", promoted=True, fingerprint="f1")
    os.truncate(v.path / "adapters.safetensors", 100)
    out = mondrian(cfg.home, smoke_model_path, "adapters", "--advisor", "ansel")
    assert "truncated" in out.stdout and "train --advisor ansel" in out.stdout, out.stdout
    assert "adapters rollback" not in out.stdout, out.stdout
    status = mondrian(cfg.home, smoke_model_path, "status").stdout
    assert "train --advisor ansel" in status and "adapters rollback" not in status, status
    pasted = mondrian(cfg.home, smoke_model_path, "adapters", "rollback", "--advisor", "ansel")
    assert pasted.returncode != 0 and "train --advisor ansel" in pasted.stderr, pasted.stderr


def test_a_history_line_that_is_not_an_object_is_passed_by(tmp_path, smoke_model_path) -> None:
    """A line edited into a list or a number made every later commit crash after the whole training (and the
    nightly job with it, every night); lines that are not JSON were already passed by."""
    cfg, advisor_dir = _two_versions(tmp_path, smoke_model_path)
    with open(advisor_dir / "history.jsonl", "a") as fh:
        fh.write("[1, 2]\n42\nnot json\n")
    version = install_version(cfg, "ansel", promoted=True, fingerprint="f3")
    assert version.name == "v0003"
    out = mondrian(cfg.home, smoke_model_path, "adapters", "--advisor", "ansel")
    assert out.returncode == 0 and "v0003" in out.stdout and "Traceback" not in out.stderr, out.stdout + out.stderr


def test_no_adapters_yet_gives_a_train_command_that_runs_when_pasted(tmp_path, smoke_model_path) -> None:
    """It said `train --advisor ID`: pasted, "unknown advisor 'id'"."""
    cfg = _home(tmp_path, smoke_model_path)
    for args, advisor in ((["--advisor", "cartier"], "cartier"), ([], cfg.default_advisor)):
        out = mondrian(cfg.home, smoke_model_path, "adapters", *args)
        assert out.returncode == 0 and f"train --advisor {advisor}`" in out.stdout, out.stdout


def test_a_version_copied_from_another_advisor_is_not_served_as_this_ones(tmp_path, smoke_model_path,
                                                                         smoke_model) -> None:
    """`cp -a adapters/ansel/v0001 adapters/cartier/v0001`: Cartier's lora photos were critiqued through Ansel's
    adapter, the report naming cartier/v0001. It is unusable now, and photos fall back. An advisor renamed with its
    adapters (its manifest names an advisor that no longer exists) is still served."""
    cfg, folder, _ = _with_adapter(tmp_path, smoke_model_path, smoke_model)
    theirs = cfg.adapters_dir / "cartier"
    theirs.mkdir()
    shutil.copytree(folder, theirs / "v0001")
    (theirs / "current").symlink_to("v0001")
    listed = mondrian(cfg.home, smoke_model_path, "adapters", "--advisor", "cartier", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["problem"] == "trained for ansel, not cartier (a folder copied from adapters/ansel/?)", row
    shot = photo(tmp_path / "in" / "p1.jpg", seed=1)
    out = mondrian(cfg.home, smoke_model_path, "analyze", str(shot), "--advisor", "cartier", "--mode", "lora")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((cfg.outbox / "p1" / "report.json").read_text())
    assert report["mode"]["effective"] != "lora", report["mode"]
    assert "trained for ansel, not cartier" in report["mode"]["fallbacks"][0]["reason"], report["mode"]
    manifest = json.loads((theirs / "v0001" / "manifest.json").read_text())
    (theirs / "v0001" / "manifest.json").write_text(json.dumps({**manifest, "advisor": "bresson"}))  # renamed since
    out = mondrian(cfg.home, smoke_model_path, "analyze", str(shot), "--advisor", "cartier", "--mode", "lora")
    assert out.returncode == 0, out.stdout + out.stderr
    again = json.loads((cfg.outbox / "p1-2" / "report.json").read_text())
    assert again["mode"]["effective"] == "lora" and again["model"]["adapter"] == "cartier/v0001", again["mode"]


def test_an_adapter_in_the_original_layout_is_named_as_such_and_left_alone(tmp_path, smoke_model_path,
                                                                            smoke_model) -> None:
    """Attack: an original Mondrian user's `adapters/ansel/adapter_config.json` + `adapters.safetensors` (its
    `mlx_vlm.lora --output-path adapters/ansel` layout): lora photos fell back with "no trained adapter yet" and
    `adapters` said "No adapters yet", as if the files were not there. Both now name them and what to do; the
    files are never touched. The folder is named as it is called, `adapters_dir` being anywhere."""
    cfg = _home(tmp_path, smoke_model_path, adapters_dir=str(tmp_path / "studio-adapters"))
    original = cfg.adapters_dir / "ansel"
    src = random_adapter(tmp_path / "src", smoke_model, seed=7)
    original.mkdir(parents=True)
    for name in ("adapter_config.json", "adapters.safetensors"):
        shutil.copyfile(src / name, original / name)
    originals = ("adapter_config.json", "adapters.safetensors")
    before = {name: (original / name).read_bytes() for name in originals}

    listed = mondrian(cfg.home, smoke_model_path, "adapters")
    assert listed.returncode == 0 and "original Mondrian's layout" in listed.stdout, listed.stdout
    assert "references import-db" in listed.stdout, listed.stdout
    p1 = photo(tmp_path / "in" / "p1.jpg", seed=1)
    out = mondrian(cfg.home, smoke_model_path, "analyze", str(p1), "--mode", "lora")
    assert out.returncode == 0, out.stderr
    step = json.loads((cfg.outbox / "p1" / "report.json").read_text())["mode"]["fallbacks"][0]
    assert step["from"] == "lora" and "original Mondrian's layout" in step["reason"], step
    assert ": studio-adapters/ansel/ holds" in step["reason"] and "studio-adapters/ansel/v0001" in listed.stdout
    assert f"`mondrian train --advisor ansel`" in step["reason"] and str(cfg.home) not in step["reason"], step
    assert {name: (original / name).read_bytes() for name in originals} == before
