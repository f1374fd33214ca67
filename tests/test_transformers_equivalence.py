"""transformers' Qwen2-VL, given the MLX checkpoint's weights through bench/hf_qwen2vl.py, computes the same logits as
mlx-vlm for the same prompt and photo: so `python -m bench transformers_cmp` times the same model on both sides.

Needs the `bench` extra (torch), which the test venv leaves out on purpose (with torch installed, transformers'
processors import it in every daemon). `make bench` installs it in its own venv and runs this test before the
benchmarks with MONDRIAN_REQUIRE_TORCH=1, where a missing torch fails instead of skipping: an unchecked comparison
would time two different models.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

PROMPT = "Critique this photograph: composition, light, colour."


def require_torch() -> Any:
    try:
        import torch
    except ImportError:
        reason = "needs the bench extra (torch): `make bench` runs it in .venv-bench"
        if os.environ.get("MONDRIAN_REQUIRE_TORCH"):
            pytest.fail(reason + "; the transformers comparison must not be timed unchecked")
        pytest.skip(reason)
    return torch


def _undamped(smoke: Path, dest: Path) -> Path:
    """The smoke model with its residual branches at full strength: attention, positions (M-RoPE) and the image then
    move the logits a lot, so a wrong name, layout or position shows (the smoke model's damped layers hide them)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(smoke, dest)
    weights = load_file(str(smoke / "model.safetensors"))
    for name in weights:
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            weights[name] = weights[name] * 20.0
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "mlx"})
    return dest


def _tied(smoke: Path, dest: Path) -> Path:
    """The smoke model with lm_head tied to the embedding table, as the real Qwen2-VL-2B (and the real-shape bench
    model) has it: the checkpoint then has no lm_head of its own and transformers must tie it."""
    import json

    from safetensors.numpy import load_file, save_file

    shutil.copytree(smoke, dest)
    weights = load_file(str(smoke / "model.safetensors"))
    del weights["language_model.lm_head.weight"]
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "mlx"})
    config = json.loads((dest / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def _logits(path: Path, images: list[Any]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per image: (mlx-vlm's logits, transformers' logits) over every prompt position."""
    torch = require_torch()
    import mlx.core as mx
    import mlx_vlm

    from bench.hf_qwen2vl import load_transformers_model, torch_inputs
    from daemon.model.reuse import _inputs

    model, processor = mlx_vlm.load(str(path))
    hf = load_transformers_model(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ours, theirs = [], []
    for image in images:
        inputs = _inputs(processor, model, image, prompt)
        out = model(inputs["input_ids"], inputs["pixel_values"], inputs.get("attention_mask"),
                    image_grid_thw=inputs["image_grid_thw"])
        ours.append(np.array(out.logits.astype(mx.float32))[0])
        with torch.no_grad():
            theirs.append(hf(**torch_inputs(inputs, model.config.image_token_id)).logits[0].numpy())
    return ours, theirs


@pytest.mark.parametrize("variant", ["smoke", "undamped", "tied"])
def test_transformers_computes_the_same_logits_as_mlx(variant: str, smoke_model_path: Path, tmp_path: Path) -> None:
    require_torch()
    from PIL import Image, ImageOps

    from daemon.resources import samples_dir

    path = {"smoke": lambda: smoke_model_path, "undamped": lambda: _undamped(smoke_model_path, tmp_path / "undamped"),
            "tied": lambda: _tied(smoke_model_path, tmp_path / "tied")}[variant]()
    samples = sorted(samples_dir().glob("*.jpg"))
    images = [ImageOps.fit(Image.open(p).convert("RGB"), (224, 168)) for p in samples[:2]]
    ours, theirs = _logits(path, images)
    for mine, hf in zip(ours, theirs):
        assert mine.shape == hf.shape
        scale, diff = float(np.abs(mine).max()), float(np.abs(mine - hf).max())
        assert diff <= 1e-4 * scale, f"{variant}: logits differ by {diff:.3g} (largest logit {scale:.3g})"
    # The photo reaches the logits on both sides, so the comparison covers the vision tower's weights too.
    image_effect = float(np.abs(ours[0] - ours[1]).max())
    assert image_effect > 100 * float(np.abs(ours[0] - theirs[0]).max()), image_effect
