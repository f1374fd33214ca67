"""A critique's decode passes (one token, or a schema-forced run), written against the weights instead of through
mlx-vlm's modules.

On MLX's CUDA backend a batch-1 decode step is host work, not arithmetic: through mlx-vlm's modules a float32 pass
is 1,172 graph operations of which only 457 run a kernel (the rest are views: a transpose of every weight, flattens
and unflattens around three-dimensional matmuls, per-layer reshapes and slices), and building it in Python takes
~2.6 ms on the H200 (bench/RESULTS.md, `bound`). `FlatStep` computes the same pass on two-dimensional activations,
with each weight's transpose made once a generation, the RoPE offset made once a pass and no module call per
layer: fewer nodes to record and less Python (15-22 % of a step on the H200, `python -m bench decode_step`).
It computes exactly what the modules compute (tests/test_flat_step.py: bit for bit, step after step).

Where: the decode loop (reuse.py) uses it for every pass after the prompt, one-token passes and schema-forced runs
(which through the modules cost 3-4 one-token steps each on the H200: `decode_step`'s `forced_pass_ms`), when
`FlatStep.build` finds Qwen2-VL's text decoder with the text RoPE installed (text_rope.py: on a GPU) and no adapter
in (a LoRA layer is not a plain or quantized Linear); anything else runs mlx-vlm's modules as before. A batch of
photos (batch.py) uses it for one-token passes while its rows share one text position (one shoot: one grid). The
prompt always runs the modules (image positions). MLX is not thread-safe: use it from the runtime's thread only.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_vlm.models.activations import swiglu

from .text_rope import TextRope

_PLAIN = (nn.Linear, nn.QuantizedLinear)


def _projection(module: Any, arrays: dict[str, mx.array] | None = None) -> tuple:
    """How `module` (a Linear or QuantizedLinear; `arrays`: its stacked weights instead) maps x, as its __call__."""
    a = arrays if arrays is not None else module
    if isinstance(module, nn.QuantizedLinear):
        return ("q", a["weight"], a["scales"], a.get("biases"), a.get("bias"), module.group_size, module.bits,
                module.mode)
    return ("d", a["weight"].T, a.get("bias"))  # the transpose: a view, evaluated once in __init__


def _apply(p: tuple, x: mx.array) -> mx.array:
    if p[0] == "q":
        _, w, scales, biases, bias, group_size, bits, mode = p
        y = mx.quantized_matmul(x, w, scales=scales, biases=biases, transpose=True, group_size=group_size,
                                bits=bits, mode=mode)
        return y if bias is None else y + bias
    _, weight_t, bias = p
    return x @ weight_t if bias is None else mx.addmm(bias, x, weight_t)


def fits(lm: Any) -> bool:
    """True where `lm` is Qwen2-VL's text decoder with the text RoPE installed and plain projections (no adapter)."""
    layers = getattr(getattr(lm, "model", None), "layers", None) or []
    return bool(layers) and all(
        isinstance(getattr(layer.self_attn, "rotary_emb", None), TextRope)
        and all(type(getattr(layer.self_attn, n, None)) in _PLAIN for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        and all(type(getattr(layer.mlp, n, None)) in _PLAIN for n in ("gate_proj", "up_proj", "down_proj"))
        for layer in layers)


def calls(lm: Any) -> int:
    """One-token passes `lm` has run through a FlatStep (a test or a benchmark checks the path ran)."""
    return int(lm.__dict__.get("_flat_calls", 0))


class FlatStep:
    """`step(tokens, start, kv)`: the hidden states, [rows, n, hidden], as `lm.model` computes them for a pass of
    `tokens` ([rows] or [rows, n]: one token a row, or a run of n) from text position `start` (an integer array of
    shape [], the cache offset plus the prompt's mRoPE delta: one for every row, as in text_rope.py) into the
    per-layer caches `kv`. Make it inside `fused_proj.fused_decoding(lm)`, where the stacked
    projections are ready (without them each projection runs on its own), and drop it when the block ends: it
    holds the weights of that moment."""

    @classmethod
    def build(cls, lm: Any) -> "FlatStep | None":
        return cls(lm) if fits(lm) else None

    def __init__(self, lm: Any) -> None:
        if not fits(lm):
            raise ValueError("FlatStep covers Qwen2-VL's text decoder with the text RoPE and plain projections")
        self.lm = lm
        self.embed = lm.model.embed_tokens
        self.norm = (lm.model.norm["weight"], lm.model.norm.eps)
        self.layers = []
        for layer in lm.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv, gate_up = attn.__dict__.get("_qkv"), mlp.__dict__.get("_gate_up")
            # Stacked only where fused_decoding switched them on: the same matmuls the modules would run.
            qkv = qkv if qkv is not None and attn.__dict__.get("_on") else None
            gate_up = gate_up if gate_up is not None and mlp.__dict__.get("_on") else None
            attention = ({"qkv": (_projection(qkv.modules[0], qkv.arrays), qkv.splits)} if qkv is not None else
                         {n: _projection(getattr(attn, f"{n}_proj")) for n in ("q", "k", "v")})
            mlp_in = ({"gate_up": (_projection(gate_up.modules[0], gate_up.arrays), gate_up.splits)}
                      if gate_up is not None else {n: _projection(getattr(mlp, f"{n}_proj")) for n in ("gate", "up")})
            self.layers.append(dict(
                attention, **mlp_in, o=_projection(attn.o_proj), down=_projection(mlp.down_proj),
                ln1=(layer.input_layernorm["weight"], layer.input_layernorm.eps),
                ln2=(layer.post_attention_layernorm["weight"], layer.post_attention_layernorm.eps),
                heads=attn.n_heads, kv_heads=attn.n_kv_heads, head_dim=attn.head_dim, scale=attn.scale,
                rope=(attn.rotary_emb._dims, attn.rotary_emb._wavelengths)))
        # Every transposed weight view in one evaluation, so no pass records a Transpose again.
        projections = [v[0] if k in ("qkv", "gate_up") else v for L in self.layers for k, v in L.items()
                       if k in ("qkv", "gate_up", "q", "k", "v", "o", "gate", "up", "down")]
        mx.eval([p[1] for p in projections if p[0] == "d"])

    def step(self, tokens: mx.array, start: mx.array, kv: list) -> mx.array:
        rows, n = (int(tokens.shape[0]), int(tokens.shape[1])) if tokens.ndim == 2 else (int(tokens.size), 1)
        object.__setattr__(self.lm, "_flat_calls", calls(self.lm) + 1)
        x = self.embed(tokens.reshape(rows * n))  # [rows·n, hidden]
        # Several tokens a row (a schema-forced run): causal over them, as mlx-vlm's KV cache asks for
        # (`make_mask`: "causal" for n > 1 with no window), the heads moved ahead of the tokens as the modules do.
        mask = None if n == 1 else "causal"
        for L, cache in zip(self.layers, kv):
            h = mx.fast.rms_norm(x, *L["ln1"])
            d, heads, kv_heads = L["head_dim"], L["heads"], L["kv_heads"]
            dims, wavelengths = L["rope"]
            rope = dict(traditional=False, base=None, scale=1.0, offset=start, freqs=wavelengths)
            if "qkv" in L:
                q, k, v = mx.split(_apply(L["qkv"][0], h), L["qkv"][1], axis=-1)
            else:
                q, k, v = _apply(L["q"], h), _apply(L["k"], h), _apply(L["v"], h)
            if n == 1:  # [rows, heads·d] is already [rows, heads, 1, d] in memory, so no transpose
                q, k, v = q.reshape(rows, heads, 1, d), k.reshape(rows, kv_heads, 1, d), v.reshape(rows, kv_heads, 1, d)
            else:
                q, k, v = (a.reshape(rows, n, h_, d).transpose(0, 2, 1, 3)
                           for a, h_ in ((q, heads), (k, kv_heads), (v, kv_heads)))
            q = mx.fast.rope(q, dims, **rope)
            k = mx.fast.rope(k, dims, **rope)
            keys, values = cache.update_and_fetch(k, v)
            out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=L["scale"], mask=mask)
            out = out.reshape(rows, heads * d) if n == 1 else out.transpose(0, 2, 1, 3).reshape(rows * n, heads * d)
            x = x + _apply(L["o"], out)
            h = mx.fast.rms_norm(x, *L["ln2"])
            if "gate_up" in L:
                gate, up = mx.split(_apply(L["gate_up"][0], h), L["gate_up"][1], axis=-1)
            else:
                gate, up = _apply(L["gate"], h), _apply(L["up"], h)
            x = x + _apply(L["down"], swiglu(gate, up))
        return mx.fast.rms_norm(x, *self.norm).reshape(rows, n, -1)
