"""Put OpenBLAS into the process before MLX is imported.

The Linux `mlx[cpu]` wheel links a single-threaded reference BLAS; symbols from a library loaded
earlier with RTLD_GLOBAL win symbol resolution, so loading OpenBLAS first makes float32 matmul
~30x faster (NOTES.md). Loading it after `import mlx` does nothing, hence the import-order rule.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import sys

log = logging.getLogger(__name__)

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)
_SEARCH_GLOBS = (
    "/usr/lib/*/libopenblas*.so*",
    "/usr/lib/libopenblas*.so*",
    "/usr/lib64/libopenblas*.so*",
    "/usr/local/lib/libopenblas*.so*",
)

_loaded: str | None = None
_attempted = False


def _find_openblas() -> str | None:
    override = os.environ.get("MONDRIAN_OPENBLAS")
    if override:
        return override if os.path.exists(override) else None
    for path in _CANDIDATES:
        if os.path.exists(path):
            return path
    for pattern in _SEARCH_GLOBS:
        for path in sorted(glob.glob(pattern)):
            return path
    return None


def preload_openblas() -> str | None:
    """Load OpenBLAS globally (Linux only); returns the path loaded, or None. Safe to call often."""
    global _loaded, _attempted
    if _attempted:
        return _loaded
    _attempted = True
    if not sys.platform.startswith("linux"):
        return None  # macOS: MLX uses Accelerate/Metal already.
    if "mlx.core" in sys.modules:
        log.warning("mlx was imported before OpenBLAS could be preloaded; CPU matmul stays slow")
    path = _find_openblas()
    if path is None:
        log.warning("OpenBLAS not found (apt install libopenblas0-pthread); MLX uses its bundled "
                    "reference BLAS, float32 matmul is ~30x slower")
        return None
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        log.warning("could not load OpenBLAS from %s (%s); using the bundled reference BLAS", path, exc)
        return None
    _loaded = path
    log.info("BLAS: OpenBLAS preloaded from %s", path)
    return path
