"""`lora`: many advisors on one base model (adapter swap) against one model per advisor (the original design).

For the smoke model and for random weights with the real Qwen2-VL-2B shapes (float32), N advisors each get an
adapter of the shape `mondrian train` makes (LoRA rank 8, alpha 16, on every q/k/v/o/gate/up/down projection of
the language model; random weights, which weigh and swap exactly like trained ones). Figures (`smoke.` /
`real.` prefixes, then unprefixed for the size asked):

  adapter_swap_ms           median time a photo pays for its advisor's adapter: `activate` (LoRA layers into the
                            model, the cached weights into them) and `deactivate` after it (the layers out again),
                            evaluated, cycling through the advisors (each photo another advisor)
  adapter_swap_same_ms      the same when consecutive photos have the same advisor (weights already in place)
  inactive_bypassed         after `deactivate` no LoRA layer is left in the model: baseline and rag photos run
                            the plain base model (no LoRA matmuls)
  adapter_load_ms           reading and checking an adapter from disk the first time (cache miss)
  mem_per_advisor_mb        MLX memory added per advisor by one base + N adapters (LoRA layers + cached
                            weights, measured, divided by N)
  naive_mem_per_advisor_mb  MLX memory of one loaded model (measured): what each advisor costs when every
                            advisor gets their own model
  swap_exact                (smoke) logits after swapping equal a fresh `mlx_vlm.load(..., adapter_path=...)`
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from . import by_size, emit, note, var_dir

ADVISORS = 4
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 8, 16.0
SWAPS = {"smoke": 400, "real": 60}


def _targets(model: Any) -> list[str]:
    import mlx.nn as nn

    return sorted(name for name, m in model.named_modules()
                  if name.startswith("language_model.") and name.split(".")[-1] in TARGETS
                  and isinstance(m, (nn.Linear, nn.QuantizedLinear)))


def _make_adapters(model: Any, root: Path, n: int) -> list[Path]:
    import mlx.core as mx
    import numpy as np

    from daemon.model.adapters import AdapterSpec, save_adapter

    keys = _targets(model)
    modules = dict(model.named_modules())
    spec = AdapterSpec("lora", RANK, ALPHA / RANK, tuple(keys))
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        weights = {}
        for k in keys:
            o, inp = modules[k].weight.shape
            if hasattr(modules[k], "bits"):  # a QuantizedLinear's weight is packed: `bits` per 32-bit word
                inp = inp * 32 // modules[k].bits
            weights[f"{k}.lora_a"] = mx.array(rng.normal(0, inp ** -0.5, (inp, RANK)).astype(np.float32))
            weights[f"{k}.lora_b"] = mx.array(rng.normal(0, 0.01, (RANK, o)).astype(np.float32))
        out.append(save_adapter(root / f"advisor{i}", spec.to_config(), weights))
    return out


def _active_mb() -> float:
    import mlx.core as mx

    gc.collect()
    return mx.get_active_memory() / 2**20


def _swap_exact(model_path: Path, adapters: list[Path], model: Any, manager: Any, processor: Any) -> bool:
    """Logits after swapping to each adapter (and back to none) equal a fresh load's."""
    import mlx.core as mx
    import mlx_vlm
    import numpy as np
    from mlx_vlm.utils import prepare_inputs
    from PIL import Image

    img = Image.fromarray((np.random.default_rng(0).random((112, 112, 3)) * 255).astype("uint8"))
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Critique."}]}],
        tokenize=False, add_generation_prompt=True)
    inp = prepare_inputs(processor, images=[img], prompts=[prompt])

    def logits(m: Any) -> np.ndarray:
        out = m(inp["input_ids"], inp["pixel_values"], inp["attention_mask"], image_grid_thw=inp["image_grid_thw"])
        lg = getattr(out, "logits", out)
        mx.eval(lg)
        return np.array(lg)

    fresh_base, _ = mlx_vlm.load(str(model_path))
    expected = {None: logits(fresh_base)}
    del fresh_base
    for a in adapters[:2]:
        m, _ = mlx_vlm.load(str(model_path), adapter_path=str(a))
        expected[a] = logits(m)
        del m
    ok = True
    for a in [adapters[0], adapters[1], None, adapters[0], None, adapters[1]]:
        manager.activate(a)
        ok &= bool(np.array_equal(logits(model), expected[a]))
    manager.activate(None)
    return ok


def measure(shapes: str) -> dict[str, Any]:
    import mlx.core as mx
    import mlx_vlm

    from daemon.model.adapters import AdapterManager
    from daemon.model.smoke import ensure_smoke_model

    prefix = f"{shapes}."
    figures: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        figures[prefix + key] = emit(prefix + key, value)

    model_path = ensure_smoke_model(var_dir(), shapes=shapes)
    before = _active_mb()
    started = time.perf_counter()
    model, processor = mlx_vlm.load(str(model_path))
    mx.eval(model.parameters())
    base_mb = _active_mb() - before
    note(f"{shapes} model loaded in {time.perf_counter() - started:.1f} s ({base_mb:.0f} MB)")
    targets = len(_targets(model))
    with tempfile.TemporaryDirectory(prefix=f"mondrian-bench-lora-{shapes}-") as tmp:
        adapters = _make_adapters(model, Path(tmp), ADVISORS)
        manager = AdapterManager(model, cache_size=ADVISORS)
        loads = []
        for a in adapters:
            t = time.perf_counter()
            manager.load(a)
            loads.append((time.perf_counter() - t) * 1e3)
        manager.activate(adapters[0])
        mx.eval(model.parameters())
        with_adapters_mb = _active_mb() - before
        manager.deactivate()

        swaps = [_photo_pays(manager, adapters[(i + 1) % len(adapters)]) for i in range(SWAPS[shapes])]
        same = [_photo_pays(manager, adapters[0]) for _ in range(SWAPS[shapes] // 4)]
        from daemon.model.adapters import adapter_weight_names

        bypassed = adapter_weight_names(model) == {}
        t = time.perf_counter()
        manager.activate(None)
        mx.eval([v for k, v in _lora_params(model)])
        none_ms = (time.perf_counter() - t) * 1e3
        put("loadavg_1m", round(os.getloadavg()[0], 2))
        put("advisors", ADVISORS)
        put("lora_rank", RANK)
        put("lora_target_modules", targets)
        put("adapter_mb", round(manager.cached_bytes() / len(adapters) / 2**20, 2))
        put("adapter_swap_ms", round(statistics.median(swaps), 3))
        put("adapter_swap_p95_ms", round(sorted(swaps)[int(0.95 * (len(swaps) - 1))], 3))
        put("adapter_swap_same_ms", round(statistics.median(same), 3))
        put("inactive_bypassed", bypassed)
        put("no_adapter_ms", round(none_ms, 3))
        put("adapter_load_ms", round(statistics.median(loads), 2))
        put("base_model_mb", round(base_mb, 1))
        put("mem_per_advisor_mb", round((with_adapters_mb - base_mb) / ADVISORS, 2))
        put("naive_mem_per_advisor_mb", round(base_mb, 1))
        put("mem_saving_x", round(base_mb / max((with_adapters_mb - base_mb) / ADVISORS, 1e-9), 1))
        if shapes == "smoke":
            put("swap_exact", _swap_exact(model_path, adapters, model, manager, processor))
    del model, manager
    gc.collect()
    mx.clear_cache()
    return figures


def _photo_pays(manager: Any, adapter: Path) -> float:
    """Milliseconds of one photo's adapter: in before its analysis, out after it (both evaluated)."""
    import mlx.core as mx

    t = time.perf_counter()
    manager.activate(adapter)
    mx.eval([v for k, v in _lora_params(manager.model)])
    manager.deactivate()
    mx.eval(manager.model.parameters())
    return (time.perf_counter() - t) * 1e3


def _lora_params(model: Any) -> list[tuple[str, Any]]:
    from mlx.utils import tree_flatten

    return [(k, v) for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_a", ".lora_b"))]


def run(size: str) -> dict[str, Any]:
    return by_size(size, measure, "adapter_swap_ms", "mem_per_advisor_mb", "naive_mem_per_advisor_mb")
