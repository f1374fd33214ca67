"""`python -m bench [NAME ...] [--size smoke|real]`: run benchmarks (all by default), print key=value lines."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import time

import daemon.model  # noqa: F401  (preloads OpenBLAS before anything imports mlx)

from . import SIZES, _fmt, emitted, note

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def available() -> list[str]:
    """Every module in bench/ with a run(size) function."""
    import bench

    names = []
    for info in pkgutil.iter_modules(bench.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"bench.{info.name}")
        if callable(getattr(module, "run", None)):
            names.append(info.name)
    return sorted(names)


def main(argv: list[str] | None = None) -> int:
    names = available()
    p = argparse.ArgumentParser(prog="python -m bench", description="Mondrian benchmarks.")
    p.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all of {', '.join(names)})")
    p.add_argument("--size", choices=SIZES, default="smoke",
                   help="smoke: the tiny offline model (seconds); real: also random weights with the real "
                        "Qwen2-VL-2B shapes (minutes, ~9 GB RAM)")
    args, extra = p.parse_known_args(argv)  # what is left goes to benchmarks that take flags (ACCEPTS_ARGS)
    unknown = [n for n in args.names if n not in names]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(names)}")
    for name in args.names or names:
        note(f"bench {name} --size {args.size}")
        started = time.perf_counter()
        before = emitted()
        module = importlib.import_module(f"bench.{name}")
        takes = getattr(module, "ACCEPTS_ARGS", False)
        if extra and not takes:
            p.error(f"bench {name} takes no options ({' '.join(extra)})")
        result = (module.run(args.size, extra) if takes else module.run(args.size)) or {}
        printed = emitted() - before
        for key, value in result.items():
            if key not in printed:
                print(f"{key}={_fmt(value)}", flush=True)
        note(f"bench {name} took {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
