"""daemon/model/flat_step.py: the decode loop's one-token pass written against the weights (on a GPU). It must give
the modules' own hidden states, bit for bit, step after step, with schema-forced runs written through mlx-vlm's
path into the same caches in between, with and without the stacked projections; and step aside where an adapter's
LoRA layers are in."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from daemon.model import flat_step, fused_proj, text_rope
from daemon.model.flat_step import FlatStep
from daemon.model.runtime import ModelRuntime
from tests.mlx_reference import decode_with_forced_runs

PROMPT = 40
STEPS = 24
DELTA = 3  # a prompt's mRoPE offset: text position = cache offset + DELTA


@pytest.mark.parametrize("stacked,bits,one_rope", [(True, None, False), (False, None, False), (True, 4, False),
                                                   (False, 4, False), (True, None, True), (True, 4, True)],
                         ids=["stacked", "one-projection-each", "stacked-4bit", "one-projection-each-4bit",
                              "stacked-one-rope", "stacked-4bit-one-rope"])
def test_the_flat_step_computes_the_modules_pass(smoke_model_path: Path, tmp_path: Path, stacked: bool,
                                                 bits: int | None, one_rope: bool) -> None:
    import mlx.nn as nn

    rt = ModelRuntime.load(str(smoke_model_path), var_dir=tmp_path, max_pixels=200704)
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
    plain_tokens, plain = decode_with_forced_runs(lm, prompt=PROMPT, steps=STEPS, delta=DELTA)
    assert bool(fused_proj.fused_calls(lm)) == stacked

    def flat_pass(lm, kv):  # type: ignore[no-untyped-def]
        step = FlatStep(lm, one_rope=one_rope)
        return lambda token: step.step(token, mx.array(int(kv[0].offset) + DELTA), kv)

    flat_tokens, flat = decode_with_forced_runs(lm, flat_pass, prompt=PROMPT, steps=STEPS, delta=DELTA)
    assert flat_tokens == plain_tokens
    assert len(set(plain_tokens)) > 1  # a decoder stuck on one token would hide a wrong position
    for step, (a, b) in enumerate(zip(plain, flat)):
        assert mx.array_equal(a, b).item(), f"hidden state {step} differs"


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
