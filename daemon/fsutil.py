"""File-system primitives shared by every room: safe reads, atomic writes, fsync, moves, locks, pid checks.

Reading a file someone else put in a watched folder, without ever hanging on it.

A named pipe, a device or a socket named like a photo would block `open()` or `read()` forever on the one
thread that serves the queue; a file on a stalled network or cloud mount can block a read the same way. So
only regular files are read (checked again on the open descriptor, which no rename can swap), and the read
runs in a helper thread that the caller stops waiting for after `timeout_s`.
"""

from __future__ import annotations

import errno
import fcntl
import filecmp
import hashlib
import os
import re
import secrets
import shutil
import stat
import threading
import unicodedata
from pathlib import Path
from typing import Callable, Iterable

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
    if stat.S_ISREG(mode):
        return "a file"  # (where a folder was expected)
    return "not a regular file"


def _not_regular(mode: int, path: Path | None = None) -> NotReadable:
    what = kind_of(mode)
    if path is not None and os.path.islink(path):  # named for what is there: "a folder" sent people looking for one
        what = f"a symbolic link to {what} ({os.readlink(path)})"
    return NotReadable(f"this is {what}, not a file with a photo in it; Mondrian reads only regular "
                       f"files. Put the photo itself there")


def read_regular_file(path: Path, *, max_bytes: int | None = None, timeout_s: float | None = None) -> bytes:
    """All bytes of `path` (symlinks followed), if it is a regular file read within `timeout_s`.

    Raises NotReadable for anything else, OSError when reading fails."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(st.st_mode, path)  # checked before open(): opening a device can have side effects
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


def read_text_file(path: Path, *, max_bytes: int = 1 << 20, timeout_s: float = 5.0) -> str:
    """A small UTF-8 settings file (mondrian.toml, an advisor.toml). FileNotFoundError if there is none; NotReadable,
    saying why in words for a person, for a FIFO (which would hang every command), a folder, a huge file or text
    that is not UTF-8."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotReadable(f"it is {kind_of(st.st_mode)}, not a text file")
    try:
        # utf-8-sig: Windows Notepad and TextEdit's "UTF-8 with BOM" start the file with one, which TOML refuses as
        # "Invalid statement at line 1, column 1" (an error no one can see in the file)
        return read_regular_file(path, max_bytes=max_bytes, timeout_s=timeout_s).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise NotReadable("it is not UTF-8 text: save it as UTF-8 (plain text)") from None


def too_large(path: Path, max_bytes: int | None) -> str | None:
    """Why `path` is refused before a byte of it is read (larger than any photo), or None. The whole file is held
    in memory while it is hashed and decoded, so a sparse 10 GB `.jpg` would take the machine's memory."""
    if max_bytes is None:
        return None
    try:
        size = os.stat(path).st_size
    except OSError:
        return None  # the read says what is wrong
    if size <= max_bytes:
        return None
    return (f"the file is {_size_words(size)}, larger than the {_size_words(max_bytes)} Mondrian reads (max_file_mb); "
            f"{NO_PHOTO_IS if max_bytes >= HUGE_BYTES else ''}export the photo again, or raise max_file_mb in "
            f"mondrian.toml")


# Past this limit "no photo is that large" is true (a 100-megapixel 16-bit TIFF is ~600 MB); below it, lowered on
# purpose, a real photo may well be larger.
HUGE_BYTES = 256 * 2**20
NO_PHOTO_IS = "no photo is that large: "


def _size_words(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"



# ---------------------------------------------------------------------------------------- atomic writes
TEMP_NAME_HINT_BYTES = 48


def temp_name(name: str, ending: str) -> str:
    """`.<start of name>.<ending>`: a hidden temporary name that fits in a path component whatever the length of
    `name` (a 250-byte final name must still get a record), and still shows what it is for."""
    hint = name.encode("utf-8", "surrogateescape")[:TEMP_NAME_HINT_BYTES].decode("utf-8", "ignore") or "x"
    return f".{hint}.{ending}"


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Readers see the old file or the new one, never a torn one, even after a crash. `durable=False` skips the two
    fsyncs, for a file rebuilt from others whenever it is found missing or stale (the outbox index and its cache):
    after a power cut it may be empty or old, never torn, and the next start rewrites it."""
    path = Path(path)
    tmp = path.with_name(temp_name(path.name, f"{os.getpid()}.{secrets.token_hex(4)}.tmp"))
    # os.open with 0o666 lets the kernel apply the umask, as a plain open() would; mkstemp would force 0600
    # and reading the umask via os.umask() is racy across threads.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every filesystem allows opening a directory, which is harmless.
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def fsync_files(paths: Iterable[Path], folder: Path) -> None:
    """Make files written with `durable=False` durable, then their folder's entries: one pass over a folder of new
    files that appears whole by a rename afterwards (a report's staging folder) instead of two fsyncs a file."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(folder)


def atomic_write_text(path: Path, text: str, *, durable: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), durable=durable)



# Temporary files of `atomic_write_bytes`: `temp_name(name, "PID.HEX.tmp")`; the pid tells whether the writer lives.
ATOMIC_TMP = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$", re.S)


# ------------------------------------------------------------------------------------------------ moves
def move(src: Path, dst: Path, on_copied: Callable[[], None] = lambda: None) -> None:
    """Rename when possible (atomic); across filesystems copy to a temporary name, rename, then unlink."""
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = dst.with_name(temp_name(dst.name, "moving"))
        try:
            shutil.copy2(src, tmp, follow_symlinks=False)
            os.replace(tmp, dst)
        except BaseException:
            try:
                os.unlink(tmp)  # a full disk must not leave half a copy behind
            except OSError:
                pass
            raise
        on_copied()  # the copy is complete, the source not yet removed (a test hook)
        os.unlink(src)


def identity(path: Path) -> tuple[int, int, int, int, int] | None:
    """What changes when a file's bytes do: ctime too, because a rewrite can keep inode and size and put the old
    mtime back (`os.utime`, `touch -r`, `cp -p` onto the same file), but nothing can set ctime back."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def holds(path: Path, before: tuple[int, int, int, int, int] | None, sha256: str) -> bool:
    """Whether `path` still holds the bytes that were analysed (`before` was its identity before they were read,
    `sha256` their hash). Only ctime moved: metadata (permissions, extended attributes, a hard link) or a rewrite
    that put the old mtime back, which only the content tells apart."""
    now = identity(path)
    if now == before:
        return True
    if now is None or before is None or now[:4] != before[:4]:
        return False
    return content_is(path, sha256, same_file=now[:2])


def content_is(path: Path, sha256: str, *, same_file: tuple[int, int] | None = None) -> bool:
    """Whether `path` is a plain file whose bytes hash to `sha256` (and, given `same_file`, still that (device,
    inode)). Never waits on a FIFO or a device put in its place."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or (same_file is not None and (st.st_dev, st.st_ino) != same_file):
            return False
        return hashlib.file_digest(f, "sha256").hexdigest() == sha256


def same_content(a: Path, b: Path) -> bool:
    """True if `b` is already a complete copy of `a` (a cross-filesystem move killed before its unlink)."""
    try:
        sa, sb = os.lstat(a), os.lstat(b)
        if os.path.islink(a) or os.path.islink(b):
            return os.path.islink(a) and os.path.islink(b) and os.readlink(a) == os.readlink(b)
        return sa.st_size == sb.st_size and filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def folder_inside(path: Path, root: Path) -> bool:
    """Whether `path` lies in a folder that, with every link on its path resolved, is inside the real `root`.
    The file itself may be a link: moving a link moves the link, never its target."""
    return Path(os.path.realpath(path.parent)).is_relative_to(os.path.realpath(root))



def is_folder(path: Path) -> bool:
    """A real folder (a link to one is not)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def companion(photo: Path, suffix: str, *, whole: bool = False, names: list[str] | None = None) -> Path | None:
    """The file that rides along with `photo` (`IMG_1.jpg` -> `IMG_1<suffix>`, any case of the suffix; `whole`:
    `IMG_1.jpg<suffix>`), if present. Never a folder: `IMG_1.mode/` holds photos of its own; the reader refuses any
    other non-file. `names`: the folder's files, listed once by a caller that looks for several companions."""
    base = photo.name if whole else photo.stem
    want = base + suffix
    exact = photo.with_name(want)
    if os.path.lexists(exact) and not is_folder(exact):
        return exact
    if names is None:
        names = files_in(photo.parent)
    # The stem's case counts first: on a case-sensitive disk `X.MODE` belongs to `X.jpg`, never to `x.jpg`. Only the
    # suffix's case is relaxed (`IMG_1.MODE`), and then the whole name, unless another file has exactly that stem.
    # Names compare in one Unicode form: a file copied from a Mac may spell `é` decomposed (NFD) where the photo's
    # name has it composed; APFS finds either by either, most Linux filesystems do not.
    # A name spelled in the other form that is exactly another file's is that file's (NFC `Café.jpg` and NFD
    # `Café.jpg` are two photos on such a disk, and `Café.mode` in NFD is the second one's alone).
    found = [n for n in names if _nfc(n).lower() == _nfc(want).lower()]
    owners = {n if whole else Path(n).stem for n in names
              if n != photo.name and not n.lower().endswith(suffix.lower())}
    for name in found:
        stem = name[: len(name) - len(suffix)]
        if _nfc(stem) == _nfc(base) and (stem == base or stem not in owners):
            return photo.parent / name
    stems = {_nfc(o) for o in owners}
    for name in found:
        if _nfc(name[: len(name) - len(suffix)]) not in stems:
            return photo.parent / name
    return None


def files_in(folder: Path) -> list[str]:
    """The names in `folder` that are not folders (none if it cannot be listed)."""
    try:
        return [e.name for e in os.scandir(folder) if not e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


# ------------------------------------------------------------------------------------------ pids, locks
def pid_alive(pid: int) -> bool:
    """Whether a process with that pid exists (ours always does; one we may not signal does too)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class NotOwn(OSError):
    """Where Mondrian keeps a file or folder of its own, something else is: a symbolic link (writing or deleting
    through it would reach outside the home), a hard link, or another kind of file. `str()` says what to do."""


def _not_own(path: Path, what: str, own: str) -> NotOwn:
    if what == "a symbolic link":
        try:
            what = f"a symbolic link (to {os.readlink(path)})"
        except OSError:
            pass
        from .hints import shell_word

        fix = f"Remove the link (`rm {shell_word(path)}` removes only the link, not what it points to)"
    else:
        fix = "Move it elsewhere"
    return NotOwn(f"{path} is {what}, where Mondrian keeps its own {own}; Mondrian never writes or deletes "
                  f"through it. {fix}")


def check_own_folder(folder: Path) -> None:
    """Raise NotOwn unless `folder` is a real folder (a link to one is not: its sweeps would delete through it)."""
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode):
        raise _not_own(folder, kind_of(st.st_mode), "folder")


def own_folder_inside(folder: Path, root: Path) -> None:
    """Raise NotOwn unless `folder` is a real folder that lies, every link resolved, inside the real `root`: a
    link planted while Mondrian runs must not carry a photo or a record out of the home."""
    check_own_folder(folder)
    if not folder_inside(folder / "x", root):
        raise NotOwn(f"{folder} leads outside {root} (a folder on its path was replaced by a link); Mondrian "
                     f"never writes outside its home. Remove the link")


def open_own_file(path: Path, flags: int = os.O_RDWR) -> int:
    """Open Mondrian's own file `path`, creating it if missing, never through a link: a symbolic link, a hard
    link to some other file or a non-regular file there raises NotOwn (writing would change someone else's
    file). The folder above must be Mondrian's own (checked by `Config.ensure_dirs`)."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK) or os.path.islink(path):
            raise _not_own(path, "a symbolic link", "file") from None
        if exc.errno == errno.EISDIR:  # "cannot write in the folder above" would send the person the wrong way
            raise _not_own(path, "a folder", "file") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        raise _not_own(path, "a hard link to another file" if stat.S_ISREG(st.st_mode) else kind_of(st.st_mode),
                       "file")
    return fd


def read_own_file(path: Path) -> str:
    """What Mondrian wrote in its own small file `path`, read without following a link or waiting on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        return os.pread(fd, 4096, 0).decode(errors="replace").strip()
    finally:
        os.close(fd)


class LockHeld(OSError):
    """Another process holds the lock; `pid` is what it wrote in its note (-1 if nothing), `note` all of it."""

    def __init__(self, lock: Path, pid: int, note: str = ""):
        super().__init__(f"{lock} is held by pid {pid if pid > 0 else '?'}")
        self.pid = pid
        self.note = note


def _note_pid(note: str) -> int:
    first = note.split(maxsplit=1)[0] if note else ""
    return int(first) if first.isdigit() else -1


def _open_folder(folder: Path) -> int:
    return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def hold_lock(lock: Path, note: str = "") -> int:
    """Take the lock `lock` stands for, without waiting, and write `<pid> <note>` in the file `lock`, for
    `lock_holder`. Returns the descriptor, to keep open for as long as the lock is held; raises LockHeld if
    another process has it, NotOwn if `lock` is a link or not a plain file of its own.

    The flock is on the folder that holds `lock`, not on the file: a file can be deleted (a "stale pid file"
    clean-up) and a second process would then lock a new one, while the folder's lock stays with the folder
    whatever is deleted inside it. The kernel drops it however the process dies."""
    fd = _open_folder(lock.parent)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        note_text = read_own_file(lock)
        pid = _note_pid(note_text)
        pid = pid if pid > 0 else _flock_holder(os.fstat(fd))  # its note deleted: ask the system
        os.close(fd)
        raise LockHeld(lock, pid, note_text) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        file_fd = open_own_file(lock)
        try:
            os.ftruncate(file_fd, 0)
            os.pwrite(file_fd, f"{os.getpid()} {note}".strip().encode(), 0)
        finally:
            os.close(file_fd)
    except NotOwn:
        os.close(fd)
        raise
    except OSError:
        pass  # a full disk or a read-only folder: the lock holds all the same, only the note is missing
    except BaseException:
        os.close(fd)
        raise
    return fd


def lock_folder(folder: Path) -> int:
    """An exclusive flock on `folder` itself, without waiting, written nowhere (nothing is added to the folder).
    Returns the descriptor to keep; raises LockHeld (with the holder's pid where the system tells it: Linux's
    /proc/locks, else -1) if another process has it, OSError if the filesystem has no locks."""
    fd = _open_folder(folder)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _flock_holder(os.fstat(fd))
        os.close(fd)
        raise LockHeld(folder, pid) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _flock_holder(st: os.stat_result) -> int:
    """The pid holding an flock on the file `st` describes, from /proc/locks (`1: FLOCK ADVISORY WRITE <pid>
    <major>:<minor>:<inode> 0 EOF`, device numbers in hex); -1 where there is no such table (macOS)."""
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == want and parts[4].isdigit():
                    return int(parts[4])
    except OSError:
        pass
    return -1


def lock_holder(lock: Path) -> int | None:
    """The pid written in `lock` by the process that holds the lock (see `hold_lock`; -1 if it wrote none), or
    None when nobody holds it; probed with a shared lock that is released at once, so asking never disturbs the
    holder."""
    try:
        fd = _open_folder(lock.parent)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _note_pid(read_own_file(lock))
        return pid if pid > 0 else _flock_holder(os.fstat(fd))
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


__all__ = ["NotReadable", "read_regular_file", "read_text_file", "kind_of", "temp_name", "atomic_write_bytes", "atomic_write_text",
           "fsync_dir", "fsync_files", "ATOMIC_TMP", "move", "identity", "holds", "content_is", "same_content", "folder_inside", "pid_alive",
           "lock_holder", "hold_lock", "lock_folder", "LockHeld", "is_folder", "NotOwn", "check_own_folder", "own_folder_inside",
           "open_own_file", "read_own_file",
           "companion"]
