"""`overhead`: what the daemon itself costs, around the model, on the real daemon process (issue 11, items 9, 11).

The smoke model, baseline mode, every other setting the project's default. 200 distinct photos (the bundled
samples at 1600x1200, or `--photo-size WxH`, each with its own mark so none is a duplicate) are dropped into the
inbox of a real `python -m daemon run`. The worker records each job's costs (daemon/pipeline/costs.py, turned on
by MONDRIAN_COSTS_FILE): wall time, its own thread's CPU time and the process's CPU time, for the whole job (from
the end of the job before) and for the model's part alone. Everything but the model is the daemon's overhead:
claiming, reading the sidecar, decoding and resizing the photo, the ledger, rendering and writing the report
folder and XMP, moving the original, the outbox index, and (process CPU) the watcher and main loop meanwhile.

  daemon_overhead_ms          mean wall time a photo spends outside the model (on a busy machine: inflated)
  daemon_overhead_cpu_ms      mean CPU time of the worker thread outside the model (the figure that holds when
                              the machine is shared)
  daemon_overhead_process_cpu_ms   the whole process's CPU outside the model (every thread; BLAS threads
                              spinning down after the model's last matmul land here too)
  overhead_first20_* / overhead_last20_*   photos 2-21 and the last 20 (photo 1 warms caches: shown alone)
  overhead_flat               last 20 within 25 % (+1 ms) of photos 2-21, for wall and worker CPU alike
  overhead_cpu_deciles_ms     worker CPU outside the model, mean per tenth of the photos: a cost that grows with
                              the number of reports shows as a rising row
  daemon_overhead_ledger_ms   the old outside view: interval between consecutive finished jobs in the ledger minus
                              the analysis time it records
  rss_growth_mb               peak RSS (VmHWM) after the last photo minus after the 20th
  idle_cpu_percent            the daemon's CPU time over IDLE_S seconds with an empty inbox (model loaded), as % of
                              one core; measured before the photos and again after them
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import emit, note, settings as bench_settings, var_dir

PHOTOS = 200
IDLE_S = 30.0
SIZE = (1600, 1200)


def _proc(pid: int) -> tuple[float, float, float]:
    """(CPU seconds incl. waited-for children, VmRSS MB, VmHWM MB) of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    mem = {line.split(":")[0]: line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
           if line.startswith(("VmRSS", "VmHWM"))}
    return ticks / os.sysconf("SC_CLK_TCK"), int(mem["VmRSS"]) / 1024, int(mem["VmHWM"]) / 1024


def _photos(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    from PIL import Image, ImageDraw, ImageOps

    from daemon.resources import samples_dir

    samples = sorted(samples_dir().glob("*.jpg"))
    bases = [ImageOps.fit(Image.open(s).convert("RGB"), size) for s in samples]
    out = []
    for i in range(n):
        img = bases[i % len(bases)].copy()
        ImageDraw.Draw(img).rectangle((8 * (i % 150), 0, 8 * (i % 150) + 7, 7), fill=(i % 256, 255 - i % 256, 0))
        path = folder / f"shot-{i:04d}.jpg"
        img.save(path, quality=90)
        out.append(path)
    return out


def _done(db: Path) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return con.execute("SELECT COUNT(*) FROM job WHERE state IN ('done', 'failed')").fetchone()[0]
    except sqlite3.Error:
        return 0
    finally:
        con.close()


def _idle_cpu(pid: int, seconds: float) -> float:
    before = _proc(pid)[0]
    time.sleep(seconds)
    return 100.0 * (_proc(pid)[0] - before) / seconds


def _outside_model(costs: list[dict[str, float]], kind: str) -> list[float]:
    return [c[f"{kind}_ms"] - c[f"model_{kind}_ms"] for c in costs]


def _flat(series: list[float]) -> bool:
    first, last = statistics.mean(series[1:21]), statistics.mean(series[-20:])
    return last <= 1.25 * first + 1.0


def measure(n_photos: int = PHOTOS, size: tuple[int, int] = SIZE) -> dict[str, Any]:
    from daemon.model.smoke import ensure_smoke_model

    figures: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        figures[key] = emit(key, value)

    s = bench_settings()
    model = ensure_smoke_model(var_dir())
    put("photo_size", f"{size[0]}x{size[1]}")
    with tempfile.TemporaryDirectory(prefix="mondrian-bench-overhead-") as tmp:
        home = Path(tmp) / "home"
        (home / "inbox").mkdir(parents=True)
        # The defaults, stated: baseline mode (rag needs a portfolio; its retrieval counts as analysis time).
        (home / "mondrian.toml").write_text(
            f'default_mode = "baseline"\nmax_pixels = {s["max_pixels"]}\nmax_tokens = {s["max_tokens"]}\n'
            f'comment_max_chars = {s["comment_max_chars"]}\n')
        staged = Path(tmp) / "staged"
        staged.mkdir()
        photos = _photos(staged, n_photos, size)
        costs_file = Path(tmp) / "costs.jsonl"
        env = {**os.environ, "MONDRIAN_HOME": str(home), "MONDRIAN_MODEL": str(model), "HF_HUB_OFFLINE": "1",
               "MONDRIAN_COSTS_FILE": str(costs_file)}
        log = open(Path(tmp) / "daemon.log", "wb")
        from daemon.config import PROJECT_ROOT

        proc = subprocess.Popen([sys.executable, "-m", "daemon", "run"], env=env, cwd=PROJECT_ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            db = home / "var" / "ledger.db"
            deadline = time.monotonic() + 300
            while b"model ready" not in (Path(tmp) / "daemon.log").read_bytes():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the daemon did not start: {(Path(tmp) / 'daemon.log').read_text()[-2000:]}")
                time.sleep(0.2)
            time.sleep(3.0)  # start-up rescan and first heartbeat belong to start-up, not to idling
            put("idle_cpu_percent", round(_idle_cpu(proc.pid, IDLE_S), 2))
            for p in photos:  # as a copy tool finishes files: each appears whole (rename within the disk)
                shutil.move(str(p), str(home / "inbox" / p.name))
            rss_at: dict[int, tuple[float, float]] = {}
            deadline = time.monotonic() + 3600
            done = 0
            while done < n_photos:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the daemon stopped or stalled at {done}/{n_photos} photos")
                time.sleep(0.25)
                was, done = done, _done(db)
                _, rss, hwm = _proc(proc.pid)
                rss_at.setdefault(done, (rss, hwm))
                if done // 20 > was // 20:
                    note(f"overhead: {done}/{n_photos} photos")
            _, rss, hwm = _proc(proc.pid)
            time.sleep(3.0)
            put("idle_cpu_percent_after", round(_idle_cpu(proc.pid, IDLE_S), 2))
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        rows = con.execute("SELECT finished_at, analysis_s, state FROM job ORDER BY finished_at").fetchall()
        con.close()
        costs = [json.loads(line) for line in costs_file.read_text().splitlines()]
    failed = sum(1 for r in rows if r[2] != "done")
    ledger_view = [(b[0] - a[0] - (b[1] or 0.0)) * 1e3 for a, b in zip(rows, rows[1:])]
    wall, cpu, pcpu = (_outside_model(costs, k) for k in ("wall", "thread_cpu", "process_cpu"))
    warm = min((k for k in rss_at if k >= 20), default=max(rss_at))
    tenth = max(1, len(cpu) // 10)
    put("photos", len(rows))
    put("failed", failed)
    put("loadavg_1m", round(os.getloadavg()[0], 2))
    put("model_ms_per_photo", round(statistics.mean(c["model_wall_ms"] for c in costs), 1))
    put("model_cpu_ms_per_photo", round(statistics.mean(c["model_process_cpu_ms"] for c in costs), 1))
    for name, series in (("", wall), ("_cpu", cpu), ("_process_cpu", pcpu)):
        put(f"daemon_overhead{name}_ms", round(statistics.mean(series), 2))
        put(f"daemon_overhead{name}_median_ms", round(statistics.median(series), 2))
    for name, series in (("", wall), ("_cpu", cpu), ("_process_cpu", pcpu)):
        put(f"overhead_photo1{name}_ms", round(series[0], 2))
        put(f"overhead_first20{name}_ms", round(statistics.mean(series[1:21]), 2))
        put(f"overhead_last20{name}_ms", round(statistics.mean(series[-20:]), 2))
    put("overhead_cpu_deciles_ms", ",".join(f"{statistics.mean(cpu[i:i + tenth]):.1f}"
                                            for i in range(0, tenth * 10, tenth) if cpu[i:i + tenth]))
    put("overhead_flat", _flat(wall) and _flat(cpu))
    put("daemon_overhead_ledger_ms", round(statistics.mean(ledger_view), 1))
    put("rss_after_20_mb", round(rss_at[warm][1], 1))
    put("rss_after_last_mb", round(hwm, 1))
    put("rss_growth_mb", round(hwm - rss_at[warm][1], 1))
    return figures


ACCEPTS_ARGS = True


def run(size: str, argv: list[str] | None = None) -> dict[str, Any]:
    import argparse

    from . import _overrides

    p = argparse.ArgumentParser(prog="python -m bench overhead")
    p.add_argument("--photo-size", default=f"{SIZE[0]}x{SIZE[1]}", metavar="WxH",
                   help="size of the JPEGs dropped in (default: %(default)s; a phone's is 4032x3024)")
    args = p.parse_args(argv or [])
    try:
        w, h = (int(x) for x in args.photo_size.lower().split("x"))
    except ValueError:
        p.error(f"--photo-size takes WIDTHxHEIGHT, e.g. 4032x3024, not {args.photo_size!r}")
    n = int(_overrides.get("photos") or PHOTOS)
    if n < 41:
        p.error("overhead compares photos 2-21 with the last 20: give --photos 41 or more")
    if size != "smoke":
        note("overhead runs at smoke size only: it measures the daemon around the model")
    return measure(n, (w, h))
