"""Run `python -m daemon ...` on a real pseudo-terminal, as a person at a terminal would, and read all it wrote."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from tests.harness import REPO, env_for


LOG_START = re.compile(r"^(?:\x1b\[K)?(?:\d{4}-\d\d-\d\d[ T])?\d\d:\d\d:\d\d")


def in_terminal(home: Path, model_path: Path, *args: str, timeout: float = 120, columns: int = 120,
                signal_after: float | None = None, signal_on: tuple[str, int] | None = None,
                **env: str) -> tuple[int, str]:
    """(exit code, everything written to the terminal): stdin, stdout and stderr are one pty, `columns` wide.
    `signal_after`: press Ctrl-C (SIGINT) that many seconds after the start. `signal_on=(text, n)`: press it once the
    terminal has shown `text` n times (not a number of seconds: a busy machine starts Python slowly)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "daemon", *args], env=env_for(home, model_path, **env), cwd=REPO,
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    started = time.monotonic()
    deadline = started + timeout + (signal_after or 0)
    try:
        while time.monotonic() < deadline:
            if signal_after is not None and time.monotonic() - started >= signal_after:
                proc.send_signal(signal.SIGINT)
                signal_after = None
            if signal_on is not None and b"".join(chunks).decode(errors="replace").count(signal_on[0]) >= signal_on[1]:
                proc.send_signal(signal.SIGINT)
                signal_on = None
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the other side is closed, everything has been read
                break
            if not data:
                break
            chunks.append(data)
        else:
            proc.kill()
            raise AssertionError(f"{args} did not finish within {timeout} s:\n" + b"".join(chunks).decode(errors="replace"))
        return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def torn_lines(output: str) -> list[str]:
    """Log lines that a progress bar tore: after the last carriage return of a terminal line, a log record must start
    the line (its time first), not follow a bar's remains."""
    torn = []
    for line in output.replace("\r\n", "\n").split("\n"):
        shown = line.split("\r")[-1]
        if re.search(r" (INFO|WARNING|ERROR) ", shown) and not LOG_START.match(shown):
            torn.append(repr(line))
    return torn
