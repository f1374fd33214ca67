"""`lora_time`: a lora-mode critique (one pass through an advisor's adapter) at each precision (issue 11 item 3).

- ours:     `ModelRuntime.generate_json(..., adapter=...)`: the adapter's LoRA layers go into the model for the
            photo and out after it, and the photo takes Mondrian's decode loop (daemon/model/reuse.py).
- naive:    `mlx_vlm.generate` with the same adapter in the model (`ModelRuntime.use_adapter`), one token a pass.
- base:     ours with no adapter, the same photos: what the adapter's LoRA matmuls cost a photo.
The adapter has the shape `mondrian train` makes (rank 8, alpha 16, every q/k/v/o/gate/up/down projection;
random weights, which cost exactly what trained ones cost: bench/lora.py builds them).

Figures (`smoke.` / `real.` prefixes, then `lora_time_ratio` for the size asked): photos, ours_s, naive_s,
base_s, lora_time_ratio = ours_s / naive_s, lora_over_base = ours_s / base_s, outputs_match (ours against naive:
greedy, same adapter), free/forced tokens per report. Settings: `bench.settings()`, reports real-length, warm-up
`bench.WARMUP` on every side.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from . import WARMUP, by_size, critique_runtime, emit, note, photos as photo_count, settings as bench_settings
from .baseline import PROMPT, _naive as baseline_naive
from .lora import _make_adapters
from .rag import _photos


def measure(shapes: str) -> dict[str, Any]:
    settings = bench_settings()
    max_tokens = settings["max_tokens"]
    figures: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        figures[f"{shapes}.{key}"] = emit(f"{shapes}.{key}", value)

    rt, schema = critique_runtime(shapes)
    photos = _photos(photo_count(shapes) + 1, (640, 480))
    warm = photos.pop()

    def naive(image: Any, adapter: Path) -> str:
        with rt.use_adapter(adapter):
            return baseline_naive(rt, image, schema, max_tokens)

    with tempfile.TemporaryDirectory(prefix=f"mondrian-bench-lora-time-{shapes}-") as tmp:
        adapter = _make_adapters(rt.model, Path(tmp), 1)[0]
        rt.generate_json(warm, PROMPT, schema, max_tokens=max_tokens, adapter=adapter)
        rt.generate_json(warm, PROMPT, schema, max_tokens=max_tokens)
        naive(warm, adapter)
        seconds = {"ours": 0.0, "naive": 0.0, "base": 0.0}
        match = generated = free = 0
        for i, image in enumerate(photos):
            texts: dict[str, str] = {}
            sides = ("ours", "naive", "base")
            for side in sides[i % 3:] + sides[:i % 3]:  # no side always goes first
                t = time.perf_counter()
                if side == "naive":
                    texts[side] = naive(image, adapter)
                else:
                    gen = rt.generate_json(image, PROMPT, schema, max_tokens=max_tokens,
                                           adapter=adapter if side == "ours" else None)
                    texts[side] = gen.text
                    if side == "ours":
                        generated += gen.generated_tokens
                        free += int(gen.free_tokens or 0)
                seconds[side] += time.perf_counter() - t
            match += texts["ours"] == texts["naive"]
            note(f"{shapes} photo {i + 1}/{len(photos)}: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    n = len(photos)
    put("loadavg_1m", round(os.getloadavg()[0], 2))
    put("photos", n)
    put("warmup", WARMUP)
    for side, s in seconds.items():
        put(f"{side}_s", round(s, 3))
    put("lora_time_ratio", round(seconds["ours"] / seconds["naive"], 3))
    put("lora_over_base", round(seconds["ours"] / seconds["base"], 3))
    put("outputs_match", f"{match}/{n}")
    put("free_tokens_per_report", round(free / n, 1))
    put("forced_tokens_per_report", round((generated - free) / n, 1))
    return figures


def run(size: str) -> dict[str, Any]:
    return by_size(size, measure, "lora_time_ratio", "lora_over_base")
