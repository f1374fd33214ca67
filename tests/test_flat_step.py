"""daemon/model/flat_step.py: the decode loop's one-token pass written against the weights (on a GPU). It must give
the modules' own hidden states, bit for bit, step after step, with schema-forced runs written through mlx-vlm's
path into the same caches in between, with and without the stacked projections; and step aside where an adapter's
LoRA layers are in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from daemon.model import flat_step, fused_proj, text_rope
from daemon.model.flat_step import FlatStep
from daemon.model.runtime import ModelRuntime
from tests.mlx_reference import decode_with_forced_runs

PROMPT = 40
STEPS = 24
DELTA = 3  # a prompt's mRoPE offset: text position = cache offset + DELTA


def _runtime(model_path: Path, var_dir: Path, stacked: bool, bits: int | None) -> ModelRuntime:
    """The smoke model as a GPU runs it (text RoPE, stacked projections if `stacked`), at `bits` if given."""
    import mlx.nn as nn

    rt = ModelRuntime.load(str(model_path), var_dir=var_dir, max_pixels=200704)
    if bits:  # the default precision: every projection a QuantizedLinear
        nn.quantize(rt.model.language_model, group_size=64, bits=bits)
    text_rope.install(rt.model, always=True)
    if stacked:
        assert fused_proj.install(rt.model, always=True)
    lm = rt.model.language_model
    # The smoke checkpoint's norms are all ones, which would hide one norm used in place of another.
    mx.random.seed(7)
    for norm in [lm.model.norm] + [n for layer in lm.model.layers
                                   for n in (layer.input_layernorm, layer.post_attention_layernorm)]:
        norm.weight = mx.random.uniform(0.5, 1.5, norm.weight.shape).astype(norm.weight.dtype)
    return rt


PRECISIONS = pytest.mark.parametrize("stacked,bits", [(True, None), (False, None), (True, 4), (False, 4)],
                                     ids=["stacked", "one-projection-each", "stacked-4bit",
                                          "one-projection-each-4bit"])


@PRECISIONS
@pytest.mark.parametrize("runs", [False, True], ids=["forced-runs-by-the-modules", "forced-runs-flat"])
def test_the_flat_step_computes_the_modules_pass(smoke_model_path: Path, tmp_path: Path, stacked: bool,
                                                 bits: int | None, runs: bool) -> None:
    """One-token passes, and (`runs`) schema-forced runs of two and three tokens in one pass (causal over the
    run), through the flat pass: every position's hidden state is the modules' own."""
    lm = _runtime(smoke_model_path, tmp_path, stacked, bits).model.language_model
    plain_tokens, plain = decode_with_forced_runs(lm, prompt=PROMPT, steps=STEPS, delta=DELTA)
    assert bool(fused_proj.fused_calls(lm)) == stacked

    def flat_pass(lm, kv):  # type: ignore[no-untyped-def]
        step = FlatStep(lm)
        return lambda token: step.step(token, mx.array(int(kv[0].offset) + DELTA), kv)

    calls = flat_step.calls(lm)
    flat_tokens, flat = decode_with_forced_runs(lm, flat_pass, prompt=PROMPT, steps=STEPS, delta=DELTA,
                                                runs_too=runs)
    forced_runs = len(range(2, STEPS, 5))
    assert flat_step.calls(lm) - calls == STEPS + (forced_runs if runs else 0)
    assert flat_tokens == plain_tokens
    assert len(set(plain_tokens)) > 1  # a decoder stuck on one token would hide a wrong position
    assert len(flat) == len(plain) == STEPS + forced_runs
    for step, (a, b) in enumerate(zip(plain, flat)):
        assert a.shape == b.shape and mx.array_equal(a, b).item(), f"hidden state {step} differs"


def _batched_decode(lm: Any, flat: bool, rows: int = 3, steps: int = 12, leaves_at: int = 6) -> list:
    """Greedy one-token passes over `rows` prompts of one length, as batch.py runs a shoot: every row at one text
    position; the middle row leaves the batch (its cache rows sliced away) after `leaves_at` steps. Every row's
    hidden state at every step, evaluated."""
    from mlx_vlm.models import cache as mlx_cache

    from daemon.model import reuse
    from daemon.model.fused_proj import fused_decoding
    from daemon.model.text_rope import text_positions

    kv = mlx_cache.make_prompt_cache(lm)
    prompts = mx.array([[(100 + 37 * r + i) % 700 for i in range(PROMPT)] for r in range(rows)])
    hidden = lm.model(prompts, cache=kv)[:, -1, :]
    states = []
    with text_positions(lm), fused_decoding(lm):
        step = FlatStep(lm) if flat else None
        for i in range(steps):
            if i == leaves_at:
                keep = mx.array([r for r in range(hidden.shape[0]) if r != 1], dtype=mx.int32)
                hidden = hidden[keep]
                for c in kv:
                    c.keys, c.values = c.keys[keep], c.values[keep]
            tokens = mx.argmax(lm.model.embed_tokens.as_linear(hidden), axis=-1).astype(mx.int32)
            offset = int(kv[0].offset)
            if step is not None:
                hidden = step.step(tokens, mx.array(offset + DELTA), kv)[:, -1, :]
            else:
                positions = reuse._positions(offset, mx.array([DELTA]), 1)  # [3, 1, 1]: the same for every row
                hidden = lm.model(tokens.reshape(-1, 1), cache=kv,
                                  position_ids=mx.broadcast_to(positions, (3, tokens.shape[0], 1)))[:, -1, :]
            states.append(hidden)
    mx.eval(states)
    return states


@PRECISIONS
def test_the_flat_step_computes_the_modules_pass_for_a_batch(smoke_model_path: Path, tmp_path: Path,
                                                             stacked: bool, bits: int | None) -> None:
    """batch.py: several photos' rows in one pass, a row leaving halfway; each row's state is the modules'."""
    lm = _runtime(smoke_model_path, tmp_path, stacked, bits).model.language_model
    plain = _batched_decode(lm, flat=False)
    calls = flat_step.calls(lm)
    flat = _batched_decode(lm, flat=True)
    assert flat_step.calls(lm) == calls + len(flat)
    assert [s.shape[0] for s in plain] == [3] * 6 + [2] * 6
    assert not mx.array_equal(plain[-1][0], plain[-1][1]).item()  # rows differ: a row mixed up would show
    for step, (a, b) in enumerate(zip(plain, flat)):
        assert mx.array_equal(a, b).item(), f"hidden states at step {step} differ"


def test_an_adapter_in_the_model_runs_the_modules(smoke_model_path: Path, tmp_path: Path) -> None:
    """A LoRA layer is not a plain projection: with an advisor's adapter in, even one on a single layer's down
    projection, the decode loop runs mlx-vlm's modules (which apply the adapter), and goes back to the flat pass
    once the adapter is out."""
    from tests.lora_helpers import lora_keys, random_adapter

    rt = ModelRuntime.load(str(smoke_model_path), var_dir=tmp_path, max_pixels=200704)
    text_rope.install(rt.model, always=True)
    lm = rt.model.language_model
    keys = [k for k in lora_keys(rt.model) if k.endswith(".layers.1.mlp.down_proj")]
    assert len(keys) == 1
    adapter = random_adapter(tmp_path / "adapter", rt.model, seed=5, keys=keys)
    assert FlatStep.build(lm) is not None
    with rt.use_adapter(adapter):
        assert not flat_step.fits(lm)
        assert FlatStep.build(lm) is None
        with pytest.raises(ValueError):
            FlatStep(lm)
    assert FlatStep.build(lm) is not None
