"""A one-token decode step as two compiled graphs a layer, replayed instead of rebuilt.

On a GPU a decode step is dispatch-bound: one token through 28 layers is ~560 small kernels, and building the
step's graph op by op in Python (~20 operations a layer, each a call into MLX) costs about as much as the GPU's
work. `mx.compile` traces a function once and replays its graph, fusing chains of elementwise operations (the
SwiGLU gate, the residual adds) into single kernels on the way.

A layer is split around its KV cache update, the one step whose shapes and state change every token:
- `_into_cache`: input norm, the q/k/v projections and the text RoPE (the token's position is an input, so one
  trace serves every step);
- the cache's own `update_and_fetch` (mlx-vlm's KVCache, unchanged: prefill, rag's reuse and trimming see the
  same cache);
- `_out_of_cache`: attention over the whole cache, the output projection, the MLP and both residuals. It is
  compiled `shapeless`: the cache grows by one each step and the same graph runs at every length.

The result is mlx-vlm's layer computation, operation for operation (`tests/test_model_runtime.py` checks
identical hidden states and text). It applies only where that holds: one token a row, text positions (the
fused text RoPE of text_rope.py is installed and active), and plain projections. While a LoRA adapter is
active its layers replace the projections, so a lora photo takes mlx-vlm's path: a trace would bake the
adapter's scale in as a constant.

MLX is not thread-safe: use this from the runtime's thread only.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import text_rope

PLAIN = (nn.Linear, nn.QuantizedLinear)
_ATTR = "_mondrian_step_graph"


def _into_cache(layer: Any, x: mx.array, offset: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    attn, rope = layer.self_attn, layer.self_attn.rotary_emb
    batch, length, _ = x.shape
    x = layer.input_layernorm(x)
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    q = q.reshape(batch, length, attn.n_heads, -1).transpose(0, 2, 1, 3)
    k = k.reshape(batch, length, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    v = v.reshape(batch, length, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    return rope.text_rotate(q, offset), rope.text_rotate(k, offset), v


def _out_of_cache(layer: Any, h: mx.array, q: mx.array, keys: mx.array, values: mx.array) -> mx.array:
    attn = layer.self_attn
    o = mx.fast.scaled_dot_product_attention(q, keys, values, scale=attn.scale)
    # flatten, not reshape: a shapeless trace would keep reshape's sizes, and rows leave a batch as they finish
    h = h + attn.o_proj(o.transpose(0, 2, 1, 3).flatten(-2, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


class StepGraph:
    """The compiled halves of every layer of one Qwen2-VL language model."""

    def __init__(self, lm: Any) -> None:
        # `inputs=layer`: the layer's arrays are read at every call, not frozen into the trace at the first one
        # (an adapter swap or a precision change replaces them).
        self._halves = [(mx.compile(partial(_into_cache, layer), inputs=layer),
                         mx.compile(partial(_out_of_cache, layer), inputs=layer, shapeless=True))
                        for layer in lm.model.layers]
        self.calls = 0  # one-token passes that took the compiled graphs (what a test or a benchmark checks)

    @staticmethod
    def plain(lm: Any) -> bool:
        """No adapter in the layers: every projection is the base model's own."""
        for layer in lm.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                      mlp.down_proj):
                if type(m) not in PLAIN:
                    return False
        return True

    def __call__(self, lm: Any, tokens: mx.array, cache: list[Any], offset: mx.array) -> mx.array:
        self.calls += 1
        h = lm.model.embed_tokens(tokens)
        for (into, out), c in zip(self._halves, cache):
            q, k, v = into(h, offset)
            keys, values = c.update_and_fetch(k, v)
            h = out(h, q, keys, values)
        return lm.model.norm(h)


def _fits(lm: Any) -> bool:
    layers = getattr(getattr(lm, "model", None), "layers", None) or []
    return bool(layers) and all(
        isinstance(layer.self_attn.rotary_emb, text_rope.TextRope) and hasattr(layer, "mlp")
        and all(hasattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")) for layer in layers)


def install(model: Any, *, always: bool = False) -> bool:
    """Compile the decode step of a Qwen2-VL model whose text RoPE is installed (text_rope.install), where it
    pays (a GPU: `text_rope.worth_it`) or `always`; False (nothing changed) otherwise."""
    lm = getattr(model, "language_model", None)
    if lm is None or not (always or text_rope.worth_it()) or not _fits(lm):
        return False
    if getattr(lm, _ATTR, None) is None:
        object.__setattr__(lm, _ATTR, StepGraph(lm))  # not a module child: nothing to save or adapt
    return True


def installed(lm: Any) -> "StepGraph | None":
    return getattr(lm, _ATTR, None)


def one_token(lm: Any, tokens: mx.array, cache: list[Any], position_ids: mx.array) -> "mx.array | None":
    """The hidden states of a pass of one token a row on text positions through the compiled graphs, or None
    where they do not apply (not installed, more than one token, an adapter active, not on text positions):
    then the caller runs `lm.model` as usual. Every row must share the position (as text_rope requires)."""
    graph = installed(lm)
    if graph is None or tokens.ndim != 2 or tokens.shape[1] != 1 or not text_rope.active(lm) \
            or not StepGraph.plain(lm):
        return None
    return graph(lm, tokens, cache, position_ids[0, 0, 0])
