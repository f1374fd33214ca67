"""A synthetic advisor whose taste is visible in the pixels, and a smoke-sized base model LoRA can train.

Shared by the learning benchmark (`bench/learning.py`) and the LoRA tests (tests/lora_helpers.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

MASS_WIDTH = 1 / 8  # of the frame: the dark bar whose place decides visual balance
MAX_OFFSET = 0.43  # how far from the centre the bar's centre may lie (it stays inside the frame)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], -1)


def synthetic_photo(path: Path, value: float, saturation: float, seed: int, size: int = 112,
                    mass_at: float | None = None, masses: tuple[float, float] | None = None,
                    side_by_side: bool = False) -> Path:
    """A two-band photo: the top half a neutral grey of brightness `value` (HSV value), the bottom half an
    orange of `saturation` at a fixed brightness, plus grain. The bands keep the two
    quantities independent and visible: in one dark frame, saturation would vanish from the RGB values.
    With `mass_at` (0..1, left to right), a dark vertical bar centred there: where the visual mass sits,
    which only the whole frame tells (the balance rule). With `masses` (shares of the width), two dark bars
    in the outer token columns, left and right. `side_by_side` turns the whole frame a quarter (bands left and
    right, the bar horizontal): the same rules along the other axis."""
    rng = np.random.default_rng(seed)
    half = (size // 2, size)
    top = np.stack([np.zeros(half), np.zeros(half), np.full(half, value) + rng.normal(0, 0.01, half)], -1)
    bottom = np.stack([np.full(half, 0.05), np.full(half, saturation) + rng.normal(0, 0.01, half),
                       np.full(half, 0.8) + rng.normal(0, 0.01, half)], -1)
    hsv = np.concatenate([top, bottom], 0).clip(0, 1)
    if mass_at is not None:
        width = max(2, round(size * MASS_WIDTH))
        left = int(round(mass_at * size - width / 2))
        hsv[:, max(0, left):max(0, left) + width, 2] = 0.05
    if masses is not None:
        for centre, share in zip(SIDE_CENTRES, masses):
            width = max(1, round(size * share))
            left = int(round(centre * size - width / 2))
            hsv[:, max(0, left):left + width, 2] = 0.05
    if side_by_side:
        hsv = hsv.transpose(1, 0, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((hsv_to_rgb(hsv) * 255 + 0.5).astype("uint8")).save(path)
    return path


SIDE_CENTRES = (0.125, 0.875)  # the middle of the outer token columns (28 px of 112)
MAX_MASS_GAP = 0.16  # of the frame's width: the largest difference between the two bars
BALANCE_RULES = ("centre", "centre-vertical", "two-masses")


def mass_balance_score(masses: tuple[float, float]) -> int:
    """9 for two bars of one width, down to 0 at the largest difference: left/right mass, either side."""
    return 9 - min(9, int(abs(masses[0] - masses[1]) / MAX_MASS_GAP * 10))


def balance_score(mass_at: float) -> int:
    """9 for a bar in the middle, down to 0 at the largest offset: the decile of the distance from the centre."""
    return 9 - min(9, int(abs(mass_at - 0.5) / MAX_OFFSET * 10))


def draw_taste(rng: np.random.Generator, balance: str | None = "centre") -> tuple[dict[str, int], dict[str, Any]]:
    """(the advisor's scores, what to draw): lighting = brightness decile, color_harmony = saturation decile,
    visual_balance by one of BALANCE_RULES (None: no balance rule); every other dimension 5.

    centre: how central one dark bar stands, left to right; centre-vertical: the same, top to bottom (the
    frame turned); two-masses: how equal two bars at the left and right edges are (mass on either side)."""
    from daemon.analysis.critique import DIMENSIONS

    if balance is not None and balance not in BALANCE_RULES:
        raise ValueError(f"balance rule {balance!r}: choose one of {', '.join(BALANCE_RULES)} or None")
    light, colour = int(rng.integers(0, 10)), int(rng.integers(0, 10))
    draw: dict[str, Any] = {"value": (light + 0.5) / 10 + rng.uniform(-0.03, 0.03),
                            "saturation": (colour + 0.5) / 10 + rng.uniform(-0.03, 0.03)}
    scores = {d: 5 for d in DIMENSIONS}
    scores.update(lighting=light, color_harmony=colour)
    if balance == "two-masses":
        b = int(rng.integers(0, 10))
        gap = (9 - b + rng.uniform(0.15, 0.85)) / 10 * MAX_MASS_GAP
        mean = rng.uniform(gap / 2 + 0.02, 0.2 - gap / 2)
        sign = 1 if rng.uniform() < 0.5 else -1
        draw["masses"] = (mean + sign * gap / 2, mean - sign * gap / 2)
        scores["visual_balance"] = mass_balance_score(draw["masses"])
    elif balance in ("centre", "centre-vertical"):
        draw["side_by_side"] = balance == "centre-vertical"
        b = int(rng.integers(0, 10))
        offset = (9 - b + rng.uniform(0.15, 0.85)) / 10 * MAX_OFFSET
        draw["mass_at"] = 0.5 + offset * (1 if rng.uniform() < 0.5 else -1)
        scores["visual_balance"] = balance_score(draw["mass_at"])
    return scores, draw


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
    cfg: Any = json.loads(json.dumps(config))
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
