"""Drive the real daemon in a subprocess on temporary folders: homes, photos, waiting, status."""

from __future__ import annotations

import json
import os
import signal
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent

FAST_SETTINGS: dict[str, Any] = {
    "quiet_seconds": 0.4,
    "rescan_seconds": 2,
    "max_pixels": 112 * 112,
    "comment_max_chars": 24,
    "max_tokens": 700,
    "retry_base_seconds": 0.5,
    "default_mode": "baseline",
    "api_port": 0,  # off unless a test serves it (tests/test_api.py): daemons of parallel tests share no port
}


def make_home(root: Path, model_path: Path | None = None, **settings: Any) -> Path:
    """A Mondrian home with a fast config (small images, short comments); `settings` override it."""
    root.mkdir(parents=True, exist_ok=True)
    merged = {**FAST_SETTINGS, **settings}
    lines = [f"{k} = {json.dumps(v)}" for k, v in merged.items()]
    (root / "mondrian.toml").write_text("\n".join(lines) + "\n")
    for d in ("inbox", "outbox"):
        (root / d).mkdir(exist_ok=True)
    return root


def env_for(home: Path, model_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"MONDRIAN_HOME": str(home), "MONDRIAN_MODEL": str(model_path), "HF_HUB_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1"})
    env.pop("ANALYSIS_MODE", None)
    env.update(extra)
    return env


def photo(path: Path, seed: int = 0, size: tuple[int, int] = (160, 120), fmt: str | None = None) -> Path:
    """A small real image with some structure (gradient + shapes), distinct per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 / w), (y * 255 / h), np.full_like(x, rng.integers(0, 255))], -1)
    base = (base + rng.normal(0, 20, base.shape)).clip(0, 255).astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(base).save(path, format=fmt)
    return path


def mondrian(home: Path, model_path: Path, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon", *args], env=env_for(home, model_path, **env),
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def named(home: Path, command: str) -> str:
    """`mondrian COMMAND` as messages from a process serving `home` (not the default home) spell it."""
    return f"mondrian --home {shlex.quote(str(home.resolve()))} {command}"


def hold_ledger_lock(db: Path, seconds: float) -> subprocess.Popen:
    """Another process holding a write transaction on the ledger (as an open `sqlite3` shell would)."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\n"
        f"c = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
        "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True)\n"
        f"time.sleep({seconds}); c.execute('ROLLBACK')\n")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def status(home: Path, model_path: Path) -> dict[str, Any]:
    out = mondrian(home, model_path, "status", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_for(predicate: Callable[[], Any], timeout: float = 60, interval: float = 0.2, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


class Daemon:
    """`python -m daemon run` as launchd would start it, with its log in the home."""

    def __init__(self, home: Path, model_path: Path, *args: str, wrap: Sequence[str] = (), **env: str):
        """`wrap`: a command that runs the daemon's (e.g. `unshare` for a mount namespace of its own)."""
        self.home, self.model_path = home, model_path
        self.log = home / f"daemon-{time.monotonic_ns()}.log"
        self._fh = open(self.log, "wb")
        self.proc = subprocess.Popen([*wrap, sys.executable, "-m", "daemon", "run", *args],
                                     env=env_for(home, model_path, **env), cwd=REPO,
                                     stdout=self._fh, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._fh.close()

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.wait()

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._fh.close()


def terminal_count(info: dict[str, Any]) -> int:
    c = info["counts"]
    return c["done"] + c["failed"] + c.get("gone", 0)


def ledger_jobs(home: Path) -> dict[str, Any]:
    """Every job in the home's ledger, by its path relative to the inbox (the SQLite file, or the PostgreSQL ledger
    its mondrian.toml names)."""
    from daemon.config import load_config
    from daemon.ledger import Ledger

    try:
        url = load_config(home, env={}).ledger_url
    except Exception:  # a test's deliberately broken settings (or no home): the SQLite file
        url = ""
    ledger = Ledger(home / "var" / "ledger.db", url=url or None)
    try:
        return {j.rel_path: j for j in ledger.jobs()}
    finally:
        ledger.close()


def reports(outbox: Path) -> list[Path]:
    return sorted(p for p in outbox.glob("*/report.json") if not p.parent.name.startswith("."))
