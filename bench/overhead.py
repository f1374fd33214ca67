"""`overhead`: what the daemon itself costs, around the model, on the real daemon process (issue 11, items 9, 11).

The smoke model, baseline mode, every other setting the project's default. 200 distinct photos (the bundled
samples at 1600x1200, each with its own mark so none is a duplicate) are dropped into the inbox of a real
`python -m daemon run`; the benchmark only reads the ledger and /proc.

  daemon_overhead_ms   per photo, everything but model time: the interval between consecutive reports
                       minus that photo's analysis time (watching, ledger, image load, isolation check,
                       report rendering, outbox index, claiming the next photo)
  overhead_first20_ms / overhead_last20_ms   the same over photos 2-21 and the last 20: flat means equal
  rss_growth_mb        peak RSS (VmHWM) after the last photo minus after the 20th
  idle_cpu_percent     the daemon's CPU time over IDLE_S seconds with an empty inbox (model loaded), as % of
                       one core; measured before the photos and again after them
"""

from __future__ import annotations

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


def _photos(folder: Path, n: int) -> list[Path]:
    from PIL import Image, ImageDraw, ImageOps

    from daemon.resources import samples_dir

    samples = sorted(samples_dir().glob("*.jpg"))
    out = []
    for i in range(n):
        img = ImageOps.fit(Image.open(samples[i % len(samples)]).convert("RGB"), SIZE)
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


def measure() -> dict[str, Any]:
    from daemon.model.smoke import ensure_smoke_model

    figures: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        figures[key] = emit(key, value)

    s = bench_settings()
    model = ensure_smoke_model(var_dir())
    with tempfile.TemporaryDirectory(prefix="mondrian-bench-overhead-") as tmp:
        home = Path(tmp) / "home"
        (home / "inbox").mkdir(parents=True)
        # The defaults, stated: baseline mode (rag needs a portfolio; its retrieval counts as analysis time).
        (home / "mondrian.toml").write_text(
            f'default_mode = "baseline"\nmax_pixels = {s["max_pixels"]}\nmax_tokens = {s["max_tokens"]}\n'
            f'comment_max_chars = {s["comment_max_chars"]}\n')
        staged = Path(tmp) / "staged"
        staged.mkdir()
        photos = _photos(staged, PHOTOS)
        env = {**os.environ, "MONDRIAN_HOME": str(home), "MONDRIAN_MODEL": str(model), "HF_HUB_OFFLINE": "1"}
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
            while done < PHOTOS:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the daemon stopped or stalled at {done}/{PHOTOS} photos")
                time.sleep(0.25)
                was, done = done, _done(db)
                _, rss, hwm = _proc(proc.pid)
                rss_at.setdefault(done, (rss, hwm))
                if done // 20 > was // 20:
                    note(f"overhead: {done}/{PHOTOS} photos")
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
    failed = sum(1 for r in rows if r[2] != "done")
    overhead = [(b[0] - a[0] - (b[1] or 0.0)) * 1e3 for a, b in zip(rows, rows[1:])]
    model_s = [r[1] or 0.0 for r in rows]
    warm = min((k for k in rss_at if k >= 20), default=max(rss_at))
    put("photos", len(rows))
    put("failed", failed)
    put("model_ms_per_photo", round(1e3 * statistics.mean(model_s), 1))
    put("daemon_overhead_ms", round(statistics.mean(overhead), 1))
    put("daemon_overhead_median_ms", round(statistics.median(overhead), 1))
    put("overhead_first20_ms", round(statistics.mean(overhead[:20]), 1))
    put("overhead_last20_ms", round(statistics.mean(overhead[-20:]), 1))
    put("rss_after_20_mb", round(rss_at[warm][1], 1))
    put("rss_after_200_mb", round(hwm, 1))
    put("rss_growth_mb", round(hwm - rss_at[warm][1], 1))
    return figures


def run(size: str) -> dict[str, Any]:
    if size != "smoke":
        note("overhead runs at smoke size only: it measures the daemon around the model")
    return measure()
