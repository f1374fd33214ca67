"""One matmul for a layer's queries, keys and values, one for its MLP's gate and up, in the tokens a critique writes.

A decode step of one token is launch-bound (issue 11: on MLX's CUDA backend the GPU waits for the host, which
records hundreds of kernels a step), and on the CPU each operation has a fixed cost far above its arithmetic. Qwen2-VL's
layers run five projections on one input twice over: q, k, v on the normed hidden state, gate and up on the
normed residual. Stacking their weights row-wise makes each group one matmul (three kernels a layer fewer).

Only on a GPU (`worth_it`). What a wider matmul does to the numbers, checked on the CPU: at 4 bits (MLX's own
quantized matmul) the same bits; in float32 (OpenBLAS) the last bits may differ, as between any two BLAS shapes.

The stacked weight costs no memory: each projection's own weight becomes a row slice of it, which MLX keeps as a
view of the same buffer. The fast path runs only inside `fused_decoding` (the runtime's decode loop), and only
where, on entering it, every projection is still the plain module holding that slice: once LoRA layers are swapped
in (an advisor's adapter), or the weights are replaced (quantized, loaded), the layer runs mlx-vlm's own code, and
a replaced weight is stacked again on the next entry. Prefill, training and plain `mlx_vlm.generate` on the same
model always run mlx-vlm's code.

MLX is not thread-safe: use these from the runtime's thread only.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_vlm.models.activations import swiglu
from mlx_vlm.models.base import kv_sequence_length, scaled_dot_product_attention
from mlx_vlm.models.mlp import SwiGLUMLP
from mlx_vlm.models.qwen2_vl.language import Attention, apply_multimodal_rotary_pos_emb

log = logging.getLogger(__name__)

_ARRAYS = ("weight", "scales", "biases", "bias")  # what a Linear / QuantizedLinear holds, in matmul order
_warned: set[str] = set()  # one warning a process, not one per layer


class Stacked:
    """Projections that share an input, run as one matmul over their stacked weights (see the module's doc)."""

    def __init__(self, names: Sequence[str]) -> None:
        # No reference to the owning module: it holds this object, and a cycle would keep a dropped model's
        # weights in memory until the garbage collector happened to run.
        self.names = tuple(names)
        self.modules: tuple[Any, ...] = ()
        self.views: tuple[tuple[Any, str, mx.array], ...] = ()
        self.arrays: dict[str, mx.array] = {}
        self.splits: list[int] = []
        self.stacks = 0  # how many times the weights were stacked (a test checks re-stacking)
        self.calls = 0  # fused passes taken (what a test or a benchmark checks)
        self.failed: str | None = None  # why stacking failed once: these projections stay mlx-vlm's from then on

    def _stackable(self, modules: tuple[Any, ...]) -> bool:
        kinds = {type(m) for m in modules}
        if len(kinds) != 1 or kinds.pop() not in (nn.Linear, nn.QuantizedLinear):
            return False  # LoRA layers (an adapter is active) or a module this does not know
        if isinstance(modules[0], nn.QuantizedLinear):
            settings = {(m.group_size, m.bits, m.mode) for m in modules}
            if len(settings) != 1:
                return False
        keys = [k for k in _ARRAYS if k in modules[0]]
        # Same arrays, dtypes and input width: concatenating a bfloat16 weight onto a float32 one would promote it
        # and change its numbers.
        return all([k for k in _ARRAYS if k in m] == keys and all(
            m[k].dtype == modules[0][k].dtype and m[k].shape[1:] == modules[0][k].shape[1:] for k in keys)
            for m in modules)

    def ready(self, owner: nn.Module) -> bool:
        """True when the projections are the stacked ones (stacking them again first if their weights were
        replaced); False when they cannot be stacked now (an adapter's LoRA layers are in)."""
        modules = tuple(owner[name] for name in self.names)
        # Identity, not ==: modules are dicts of arrays, and == on arrays compares elements.
        if len(modules) == len(self.modules) and all(a is b for a, b in zip(modules, self.modules)) and all(
                m.get(k) is view for m, k, view in self.views):
            return True
        if self.failed is not None or not self._stackable(modules):
            return False
        try:
            self._stack(modules)
        except Exception as exc:  # e.g. no memory for the stacked copy: mlx-vlm's layers still work
            self.failed = f"{type(exc).__name__}: {exc}"
            (log.debug if _warned else log.warning)(
                "decoding without stacked projections where stacking failed (%s); photos are analysed as before, "
                "only slower on a GPU", self.failed)
            _warned.add(self.failed)
            return False
        return True

    def _stack(self, modules: tuple[Any, ...]) -> None:
        keys = [k for k in _ARRAYS if k in modules[0]]
        rows = [int(m["weight"].shape[0]) for m in modules]
        stacked = {k: mx.concatenate([m[k] for m in modules], axis=0) for k in keys}
        mx.eval(stacked)
        edges = [0]
        for r in rows:
            edges.append(edges[-1] + r)
        for m, lo, hi in zip(modules, edges, edges[1:]):
            for k in keys:
                m[k] = stacked[k][lo:hi]  # a view: the old weight's memory goes, the stacked one serves both
        mx.eval([m[k] for m in modules for k in keys])
        self.arrays = stacked
        self.modules = modules
        self.views = tuple((m, k, m[k]) for m in modules for k in keys)
        self.splits = [int(e) for e in edges[1:-1]]
        self.stacks += 1

    def __call__(self, x: mx.array) -> list[mx.array]:
        self.calls += 1
        a, first = self.arrays, self.modules[0]
        if isinstance(first, nn.QuantizedLinear):
            y = mx.quantized_matmul(x, a["weight"], scales=a["scales"], biases=a.get("biases"), transpose=True,
                                    group_size=first.group_size, bits=first.bits, mode=first.mode)
            if "bias" in a:
                y = y + a["bias"]
        elif "bias" in a:
            y = mx.addmm(a["bias"], x, a["weight"].T)  # as nn.Linear computes it
        else:
            y = x @ a["weight"].T
        return mx.split(y, self.splits, axis=-1)


def _fused_attention(cls: type) -> type:
    def __call__(self: Any, x: mx.array, mask: Any = None, cache: Any = None, position_ids: Any = None,
                 position_embeddings: Any = None) -> mx.array:
        if not self.__dict__["_on"]:
            return cls.__call__(self, x, mask=mask, cache=cache, position_ids=position_ids,
                                position_embeddings=position_embeddings)
        b, n, _ = x.shape
        queries, keys, values = self.__dict__["_qkv"](x)
        # From here on mlx-vlm's own Qwen2-VL attention, step for step (mlx_vlm/models/qwen2_vl/language.py).
        queries = queries.reshape(b, n, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        keys = keys.reshape(b, n, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        values = values.reshape(b, n, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        if position_ids is None:
            start = cache.offset if cache is not None else 0
            position_ids = mx.tile(mx.expand_dims(mx.arange(start, start + n), axis=0), (3, 1, 1))
        if position_embeddings is None:
            queries, keys = self.rotary_emb.apply_rotary(queries, keys, position_ids, unsqueeze_dim=1)
        else:
            cos, sin = position_embeddings
            queries, keys = apply_multimodal_rotary_pos_emb(queries, keys, cos, sin, unqueeze_dim=1)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        if isinstance(mask, mx.array):
            mask = mask[..., : kv_sequence_length(keys)]
        output = scaled_dot_product_attention(queries, keys, values, cache, scale=self.scale, mask=mask)
        return self.o_proj(output.transpose(0, 2, 1, 3).reshape(b, n, -1))

    return type(f"Fused{cls.__name__}", (cls,), {"__call__": __call__, "_fused_base": cls})


def _fused_mlp(cls: type) -> type:
    def __call__(self: Any, x: mx.array) -> mx.array:
        if not self.__dict__["_on"]:
            return cls.__call__(self, x)
        gate, up = self.__dict__["_gate_up"](x)
        return self.down_proj(swiglu(gate, up))

    return type(f"Fused{cls.__name__}", (cls,), {"__call__": __call__, "_fused_base": cls})


def _fits(layer: Any) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    return (attn is not None and mlp is not None and type(attn) in (Attention, _ATTN.get(Attention))
            and type(mlp) in (SwiGLUMLP, _MLP.get(SwiGLUMLP)))


_ATTN: dict[type, type] = {}
_MLP: dict[type, type] = {}


def worth_it() -> bool:
    """On a GPU a step is launch-bound and three kernels a layer fewer pay. On the CPU the gain is ~5 % (smoke
    size), and OpenBLAS rounds a matmul's last bits differently for a wider weight (measured: 1e-6 in float32), so
    the decode loop would no longer write exactly what mlx-vlm writes: keep mlx-vlm's layers there."""
    return mx.default_device().type == mx.DeviceType.gpu


def install(model: Any, *, always: bool = False) -> bool:
    """Give each Qwen2-VL decoder layer of `model` the stacked projections where they pay (`worth_it`, or
    `always`); False (nothing changed) otherwise or for any other model. The weights are stacked on the first
    decode pass, not here: a model quantized after loading is stacked in its final form."""
    if not (always or worth_it()):
        return False
    layers = getattr(getattr(model, "language_model", None), "layers", None) or []
    if not layers or not all(_fits(layer) for layer in layers):
        return False
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        if "_qkv" in attn.__dict__:
            continue
        base_attn = getattr(type(attn), "_fused_base", type(attn))
        base_mlp = getattr(type(mlp), "_fused_base", type(mlp))
        attn.__class__ = _ATTN.setdefault(base_attn, _fused_attention(base_attn))
        mlp.__class__ = _MLP.setdefault(base_mlp, _fused_mlp(base_mlp))
        # Plain attributes, not module children: nothing new in the parameter tree (saving, LoRA, fingerprints).
        object.__setattr__(attn, "_qkv", Stacked(("q_proj", "k_proj", "v_proj")))
        object.__setattr__(mlp, "_gate_up", Stacked(("gate_proj", "up_proj")))
        object.__setattr__(attn, "_on", False)
        object.__setattr__(mlp, "_on", False)
    return True


def stacks(lm: Any) -> list[Stacked]:
    """Every layer's stacked projections (empty where `install` was not run)."""
    found = []
    for layer in lm.layers:
        for module, key in ((layer.self_attn, "_qkv"), (layer.mlp, "_gate_up")):
            if key in module.__dict__:
                found.append(module.__dict__[key])
    return found


def fused_calls(lm: Any) -> int:
    """Fused projection passes of `lm` so far (a test or a benchmark checks the fast path ran)."""
    return sum(s.calls for s in stacks(lm))


@contextmanager
def fused_decoding(lm: Any) -> Iterator[None]:
    """Within this block the layers of `lm` project through their stacked weights where they can. Whether they
    can is decided on entering it (checking each call would cost a step ~0.3 ms on the H200): change no weight
    and swap no adapter inside it."""
    modules = [m for layer in lm.layers for m, key in ((layer.self_attn, "_qkv"), (layer.mlp, "_gate_up"))
               if key in m.__dict__ and m.__dict__[key].ready(m)]
    for m in modules:
        object.__setattr__(m, "_on", True)
    try:
        yield
    finally:
        for m in modules:
            object.__setattr__(m, "_on", False)
