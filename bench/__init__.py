"""Benchmarks: `python -m bench [NAME ...] [--size smoke|real]`, each printing key=value lines.

A benchmark is a module `bench/<name>.py` with `run(size: str) -> dict`; dropping the file in is the whole
registration. Print figures with `emit(key, value)` as they are measured (the runner prints whatever the
returned dict holds that was not emitted, and writes everything to JSON). Hold `real_shapes_lock()` around any
load of a real-shape model: only one ~9 GB model may be in memory on a shared machine at a time.

Every benchmark runs at the project's own defaults (`settings()`: comment length, max_tokens, max_pixels, read
from daemon/config.py) unless a flag of `python -m bench` says otherwise; then `is_default()` is false and the
figures are labelled `extra` (they are not the defaults' figures). `--precision` picks float32 (default: the
CPU's BLAS needs it), bfloat16 or 4bit weights for the models (`apply_precision`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

SIZES = ("smoke", "real")
# A real critique fills its comments (the project's bound is 160 characters); the random benchmark models would
# write a few words and close the string, leaving most of a report schema-forced, which is exactly what the
# fast path skips. So benchmark schemas hold every comment to at least this many characters (`real_length`):
# 120 with the real Qwen2 vocabulary (about 4 characters a token: ~30 free tokens a comment, up to the project's
# 160). The smoke model's 1,000-token vocabulary spends about a token per character once held open, so 160 would
# not fit the default max_tokens: its comments are held to 40-48 characters, about the free tokens of a real report.
REAL_COMMENT_CHARS = {"smoke": 40, "real": 120}
SMOKE_COMMENT_MAX_CHARS = 48
PHOTOS = {"smoke": 5, "real": 5}
REAL_SHAPES_LOCK = Path(os.environ.get("MONDRIAN_REAL_SHAPES_LOCK", "/tmp/mondrian-real-shapes.lock"))
_emitted: list[str] = []
_overrides: dict[str, Any] = {}


def defaults() -> dict[str, Any]:
    """The settings a user runs: daemon/config.py's defaults, and real-length comments."""
    from dataclasses import fields

    from daemon.config import Config

    own = {f.name: f.default for f in fields(Config)}
    return {"comment_max_chars": own["comment_max_chars"], "max_tokens": own["max_tokens"],
            "max_pixels": own["max_pixels"],
            **{f"comment_min_chars_{k}": min(v, own["comment_max_chars"]) for k, v in REAL_COMMENT_CHARS.items()},
            "comment_max_chars_smoke": min(SMOKE_COMMENT_MAX_CHARS, own["comment_max_chars"])}


def set_overrides(**values: Any) -> None:
    """The runner's flags (None: keep the default)."""
    _overrides.clear()
    _overrides.update({k: v for k, v in values.items() if v is not None})


def settings() -> dict[str, Any]:
    """The settings this run measures at: the defaults unless a flag changed one."""
    out = {**defaults(), **{k: v for k, v in _overrides.items()
                            if k not in ("photos", "comment_min_chars", "precision")}}
    out["comment_max_chars_smoke"] = min(out["comment_max_chars_smoke"], out["comment_max_chars"])
    for shapes in REAL_COMMENT_CHARS:
        key = f"comment_min_chars_{shapes}"
        out[key] = min(_overrides.get("comment_min_chars", out[key]), out["comment_max_chars"])
    out["comment_max_chars_smoke"] = max(out["comment_max_chars_smoke"], out["comment_min_chars_smoke"])
    return out


def comment_chars(shapes: str) -> tuple[int, int]:
    """(min, max) length of the benchmark's comments for this model's vocabulary."""
    s = settings()
    return int(s[f"comment_min_chars_{shapes}"]), int(s["comment_max_chars_smoke" if shapes == "smoke"
                                                         else "comment_max_chars"])


PRECISIONS = ("float32", "bfloat16", "4bit")


def precision() -> str:
    """The weights' precision: float32 (the CPU's best: BLAS), bfloat16, or 4bit (the project's default model is
    4-bit: the language model quantized with mlx's own `nn.quantize`, group 64, the vision tower bfloat16)."""
    return str(_overrides.get("precision") or "float32")


def apply_precision(model: Any) -> None:
    import mlx.core as mx
    import mlx.nn as nn

    if precision() == "float32":
        return
    model.set_dtype(mx.bfloat16)
    if precision() == "4bit":
        nn.quantize(model.language_model, group_size=64, bits=4)
    mx.eval(model.parameters())


def photos(shapes: str) -> int:
    return int(_overrides.get("photos") or PHOTOS[shapes])


# Every timed side first runs once, untimed, on a photo of the measured size that is not measured: first calls pay
# for the allocator, lazy imports and, on a GPU, the kernels MLX compiles for each new shape (up to seconds each on
# CUDA). A warm-up on a smaller photo left those compiles inside the timed photos, unevenly between the sides.
WARMUP = "one untimed full-size photo per side"


def is_default() -> bool:
    return settings() == defaults()


def label() -> str:
    """`default`, or `extra(<what changed>)`: figures at other settings are extra rows, never the headline."""
    if is_default():
        return "default"
    base = defaults()
    return "extra(" + ",".join(f"{k}={v}" for k, v in settings().items() if base[k] != v) + ")"


def print_settings() -> dict[str, Any]:
    """Print the settings as key=value lines (and return them for the JSON)."""
    out = {**settings(), "precision": precision(), "settings": label()}
    for key, value in out.items():
        emit(key, value)
    return out


def real_length(schema: Any, min_chars: int) -> Any:
    """`schema` with every bounded string (the comments and summary) at least `min_chars` long."""
    if isinstance(schema, list):
        return [real_length(v, min_chars) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: real_length(v, min_chars) for k, v in schema.items()}
    if out.get("type") == "string" and "maxLength" in out:
        out["minLength"] = max(int(out.get("minLength", 0)), min(min_chars, int(out["maxLength"])))
    return out


class RealLength:
    """A `ModelRuntime` whose critiques are real-length (`real_length` on each schema), counting the free and
    schema-forced tokens of every generation it runs. Everything else is the runtime's own."""

    def __init__(self, runtime: Any, min_chars: int) -> None:
        self._rt = runtime
        self._min = min_chars
        self.generations: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rt, name)

    def generate_json(self, image: Any, prompt: str, schema: dict, **kwargs: Any) -> Any:
        gen = self._rt.generate_json(image, prompt, real_length(schema, self._min), **kwargs)
        self.generations.append(gen)
        return gen

    def take(self) -> tuple[int, int, int]:
        """(reports, free tokens, forced tokens) since the last call; free: tokens the model chose."""
        gens, self.generations = self.generations, []
        free = sum(int(g.free_tokens or 0) for g in gens)
        return len(gens), free, sum(g.generated_tokens for g in gens) - free


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def emit(key: str, value: Any) -> Any:
    """Print one figure as `key=value` now (flushed, so long runs show progress) and remember it was printed."""
    print(f"{key}={_fmt(value)}", flush=True)
    _emitted.append(key)
    return value


def note(text: str) -> None:
    """A human-readable line that is not a figure (goes to stderr)."""
    print(f"# {text}", file=sys.stderr, flush=True)


def emitted() -> list[str]:
    """Every key printed so far, in order (`emitted()[n:]`: those printed since the n-th)."""
    return list(_emitted)


@contextlib.contextmanager
def real_shapes_lock(timeout_s: float | None = None) -> Iterator[None]:
    """Exclusive, machine-wide: wait for any other real-shape model user to finish first."""
    REAL_SHAPES_LOCK.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(REAL_SHAPES_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        started = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    note(f"waiting for {REAL_SHAPES_LOCK} (another real-shape model is in memory)")
                    told = True
                if timeout_s is not None and time.monotonic() - started > timeout_s:
                    raise TimeoutError(f"{REAL_SHAPES_LOCK} stayed locked for {timeout_s:.0f} s")
                time.sleep(2.0)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} bench\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def var_dir() -> Path:
    """Where benchmark models are built and kept (MONDRIAN_BENCH_VAR, else <checkout>/var)."""
    from daemon.config import PROJECT_ROOT

    return Path(os.environ.get("MONDRIAN_BENCH_VAR") or PROJECT_ROOT / "var").resolve()


def by_size(size: str, measure: Callable[[str], dict[str, Any]], *headlines: str) -> dict[str, Any]:
    """Measure the smoke model, and for `size` "real" the real shapes too (holding the lock); then repeat the
    `headlines` figures of the size asked without prefix, as the issues name them."""
    figures = measure("smoke")
    if size == "real":
        with real_shapes_lock():
            figures.update(measure("real"))
    for key in headlines:
        figures[key] = emit(key, figures[f"{size}.{key}"])
    return figures
