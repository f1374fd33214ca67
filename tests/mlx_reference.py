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
