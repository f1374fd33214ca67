"""Issue 12: learning that proves itself. Clean splits, curator-only targets, the gate with intervals, sample
checks, the trainer's time limit, retraining on a new base model, fusing, the learning benchmark."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from daemon.analysis.critique import DIMENSIONS
from daemon.config import load_config
from tests.harness import REPO, make_home, mondrian, wait_for
from tests.lora_helpers import index_references, install_version, random_adapter, synthetic_advisor

MAX_PIXELS = 112 * 112


def _home(tmp_path: Path, model: Path | str = "smoke", **settings):
    home = make_home(tmp_path / "home", **{"embeddings_enabled": False, "max_pixels": MAX_PIXELS, **settings})
    return load_config(home, env={}, model=str(model))


def _lora_table(home: Path, **settings) -> None:
    with open(home / "mondrian.toml", "a") as fh:
        fh.write("\n[lora]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))


def _ref(i: int, source: str = "human", comments: dict | None = None):
    from jobs.dataset import Reference

    return Reference(path=f"/x/{i}.png", sha256=hashlib.sha256(str(i).encode()).hexdigest(),
                     scores={d: i % 11 for d in DIMENSIONS}, source=source, comments=comments or {})


# ------------------------------------------------------------------------------------------ 1. splits
def test_three_splits_are_disjoint_and_fixed_by_content_hash() -> None:
    from jobs.dataset import split

    refs = [_ref(i) for i in range(60)]
    s = split(refs, holdout_fraction=0.2, validation_fraction=0.15)
    train, val, test = ({r.sha256 for r in part} for part in (s.train, s.validation, s.test))
    assert not (train & val or train & test or val & test), "a photo in two splits"
    assert train | val | test == {r.sha256 for r in refs}
    assert 6 <= len(test) <= 20 and 3 <= len(val) <= 16, (len(test), len(val))
    # Fixed by content hash: adding references moves none of the old ones to another split.
    more = split(refs + [_ref(i) for i in range(100, 140)], 0.2, 0.15)
    for name in ("train", "validation", "test"):
        before = {r.sha256 for r in getattr(s, name)}
        after = {r.sha256 for r in getattr(more, name)}
        assert before <= after, f"{name}: {len(before - after)} references left it when others were added"
    # Small portfolios still get all three (and never an empty training split).
    small = split([_ref(i) for i in range(3)], 0.2, 0.15)
    assert (len(small.train), len(small.validation), len(small.test)) == (1, 1, 1)
    record = s.record()
    assert set(record) == {"train", "validation", "test"} and record["test"] == [r.sha256 for r in s.test]


# ----------------------------------------------------------------------------- 2. targets from curators
def test_training_targets_are_curator_scores_and_their_own_words_only() -> None:
    from jobs.dataset import DatasetError, NO_COMMENT, select_targets, target_report

    refs = [_ref(1), _ref(2, "model"), _ref(3), _ref(4, "model"), _ref(5, "model")]
    # 2 curator-scored: too few, and the model's own are not taken instead; the command it gives can be pasted
    # (`train` requires --advisor)
    with pytest.raises(DatasetError, match="train --advisor ansel --use-model-scores`"):
        select_targets(refs, "ansel")
    usable, left = select_targets(refs + [_ref(6)], "ansel")
    assert [r.source for r in usable] == ["human"] * 3 and len(left) == 3
    assert len(select_targets(refs, "ansel", use_model_scores=True)[0]) == 5  # the named option lets them in
    # Too few in all (the model's scores would not be enough either): that option is not advised, it would fail too.
    with pytest.raises(DatasetError, match="training needs at least 3: add reference photos") as refused:
        select_targets([_ref(1), _ref(2, "model")], "ansel")
    assert "use-model-scores" not in str(refused.value)
    # No comment from the curator: no sentence is made up in their name.
    report = target_report(_ref(7, comments={"lighting": "Zone V on the church."}), 24)
    comments = [v["comment"] for v in report["dimensions"].values()]
    assert report["dimensions"]["lighting"]["comment"] == "Zone V on the church."
    assert set(comments) - {"Zone V on the church."} == {NO_COMMENT} and report["summary"] == NO_COMMENT


def test_adapters_says_which_references_had_curator_scores(tmp_path, smoke_model_path) -> None:
    cfg = _home(tmp_path)
    refs = [{"sha256": f"{i:064x}", "path": f"/p/r{i}.png", "source": "human" if i < 3 else "model",
             "scores": {}} for i in range(5)]
    install_version(cfg, "ansel", fingerprint="f1", references=refs,
                    splits={"train": [refs[0]["sha256"]], "validation": [refs[1]["sha256"]],
                            "test": [refs[2]["sha256"]]})
    out = mondrian(cfg.home, smoke_model_path, "adapters", "--advisor", "ansel")
    assert out.returncode == 0, out.stderr
    assert "curator" in out.stdout.splitlines()[0] and " 3/5 " in out.stdout, out.stdout
    row = json.loads(mondrian(cfg.home, smoke_model_path, "adapters", "--json").stdout)[0]
    assert (row["curator_scored"], row["model_scored"], row["test"]) == (3, 2, 1), row


# ----------------------------------------------------------------------------------------- 3. the gate
def _ev(label: str, mae: float, rho: float | None, n: int = 8) -> dict:
    return {"label": label, "n": n, "valid": n, "smoke_ok": True, "mae_mean": mae, "spearman_mean": rho}


def test_the_gate_needs_enough_test_photos_a_margin_and_no_drop_in_spearman() -> None:
    from jobs.evaluate import Gate, decide

    gate = Gate(min_test_photos=5, mae_margin=0.1)
    assert decide(_ev("candidate", 1.0, 0.6), _ev("base", 2.0, 0.1), gate)["promoted"]
    few = decide(_ev("candidate", 0.5, 0.9, n=4), _ev("base", 2.0, 0.0, n=4), gate)
    assert not few["promoted"] and "too few test photos" in few["reason"] and "at least 5" in few["reason"]
    assert "about 25 curator-scored references in all" in few["reason"]  # what "add references" means, in numbers
    equal = decide(_ev("candidate", 1.0, 0.6), _ev("v0002", 1.0, 0.6), gate)
    assert not equal["promoted"] and "margin" in equal["reason"]  # equal is not better
    small = decide(_ev("candidate", 0.95, 0.6), _ev("v0002", 1.0, 0.6), gate)
    assert not small["promoted"], "an improvement smaller than the margin"
    drop = decide(_ev("candidate", 0.5, 0.3), _ev("v0002", 1.0, 0.6), gate)
    assert not drop["promoted"] and "Spearman drops" in drop["reason"]
    invalid = decide({**_ev("candidate", 0.5, 0.9), "smoke_ok": False, "valid": 6}, _ev("base", 2.0, 0.0), gate)
    assert not invalid["promoted"] and "smoke check failed: 6/8" in invalid["reason"]


def _photos(pred: np.ndarray, true: np.ndarray) -> list[dict]:
    return [{"sha256": str(i), "expected": dict(zip(DIMENSIONS, map(float, p))),
             "target": dict(zip(DIMENSIONS, map(int, t)))} for i, (p, t) in enumerate(zip(pred, true))]


def test_bootstrap_intervals_and_the_seeds_mse_improvement_are_printed() -> None:
    from jobs.evaluate import bootstrap, mae_mean, spearman_mean, table

    rng = np.random.default_rng(0)
    true = rng.integers(0, 11, (20, 8))
    good, bad = true + rng.normal(0, 0.5, true.shape), np.full(true.shape, 5.0) + rng.normal(0, 1, true.shape)
    per_dim = {d: {"mae": 1.0, "spearman": 0.5, "mse": 1.0} for d in DIMENSIONS}
    cand = {"label": "v0001", "n": 20, "valid": 20, "photos": _photos(good, true), "per_dim": per_dim,
            "mae_mean": mae_mean(good, true), "spearman_mean": spearman_mean(good, true),
            "mse": float(np.mean((good - true) ** 2))}
    base = {"label": "base", "n": 20, "valid": 20, "photos": _photos(bad, true), "per_dim": per_dim,
            "mae_mean": mae_mean(bad, true), "spearman_mean": spearman_mean(bad, true),
            "mse": float(np.mean((bad - true) ** 2))}
    ci = bootstrap(cand, base)
    lo, hi = ci["mae"]["candidate"]
    assert lo <= cand["mae_mean"] <= hi and hi - lo > 0
    assert ci["mae"]["difference"][1] < 0 < ci["spearman"]["difference"][0]  # clearly better on both
    text = table(cand, base)
    improvement = (1 - cand["mse"] / base["mse"]) * 100
    assert f"Improvement: {improvement:.1f} %" in text, text
    assert "bootstrap intervals" in text and "mean MAE" in text and "mean ρ" in text, text


# ------------------------------------------------------------------------------- 4. samples, time, base
def test_a_sample_without_its_image_tokens_is_refused(smoke_model_path) -> None:
    import datasets
    import mlx.optimizers as optim
    from mlx_vlm.trainer import Trainer, VLMTrainingArgs
    from PIL import Image

    from daemon.model.fitting import SampleError, _image_token_id, check_samples
    from daemon.model.runtime import ModelRuntime
    from jobs.dataset import chat_row

    rt = ModelRuntime.load(str(smoke_model_path), var_dir=smoke_model_path.parents[1], max_pixels=MAX_PIXELS)
    img = Image.new("RGB", (112, 112), (90, 120, 200))
    with_image = chat_row(img, "Critique.", '{"a": 1}')
    without = json.dumps([{"role": "user", "content": [{"type": "text", "text": "Critique."}]},
                          {"role": "assistant", "content": '{"a": 2}'}])
    features = datasets.Features({"images": datasets.List(datasets.Image()), "messages": datasets.Value("string")})
    data = datasets.Dataset.from_dict({"images": [with_image["images"], []],
                                       "messages": [with_image["messages"], without]}, features=features)
    trainer = Trainer(rt.model, VLMTrainingArgs(batch_size=1, iters=1, train_on_completions=True),
                      train_dataset=data, processing_class=rt.processor, optimizer=optim.Adam(learning_rate=1e-3))
    image_token = _image_token_id(rt.model)
    first = check_samples([trainer.train_dataset[0]], image_token_id=image_token, max_seq_length=8192)
    assert first["train_image_tokens_min"] == 16  # 112 x 112 px: (8 x 8 patches) / 4
    with pytest.raises(SampleError, match="sample 1 carries no image tokens"):
        check_samples(trainer.train_dataset, image_token_id=image_token, max_seq_length=8192)
    with pytest.raises(SampleError, match="more than max_seq_length 40"):
        check_samples([trainer.train_dataset[0]], image_token_id=image_token, max_seq_length=40)


def test_training_fails_with_the_reason_when_a_sample_would_be_cut(tmp_path, smoke_model_path) -> None:
    """The length check inside a real `mondrian train` (mlx-vlm would otherwise skip or cut the sample)."""
    cfg = _home(tmp_path, smoke_model_path)
    synthetic_advisor(cfg.home, "synth", n=4)
    index_references(load_config(cfg.home, env={}), ["synth"])
    _lora_table(cfg.home, iters=2, max_seq_length=40)
    out = mondrian(cfg.home, smoke_model_path, "train", "--advisor", "synth", timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "more than max_seq_length 40" in out.stderr and "raise [lora] max_seq_length" in out.stderr, out.stderr


def _trainers(home: Path) -> list[int]:
    """Training children of this home still running."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"jobs.train" in cmd and str(home).encode() in cmd:
                pids.append(int(proc.name))
    return pids


def test_a_hung_trainer_is_killed_at_its_time_limit_and_the_next_check_still_runs(tmp_path, smoke_model_path) -> None:
    from daemon.ledger import Ledger
    from jobs.nightly import NightlyTrainer

    cfg = _home(tmp_path, smoke_model_path)
    synthetic_advisor(cfg.home, "synth", n=4)
    index_references(load_config(cfg.home, env={}), ["synth"])
    _lora_table(cfg.home, iters=1_000_000, eval_every=500_000, max_minutes=0.15)  # would train for hours
    cfg = load_config(cfg.home, env={}, model=str(smoke_model_path))
    ledger = Ledger(cfg.db_path)
    nightly = NightlyTrainer(cfg, ledger)
    for run in (1, 2):
        outcomes: list = []
        checker = threading.Thread(target=lambda: outcomes.extend(nightly.run_check()), daemon=True)
        checker.start()
        wait_for(lambda: not checker.is_alive(), timeout=120, what=f"nightly check {run} to come back")
        assert len(outcomes) == 1 and not outcomes[0].ok, outcomes
        assert "time limit of 0.15 min" in outcomes[0].reason, outcomes[0].reason
        assert _trainers(cfg.home) == [], "the killed trainer is still running"
        state = ledger.events()["training"][0]
        assert state["state"] == "failed" and "time limit" in state["reason"]
    assert nightly.runs == 2


def test_a_new_base_model_makes_the_advisor_due_again(tmp_path, smoke_model_path) -> None:
    from jobs.dataset import collect_references, fingerprint
    from jobs.nightly import due_advisors

    cfg = _home(tmp_path, smoke_model_path)
    synthetic_advisor(cfg.home, "synth", n=3)
    ledger = index_references(load_config(cfg.home, env={}), ["synth"])
    fp = fingerprint(collect_references(cfg, "synth", ledger))
    install_version(cfg, "synth", fingerprint=fp, model_path=smoke_model_path)
    assert due_advisors(cfg, ledger) == []  # same references, same base: nothing to do
    install_version(cfg, "synth", fingerprint=fp, base_fingerprint="an older base model")
    due = due_advisors(cfg, ledger)
    assert [d.advisor for d in due] == ["synth"] and "base model changed" in due[0].reason, due


def test_changed_lora_settings_make_a_refused_advisor_due_again_as_the_refusal_advises(tmp_path,
                                                                                       smoke_model_path) -> None:
    """Refused for too few test photos, the photographer lowers `[lora] min_test_photos` as the reason advises:
    the next nightly check tries again on the same references (it skipped them as "already tried"). A setting
    that changes no adapter (keep_versions) does not."""
    from dataclasses import asdict

    from jobs.dataset import collect_references, fingerprint
    from jobs.nightly import due_advisors
    from jobs.train import TrainSettings

    cfg = _home(tmp_path, smoke_model_path)
    synthetic_advisor(cfg.home, "synth", n=3)
    ledger = index_references(load_config(cfg.home, env={}), ["synth"])
    fp = fingerprint(collect_references(cfg, "synth", ledger))
    install_version(cfg, "synth", fingerprint=fp, model_path=smoke_model_path, promoted=False,
                    settings=asdict(TrainSettings()))
    assert due_advisors(cfg, ledger) == []  # same references, base and settings: already tried
    _lora_table(cfg.home, keep_versions=2)
    assert due_advisors(load_config(cfg.home, env={}, model=str(smoke_model_path)), ledger) == []
    with open(cfg.home / "mondrian.toml", "a") as fh:
        fh.write("min_test_photos = 1\n")  # at the end of the [lora] table, as a person adds it
    due = due_advisors(load_config(cfg.home, env={}, model=str(smoke_model_path)), ledger)
    assert [d.advisor for d in due] == ["synth"], due
    assert "[lora] settings changed since v0001" in due[0].reason and "min_test_photos" in due[0].reason, due


def test_the_refusals_numbers_follow_the_configured_test_share() -> None:
    from jobs.evaluate import decide
    from jobs.train import TrainSettings

    gate = TrainSettings(holdout_fraction=0.34, min_test_photos=5).gate()
    cand = {"label": "candidate", "mae_mean": 1.0, "n": 2, "valid": 2, "smoke_ok": True}
    base = {"label": "base", "mae_mean": 2.0, "n": 2, "valid": 2}
    reason = decide(cand, base, gate)["reason"]
    assert "about 34% of them, so that takes about 15" in reason, reason


# ----------------------------------------------------------------------------- promote anyway (smoke)
def test_promote_anyway_promotes_what_the_gate_refuses_and_says_so(tmp_path, smoke_model_path) -> None:
    """The smoke model's demo needs an adapter: `--promote-anyway` (run_training(promote="always"))."""
    from daemon.model.adapter_store import AdapterStore

    cfg = _home(tmp_path, smoke_model_path)
    synthetic_advisor(cfg.home, "synth", n=4)
    index_references(load_config(cfg.home, env={}), ["synth"])
    _lora_table(cfg.home, iters=2, eval_every=2)
    out = mondrian(cfg.home, smoke_model_path, "train", "--advisor", "synth", timeout=300)
    assert out.returncode == 3 and "synth/v0001 not promoted" in out.stdout, out.stdout + out.stderr
    assert "too few test photos to judge: 2" in out.stdout and "Targets: all 4 references had curator" in out.stdout
    out = mondrian(cfg.home, smoke_model_path, "train", "--advisor", "synth", "--promote-anyway", timeout=300)
    assert out.returncode == 0 and "synth/v0002 promoted" in out.stdout, out.stdout + out.stderr
    version = AdapterStore(cfg.adapters_dir).current("synth")
    assert version.name == "v0002" and version.manifest["promotion"] == {"mode": "always", "forced": True,
                                                                         "gate_passed": False}
    assert "without the quality gate" in version.decision["reason"] and "too few test photos" in version.decision["reason"]
    splits = version.manifest["splits"]
    assert sorted(splits["train"] + splits["validation"] + splits["test"]) == \
        sorted(r["sha256"] for r in version.manifest["references"])
    assert [p["sha256"] for p in version.metrics["evaluation"]["candidate"]["photos"]] == splits["test"]
    assert version.metrics["training"]["samples"]["train_image_tokens_min"] > 0
    listing = mondrian(cfg.home, smoke_model_path, "adapters", "--advisor", "synth").stdout
    assert "promoted anyway" in listing, listing


# --------------------------------------------------------------------------------------------- 7. fuse
def test_fused_model_loads_in_mlx_vlm_and_scores_like_base_plus_adapter(tmp_path, plain_model_path) -> None:
    import mlx.core as mx
    import mlx_vlm
    from mlx_vlm.utils import prepare_inputs
    from PIL import Image

    cfg = _home(tmp_path, plain_model_path)
    model, processor = mlx_vlm.load(str(plain_model_path))
    src = random_adapter(tmp_path / "src", model, seed=7, strength=0.05)
    version = install_version(cfg, "ansel", src, model_path=plain_model_path)
    out = mondrian(cfg.home, plain_model_path, "adapters", "fuse", "--advisor", "ansel", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    fused_path = cfg.var_dir / "models" / "fused-ansel-v0001"
    assert f"fused into {fused_path}" in out.stdout and "same reports and expected scores" in out.stdout, out.stdout

    img = Image.fromarray((np.random.default_rng(3).random((112, 112, 3)) * 255).astype("uint8"))
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Critique."}]}],
        tokenize=False, add_generation_prompt=True)

    def logits(path: Path, adapter: Path | None = None) -> np.ndarray:
        m, p = mlx_vlm.load(str(path), adapter_path=str(adapter) if adapter else None)
        inp = prepare_inputs(p, images=[img], prompts=[prompt])
        lg = m(inp["input_ids"], inp["pixel_values"], inp["attention_mask"], image_grid_thw=inp["image_grid_thw"])
        lg = getattr(lg, "logits", lg)
        mx.eval(lg)
        return np.array(lg)

    with_adapter, fused, plain = logits(plain_model_path, version.path), logits(fused_path), logits(plain_model_path)
    assert np.abs(fused - with_adapter).max() < 1e-3, "the fused model does not compute what base + adapter does"
    assert np.abs(fused - plain).max() > 1e-2, "the fused model behaves like the base model"
    again = mondrian(cfg.home, plain_model_path, "adapters", "fuse", "--advisor", "ansel", timeout=300)
    assert again.returncode == 1 and "already exists" in again.stderr


# ---------------------------------------------------------------------------------- 5. the benchmark
def test_learning_benchmark_prints_every_figure_and_draws_the_curve(tmp_path) -> None:
    """Tiny settings (the real run is `python -m bench learning`): the figures, the JSON and the PNG."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "MONDRIAN_BENCH_VAR": str(tmp_path / "var")}
    out = subprocess.run([sys.executable, "-m", "bench", "learning", "--ns", "3", "--test", "3", "--steps", "2",
                          "--variants", "0", "--out", str(tmp_path / "out")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    for mode in ("baseline", "rag", "lora"):
        for key in (f"learning_srcc_{mode}_n3", f"learning_mae_{mode}_n3", f"learning_srcc_{mode}_n3_visual_balance",
                    f"learning_mae_{mode}_n3_lighting"):
            assert key in figures and np.isfinite(float(figures[key])), (key, out.stdout)
    data = json.loads((tmp_path / "out" / "learning.json").read_text())
    assert data["test"] == 3 and set(data["3"]) >= {"baseline", "rag", "lora"}
    assert (tmp_path / "out" / "learning.png").read_bytes()[:4] == b"\x89PNG"


def test_learning_benchmark_measures_only_the_modes_asked_for(tmp_path) -> None:
    """`--modes lora` (the reduced runs that tune training): lora's figures and its training history, and neither
    baseline's nor rag's figures nor a curve that would draw them as zeros. The batch is the one asked for even
    where the validation split holds fewer rows (one photo of three here): capped at the split's size, a seed whose
    split drew one photo trained on a quarter of the rows the others did."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "MONDRIAN_BENCH_VAR": str(tmp_path / "var")}
    out = subprocess.run([sys.executable, "-m", "bench", "learning", "--ns", "3", "--test", "3", "--steps", "2",
                          "--variants", "0", "--batch", "3", "--modes", "lora", "--out", str(tmp_path / "out")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    assert np.isfinite(float(figures["learning_srcc_lora_n3"])), out.stdout
    assert not [k for k in figures if "baseline" in k or "rag" in k], out.stdout
    data = json.loads((tmp_path / "out" / "learning.json").read_text())
    assert set(data["3"]) == {"lora", "training"} and data["3"]["training"]["history"][0]["step"] == 0
    split = json.loads(next((tmp_path / "out" / "work").rglob("mondrian_split.json")).read_text())["splits"]
    assert len(split["validation"]) < 3, split  # else the batch was never at risk of being capped
    assert data["3"]["training"]["batch_size"] == 3, data["3"]["training"]
    assert not (tmp_path / "out" / "learning.png").exists()
    refused = subprocess.run([sys.executable, "-m", "bench", "learning", "--batch", "0"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--batch 0" in refused.stderr, refused.stderr[-2000:]


def test_learning_benchmark_over_seeds_gives_the_mean_difference_and_its_intervals(tmp_path) -> None:
    """`--seeds 0,1`: each seed's figures, and the mean over seeds of each pair's SRCC difference with its two 95 %
    intervals (over the test photos, over the seeds), consistent with the seeds' own figures."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "MONDRIAN_BENCH_VAR": str(tmp_path / "var")}
    out = subprocess.run([sys.executable, "-m", "bench", "learning", "--ns", "3", "--test", "4", "--steps", "2",
                          "--variants", "0", "--seeds", "0,1", "--out", str(tmp_path / "out")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = {k: float(v) for k, v in (line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
               if k.startswith("learning_") and v.replace(".", "").replace("-", "").isdigit()}
    for a, b in (("lora", "rag"), ("rag", "baseline")):
        key = f"learning_{a}_minus_{b}_srcc_n3"
        per_seed = [figures[f"learning_srcc_{a}_n3_seed{s}"] - figures[f"learning_srcc_{b}_n3_seed{s}"] for s in (0, 1)]
        assert [figures[f"{key}_seed{s}"] for s in (0, 1)] == pytest.approx(per_seed, abs=2e-3), figures
        assert figures[key] == pytest.approx(sum(per_seed) / 2, abs=2e-3), figures
        assert figures[f"{key}_lo"] <= figures[f"{key}_hi"]
        assert figures[f"{key}_seed_lo"] <= figures[key] <= figures[f"{key}_seed_hi"]
    data = json.loads((tmp_path / "out" / "learning.json").read_text())
    assert data["summary"]["seeds"] == [0, 1] and set(data["per_seed"]) == {"0", "1"}
    # Each seed draws its own portfolio and test set.
    drawn = {s: {p.read_bytes() for p in (tmp_path / "out" / f"seed-{s}" / "work" / "test").glob("*.png")}
             for s in (0, 1)}
    assert len(drawn[0]) == 4 and not drawn[0] & drawn[1], "the seeds drew the same test photos"



def test_learning_benchmark_reuse_reads_back_a_finished_seed_only_at_the_same_settings_and_weights(tmp_path) -> None:
    """`--reuse`: a seed finished under --out is read back (same figures, not re-run) so a long run over many seeds
    can resume or be split; other settings, or a base whose weights changed, run the seed again."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "MONDRIAN_BENCH_VAR": str(tmp_path / "var")}
    out_dir = tmp_path / "out"

    def bench(*flags: str) -> tuple[dict[str, str], str]:
        out = subprocess.run([sys.executable, "-m", "bench", "learning", "--ns", "3", "--test", "4", "--variants", "0",
                              "--out", str(out_dir), *flags], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line), out.stderr

    first, _ = bench("--steps", "2", "--seeds", "0")
    seed0 = {k: v for k, v in first.items() if k.endswith("_seed0")}
    assert "learning_srcc_lora_n3_seed0" in seed0 and "learning_mae_rag_n3_visual_balance_seed0" in seed0, first
    stamp = (out_dir / "seed-0" / "learning.json").stat().st_mtime_ns

    both, log = bench("--steps", "2", "--seeds", "0,1", "--reuse")
    assert "learning seed 0: reused" in log and "learning seed 1: reused" not in log, log[-2000:]
    assert {k: both[k] for k in seed0} == seed0, "a reused seed must report the figures it was measured with"
    assert "learning_srcc_lora_n3_seed1" in both
    assert (out_dir / "seed-0" / "learning.json").stat().st_mtime_ns == stamp, "the reused seed was run again"
    assert json.loads((out_dir / "learning.json").read_text())["summary"]["seeds"] == [0, 1]

    _, log = bench("--steps", "3", "--seeds", "0", "--reuse")
    assert "learning seed 0: reused" not in log, "a seed measured with other settings was reused"
    _, log = bench("--steps", "3", "--seeds", "0", "--reuse")
    assert "learning seed 0: reused" in log, log[-2000:]

    # The base rebuilt with other weights at the same path: its sha256 no longer matches the recorded one.
    recorded = json.loads((out_dir / "seed-0" / "learning.json").read_text())
    weights = Path(recorded["model"]) / "model.safetensors"
    assert recorded["model_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    recorded["model_sha256"] = "0" * 64
    (out_dir / "seed-0" / "learning.json").write_text(json.dumps(recorded))
    _, log = bench("--steps", "3", "--seeds", "0", "--reuse")
    assert "learning seed 0: reused" not in log, "a seed measured on other weights was reused"