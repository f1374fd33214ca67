"""One fused RoPE kernel per projection for the tokens a critique writes.

Qwen2-VL rotates queries and keys with mRoPE: three position axes (time, row, column), each owning a chunk of
the frequencies. mlx-vlm applies it with generic arithmetic (split, negate, concatenate, multiply, add, cast:
about ten kernels a layer for the queries and keys) except on Metal, where it has a compiled kernel. On a GPU a
decode step is launch-bound (one token, ~560 kernels, each far below the device's bandwidth), so those
kernels are a large share of a step on CUDA.

Every token after the prompt is text, and for text the three axes carry the same position. Chunked mRoPE
then reduces exactly to plain RoPE at that position with the same frequencies, which is `mx.fast.rope`: one
kernel for the queries, one for the keys. `install` wraps each layer's rotary module; the wrapper behaves as
mlx-vlm's own until `text_positions` says the positions are text, so prefill (image positions), training,
and plain `mlx_vlm.generate` on the same model run exactly as before.

MLX is not thread-safe: use these from the runtime's thread only.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import mlx.core as mx
import mlx.nn as nn


class TextRope(nn.Module):
    """mlx-vlm's rotary module, with a one-kernel path for text positions (see the module's doc)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        # Plain attributes, not module children: no parameters to save, nothing for LoRA to find in here.
        wavelengths = 1.0 / inner.inv_freq  # fast.rope takes wavelengths; these keep the module's own angles
        mx.eval(wavelengths)
        for key, value in (("_inner", inner), ("_dims", int(inner.dim)), ("_wavelengths", wavelengths),
                           ("_text", False), ("text_calls", 0)):
            object.__setattr__(self, key, value)

    @property
    def fused_apply(self) -> bool:
        # True makes the decoder hand position ids to apply_rotary instead of precomputed cos/sin.
        return self._text or bool(self._inner.fused_apply)

    def __getattr__(self, key: str) -> Any:  # the rest of mlx-vlm's rotary interface (dim, mrope_section, ...)
        if key.startswith("_"):
            raise AttributeError(key)
        return getattr(self._inner, key)

    def __call__(self, x: mx.array, position_ids: mx.array) -> Any:
        return self._inner(x, position_ids)

    def apply_rotary(self, q: mx.array, k: mx.array, position_ids: mx.array, *, unsqueeze_dim: int = 1,
                     cast_output: bool = True) -> tuple[mx.array, mx.array]:
        if self._text and unsqueeze_dim == 1 and q.ndim == 4 and position_ids.ndim == 3:
            # Text: every axis holds the same consecutive positions, and (text_positions' promise) every row the
            # same ones. MLX's CUDA kernel reads one offset for the whole batch: a per-row offset array would
            # silently rotate every row from the first row's position.
            start = position_ids[0, 0, 0]
            object.__setattr__(self, "text_calls", self.text_calls + 1)  # what a test or a benchmark can check
            rope = dict(traditional=False, base=None, scale=1.0, offset=start, freqs=self._wavelengths)
            return mx.fast.rope(q, self._dims, **rope), mx.fast.rope(k, self._dims, **rope)
        return self._inner.apply_rotary(q, k, position_ids, unsqueeze_dim=unsqueeze_dim, cast_output=cast_output)


def _style_fits(rotary: Any) -> bool:
    # Plain RoPE equals mRoPE at equal positions only for the chunked (half-split) layout without scaling.
    return (getattr(rotary, "style", None) == "chunked" and float(getattr(rotary, "attention_scaling", 1.0)) == 1.0
            and hasattr(rotary, "inv_freq") and int(rotary.inv_freq.shape[0]) * 2 == int(rotary.dim))


def worth_it() -> bool:
    """On a GPU `mx.fast.rope` is one kernel. On the CPU MLX runs it as its composed fallback, which has more
    operations than mlx-vlm's path (cos and sin per layer instead of once a step): keep mlx-vlm's there."""
    return mx.default_device().type == mx.DeviceType.gpu


def install(model: Any, *, always: bool = False) -> bool:
    """Wrap each layer's rotary module of a Qwen2-VL language model where it pays (`worth_it`, or `always`);
    False (nothing changed) for any other model or device."""
    if not (always or worth_it()):
        return False
    layers = getattr(getattr(model, "language_model", None), "layers", None) or []
    attns = [getattr(layer, "self_attn", None) for layer in layers]
    rotaries = [getattr(a, "rotary_emb", None) for a in attns]
    if not rotaries or any(isinstance(r, TextRope) for r in rotaries):
        return bool(rotaries)
    if not all(r is not None and _style_fits(r) for r in rotaries):
        return False
    for attn, rotary in zip(attns, rotaries):
        attn.rotary_emb = TextRope(rotary)
    return True


def text_calls(lm: Any) -> int:
    """How many query/key rotations of `lm` took the fused path so far (a test or a benchmark checks it did)."""
    return sum(getattr(layer.self_attn.rotary_emb, "text_calls", 0) for layer in lm.layers)


@contextmanager
def text_positions(lm: Any) -> Iterator[None]:
    """Within this block, every forward pass of `lm` runs on text positions (tokens after the prompt), the same
    positions in every row of the batch."""
    wrappers = [layer.self_attn.rotary_emb for layer in lm.layers
                if isinstance(getattr(layer.self_attn, "rotary_emb", None), TextRope)]
    for w in wrappers:
        object.__setattr__(w, "_text", True)
    try:
        yield
    finally:
        for w in wrappers:
            object.__setattr__(w, "_text", False)
