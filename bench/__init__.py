"""Benchmarks: `python -m bench [NAME ...] [--size smoke|real]`, each printing key=value lines.

A benchmark is a module `bench/<name>.py` with `run(size: str) -> dict`; dropping the file in is the whole
registration. Print figures with `emit(key, value)` as they are measured (the runner prints whatever the
returned dict holds that was not emitted). Hold `real_shapes_lock()` around any load of a real-shape model:
only one ~9 GB model may be in memory on a shared machine at a time.
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
REAL_SHAPES_LOCK = Path(os.environ.get("MONDRIAN_REAL_SHAPES_LOCK", "/tmp/mondrian-real-shapes.lock"))
_emitted: set[str] = set()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def emit(key: str, value: Any) -> Any:
    """Print one figure as `key=value` now (flushed, so long runs show progress) and remember it was printed."""
    print(f"{key}={_fmt(value)}", flush=True)
    _emitted.add(key)
    return value


def note(text: str) -> None:
    """A human-readable line that is not a figure (goes to stderr)."""
    print(f"# {text}", file=sys.stderr, flush=True)


def emitted() -> set[str]:
    return set(_emitted)


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
