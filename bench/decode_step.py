"""`decode_step`: where one decode forward pass spends its time, ours against mlx-vlm's `generate_step`.

A step of a greedy decoder has three parts on the thread that runs the model: building the pass's graph in Python,
`mx.async_eval` (which on MLX's CUDA backend launches the pass's kernels on the calling thread), and waiting for
the token. If the wait dominates, the device is the bound and overlapping CPU work behind it pays; if the first two
dominate, the step is dispatch-bound and only fewer passes, fewer kernels a pass, or more rows a pass help.

Figures (`smoke.` / `real.` prefixes), ms per step at a 400-token text context, greedy, no schema:
- `graph_ms`, `launch_ms`, `wait_ms`: the three parts for one-token passes the way `daemon/model/reuse.py` runs them;
- `ours_step_ms`: their total, `mlx_vlm_step_ms`: `mlx_vlm.generate_step`'s time a token on the same cache length;
- `forced_pass_ms`: one pass appending FORCED tokens at a context length not seen before (what fast-forwarding a
  schema-forced run costs), `forced_pass_same_shape_ms`: the same pass repeated at one context length. On CUDA a
  multi-token pass may take cuDNN's attention, whose graph is built per shape (`cudnn_sdpa=` prints whether it may);
  both through mlx-vlm's modules; `flat_forced_pass_ms`: `forced_pass_ms` through the flat pass, which the decode
  loop takes for forced runs where it fits (daemon/model/flat_step.py);
- `text_rope=1` where the runtime rotates text positions with mx.fast.rope (on a GPU: daemon/model/text_rope.py);
- `stacked_proj=1` where it projects q/k/v and gate/up with one matmul each (on a GPU: daemon/model/fused_proj.py),
  and `unstacked_step_ms`: mlx-vlm's modules without them (nor the flat pass), measured interleaved with it;
- `masked_step_ms`: `ours_step_ms` with the greedy pick masked by a fresh host boolean vector over the vocabulary
  each step, as a schema-constrained critique's is;
- `replayed_step_ms` / `replayed_trace_ms`: one-token passes replayed from one compiled graph over a fixed-length
  cache (bench/replay.py: tried, not kept) and the first step's trace;
- `flat_step=1` where the decode loop's one-token pass is written against the weights (on a GPU:
  daemon/model/flat_step.py), and `modules_step_ms`: `ours_step_ms` through mlx-vlm's modules instead, measured
  interleaved with it in the same run;
- `guessed_step_ms` / `unguessed_step_ms`: a step through the decode loop's own pick under a fresh mask that
  forbids every 50th id, the free token picked without the mask and checked after (undone on a miss:
  `guess_miss_rate`), or under the mask; `guessing=1` where the daemon guesses (daemon/model/reuse.py);
- `pick_with_pass_step_ms`: `unguessed_step_ms` with the pick evaluated in one `mx.async_eval` with the pass queued
  on it, as the loop did before 2026-12-04: MLX signals one event per evaluation, so the pick's value then waits
  for the whole pass and the host cannot build the next pass while the device runs this one;
- `batch4_step_ms`: a one-token step of 4 rows at one text position, as daemon/model/batch.py runs one shoot's
  photos (the flat pass where it fits), and `batch4_modules_step_ms`: the same through mlx-vlm's modules,
  interleaved with it.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import apply_precision, by_size, emit, note, settings as bench_settings, var_dir

CONTEXT = 400
FORCED = 4
STEPS = {"smoke": 100, "real": 150}


def one_token_pass(lm: Any, kv: list, *, flat: bool = True) -> Callable[[Any], Any]:
    """The decode loop's one-token pass (reuse.generate's `forward`, a prompt without an mRoPE delta): through
    daemon/model/flat_step.py where it fits and `flat`, else mlx-vlm's modules. Call it, and the pass, inside
    `text_positions(lm)` and `fused_decoding(lm)`."""
    import mlx.core as mx

    from daemon.model import reuse
    from daemon.model.flat_step import FlatStep

    step = FlatStep.build(lm) if flat else None
    no_delta = mx.array([0])
    if step is not None:
        return lambda token: step.step(token, mx.array(int(kv[0].offset)), kv)
    return lambda token: lm.model(token.reshape(1, 1), cache=kv,
                                  position_ids=reuse._positions(int(kv[0].offset), no_delta, 1))


def masked_pick(lm: Any, hidden: Any, allowed: np.ndarray) -> Any:
    """The greedy token after `hidden`'s last position among the `allowed` ids (a host boolean vector over the
    vocabulary), as a schema-constrained critique picks a free token: the whole vocabulary head, the mask's `where`,
    the argmax. Lazy."""
    import mlx.core as mx

    last = hidden[:, -1:, :]
    logits = (lm.model.embed_tokens.as_linear(last) if lm.args.tie_word_embeddings else lm.lm_head(last))[0, -1]
    return mx.argmax(mx.where(mx.array(allowed), logits, mx.array(-mx.inf, dtype=logits.dtype))).astype(mx.int32)


def masked_step_ms(lm: Any, steps: int, context: int = CONTEXT) -> float:
    """ms a one-token step of `lm` (a loaded language model) takes the way a schema-constrained critique takes it:
    the vocabulary head, the pick masked by a fresh host boolean vector over the vocabulary (what llguidance allows
    next, here every id but each seventh) applied with `where`, then the next pass, at a `context`-token text
    context. `bound` times it in its own process beside a real critique's passes."""
    import mlx.core as mx
    from mlx_vlm.models import cache as mlx_cache

    from daemon.model import fused_proj
    from daemon.model.text_rope import text_positions

    kv = mlx_cache.make_prompt_cache(lm)
    hidden = lm.model(mx.array([[100 + i % 800 for i in range(context)]]), cache=kv)
    mx.eval(hidden)
    vocab = int(lm.args.vocab_size)
    allowed = np.ones(vocab, dtype=bool)
    allowed[np.arange(0, vocab, 7)] = False
    started = time.perf_counter()
    with text_positions(lm), fused_proj.fused_decoding(lm):
        forward = one_token_pass(lm, kv)
        for i in range(steps):
            token = masked_pick(lm, hidden, np.roll(allowed, i))  # a new vector each step, as llguidance's is
            mx.async_eval(token)
            hidden = forward(token)
            mx.async_eval(hidden)
            int(token.item())
        mx.eval(hidden)
    return (time.perf_counter() - started) / steps * 1e3


# Primitives MLX evaluates without a kernel on a GPU (a new view of the same buffer), left out of `kernels`.
VIEW_PRIMITIVES = frozenset({"Broadcast", "Reshape", "Transpose", "Slice", "Flatten", "Unflatten", "ExpandDims",
                             "Squeeze", "AsStrided", "StopGradient", "Depends"})


def pass_operations(lm: Any, context: int = CONTEXT) -> Counter[str]:
    """The operations (primitive name: count) in the graph of one masked one-token pass of `lm` as `masked_step_ms`
    builds it (the head, the mask's `where`, the pick, the next pass), read from `mx.export_to_dot` on the default
    device: fast primitives (RMSNorm, RoPE, attention) are one operation each where the device has them."""
    import mlx.core as mx
    from mlx_vlm.models import cache as mlx_cache

    from daemon.model import fused_proj
    from daemon.model.text_rope import text_positions

    kv = mlx_cache.make_prompt_cache(lm)
    hidden = lm.model(mx.array([[100 + i % 800 for i in range(context)]]), cache=kv)
    mx.eval(hidden)
    with text_positions(lm), fused_proj.fused_decoding(lm):
        forward = one_token_pass(lm, kv)
        hidden = forward(masked_pick(lm, hidden, np.ones(int(lm.args.vocab_size), dtype=bool)))
        with tempfile.TemporaryDirectory() as tmp:
            dot = f"{tmp}/pass.dot"
            mx.export_to_dot(dot, hidden)
            return Counter(re.findall(r'label ="([^"]+)", shape=rectangle', Path(dot).read_text()))


def kernels(operations: Counter[str]) -> int:
    """How many of `operations` run a kernel (all but views)."""
    return sum(n for name, n in operations.items() if name not in VIEW_PRIMITIVES)


def dispatch_floor_ms(count: int, steps: int, width: int) -> float:
    """ms a step takes when it is `count` element-wise products on a `width`-wide vector, built, launched and
    waited for the way a decode step is (the next step built while the last one runs): what this backend's
    dispatch costs a pass of that many kernels whatever they compute. A floor for a batch-1 decode step that the
    weight bytes / bandwidth bound does not count."""
    import mlx.core as mx

    factor = mx.full((1, width), 1.0001)
    y = mx.ones((1, width))
    mx.eval(factor, y)

    def one_step(y: Any) -> Any:
        for _ in range(count):
            y = y * factor
        return y

    for _ in range(3):  # warm: the kernel and, on CUDA, its graphs
        y = one_step(y)
        mx.eval(y)
    started = time.perf_counter()
    previous = None
    for _ in range(steps):
        y = one_step(y)
        mx.async_eval(y)
        if previous is not None:
            previous[0, 0].item()
        previous = y
    y[0, 0].item()
    return (time.perf_counter() - started) / steps * 1e3


def measure(shapes: str) -> dict[str, Any]:
    import mlx.core as mx
    from mlx_vlm.generate import generate_step
    from mlx_vlm.models import cache as mlx_cache

    from daemon.model import fused_proj, reuse
    from daemon.model.runtime import ModelRuntime
    from daemon.model.smoke import ensure_smoke_model
    from daemon.model.text_rope import TextRope, text_positions

    from daemon.model import flat_step

    from .replay import StaticStep

    prefix = f"{shapes}."
    figures: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        figures[prefix + key] = emit(prefix + key, value)

    rt = ModelRuntime.load(str(ensure_smoke_model(var_dir(), shapes=shapes)), var_dir=var_dir(),
                           max_pixels=bench_settings()["max_pixels"])
    apply_precision(rt.model)
    lm = rt.model.language_model
    steps = STEPS[shapes]
    batch = rt.GPU_BATCH  # photos a pass where the device chooses (a GPU): Runtime.suggested_batch_size
    prompt = mx.array([[100 + i % 800 for i in range(CONTEXT)]])
    no_delta = mx.array([0])

    def head(hidden: Any) -> Any:
        last = hidden[:, -1:, :]
        logits = lm.model.embed_tokens.as_linear(last) if lm.args.tie_word_embeddings else lm.lm_head(last)
        return mx.argmax(logits[0, -1]).astype(mx.int32)

    def ours(stacked: bool = True, flat: bool = True) -> tuple[float, float, float, float]:
        kv = mlx_cache.make_prompt_cache(lm)
        hidden = lm.model(prompt, cache=kv)
        mx.eval(hidden)
        graph = launch = wait = 0.0
        started = time.perf_counter()
        # Entered once for the whole loop, as reuse.generate does.
        with text_positions(lm), fused_proj.fused_decoding(lm) if stacked else nullcontext():
            forward = one_token_pass(lm, kv, flat=flat and stacked)
            for _ in range(steps):
                t0 = time.perf_counter()
                token = head(hidden)
                mx.async_eval(token)
                hidden = forward(token)
                t1 = time.perf_counter()
                mx.async_eval(hidden)
                t2 = time.perf_counter()
                int(token.item())
                t3 = time.perf_counter()
                graph, launch, wait = graph + t1 - t0, launch + t2 - t1, wait + t3 - t2
        mx.eval(hidden)
        total = time.perf_counter() - started
        return total / steps * 1e3, graph / steps * 1e3, launch / steps * 1e3, wait / steps * 1e3

    def masked() -> float:
        return masked_step_ms(lm, steps)

    def replayed() -> tuple[float, float]:
        # One-token passes replayed from one compiled graph over a fixed-length cache (bench/replay.py):
        # ms a step, and ms the first step took (the trace, once a generation).
        kv = mlx_cache.make_prompt_cache(lm)
        mx.eval(lm.model(prompt, cache=kv))
        hidden = lm.model(prompt[:, -1:], cache=kv)
        with text_positions(lm), fused_proj.fused_decoding(lm):
            t0 = time.perf_counter()
            fixed = StaticStep(lm, kv, 0, CONTEXT + steps + 8)
            hidden = fixed.step(head(hidden))
            mx.eval(hidden)
            first = time.perf_counter() - t0
            started = time.perf_counter()
            for _ in range(steps):
                token = head(hidden)
                mx.async_eval(token)
                hidden = fixed.step(token)
                mx.async_eval(hidden)
                int(token.item())
            mx.eval(hidden)
        return (time.perf_counter() - started) / steps * 1e3, first * 1e3

    def forced(same_shape: bool, flat: bool = False) -> float:
        # `flat`: through the flat pass (as reuse.generate runs a forced run where it fits), else mlx-vlm's modules.
        kv = mlx_cache.make_prompt_cache(lm)
        mx.eval(lm.model(prompt, cache=kv))
        run = mx.array([[200 + i for i in range(FORCED)]])
        with fused_proj.fused_decoding(lm):
            step = flat_step.FlatStep(lm) if flat else None  # once a generation, as reuse.generate makes it
        started = time.perf_counter()
        for _ in range(steps // 3):
            offset = int(kv[0].offset)
            with text_positions(lm), fused_proj.fused_decoding(lm):
                if step is not None:
                    mx.eval(step.step(run, mx.array(offset), kv))
                else:
                    mx.eval(lm.model(run, cache=kv, position_ids=reuse._positions(offset, no_delta, FORCED)))
            if same_shape:
                for c in kv:
                    c.trim(FORCED)
        return (time.perf_counter() - started) / (steps // 3) * 1e3

    def library() -> float:
        gen = generate_step(prompt, rt.model, None, None, max_tokens=steps + 1, temperature=0.0)
        next(gen)  # the prefill
        started = time.perf_counter()
        n = sum(1 for _ in gen)
        return (time.perf_counter() - started) / max(n, 1) * 1e3

    flat_fits = flat_step.fits(lm)

    def modules() -> float | None:  # ours_step_ms through mlx-vlm's modules, where the flat pass is ours
        return ours(flat=False)[0] if flat_fits else None

    def picked(guess: bool, together: bool = False) -> tuple[float, float]:
        # ms a step takes through the decode loop's own pick (reuse._Head, reuse.pass_on_pick) under a fresh mask
        # each step that forbids every 50th id (free text's unmasked argmax is allowed ~98 % of the time), guessing
        # or not; and the share of guesses missed. `together`: the pick evaluated in one `async_eval` with the pass
        # queued on it, as the loop did before 2026-12-04 (its value then waits for the whole pass).
        kv = mlx_cache.make_prompt_cache(lm)
        hidden = lm.model(prompt, cache=kv)
        mx.eval(hidden)
        vocab = int(lm.args.vocab_size)
        allowed = np.ones(vocab, dtype=bool)
        allowed[np.arange(0, vocab, 50)] = False
        pick = reuse._Head(lm, guess=guess)
        started = time.perf_counter()
        with text_positions(lm), fused_proj.fused_decoding(lm):
            forward = one_token_pass(lm, kv)
            for i in range(steps):
                mask = np.roll(allowed, i)
                if together:
                    chosen = pick.choose(hidden, mask)
                    hidden = forward(chosen.reshape(1, 1))
                    mx.async_eval(hidden)
                    int(chosen.item())
                    continue
                _, hidden, _ = reuse.pass_on_pick(pick, pick.choose(hidden, mask), hidden, mask, forward, kv)
        mx.eval(hidden)
        return (time.perf_counter() - started) / steps * 1e3, pick.misses / max(pick.guesses, 1)

    def batched(flat: bool = True) -> float | None:
        # ms a one-token step of `batch` rows takes as batch.py runs one shoot (one text position for every row):
        # through the flat pass where it fits and `flat`, else mlx-vlm's modules.
        if not flat and not flat_fits:
            return None
        kv = mlx_cache.make_prompt_cache(lm)
        hidden = lm.model(mx.repeat(prompt, batch, axis=0), cache=kv)[:, -1, :]
        mx.eval(hidden)
        started = time.perf_counter()
        with text_positions(lm), fused_proj.fused_decoding(lm):
            step = flat_step.FlatStep.build(lm) if flat else None
            for _ in range(steps):
                tokens = mx.argmax(lm.model.embed_tokens.as_linear(hidden) if lm.args.tie_word_embeddings
                                   else lm.lm_head(hidden), axis=-1).astype(mx.int32)
                mx.async_eval(tokens)
                offset = int(kv[0].offset)
                if step is not None:
                    hidden = step.step(tokens, mx.array(offset), kv)[:, -1, :]
                else:
                    positions = mx.broadcast_to(reuse._positions(offset, no_delta, 1), (3, batch, 1))
                    hidden = lm.model(tokens.reshape(-1, 1), cache=kv, position_ids=positions)[:, -1, :]
                mx.async_eval(hidden)
                tokens.tolist()  # the picks reach the host each step, as each row's llguidance needs them
        mx.eval(hidden)
        return (time.perf_counter() - started) / steps * 1e3

    ours(), ours(False), library(), forced(True), forced(True, flat=flat_fits), replayed(), masked(), modules(), \
        batched(), batched(False), picked(True), picked(False), picked(False, together=True)  # warm-up: compiles
    runs = [(ours(), library(), ours(False), replayed(), masked(), modules(), batched(), batched(False),
             picked(True), picked(False), picked(False, together=True)) for _ in range(2)]
    forced_new, forced_same = forced(False), forced(True)
    forced_flat = forced(False, flat=True) if flat_fits else None
    (step, graph, launch, wait), lib, *_ = min(runs, key=lambda r: r[0][0])
    put("device", str(mx.default_device()))
    put("context_tokens", CONTEXT)
    put("steps", steps)
    put("graph_ms", round(graph, 2))
    put("launch_ms", round(launch, 2))
    put("wait_ms", round(wait, 2))
    put("ours_step_ms", round(step, 2))
    put("mlx_vlm_step_ms", round(min(r[1] for r in runs), 2))
    put("unstacked_step_ms", round(min(r[2][0] for r in runs), 2))
    put("masked_step_ms", round(min(r[4] for r in runs), 2))
    put("replayed_step_ms", round(min(r[3][0] for r in runs), 2))
    put("modules_step_ms", round(min(r[5] for r in runs), 2) if flat_fits else "n/a (ours runs the modules here)")
    put("replayed_trace_ms", round(min(r[3][1] for r in runs), 1))
    put("guessed_step_ms", round(min(r[8][0] for r in runs), 2))
    put("unguessed_step_ms", round(min(r[9][0] for r in runs), 2))
    put("guess_miss_rate", round(runs[0][8][1], 3))
    put("pick_with_pass_step_ms", round(min(r[10][0] for r in runs), 2))
    put("guessing", int(reuse.guessing_pays()))  # whether the daemon's decode loop guesses on this device
    put(f"batch{batch}_step_ms", round(min(r[6] for r in runs), 2))
    put(f"batch{batch}_modules_step_ms",
        round(min(r[7] for r in runs), 2) if flat_fits else "n/a (a batch runs the modules here)")
    put("forced_tokens_per_pass", FORCED)
    put("forced_pass_ms", round(forced_new, 2))
    put("forced_pass_same_shape_ms", round(forced_same, 2))
    put("flat_forced_pass_ms", round(forced_flat, 2) if forced_flat is not None else "n/a (the modules run it here)")
    put("cudnn_sdpa", os.environ.get("MLX_CUDA_USE_CUDNN_SDPA", "1"))
    put("text_rope", int(isinstance(lm.layers[0].self_attn.rotary_emb, TextRope)))  # daemon/model/text_rope.py
    put("stacked_proj", int(bool(fused_proj.stacks(lm))))  # daemon/model/fused_proj.py
    put("flat_step", int(flat_fits))  # daemon/model/flat_step.py
    if mx.default_device() == mx.cpu:  # the CPU backend computes inside async_eval: launch_ms is the compute
        note(f"{shapes}: on the CPU, launch_ms holds the pass's compute; the split means something on a GPU")
    else:
        note(f"{shapes}: a step is {'dispatch' if graph + launch > wait else 'device'}-bound")
    return figures


def run(size: str) -> dict[str, Any]:
    return by_size(size, measure, "ours_step_ms", "mlx_vlm_step_ms")
