"""`python -m bench [NAME ...] [--size smoke|real]`: run benchmarks (all by default), print key=value lines."""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import pkgutil
import platform
import sys
import time
from pathlib import Path

from daemon.model import blas

blas.preload_openblas()  # before anything imports mlx

from . import PRECISIONS, SIZES, _fmt, emitted, note, print_settings, set_overrides, var_dir

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
    for flag, kind, what in (("comment-max-chars", int, "comment bound (default: daemon/config.py's)"),
                             ("comment-min-chars", int, "benchmark comments' minimum length (default: real-length)"),
                             ("max-tokens", int, "token budget per report (default: daemon/config.py's)"),
                             ("max-pixels", int, "photo pixel cap (default: daemon/config.py's)"),
                             ("photos", int, "photos per model (default: 5)")):
        p.add_argument(f"--{flag}", type=kind, help=f"{what}; any other value labels the figures `extra`")
    p.add_argument("--precision", choices=PRECISIONS, default="float32",
                   help="weights of the benchmark models (float32: CPU BLAS; 4bit: the default model's)")
    p.add_argument("--json", type=Path, metavar="PATH",
                   help="where to write the figures (default: <var>/bench/<time>-<size>.json)")
    args, extra = p.parse_known_args(argv)  # what is left goes to benchmarks that take flags (ACCEPTS_ARGS)
    unknown = [n for n in args.names if n not in names]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(names)}")
    set_overrides(comment_max_chars=args.comment_max_chars, comment_min_chars=args.comment_min_chars,
                  max_tokens=args.max_tokens, max_pixels=args.max_pixels, photos=args.photos,
                  precision=args.precision)
    now = datetime.datetime.now(datetime.timezone.utc)
    record: dict = {"date": now.isoformat(timespec="seconds"), "size": args.size,
                    "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
                               f"{platform.node()}", "settings": print_settings(), "blas": blas.described(),
                    "benchmarks": {}}
    print(f"blas={record['blas']}", flush=True)  # on a Linux CPU, which library every float32 product ran on
    out = args.json or var_dir() / "bench" / f"{now:%Y%m%dT%H%M%SZ}-{args.size}.json"
    for name in args.names or names:
        note(f"bench {name} --size {args.size}")
        started = time.perf_counter()
        before = len(emitted())
        module = importlib.import_module(f"bench.{name}")
        takes = getattr(module, "ACCEPTS_ARGS", False)
        if extra and not takes:
            p.error(f"bench {name} takes no options ({' '.join(extra)})")
        result = (module.run(args.size, extra) if takes else module.run(args.size)) or {}
        printed = set(emitted()[before:])
        for key, value in result.items():
            if key not in printed:
                print(f"{key}={_fmt(value)}", flush=True)
        record["benchmarks"][name] = {**result, "seconds": round(time.perf_counter() - started, 1)}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2, default=str) + "\n")  # after each: a crash keeps the rest
        note(f"bench {name} took {time.perf_counter() - started:.1f} s")
    note(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
