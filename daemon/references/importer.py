"""`mondrian references import-db`: an original Mondrian database's scored references (its `dimensional_profiles`
table: `advisor_id`, `image_path`, `<dimension>_score` and `<dimension>_comment` for the 8 dimensions) brought in
as Mondrian references: each photo copied into `advisors/<id>/references/` with a curator sidecar (sidecar.py's
format), so the running daemon, `references index` and training read them like any other.

The database is opened read-only (SQLite `mode=ro`); nothing outside the home is changed. Importing is idempotent:
a photo whose bytes are already among the advisor's references is not copied again. Each sidecar is written before
its photo, so a daemon watching the folder never sees the photo without the curator's scores."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

from ..analysis.advisors import ADVISOR_ID, load_advisors, references_dir
from ..analysis.critique import DIMENSIONS, SCORE_MAX, SCORE_MIN
from ..config import Config
from ..fsutil import atomic_write_text, fsync_dir, kind_of, temp_name
from ..intake.inbox import safe_stem
from .indexer import IMAGE_SUFFIXES, reference_files, shown_name
from .sidecar import SIDECAR_SUFFIX, SidecarInvalid, parse_sidecar
from ..hints import mondrian

TABLE = "dimensional_profiles"
# The original's own training query left these out: photos users uploaded for analysis, not the advisor's work.
# The original kept the photos users uploaded for analysis beside the advisors' own, and its training left out paths
# `LIKE '%temp%'` or `'%analyze_image%'`: here a folder or file name that is `temp` or begins so (`temp/`,
# `temp_3f2a.jpg`), or holds `analyze_image`. Not any "temp" inside a word: `temple_at_dawn.jpg`, `contemporary.jpg`
# and `~/Templates/` are an advisor's own work. (Nor `tmp`, which the original never matched: /tmp/… is a place.)
_UPLOAD_PART = re.compile(r"temp(?:[^a-z].*)?|.*analyze_image.*", re.IGNORECASE | re.DOTALL)


def is_upload(image_path: str) -> bool:
    """Whether an original row's image_path is a user's upload rather than the advisor's own photo."""
    return any(_UPLOAD_PART.fullmatch(part) for part in re.split(r"[\\/]", image_path) if part)


class ImportRefused(RuntimeError):
    """The database cannot be imported at all; the message says why and what to do."""


@dataclass
class Outcome:
    row: str  # the row's id (or rowid)
    advisor: str
    image: str  # image_path as the database gives it
    action: str  # imported | present | skipped
    reason: str = ""
    file: str = ""  # where it went, relative to the advisor's references folder


class _NotWritten(OSError):
    """The references folder could not take a photo (a full disk): the import stops there."""


@dataclass
class Summary:
    outcomes: list[Outcome] = field(default_factory=list)
    stopped: str = ""  # why the import stopped before the last row, if it did

    def count(self, action: str) -> int:
        return sum(1 for o in self.outcomes if o.action == action)


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """Read-only; a database in WAL mode in a folder this user cannot write (another account's, a read-only share)
    cannot open its -shm file that way, and is then read as immutable: the original Mondrian is not writing it."""
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    db = sqlite3.connect(uri, uri=True)
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return db
    except sqlite3.OperationalError:
        db.close()
        return sqlite3.connect(uri + "&immutable=1", uri=True)


def open_read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise ImportRefused(f"{path} is not a file; give the path of the original Mondrian's database "
                            f"(e.g. mondrian/mondrian.db)")
    try:
        db = _connect_read_only(path)
        db.row_factory = sqlite3.Row
        # Text as the original stored it, even where it is not UTF-8 (an image_path written from a Latin-1 name): a
        # path keeps its bytes (surrogateescape, as the file system gives names), so one such row is that row's
        # outcome, never "could not be read" for the whole database.
        db.text_factory = os.fsdecode
        found = db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)).fetchone()
    except sqlite3.DatabaseError as exc:
        raise ImportRefused(f"{path} is not a readable SQLite database ({exc})") from None
    if found is None:
        db.close()
        raise ImportRefused(f"{path} has no {TABLE} table: it is not an original Mondrian database (the one whose "
                            f"advisors' scored references `{mondrian()} references import-db` reads)")
    return db


def _score(value: Any, dimension: str) -> int:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise SidecarInvalid(f"the {dimension} score is {value!r}, not a number") from None
    if value is None:
        raise SidecarInvalid(f"the {dimension} score is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not SCORE_MIN <= value <= SCORE_MAX:
        raise SidecarInvalid(f"the {dimension} score is {value!r}; scores run from {SCORE_MIN} to {SCORE_MAX}")
    # The original stored REALs; Mondrian's scores are whole numbers: half up, as rag's anchored scores (round()
    # would make 6.5 a 6 and 7.5 an 8)
    return int(math.floor(value + 0.5))


def profile_of(row: sqlite3.Row) -> dict[str, Any]:
    """The row as a curator sidecar document; raises SidecarInvalid (via sidecar.py's own checks) if it is not one."""
    keys = set(row.keys())
    missing = [d for d in DIMENSIONS if f"{d}_score" not in keys]
    if missing:
        raise SidecarInvalid(f"the table has no {', '.join(f'{d}_score' for d in missing)} column(s)")
    scores = {d: _score(row[f"{d}_score"], d) for d in DIMENSIONS}
    comments = {d: _text(row[f"{d}_comment"]) for d in DIMENSIONS
                if f"{d}_comment" in keys and isinstance(row[f"{d}_comment"], str) and row[f"{d}_comment"].strip()}
    doc: dict[str, Any] = {"scores": scores}
    if comments:
        doc["comments"] = comments
    scores, comments = parse_sidecar(doc, "the row")
    return {"scores": scores, **({"comments": comments} if comments else {})}


def _text(value: str) -> str:
    """Text read from the database as a person may read it: bytes that were not UTF-8 become U+FFFD."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _candidates(image_path: str, db_path: Path) -> list[Path]:
    """Where the row's photo may be: as given if absolute; else beside the database, or from the original project's
    root (its database lived in `mondrian/mondrian.db`, its paths were relative to the project)."""
    try:
        p = Path(image_path).expanduser()
    except RuntimeError:  # `~someone/…` of a user this machine does not have: a relative path like any other
        p = Path(image_path)
    if p.is_absolute():
        return [p]
    here = db_path.resolve().parent
    return [here / p, here.parent / p]


def _not_a_photo(src: Path) -> str | None:
    """Why the file, named like a photo, is none (its header read, not the whole image), or None. A page saved as
    `.jpg` was counted "imported", and `references index`, which the summary advises next, then failed on it."""
    from PIL import Image

    from ..intake.images import PHOTO_SUFFIXES  # its import registers the HEIF/AVIF opener
    from ..intake.raw import RAW_SUFFIXES

    if src.suffix.lower() in RAW_SUFFIXES or src.suffix.lower() not in PHOTO_SUFFIXES:
        return None  # a raw file is read by LibRaw at indexing, which says what is wrong with it
    try:
        with Image.open(src) as img:
            img.size
    except Exception as exc:  # PIL raises several kinds for a file that is not an image
        return (f"{shown_name(src)} is named like a photo but is not one Mondrian can read ({type(exc).__name__}); "
                f"export the photo again, then import again")
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Portfolio:
    """An advisor's references folder and the content already in it (hashed only where sizes match)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._by_size: dict[int, list[Path]] = {}
        for f in reference_files(folder):
            try:
                self._by_size.setdefault(f.stat().st_size, []).append(f)
            except OSError:
                continue
        self._hashes: dict[Path, str] = {}

    def holding(self, size: int, sha: str) -> Path | None:
        for f in self._by_size.get(size, []):
            if f not in self._hashes:
                try:
                    self._hashes[f] = _sha256(f)
                except OSError:
                    continue
            if self._hashes[f] == sha:
                return f
        return None

    def add(self, src: Path, name: str, sidecar: dict[str, Any], size: int, sha: str) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        # A sidecar belongs to every photo of its stem (x.jpg and x.png share x.json): take a stem nobody has.
        stems = {Path(n).stem.lower() for n in os.listdir(self.folder)}
        stem, n = safe_stem(name), 1
        while (stem if n == 1 else f"{stem}-{n}").lower() in stems:
            n += 1
        dest = self.folder / f"{stem if n == 1 else f'{stem}-{n}'}{Path(name).suffix.lower()}"
        atomic_write_text(dest.with_suffix(SIDECAR_SUFFIX), json.dumps(sidecar, indent=2, ensure_ascii=False))
        tmp = dest.with_name(temp_name(dest.name, f"{os.getpid()}.import.tmp"))
        try:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            dest.with_suffix(SIDECAR_SUFFIX).unlink(missing_ok=True)
            raise
        fsync_dir(self.folder)
        self._by_size.setdefault(size, []).append(dest)
        self._hashes[dest] = sha
        return dest


def import_db(cfg: Config, db_path: Path, advisor: str | None = None) -> Summary:
    db = open_read_only(db_path)
    advisors = load_advisors(cfg)
    portfolios: dict[str, Portfolio] = {}
    summary = Summary()
    try:
        query = f"SELECT rowid AS _rowid, * FROM {TABLE}"
        rows: Iterable[sqlite3.Row] = db.execute(query + " ORDER BY rowid")
        if advisor:  # ids as the API and the inbox take them (`Ansel`, `ansel\t`), as `_import_row` reads them
            wanted = advisor.strip().lower()
            rows = (r for r in rows if "advisor_id" in r.keys() and str(r["advisor_id"] or "").strip().lower() == wanted)
        for row in rows:
            try:
                summary.outcomes.append(_import_row(cfg, row, db_path, advisors, portfolios))
            except _NotWritten as exc:  # a full disk: the rows after it would fail the same way
                summary.stopped = str(exc)
                break
    except sqlite3.DatabaseError as exc:
        raise ImportRefused(f"{db_path} could not be read ({exc})") from None
    finally:
        db.close()
    return summary


def _import_row(cfg: Config, row: sqlite3.Row, db_path: Path, advisors: dict, portfolios: dict) -> Outcome:
    keys = set(row.keys())
    row_id = str(row["id"]) if "id" in keys and row["id"] is not None else f"rowid {row['_rowid']}"
    advisor_id = str(row["advisor_id"] or "") if "advisor_id" in keys else ""
    image = str(row["image_path"] or "") if "image_path" in keys else ""
    # the outcome is printed and written as JSON: names that were not UTF-8 are shown with their bytes as \\xff
    if advisor_id not in advisors and advisor_id.strip().lower() in advisors:
        advisor_id = advisor_id.strip().lower()  # `Ansel`: the API, `--advisor` and inbox folders take it too
    out = Outcome(row=shown_name(row_id), advisor=shown_name(advisor_id), image=shown_name(image), action="skipped")
    if not advisor_id.strip():
        out.reason = ("the row names no advisor (its advisor_id is empty or missing): the original database does "
                      "not say whose reference it is, so it is left out")
        return out
    if advisor_id not in advisors and not ADVISOR_ID.match(advisor_id):  # no advisor.toml can give it that id
        out.reason = (f"advisor_id {advisor_id!r} is not an advisor id (lower-case letters, digits, - and _, starting "
                      f"with a letter): the row is left out")
        return out
    if advisor_id not in advisors:
        out.reason = (f"unknown advisor {advisor_id!r}: add advisors/{safe_stem(advisor_id) or 'ID'}/advisor.toml "
                      f"(id, name, prompt), then import again")
        return out
    if not image:
        out.reason = "the row has no image_path"
        return out
    if is_upload(image):
        out.reason = "a photo a user uploaded for analysis (temp/analyze_image path), not the advisor's own work"
        return out
    try:
        sidecar = profile_of(row)
    except SidecarInvalid as exc:
        out.reason = f"bad scores: {exc}"
        return out
    try:
        src = next((c for c in _candidates(image, db_path) if c.is_file()), None)
    except OSError as exc:  # a name too long for this disk, a folder it may not look into: this row's own problem
        out.reason = (f"its image_path cannot be looked up here ({exc.strerror or exc}): the row is left out; put "
                      f"the photo where a shorter path reaches it and correct the row, then import again")
        return out
    there = next((c for c in _candidates(image, db_path) if os.path.lexists(c)), None)
    if src is None and there is not None:  # it is there, but no photo file: saying "not found" would mislead
        try:
            what = kind_of(os.stat(there).st_mode)
        except OSError:
            what = f"a link to {shown_name(os.readlink(there))}, which is not there" if there.is_symlink() \
                else "not readable"
        out.reason = f"{shown_name(there)} is {what}, not a photo file; put the photo itself there, then import again"
        return out
    if src is None:
        out.reason = "image not found (looked " + ", ".join(shown_name(c) for c in _candidates(image, db_path)) + ")"
        return out
    if not src.name.lower().endswith(IMAGE_SUFFIXES):
        out.reason = f"not a photo file type Mondrian reads ({', '.join(IMAGE_SUFFIXES)})"
        return out
    try:
        size = src.stat().st_size
        if size > cfg.max_file_bytes:
            out.reason = f"larger than max_file_mb ({cfg.max_file_mb} MB)"
            return out
        sha = _sha256(src)
    except OSError as exc:  # this photo's own problem: the rows after it are imported still
        out.reason = (f"{shown_name(src)} could not be read ({exc.strerror or exc}): make it readable "
                      f"(`chmod u+r`), then import again")
        return out
    unreadable = _not_a_photo(src)
    if unreadable:
        out.reason = unreadable
        return out
    folder = references_dir(cfg, advisor_id)
    portfolio = portfolios.setdefault(advisor_id, Portfolio(folder))
    there = portfolio.holding(size, sha)
    if there is not None:
        out.action, out.file = "present", str(there.relative_to(folder))
        return out
    try:
        dest = portfolio.add(src, src.name, sidecar, size, sha)
    except OSError as exc:
        if not os.access(src, os.R_OK):  # removed or locked since it was hashed: this row's own problem
            out.reason = f"{shown_name(src)} could not be read ({exc.strerror or exc}); import again"
            return out
        raise _NotWritten(f"could not write into {shown_name(folder)} ({exc.strerror or exc}): free space there (or "
                          f"make it writable), then import again; the photos imported so far stay") from None
    out.action, out.file = "imported", str(dest.relative_to(folder))
    return out
