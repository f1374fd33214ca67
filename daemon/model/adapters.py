"""Many advisors on one base model: LoRA layers installed once, adapter weights swapped per photo.

An adapter folder is what mlx-vlm writes and reads (`mlx_vlm.load(path, adapter_path=folder)`):
`adapter_config.json` (fine_tune_type, lora_parameters: rank, scale, dropout, keys) and
`adapters.safetensors` (`<module key>.lora_a` / `.lora_b`). Swapping is `model.load_weights(list,
strict=False)` on the LoRA modules, which takes a few milliseconds. Because `strict=False` accepts a
wrong rank silently and the scale lives in the module rather than the file, every adapter is checked
against the model (same target modules, same rank, matching shapes) before it is swapped in, and an
adapter whose rank, target modules or scale differ from the installed layers gets freshly installed
layers instead of being mixed into the old ones.

"No adapter" is an explicit state: the LoRA layers are taken out of the model (each target projection is its
plain base Linear again), so a baseline or rag photo runs the base model bit for bit and pays no LoRA matmuls
once an adapter has been installed. The layers are kept aside and put back, with the next adapter's weights, when
one is activated; taking them out and putting them back is a module swap, not a weight write.

Weights of recently used adapters are kept in memory (least recently used evicted first). Like the
rest of the runtime, this is not thread-safe: call it from the thread that owns the model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .adapter_store import CONFIG_NAME, WEIGHTS_NAME, AdapterUnusable

log = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 8


class AdapterError(AdapterUnusable):  # a ValueError; AdapterUnusable lets code without MLX recognise it
    """The adapter cannot be used with this model; the message says why in plain words."""


@dataclass(frozen=True)
class AdapterSpec:
    """The shape of a LoRA adapter: what must match for weights to be swapped into installed layers."""

    fine_tune_type: str
    rank: int
    scale: float
    keys: tuple[str, ...]
    dropout: float = 0.0

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "adapter") -> "AdapterSpec":
        kind = str(config.get("fine_tune_type", "lora"))
        if kind != "lora":
            raise AdapterError(f"{source} is a {kind!r} adapter; only LoRA adapters can be swapped per photo")
        params = config.get("lora_parameters")
        if not isinstance(params, dict):
            raise AdapterError(f"{source} has no lora_parameters in {CONFIG_NAME}")
        keys = params.get("keys")
        if not keys:
            raise AdapterError(f"{source} does not list its target modules (lora_parameters.keys)")
        try:
            spec = cls(fine_tune_type=kind, rank=int(params["rank"]), scale=float(params["scale"]),
                       keys=tuple(sorted(str(k) for k in keys)), dropout=float(params.get("dropout", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise AdapterError(f"{source} has an unreadable lora_parameters ({exc})") from exc
        if not math.isfinite(spec.scale):
            raise AdapterError(f"{source} has a scale that is not a finite number ({spec.scale!r})")
        return spec

    @property
    def signature(self) -> tuple[Any, ...]:
        """What decides the installed layers (dropout only matters while training)."""
        return (self.fine_tune_type, self.rank, self.keys)

    def to_config(self) -> dict[str, Any]:
        return {"fine_tune_type": self.fine_tune_type, "num_layers": -1,
                "lora_parameters": {"rank": self.rank, "scale": self.scale, "dropout": self.dropout,
                                    "keys": list(self.keys)}}

    def describe(self) -> str:
        return f"rank {self.rank}, scale {self.scale:g}, {len(self.keys)} target modules"


@dataclass
class CachedAdapter:
    key: str
    path: Path
    spec: AdapterSpec
    weights: list[tuple[str, mx.array]]
    nbytes: int
    loaded_at: float


def read_adapter_config(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise AdapterError(f"{folder} has no {CONFIG_NAME}") from exc
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{folder / CONFIG_NAME} is unreadable ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{folder / CONFIG_NAME} is not a JSON object")
    return config


def _is_lora(module: Any) -> bool:
    return hasattr(module, "lora_a") and hasattr(module, "lora_b") and hasattr(module, "linear")


def _base_dims(module: Any) -> tuple[int, int]:
    """(input_dims, output_dims) of a Linear, QuantizedLinear or the Linear inside a LoRA layer."""
    base = module.linear if _is_lora(module) else module
    if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
        raise AdapterError(f"{type(base).__name__} cannot carry a LoRA adapter")
    out_dims, in_dims = base.weight.shape
    if isinstance(base, nn.QuantizedLinear):
        in_dims = in_dims * 32 // base.bits
    return int(in_dims), int(out_dims)


class AdapterManager:
    """Owns the LoRA layers of one loaded model and which adapter's weights are in them."""

    def __init__(self, model: nn.Module, *, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.model = model
        self.cache_size = max(1, int(cache_size))
        self._cache: OrderedDict[str, CachedAdapter] = OrderedDict()
        self.active: str | None = None  # cache key of the adapter whose weights are in the layers
        self.installed: AdapterSpec | None = None
        self._layers: list[tuple[str, Any]] = []  # the installed LoRA layers, in the model only while active
        self._in_model = False
        self._weights: str | None = None  # whose weights the layers hold (in the model or aside)
        self.swaps = 0
        self.reinstalls = 0
        present = [name for name, m in model.named_modules() if _is_lora(m)]
        if present:  # e.g. a model prepared for training: adopt its layers if their shape is known
            config = getattr(model, "_vlm_adapter_config", None)
            try:
                self.installed = AdapterSpec.from_config(config or {}, "the model's own LoRA layers")
                self.active = "<model's own weights>"
                self._layers = [(name, m) for name, m in model.named_modules() if _is_lora(m)]
                self._in_model = True
            except AdapterError:
                self._uninstall(present)

    # -- public ----------------------------------------------------------------------------------
    def activate(self, adapter: str | Path | None) -> str | None:
        """Put `adapter`'s weights in the LoRA layers (None: the base model, unchanged). Returns its key."""
        if adapter is None:
            self._bypass()
            return None
        entry = self.load(adapter)
        if self.active == entry.key and self.installed == entry.spec and self._in_model:
            return entry.key
        if self.installed is None or self.installed.signature != entry.spec.signature:
            self._install(entry.spec)
        elif self.installed.scale != entry.spec.scale:
            self._weights = None
            # Same layers, another scale: the scale lives in each module, not in the weights file.
            for _, module in self._layers:
                module.scale = entry.spec.scale
            self.installed = entry.spec
        self._restore()
        if self._weights != entry.key:  # the same advisor photo after photo: the layers hold its weights already
            self.model.load_weights(entry.weights, strict=False)
            self._weights = entry.key
        self.active = entry.key
        self.swaps += 1
        return entry.key

    def deactivate(self) -> None:
        """Back to the base model: the LoRA layers leave the model (no-op when they are not in it)."""
        self._bypass()

    def load(self, adapter: str | Path) -> CachedAdapter:
        """The adapter's weights from the cache, or read and checked against the model."""
        path = Path(adapter).resolve()
        weights_file = path / WEIGHTS_NAME
        try:
            st = weights_file.stat()
        except FileNotFoundError as exc:
            raise AdapterError(f"{path} has no {WEIGHTS_NAME}") from exc
        key = f"{path}@{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        spec = AdapterSpec.from_config(read_adapter_config(path), str(path))
        try:
            weights = mx.load(str(weights_file))
        except Exception as exc:  # truncated or foreign files
            raise AdapterError(f"{weights_file} is unreadable ({exc})") from exc
        self._check(spec, weights, path)
        mx.eval(list(weights.values()))
        entry = CachedAdapter(key=key, path=path, spec=spec, weights=sorted(weights.items()),
                              nbytes=sum(int(v.nbytes) for v in weights.values()), loaded_at=time.time())
        self._cache[key] = entry
        while len(self._cache) > self.cache_size:
            evicted, _ = self._cache.popitem(last=False)
            log.debug("adapter cache: evicted %s", evicted)
        return entry

    def cached_bytes(self) -> int:
        return sum(e.nbytes for e in self._cache.values())

    def cached(self) -> list[str]:
        return list(self._cache)

    def clear_cache(self) -> None:
        self._cache.clear()

    # -- checks ----------------------------------------------------------------------------------
    def _check(self, spec: AdapterSpec, weights: dict[str, mx.array], path: Path) -> None:
        modules = dict(self.model.named_modules())
        expected: dict[str, tuple[int, ...]] = {}
        for key in spec.keys:
            module = modules.get(key)
            if module is None:
                raise AdapterError(f"{path} targets {key}, which this model does not have (trained for "
                                   f"another base model?)")
            in_dims, out_dims = _base_dims(module)
            expected[f"{key}.lora_a"] = (in_dims, spec.rank)
            expected[f"{key}.lora_b"] = (spec.rank, out_dims)
        missing = sorted(set(expected) - set(weights))
        extra = sorted(set(weights) - set(expected))
        if missing or extra:
            what = (f"{len(missing)} missing (e.g. {missing[0]})" if missing else "") + \
                   (" and " if missing and extra else "") + \
                   (f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else "")
            raise AdapterError(f"{path}/{WEIGHTS_NAME} does not match its {CONFIG_NAME}: {what} weights")
        for name, shape in expected.items():
            if tuple(weights[name].shape) != shape:
                raise AdapterError(f"{path}: {name} has shape {tuple(weights[name].shape)}, but this model "
                                   f"with {spec.describe()} needs {shape} (trained for another base model?)")

    # -- layers ----------------------------------------------------------------------------------
    def _lora_modules(self) -> list[tuple[str, Any]]:
        return [(name, m) for name, m in self.model.named_modules() if _is_lora(m)]

    def _uninstall(self, names: list[str] | None = None) -> None:
        modules = dict(self.model.named_modules())
        names = names if names is not None else [n for n, m in modules.items() if _is_lora(m)]
        if names:
            self.model.update_modules(tree_unflatten([(n, modules[n].linear) for n in names]))
        self.installed = None
        self.active = None
        self._layers, self._in_model, self._weights = [], False, None

    def _install(self, spec: AdapterSpec) -> None:
        from mlx_vlm.trainer.peft.utils import _apply_lora_layers

        if self._layers or self._lora_modules():
            self._bypass()
            self._uninstall()
            self.reinstalls += 1
            log.info("adapter shape changed: reinstalling LoRA layers (%s)", spec.describe())
        self.model.freeze()
        _apply_lora_layers(self.model, spec.to_config())
        self.model.eval()
        self.installed = spec
        self._layers = self._lora_modules()
        self._in_model = True
        self.active = "<fresh layers>"
        self._bypass()

    def _bypass(self) -> None:
        """The no-adapter state: each LoRA layer is replaced by its own base Linear, so the model is the base
        model exactly and runs no LoRA matmul. The layers (and the weights in them) are kept for `_restore`."""
        if self._in_model and self._layers:
            self.model.update_modules(tree_unflatten([(n, m.linear) for n, m in self._layers]))
        self._in_model = False
        self.active = None

    def _restore(self) -> None:
        if not self._in_model and self._layers:
            self.model.update_modules(tree_unflatten(list(self._layers)))
        self._in_model = True

    def state(self) -> dict[str, Any]:
        return {"active": self.active, "installed": self.installed.describe() if self.installed else None,
                "in_model": self._in_model,
                "cached": len(self._cache), "cached_mb": round(self.cached_bytes() / 2**20, 2),
                "swaps": self.swaps, "reinstalls": self.reinstalls}


def adapter_weight_names(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the LoRA weights currently installed in `model` (for tests and benchmarks)."""
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())
            if k.endswith((".lora_a", ".lora_b"))}


def save_adapter(folder: Path, config: dict[str, Any], weights: dict[str, mx.array]) -> Path:
    """Write an adapter folder mlx-vlm can load (`adapter_config.json` + `adapters.safetensors`), fsynced.

    `config` is mlx-vlm's adapter config (e.g. `AdapterSpec.to_config()` or the `_vlm_adapter_config`
    that `prepare_model_for_training` records, which also carries the base quantization).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    AdapterSpec.from_config(config, str(folder))  # refuse to write what could not be read back
    mx.eval(list(weights.values()))
    mx.save_safetensors(str(folder / WEIGHTS_NAME), dict(weights), metadata={"format": "mlx"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        fd = os.open(folder / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return folder
