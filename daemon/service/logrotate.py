"""Size-based rotation of the daemon's own stdout/stderr log files.

launchd opens StandardOutPath/StandardErrorPath for us and never rotates them, and newsyslog needs
root to configure. But the open files are *our* fds 1 and 2, so the daemon can rotate them itself:
rename `mondrian.err.log` -> `.1` (shifting older backups up), open a fresh file at the old name and
dup2 it onto the fd. Everything that writes to fd 1/2 (print, logging, C libraries) follows along
without knowing.

Under systemd stdout is a journal socket, not a regular file, so rotation is a no-op there (journald
rotates its own storage).

The agent plist switches this on with environment variables; `StdStreamRotator.from_env()` reads them:
  MONDRIAN_LOG_ROTATE=1, MONDRIAN_LOG_MAX_BYTES (default 10 MiB), MONDRIAN_LOG_BACKUPS (default 3).
"""

from __future__ import annotations

import os
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Mapping

from ..config import is_true

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 3
ENV_ROTATE = "MONDRIAN_LOG_ROTATE"
ENV_MAX_BYTES = "MONDRIAN_LOG_MAX_BYTES"
ENV_BACKUPS = "MONDRIAN_LOG_BACKUPS"

# One rotation at a time: two threads rotating the same file would shift backups twice.
_lock = threading.Lock()


def fd_path(fd: int) -> Path | None:
    """The path a file descriptor was opened at, or None when the platform cannot tell."""
    if sys.platform == "darwin":
        import fcntl
        try:
            raw = fcntl.fcntl(fd, fcntl.F_GETPATH, b"\0" * 1024)  # type: ignore[attr-defined]
        except OSError:
            return None
        return Path(raw.split(b"\0", 1)[0].decode(sys.getfilesystemencoding(), "surrogateescape"))
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    # A file unlinked behind our back reads "path (deleted)": nothing to rotate by name then.
    return Path(target) if target.startswith("/") and not target.endswith(" (deleted)") else None


def _shift_backups(path: Path, backups: int) -> None:
    """path.(n-1) -> path.n ... path -> path.1; the oldest falls off the end."""
    for i in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{i + 1}"))
    os.replace(path, path.with_name(f"{path.name}.1"))


def rotate_if_needed(max_bytes: int, backups: int, fds: Iterable[int] = (1, 2)) -> bool:
    """Rotate each fd in `fds` that points at a regular file larger than `max_bytes`.

    Returns True when at least one file was rotated. fds that share one file (`>log 2>&1`) are
    rotated once and all re-pointed at the fresh file. Never raises for ordinary I/O trouble: a
    daemon must not die because its log could not be rotated; it keeps writing to the old file.
    """
    if max_bytes <= 0:
        return False
    with _lock:
        groups: dict[tuple[int, int], list[int]] = {}
        for fd in fds:
            try:
                st = os.fstat(fd)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_size > max_bytes:
                groups.setdefault((st.st_dev, st.st_ino), []).append(fd)
        if not groups:
            return False
        # Push Python's buffered text into the old file first, so no line straddles two files.
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                pass
        rotated = False
        for (dev, ino), group in groups.items():
            path = fd_path(group[0])
            try:
                if path is None:
                    continue
                st = path.stat()
                if (st.st_dev, st.st_ino) != (dev, ino):
                    continue  # someone else already moved it; don't rotate a stranger's file
                mode = stat.S_IMODE(st.st_mode)
                if backups > 0:
                    _shift_backups(path, backups)
                else:
                    path.unlink()
                # O_APPEND like launchd's own open: safe if another writer shares the file.
                new_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, mode)
                try:
                    for fd in group:
                        os.dup2(new_fd, fd)
                finally:
                    os.close(new_fd)
                rotated = True
            except OSError as exc:
                try:
                    os.write(2, f"mondrian: could not rotate log {path}: {exc}\n".encode())
                except OSError:
                    pass
        return rotated


class StdStreamRotator:
    """Rotates fds 1/2 by size; `maybe_rotate()` is cheap to call often (it checks at most every
    `interval` seconds), so the daemon loop can call it on every tick."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS,
                 interval: float = 60.0, fds: tuple[int, ...] = (1, 2)) -> None:
        self.max_bytes = max_bytes
        self.backups = backups
        self.interval = interval
        self.fds = fds
        self._next = 0.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, interval: float = 60.0) -> "StdStreamRotator | None":
        """A rotator configured by the service's environment, or None when rotation is off."""
        if not is_true(env.get(ENV_ROTATE, "")):
            return None
        try:
            max_bytes = int(env.get(ENV_MAX_BYTES) or DEFAULT_MAX_BYTES)
            backups = int(env.get(ENV_BACKUPS) or DEFAULT_BACKUPS)
        except ValueError:
            max_bytes, backups = DEFAULT_MAX_BYTES, DEFAULT_BACKUPS
        return cls(max_bytes=max_bytes, backups=max(0, backups), interval=interval)

    def rotate(self) -> bool:
        return rotate_if_needed(self.max_bytes, self.backups, self.fds)

    def maybe_rotate(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now < self._next:
            return False
        self._next = now + self.interval
        return self.rotate()
