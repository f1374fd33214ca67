"""Helpers for the LoRA tests: synthetic advisors, random adapters, a trainable smoke base."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from daemon.analysis.critique import DIMENSIONS

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -- images whose lighting and colour are known ------------------------------------------------------
def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], -1)


def synthetic_photo(path: Path, value: float, saturation: float, seed: int, size: int = 112) -> Path:
    """A two-band photo: the top half a neutral grey of brightness `value` (HSV value), the bottom half an
    orange of `saturation` at a fixed brightness, plus grain. The bands keep the two
    quantities independent and visible: in one dark frame, saturation would vanish from the RGB values."""
    rng = np.random.default_rng(seed)
    half = (size // 2, size)
    top = np.stack([np.zeros(half), np.zeros(half), np.full(half, value) + rng.normal(0, 0.01, half)], -1)
    bottom = np.stack([np.full(half, 0.05), np.full(half, saturation) + rng.normal(0, 0.01, half),
                       np.full(half, 0.8) + rng.normal(0, 0.01, half)], -1)
    hsv = np.concatenate([top, bottom], 0).clip(0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((hsv_to_rgb(hsv) * 255 + 0.5).astype("uint8")).save(path)
    return path


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


# -- a base model LoRA can actually train ------------------------------------------------------------
def plain_random_model(smoke: Path, dest: Path, seed: int = 1, logit_scale: float = 3.0) -> Path:
    """The smoke checkpoint's architecture, tokenizer and processor with plain random weights.

    The smoke checkpoint's lm_head is a hand-built bigram model of a small English corpus: every token
    absent from that corpus (all ten digits among them) gets the same output row, so no adapter on the
    language model's layers can make it prefer one score over another. A plain random initialisation
    gives every token its own row; its output head is scaled by `logit_scale` so that logits have the spread
    of a trained model's (std ~2 rather than a fresh init's ~0.6): LoRA, which cannot touch the head,
    otherwise needs several times more steps to become confident about anything.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.models import qwen2_vl
    from mlx_vlm.utils import update_module_configs

    if (dest / "model.safetensors").is_file():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(smoke, tmp)
    config = json.loads((tmp / "config.json").read_text())
    cfg = json.loads(json.dumps(config))
    model_config = update_module_configs(qwen2_vl.ModelConfig.from_dict(cfg), qwen2_vl, cfg, ["text", "vision"])
    mx.random.seed(seed)
    model = qwen2_vl.Model(model_config)
    model.language_model.lm_head.weight = model.language_model.lm_head.weight * logit_scale
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(list(weights.values()))
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
    marker = json.loads((tmp / "mondrian_smoke.json").read_text())
    marker.update(weights="plain random", seed=seed, logit_scale=logit_scale)
    (tmp / "mondrian_smoke.json").write_text(json.dumps(marker))
    tmp.rename(dest)
    return dest


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
                    mae: float = 1.0) -> Any:
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
        (staging / "adapters.safetensors").write_bytes(os.urandom(4096))
    base_fp = base_fingerprint or (base_model_fingerprint(model_path) if model_path else None)
    atomic_write_json(staging / "manifest.json", {"advisor": advisor, "fingerprint": fingerprint,
                                                  "created_at": time.time(), "references": [], "held_out": [],
                                                  "base_model": {"fingerprint": base_fp, "spec": "test"}})
    atomic_write_json(staging / "metrics.json", {"evaluation": {
        "candidate": {"label": "candidate", "mae_mean": mae, "n": 2, "valid": 2, "smoke_ok": True},
        "baseline": {"label": "base", "mae_mean": 2.0, "n": 2, "valid": 2}}})
    return store.commit(advisor, staging, {"promoted": promoted, "reason": "test"})
