"""Reading a file someone else put in a watched folder, without ever hanging on it.

A named pipe, a device or a socket named like a photo would block `open()` or `read()` forever on the one
thread that serves the queue; a file on a stalled network or cloud mount can block a read the same way. So
only regular files are read (checked again on the open descriptor, which no rename can swap), and the read
runs in a helper thread that the caller stops waiting for after `timeout_s`.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

CHUNK = 1 << 20


class NotReadable(OSError):
    """The file is not one Mondrian will read; `str()` says why and what to do, in words for a person."""


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words a person knows."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file"


def _not_regular(mode: int) -> NotReadable:
    return NotReadable(f"this is {kind_of(mode)}, not a file with a photo in it; Mondrian reads only regular "
                       f"files. Put the photo itself there")


def read_regular_file(path: Path, *, max_bytes: int | None = None, timeout_s: float | None = None) -> bytes:
    """All bytes of `path` (symlinks followed), if it is a regular file read within `timeout_s`.

    Raises NotReadable for anything else, OSError when reading fails."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(st.st_mode)  # checked before open(): opening a device can have side effects
    if max_bytes is not None and st.st_size > max_bytes:
        raise NotReadable(f"the file is {st.st_size} bytes, more than the {max_bytes} allowed here")
    # O_NONBLOCK: if a FIFO was swapped in after the check, open() returns at once instead of waiting for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(st.st_mode)
    except BaseException:
        os.close(fd)
        raise
    result: dict[str, object] = {}

    def read() -> None:
        try:
            parts, total = [], 0
            while True:
                chunk = os.read(fd, CHUNK)
                if not chunk:
                    break
                parts.append(chunk)
                total += len(chunk)
                if max_bytes is not None and total > max_bytes:
                    raise NotReadable(f"the file grew past the {max_bytes} bytes allowed here while it was read")
            result["data"] = b"".join(parts)
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc
        finally:
            os.close(fd)

    reader = threading.Thread(target=read, name=f"read {path.name}", daemon=True)
    reader.start()
    reader.join(timeout_s)
    if reader.is_alive():
        # The reader is left blocked (a thread cannot be killed); it closes its descriptor if the read ever ends.
        raise NotReadable(f"reading the file took longer than {timeout_s:g} s (job_timeout_seconds), so it was "
                          f"given up; if it lives on a network or cloud drive, make it available offline and drop "
                          f"it in again")
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["data"]  # type: ignore[return-value]


__all__ = ["NotReadable", "read_regular_file", "kind_of"]
