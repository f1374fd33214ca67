"""Rules about files in the inbox: which names are photos, who the advisor is, what the sidecar says,
and where a finished photo may land without overwriting anything."""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import re
import stat
import time
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..config import MODES
from ..fsutil import companion, files_in, is_folder, read_regular_file

SIDECAR_SUFFIX = ".mode"
SIDECAR_MAX_BYTES = 64
SIDECAR_READ_SECONDS = 30.0
# Names that mean "still being written" or "not a photo at all" (Finder, Office, browsers, rsync), in the inbox
# and in reference folders alike.
# Sync and transfer tools' files in progress too (WinSCP `.filepart`, Resilio `.!sync`, qBittorrent `.!qB`, uTorrent
# `.!ut`, aria2), renamed once complete: taken for photos, they were moved to the outbox under the temporary name and
# the tool's rename then failed.
TEMP_SUFFIXES = (".part", ".crdownload", ".download", ".tmp", ".partial", ".opdownload", ".filepart", ".!sync",
                 ".!qb", ".!ut", ".aria2")
# macOS's safe save (NSFileManager, Preview, Photos' exports) writes `IMG.jpg.sb-1a2b3c4d-QwErTy` and renames it.
SAFE_SAVE = re.compile(r".+\.sb-[0-9a-f]{8}-[A-Za-z0-9]{6}")
# The backup exiftool leaves beside each photo it edits (`IMG_7.jpg_original`), not a photo of its own (critiqued as
# one, it also took `IMG_7/` from the real photo). A file name only: `Wedding_original/` is an album.
EXIFTOOL_BACKUP = re.compile(r".+\.[a-z0-9]{2,5}_original", re.IGNORECASE)
HIDDEN_PREFIXES = (".", "~$", "._")
# Finder's custom folder icon: `Icon` + a carriage return, an empty file that Finder hides, in every album copied from
# a Mac that has one. Never a photo: taken for one, it failed as "the file is empty (0 bytes); copy the photo again".
# Windows Explorer's thumbnail caches and folder settings come with every album copied from (or over a share by) a PC.
SYSTEM_NAMES = frozenset({"icon\r", "thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini"})
# Editors' sidecars: other programs' notes on the photo of the same name (Lightroom and Camera Raw `IMG_1.xmp`,
# darktable `IMG_1.NEF.xmp`, an iPhone's edits `IMG_1.AAE`, Canon's `.THM`, RawTherapee, DxO, ON1, Capture One).
# Never photos: they ride along with their photo, as `.mode` does, and the XMP is merged into Mondrian's.
# An iPhone's Live Photo comes as `IMG_1.HEIC` + `IMG_1.MOV` (Image Capture, AirDrop, a Photos export): its video
# rides along the same way. Taken for a photo, it failed as "not a photo: export it again as JPEG", and its `.AAE`
# went twice, once with each.
LIVE_PHOTO_VIDEO = ".mov"
EDITOR_SIDECARS = (".xmp", ".aae", ".thm", ".pp3", ".dop", ".on1", ".cos", LIVE_PHOTO_VIDEO)


# The files a report folder is made of (rag adds ref-1.jpg, ...), whatever the case (macOS folders ignore it). The
# original goes in beside them under a name that is never one of these (`report.original_name`).
REPORT_FILES = re.compile(r"(preview\.jpg|thumb\.jpg|report\.html|report\.json|ref-\d+\.jpg)", re.IGNORECASE)
REPORT_JSON_MAX_BYTES = 4 << 20


def xmp_sidecar_name(photo_file: str) -> str:
    """Mondrian's XMP beside an original: `IMG_1.jpg` -> `IMG_1.xmp`; an original whose own name that is
    (`IMG_1.XMP`, a JPEG) -> `IMG_1.XMP.xmp`. Shortened to a name the system takes: an original of 252-255 bytes
    with a short suffix (or none) left no room for `.xmp`, and its report could never be written."""
    name = fitted_name(Path(photo_file).stem, ".xmp")
    return fitted_name(photo_file, ".xmp") if name.casefold() == photo_file.casefold() else name


def is_report_file(path: Path) -> bool:
    """One of the files Mondrian wrote into a report folder, in a copy of that folder (dropped back into the inbox
    to critique the photo again, say): its preview and thumbnail are not photos of the user's; its original is. Its
    XMP neither is the photographer's (theirs, kept as `<stem>.original.xmp`, is)."""
    page = REPORT_FILES.fullmatch(path.name)
    if not page and not path.name.lower().endswith(".xmp"):
        return False
    try:  # a FIFO or a huge file named report.json is not a report: read with the inbox's own care
        report = json.loads(read_regular_file(path.parent / "report.json", max_bytes=REPORT_JSON_MAX_BYTES,
                                              timeout_s=1.0))
    except (OSError, ValueError):
        return False
    if not (isinstance(report, dict) and "schema_version" in report and "job_id" in report):
        return False
    original = (report.get("photo") or {}).get("file") if isinstance(report.get("photo"), dict) else None
    return bool(page) or (isinstance(original, str) and same_name(path.name, xmp_sidecar_name(original)))


def is_temporary_name(name: str) -> bool:
    """A hidden or in-progress name: a file still being written, or one no person put there as a photo."""
    return (name.startswith(HIDDEN_PREFIXES) or name.lower().endswith(TEMP_SUFFIXES) or name.lower() in SYSTEM_NAMES
            or EXIFTOOL_BACKUP.fullmatch(name) is not None or SAFE_SAVE.fullmatch(name) is not None)


def is_ignored(path: Path, inbox: Path) -> bool:
    """True for hidden/temporary names anywhere under the inbox, for sidecars (they ride along) and for the files
    of a report folder copied back in. A folder named like a sidecar (`x.mode/`) is not one: its photos are ordinary
    photos."""
    try:
        parts = path.relative_to(inbox).parts
    except ValueError:
        return True
    if not parts:
        return True
    if any(is_temporary_name(part) for part in parts):
        return True  # a hidden or in-progress folder hides everything inside it (Safari's .download)
    if is_report_file(path):
        return True  # a copy of a report folder: only its original is a photo to critique
    return parts[-1].lower().endswith((SIDECAR_SUFFIX, *EDITOR_SIDECARS)) and not is_folder(path)


def editor_sidecars(photo: Path) -> list[Path]:
    """The editors' sidecars of `photo` in its folder: `IMG_1.xmp` or `IMG_1.NEF.xmp` for `IMG_1.NEF`, any case of
    the suffix. Found by one listing of the folder; works after the photo itself has moved (a resumed move)."""
    try:
        names = [e.name for e in os.scandir(photo.parent) if not e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
    # Paired as fsutil.companion pairs a `.mode`: one Unicode form (a Mac may spell `é` decomposed), and any case
    # (`img_7.xmp` for `IMG_7.JPG`) unless another file has exactly the sidecar's stem: then it is that one's.
    nfc = lambda n: unicodedata.normalize("NFC", n)  # noqa: E731
    mine = {nfc(photo.stem), nfc(photo.name)}
    if is_report_file(photo.parent / "report.json"):
        # A report folder dropped back in: the photographer's own XMP is the one kept as `<stem>.original.xmp`
        # (Mondrian's `<stem>.xmp` beside it is a page of the old report, like its preview).
        mine |= {f"{m}.original" for m in mine}
    not_sidecars = [n for n in names if n != photo.name and os.path.splitext(n)[1].lower() not in EDITOR_SIDECARS]
    others = {nfc(os.path.splitext(n)[0]) for n in not_sidecars}
    # Exactly another file's stem or name, in the other Unicode form than this photo's: that file's sidecar.
    owned = {os.path.splitext(n)[0] for n in not_sidecars} | set(not_sidecars)
    found = []
    for name in sorted(names):
        suffix = os.path.splitext(name)[1]
        if suffix.lower() not in EDITOR_SIDECARS or name == photo.name:  # a `.mov` failed as a photo is no sidecar
            continue                                                       # of itself
        raw = name[: -len(suffix)]
        base = nfc(raw)
        if raw in owned and raw not in (photo.stem, photo.name):
            continue
        if base in mine or (base.lower() in {m.lower() for m in mine} and base not in others):
            if not is_report_file(photo.parent / name):
                found.append(photo.parent / name)
    return found


STRAY_SIDECAR_SECONDS = 60.0  # a sidecar may arrive before its photo: only one alone for longer is called stray


def stray_sidecars(inbox: Path, older_than_s: float = STRAY_SIDECAR_SECONDS, limit: int = 20) -> list[str]:
    """Sidecars (`IMG_9.mode`, `IMG_9.xmp`) alone in the inbox for more than `older_than_s` (by ctime, the system's
    clock): saved after their photo was taken in, or left behind by a photo removed. Nothing uses them, and they
    would sit there unexplained (`mondrian status` names them). Inbox-relative paths, at most `limit`."""
    def key(name: str) -> str:  # names compared as fsutil.companion pairs them: any case, one Unicode form
        return unicodedata.normalize("NFC", name).lower()

    now = time.time()
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(inbox):
        folder = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not is_ignored(folder / d, inbox))
        photos = [n for n in filenames if not is_temporary_name(n) and not is_ignored(folder / n, inbox)]
        taken = {key(Path(n).stem) for n in photos} | {key(n) for n in photos}
        for name in sorted(filenames):
            suffix = os.path.splitext(name)[1].lower()
            if suffix not in (SIDECAR_SUFFIX, *EDITOR_SIDECARS) or is_temporary_name(name):
                continue
            if key(name[: -len(suffix)]) in taken or is_report_file(folder / name):  # an old report's own XMP
                continue
            try:
                st = os.lstat(folder / name)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and now - st.st_ctime > older_than_s:
                found.append(str((folder / name).relative_to(inbox)))
                if len(found) >= limit:
                    return found
    return found


def inbox_files(inbox: Path, limit: int) -> tuple[list[tuple[Path, os.stat_result]], bool]:
    """The files in the inbox that the watcher would take in (not hidden, temporary, sidecars or an old report's
    pages), at most `limit`, with their lstat; and whether there were more. What `status` compares with the ledger
    to tell photos sitting unqueued (no daemon running, a locked ledger) from an empty inbox."""
    found: list[tuple[Path, os.stat_result]] = []
    for dirpath, dirnames, filenames in os.walk(inbox):
        folder = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not is_ignored(folder / d, inbox))
        for name in sorted(filenames):
            path = folder / name
            if is_ignored(path, inbox):
                continue
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if len(found) >= limit:
                return found, True
            found.append((path, st))
    return found, False


def stale_downloads(inbox: Path, older_than_s: float, limit: int = 5) -> list[tuple[str, float]]:
    """Unfinished downloads and copies (`x.jpg.crdownload`, `x.jpg.part`) left unchanged in the inbox for over
    `older_than_s`: Mondrian waits for them to be renamed to their real names, which a failed download never is, so
    without a word in `status` they would sit there unseen for good. (name relative to the inbox, age in seconds)"""
    found: list[tuple[str, float]] = []
    now = time.time()
    for dirpath, dirnames, filenames in os.walk(inbox):
        folder = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(HIDDEN_PREFIXES))
        for name in sorted(filenames):
            if name.startswith(HIDDEN_PREFIXES) or not name.lower().endswith(TEMP_SUFFIXES):
                continue
            try:
                age = now - os.lstat(folder / name).st_mtime
            except OSError:
                continue
            if age > older_than_s:
                found.append(((folder / name).relative_to(inbox).as_posix(), age))
                if len(found) >= limit:
                    return found
    return found


@dataclass(frozen=True)
class Intake:
    advisor: str
    advisor_source: str  # folder | default
    rel_path: str


_PERSON_NAME = re.compile(r"[^\W_](?:[\w' -]*[^\W_])?")


def classify(path: Path, inbox: Path, folders: Mapping[str, str], default_advisor: str) -> Intake:
    """`inbox/<advisor_id>/...` selects that advisor, whatever the case of the folder's name (`Cartier/`, as
    people type it; ids are lowercase), as does a folder named as `folders` maps (an advisor's display name:
    `advisor_folders`); anything else (top level, albums) the default."""
    rel = path.relative_to(inbox)
    if len(rel.parts) > 1:
        from ..analysis.advisors import suggested_id

        by_name = {unicodedata.normalize("NFC", a).casefold(): advisor for a, advisor in folders.items()}
        folder = unicodedata.normalize("NFC", rel.parts[0]).casefold()
        # `inbox/Claude Monet/` is claude-monet's, as a person names the folder for the advisor they mean: a name of
        # words (letters, digits, spaces, - ' _) only; `ansel..` or `ansel ` are no advisor's name but odd folders
        person = _PERSON_NAME.fullmatch(rel.parts[0]) is not None
        for name in (folder, suggested_id(rel.parts[0]) if person else None):
            if name in by_name:
                return Intake(by_name[name], "folder", str(rel))
    return Intake(default_advisor, "default", str(rel))


class SidecarError(ValueError):
    pass


def sidecar_for(photo: Path) -> Path | None:
    """`IMG_1.jpg` -> `IMG_1.jpg.mode`, named after the whole file as editors name their XMP (`IMG_1.NEF.xmp`), if
    present: it is that photo's alone, so it wins over `IMG_1.mode` (any case of the suffix), which speaks for
    every photo of the stem; never a folder."""
    for whole in (True, False):
        exact = photo.with_name((photo.name if whole else photo.stem) + SIDECAR_SUFFIX)
        if os.path.lexists(exact) and not os.path.isdir(exact):
            return exact
    names = files_in(photo.parent)  # listed once for both spellings
    return (companion(photo, SIDECAR_SUFFIX, whole=True, names=names)
            or companion(photo, SIDECAR_SUFFIX, names=names))


def _decode_sidecar(raw: bytes) -> str:
    """UTF-8 (with or without a BOM), or UTF-16 when a BOM says so: TextEdit and Windows' Notepad save that."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16")
    return raw.decode("utf-8-sig")


def read_sidecar(sidecar: Path) -> str:
    allowed = ", ".join(MODES)
    name = sidecar.name
    if sidecar.is_symlink() or not sidecar.is_file():
        raise SidecarError(f"the sidecar {name} is not a plain file; it must be a small text file holding one "
                           f"of: {allowed}")
    size = sidecar.stat().st_size
    if size > SIDECAR_MAX_BYTES:
        raise SidecarError(f"the sidecar {name} is {size} bytes, too large for a mode; it must hold only one "
                           f"of: {allowed}")
    try:
        raw = read_regular_file(sidecar, max_bytes=SIDECAR_MAX_BYTES, timeout_s=SIDECAR_READ_SECONDS)
    except OSError as exc:  # swapped for a pipe or a huge file since the checks above, or unreadable
        raise SidecarError(f"the sidecar {name} could not be read ({exc}); it must be a small text file holding "
                           f"one of: {allowed}") from exc
    try:
        text = _decode_sidecar(raw).strip().lower()
    except UnicodeDecodeError as exc:
        raise SidecarError(f"the sidecar {name} is not text; it must hold one of: {allowed}") from exc
    if not text:
        raise SidecarError(f"the sidecar {name} is empty; write one of: {allowed}")
    if text not in MODES:
        # Escaped once (a line break shows as \n), then quoted as it is: repr would escape the escapes again.
        shown = text if len(text) <= 20 and text.isprintable() else text[:20].encode("unicode_escape").decode()
        if len(text.splitlines()) > 1:
            raise SidecarError(f"the sidecar {name} holds more than one line ('{shown}'); it must hold only one of: "
                               f"{allowed}")
        raise SidecarError(f"the sidecar {name} asks for mode '{shown}', which is unknown; use one of: {allowed}")
    return text


_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:]+")
NAME_MAX_BYTES = 255  # one path component (ext4, APFS, most others)
STEM_MAX_BYTES = 120
# Records written beside a name reserved in failed/ or duplicates/ (`x.jpg.error.json`): that name is free only
# if its records are too (else a photo named `x.jpg.error.json` and x.jpg's own record would overwrite each
# other), and it must leave room for them within NAME_MAX_BYTES.
RECORD_SUFFIXES = (".error.json", ".error.html", ".duplicate.json")  # .error.html: the failure page
# The outbox's own entries, which no report folder may take (compared without case, as on macOS).
OUTBOX_RESERVED = frozenset({"duplicates", "failed", "index.html", ".staging"})


def truncate_utf8(text: str, max_bytes: int) -> str:
    """The longest start of `text` that fits in `max_bytes` of UTF-8, never cutting a character in half."""
    return text.encode("utf-8", "surrogateescape")[:max(0, max_bytes)].decode("utf-8", "ignore")


def safe_stem(name: str) -> str:
    """A folder name that is safe everywhere (no control characters, no leading dots), still recognisable."""
    stem = unicodedata.normalize("NFC", Path(name).stem)
    stem = _UNSAFE.sub("_", stem).strip(" .") or "photo"
    return truncate_utf8(stem, STEM_MAX_BYTES).rstrip(" .") or "photo"


def _fitted(stem: str, tail: str, room: int) -> str:
    """stem + tail in at most `room` bytes: the stem is shortened first; an absurdly long suffix loses its end."""
    stem_room = room - len(tail.encode("utf-8", "surrogateescape"))
    if stem_room < min(len(stem.encode("utf-8", "surrogateescape")), 16):
        stem_room = min(len(stem.encode("utf-8", "surrogateescape")), room // 2)
        tail = truncate_utf8(tail, room - stem_room)
    return truncate_utf8(stem, stem_room) + tail


def fitted_name(stem: str, tail: str) -> str:
    """stem + tail as one file name the system takes (NAME_MAX_BYTES), the stem shortened if it must be."""
    return _fitted(stem, tail, NAME_MAX_BYTES)


def same_name(a: str, b: str) -> bool:
    """Two names a Mac takes for one: any case, either Unicode form."""
    return unicodedata.normalize("NFC", a).lower() == unicodedata.normalize("NFC", b).lower()


def unique_path(parent: Path, stem: str, suffix: str = "", taken: set[str] = frozenset(), *,
                reserved: frozenset[str] = frozenset(), companions: tuple[str, ...] = (),
                as_a_mac_sees: bool = False) -> Path:
    """parent/stem+suffix, or stem-2, stem-3, ... : never an existing, taken or `reserved` name, nor one whose
    `companions` (records written beside it, `name` + each) exist; short enough that those records fit too.
    `as_a_mac_sees`: nor a name that a file there has in another case or Unicode form (`failed/` on Linux holding
    `IMG_5.JPG` and `img_5.jpg` is one file once synced to a Mac, or copied to an exFAT disk)."""
    room = NAME_MAX_BYTES - max((len(c.encode()) for c in companions), default=0)
    # Casefolded: on a Mac (and on the SMB share a studio's Macs publish to) `IMG_1` and `img_1` are one folder.
    taken = {t.casefold() for t in taken}
    present: set[str] = set()
    if as_a_mac_sees:
        with contextlib.suppress(OSError):
            present = {_mac_name(n) for n in os.listdir(parent)}
    n = 1
    while True:
        name = _fitted(stem, suffix if n == 1 else f"-{n}{suffix}", room)
        candidate = parent / name
        if (name.lower() not in reserved and str(candidate).casefold() not in taken
                and not any(os.path.lexists(f"{candidate}{c}") or _mac_name(name + c) in present
                            for c in ("", *companions))):
            return candidate
        n += 1


def _mac_name(name: str) -> str:
    return unicodedata.normalize("NFD", name).casefold()
