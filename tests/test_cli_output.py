"""What every command owes a terminal and a script: `--version`, no traceback when the reader of a pipe goes
away, log lines that say the day, and the missing-OpenBLAS warning said once, not by every command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import daemon
from tests.harness import REPO, env_for, make_home

BLAS_MISSING = "no oneMKL or OpenBLAS found (pip install mkl"


def _run(*args: str, env: dict[str, str] | None = None, stdout: int | None = subprocess.PIPE,
         timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon", *args], env=env, cwd=REPO, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)


def test_version() -> None:
    out = _run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"mondrian {daemon.__version__}", out


def _into_closed_pipe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The command with its stdout on a pipe whose reader has already gone: every write fails with EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return _run(*args, env=env, stdout=write_end)
    finally:
        os.close(write_end)


def test_a_reader_that_goes_away_gets_no_traceback(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    env = env_for(home, Path("smoke"))  # no command here loads a model
    for args in (["--help"], ["--version"], ["status"], ["status", "--json"]):
        out = _into_closed_pipe(*args, env=env)
        assert "Traceback" not in out.stderr and "BrokenPipeError" not in out.stderr, (args, out.stderr)
        # As a command killed by SIGPIPE (`git log | head`); argparse's own --help and --version ignore the error.
        assert out.returncode in ((0, 141) if args[0].startswith("--") else (141,)), (args, out.returncode)
    # And through a real `head`, as a person types it (whether head leaves before the last write is up to timing).
    shell = subprocess.run(f"{sys.executable} -m daemon status | head -1; "
                           f"{sys.executable} -m daemon --help | head -1",
                           shell=True, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in shell.stderr and "BrokenPipeError" not in shell.stderr, shell.stderr
    assert shell.stdout.splitlines()[1].startswith("usage: mondrian"), shell.stdout


def test_log_lines_carry_the_date(tmp_path: Path) -> None:
    out = _run("--home", str(tmp_path / "nowhere"), "status")
    assert out.returncode == 78
    assert re.match(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} ERROR ", out.stderr), out.stderr


def test_missing_openblas_is_said_once_not_by_every_command(tmp_path: Path) -> None:
    make_home(tmp_path / "home")  # `adapters` reads a home: a missing one is refused before anything is loaded
    env = env_for(tmp_path / "home", Path("smoke"), XDG_STATE_HOME=str(tmp_path / "state"))
    env.pop("MONDRIAN_OPENBLAS", None)
    missing = "/nonexistent/libopenblas.so"

    def command(openblas: str | None) -> str:
        # `adapters` needs no model, but it imports daemon.model, where OpenBLAS is loaded (before any mlx)
        out = _run("adapters", env={**env, "MONDRIAN_OPENBLAS": openblas} if openblas else env)
        assert out.returncode == 0, out.stderr
        return out.stderr

    assert command(missing).count(BLAS_MISSING) == 1
    assert command(missing).count(BLAS_MISSING) == 0  # the next command: once is enough
    found = command(None)
    assert "BLAS" not in found, found  # a BLAS found is no news on every command's stderr; `-v` says it
    if " preloaded from " in _run("-v", "adapters", env=env).stderr:  # this machine has one: once it has been
        assert command(missing).count(BLAS_MISSING) == 1  # loaded, missing is news again
