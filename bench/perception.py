"""A smoke-sized base that has seen pictures before the advisor's: generic captions, fully trained.

The learning benchmark's plain random base cannot tell image columns apart (RESULTS.md, `learning`): its vision
tower has relative positions only and Qwen2-VL's mRoPE gives the width the slowest rotations, so no adapter
learns a whole-image rule on it. A real Qwen2-VL was pretrained on captions and boxes before anyone adapts it.
This module gives the smoke architecture a small version of that: full training (every weight, vision tower
included) on generic scenes it captions with what a pretrained model reads off a picture: how bright and how
saturated each region is, and where an object stands. The scenes are not the advisor's photos and the captions
carry no score: the advisor's taste (which band is judged, that a central bar is good) is left to learn.

Scenes: a background of one random colour, or split in two halves (top/bottom or left/right) of two random
colours, and one bar or box of a random colour, size and place. Caption, all deciles 0-9:
`top: brightness 3, saturation 7. bottom: brightness 5, saturation 2. object: x 8, y 4, brightness 1.`

Measured (RESULTS.md, `learning`): the defaults (1,200 steps of 8 over 2,000 scenes, 15 min on the 2-core CPU) teach
brightness but not yet where things are; built once into <var>/models/smoke-perception and reused.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .synthetic import hsv_to_rgb

PROMPT = "Describe the picture: each region's brightness and saturation, and where the object is."
SIZE = 112


def _decile(x: float) -> int:
    return min(9, max(0, int(x * 10)))


def scene(rng: np.random.Generator, size: int = SIZE) -> tuple[Image.Image, str]:
    """One generic picture and its caption."""
    split = rng.choice(["none", "rows", "columns"])
    colours = [(rng.uniform(), rng.uniform(0.05, 0.95), rng.uniform(0.05, 0.95)) for _ in range(2)]
    hsv = np.empty((size, size, 3))
    hsv[:] = colours[0]
    half = size // 2
    if split == "rows":
        hsv[half:] = colours[1]
        names = ("top", "bottom")
    elif split == "columns":
        hsv[:, half:] = colours[1]
        names = ("left", "right")
    else:
        names = ("whole",)
    hsv[..., 1:] += rng.normal(0, 0.01, (size, size, 2))
    parts = [f"{name}: brightness {_decile(c[2])}, saturation {_decile(c[1])}." for name, c in zip(names, colours)]

    kind = rng.choice(["vertical", "horizontal", "box"])
    w, h = {"vertical": (rng.uniform(0.06, 0.25), 1.0), "horizontal": (1.0, rng.uniform(0.06, 0.25)),
            "box": (rng.uniform(0.1, 0.4), rng.uniform(0.1, 0.4))}[kind]
    cx = rng.uniform(w / 2, 1 - w / 2) if w < 1 else 0.5
    cy = rng.uniform(h / 2, 1 - h / 2) if h < 1 else 0.5
    value = rng.choice([rng.uniform(0.0, 0.15), rng.uniform(0.85, 1.0)])  # a dark or a light object stands out
    x0, x1 = int(round((cx - w / 2) * size)), int(round((cx + w / 2) * size))
    y0, y1 = int(round((cy - h / 2) * size)), int(round((cy + h / 2) * size))
    hsv[y0:y1, x0:x1] = (rng.uniform(), rng.uniform(0, 0.3), value)
    where = [] if kind == "horizontal" else [f"x {_decile(cx)}"]
    where += [] if kind == "vertical" else [f"y {_decile(cy)}"]
    parts.append(f"object: {', '.join(where)}, brightness {_decile(value)}.")
    rgb = (hsv_to_rgb(hsv.clip(0, 1)) * 255 + 0.5).astype("uint8")
    return Image.fromarray(rgb), " ".join(parts)


def _rows(n: int, seed: int) -> dict[str, list[Any]]:
    from jobs.dataset import chat_row

    rng = np.random.default_rng(seed)
    cols: dict[str, list[Any]] = {"images": [], "messages": []}
    for _ in range(n):
        image, caption = scene(rng)
        row = chat_row(image, PROMPT, caption)
        cols["images"].append(row["images"])
        cols["messages"].append(row["messages"])
    return cols


def perception_model(plain: Path, dest: Path, *, scenes: int = 2000, steps: int = 1200, lr: float = 3e-4,
                     batch: int = 8, seed: int = 0, log: Any = print) -> Path:
    """`plain` (a random smoke-architecture checkpoint), fully trained on generic captions, saved at `dest`."""
    import datasets
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_vlm.trainer import Trainer, TrainingCallback, VLMTrainingArgs, prepare_model_for_training
    from mlx_vlm.utils import save_weights

    from daemon.model.runtime import ModelRuntime

    if (dest / "model.safetensors").is_file():
        return dest
    features = datasets.Features({"images": datasets.List(datasets.Image()), "messages": datasets.Value("string")})
    train = datasets.Dataset.from_dict(_rows(scenes, seed), features=features)
    validation = datasets.Dataset.from_dict(_rows(64, seed + 1), features=features)
    runtime = ModelRuntime.load(str(plain), var_dir=dest.parent, max_pixels=SIZE * SIZE)
    model = runtime.model
    mx.random.seed(seed)
    prepare_model_for_training(model, train_type="full", verbose=False)
    args = VLMTrainingArgs(batch_size=batch, iters=steps, val_batches=-1, steps_per_report=50,
                           steps_per_eval=max(50, steps // 6), steps_per_save=steps + 1,
                           adapter_file=str(dest.parent / "perception-scratch.safetensors"),
                           max_seq_length=2048, train_on_completions=True, cache_size=256)
    started = time.time()

    class Progress(TrainingCallback):
        def on_train_loss_report(self, info: dict) -> None:
            log(f"perception: step {info.get('iteration')}/{steps} loss {info.get('train_loss'):.3f} "
                f"({time.time() - started:.0f} s)")

        def on_val_loss_report(self, info: dict) -> None:
            log(f"perception: step {info.get('iteration')} validation loss {info.get('val_loss'):.3f}")

    schedule = optim.cosine_decay(lr, steps, lr / 10)
    trainer = Trainer(model, args, train_dataset=train, eval_dataset=validation,
                      processing_class=runtime.processor, optimizer=optim.Adam(learning_rate=schedule),
                      training_callback=Progress(), seed=seed)
    trainer.train()
    model.eval()
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(plain, tmp, ignore=shutil.ignore_patterns("*.safetensors"))
    save_weights(tmp, model)
    marker = json.loads((tmp / "mondrian_smoke.json").read_text())
    marker.update(weights="perception-pretrained", scenes=scenes, steps=steps, lr=lr, batch=batch, seed=seed,
                  train_seconds=round(time.time() - started))
    (tmp / "mondrian_smoke.json").write_text(json.dumps(marker))
    (dest.parent / "perception-scratch.safetensors").unlink(missing_ok=True)
    tmp.rename(dest)
    return dest
