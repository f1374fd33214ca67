"""One-token decode passes replayed from one compiled graph: measured by `decode_step` (`replayed_step_ms`), not
used by the daemon.

A written token's forward pass builds the same ~400-operation graph every step, in Python (mlx-vlm's modules,
the KV cache's slice updates), and on a GPU the step is dispatch-bound: building and launching that graph takes
longer than the device takes to run it (bench/RESULTS.md, `decode_step`). `mx.compile` records a function once
and replays it, fusing its elementwise operations, but only while the inputs keep their shapes, and a growing KV
cache changes them every step (compiling that retraces every step).

So here the cache has a fixed length for the whole generation (mlx-vlm's `prefix_cache_reserve`), the written
position is an input array rather than a shape, and attention reads the whole buffer under a mask of the
positions written so far. The pass is then one shape from the first written token to the last: traced once a
generation, replayed every step. Multi-token passes (the prompt, runs of schema-forced tokens) stay mlx-vlm's
own and write into the same buffers.

Why the daemon does not use it (RESULTS.md, `decode_step`, 2026-12-04): on the H200 the replayed step took as
long as the eager one (MLX's CUDA vector attention takes no mask, so the masked attention falls back to several
kernels; without the mask, timed once, the replay was no faster either). On the CPU it is ~40 % faster at smoke
size, where the step is Python, and changes nothing at real shapes, where the step is its matmuls; and there MLX
compiles its fused kernels with the system C++ compiler on first use (seconds, in every new process). A Mac
(Metal, whose vector attention takes a mask) is where it may pay: `python -m bench decode_step` there says.

Each layer's own modules do the projections, norms and MLP (plain, stacked, quantized or with a LoRA adapter
alike), captured as they are when the first step is traced: change no weight and swap no adapter while a
`StaticStep` is in use. MLX is not thread-safe: use this from one thread.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx


class StaticStep:
    """`step(token)`: append one token to `kv` and return the final hidden state (before the vocabulary head), as
    `lm.model(token, cache=kv, position_ids=...)` on text positions would. `kv` keeps a fixed length of at least
    `capacity` tokens from here on; `rope_delta` is the prompt's mRoPE offset (text position = cache offset + it)."""

    def __init__(self, lm: Any, kv: list[Any], rope_delta: int, capacity: int) -> None:
        for c in kv:
            c.prefix_cache_reserve(capacity)
        self.kv = kv
        self.length = int(kv[0].keys.shape[2])
        self.rope_delta = int(rope_delta)
        model, layers, length = lm.model, list(lm.layers), self.length

        def step(token: mx.array, at: mx.array, keys: list[mx.array], values: list[mx.array]) -> tuple:
            h = model.embed_tokens(token)
            written = mx.arange(length) <= at  # the positions attention may read: those written, this one too
            positions = mx.broadcast_to((at + self.rope_delta).reshape(1, 1, 1), (3, 1, 1))
            rotary = layers[0].self_attn.rotary_emb
            shared = None if rotary.fused_apply else rotary(h, positions)  # as Qwen2Model: cos/sin once a pass
            out_k, out_v = [], []
            for layer, k_cache, v_cache in zip(layers, keys, values):
                attn = layer.self_attn
                x = layer.input_layernorm(h)
                if attn.__dict__.get("_on"):  # stacked projections (daemon/model/fused_proj.py)
                    q, k, v = attn.__dict__["_qkv"](x)
                else:
                    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
                q = q.reshape(1, 1, attn.n_heads, attn.head_dim).transpose(0, 2, 1, 3)
                k = k.reshape(1, 1, attn.n_kv_heads, attn.head_dim).transpose(0, 2, 1, 3)
                v = v.reshape(1, 1, attn.n_kv_heads, attn.head_dim).transpose(0, 2, 1, 3)
                if shared is None:
                    q, k = attn.rotary_emb.apply_rotary(q, k, positions, unsqueeze_dim=1)
                else:
                    q, k = _mrope(q, k, *shared)
                k_cache = mx.slice_update(k_cache, k.astype(k_cache.dtype), at.reshape(1), axes=(2,))
                v_cache = mx.slice_update(v_cache, v.astype(v_cache.dtype), at.reshape(1), axes=(2,))
                o = mx.fast.scaled_dot_product_attention(q, k_cache, v_cache, scale=attn.scale, mask=written)
                h = h + attn.o_proj(o.transpose(0, 2, 1, 3).reshape(1, 1, -1))
                h = h + layer.mlp(layer.post_attention_layernorm(h))
                out_k.append(k_cache)
                out_v.append(v_cache)
            return model.norm(h), out_k, out_v

        self._step = mx.compile(step)

    def step(self, token: mx.array) -> mx.array:
        kv = self.kv
        if int(kv[0].keys.shape[2]) != self.length:
            raise RuntimeError("the KV cache was resized under a StaticStep")
        at = mx.array(int(kv[0].offset), dtype=mx.int32)
        keys, values = [c.keys for c in kv], [c.values for c in kv]
        for c in kv:  # the graph's references only: MLX may then write each buffer in place instead of copying it
            c.keys = c.values = None
        hidden, keys, values = self._step(token.reshape(1, 1).astype(mx.int32), at, keys, values)
        for c, k, v in zip(kv, keys, values):
            c.keys, c.values = k, v
            c.offset += 1
        return hidden


def _mrope(q: mx.array, k: mx.array, cos: mx.array, sin: mx.array) -> tuple[mx.array, mx.array]:
    from mlx_vlm.models.qwen2_vl.language import apply_multimodal_rotary_pos_emb

    return apply_multimodal_rotary_pos_emb(q, k, cos, sin, unqueeze_dim=1)

