"""`batch`: a deep inbox, photos per minute at batch 1 against several photos per forward pass (issue 11 item 7).

- batch1:  `ModelRuntime.generate_json`, one photo after another (what `batch_size = 1` runs).
- batchN:  `ModelRuntime.generate_json_batch`, N photos of one shoot per call (daemon/model/batch.py), for N = 4
           and 8: one forward pass advances every row by a token.
Every row must write the text batch 1 writes for its photo (`batch_outputs_match`). Each side runs twice, in
the order 1 4 8 8 4 1.

Figures (`smoke.` / `real.` prefixes, then the headlines for the size asked): photos, photos_per_min_batch1,
photos_per_min_batch4, photos_per_min_batch8, batch4_speedup and batch8_speedup (photos per minute against
batch 1), batch_outputs_match, free_tokens_per_report and forced_tokens_per_report (tokens the model chose / the
schema forced). Settings: `bench.settings()` (the project's defaults unless a flag says otherwise), reports
real-length, photos one size (640x480 before the pixel cap, as one shoot's).
"""

from __future__ import annotations

import os
import time
from typing import Any

from . import by_size, critique_runtime, emit, note, photos as photo_count, settings as bench_settings
from .rag import _photos

PROMPT = "Critique this photograph as Ansel Adams would."
BATCHES = (4, 8)


def measure(shapes: str) -> dict[str, Any]:
    from daemon.model.protocol import BatchRequest

    settings = bench_settings()
    figures: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        figures[f"{shapes}.{key}"] = emit(f"{shapes}.{key}", value)

    rt, schema = critique_runtime(shapes)
    max_tokens = settings["max_tokens"]
    photos = _photos(max(photo_count(shapes), max(BATCHES)), (640, 480))

    def request(image: Any) -> Any:
        return BatchRequest(image, PROMPT, schema, max_tokens)

    # bench.WARMUP, per batch size: on a GPU, MLX compiles kernels for each new shape on first use (a batch of 8
    # is a new shape), so every side runs once untimed at full size before any timing.
    rt.generate_json(photos[0], PROMPT, schema, max_tokens=max_tokens)
    for n in BATCHES:
        rt.generate_json_batch([request(p) for p in photos[:n]])

    # Each side twice, in the order 1 4 8 8 4 1, so a machine that gets busier or quieter favours none.
    seconds = {n: 0.0 for n in (1, *BATCHES)}
    texts: dict[int, list[Any]] = {}
    for n in (1, *BATCHES, *reversed(BATCHES), 1):
        t = time.perf_counter()
        if n == 1:
            rows = [rt.generate_json(p, PROMPT, schema, max_tokens=max_tokens) for p in photos]
        else:
            rows = []
            for start in range(0, len(photos), n):
                rows += rt.generate_json_batch([request(p) for p in photos[start:start + n]])
        seconds[n] += time.perf_counter() - t
        texts.setdefault(n, rows)
        note(f"{shapes} batch {n}: {len(photos)} photos in {time.perf_counter() - t:.1f} s")
    alone = texts[1]
    put("loadavg_1m", round(os.getloadavg()[0], 2))
    put("photos", len(photos))
    put("warmup", "one untimed full-size call per batch size")
    put("photos_per_min_batch1", round(60 * 2 * len(photos) / seconds[1], 2))
    match = total = 0
    for n in BATCHES:
        put(f"photos_per_min_batch{n}", round(60 * 2 * len(photos) / seconds[n], 2))
        put(f"batch{n}_speedup", round(seconds[1] / seconds[n], 3))
        match += sum(not isinstance(r, Exception) and r.text == a.text for r, a in zip(texts[n], alone))
        total += len(photos)
    put("batch_outputs_match", f"{match}/{total}")
    free = sum(int(g.free_tokens or 0) for g in alone)
    generated = sum(g.generated_tokens for g in alone)
    put("free_tokens_per_report", round(free / len(photos), 1))
    put("forced_tokens_per_report", round((generated - free) / len(photos), 1))
    return figures


def run(size: str) -> dict[str, Any]:
    return by_size(size, measure, "photos_per_min_batch1", "photos_per_min_batch4", "photos_per_min_batch8",
                   "batch4_speedup", "batch8_speedup")
