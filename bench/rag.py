"""`rag`: Mondrian's rag path against the naive one, in one process, on the same photos.

- ours:  `RagStrategy.analyse` — the photo through the vision tower once; pass 1 (profile) and pass 2
         (critique) reuse its features and the KV cache of their shared prompt prefix; schema-forced tokens
         are fast-forwarded (see daemon/model/reuse.py). Thumbnails and retrieval included.
- naive: what the original design did — two independent `mlx_vlm.generate` calls (pass 1, then pass 2 with
         the same portfolio context), each encoding the photo and prefilling its whole prompt.
Both decode greedily under the same JSON-schema constraint, so they write the same text; the benchmark checks
that (`outputs_match`: both passes' JSON as the model wrote it, before ours anchors pass 2's scores to the
retrieved references' curator scores, which the naive path does not do). Embeddings are off so both retrieve by
profile alone and see the same pass-2 prompt (ours would get its embedding for free from the features it already
has).

Figures, per model (`smoke.` / `real.` prefixes), then `rag_time_ratio` for the size asked:
  photos, ours_s, naive_s (totals), rag_time_ratio = ours_s / naive_s, outputs_match, reused_prompt_tokens,
  generated_tokens, forward_passes (ours' decode steps for those tokens), free_tokens_per_report and
  forced_tokens_per_report (pass 2, the critique: tokens the model chose / the schema forced).
Settings: `bench.settings()` (the project's defaults unless a flag says otherwise), critiques real-length
(`bench.RealLength`). --size smoke runs the tiny smoke model; --size real runs it and random weights with the
real Qwen2-VL-2B shapes (about 9 GB of RAM; waits for /tmp/mondrian-real-shapes.lock).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from . import (WARMUP, RealLength, apply_precision, by_size, comment_chars, emit, note, photos as photo_count,
               real_length, settings as bench_settings, var_dir)

REFERENCES = 4


def _photos(n: int, size: tuple[int, int]) -> list[Any]:
    """The bundled sample photos (cycled), resized; distinct images so no cache can cheat."""
    from PIL import Image, ImageOps

    from daemon.resources import samples_dir

    samples = sorted(samples_dir().glob("*.jpg"))
    out = []
    for i in range(n):
        img = Image.open(samples[i % len(samples)]).convert("RGB")
        img = ImageOps.fit(img, size)
        if i >= len(samples):
            img = ImageOps.mirror(img)
        out.append(img)
    return out


def _setup_home(root: Path, settings: dict[str, Any]):
    """A home whose advisor has REFERENCES indexed references with curator sidecars (no model needed)."""
    from daemon.analysis.advisors import get_advisor
    from daemon.config import load_config
    from daemon.analysis.critique import DIMENSIONS
    from daemon.ledger import Ledger
    from daemon.references.indexer import ReferenceIndexer

    cfg = load_config(root, env={}, max_pixels=settings["max_pixels"],
                      comment_max_chars=settings["comment_max_chars"], max_tokens=settings["max_tokens"],
                      embeddings_enabled=False, quiet_seconds=0.0)
    cfg.ensure_dirs()
    refs = cfg.advisors_dir / "ansel" / "references"
    refs.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(_photos(REFERENCES, (224, 224))):
        img.rotate(90 * (i + 1)).save(refs / f"ref{i}.jpg", quality=90)
        scores = {d: (3 + i * 2 + j) % 11 for j, d in enumerate(DIMENSIONS)}
        (refs / f"ref{i}.json").write_text(json.dumps(
            {"scores": scores, "comments": {"lighting": f"Reference {i}: the light carries the frame."}}))
    ledger = Ledger(cfg.db_path)
    plan, outcomes = ReferenceIndexer(cfg, ledger).sync(["ansel"])
    assert len(ledger.references("ansel")) == REFERENCES, (plan, outcomes)
    return cfg, ledger, get_advisor(cfg, "ansel")


def _naive(rt: Any, cfg: Any, advisor: Any, image: Any, rows: list[Any], min_chars: int) -> list[dict]:
    """Two independent mlx_vlm.generate calls, as the original design did: what each wrote."""
    import mlx_vlm

    from daemon.analysis.critique import DIMENSIONS, critique_schema, profile_schema
    from daemon.analysis.prompts import critique_prompt, portfolio_context, profile_prompt
    from daemon.references.indexer import PROFILE_MAX_TOKENS, reference_comment, reference_profile
    from daemon.analysis.retrieval import distribution, nearest

    eos = rt.tokenizer.eos_token_id

    def generate(prompt: str, schema: dict, max_tokens: int) -> dict:
        constraint = rt.constraint.logits_processor(schema)
        res = mlx_vlm.generate(rt.model, rt.processor, rt.format_prompt(prompt), image=[image],
                               max_tokens=max_tokens, temperature=0.0, logits_processors=[constraint],
                               verbose=False)
        ids = [int(t) for t in (res.token_ids or [])]
        while ids and ids[-1] == eos:
            ids.pop()
        return json.loads(rt.tokenizer.decode(ids, skip_special_tokens=False))

    profile = generate(profile_prompt(advisor), profile_schema(), PROFILE_MAX_TOKENS)
    found = nearest(profile, rows, k=cfg.rag_k)
    portfolio = distribution([r.scores for r in rows])
    neighbours = [{"name": n.name, "scores": reference_profile(n.row)["scores"],
                   "comment": reference_comment(reference_profile(n.row)["comments"])} for n in found]
    context = portfolio_context(portfolio["dimensions"], portfolio["count"], neighbours,
                                {d: int(profile[d]) for d in DIMENSIONS})
    return [profile, generate(critique_prompt(advisor, context),
                              real_length(critique_schema(cfg.comment_max_chars), min_chars), cfg.max_tokens)]


def measure(shapes: str) -> dict[str, Any]:
    from daemon.intake.images import decode_photo
    from daemon.model.runtime import ModelRuntime
    from daemon.model.smoke import ensure_smoke_model
    from daemon.analysis import AnalysisContext
    from daemon.analysis.rag import RagStrategy

    min_chars, max_chars = comment_chars(shapes)
    settings = {**bench_settings(), "photos": photo_count(shapes), "comment_max_chars": max_chars}
    prefix = f"{shapes}."
    figures: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        figures[prefix + key] = emit(prefix + key, value)

    with tempfile.TemporaryDirectory(prefix=f"mondrian-bench-rag-{shapes}-") as tmp:
        cfg, ledger, advisor = _setup_home(Path(tmp), settings)
        started = time.perf_counter()
        model_path = ensure_smoke_model(var_dir(), shapes=shapes)
        runtime = ModelRuntime.load(str(model_path), var_dir=var_dir(), max_pixels=cfg.max_pixels)
        apply_precision(runtime.model)
        rt = RealLength(runtime, min_chars)
        note(f"{shapes} model ready in {time.perf_counter() - started:.1f} s ({model_path})")
        rows = ledger.references(advisor.id)
        strategy = RagStrategy(cfg, ledger)
        photos = []
        for i, img in enumerate(_photos(settings["photos"] + 1, (640, 480))):
            import io

            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=92)
            photos.append(decode_photo(buf.getvalue(), cfg.max_pixels))

        def ours(photo: Any) -> Any:
            return strategy.analyse(AnalysisContext(runtime=rt, cfg=cfg, advisor=advisor, photo=photo))

        warm = photos.pop()  # bench.WARMUP: first-call costs belong to neither side
        ours(warm)
        _naive(rt, cfg, advisor, warm.image, rows, min_chars)
        ours_s = naive_s = 0.0
        match = reused = generated = passes = 0
        parts = {"encode_s": 0.0, "profile_s": 0.0, "critique_s": 0.0}
        free = forced = reports = 0
        rt.take()
        for i, photo in enumerate(photos):
            order = ("ours", "naive") if i % 2 == 0 else ("naive", "ours")  # alternate: no side always goes first
            out: dict[str, Any] = {}
            for side in order:
                t = time.perf_counter()
                if side == "ours":
                    res = ours(photo)
                    ours_s += time.perf_counter() - t
                    out["ours"] = [json.loads(g.text) for g in rt.generations]  # as written: pass 1, pass 2
                    reused += int(res.timings.get("reused_prompt_tokens", 0))
                    generated += int(res.timings.get("generated_tokens", 0))
                    passes += int(res.timings.get("forward_passes", 0))
                    for k in parts:
                        parts[k] += float(res.timings.get(k, 0.0))
                    gens = rt.generations[1::2]  # pass 2 of each: the critique (pass 1 is the profile)
                    rt.take()
                    reports += len(gens)
                    free += sum(int(g.free_tokens or 0) for g in gens)
                    forced += sum(g.generated_tokens - int(g.free_tokens or 0) for g in gens)
                else:
                    out["naive"] = _naive(rt, cfg, advisor, photo.image, rows, min_chars)
                    naive_s += time.perf_counter() - t
            match += out["ours"] == out["naive"]
            note(f"{shapes} photo {i + 1}/{len(photos)}: ours {ours_s:.1f} s, naive {naive_s:.1f} s so far")
        put("loadavg_1m", round(os.getloadavg()[0], 2))  # the machine is shared: say how busy it was
        put("photos", len(photos))
        put("warmup", WARMUP)
        put("ours_s", round(ours_s, 3))
        for k, v in parts.items():  # where ours spends it: vision tower once, pass 1, pass 2
            put(f"ours_{k}", round(v, 3))
        put("naive_s", round(naive_s, 3))
        put("rag_time_ratio", round(ours_s / naive_s, 3))
        put("outputs_match", f"{match}/{len(photos)}")
        put("reused_prompt_tokens", reused)
        put("generated_tokens", generated)
        if passes:
            put("forward_passes", passes)
        put("free_tokens_per_report", round(free / max(reports, 1), 1))
        put("forced_tokens_per_report", round(forced / max(reports, 1), 1))
    return figures


def run(size: str) -> dict[str, Any]:
    return by_size(size, measure, "rag_time_ratio")
