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
brightness but not yet where things are; built once into <var>/models/smoke-perception and reused. The base the
learning figures use was built on the lent GPU, both stages in one process (21 min on an H200; longer than a device
command may run, so started with setsid and collected by later commands, RESULTS.md says how):
`python3 -m bench.perception .mlxc/models/smoke-plain /tmp/sp 2400 32 8000 5e-4 --stages 2 --no-check`.
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


def _examples(processor: Any, n: int, seed: int) -> tuple[list[tuple[Any, Any, Any]], int]:
    """`n` scenes encoded as the model reads them: (input ids, pixel patches, image grid) each, and how many tokens
    the prompt takes (the same for every scene: one size of picture, one prompt). Captions end with the turn's end."""
    import numpy as np

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    rng = np.random.default_rng(seed)
    out, n_prompt = [], 0
    for i in range(n):
        image, caption = scene(rng)
        if i == 0:
            n_prompt = len(processor(text=[prompt], images=[image], return_tensors="np")["input_ids"][0])
        enc = processor(text=[prompt + caption + "<|im_end|>"], images=[image], return_tensors="np")
        out.append((enc["input_ids"][0], enc["pixel_values"], enc["image_grid_thw"]))
    return out, n_prompt


def perception_model(plain: Path, dest: Path, *, scenes: int = 2000, steps: int = 1200, lr: float = 3e-4,
                     batch: int = 8, seed: int = 0, stages: int = 1, log: Any = print) -> Path:
    """`plain` (a random smoke-architecture checkpoint), fully trained on generic captions, saved at `dest`.

    A plain MLX loop (no mlx-vlm Trainer, no HF datasets): it runs wherever mlx and mlx-vlm load the model, the lent
    GPU included. Captions are right-padded within a batch, and only caption tokens count in the loss.
    `stages` > 1 repeats the training from the weights reached (a fresh Adam, the cosine schedule and the batch order
    restarted: the same as running this again with the last stage's output as `plain`); each stage but the last is
    also saved, at `<dest>-stage<k>`."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx_vlm
    from mlx.utils import tree_flatten

    if (dest / "model.safetensors").is_file():
        return dest
    started = time.time()
    model, processor = mlx_vlm.load(str(plain))
    data, n_prompt = _examples(processor, scenes, seed)
    log(f"perception: {scenes} scenes encoded ({time.time() - started:.0f} s), {n_prompt} prompt tokens each")
    pad = processor.tokenizer.pad_token_id or 0
    mx.random.seed(seed)
    model.unfreeze()
    model.train()

    def loss_fn(model: Any, ids: Any, pixels: Any, grid: Any, weights: Any) -> Any:
        out = model(ids, pixels, image_grid_thw=grid)
        logits = getattr(out, "logits", out)[:, :-1]
        ce = nn.losses.cross_entropy(logits.astype(mx.float32), ids[:, 1:], reduction="none")
        return (ce * weights).sum() / weights.sum()

    step_fn = nn.value_and_grad(model, loss_fn)
    for stage in range(1, stages + 1):
        _train(model, step_fn, data, n_prompt, pad, steps=steps, lr=lr, batch=batch, seed=seed, started=started,
               log=log, label=f"stage {stage}/{stages} " if stages > 1 else "")
        model.eval()
        _save(model, plain, dest if stage == stages else dest.with_name(f"{dest.name}-stage{stage}"),
              dict(weights="perception-pretrained", scenes=scenes, steps=steps, lr=lr, batch=batch, seed=seed,
                   stages=stage, train_seconds=round(time.time() - started), device=str(mx.default_device()),
                   parameters=sum(v.size for _, v in tree_flatten(model.parameters()))))
        model.train()
    model.eval()
    return dest


def _train(model: Any, step_fn: Any, data: list[tuple[Any, Any, Any]], n_prompt: int, pad: int, *, steps: int,
           lr: float, batch: int, seed: int, started: float, log: Any, label: str = "") -> None:
    """One stage: `steps` steps of Adam on a cosine schedule from `lr` to `lr / 10`."""
    import mlx.core as mx
    import mlx.optimizers as optim

    optimizer = optim.Adam(learning_rate=optim.cosine_decay(lr, steps, lr / 10))
    order = np.random.default_rng(seed + 1)
    recent: list[float] = []
    for step in range(1, steps + 1):
        rows = [data[i] for i in order.choice(len(data), batch, replace=False)]
        width = max(len(r[0]) for r in rows)
        ids = np.full((batch, width), pad, dtype=np.int32)
        weights = np.zeros((batch, width - 1), dtype=np.float32)
        for b, (row_ids, _, _) in enumerate(rows):
            ids[b, :len(row_ids)] = row_ids
            weights[b, n_prompt - 1:len(row_ids) - 1] = 1.0  # predicting caption tokens only
        pixels = mx.array(np.concatenate([r[1] for r in rows]))
        grid = mx.array(np.concatenate([r[2] for r in rows]))
        loss, grads = step_fn(model, mx.array(ids), pixels, grid, mx.array(weights))
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        recent.append(loss.item())
        if step % 100 == 0 or step == steps:
            log(f"perception: {label}step {step}/{steps} loss {sum(recent) / len(recent):.3f} "
                f"({time.time() - started:.0f} s)")
            recent.clear()


def _save(model: Any, plain: Path, dest: Path, marks: dict[str, Any]) -> None:
    """The model's weights at `dest`, beside `plain`'s tokenizer and configuration, its marker updated by `marks`."""
    from mlx_vlm.utils import save_weights

    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(plain, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    save_weights(tmp, model)
    marker = json.loads((tmp / "mondrian_smoke.json").read_text())
    if marker.get("weights") == "perception-pretrained":  # trained on from an earlier stage's output
        marks["stages"] = marker.get("stages", 1) + marks["stages"]
    marker.update(marks)
    (tmp / "mondrian_smoke.json").write_text(json.dumps(marker))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def check(model_path: Path, n: int = 60, seed: int = 123) -> dict[str, float]:
    """How well a base captions `n` new scenes (greedy): the layout word, the first region's brightness decile and
    the object's x decile, against always guessing the middle."""
    import re

    import mlx_vlm

    model, processor = mlx_vlm.load(str(model_path))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    rng = np.random.default_rng(seed)
    layout, bright, xs, middle = 0, [], [], []
    for _ in range(n):
        image, caption = scene(rng)
        got = mlx_vlm.generate(model, processor, prompt, image=[image], max_tokens=60, temperature=0.0,
                               verbose=False)
        got = getattr(got, "text", got)
        layout += caption.split(":")[0] == got.split(":")[0]
        want_b, got_b = re.findall(r"brightness (\d)", caption), re.findall(r"brightness (\d)", got)
        if want_b and got_b:
            bright.append(abs(int(want_b[0]) - int(got_b[0])))
        want_x, got_x = re.search(r"x (\d)", caption), re.search(r"x (\d)", got)
        if want_x:
            middle.append(abs(int(want_x.group(1)) - 4.5))
            xs.append(abs(int(want_x.group(1)) - int(got_x.group(1))) if got_x else 9)
    return {"scenes": n, "layout_right": layout, "brightness_error": round(float(np.mean(bright)), 2),
            "x_error": round(float(np.mean(xs)), 2), "x_error_guessing_middle": round(float(np.mean(middle)), 2)}


if __name__ == "__main__":
    # python -m bench.perception PLAIN DEST [STEPS] [BATCH] [SCENES] [LR] [--stages K] [--no-check]
    # The lent GPU's recipe (RESULTS.md, `learning`), both stages in one process:
    #   python3 -m bench.perception .mlxc/models/smoke-plain /tmp/sp 2400 32 8000 5e-4 --stages 2 --no-check
    import argparse

    try:
        import daemon.model.blas  # noqa: F401  (OpenBLAS before MLX on a Linux CPU; absent on the GPU machine)
    except Exception:
        pass

    cli = argparse.ArgumentParser(prog="python -m bench.perception")
    cli.add_argument("plain", type=Path, help="a plain random smoke checkpoint, or an earlier stage's output")
    cli.add_argument("dest", type=Path)
    cli.add_argument("steps", type=int, nargs="?", default=1200, help="steps per stage")
    cli.add_argument("batch", type=int, nargs="?", default=8)
    cli.add_argument("scenes", type=int, nargs="?", default=2000)
    cli.add_argument("lr", type=float, nargs="?", default=3e-4)
    cli.add_argument("--stages", type=int, default=1, help="train again from the weights reached, K times in all")
    cli.add_argument("--no-check", action="store_true", help="skip the 60 greedy captions at the end")
    a = cli.parse_args()
    built = perception_model(a.plain, a.dest, steps=a.steps, batch=a.batch, scenes=a.scenes, lr=a.lr, stages=a.stages)
    if not a.no_check:
        print(json.dumps(check(built)))
