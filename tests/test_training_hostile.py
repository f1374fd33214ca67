"""Training and adapters as a hostile studio admin uses them: real smoke model, real adapters, the real `mondrian`
command in subprocesses, real files. Each case once lost data or gave advice that did not lead anywhere."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import time
from pathlib import Path

import pytest

from tests.harness import mondrian
from tests.lora_helpers import adapter_home, install_version, random_adapter, synthetic_advisor, synthetic_photo

_home = adapter_home


# Where a fused model would be deleted by Mondrian itself: a version-like name in the adapters folder is pruned by the
# next training (it is the oldest "version" there), a hidden one is removed by `recover()`, and the datasets folder
# keeps only the newest two.
INSIDE = {
    "version-name": lambda cfg: cfg.adapters_dir / "ansel" / "v0009",
    "staging-name": lambda cfg: cfg.adapters_dir / "ansel" / ".staging-fused",
    "advisor-folder": lambda cfg: cfg.adapters_dir / "fusedmodel",
    "datasets": lambda cfg: cfg.var_dir / "datasets" / "ansel" / "fused",
}


@pytest.mark.parametrize("where", list(INSIDE))
def test_fuse_out_into_a_folder_mondrian_prunes_is_refused(where, tmp_path, smoke_model_path, smoke_model) -> None:
    cfg = _home(tmp_path, smoke_model_path)
    install_version(cfg, "ansel", random_adapter(tmp_path / "src", smoke_model, seed=7), model_path=smoke_model_path)
    dest = INSIDE[where](cfg)
    out = mondrian(cfg.home, smoke_model_path, "adapters", "fuse", "--advisor", "ansel", "--out", str(dest))
    assert out.returncode == 1 and "Traceback" not in out.stderr, (out.returncode, out.stdout, out.stderr[-2000:])
    assert "Mondrian manages" in out.stderr and "--out" in out.stderr, out.stderr
    assert not dest.exists(), "nothing may be written where the next training deletes it"


def test_fuse_out_elsewhere_still_works(tmp_path, smoke_model_path, smoke_model) -> None:
    """A folder next to (not inside) the adapters folder, with a similar name, is fine."""
    cfg = _home(tmp_path, smoke_model_path)
    install_version(cfg, "ansel", random_adapter(tmp_path / "src", smoke_model, seed=7), model_path=smoke_model_path)
    dest = cfg.adapters_dir.parent / (cfg.adapters_dir.name + "-fused")
    out = mondrian(cfg.home, smoke_model_path, "adapters", "fuse", "--advisor", "ansel", "--out", str(dest))
    assert out.returncode == 0, out.stderr[-2000:]
    assert (dest / "config.json").is_file()


def test_training_unindexed_references_says_how_to_index_them_and_that_works(tmp_path, smoke_model_path) -> None:
    """References copied in while no daemon ran are not indexed: `train` said "0 usable reference photo(s)" with no
    way forward. It now names the folder and the command; following it literally makes the training run."""
    cfg = _home(tmp_path, smoke_model_path)
    synthetic_advisor(cfg.home, "synth", n=5)
    out = mondrian(cfg.home, smoke_model_path, "train", "--advisor", "synth", "--iters", "2", "--no-promote")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "5 photo(s)" in out.stderr and "not indexed" in out.stderr, out.stderr[-2000:]
    advice = re.search(r"`(mondrian [^`]*references index[^`]*)`", out.stderr)
    assert advice, out.stderr[-2000:]
    words = shlex.split(advice.group(1))[1:]
    if words[:1] == ["--home"]:
        assert Path(words[1]).resolve() == cfg.home.resolve()
        words = words[2:]
    done = mondrian(cfg.home, smoke_model_path, *words)
    assert done.returncode == 0, done.stderr[-2000:]
    again = mondrian(cfg.home, smoke_model_path, "train", "--advisor", "synth", "--iters", "2", "--no-promote",
                     timeout=300)
    assert again.returncode == 3 and "not promoted" in again.stdout, (again.stdout, again.stderr[-2000:])


@pytest.mark.parametrize("which", [("--version", "v0001"), ("--version", "v0002", "--against", "v0001")])
def test_evaluate_refuses_an_adapter_trained_for_another_base(which, tmp_path, smoke_model_path, smoke_model) -> None:
    """An adapter trained for another base model is never served (photos fall back to rag), and `fuse` refuses it;
    `evaluate` scored it on the configured base and printed a table of figures that mean nothing."""
    from tests.lora_helpers import index_references

    cfg = _home(tmp_path, smoke_model_path)
    synthetic_advisor(cfg.home, "ansel", n=8)
    index_references(cfg, ["ansel"])
    src = random_adapter(tmp_path / "src", smoke_model, seed=7)
    install_version(cfg, "ansel", src, base_fingerprint="0123456789abcdef")  # v0001: another base
    install_version(cfg, "ansel", src, model_path=smoke_model_path)  # v0002: this one
    out = mondrian(cfg.home, smoke_model_path, "evaluate", "--advisor", "ansel", *which)
    assert out.returncode == 1 and "Traceback" not in out.stderr, (out.returncode, out.stdout, out.stderr[-2000:])
    assert "ansel/v0001: it was trained for base model" in out.stderr, out.stderr[-2000:]
    assert "MAE" not in out.stdout
    fine = mondrian(cfg.home, smoke_model_path, "evaluate", "--advisor", "ansel", "--version", "v0002")
    assert fine.returncode == 0 and "MAE" in fine.stdout, fine.stderr[-2000:]


def test_fuse_refuses_an_adapter_trained_for_another_base(tmp_path, smoke_model_path, smoke_model) -> None:
    """Merged into a base it was not trained for, an adapter makes a model that scores like neither: refused, and
    nothing is written."""
    cfg = _home(tmp_path, smoke_model_path)
    install_version(cfg, "ansel", random_adapter(tmp_path / "src", smoke_model, seed=7),
                    base_fingerprint="0123456789abcdef")
    dest = tmp_path / "fused"
    out = mondrian(cfg.home, smoke_model_path, "adapters", "fuse", "--advisor", "ansel", "--out", str(dest))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "ansel/v0001: it was trained for base model" in out.stderr and "fuse it with `--model`" in out.stderr
    assert not dest.exists()


def _stopped_pids() -> list[int]:
    """Processes of this user stopped by SIGSTOP (state T), by /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                    pids.append(int(entry.name))
            except (OSError, IndexError):
                pass
    return pids


def _train_held_at(cfg, smoke_model_path, point: str, meanwhile, *extra: str) -> tuple[int, str, str, list[int]]:
    """`mondrian train --advisor synth --iters 2 [extra]` held by SIGSTOP at the test hook `point` of its training
    child; `meanwhile(run)` acts then (rename references, send the parent a signal), and the child is resumed.
    (returncode, stdout, stderr, the held child's pids)."""
    import os
    import signal
    import subprocess
    import sys

    from tests.harness import REPO, env_for, wait_for

    before = set(_stopped_pids())
    # SIGINT as a terminal leaves it: a suite started in the background (`cmd &` in a script) runs with SIGINT
    # ignored, which every child inherits, and Python then never turns it into KeyboardInterrupt.
    run = subprocess.Popen([sys.executable, "-m", "daemon", "train", "--advisor", "synth", "--iters", "2", *extra],
                           env=env_for(cfg.home, smoke_model_path, MONDRIAN_TEST_STOP_AT=point),
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        held = wait_for(lambda: [p for p in _stopped_pids() if p not in before], timeout=300,
                        what=f"training to reach {point}")
        meanwhile(run)
        for pid in held:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        out, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    return run.returncode, out, err, held


def _synth_home(tmp_path: Path, smoke_model_path: Path):
    cfg = _home(tmp_path, smoke_model_path)
    synthetic_advisor(cfg.home, "synth", n=8)
    assert mondrian(cfg.home, smoke_model_path, "references", "index").returncode == 0
    return cfg


def _rename_all(cfg) -> None:
    for f in sorted((cfg.home / "advisors" / "synth" / "references").iterdir()):
        f.rename(f.with_name("2024-" + f.name))  # the photographer renames the portfolio meanwhile


def test_references_renamed_while_training_are_left_out_of_the_evaluation_not_the_end_of_the_run(
        tmp_path, smoke_model_path) -> None:
    """The README says renaming a reference costs nothing; done while an advisor trained (overnight), the run
    failed at its evaluation with `ImageRejected: the file could not be read`, naming no file and no next step.
    Now the references that vanished are left out of both evaluations (logged by name) and the run ends as any
    other: here judged on too few test photos, not promoted."""
    cfg = _synth_home(tmp_path, smoke_model_path)
    with open(cfg.home / "mondrian.toml", "a") as fh:
        # Both test photos would have been enough, had they stayed (iters as `_train_held_at` gives it).
        fh.write("\n[lora]\nmin_test_photos = 2\niters = 2\n")
    rc, out, err, _ = _train_held_at(cfg, smoke_model_path, "evaluating", lambda run: _rename_all(cfg), "--no-promote")
    assert "Traceback" not in err and "ImageRejected" not in err, err[-3000:]
    assert rc == 3 and "not promoted" in out, (rc, out, err[-3000:])
    assert "left out of the evaluation" in err and "r00" in err, err[-3000:]
    # Not "add curator-scored references": they were there. And the nightly job tries again, rather than taking the
    # run for a judgement of these very references.
    said = " ".join(out.split())
    assert "renamed, moved or removed while it trained" in said and "add curator-scored" not in said, out
    assert mondrian(cfg.home, smoke_model_path, "references", "index").returncode == 0
    from daemon.ledger import Ledger
    from jobs.nightly import due_advisors

    from daemon.config import load_config

    now = load_config(cfg.home, model=str(smoke_model_path))  # with the [lora] settings it was trained with
    (due,) = due_advisors(now, Ledger.for_config(now))
    assert due.advisor == "synth" and "moved" in due.reason, due


def test_ctrl_c_on_train_says_what_happened_keeps_nothing_and_status_says_so_too(tmp_path, smoke_model_path) -> None:
    """Ctrl-C on `mondrian train` used to end it without a word (exit 130): a person could not tell whether an
    adapter had been kept or the run went on in the background."""
    import os
    import signal

    from tests.harness import wait_for

    def ctrl_c(run) -> None:
        # SIGINT is what the terminal sends `mondrian train` (its training child has a session of its own). The
        # child stays held until `train` has ended: it must end the child itself, not race it to the finish.
        os.kill(run.pid, signal.SIGINT)
        wait_for(lambda: run.poll() is not None, timeout=90, what="`mondrian train` to end on SIGINT")

    cfg = _synth_home(tmp_path, smoke_model_path)
    rc, out, err, held = _train_held_at(cfg, smoke_model_path, "evaluating", ctrl_c, "--model", str(smoke_model_path))
    assert rc == 130 and "Traceback" not in err, (rc, err[-3000:])
    assert "Training stopped with Ctrl-C before it finished; nothing was kept" in err, err[-3000:]
    # the command to start it again names the model it was started with (a home without one in its settings)
    assert f"train --advisor synth --model {smoke_model_path}` starts it again" in err, err[-3000:]
    for pid in held:  # the child went with it
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]
    adapters = cfg.adapters_dir / "synth"
    assert not adapters.exists() or not [p.name for p in adapters.iterdir() if p.name.startswith(("v0", ".staging"))]
    status = mondrian(cfg.home, smoke_model_path, "status")
    # Stopped on purpose, not "failed", and the line says how to run it again.
    line = next(line for line in status.stdout.splitlines() if line.startswith("Training:"))
    assert line.startswith("Training: synth stopped") and "stopped with Ctrl-C" in line, line
    assert "train --advisor synth" in line and "failed" not in line, line


def test_a_training_reference_renamed_before_the_dataset_is_built_is_left_out_not_the_end_of_the_run(
        tmp_path, smoke_model_path) -> None:
    """As at the evaluation: a reference renamed while the advisor trains is left out (named), not the run's end."""
    from daemon.config import load_config
    from jobs import dataset as ds

    cfg = _synth_home(tmp_path, smoke_model_path)
    train = ds.split(ds.collect_references(load_config(cfg.home), "synth")).train
    assert len(train) >= 2
    moved = Path(train[0].path)
    rc, out, err, _ = _train_held_at(cfg, smoke_model_path, "dataset",
                                     lambda run: moved.rename(moved.with_name("2024-" + moved.name)), "--no-promote")
    assert "Traceback" not in err and "cannot be read" not in err, err[-3000:]
    assert rc == 3 and "not promoted" in out, (rc, out, err[-3000:])
    assert "1 reference(s) left out of training" in err and moved.name in err, err[-3000:]
    metrics = next((cfg.adapters_dir / "synth").glob("v*/metrics.json")).read_text()
    assert moved.name in metrics  # recorded with the version, as the evaluation's left-out photos are


def test_every_training_reference_renamed_before_the_dataset_is_one_line_saying_to_index_again(
        tmp_path, smoke_model_path) -> None:
    cfg = _synth_home(tmp_path, smoke_model_path)
    rc, out, err, _ = _train_held_at(cfg, smoke_model_path, "dataset", lambda run: _rename_all(cfg), "--no-promote")
    assert rc == 1 and "Traceback" not in err, (rc, err[-3000:])
    assert "none of the" in err and "training references could be read" in err, err[-3000:]
    assert "references index --advisor synth" in err, err[-3000:]
    # ...and following the advice works: indexed where they are now, the advisor trains.
    assert mondrian(cfg.home, smoke_model_path, "references", "index", "--advisor", "synth").returncode == 0
    again = mondrian(cfg.home, smoke_model_path, "train", "--advisor", "synth", "--iters", "2", "--no-promote")
    assert again.returncode == 3 and "not promoted" in again.stdout, again.stderr[-3000:]


def test_references_renamed_between_the_two_evaluations_cost_nothing(tmp_path, smoke_model_path) -> None:
    """Renamed after the candidate was scored and before the model it is compared with (many minutes apart with a
    real model): the test photos were read again then, and the run failed with `ImageRejected: the file could not
    be read`, hours of training lost. Each test photo is read once, before both."""
    cfg = _synth_home(tmp_path, smoke_model_path)
    rc, out, err, _ = _train_held_at(cfg, smoke_model_path, "evaluating_baseline", lambda run: _rename_all(cfg),
                                     "--no-promote")
    assert "Traceback" not in err and "ImageRejected" not in err and "Training failed" not in err, err[-3000:]
    assert rc == 3 and "not promoted" in out, (rc, out, err[-3000:])
    metrics = json.loads((cfg.adapters_dir / "synth" / "v0001" / "metrics.json").read_text())
    ev = metrics["evaluation"]
    assert ev["left_out"] == [] and ev["candidate"]["n"] == ev["baseline"]["n"] == ev["held_out"] > 0, ev


def test_the_gate_never_judges_the_current_adapter_on_photos_it_learned_from(tmp_path, smoke_model_path) -> None:
    """A photo moves between splits when its file changes (a rating written into it) or the fractions do; the
    current version compared on photos it trained on is favoured. Such photos are left out of the comparison, by
    name; when too few are left, the candidate is compared with the base model instead, and it says so."""
    import mlx_vlm

    from daemon.config import load_config
    from jobs.dataset import collect_references, split, training_references
    from jobs.train import TrainSettings
    from tests.lora_helpers import index_references

    cfg = _synth_home(tmp_path, smoke_model_path)
    with open(cfg.home / "mondrian.toml", "a") as fh:
        fh.write("\n[lora]\nmin_test_photos = 1\nholdout_fraction = 0.5\n")
    cfg = load_config(cfg.home, env={}, model=str(smoke_model_path))
    refs = collect_references(cfg, "synth", index_references(cfg, ["synth"]))
    settings = TrainSettings.from_config(cfg)
    usable, _ = training_references(refs, settings.use_model_scores)
    test = split(usable, settings.holdout_fraction, settings.validation_fraction).test
    assert len(test) >= 2, len(test)
    model, _ = mlx_vlm.load(str(smoke_model_path))
    adapter = random_adapter(tmp_path / "a", model, seed=41)
    others = [r.sha256 for r in usable if r not in test]
    install_version(cfg, "synth", adapter, model_path=smoke_model_path,
                    splits={"train": others + [test[0].sha256], "validation": [], "test": []})

    out = mondrian(cfg.home, smoke_model_path, "train", "--advisor", "synth", "--iters", "2", "--no-promote",
                   timeout=900)
    assert out.returncode == 3 and "Traceback" not in out.stderr, out.stderr[-3000:]
    ev = json.loads((cfg.adapters_dir / "synth" / "v0002" / "metrics.json").read_text())["evaluation"]
    assert ev["baseline"]["label"] == "v0001" and ev["left_out_seen_by_baseline"] == [Path(test[0].path).name], ev
    assert test[0].sha256 not in {p["sha256"] for p in ev["candidate"]["photos"] + ev["baseline"]["photos"]}
    assert ev["candidate"]["n"] == len(test) - 1
    assert "left out of the comparison: v0001 learned from them" in out.stderr, out.stderr[-3000:]

    # v0001 learned from every test photo: judged against the base model on all of them, saying so
    install_version(cfg, "synth", adapter, model_path=smoke_model_path,
                    splits={"train": [r.sha256 for r in usable], "validation": [], "test": []})
    out = mondrian(cfg.home, smoke_model_path, "train", "--advisor", "synth", "--iters", "2", "--no-promote",
                   timeout=900)
    assert out.returncode == 3, out.stderr[-3000:]
    ev = json.loads((cfg.adapters_dir / "synth" / "v0004" / "metrics.json").read_text())["evaluation"]
    assert ev["baseline"]["label"] == "base" and ev["candidate"]["n"] == len(test), ev
    assert "too many to judge it fairly: the candidate is compared with the base model" in out.stderr


def test_current_deleted_copied_or_rolled_back_to_another_base_is_told_and_repaired(tmp_path, smoke_model_path) -> None:
    """What a copy leaves (`rsync -rL`, `cp -R`, a sync service, exFAT): `current` missing, or a folder instead of the
    link. Lora fell back with "no trained adapter yet (run train)" though promoted versions were kept, and `adapters
    rollback` said there was nothing to roll back; a folder in its place made the next promotion fail with advice
    that did not help. And rollback could go to a version trained for another base model, from which nothing went
    back. Each is now said as it is and `adapters rollback` repairs it."""
    import shutil

    import mlx_vlm

    from daemon.analysis import build_strategies, resolve
    from daemon.analysis.advisors import get_advisor
    from daemon.model.adapter_store import AdapterStore

    cfg = _home(tmp_path, smoke_model_path)
    model, _ = mlx_vlm.load(str(smoke_model_path))
    src = random_adapter(tmp_path / "a", model, seed=50)
    install_version(cfg, "ansel", src, model_path=smoke_model_path)
    install_version(cfg, "ansel", src, model_path=smoke_model_path)
    store = AdapterStore(cfg.adapters_dir)
    ansel = get_advisor(cfg, "ansel")
    pointer = cfg.adapters_dir / "ansel" / "current"

    def lora_reason() -> str | None:
        strategy, steps = resolve("lora", ansel, build_strategies(cfg))
        return None if strategy.name == "lora" else steps[0]["reason"]

    def rollback() -> tuple[int, str]:
        out = mondrian(cfg.home, smoke_model_path, "adapters", "rollback", "--advisor", "ansel")
        assert "Traceback" not in out.stderr, out.stderr
        return out.returncode, out.stdout + out.stderr

    assert lora_reason() is None and store.current_name("ansel") == "v0002"
    pointer.unlink()  # deleted
    told = mondrian(cfg.home, smoke_model_path, "status").stdout
    assert "Adapters: ansel: current points at nothing: `current` is missing" in told, told
    assert "adapters rollback --advisor ansel` points it at the newest complete promoted version" in told, told
    reason = lora_reason()
    assert "`current` is missing" in reason and "adapters rollback --advisor ansel" in reason, reason
    assert "run `mondrian train" not in reason
    rc, text = rollback()
    assert rc == 0 and "it now points at v0002" in text, text
    assert lora_reason() is None and pointer.is_symlink()

    # A copy of v0002 in the link's place: still v0002 for every reader, and a rollback makes it a link again
    pointer.unlink()
    shutil.copytree(cfg.adapters_dir / "ansel" / "v0002", pointer)
    assert store.current_name("ansel") == "v0002" and lora_reason() is None
    rc, text = rollback()
    assert rc == 0 and "now v0001 (was v0002)" in text, text
    assert pointer.is_symlink() and os.readlink(pointer) == "v0001"
    assert "Adapters: ansel v0001\n" in mondrian(cfg.home, smoke_model_path, "status").stdout
    assert json.loads(mondrian(cfg.home, smoke_model_path, "status", "--json").stdout)["adapters"] == \
        {"ansel": {"current": "v0001", "problem": None, "remedy": None}}
    assert sorted(p.name for p in (cfg.adapters_dir / "ansel").iterdir() if not p.name.startswith(".")) == \
        ["current", "history.jsonl", "v0001", "v0002"]

    # A copy of v0002 whose own folder a sync left partial: the copy becomes v0002, current again, nothing lost,
    # and the rollback that repaired it goes no further back
    pointer.unlink()
    shutil.copytree(cfg.adapters_dir / "ansel" / "v0002", pointer)
    (cfg.adapters_dir / "ansel" / "v0002" / "adapters.safetensors").unlink()
    rc, text = rollback()
    assert rc == 0 and "it now points at v0002" in text, text
    assert os.readlink(pointer) == "v0002" and (cfg.adapters_dir / "ansel" / "v0002" / "adapters.safetensors").is_file()
    os.unlink(pointer)
    os.symlink("v0001", pointer)

    # The copy is all that is left of its version: it becomes that version's folder, nothing is lost
    pointer.unlink()
    (cfg.adapters_dir / "ansel" / "v0001").rename(pointer)
    install_version(cfg, "ansel", src, model_path=smoke_model_path)  # v0003: the switch meets the folder
    assert (cfg.adapters_dir / "ansel" / "v0001" / "adapters.safetensors").is_file()
    assert os.readlink(pointer) == "v0003"

    # v0003 was trained for another base model: rollback from v0004 skips it and goes to v0001 (v0002 was rolled
    # back from before)
    install_version(cfg, "ansel", src, model_path=smoke_model_path)
    manifest = cfg.adapters_dir / "ansel" / "v0003" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["base_model"]["fingerprint"] = "another-model"
    manifest.write_text(json.dumps(data))
    rc, text = rollback()
    assert rc == 0 and "now v0001 (was v0004)" in text, text
    rc, text = rollback()
    assert rc == 1 and "no earlier promoted adapter" in text, text


def test_a_refused_version_is_the_lora_fallback_reason_not_run_train(tmp_path, smoke_model_path) -> None:
    """Trained and refused by the gate: "no trained adapter yet (run train)" sent the photographer round the same
    refusal. The reason names the refused version and the gate's own words."""
    from daemon.analysis import build_strategies, resolve
    from daemon.analysis.advisors import get_advisor

    cfg = _home(tmp_path, smoke_model_path)
    install_version(cfg, "ansel", promoted=False, model_path=smoke_model_path)
    strategy, steps = resolve("lora", get_advisor(cfg, "ansel"), build_strategies(cfg))
    assert strategy.name != "lora"
    assert "no adapter of Ansel Adams has passed the quality gate yet: v0001 was not promoted" in steps[0]["reason"]


def test_adapter_weights_damaged_into_nan_fall_back_instead_of_failing_every_photo(tmp_path, smoke_model_path) -> None:
    """A version whose weights are well formed but hold NaN (damaged on disk): every lora photo failed for good,
    "the model used all its tokens", blaming the model. It falls back to rag with the reason, like a truncated one."""
    import mlx_vlm
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from daemon.analysis import build_strategies, resolve
    from daemon.analysis.advisors import get_advisor

    cfg = _home(tmp_path, smoke_model_path)
    model, _ = mlx_vlm.load(str(smoke_model_path))
    install_version(cfg, "ansel", random_adapter(tmp_path / "a", model, seed=60), model_path=smoke_model_path)
    ansel = get_advisor(cfg, "ansel")
    assert resolve("lora", ansel, build_strategies(cfg))[0].name == "lora"
    weights = cfg.adapters_dir / "ansel" / "v0001" / "adapters.safetensors"
    tensors = load_file(str(weights))
    first = sorted(tensors)[0]
    tensors[first] = np.full_like(tensors[first], np.nan)
    save_file(tensors, str(weights))
    strategy, steps = resolve("lora", ansel, build_strategies(cfg))
    assert strategy.name != "lora" and "not numbers (NaN or infinite)" in steps[0]["reason"], steps


def test_training_stopped_by_the_daemons_shutdown_is_said_to_be_stopped_not_failed(tmp_path, smoke_model_path) -> None:
    """A daemon stopped (launchctl stop, SIGTERM) during its nightly training logged `training synth: failed:`, and
    `status` said "Training: synth failed", as if something were wrong; the catch-up at the next start runs it
    again. It is "stopped", and says it runs again at the next start."""
    import threading

    from daemon.ledger import Ledger
    from jobs.nightly import train_and_record

    cfg = _synth_home(tmp_path, smoke_model_path)
    ledger = Ledger(cfg.db_path)
    try:
        shutting_down = threading.Event()
        shutting_down.set()
        outcome = train_and_record(cfg, ledger, "synth", stop=shutting_down)
    finally:
        ledger.close()
    assert not outcome.ok and outcome.stopped, outcome
    status = mondrian(cfg.home, smoke_model_path, "status")
    line = next(line for line in status.stdout.splitlines() if line.startswith("Training:"))
    assert line.startswith("Training: synth stopped") and "runs again at the next start" in line, line
    assert "failed" not in line, line


@pytest.mark.parametrize("kind", ["fifo", "link"])
def test_a_fifo_or_a_link_where_the_training_log_goes_is_refused_not_waited_on(kind, tmp_path,
                                                                              smoke_model_path) -> None:
    """Attack: a FIFO at var/logs/train-<advisor>.log: `train` opened it to write and waited for a reader for ever,
    holding the advisor's lock (`status`: "starting"; rollback refused). A link there was written through, to a file
    outside the home. Both are refused with what to do, and the advisor is free again."""
    cfg = _synth_home(tmp_path, smoke_model_path)
    cfg.logs_dir.mkdir(parents=True, exist_ok=True)
    log = cfg.logs_dir / "train-synth.log"
    outside = tmp_path / "outside.log"
    os.mkfifo(log) if kind == "fifo" else log.symlink_to(outside)
    out = mondrian(cfg.home, smoke_model_path, "train", "--advisor", "synth", "--iters", "2", "--no-promote",
                   timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "training log cannot be written" in out.stderr and str(log) in out.stderr, out.stderr[-2000:]
    assert not outside.exists()
    status = mondrian(cfg.home, smoke_model_path, "status")
    assert "starting" not in status.stdout, status.stdout


def test_ctrl_c_while_the_new_version_is_recorded_finishes_it_and_says_so(tmp_path, smoke_model_path) -> None:
    """Attack: Ctrl-C after the new version was renamed into place, before `current` was switched: `train` said
    "nothing was kept", yet `adapters` (or the daemon's next start) finished the promotion and photos used the
    version the person thought they had cancelled. Recording the version is finished first, and said."""
    import signal

    cfg = _synth_home(tmp_path, smoke_model_path)
    rc, out, err, held = _train_held_at(cfg, smoke_model_path, "promoting",
                                        lambda run: os.kill(run.pid, signal.SIGINT), "--promote-anyway")
    assert rc == 0 and "Traceback" not in err, (rc, err[-3000:])
    assert "Ctrl-C came while synth's new version was being recorded: that was finished first" in err, err[-3000:]
    assert "nothing was kept" not in err, err[-3000:]
    assert (cfg.adapters_dir / "synth" / "current").resolve().name == "v0001"


def test_too_few_references_because_of_copies_or_skipped_ones_is_said_so_not_index_them_again(tmp_path,
                                                                                              smoke_model_path) -> None:
    """Attack: one photo copied four times and one with a broken sidecar: `train` said 5 photos "are not indexed
    yet: index them", indexing said "0 indexed, 5 unchanged", and `train` said the same again, for ever. It names
    the copies and the skipped photo now, and where more references go."""
    import shutil

    cfg = _home(tmp_path, smoke_model_path)
    synthetic_advisor(cfg.home, "synth", n=2)
    refs = cfg.home / "advisors" / "synth" / "references"
    for i in range(3):
        shutil.copy2(refs / "r000.png", refs / f"copy{i}.png")
        shutil.copy2(refs / "r000.json", refs / f"copy{i}.json")
    shutil.copy2(refs / "r001.png", refs / "broken.png")
    (refs / "broken.json").write_text('{"scores": {"composition": 99}}')
    for _ in range(2):  # indexing again, as advised before, changes nothing: the advice must not send it round
        indexed = mondrian(cfg.home, smoke_model_path, "references", "index", "--advisor", "synth")
        assert "1 skipped" in indexed.stderr, indexed.stderr  # (exit 1: something was skipped)
        out = mondrian(cfg.home, smoke_model_path, "train", "--advisor", "synth", "--iters", "2", "--no-promote")
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert "not indexed yet" not in out.stderr, out.stderr[-2000:]
        assert "3 are copies of photos already counted" in out.stderr, out.stderr[-2000:]
        assert "1 were skipped" in out.stderr and "references list --advisor synth" in out.stderr, out.stderr[-2000:]
        assert f"to {refs}, then train again" in out.stderr, out.stderr[-2000:]
    # A reference exported again since it was indexed is not a copy: indexing reads it as it is now.
    time.sleep(1.1)  # its file time after the indexing's
    synthetic_photo(refs / "r001.png", 0.3, 0.7, 99)
    out = mondrian(cfg.home, smoke_model_path, "train", "--advisor", "synth", "--iters", "2", "--no-promote")
    assert "1 photo(s) in" in out.stderr and "not indexed as they are now" in out.stderr, out.stderr[-2000:]


def test_a_curator_sidecar_broken_after_indexing_is_named_when_training_leaves_its_photo_out(tmp_path,
                                                                                           smoke_model_path) -> None:
    """Attack: sidecars edited into something unreadable after indexing: training left those photos out without a
    word (its own summary still counted them among the references). The training log names them and the command
    that says why."""
    cfg = _synth_home(tmp_path, smoke_model_path)
    refs = cfg.home / "advisors" / "synth" / "references"
    (refs / "r002.json").write_text('{"scores": {"lighting": 5}}')
    out = mondrian(cfg.home, smoke_model_path, "train", "--advisor", "synth", "--iters", "2", "--no-promote",
                   timeout=300)
    assert out.returncode in (0, 3) and "Traceback" not in out.stderr, out.stderr[-2000:]
    log = (cfg.logs_dir / "train-synth.log").read_text()
    assert "1 reference(s) are left out because their sidecar" in log and "r002.png" in log, log[-3000:]
    assert "references list --advisor synth" in log, log[-3000:]


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_kill_or_a_closed_terminal_on_train_is_a_stop_said_and_cleaned_up_like_ctrl_c(signame, tmp_path,
                                                                                    smoke_model_path) -> None:
    """Attack: `kill` (SIGTERM) or a closed terminal (SIGHUP) on `mondrian train` ended it with no word (exit 143)
    and left a `.staging-*` folder in the adapters; Ctrl-C said what happened and cleaned up. Now each does."""
    import signal

    from tests.harness import wait_for

    def stop(run) -> None:
        os.kill(run.pid, getattr(signal, signame))
        wait_for(lambda: run.poll() is not None, timeout=90, what=f"`mondrian train` to end on {signame}")

    cfg = _synth_home(tmp_path, smoke_model_path)
    rc, out, err, held = _train_held_at(cfg, smoke_model_path, "evaluating", stop)
    assert rc == 128 + getattr(signal, signame) and "Traceback" not in err, (rc, err[-3000:])
    assert f"Training stopped by {signame} before it finished; nothing was kept" in err, err[-3000:]
    adapters = cfg.adapters_dir / "synth"
    assert not adapters.exists() or not [p.name for p in adapters.iterdir() if p.name.startswith(("v0", ".staging"))]
    line = next(x for x in mondrian(cfg.home, smoke_model_path, "status").stdout.splitlines()
                if x.startswith("Training:"))
    assert line.startswith("Training: synth stopped") and f"stopped by {signame}" in line, line


@pytest.mark.parametrize("point", ["dataset", "evaluating"])
def test_a_reference_replaced_while_training_is_left_out_not_learned_or_judged(point, tmp_path,
                                                                              smoke_model_path) -> None:
    """Attack: a test photo overwritten while the advisor trained (a training photo saved under its name): the gate
    judged the candidate on it, a picture it may have learned from, under the curator's scores of the old one;
    `evaluate` later left it out. The gate leaves it out too, and says why; so does the dataset, whose rows would
    have paired the new picture with the old one's scores."""
    cfg = _synth_home(tmp_path, smoke_model_path)
    refs = sorted((cfg.home / "advisors" / "synth" / "references").glob("*.png"))

    def overwrite(_run) -> None:
        for ref in refs[1:]:
            ref.write_bytes(refs[0].read_bytes())

    rc, out, err, _ = _train_held_at(cfg, smoke_model_path, point, overwrite, "--no-promote")
    assert "Traceback" not in err, err[-3000:]
    said = (err + (cfg.logs_dir / "train-synth.log").read_text()).splitlines()
    # Left out of the dataset (here all but one: "none of the … could be read"), or of the gate's evaluation.
    where = ("left out of training", "could be read") if point == "dataset" else ("left out of the evaluation",)
    changed = [line for line in said if "the file changed since it was indexed" in line]
    assert [line for line in changed if any(w in line for w in where)], (rc, out, err[-3000:])


def test_ctrl_c_just_after_the_new_version_is_recorded_says_it_was_kept(tmp_path, smoke_model_path) -> None:
    """Attack: Ctrl-C after the version was recorded and promoted, before `train` returned: it said "nothing was
    kept; adapters are as they were" about a version photos now use. It names the version and how to undo it."""
    import signal

    cfg = _synth_home(tmp_path, smoke_model_path)
    rc, out, err, held = _train_held_at(cfg, smoke_model_path, "recorded",
                                        lambda run: os.kill(run.pid, signal.SIGINT), "--promote-anyway")
    assert rc == 130 and "Traceback" not in err, (rc, err[-3000:])
    assert "stopped with Ctrl-C after synth/v0001 was recorded (promoted and current)" in err, err[-3000:]
    assert "adapters rollback --advisor synth" in err and "nothing was kept" not in err, err[-3000:]
    line = next(x for x in mondrian(cfg.home, smoke_model_path, "status").stdout.splitlines()
                if x.startswith("Training:"))
    assert "nothing was kept" not in line and "v0001" in line, line


def test_a_file_where_the_advisors_datasets_go_is_named_with_what_to_do(tmp_path, smoke_model_path) -> None:
    """Attack: a file at var/datasets/<advisor>: `train` failed with "NotADirectoryError: [Errno 20] Not a
    directory: '…/.staging-….writing'", naming neither the culprit nor a way out."""
    cfg = _synth_home(tmp_path, smoke_model_path)
    (cfg.var_dir / "datasets").mkdir(parents=True, exist_ok=True)
    (cfg.var_dir / "datasets" / "synth").write_text("not a folder")
    out = mondrian(cfg.home, smoke_model_path, "train", "--advisor", "synth", "--iters", "2", "--no-promote")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert f"{cfg.var_dir / 'datasets' / 'synth'} is a file, where Mondrian keeps its own folder" in out.stderr, \
        out.stderr[-2000:]
    assert "Move it elsewhere" in out.stderr and "NotADirectoryError" not in out.stderr, out.stderr[-2000:]
