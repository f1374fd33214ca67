"""`decode_step`'s `replayed_step_ms` times bench/replay.py's compiled one-token pass; a replay that computed something
else (the wrong position written or rotated, attention reading unwritten slots) could be fast for that reason. So
here it must give mlx-vlm's own hidden states, bit for bit on the CPU, step after step, with schema-forced runs
written through mlx-vlm's cache path into the same buffers in between. No timing here."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from bench.replay import StaticStep
from daemon.model.runtime import ModelRuntime
from tests.mlx_reference import decode_with_forced_runs

PROMPT = 40
STEPS = 24
DELTA = 3  # a prompt's mRoPE offset: text position = cache offset + DELTA


def test_the_replayed_step_computes_mlx_vlms_pass(smoke_model_path: Path, tmp_path: Path) -> None:
    rt = ModelRuntime.load(str(smoke_model_path), var_dir=tmp_path, max_pixels=200704)
    lm = rt.model.language_model
    plain_tokens, plain = decode_with_forced_runs(lm, prompt=PROMPT, steps=STEPS, delta=DELTA)
    replay_tokens, replayed = decode_with_forced_runs(
        lm, lambda lm, kv: StaticStep(lm, kv, DELTA, PROMPT + 2 * STEPS + 8).step,
        prompt=PROMPT, steps=STEPS, delta=DELTA)
    assert replay_tokens == plain_tokens
    assert len(set(plain_tokens)) > 1  # a decoder stuck on one token would hide a wrong position
    for step, (a, b) in enumerate(zip(plain, replayed)):
        assert mx.array_equal(a, b).item(), f"hidden state {step} differs"
