"""Ordinal score targets for LoRA training: a score token is taught as a distribution over the digits around the
advisor's score, not as one right digit among ten.

A score is read as the expectation over the score digits (daemon.model.scoring, as Q-Align reads its levels), so
what it ranks by is the whole distribution. Plain cross-entropy treats a 6 for a 7 as wrong as a 0 for a 7; from
a few dozen references each digit is seen a couple of times, and the adapter learns to name one reference's digit
rather than an order. A discretised Gaussian around the score (soft ordinal labels, as in Diaz & Marathe's SORD)
trains the distribution whose expectation is read. Only the score digits get it, found by the tokens that precede
them in the report's JSON layout (`"score": 7`, `"overall_grade": 7`); every other token, digits in comments and
two-digit scores ("10") included, keeps plain cross-entropy.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from ..analysis.critique import JSON_LAYOUT

CONTEXT = 3  # tokens before a score digit that identify it as a score (key, '":', ' ' in Qwen's vocabulary)


@dataclass(frozen=True)
class ScoreTokens:
    digits: tuple[int, ...]  # token ids of "0".."9"
    contexts: tuple[tuple[int, ...], ...]  # the CONTEXT token ids before a score digit in a rendered report


def score_tokens(tokenizer: Any) -> ScoreTokens:
    """The digit ids and the token contexts of the score fields, read from a report rendered as the decoder
    writes it (so the contexts are the tokenizer's own split of the layout)."""
    digits = []
    for d in range(10):
        ids = tokenizer.encode(str(d), add_special_tokens=False)
        if len(ids) != 1:
            raise RuntimeError(f"the tokenizer splits the digit {d} into {len(ids)} tokens")
        digits.append(ids[0])
    probe = {"dimensions": {"a": {"comment": "—", "score": 7}}, "summary": "—", "overall_grade": 7}
    ids = tokenizer.encode(json.dumps(probe, **JSON_LAYOUT), add_special_tokens=False)
    contexts = {tuple(ids[i - CONTEXT:i]) for i, t in enumerate(ids) if t == digits[7] and i >= CONTEXT}
    if len(contexts) != 2:
        raise RuntimeError(f"could not find the score fields' tokens in a rendered report ({len(contexts)} found)")
    return ScoreTokens(tuple(digits), tuple(sorted(contexts)))


def soft_cross_entropy(logits: Any, targets: Any, mask: Any, tokens: ScoreTokens, sigma: float) -> Any:
    """Mean loss over the `mask`ed targets: cross-entropy against a Gaussian (std `sigma`, in score points) over
    the ten digits at single-digit score positions, plain cross-entropy elsewhere."""
    import mlx.core as mx
    import mlx.nn as nn

    mask = mask.astype(mx.bool_)
    safe = mx.where(mask, targets, 0)
    batch = safe.shape[0]

    def shifted(k: int) -> Any:  # shifted(k)[t] = safe[t - k] (k > 0) or safe[t + |k|]; -1 past the ends
        pad = mx.full((batch, abs(k)), -1, dtype=safe.dtype)
        return mx.concatenate([pad, safe[:, :-k]], 1) if k > 0 else mx.concatenate([safe[:, -k:], pad], 1)

    digits = mx.array(tokens.digits)
    values = mx.arange(10).astype(mx.float32)
    one_hot = (safe[..., None] == digits).astype(mx.float32)
    is_digit = one_hot.sum(-1) > 0
    in_field = mx.zeros(safe.shape, dtype=mx.bool_)
    for context in tokens.contexts:
        match = mx.ones(safe.shape, dtype=mx.bool_)
        for k, tok in enumerate(reversed(context), start=1):
            match = mx.logical_and(match, shifted(k) == tok)
        in_field = mx.logical_or(in_field, match)
    next_digit = (shifted(-1)[..., None] == digits).any(-1)
    score = mx.logical_and(mx.logical_and(is_digit, in_field), mx.logical_not(next_digit))
    value = (one_hot * values).sum(-1, keepdims=True)
    soft = mx.softmax(-((values - value) ** 2) / (2 * sigma * sigma), axis=-1)
    log_p = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    ordinal = -(soft * mx.take(log_p, digits, axis=-1)).sum(-1)
    hard = nn.losses.cross_entropy(logits, safe, reduction="none")
    loss = mx.where(mask, mx.where(score, ordinal, hard), 0.0).sum()
    return loss / mx.maximum(mask.sum().astype(mx.float32), 1.0)


@contextmanager
def ordinal_loss(tokens: ScoreTokens, sigma: float) -> Iterator[None]:
    """Inside, mlx-vlm's SFT loss (training and validation) uses `soft_cross_entropy`; its metrics stay its own."""
    from mlx_vlm.trainer.vlm.sft import runtime as sft

    plain = getattr(sft, "cross_entropy", None)
    if plain is None:
        raise RuntimeError("mlx_vlm.trainer.vlm.sft.runtime has no cross_entropy to extend: install the mlx-vlm "
                           "version pyproject.toml pins (pip install -e .), which training is tested with")

    def extended(logits: Any, targets: Any, mask: Any = None, **kw: Any) -> Any:
        _, metrics = plain(logits, targets, mask, **kw)
        import mlx.core as mx

        mask = mx.ones(targets.shape, dtype=mx.bool_) if mask is None else mask
        mask = mx.logical_and(mask.astype(mx.bool_), targets != kw.get("ignore_index", -100))
        return soft_cross_entropy(logits, targets, mask, tokens, sigma), metrics

    sft.cross_entropy = extended
    try:
        yield
    finally:
        sft.cross_entropy = plain
