"""The project's MLX Qwen2-VL checkpoint as Hugging Face transformers' `Qwen2VLForConditionalGeneration` (PyTorch).

Used by `bench/transformers_cmp.py` and tests/test_transformers_equivalence.py, so that transformers runs the very
weights Mondrian runs (the random smoke model, or the random real-shape one). Needs the `bench` extra (torch);
nothing in the daemon imports this.

Names: mlx-vlm's `sanitize` maps the Hugging Face checkpoint names onto its own; this is the inverse, for the
transformers 5 module tree:
    vision_tower.X                  -> model.visual.X   (patch_embed.proj.weight: MLX (out, t, h, w, in) -> torch (out, in, t, h, w))
    language_model.model.X          -> model.language_model.X
    language_model.lm_head.weight   -> lm_head.weight    (absent when tie_word_embeddings: transformers ties it)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

PATCH_EMBED = "vision_tower.patch_embed.proj.weight"


def hf_name(mlx_name: str) -> str:
    """The transformers 5 parameter name of one mlx-vlm Qwen2-VL parameter name (ValueError for anything else)."""
    if mlx_name.startswith("vision_tower."):
        return "model.visual." + mlx_name[len("vision_tower."):]
    if mlx_name.startswith("language_model.model."):
        return "model.language_model." + mlx_name[len("language_model.model."):]
    if mlx_name == "language_model.lm_head.weight":
        return "lm_head.weight"
    raise ValueError(f"no transformers name for the MLX parameter {mlx_name!r}: not a Qwen2-VL checkpoint?")


def hf_state_dict(mlx_weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The MLX checkpoint's tensors under transformers' names and layouts (float32 numpy arrays)."""
    quantized = sorted(k for k in mlx_weights if k.endswith(".scales"))
    if quantized:
        raise ValueError(f"{len(quantized)} quantized tensors (e.g. {quantized[0]}): compare with transformers on "
                         "the float checkpoint (dequantize it first)")
    out: dict[str, np.ndarray] = {}
    for name, value in mlx_weights.items():
        if name == PATCH_EMBED:
            value = np.ascontiguousarray(np.transpose(value, (0, 4, 1, 2, 3)))
        out[hf_name(name)] = np.asarray(value, dtype=np.float32)
    return out


def load_mlx_weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    weights: dict[str, np.ndarray] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        weights.update(load_file(str(file)))
    if not weights:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    return weights


def load_transformers_model(model_dir: Path, *, threads: int | None = None) -> Any:
    """transformers' Qwen2VLForConditionalGeneration (float32, CPU, eval mode) holding the MLX checkpoint's weights.

    Every parameter must be filled: a name that does not map, or one transformers has and the checkpoint lacks,
    raises instead of leaving a randomly initialised tensor in the model."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    if threads:
        torch.set_num_threads(threads)
    config = Qwen2VLConfig.from_pretrained(str(model_dir))
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32).eval()
    state = {k: torch.from_numpy(v) for k, v in hf_state_dict(load_mlx_weights(model_dir)).items()}
    expected = set(model.state_dict())
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = expected - set(state) - ({"lm_head.weight"} if tied else set())
    unexpected = set(state) - expected
    if missing or unexpected:
        raise ValueError(f"MLX -> transformers name mapping is incomplete: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    for name, tensor in model.state_dict().items():
        if name in state and tuple(tensor.shape) != tuple(state[name].shape):
            raise ValueError(f"{name}: transformers expects {tuple(tensor.shape)}, the checkpoint has "
                             f"{tuple(state[name].shape)}")
    model.load_state_dict(state, strict=False)
    if tied:
        model.tie_weights()
    return model


def torch_inputs(mlx_inputs: dict[str, Any], image_token_id: int) -> dict[str, Any]:
    """mlx-vlm's `prepare_inputs` output as the keyword arguments transformers' forward/generate takes.

    transformers 5 also wants `mm_token_type_ids` (1 at image tokens) to compute the multimodal RoPE positions."""
    import torch

    ids = np.array(mlx_inputs["input_ids"]).astype(np.int64)
    mask = mlx_inputs.get("attention_mask")
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(np.array(mask).astype(np.int64) if mask is not None
                                           else np.ones_like(ids)),
        "pixel_values": torch.from_numpy(np.array(mlx_inputs["pixel_values"]).astype(np.float32)),
        "image_grid_thw": torch.from_numpy(np.array(mlx_inputs["image_grid_thw"]).astype(np.int64)),
        "mm_token_type_ids": torch.from_numpy((ids == image_token_id).astype(np.int64)),
    }
