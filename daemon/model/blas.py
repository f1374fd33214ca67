"""Put a fast BLAS into the process before MLX is imported.

The Linux `mlx[cpu]` wheel links a single-threaded reference BLAS; symbols from a library loaded
earlier with RTLD_GLOBAL win symbol resolution, so loading another BLAS first makes float32 matmul
~30x faster (NOTES.md). Loading it after `import mlx` does nothing, hence the import-order rule.

oneMKL (the `mkl` wheel, a Linux x86_64 dependency: no root, no apt) comes first: MLX hands every product to
`cblas_sgemm`, a decoded token's one-row products included, and Debian's OpenBLAS 0.3.21 runs those as a general
matrix product, reading the weights at about half the speed oneMKL does (bench/RESULTS.md, `bound`). A system
OpenBLAS is the fallback (other machines, or a venv without the wheel).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import site
import sys
from pathlib import Path

import platformdirs

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
_loaded_name = "MLX's own"  # macOS: Accelerate; Linux: the wheel's reference BLAS until one is preloaded
_attempted = False
# Set for the child processes of the command that warned (the isolation check, training): they say nothing again.
NOTED_ENV = "MONDRIAN_BLAS_NOTED"


def _notice_file() -> Path:
    return Path(platformdirs.user_state_dir("mondrian", appauthor=False)) / "blas-warning"


def _warn_once(message: str) -> None:
    """`message` as a warning the first time this user meets it, then as a debug line (`-v` shows it): every
    command (and each process it starts) would otherwise repeat the same paragraph. A different problem, or
    OpenBLAS installed and removed again, warns anew."""
    noted = os.environ.get(NOTED_ENV) == message
    if not noted:
        try:
            noted = _notice_file().read_text(encoding="utf-8") == message
        except (OSError, UnicodeDecodeError):
            pass
    os.environ[NOTED_ENV] = message
    if noted:
        log.debug("%s (said before; %s remembers it)", message, _notice_file())
        return
    log.warning("%s", message)
    try:
        _notice_file().parent.mkdir(parents=True, exist_ok=True)
        _notice_file().write_text(message, encoding="utf-8")
    except OSError:
        pass  # an unwritable state folder: the next command warns again, which is no harm


def _venv_mkl() -> str | None:
    """oneMKL's single dynamic library from the `mkl` wheel in this Python's environment (pip puts it in lib/; with
    `pip install --user`, in the user base's lib/)."""
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix, site.getuserbase())):
        for path in sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*"))):
            return path
    return None


def _find_openblas() -> str | None:
    override = os.environ.get("MONDRIAN_OPENBLAS")
    if override:
        return override if os.path.exists(override) else None
    return _venv_mkl() or system_openblas()


def system_openblas() -> str | None:
    """The system's OpenBLAS (a distribution's package), if any."""
    for path in _CANDIDATES:
        if os.path.exists(path):
            return path
    for pattern in _SEARCH_GLOBS:
        for path in sorted(glob.glob(pattern)):
            return path
    return None


def _x86_64() -> bool:
    import platform

    return platform.machine() in ("x86_64", "AMD64")


def _prepare(path: str) -> str:
    """The library's name for the log; oneMKL's threading chosen before it loads (it reads these once). Its own
    layer needs Intel's OpenMP (libiomp5, which the wheel's `intel-openmp` dependency puts beside it); without it,
    GNU OpenMP (the compiler runtime Linux has), else one thread. Threads fixed, not dynamic: a product's rounding
    then does not change from one call to the next."""
    if "libmkl_rt" not in os.path.basename(path):
        return "OpenBLAS"
    if not os.path.exists(os.path.join(os.path.dirname(path), "libiomp5.so")):
        os.environ.setdefault("MKL_THREADING_LAYER", "GNU" if ctypes.util.find_library("gomp") else "SEQUENTIAL")
    os.environ.setdefault("MKL_DYNAMIC", "FALSE")
    return "oneMKL"


def preload_openblas() -> str | None:
    """Load oneMKL or OpenBLAS globally (Linux only); returns the path loaded, or None. Safe to call often."""
    global _loaded, _loaded_name, _attempted
    if _attempted:
        return _loaded
    _attempted = True
    if not sys.platform.startswith("linux"):
        return None  # macOS: MLX uses Accelerate/Metal already.
    if "mlx.core" in sys.modules:
        log.warning("mlx was imported before oneMKL or OpenBLAS could be preloaded; CPU matmul stays slow")
    path = _find_openblas()
    if path is None:
        fix = ("pip install mkl into Mondrian's environment" if _x86_64() else "apt install libopenblas0-pthread")
        _warn_once(f"no oneMKL or OpenBLAS found ({fix}); MLX uses its bundled reference BLAS, float32 matmul is "
                   "~30x slower")
        return None
    name = _prepare(path)
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        _warn_once(f"could not load {name} from {path} ({exc}); using the bundled reference BLAS")
        return None
    _loaded, _loaded_name = path, name
    os.environ.pop(NOTED_ENV, None)
    try:
        _notice_file().unlink(missing_ok=True)  # should OpenBLAS go missing again, say so again
    except OSError:
        pass
    # Debug only: every CLI command imports this, and a line on each one's stderr is noise; the model load says it.
    log.debug("BLAS: %s preloaded from %s", name, path)
    return path


def described() -> str:
    """The BLAS this process's float32 products run on, for benchmark records: `oneMKL (path)`, ..."""
    return f"{_loaded_name} ({_loaded})" if _loaded else _loaded_name
