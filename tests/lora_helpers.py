"""Helpers for the LoRA tests: synthetic advisors, random adapters, a trainable smoke base."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from bench.synthetic import hsv_to_rgb, plain_random_model, synthetic_photo  # noqa: F401 (shared with the benchmark)
from daemon.analysis.critique import DIMENSIONS

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_MAX_PIXELS = 112 * 112  # small photos: the adapter tests exercise the files, not the critique


def adapter_home(tmp_path: Path, model_path: Path, **settings: Any) -> Any:
    """A home (and its config) for adapter tests: no embeddings, small photos."""
    from daemon.config import load_config
    from tests.harness import make_home

    home = make_home(tmp_path / "home", **{"embeddings_enabled": False, "max_pixels": ADAPTER_MAX_PIXELS, **settings})
    return load_config(home, env={}, model=str(model_path))


def synthetic_advisor(home: Path, advisor: str = "synth", n: int = 40, seed: int = 0,
                      comment: str | None = "As I see it.") -> list[dict[str, int]]:
    """An advisor whose scores are a fixed function of what is visible, with curator sidecars:
    lighting = brightness decile, color_harmony = saturation decile, every other dimension 5."""
    folder = home / "advisors" / advisor
    refs = folder / "references"
    refs.mkdir(parents=True, exist_ok=True)
    (folder / "advisor.toml").write_text(f'id = "{advisor}"\nname = "{advisor.title()}"\n'
                                         'prompt = "You judge light and colour."\nflip_augmentation = true\n')
    rng = np.random.default_rng(seed)
    out = []
    old = time.time() - 120  # settled: the indexer waits for files still being written
    for i in range(n):
        light, colour = int(rng.integers(0, 10)), int(rng.integers(0, 10))
        value = (light + 0.5) / 10 + rng.uniform(-0.03, 0.03)
        sat = (colour + 0.5) / 10 + rng.uniform(-0.03, 0.03)
        photo = synthetic_photo(refs / f"r{i:03d}.png", value, sat, seed * 1000 + i)
        scores = {d: 5 for d in DIMENSIONS}
        scores.update(lighting=light, color_harmony=colour)
        doc: dict[str, Any] = {"scores": scores}
        if comment:
            doc["comments"] = {d: comment for d in DIMENSIONS}
        photo.with_suffix(".json").write_text(json.dumps(doc))
        for p in (photo, photo.with_suffix(".json")):
            os.utime(p, (old, old))
        out.append(scores)
    return out


def simple_advisor(home: Path, advisor: str, prompt: str = "You are exacting.") -> None:
    folder = home / "advisors" / advisor
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "advisor.toml").write_text(f'id = "{advisor}"\nname = "{advisor.title()}"\nprompt = "{prompt}"\n')


def index_references(cfg: Any, advisors: list[str] | None = None) -> Any:
    from daemon.ledger import Ledger
    from daemon.references.indexer import ReferenceIndexer

    ledger = Ledger(cfg.db_path)
    ReferenceIndexer(cfg, ledger).sync(advisors)
    return ledger


# -- adapters ----------------------------------------------------------------------------------------
def lora_keys(model: Any) -> list[str]:
    import mlx.nn as nn

    return sorted(n for n, m in model.named_modules() if n.startswith("language_model.")
                  and n.split(".")[-1] in TARGETS
                  and (isinstance(m, (nn.Linear, nn.QuantizedLinear)) or hasattr(m, "lora_a")))


def random_adapter(folder: Path, model: Any, *, rank: int = 8, scale: float = 2.0, seed: int = 0,
                   strength: float = 0.5, keys: list[str] | None = None) -> Path:
    """An adapter folder in mlx-vlm's format with random (strong) weights: outputs differ visibly per adapter."""
    import mlx.core as mx

    from daemon.model.adapters import AdapterSpec, save_adapter

    keys = keys or lora_keys(model)
    modules = dict(model.named_modules())
    rng = np.random.default_rng(seed)
    weights = {}
    for k in keys:
        base = modules[k].linear if hasattr(modules[k], "linear") else modules[k]
        out_dims, in_dims = base.weight.shape
        weights[f"{k}.lora_a"] = mx.array(rng.normal(0, in_dims ** -0.5, (in_dims, rank)).astype(np.float32))
        weights[f"{k}.lora_b"] = mx.array(rng.normal(0, strength, (rank, out_dims)).astype(np.float32))
    return save_adapter(folder, AdapterSpec("lora", rank, scale, tuple(keys)).to_config(), weights)


def install_version(cfg: Any, advisor: str, adapter_src: Path | None = None, *, fingerprint: str = "fp",
                    promoted: bool = True, base_fingerprint: str | None = None, model_path: Path | None = None,
                    mae: float = 1.0, references: list[dict[str, Any]] | None = None,
                    splits: dict[str, list[str]] | None = None, settings: dict[str, Any] | None = None) -> Any:
    """Commit a version folder the way training does (copying an adapter, or placeholder weights)."""
    from daemon.model.adapter_store import AdapterStore, atomic_write_json, base_model_fingerprint

    store = AdapterStore(cfg.adapters_dir)
    staging = store.new_staging(advisor)
    if adapter_src is not None:
        for name in ("adapter_config.json", "adapters.safetensors"):
            shutil.copyfile(adapter_src / name, staging / name)
    else:
        (staging / "adapter_config.json").write_text(json.dumps(
            {"fine_tune_type": "lora", "lora_parameters": {"rank": 8, "scale": 2.0, "keys": ["x"]}}))
        # Weights that fit the config (random values): the store lists a version whose files do not fit as unusable.
        rng = np.random.default_rng(list(fingerprint.encode()) + [time.time_ns()])
        safetensors.numpy.save_file({"x.lora_a": rng.standard_normal((16, 8), dtype=np.float32),
                                     "x.lora_b": rng.standard_normal((8, 16), dtype=np.float32)},
                                    str(staging / "adapters.safetensors"))
    base_fp = base_fingerprint or (base_model_fingerprint(model_path) if model_path else None)
    manifest = {"advisor": advisor, "fingerprint": fingerprint, "created_at": time.time(),
                "references": references or [], "held_out": (splits or {}).get("test", []),
                "base_model": {"fingerprint": base_fp, "spec": "test"}}
    if splits is not None:
        manifest["splits"] = splits
    if settings is not None:
        manifest["settings"] = settings  # the [lora] settings it was trained with, as training records them
    atomic_write_json(staging / "manifest.json", manifest)
    atomic_write_json(staging / "metrics.json", {"evaluation": {
        "candidate": {"label": "candidate", "mae_mean": mae, "n": 2, "valid": 2, "smoke_ok": True},
        "baseline": {"label": "base", "mae_mean": 2.0, "n": 2, "valid": 2}}})
    return store.commit(advisor, staging, {"promoted": promoted, "reason": "test"})
