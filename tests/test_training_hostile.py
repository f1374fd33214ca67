"""Training and adapters as a hostile studio admin uses them: real smoke model, real adapters, the real `mondrian`
command in subprocesses, real files. Each case once lost data or gave advice that did not lead anywhere."""

from __future__ import annotations

import contextlib
import re
import shlex
from pathlib import Path

import pytest

from tests.harness import mondrian
from tests.lora_helpers import adapter_home, install_version, random_adapter, synthetic_advisor

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
    rc, out, err, _ = _train_held_at(cfg, smoke_model_path, "evaluating", lambda run: _rename_all(cfg), "--no-promote")
    assert "Traceback" not in err and "ImageRejected" not in err, err[-3000:]
    assert rc == 3 and "not promoted" in out, (rc, out, err[-3000:])
    assert "left out of the evaluation" in err and "r00" in err, err[-3000:]


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
    rc, out, err, held = _train_held_at(cfg, smoke_model_path, "evaluating", ctrl_c)
    assert rc == 130 and "Traceback" not in err, (rc, err[-3000:])
    assert "Training stopped with Ctrl-C before it finished; nothing was kept" in err, err[-3000:]
    assert "train --advisor synth` starts it again" in err, err[-3000:]
    for pid in held:  # the child went with it
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]
    adapters = cfg.adapters_dir / "synth"
    assert not adapters.exists() or not [p.name for p in adapters.iterdir() if p.name.startswith(("v0", ".staging"))]
    status = mondrian(cfg.home, smoke_model_path, "status")
    assert "stopped with Ctrl-C" in status.stdout, status.stdout


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
