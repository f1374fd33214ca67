"""`baseline`: one single-pass critique through Mondrian's runtime against mlx-vlm's own `generate`.

- ours:  `ModelRuntime.generate_json`: the photo is encoded once, prefill and decode project only the last
         position onto the vocabulary, and tokens forced by the JSON schema are fast-forwarded
         (daemon/model/reuse.py). This is what the baseline and lora modes run.
- naive: `mlx_vlm.generate` with the same schema constraint, one token per forward pass.
Both decode greedily, so they must write the same text (`outputs_match`).

Figures (`smoke.` / `real.` prefixes, then `baseline_time_ratio` for the size asked): photos, ours_s,
naive_s, baseline_time_ratio = ours_s / naive_s, outputs_match, generated_tokens, free_tokens_per_report and
forced_tokens_per_report (tokens the model chose / the schema forced), forward_passes (ours).
Settings: `bench.settings()` (the project's defaults unless a flag says otherwise), reports real-length.
"""

from __future__ import annotations

import os
import time
from typing import Any

from . import (WARMUP, apply_precision, by_size, comment_chars, emit, note, photos as photo_count,
               real_length, settings as bench_settings, var_dir)
from .rag import _photos

PROMPT = "Critique this photograph as Ansel Adams would."


def _naive(rt: Any, image: Any, schema: dict, max_tokens: int) -> str:
    import mlx_vlm

    res = mlx_vlm.generate(rt.model, rt.processor, rt.format_prompt(PROMPT), image=[image], max_tokens=max_tokens,
                           temperature=0.0, verbose=False, logits_processors=[rt.constraint.logits_processor(schema)])
    ids = [int(t) for t in (res.token_ids or [])]
    while ids and ids[-1] == rt.tokenizer.eos_token_id:
        ids.pop()
    return rt.tokenizer.decode(ids, skip_special_tokens=False)


def measure(shapes: str) -> dict[str, Any]:
    from daemon.analysis.critique import critique_schema
    from daemon.model.runtime import ModelRuntime
    from daemon.model.smoke import ensure_smoke_model

    settings = bench_settings()
    prefix = f"{shapes}."
    figures: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        figures[prefix + key] = emit(prefix + key, value)

    model_path = ensure_smoke_model(var_dir(), shapes=shapes)
    rt = ModelRuntime.load(str(model_path), var_dir=var_dir(), max_pixels=settings["max_pixels"])
    apply_precision(rt.model)
    low, high = comment_chars(shapes)
    schema = real_length(critique_schema(high), low)
    photos = _photos(photo_count(shapes) + 1, (640, 480))
    warm = photos.pop()  # bench.WARMUP: first-call costs belong to neither side
    rt.generate_json(warm, PROMPT, schema, max_tokens=settings["max_tokens"])
    _naive(rt, warm, schema, settings["max_tokens"])
    ours_s = naive_s = 0.0
    match = generated = free = passes = 0
    for i, image in enumerate(photos):
        order = ("ours", "naive") if i % 2 == 0 else ("naive", "ours")  # no side always goes first
        texts: dict[str, str] = {}
        for side in order:
            t = time.perf_counter()
            if side == "ours":
                gen = rt.generate_json(image, PROMPT, schema, max_tokens=settings["max_tokens"])
                texts[side] = gen.text
                generated += gen.generated_tokens
                free += int(gen.free_tokens or 0)
                passes += int(gen.forward_passes or 0)
                ours_s += time.perf_counter() - t
            else:
                texts[side] = _naive(rt, image, schema, settings["max_tokens"])
                naive_s += time.perf_counter() - t
        match += texts["ours"] == texts["naive"]
        note(f"{shapes} photo {i + 1}/{len(photos)}: ours {ours_s:.1f} s, naive {naive_s:.1f} s so far")
    put("loadavg_1m", round(os.getloadavg()[0], 2))
    put("photos", len(photos))
    put("warmup", WARMUP)
    put("ours_s", round(ours_s, 3))
    put("naive_s", round(naive_s, 3))
    put("baseline_time_ratio", round(ours_s / naive_s, 3))
    put("outputs_match", f"{match}/{len(photos)}")
    put("generated_tokens", generated)
    put("forward_passes", passes)
    put("free_tokens_per_report", round(free / len(photos), 1))
    put("forced_tokens_per_report", round((generated - free) / len(photos), 1))
    return figures


def run(size: str) -> dict[str, Any]:
    return by_size(size, measure, "baseline_time_ratio")
