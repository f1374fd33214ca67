"""Merge a LoRA adapter into the base weights: one model folder that `mlx_vlm.load` reads with no adapter.

The original design's "merge LoRA into the base weights for production": each LoRA layer becomes a plain
Linear whose weight is W + scale * (A B)^T (mlx-vlm's own `LoRALinear.fuse`), and the model is saved next to
a copy of the base's tokenizer, processor and config files. Fused models have been reported upstream to
behave silently like the base model (the delta lost on the way to disk, or re-quantized away), so a fused
folder is only kept after it was loaded back, fresh, and gave the same reports and the same expected scores
as the base model with the adapter swapped in, on the photos given.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .adapter_store import base_model_fingerprint

MARKER = "mondrian_fused.json"
TOLERANCE = 0.02  # expected scores (0-10) may differ this much: float rounding of W + AB against W x + A B x


class FuseError(RuntimeError):
    """The adapter could not be fused faithfully; nothing was left at the destination."""


@dataclass
class FuseResult:
    path: Path
    photos: int
    max_score_difference: float
    differs_from_base: bool
    checks: list[dict[str, Any]] = field(default_factory=list)


def _fuse_layers(model: Any) -> int:
    from mlx.utils import tree_unflatten

    fused = [(name, module.fuse()) for name, module in model.named_modules()
             if hasattr(module, "lora_a") and hasattr(module, "fuse")]
    if not fused:
        raise FuseError("the adapter installed no LoRA layers: nothing to fuse")
    model.update_modules(tree_unflatten(fused))
    return len(fused)


def fuse_adapter(base_path: Path, adapter: Path, dest: Path, *, probes: Sequence[Any], prompt: str,
                 schema: dict[str, Any], max_tokens: int, max_pixels: int, provenance: dict[str, Any]) -> FuseResult:
    """Write the fused model to `dest` (which must not exist) and check it on `probes` (PIL images)."""
    import mlx_vlm
    from mlx_vlm.utils import save_weights

    from .runtime import ModelRuntime

    base_path, adapter, dest = Path(base_path), Path(adapter), Path(dest)
    if dest.exists():
        raise FuseError(f"{dest} already exists; remove it or choose another --out")
    if not probes:
        raise FuseError("no photo to check the fused model on")
    tmp = dest.with_name(f".{dest.name}.fusing")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model, _ = mlx_vlm.load(str(base_path), adapter_path=str(adapter))
        layers = _fuse_layers(model)
        shutil.copytree(base_path, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
        save_weights(tmp, model)
        del model
        (tmp / MARKER).write_text(json.dumps({**provenance, "fused_layers": layers, "fused_at": time.time(),
                                              "base_fingerprint": base_model_fingerprint(base_path)}, indent=2))

        # The check: a fresh load of the fused folder against the base with the adapter swapped in.
        reference = ModelRuntime.load(str(base_path), var_dir=tmp.parent, max_pixels=max_pixels)
        fused = ModelRuntime.load(str(tmp), var_dir=tmp.parent, max_pixels=max_pixels)
        checks, worst, differs = [], 0.0, False
        for i, image in enumerate(probes):
            want = reference.generate_json(image, prompt, schema, max_tokens=max_tokens, adapter=adapter)
            want_scores = reference.expected_scores(image, prompt, want.text, adapter=adapter)
            plain = reference.generate_json(image, prompt, schema, max_tokens=max_tokens)
            plain_scores = reference.expected_scores(image, prompt, plain.text)
            got = fused.generate_json(image, prompt, schema, max_tokens=max_tokens)
            got_scores = fused.expected_scores(image, prompt, got.text)
            diff = max(abs(got_scores[k] - want_scores[k]) for k in want_scores)
            worst = max(worst, diff)
            differs = differs or plain.text != want.text or \
                max(abs(plain_scores[k] - want_scores[k]) for k in want_scores) > TOLERANCE
            checks.append({"photo": i, "same_report": got.text == want.text, "max_score_difference": round(diff, 5),
                           "adapter_scores": want_scores, "fused_scores": got_scores, "base_scores": plain_scores})
            if got.text != want.text or diff > TOLERANCE:
                like_base = got.text == plain.text and \
                    max(abs(got_scores[k] - plain_scores[k]) for k in got_scores) <= TOLERANCE
                raise FuseError(
                    f"the fused model does not score like base + adapter on check photo {i + 1}: "
                    f"{'it behaves like the base model (the adapter was lost in fusing)' if like_base else ''}"
                    f"{'' if like_base else 'a different report' if got.text != want.text else ''}"
                    f"{'' if like_base or got.text != want.text else f'scores differ by up to {diff:.3f}'}; "
                    f"nothing was written (a quantized base can lose a small adapter when re-quantized)")
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FuseResult(path=dest, photos=len(probes), max_score_difference=round(worst, 5),
                      differs_from_base=differs, checks=checks)
