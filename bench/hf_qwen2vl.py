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


def load_transformers_model(model_dir: Path, *, threads: int | None = None) -> Any:
    """transformers' Qwen2VLForConditionalGeneration (float32, CPU, eval mode) holding the MLX checkpoint's weights.

    Every parameter must be filled: a name that does not map, a shape that differs, or a parameter transformers has
    and the checkpoint lacks raises instead of leaving a randomly initialised tensor in the model. Tensors are copied
    one at a time (no second copy of a 9 GB real-shape checkpoint in memory) into a model built without random
    initialisation (minutes at 2 B parameters otherwise)."""
    import torch
    from safetensors import safe_open
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights

    if threads:
        torch.set_num_threads(threads)
    config = Qwen2VLConfig.from_pretrained(str(model_dir))
    with no_init_weights():
        model = Qwen2VLForConditionalGeneration(config)
    model = model.to(torch.float32).eval()
    params = dict(model.named_parameters())
    filled: set[str] = set()
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    with torch.no_grad():
        for file in files:
            with safe_open(str(file), "numpy") as f:
                names = list(f.keys())
                quantized = [k for k in names if k.endswith(".scales")]
                if quantized:
                    raise ValueError(f"{len(quantized)} quantized tensors (e.g. {quantized[0]}) in {file}: compare "
                                     "with transformers on the float checkpoint")
                for name in names:
                    value = f.get_tensor(name)
                    if name == PATCH_EMBED:
                        value = np.transpose(value, (0, 4, 1, 2, 3))
                    target = hf_name(name)
                    if target not in params:
                        raise ValueError(f"{name} maps to {target}, which transformers' model does not have")
                    if tuple(params[target].shape) != value.shape:
                        raise ValueError(f"{target}: transformers expects {tuple(params[target].shape)}, the "
                                         f"checkpoint has {value.shape}")
                    params[target].copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))
                    filled.add(target)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        model.tie_weights()
        filled.add("lm_head.weight")
    missing = set(params) - filled
    if missing:
        raise ValueError(f"the checkpoint does not fill {len(missing)} transformers parameters, e.g. "
                         f"{sorted(missing)[:5]}")
    if tied and model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        raise ValueError("tie_word_embeddings is set but transformers did not tie lm_head to embed_tokens")
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
