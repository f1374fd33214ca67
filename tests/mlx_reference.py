"""What mlx-vlm's own `generate` writes: the reference the runtime's fast generation path is compared with."""

from __future__ import annotations

from typing import Any


def mlx_vlm_ids(runtime: Any, image: Any, prompt: str, schema: dict, *, max_tokens: int,
                system: str | None = None) -> list[int]:
    """The token ids mlx-vlm's `generate` picks greedily under the runtime's own schema constraint (EOS dropped)."""
    import mlx_vlm

    out = mlx_vlm.generate(runtime.model, runtime.processor, runtime.format_prompt(prompt, system=system),
                           image=[image.convert("RGB")], max_tokens=max_tokens, temperature=0.0, verbose=False,
                           logits_processors=[runtime.constraint.logits_processor(schema)])
    ids = [int(t) for t in out.token_ids]
    while ids and ids[-1] == runtime.tokenizer.eos_token_id:
        ids.pop()
    return ids


def mlx_vlm_text(runtime: Any, image: Any, prompt: str, schema: dict, *, max_tokens: int,
                 system: str | None = None) -> str:
    ids = mlx_vlm_ids(runtime, image, prompt, schema, max_tokens=max_tokens, system=system)
    return runtime.tokenizer.decode(ids, skip_special_tokens=False)


def decode_with_forced_runs(lm: Any, one_token: Any = None, *, prompt: int = 40, steps: int = 24,
                            delta: int = 3, runs_too: bool = False) -> tuple[list[int], list[Any]]:
    """Greedy one-token passes of `lm` after a `prompt`-token prompt, with a run of forced tokens (two, then three)
    appended every fifth step in one pass, as reuse.generate appends them; text positions are the cache offset plus
    `delta` (a prompt's mRoPE shift). `one_token(lm, kv)`, if given, makes the one-token passes (and with
    `runs_too` the forced runs' passes), made inside `text_positions` and `fused_decoding`; mlx-vlm's modules run
    the rest (with no `one_token`, all of it: the reference). The tokens picked and every hidden state (each
    position of a run), evaluated."""
    import mlx.core as mx
    from mlx_vlm.models import cache as mlx_cache

    from daemon.model import reuse
    from daemon.model.fused_proj import fused_decoding
    from daemon.model.text_rope import text_positions

    kv = mlx_cache.make_prompt_cache(lm)
    hidden = lm.model(mx.array([[100 + i % 700 for i in range(prompt)]]), cache=kv)
    shift = mx.array([delta])
    tokens, states = [], []
    with text_positions(lm), fused_decoding(lm):
        step = one_token(lm, kv) if one_token is not None else None
        for i in range(steps):
            token = mx.argmax(lm.model.embed_tokens.as_linear(hidden[:, -1:, :])[0, -1]).astype(mx.int32)
            if step is not None:
                hidden = step(token)
            else:
                hidden = lm.model(token.reshape(1, 1), cache=kv,
                                  position_ids=reuse._positions(int(kv[0].offset), shift, 1))
            tokens.append(int(token.item()))
            states.append(hidden[0, -1])
            if i % 5 == 2:
                run = mx.array([[300 + i + j for j in range(2 + i % 2)]])
                if step is not None and runs_too:
                    hidden = step(run)
                else:
                    hidden = lm.model(run, cache=kv,
                                      position_ids=reuse._positions(int(kv[0].offset), shift, run.shape[1]))
                states.append(hidden[0])
    mx.eval(states)
    assert int(kv[0].offset) == prompt + steps + sum(2 + i % 2 for i in range(2, steps, 5))
    return tokens, states


def picks_and_passes(calls: list[list[tuple[tuple[int, ...], str]]], hidden: int) -> tuple[list[int], list[int]]:
    """Indexes into the `async_evals` fixture's record: of the calls holding only greedy picks (int32 scalars or a
    vector of them), and of those holding a forward pass's hidden states (last axis `hidden`)."""
    picks = [i for i, call in enumerate(calls)
             if call and all(dtype == "mlx.core.int32" and len(shape) <= 1 for shape, dtype in call)]
    passes = [i for i, call in enumerate(calls) if any(shape and shape[-1] == hidden for shape, _ in call)]
    return picks, passes
