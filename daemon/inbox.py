"""Rules about files in the inbox: which names are photos, who the advisor is, what the sidecar says,
and where a finished photo may land without overwriting anything."""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from .config import MODES

SIDECAR_SUFFIX = ".mode"
SIDECAR_MAX_BYTES = 64
# Names that mean "still being written" or "not a photo at all" (Finder, Office, browsers, rsync).
_TEMP_SUFFIXES = (".part", ".crdownload", ".download", ".tmp", ".partial", ".opdownload", SIDECAR_SUFFIX)
_TEMP_PREFIXES = (".", "~$", "._")


def is_ignored(path: Path, inbox: Path) -> bool:
    """True for hidden/temporary names anywhere under the inbox, and for sidecars (they ride along)."""
    try:
        parts = path.relative_to(inbox).parts
    except ValueError:
        return True
    if not parts:
        return True
    for part in parts:
        low = part.lower()
        if part.startswith(_TEMP_PREFIXES) or low.endswith(_TEMP_SUFFIXES[:-1]):
            return True  # a hidden or in-progress folder hides everything inside it (Safari's .download)
    return parts[-1].lower().endswith(SIDECAR_SUFFIX)


@dataclass(frozen=True)
class Intake:
    advisor: str
    advisor_source: str  # folder | default
    rel_path: str


def classify(path: Path, inbox: Path, known_advisors: set[str], default_advisor: str) -> Intake:
    """`inbox/<advisor_id>/...` selects that advisor; anything else (top level, albums) the default."""
    rel = path.relative_to(inbox)
    if len(rel.parts) > 1 and rel.parts[0] in known_advisors:
        return Intake(rel.parts[0], "folder", str(rel))
    return Intake(default_advisor, "default", str(rel))


class SidecarError(ValueError):
    pass


def sidecar_for(photo: Path) -> Path | None:
    """`IMG_1.jpg` -> `IMG_1.mode` (any case of the suffix), if present."""
    want = photo.stem + SIDECAR_SUFFIX
    exact = photo.with_name(want)
    if os.path.lexists(exact):
        return exact
    try:
        for entry in os.scandir(photo.parent):
            if entry.name.lower() == want.lower():
                return photo.parent / entry.name
    except OSError:
        pass
    return None


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
    raw = sidecar.read_bytes()
    try:
        text = raw.decode("utf-8-sig").strip().lower()
    except UnicodeDecodeError as exc:
        raise SidecarError(f"the sidecar {name} is not text; it must hold one of: {allowed}") from exc
    if not text:
        raise SidecarError(f"the sidecar {name} is empty; write one of: {allowed}")
    if text not in MODES:
        shown = text if len(text) <= 20 and text.isprintable() else text[:20].encode("unicode_escape").decode()
        raise SidecarError(f"the sidecar {name} asks for mode {shown!r}, which is unknown; use one of: {allowed}")
    return text


_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:]+")


def safe_stem(name: str) -> str:
    """A folder name that is safe everywhere (no control characters, no leading dots), still recognisable."""
    stem = unicodedata.normalize("NFC", Path(name).stem)
    stem = _UNSAFE.sub("_", stem).strip(" .") or "photo"
    return stem[:120]


def unique_path(parent: Path, stem: str, suffix: str = "", taken: set[str] = frozenset()) -> Path:
    """parent/stem+suffix, or stem-2, stem-3, ... : never an existing or reserved name."""
    n = 1
    while True:
        name = f"{stem}{suffix}" if n == 1 else f"{stem}-{n}{suffix}"
        candidate = parent / name
        if not os.path.lexists(candidate) and str(candidate) not in taken:
            return candidate
        n += 1
