"""`transformers_cmp`: one single-pass critique, three ways, same machine, same random-weight model, same photos.

- mondrian:     `ModelRuntime.generate_json` (what a baseline critique runs).
- mlx_vlm:      `mlx_vlm.generate` on the same loaded model, one token per forward pass.
- transformers: Hugging Face transformers' Qwen2VLForConditionalGeneration on PyTorch (CPU here), holding the same
                weights (bench/hf_qwen2vl.py; tests/test_transformers_equivalence.py checks the logits agree), its
                own processor and `generate`.
The MLX sides run at `--precision`, transformers in float32 or bfloat16 (`transformers_dtype`).
All three decode greedily under the same llguidance JSON-schema constraint, at the project's default settings
(daemon/config.py: comment length, max_tokens, max_pixels) and with the baseline strategy's prompt, so they should
write the same text (`*_outputs_match`, against ours). Needs the `bench` extra (torch).

Figures (`smoke.` / `real.` prefixes, then unprefixed for the size asked): mondrian_s_per_photo,
mlx_vlm_s_per_photo, transformers_s_per_photo, and the ratios of ours to each. --size real loads random weights with
the real Qwen2-VL-2B shapes twice over (MLX, then transformers: ~9 GB each, one after the other): run it on the GPU
machine or one with 32 GB or more, not on a shared 2-core box.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from . import by_size, critique_runtime, emit, note, precision
from . import photos as photo_count
from . import settings as bench_settings

PHOTO_SIZE = (640, 480)
ADVISOR = "ansel"


def settings() -> dict[str, Any]:
    """The run's settings (the project's defaults unless a flag changed one) and the bundled advisor's baseline
    prompt."""
    from daemon.analysis.advisors import get_advisor
    from daemon.analysis.prompts import critique_prompt
    from daemon.config import load_config

    with tempfile.TemporaryDirectory(prefix="mondrian-bench-") as home:
        prompt = critique_prompt(get_advisor(load_config(home, env={}), ADVISOR))
    s = bench_settings()
    return {"max_tokens": s["max_tokens"], "max_pixels": s["max_pixels"], "prompt": prompt}


def _strip_eos(ids: list[int], stop: set[int]) -> list[int]:
    while ids and ids[-1] in stop:
        ids.pop()
    return ids


def _mlx_vlm(rt: Any, image: Any, prompt: str, schema: dict, max_tokens: int) -> str:
    import mlx_vlm

    res = mlx_vlm.generate(rt.model, rt.processor, rt.format_prompt(prompt), image=[image], max_tokens=max_tokens,
                           temperature=0.0, verbose=False, logits_processors=[rt.constraint.logits_processor(schema)])
    ids = _strip_eos([int(t) for t in (res.token_ids or [])], {rt.tokenizer.eos_token_id})
    return rt.tokenizer.decode(ids, skip_special_tokens=False)


class _TorchSchemaMask:
    """transformers `LogitsProcessor`: the same llguidance matcher Mondrian uses, the mask applied with torch."""

    def __init__(self, constraint: Any, schema: dict, prompt_len: int) -> None:
        import llguidance

        from daemon.model.constrained import TokenMask

        self.c = constraint
        self.matcher = llguidance.LLMatcher(constraint.ll_tokenizer, constraint.grammar(schema), log_level=0)
        self.prompt_len = prompt_len
        self.mask: Any = None
        self.TokenMask = TokenMask

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import numpy as np
        import torch

        if input_ids.shape[1] > self.prompt_len and not self.matcher.is_stopped():
            token = int(input_ids[0, -1])
            if not self.matcher.consume_token(token):
                raise RuntimeError(f"transformers went off the grammar at token {token}: {self.matcher.get_error()}")
        n = scores.shape[-1]
        if self.matcher.is_stopped():
            allowed = np.zeros(n, dtype=bool)
            allowed[self.c.eos_token_id] = True
        else:
            if self.mask is None:
                self.mask = self.TokenMask(self.c, n)
            allowed = self.mask.allowed(self.matcher)
        return scores.masked_fill(~torch.from_numpy(allowed).to(scores.device)[None, :], float("-inf"))


def transformers_dtype() -> str:
    """The torch dtype transformers runs in: `--precision`'s, with bfloat16 for 4bit (transformers has no MLX 4-bit;
    bf16 is what a 4-bit MLX model computes in between its quantized matmuls)."""
    return "float32" if precision() == "float32" else "bfloat16"


def _transformers_side(model_dir: Path, constraint: Any, photos: list[Any], warmup: Any, prompt: str, schema: dict,
                       s: dict[str, Any], stop: set[int]) -> tuple[float, list[str], dict[str, Any]]:
    import torch
    import transformers
    from transformers import AutoTokenizer, LogitsProcessorList

    try:
        from transformers import Qwen2VLImageProcessorPil as ImageProcessor  # no torchvision needed
    except ImportError:  # transformers 4
        from transformers import Qwen2VLImageProcessor as ImageProcessor

    from .hf_qwen2vl import load_transformers_model

    # On the GPU machine transformers runs on the same GPU as MLX (issue 11 item 8), in the precision asked.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    model = load_transformers_model(model_dir).to(device=device, dtype=getattr(torch, transformers_dtype()))
    load_s = time.perf_counter() - started
    # transformers' own preprocessing. Its Qwen2VLProcessor would also load a video processor that needs torchvision,
    # so the image processor and tokenizer are used directly, doing what that processor does: one <|image_pad|> per
    # merged patch.
    # min/max_pixels, not size: the checkpoint's preprocessor_config.json holds Qwen's own max_pixels, which would
    # override a size given here (and photos would get ~1.5x the image tokens Mondrian's cap gives them).
    floor = min(56 * 56, s["max_pixels"])
    images = ImageProcessor.from_pretrained(str(model_dir), min_pixels=floor, max_pixels=s["max_pixels"],
                                            size={"shortest_edge": floor, "longest_edge": s["max_pixels"]})
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    pad = "<|image_pad|>"
    image_token_id = tokenizer.convert_tokens_to_ids(pad)
    merge = model.config.vision_config.spatial_merge_size ** 2

    counts = {"tokens": 0, "prompt_tokens": 0}

    def one(image: Any) -> str:
        pixels = images(images=[image], return_tensors="pt")
        n_image = int(pixels["image_grid_thw"].prod()) // merge
        ids = tokenizer(text_prompt.replace(pad, pad * n_image), return_tensors="pt")["input_ids"].to(device)
        n = ids.shape[1]
        counts["prompt_tokens"] += n
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 pixel_values=pixels["pixel_values"].to(device),
                                 image_grid_thw=pixels["image_grid_thw"].to(device),
                                 mm_token_type_ids=(ids == image_token_id).long(),
                                 max_new_tokens=s["max_tokens"], do_sample=False, num_beams=1,
                                 eos_token_id=sorted(stop), pad_token_id=sorted(stop)[0],
                                 logits_processor=LogitsProcessorList([_TorchSchemaMask(constraint, schema, n)]))
        new = _strip_eos([int(t) for t in out[0, n:]], stop)
        counts["tokens"] += len(new)
        return tokenizer.decode(new, skip_special_tokens=False)

    one(warmup)  # bench.WARMUP, as for the MLX sides
    texts = []
    total = 0.0
    counts.update(tokens=0, prompt_tokens=0)
    for i, image in enumerate(photos):
        t = time.perf_counter()
        texts.append(one(image))
        total += time.perf_counter() - t
        note(f"transformers photo {i + 1}/{len(photos)}: {total:.1f} s so far")
    info = {"transformers_version": transformers.__version__, "torch_version": torch.__version__.split("+")[0],
            "torch_threads": torch.get_num_threads(), "transformers_device": device,
            "transformers_prompt_tokens_per_photo": round(counts["prompt_tokens"] / len(photos), 1),
            "transformers_tokens_per_photo": round(counts["tokens"] / len(photos), 1), "transformers_load_s": round(load_s, 2)}
    del model
    gc.collect()
    return total, texts, info


def single_pass_setup(shapes: str) -> tuple[dict[str, Any], Path, Any, Any, list[Any]]:
    """(settings, model folder, runtime at `--precision`, schema, photos) for timing single-pass critiques of this
    model, warmed up on a full-size photo that is not among `photos` (what this benchmark and `bound` both time)."""
    from .rag import _photos

    s = settings()
    rt, schema = critique_runtime(shapes)
    model_path = Path(rt.path)
    photos = _photos(photo_count(shapes) + 1, PHOTO_SIZE)
    rt.generate_json(photos.pop(), s["prompt"], schema, max_tokens=s["max_tokens"])  # bench.WARMUP
    return s, model_path, rt, schema, photos


def measure(shapes: str) -> dict[str, Any]:
    prefix = f"{shapes}."
    figures: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        figures[prefix + key] = emit(prefix + key, value)

    s, model_path, rt, schema, photos = single_pass_setup(shapes)
    from .rag import _photos

    warmup = _photos(photo_count(shapes) + 1, PHOTO_SIZE)[-1]
    _mlx_vlm(rt, warmup, s["prompt"], schema, s["max_tokens"])  # bench.WARMUP
    ours_s = naive_s = 0.0
    ours_texts: list[str] = []
    naive_match = generated = prompt_tokens = 0
    for i, image in enumerate(photos):
        texts: dict[str, str] = {}
        for side in (("ours", "naive") if i % 2 == 0 else ("naive", "ours")):
            t = time.perf_counter()
            if side == "ours":
                gen = rt.generate_json(image, s["prompt"], schema, max_tokens=s["max_tokens"])
                texts[side] = gen.text
                generated += gen.generated_tokens
                prompt_tokens += gen.prompt_tokens
                ours_s += time.perf_counter() - t
            else:
                texts[side] = _mlx_vlm(rt, image, s["prompt"], schema, s["max_tokens"])
                naive_s += time.perf_counter() - t
        ours_texts.append(texts["ours"])
        naive_match += texts["ours"] == texts["naive"]
        note(f"{shapes} photo {i + 1}/{len(photos)}: ours {ours_s:.1f} s, mlx_vlm {naive_s:.1f} s so far")
    constraint = rt.constraint
    stop = {rt.tokenizer.eos_token_id}
    del rt  # the MLX copy of the weights goes before transformers loads its own (real shapes: 9 GB each)
    gc.collect()
    import mlx.core as mx

    mx.clear_cache()
    n = len(photos)
    if _has_torch():
        hf_s, hf_texts, info = _transformers_side(model_path, constraint, photos, warmup, s["prompt"], schema, s, stop)
    else:
        note(f"transformers side skipped: {NO_TORCH}")
        hf_s, hf_texts, info = float("nan"), [], {}
    put("photos", n)
    put("prompt_tokens_per_photo", round(prompt_tokens / n, 1))
    put("generated_tokens_per_photo", round(generated / n, 1))
    put("mondrian_s_per_photo", round(ours_s / n, 4))
    put("mlx_vlm_s_per_photo", round(naive_s / n, 4))
    put("transformers_s_per_photo", round(hf_s / n, 4))
    put("mondrian_over_mlx_vlm", round(ours_s / naive_s, 3))
    put("mondrian_over_transformers", round(ours_s / hf_s, 3))
    put("mlx_vlm_outputs_match", f"{naive_match}/{n}")
    put("transformers_outputs_match", f"{sum(a == b for a, b in zip(ours_texts, hf_texts))}/{n}" if hf_texts else "nan")
    for key, value in info.items():
        put(key, value)
    put("loadavg_1m", round(os.getloadavg()[0], 2))
    return figures


NO_TORCH = "needs the bench extra (torch): pip install -e '.[bench]'"


def _has_torch() -> bool:
    """Without torch the MLX sides still run and the transformers figures print as nan (the rest of
    `python -m bench` goes on)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def run(size: str) -> dict[str, Any]:
    # OpenMP's default spin-waiting makes torch ~10x slower on a machine whose cores are shared (measured here: a
    # 300-token prefill of the smoke model 0.21 s spinning, 0.026 s passive, 2 threads at load 5). Read once, when
    # torch loads libgomp: so set before the import; an explicit OMP_WAIT_POLICY wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    emit("photo_size", f"{PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}")
    emit("prompt_advisor", ADVISOR)
    emit("transformers_dtype", transformers_dtype())  # the MLX sides run at --precision (printed with the settings)
    emit("omp_wait_policy", os.environ["OMP_WAIT_POLICY"])
    return by_size(size, measure, "mondrian_s_per_photo", "mlx_vlm_s_per_photo", "transformers_s_per_photo")
