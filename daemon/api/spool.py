"""Mondrian's spool (`var/spool/`): each upload gets a folder of its own, `<token>/` (16 hex digits, the first 8 this
home's `spool_tag`), so two photos with the same name never meet, and keeps the name the client gave it (the report
folder is named after it).

A file is written under a hidden partial name and renamed to its real name only once it is complete and synced;
it becomes work only when its ledger job exists. So after a crash, a file in the spool with no job is an upload
whose client never got an answer: the sweep at start-up removes it. A file with a job is never touched here: the
worker moves it to the outbox (or failed/, duplicates/) like an inbox photo, and the folder it leaves empty is
removed then (`reap`, each second on the API's loop), or at the next start."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Callable

from ..fsutil import NotOwn, check_own_folder, fsync_dir, read_text_file
from ..intake.images import PHOTO_SUFFIXES
from ..intake.inbox import safe_stem
from ..intake.raw import RAW_SUFFIXES

log = logging.getLogger("mondrian.api")

PARTIAL = ".upload.part"
_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,10}$")
_TOKEN = re.compile(r"^[0-9a-f]{16}$")
EMPTY_GRACE_S = 60.0  # a folder just made for an upload is empty for a moment before its file is created


# The names each format a photo upload may hold goes by, the usual one first. A client's own suffix is kept when it
# is one of them; otherwise the upload is named after what it holds: `x.mode`, `x.xmp` or `index.html` holding a
# JPEG would be taken for a sidecar or a page in the outbox, and `curl -F image=@-` sends no name at all.
_FORMAT_SUFFIXES = {"JPEG": (".jpg", ".jpeg"), "MPO": (".jpg", ".jpeg", ".mpo"), "PNG": (".png",),
                    # DNG, NEF, CR2, ARW, PEF are TIFFs to Pillow
                    "TIFF": (".tif", ".tiff", *RAW_SUFFIXES), "WEBP": (".webp",), "HEIF": (".heic", ".heif"),
                    "AVIF": (".avif",), "GIF": (".gif",), "BMP": (".bmp",), "JPEG2000": (".jp2", ".j2k", ".jpf"),
                    "PSD": (".psd",), "RAW": RAW_SUFFIXES}


def spool_name(client_name: str | None, fmt: str | None = None) -> str:
    """A safe file name from what the client called its file (never a path: only its last component counts), with
    a suffix that says what it holds (`fmt`, the format found in it)."""
    bare = (client_name or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    if bare.strip("-") == "":  # `-`: curl's name for what it read from its standard input
        bare = ""
    suffix = Path(bare).suffix.lower()
    suffix = suffix if _SUFFIX.match(suffix) else ""
    fits = _FORMAT_SUFFIXES.get(fmt or "")
    if fits is not None and suffix not in fits:
        suffix = "" if fmt == "RAW" else fits[0]  # which maker's raw it is, only LibRaw knows: it reads the bytes
    elif fits is None and suffix not in PHOTO_SUFFIXES:
        suffix = ""
    return safe_stem(bare or "upload") + suffix


TAG_FILE = "spool-tag"  # in var/
_TAG = re.compile(r"^[0-9a-f]{8}$")


def spool_tag(var_dir: Path) -> str:
    """Eight hex digits, made once per var/ folder, that begin the name of every upload folder of this home's spool.
    On a shared ledger a Mac claims only uploads whose path begins with its own tag: two Macs whose homes have the
    same path (one studio account, `~/Pictures/Mondrian` on each) would otherwise each claim the other's uploads by
    path, find nothing in their own spool, and record the photo as gone. A home on a share, whose var/ every Mac
    uses, has one tag: any of them reaches its spool."""
    path = Path(var_dir) / TAG_FILE
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)  # a first start: var/ is made here, as the SQLite ledger makes it
    for _ in range(3):
        try:
            text = read_text_file(path, max_bytes=64).strip()
        except FileNotFoundError:
            text = None
        except OSError:  # a folder, a pipe, a huge file there: not a tag, made anew
            text = ""
        if text is not None and _TAG.match(text):
            return text
        tag = secrets.token_hex(4)
        tmp = path.with_name(f".{TAG_FILE}.{os.getpid()}.{tag}")
        try:
            tmp.write_text(tag + "\n")
            if text is None:
                os.link(tmp, path)  # never replaces: two processes making it at once agree on the first one
            else:
                os.replace(tmp, path)  # not a tag (edited, damaged): made anew
                return tag
        except FileExistsError:
            continue  # another process made it first: read that one
        except OSError:
            return ""  # a var/ that cannot be written (`status` on a read-only home): no daemon spools there
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return ""


def untagged_slots(folder: Path, tag: str) -> list[Path]:
    """Upload folders in this spool that do not begin with its tag: made before folders were tagged (an upgrade
    with uploads queued), or under a tag since lost. They are this Mac's all the same."""
    if not tag:
        return []
    try:
        return [Path(e.path) for e in os.scandir(folder) if _TOKEN.match(e.name) and not e.name.startswith(tag)
                and e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


class Spool:
    def __init__(self, folder: Path, tag: str = ""):
        self.folder = Path(folder)
        self.tag = tag  # `spool_tag`: begins every upload folder's name
        self._real: str | None = None  # where the spool really is, links resolved, as `prepare` found it
        # Folders whose upload is a job: only the worker empties them, and nothing writes into them again, so
        # each goes as soon as it is empty. Touched on the API's event loop only (and by the sweep, before it).
        self._queued: set[Path] = set()

    def prepare(self) -> None:
        """Create the spool; a link or a file in its place is refused (its sweep would delete through it)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        check_own_folder(self.folder)
        self._real = os.path.realpath(self.folder)

    def usable(self) -> None:
        """Raise OSError, saying what to do, unless the spool is still the folder `prepare` made. It is checked at
        every upload because it can change under a running daemon: deleted (made again here), or replaced by a file
        or by a link, through which an upload would be written outside the home."""
        try:
            if os.path.isfile(self.folder) and not os.path.islink(self.folder):
                # check_own_folder's words fit a link or a device; a plain file is "not a regular file" there
                raise NotOwn(f"{self.folder} is a file, where Mondrian keeps its own folder of uploads: move the "
                             f"file elsewhere, and Mondrian makes the folder again")
            check_own_folder(self.folder)
        except FileNotFoundError:
            try:
                # Never its parents: a home on an unplugged drive must not be made again on the startup disk.
                self.folder.mkdir()
            except FileExistsError:
                check_own_folder(self.folder)  # something else appeared there meanwhile
            except FileNotFoundError:
                raise FileNotFoundError(errno.ENOENT, f"{self.folder.parent} is not there any more (deleted, or its "
                                                      f"drive unplugged?): put it back, or restart Mondrian") from None
            else:
                log.warning("the spool %s was deleted while Mondrian ran; it was made again", self.folder)
        if self._real is not None and os.path.realpath(self.folder) != self._real:
            raise NotOwn(f"{self.folder} now leads to {os.path.realpath(self.folder)} (a folder on its path was "
                         f"replaced by a link); Mondrian never writes an upload outside its home. Remove the link "
                         f"and put the folder back")

    def new_slot(self) -> Path:
        """A fresh folder for one upload (and away with folders the worker emptied after their requests ended)."""
        self.usable()
        self._drop_empty()
        while True:
            slot = self.folder / (self.tag + secrets.token_hex(8 - len(self.tag) // 2))
            try:
                slot.mkdir()
                return slot
            except FileExistsError:
                continue

    def _drop_empty(self) -> None:
        now = time.time()
        try:
            slots = [e for e in os.scandir(self.folder) if _TOKEN.match(e.name) and e.is_dir(follow_symlinks=False)]
        except OSError:
            return
        for slot in slots:
            try:
                if now - slot.stat(follow_symlinks=False).st_mtime > EMPTY_GRACE_S:
                    os.rmdir(slot.path)  # only an empty folder goes: one with a photo in it refuses
            except OSError:
                continue

    @staticmethod
    def partial(slot: Path) -> Path:
        return slot / PARTIAL

    @staticmethod
    def commit(slot: Path, name: str) -> Path:
        """The complete upload under its real name, durably (the caller has synced its bytes)."""
        final = slot / name
        os.rename(slot / PARTIAL, final)
        fsync_dir(slot)
        return final

    @staticmethod
    def discard(slot: Path) -> None:
        shutil.rmtree(slot, ignore_errors=True)

    @staticmethod
    def release(slot: Path) -> None:
        """Remove an upload's folder once the worker has moved its photo out (only if empty: never a photo)."""
        try:
            os.rmdir(slot)
        except OSError:
            pass

    def queued(self, slot: Path) -> None:
        """`slot`'s upload is a job now: remove its folder once the worker has moved the photo out."""
        self._queued.add(Path(slot))

    def reap(self) -> None:
        """Remove the folders of queued uploads that the worker has emptied. A photo still there (queued, or failed
        where it lay) keeps its folder: rmdir refuses a folder that is not empty."""
        for slot in list(self._queued):
            try:
                os.rmdir(slot)
            except FileNotFoundError:
                pass
            except OSError:
                continue
            self._queued.discard(slot)

    def sweep(self, has_job: Callable[[Path], bool]) -> int:
        """At start-up, before the API serves: remove uploads that never became jobs, and emptied folders.
        Returns how many uploads were removed."""
        removed = 0
        try:
            check_own_folder(self.folder)
            slots = [e for e in os.scandir(self.folder) if _TOKEN.match(e.name) and e.is_dir(follow_symlinks=False)]
        except OSError:
            return 0
        for slot in slots:
            try:
                entries = list(os.scandir(slot.path))
            except OSError:
                continue
            if any(e.name != PARTIAL and has_job(Path(e.path)) for e in entries):
                self.queued(Path(slot.path))  # queued, or kept where it is by a failure: the ledger's to deal with
                continue
            if entries:
                removed += sum(1 for e in entries if e.name != PARTIAL) or 1
                log.info("removed an upload that was interrupted before it was queued (%s)",
                         ", ".join(e.name for e in entries))
            shutil.rmtree(slot.path, ignore_errors=True)
        return removed
