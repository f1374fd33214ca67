"""`decode_step`'s `replayed_step_ms` times bench/replay.py's compiled one-token pass; a replay that computed something
else (the wrong position written or rotated, attention reading unwritten slots) could be fast for that reason. So
here it must give mlx-vlm's own hidden states, bit for bit on the CPU, step after step, with schema-forced runs
written through mlx-vlm's cache path into the same buffers in between. No timing here."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx_vlm.models import cache as mlx_cache

from bench.replay import StaticStep
from daemon.model import reuse
from daemon.model.runtime import ModelRuntime

PROMPT = 40
STEPS = 24
DELTA = 3  # a prompt's mRoPE offset: text position = cache offset + DELTA


def _decode(lm, replay: bool) -> tuple[list[int], list[mx.array]]:  # type: ignore[no-untyped-def]
    kv = mlx_cache.make_prompt_cache(lm)
    hidden = lm.model(mx.array([[100 + i % 700 for i in range(PROMPT)]]), cache=kv)
    fixed = StaticStep(lm, kv, DELTA, PROMPT + 2 * STEPS + 8) if replay else None
    delta = mx.array([DELTA])
    tokens, states = [], []
    for i in range(STEPS):
        token = mx.argmax(lm.model.embed_tokens.as_linear(hidden[:, -1:, :])[0, -1]).astype(mx.int32)
        if fixed is not None:
            hidden = fixed.step(token)
        else:
            hidden = lm.model(token.reshape(1, 1), cache=kv,
                              position_ids=reuse._positions(int(kv[0].offset), delta, 1))
        tokens.append(int(token.item()))
        states.append(hidden[0, -1])
        if i % 5 == 2:  # a run of two forced tokens, the way reuse.generate appends them
            hidden = lm.model(mx.array([[300 + i, 301 + i]]), cache=kv,
                              position_ids=reuse._positions(int(kv[0].offset), delta, 2))
            states.append(hidden[0, -1])
    mx.eval(states)
    assert int(kv[0].offset) == PROMPT + STEPS + 2 * len(range(2, STEPS, 5))
    return tokens, states


def test_the_replayed_step_computes_mlx_vlms_pass(smoke_model_path: Path, tmp_path: Path) -> None:
    rt = ModelRuntime.load(str(smoke_model_path), var_dir=tmp_path, max_pixels=200704)
    lm = rt.model.language_model
    plain_tokens, plain = _decode(lm, replay=False)
    replay_tokens, replayed = _decode(lm, replay=True)
    assert replay_tokens == plain_tokens
    assert len(set(plain_tokens)) > 1  # a decoder stuck on one token would hide a wrong position
    for step, (a, b) in enumerate(zip(plain, replayed)):
        assert mx.array_equal(a, b).item(), f"hidden state {step} differs"
