"""`bound`: how far a critique is from what this machine's arithmetic and memory allow.

    bound_s_per_photo = prefill FLOPs / measured matmul rate + bytes read per decode step / measured bandwidth × steps

- prefill FLOPs, counted from the checkpoint's config.json for each photo's actual token counts: the vision tower
  (patch embedding, every block's qkv / attention / projection / MLP, the patch merger) over the photo's patches,
  and the language model over the prompt tokens (projections, MLP, causal attention; the vocabulary projection for
  the last position only, as a decoder needs).
- matmul rate: an MLX matmul at the model's own shapes (vision MLP: patches × embed_dim @ embed_dim × 4·embed_dim;
  language MLP: prompt × hidden @ hidden × intermediate), in the weights' dtype (quantized: `mx.quantized_matmul`
  at the checkpoint's bits and group size), best of several runs, in this process and run.
- bytes per decode step: the language model's parameter bytes as stored (lm_head included; the embedding table is
  read one row a token, so it counts only when tied to lm_head); the vision tower is not read while decoding.
- bandwidth: the best of a reduction over, a copy of, and a matrix-vector product with a 512 MB array (the
  matrix-vector product is what a decode step is), in this process and run.
- On a Linux CPU running on oneMKL, both rates are also measured in a process on the system's OpenBLAS (if there is
  one) and the better of each is used: oneMKL's large products are slower on some CPUs (AMD), and the bound is the
  machine's, not the library's.
- steps: the decode forward passes our runtime needed (schema-forced tokens ride along in the pass of the sampled
  token before them, so they cost no weight read of their own). `bound_per_token_s_per_photo` counts one weight
  read per generated token instead: the bound of a decoder that does not skip forced tokens (mlx_vlm.generate).
Left out, so the bound stays a lower bound: the KV cache reads, norms, RoPE, the schema mask, image preprocessing.

`real_s_per_photo` is `ModelRuntime.generate_json` at the project's default settings (comment length, max_tokens,
max_pixels), the baseline prompt; `real_over_bound` = real / bound (target: within 2x at real shapes).
`real_ms_per_pass` is a photo's time without the vision tower per decode pass (the prefill and the forced runs
included); `synthetic_step_ms` is `decode_step`'s masked one-token step, timed after the photos in this process at
the photos' prompt length: where the first is far above the second, the loop around the passes costs the difference.
`operations_per_pass` / `kernels_per_pass` count that step's graph (`mx.export_to_dot`; kernels leave out views);
`dispatch_floor_ms_per_pass` is a step of that many element-wise kernels on a hidden-size vector, launched the same
way: what the backend's dispatch costs a pass whatever it computes. `dispatch_bound_s_per_photo` = compute +
passes × max(weight read, dispatch floor), with `real_over_dispatch_bound`: an extra figure beside the issue's bound,
which counts no dispatch (on a GPU at batch 1 the floor is the larger term). `guessing=1` where the decode loop
picks free tokens without the schema's mask and checks them after (on CUDA: daemon/model/reuse.py), with
`guesses_per_photo` and `guess_miss_rate` (each miss costs a pass, counted in the passes above).
--size real (2.2 B parameters, ~9 GB, minutes a photo on a 2-core CPU) is for the GPU machine or a larger one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from daemon.model import blas

from . import by_size, emit, note, precision

BANDWIDTH_BYTES = 512 * 2**20
REPEATS = 5
SYNTHETIC_STEPS = {"smoke": 100, "real": 40}  # decode_step's masked step, timed after the photos


def _text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    text = dict(cfg.get("text_config") or {})
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "tie_word_embeddings"):
        text.setdefault(key, cfg.get(key))
    return text


def vision_flops(cfg: dict[str, Any], grid_thw: tuple[int, int, int]) -> float:
    """FLOPs (multiply-add = 2) of the Qwen2-VL vision tower on one photo of `grid_thw` patches."""
    v = cfg["vision_config"]
    d, depth = v["embed_dim"], v["depth"]
    mlp = int(d * v["mlp_ratio"])
    merge = v["spatial_merge_size"] ** 2
    n = grid_thw[0] * grid_thw[1] * grid_thw[2]
    patch_in = v.get("in_chans", v.get("in_channels", 3)) * v["temporal_patch_size"] * v["patch_size"] ** 2
    per_block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * mlp
    merger = 2 * (n // merge) * (merge * d) ** 2 + 2 * (n // merge) * (merge * d) * _text_config(cfg)["hidden_size"]
    return float(2 * n * patch_in * d + depth * per_block + merger)


def language_flops(cfg: dict[str, Any], tokens: int, *, context: int = 0) -> float:
    """FLOPs of the language model over `tokens` new tokens after `context` cached ones, projecting only the last
    position onto the vocabulary."""
    t = _text_config(cfg)
    h, layers, inter = t["hidden_size"], t["num_hidden_layers"], t["intermediate_size"]
    head_dim = h // t["num_attention_heads"]
    kv = t["num_key_value_heads"] * head_dim
    per_token = 2 * h * h * 2 + 2 * h * kv * 2 + 2 * 3 * h * inter  # q, o; k, v; gate, up, down
    # causal attention: token i attends to context + i + 1 positions (scores and weighted sum)
    attended = tokens * context + tokens * (tokens + 1) / 2
    return float(layers * (tokens * per_token + 2 * 2 * h * attended) + 2 * h * t["vocab_size"])


def _best_seconds(fn: Callable[[], Any], repeats: int = REPEATS) -> float:
    import mlx.core as mx

    mx.eval(fn())  # warm: allocation, first-call paths
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - started)
    return best


def _quantization(layer: Any) -> tuple[int, int] | None:
    """(bits, group_size) of a quantized linear layer, or None for a float one."""
    if getattr(layer, "scales", None) is None:
        return None
    return int(layer.bits), int(layer.group_size)


def matmul_rate(m: int, k: int, n: int, dtype: Any, quant: tuple[int, int] | None) -> float:
    """Measured FLOP/s of x[m, k] @ W[k, n] in MLX, W stored as the model stores it."""
    import mlx.core as mx

    mx.random.seed(0)
    x = mx.random.normal((m, k)).astype(dtype)
    w = mx.random.normal((n, k)).astype(dtype)  # (out, in), as nn.Linear keeps it
    if quant is None:
        mx.eval(x, w)
        seconds = _best_seconds(lambda: x @ w.T)
    else:
        bits, group = quant
        wq, scales, biases = mx.quantize(w, group_size=group, bits=bits)
        mx.eval(x, wq, scales, biases)
        seconds = _best_seconds(lambda: mx.quantized_matmul(x, wq, scales, biases, transpose=True,
                                                            group_size=group, bits=bits))
    return 2.0 * m * k * n / seconds


def _rates_with(library: str, shapes: list[tuple[int, int, int]]) -> tuple[list[float], dict[str, float]]:
    """`matmul_rate` at `shapes` and `bandwidths()`, measured in a fresh process on another BLAS library."""
    code = ("import json, sys; from daemon.model import blas; blas.preload_openblas(); import mlx.core as mx; "
            "from bench.bound import matmul_rate, bandwidths; "
            "print(json.dumps([[matmul_rate(m, k, n, mx.float32, None) for m, k, n in json.loads(sys.argv[1])], "
            "bandwidths()]))")
    env = {**os.environ, "MONDRIAN_OPENBLAS": library}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(shapes)], env=env, capture_output=True, text=True,
                         check=True, timeout=600, cwd=Path(__file__).resolve().parent.parent)
    rates, bw = json.loads(out.stdout.splitlines()[-1])
    return rates, bw


def bandwidths(nbytes: int = BANDWIDTH_BYTES) -> dict[str, float]:
    """Bytes/s actually moved by a reduction, a copy (read + write) and a matrix-vector product, in MLX."""
    import mlx.core as mx

    n = nbytes // 4
    a = mx.random.uniform(shape=(n,))
    cols = 4096
    mat = a.reshape(n // cols, cols)
    vec = mx.random.uniform(shape=(cols, 1))
    mx.eval(a, vec)
    out = {
        "reduce": nbytes / _best_seconds(lambda: mx.sum(a)),
        "copy": 2 * nbytes / _best_seconds(lambda: a * 1.0),
        "matvec": nbytes / _best_seconds(lambda: mat @ vec),
    }
    del a, mat, vec
    mx.clear_cache()
    return out


def decode_bytes(model: Any, tied: bool) -> int:
    """Parameter bytes of the language model a decode step reads: everything but the embedding table (one row a
    token), unless the table is also lm_head."""
    from mlx.utils import tree_flatten

    total = 0
    for name, value in tree_flatten(model.language_model.parameters()):
        if "embed_tokens" in name and not tied:
            continue
        total += value.nbytes
    return total


def measure(shapes: str) -> dict[str, Any]:
    import mlx.core as mx

    from daemon.model.reuse import _inputs

    from .transformers_cmp import single_pass_setup

    prefix = f"{shapes}."
    figures: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        figures[prefix + key] = emit(prefix + key, value)

    s, model_path, rt, schema, photos = single_pass_setup(shapes)
    cfg = json.loads((model_path / "config.json").read_text(encoding="utf-8"))
    text = _text_config(cfg)

    real_s = vision_s = 0.0
    runs = []
    for i, image in enumerate(photos):
        grid = tuple(int(g) for g in _inputs(rt.processor, rt.model, image, rt.format_prompt(s["prompt"]))
                     ["image_grid_thw"].tolist()[0])
        started = time.perf_counter()
        encoded = rt.encode(image)  # what generate_json(image) does first; timed apart to split the figure
        vision_s += time.perf_counter() - started
        gen = rt.generate_json(image, s["prompt"], schema, max_tokens=s["max_tokens"], encoded=encoded)
        real_s += time.perf_counter() - started
        runs.append((grid, gen))
        note(f"{shapes} photo {i + 1}/{len(photos)}: {time.perf_counter() - started:.2f} s, {gen.generated_tokens} tokens "
             f"in {gen.forward_passes} passes, {gen.free_tokens} free; {real_s:.1f} s so far")

    lm = rt.model.language_model.model.layers[0].mlp.up_proj
    vis = rt.model.vision_tower.blocks[0].mlp.fc1
    quant = _quantization(lm)
    lm_dtype = lm.weight.dtype if quant is None else getattr(lm.scales, "dtype", mx.float32)
    vis_dtype = vis.weight.dtype if _quantization(vis) is None else mx.float32
    v = cfg["vision_config"]
    n_patches = max(g[0] * g[1] * g[2] for g, _ in runs)
    prompt_tokens = max(gen.prompt_tokens for _, gen in runs)
    vision_rate = matmul_rate(n_patches, v["embed_dim"], int(v["embed_dim"] * v["mlp_ratio"]), vis_dtype,
                              _quantization(vis))
    lm_rate = matmul_rate(prompt_tokens, text["hidden_size"], text["intermediate_size"], lm_dtype, quant)
    bw = bandwidths()
    # The machine's best, not only the BLAS this process loaded: a library chosen for its one-row products must not
    # make the bound easier by being slower at the prefill's large ones.
    float32 = lm_dtype == mx.float32 and vis_dtype == mx.float32 and quant is None and _quantization(vis) is None
    other = blas.system_openblas() if float32 and "oneMKL" in blas.described() else None
    if other:
        (vision_other, lm_other), bw_other = _rates_with(other, [
            (n_patches, v["embed_dim"], int(v["embed_dim"] * v["mlp_ratio"])),
            (prompt_tokens, text["hidden_size"], text["intermediate_size"])])
        put("matmul_gflops_vision_openblas", round(vision_other / 1e9, 2))
        put("matmul_gflops_language_openblas", round(lm_other / 1e9, 2))
        put("bandwidth_gbs_matvec_openblas", round(bw_other["matvec"] / 1e9, 2))
        vision_rate, lm_rate = max(vision_rate, vision_other), max(lm_rate, lm_other)
        bw = {k: max(v_, bw_other[k]) for k, v_ in bw.items()}
    bandwidth = max(bw.values())
    step_bytes = decode_bytes(rt.model, bool(text.get("tie_word_embeddings")))

    n = len(runs)
    vis_flops = sum(vision_flops(cfg, g) for g, _ in runs) / n
    lm_flops = sum(language_flops(cfg, gen.prompt_tokens) for _, gen in runs) / n
    steps = sum(gen.forward_passes or gen.generated_tokens for _, gen in runs) / n
    tokens = sum(gen.generated_tokens for _, gen in runs) / n
    compute_s = vis_flops / vision_rate + lm_flops / lm_rate
    memory_s = step_bytes / bandwidth * steps
    bound_s = compute_s + memory_s
    real = real_s / n

    # The synthetic step `decode_step` times, in this process on this machine, beside what a real critique's pass
    # cost (its photo's time without the vision tower, per decode pass: the prefill and forced runs included).
    from .decode_step import dispatch_floor_ms, kernels, masked_step_ms, pass_operations

    lm_model = rt.model.language_model
    masked_step_ms(lm_model, 3, prompt_tokens)  # warm: this context's kernels
    synthetic_ms = masked_step_ms(lm_model, SYNTHETIC_STEPS[shapes], prompt_tokens)
    operations = pass_operations(lm_model, prompt_tokens)
    floor_ms = dispatch_floor_ms(kernels(operations), SYNTHETIC_STEPS[shapes], int(text["hidden_size"]))
    # A pass cannot be quicker than reading the weights, nor than dispatching its kernels: the second is what the
    # issue's bound leaves out, and on a GPU at batch 1 it is the larger one.
    dispatch_s = compute_s + steps * max(floor_ms / 1e3, step_bytes / bandwidth)

    put("precision", precision())  # the weights the runtime ran with, those the bytes below count
    put("photos", n)
    put("prompt_tokens_per_photo", round(sum(gen.prompt_tokens for _, gen in runs) / n, 1))
    put("image_patches_per_photo", round(sum(g[0] * g[1] * g[2] for g, _ in runs) / n, 1))
    put("generated_tokens_per_photo", round(tokens, 1))
    put("decode_steps_per_photo", round(steps, 1))
    put("real_ms_per_pass", round((real - vision_s / n) / steps * 1e3, 2))
    put("synthetic_step_ms", round(synthetic_ms, 2))
    put("operations_per_pass", sum(operations.values()))
    put("kernels_per_pass", kernels(operations))
    put("dispatch_floor_ms_per_pass", round(floor_ms, 2))
    put("vision_gflop_per_photo", round(vis_flops / 1e9, 3))
    put("language_prefill_gflop_per_photo", round(lm_flops / 1e9, 3))
    put("matmul_gflops_vision", round(vision_rate / 1e9, 2))
    put("matmul_gflops_language", round(lm_rate / 1e9, 2))
    for kind, rate in bw.items():
        put(f"bandwidth_gbs_{kind}", round(rate / 1e9, 2))
    put("bytes_per_decode_step_mb", round(step_bytes / 2**20, 2))
    put("bound_compute_s_per_photo", round(compute_s, 4))
    put("bound_memory_s_per_photo", round(memory_s, 4))
    put("bound_per_token_s_per_photo", round(compute_s + step_bytes / bandwidth * tokens, 4))
    put("bound_vision_s_per_photo", round(vis_flops / vision_rate, 4))
    put("real_vision_s_per_photo", round(vision_s / n, 4))
    put("real_s_per_photo", round(real, 4))
    put("bound_s_per_photo", round(bound_s, 4))
    put("real_over_bound", round(real / bound_s, 2))
    put("dispatch_bound_s_per_photo", round(dispatch_s, 4))
    put("real_over_dispatch_bound", round(real / dispatch_s, 2))
    from daemon.model.reuse import guesses, guessing_pays

    made, missed = guesses(lm_model)  # free tokens picked without the mask and checked after (reuse.py)
    put("guessing", int(guessing_pays()))
    put("guesses_per_photo", round(made / n, 1))
    put("guess_miss_rate", round(missed / made, 3) if made else "n/a (no guesses: the mask picks every token)")
    put("loadavg_1m", round(os.getloadavg()[0], 2))
    return figures


def run(size: str) -> dict[str, Any]:
    # The runner prints the settings (print_settings); the photos are this benchmark's own.
    from .transformers_cmp import PHOTO_SIZE

    emit("photo_size", f"{PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}")
    return by_size(size, measure, "real_s_per_photo", "bound_s_per_photo", "real_over_bound")
