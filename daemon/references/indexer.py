"""An advisor's reference portfolio: the photos in `advisors/<id>/references/`, indexed into the ledger.

Each reference gets a profile, the 8 dimension scores:
- from a sidecar `<stem>.json` next to the photo when a curator wrote one (`source: human`), in any of
  these shapes (comments are optional, any subset of the dimensions):
      {"scores": {"composition": 8, ...}, "comments": {"composition": "...", ...}}
      {"dimensions": {"composition": {"score": 8, "comment": "..."}, ...}}     (a report's shape)
      {"composition": 8, "lighting": 7, ...}                                    (scores only)
- otherwise from the model, with the same pass 1 that rag runs on every photo (`source: model`).
With `embeddings_enabled`, the pooled vision features of the photo are stored too (visual similarity).

Indexing is idempotent by content hash: an unchanged file (same hash, same sidecar, same model) is left
alone, a renamed or copied one reuses its twin's profile, a changed one is indexed again, a removed one
loses its row. Files still being written wait, as in the inbox: a file is taken once its mtime is at least
`quiet_seconds` old and its size and mtime have not changed while the daemon watched.

The daemon indexes between photo jobs on its MLX thread (`ReferenceWatcher.step`, watcher.py); `mondrian
references index` does it on demand (`ReferenceIndexer.sync`). Only the ledger writes the database. The sidecar
is read by sidecar.py (the one parser, training's dataset uses it too), thumbnails by thumbnails.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from ..analysis.advisors import Advisor, load_advisors, references_dir
from ..analysis.critique import DIMENSIONS, profile_schema
from ..config import Config
from ..errors import Interrupted
from ..fsutil import kind_of, read_regular_file, too_large
from ..hints import shell_word
from ..intake.inbox import is_report_file, is_temporary_name
from ..intake.images import PHOTO_SUFFIXES
from ..ledger import Ledger, LedgerUnavailable, Reference
from .sidecar import SidecarInvalid, read_sidecar, sidecar_path
from .thumbnails import thumbnail

if TYPE_CHECKING:
    from ..model.protocol import BatchRequest, Runtime
    from ..model.reuse import EncodedPhoto

log = logging.getLogger("mondrian.references")

IMAGE_SUFFIXES = PHOTO_SUFFIXES
SETTLE_MAX_SECONDS = 300.0  # `references index` waits this long at most for files still being written
PROFILE_MAX_TOKENS = 256  # pass 1 is 8 integers; the schema forces everything else



# --------------------------------------------------------------------------------------- profiles


def reference_profile(row: Reference) -> dict[str, Any]:
    """{"scores": {dim: int}, "comments": {dim: str} | None, "source": "human" | "model"} of a ledger row."""
    scores = row.scores if isinstance(row.scores, dict) else json.loads(row.scores)
    comments = row.comments
    if isinstance(comments, str):
        comments = json.loads(comments)
    return {"scores": {d: int(scores[d]) for d in DIMENSIONS},
            "comments": {d: str(comments[d]) for d in DIMENSIONS if d in comments} if comments else None,
            "source": row.source}


def picture_key(path: str | Path) -> tuple[str, str]:
    """One picture whatever its formats: a camera's RAW+JPEG pair or an export's TIFF+JPEG, side by side under one
    name, are one reference (each alone would fill a retrieval slot, weigh twice in the portfolio, and could land
    in training and its held-out test at once)."""
    p = Path(path)
    return str(p.parent), unicodedata.normalize("NFC", p.stem).casefold()


def counted_references(rows: Iterable[Reference]) -> tuple[list[Reference], dict[str, Reference]]:
    """The references that count: one row per photo, the first by path, so one photo copied under two names, or
    kept in two formats beside each other (`picture_key`), fills one retrieval slot and weighs once in the
    portfolio (training's dataset counts it once too).

    The index keeps a row per file (a rename reuses it; removing one copy must leave the other indexed): it is
    the readers that count photos. Where the copies' sidecars differ, the first path's profile is the one that
    counts, whatever order the rows came in. Returns (the counted rows by path, {path of every other copy: the
    row counted in its place})."""
    counted: list[Reference] = []
    first: dict[Any, Reference] = {}
    twins: dict[str, Reference] = {}
    for row in sorted(rows, key=lambda r: str(r.path)):
        keys = (("sha", row.sha256), ("picture", picture_key(row.path)))
        earlier = first.get(keys[0]) or _same_picture(first.get(keys[1]), row)
        if earlier is None:
            counted.append(row)
            earlier = row
        else:
            twins[str(row.path)] = earlier
        for k in keys:
            first.setdefault(k, earlier)
    return counted, twins


def _same_picture(earlier: Reference | None, row: Reference) -> Reference | None:
    """`earlier` if it and `row` (one name, two formats) are one picture: not when a curator scored the two apart
    (`IMG_1.jpg.json` beside `IMG_1.png.json`: two photos, each with its own sidecar)."""
    if earlier is None:
        return None
    if earlier.source == "human" and row.source == "human" and \
            (earlier.scores != row.scores or (earlier.comments or None) != (row.comments or None)):
        return None
    return earlier


def reference_present(folder: Path, path: str | Path) -> bool:
    """Whether an indexed reference is still there to read, or only away (on a drive not mounted, in a folder that
    cannot be read now): False only once it is known gone, its folder readable and the file not in it. An index
    not brought up to date since (`analyze` with no daemon running) must not retrieve a deleted photo."""
    p = Path(path)
    if os.path.lexists(p):
        return True  # there, or a link to a drive not mounted
    for parent in p.parents:
        if os.path.lexists(parent):
            if os.path.islink(parent) and not os.path.exists(parent):
                return True  # a linked folder whose drive is away
            return not os.access(parent, os.R_OK | os.X_OK)  # a folder that cannot be read now: away, not gone
        if parent == folder:
            break  # the references folder itself is gone: so are its photos
    return False


def reference_comment(comments: dict[str, str] | None, limit: int = 280) -> str:
    """One line from a curator's per-dimension comments, for prompts and reports."""
    if not comments:
        return ""
    text = "; ".join(f"{d.replace('_', ' ')}: {comments[d]}" for d in DIMENSIONS if comments.get(d))
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def extract_profile(runtime: Runtime, cfg: Config, advisor: Advisor, encoded: EncodedPhoto, adapter: Any = None,
                    **limits: Any) -> tuple[dict[str, int], Any]:
    """Pass 1: the photo's 8 scores in the advisor's eyes (schema-constrained, no comments).

    `limits` (cancel=, deadline=) go to generate_json, as `AnalysisContext.limits()` gives them."""
    r = profile_request(advisor, encoded, **limits)
    gen = runtime.generate_json(r.image, r.prompt, r.schema, max_tokens=r.max_tokens, encoded=encoded, adapter=adapter,
                                **limits)
    return profile_of(gen), gen


def profile_request(advisor: Advisor, encoded: EncodedPhoto, **limits: Any) -> BatchRequest:
    """Pass 1 as one request of a batch (`Runtime.generate_json_batch`)."""
    from ..analysis.prompts import profile_prompt
    from ..model.protocol import BatchRequest

    return BatchRequest(encoded.image, profile_prompt(advisor), profile_schema(), PROFILE_MAX_TOKENS,
                        encoded=encoded, **limits)


def profile_of(gen: Any) -> dict[str, int]:
    return {d: int(gen.data[d]) for d in DIMENSIONS}


# ------------------------------------------------------------------------------------- scanning


def reference_files(folder: Path) -> list[Path]:
    """Photos under `folder` (recursively): `scan_references`'s photos."""
    return scan_references(folder).photos


@dataclass
class Scan:
    photos: list[Path] = field(default_factory=list)
    # Places under the folder that could not be looked into now (a linked portfolio on a drive not mounted, a
    # folder Mondrian may not read): (place, why). What was indexed from them is kept until they are back.
    away: list[tuple[Path, str]] = field(default_factory=list)

    def holds_away(self, path: str | Path) -> bool:
        """Whether `path` is one of the places away, or lies in one."""
        p = Path(path)
        return any(p == place or p.is_relative_to(place) for place, _ in self.away)


def scan_references(folder: Path) -> Scan:
    """Photos under `folder` (recursively), skipping hidden and temporary names, and the preview, thumbnail and
    reference images of a report folder copied in (its original is the photo: the rest would count it twice).
    A linked folder is followed, as a linked photo is (`ln -s ~/Portfolio references/portfolio`: an existing
    portfolio, not a copy of it), each real folder once, so a link back up cannot loop.

    A folder that cannot be listed and a link to a place that is not there are not "no photos": an unplugged drive
    or a folder macOS does not let the daemon read would otherwise empty the portfolio in silence (and cost a model
    pass a reference to index again once it is back). They are returned as `away`."""
    scan = Scan()
    if not folder.is_dir():
        return scan
    seen: set[tuple[int, int]] = set()

    def unreadable(exc: OSError) -> None:
        place = Path(exc.filename) if exc.filename else folder
        scan.away.append((place, f"cannot be read ({exc.strerror or exc}): give Mondrian access to it (`chmod u+rx`; "
                                 f"on a Mac, System Settings > Privacy & Security > Files and Folders, or Full "
                                 f"Disk Access); the references indexed from it are kept until it can be read"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError as exc:
            exc.filename = exc.filename or dirpath
            unreadable(exc)
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not is_temporary_name(d))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if is_temporary_name(name):
                continue
            if name.lower().endswith(IMAGE_SUFFIXES):
                if not is_report_file(path):
                    scan.photos.append(path)
            elif os.path.islink(path) and not os.path.exists(path):  # a linked folder whose drive is not mounted
                scan.away.append((path, f"is a link to {_link_target(path)}, which is not there (a drive not "
                                        f"mounted?); the references indexed from it are kept until it is back"))
    return scan


def sidecar_problems(cfg: Config, advisor_id: str) -> list[dict[str, str]]:
    """The advisor's references whose sidecar cannot be used, with the reason (no model, no ledger needed)."""
    folder = references_dir(cfg, advisor_id)
    out = []
    for photo in reference_files(folder):
        sidecar = sidecar_path(photo)
        if sidecar is None:
            continue
        try:
            read_sidecar(sidecar)
        except SidecarInvalid as exc:
            out.append(problem(cfg, advisor_id, photo, str(exc)))
    return out


def problem(cfg: Config, advisor_id: str, photo: Path, reason: str) -> dict[str, str]:
    """A skipped reference as `mondrian status` and `references list` show it."""
    folder = references_dir(cfg, advisor_id)
    if photo == folder:  # the folder itself is the problem
        shown = photo.relative_to(cfg.home) if photo.is_relative_to(cfg.home) else photo
        return {"advisor": advisor_id, "file": shown_name(f"{shown}/"), "reason": reason}
    return {"advisor": advisor_id, "file": shown_name(photo.relative_to(folder) if photo.is_relative_to(folder)
                                                      else photo.name), "reason": reason}


def _sha256(path: Path, timeout_s: float | None = None) -> str:
    return hashlib.sha256(read_regular_file(path, timeout_s=timeout_s)).hexdigest()


def _not_a_regular_file(path: Path) -> str | None:
    """Why `path` (links followed) cannot be a reference, or None if it is a regular file (or has vanished)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        if os.path.islink(path):  # a link whose photo is not there (moved, or on a drive not mounted now)
            return f"this is a link to {_link_target(path)}, which is not there; put the photo itself here, or " \
                   f"mount the drive it is on"
        return None  # vanished while we looked: it is simply no longer a reference
    return None if stat.S_ISREG(mode) else f"this is {kind_of(mode)}, not a photo file; put the photo itself there"


def _link_target(path: Path) -> str:
    try:
        return shown_name(os.readlink(path))
    except OSError:
        return "a place that is gone"


def shown_name(name: str | Path) -> str:
    """A file name for messages and the ledger: a name that is not UTF-8 (possible on Linux) with its stray bytes as
    `\\xe9`, as one piece of text any JSON, database or terminal takes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def not_utf8(folder: Path, photo: Path) -> str | None:
    """Why `photo`'s name cannot be indexed: the index stores names as text, and this one is not UTF-8."""
    try:
        str(photo).encode("utf-8")
        return None
    except UnicodeEncodeError:
        pass
    # The first part of the path that is not UTF-8 is the one to rename: a folder's name first (renaming a photo
    # into a fixed folder that does not exist yet failed). Each stray byte becomes its hex value, so `No\xebl.jpg`
    # and `No\xe8l.jpg` get two names (both became `No_l.jpg`: pasting both overwrote a photo).
    here = folder if photo.is_relative_to(folder) else photo.parent
    for part in (photo.relative_to(here).parts if photo.is_relative_to(here) else (photo.name,)):
        bad = here / part
        try:
            part.encode("utf-8")
        except UnicodeEncodeError:
            fixed = os.fsencode(part).decode("utf-8", "backslashreplace").replace("\\x", "_")
            what = "its folder's name" if bad != photo else "its name"
            return (f"{what} is not valid UTF-8 (it came from a system with another encoding), and Mondrian cannot "
                    f"record it; rename it, e.g. `mv {shell_word(bad)} {shell_word(here / fixed)}`")
        here = bad
    return (f"its path {shell_word(photo)} is not valid UTF-8 (a folder above the references has a name from another "
            f"encoding), and Mondrian cannot record it; rename that folder")


def folder_problem(folder: Path) -> str | None:
    """Why an advisor's references folder cannot hold references (it is a file, or a link to nothing), or None."""
    if os.path.isdir(folder) or not os.path.lexists(folder):
        return None  # a folder, or none yet: nothing to say
    if os.path.islink(folder) and not os.path.exists(folder):
        return (f"{folder} is a link to {_link_target(folder)}, which is not there (a drive not mounted?); "
                f"the references indexed from it are kept until it is back")
    try:
        what = kind_of(os.stat(folder).st_mode)
    except OSError:
        what = "not a folder"
    what = "a file" if what == "not a regular file" else what
    return (f"{folder} is {what}, not a folder; move it away and make {folder.name}/ a folder holding the "
            f"advisor's own photos")


@dataclass
class Work:
    advisor: str
    path: Path
    sha256: str
    reason: str  # new | changed | sidecar | model | embedding
    sidecar: tuple[dict[str, int], dict[str, str] | None] | None  # parsed curator profile, or None
    key: tuple = ()

    @property
    def source(self) -> str:
        return "human" if self.sidecar is not None else "model"


@dataclass
class Plan:
    index: list[Work] = field(default_factory=list)
    remove: list[tuple[str, str]] = field(default_factory=list)  # (advisor, path) rows to delete
    waiting: list[Path] = field(default_factory=list)  # still being written
    errors: list[tuple[str, Path, str]] = field(default_factory=list)  # (advisor, path, reason)
    unchanged: int = 0
    model_rows: int = 0  # rows holding model-derived data (scores or embeddings)

    @property
    def needs_model(self) -> bool:
        return bool(self.index) and any(w.source == "model" for w in self.index)


@dataclass
class Outcome:
    advisor: str
    path: Path
    action: str  # indexed | reused | removed | error
    source: str = ""
    reason: str = ""
    seconds: float = 0.0


@dataclass
class _Seen:
    key: tuple
    since: float  # monotonic time the key was first seen


class ReferenceIndexer:
    """Plans and performs indexing. `runtime_provider()` returns the loaded ModelRuntime (called lazily)."""

    def __init__(self, cfg: Config, ledger: Ledger, runtime_provider: Callable[[], Runtime] | None = None):
        self.cfg = cfg
        self.ledger = ledger
        self.runtime_provider = runtime_provider
        self._runtime: Runtime | None = None
        self._seen: dict[Path, _Seen] = {}
        self._hashes: dict[Path, tuple[tuple, str]] = {}
        self._failed: dict[Path, tuple[tuple, str]] = {}
        self.cancel: threading.Event | None = None  # set: the model pass of the reference in hand stops

    # -- model ------------------------------------------------------------------------------------
    def runtime(self) -> Runtime:
        if self._runtime is None:
            if self.runtime_provider is None:
                raise RuntimeError("indexing these references needs the model, and none was given")
            self._runtime = self.runtime_provider()
        return self._runtime

    @property
    def model_id(self) -> str | None:
        return self._runtime.model_id if self._runtime is not None else None

    def advisors(self, only: Iterable[str] | None = None) -> dict[str, Advisor]:
        known = load_advisors(self.cfg)
        if only is None:
            return known
        return {a: known[a] for a in only if a in known}

    # -- planning (no model) ----------------------------------------------------------------------
    def _key(self, photo: Path, sidecar: Path | None) -> tuple | None:
        try:
            st = photo.stat()
            sst = sidecar.stat() if sidecar is not None else None
        except OSError:
            return None
        # (size, mtime) of the photo and of its sidecar first (the hash cache compares key[:2]), then the ctimes,
        # which any change moves, even a copy that sets the mtime back.
        return (st.st_size, st.st_mtime_ns, sst.st_size if sst else None, sst.st_mtime_ns if sst else None,
                st.st_ctime_ns, sst.st_ctime_ns if sst else None)

    def _settled(self, photo: Path, key: tuple, now: float) -> bool:
        """Unchanged for `quiet_seconds`, by what we saw of it. At first sight an mtime well in the past counts
        as that long still (a curator's existing portfolio is indexed at once); an mtime in the future (a camera
        with a wrong clock, `cp -p`, unzip) says nothing, so the file must then stay the same between two looks.
        It must never keep a file waiting forever."""
        age = now - max(key[1], key[3] or 0) / 1e9
        mono = time.monotonic()
        seen = self._seen.get(photo)
        if seen is None:
            seen = self._seen[photo] = _Seen(key, mono - max(0.0, age))
        elif seen.key != key:  # it changed while we watched: wait for it to be still
            seen = self._seen[photo] = _Seen(key, mono)
        # An empty file is usually a copy that has not started yet: it waits longer, as in the inbox.
        quiet = self.cfg.quiet_seconds if key[0] else max(self.cfg.quiet_seconds * 5, 10.0)
        return mono - seen.since >= quiet

    def plan(self, advisors: Iterable[str] | None = None, *, model_id: str | None = None) -> Plan:
        """What indexing would do now. With `model_id`, rows derived by another model count as stale."""
        plan = Plan()
        now = time.time()
        embeddings = self.cfg.embeddings_enabled
        for advisor_id in sorted(self.advisors(advisors)):
            folder = references_dir(self.cfg, advisor_id)
            rows = {r.path: r for r in self.ledger.references(advisor_id)}
            keep: set[str] = set()
            scan = scan_references(folder)
            listed = scan.photos
            broken = folder_problem(folder)
            if broken:
                plan.errors.append((advisor_id, folder, broken))
                if os.path.islink(folder):  # a drive not mounted: its references come back with it
                    keep.update(rows)
            for place, why in scan.away:
                plan.errors.append((advisor_id, place, why))
            keep.update(p for p in rows if scan.holds_away(p))
            for photo in listed:
                problem = not_utf8(folder, photo) or _not_a_regular_file(photo) or \
                    too_large(photo, self.cfg.max_file_bytes)
                if problem:
                    plan.errors.append((advisor_id, photo, problem))  # a pipe would block the reading thread
                    if os.path.islink(photo) and not os.path.exists(photo):
                        keep.add(str(photo))  # a linked photo on a drive not mounted: back with the drive
                    continue
                sidecar = sidecar_path(photo)
                key = self._key(photo, sidecar)
                if key is None:
                    continue  # vanished while we looked
                spath = str(photo)
                row = rows.get(spath)
                if not self._settled(photo, key, now):
                    plan.waiting.append(photo)
                    keep.add(spath)  # its old profile stays until the new file is complete
                    continue
                failed = self._failed.get(photo)
                if failed and failed[0] == key:
                    plan.errors.append((advisor_id, photo, failed[1]))
                    continue
                try:
                    cached = self._hashes.get(photo)
                    sha = cached[1] if cached and cached[0][:2] == key[:2] else _sha256(
                        photo, self.cfg.job_timeout_seconds)
                    self._hashes[photo] = (key, sha)
                    parsed = read_sidecar(sidecar) if sidecar is not None else None
                except SidecarInvalid as exc:
                    self._failed[photo] = (key, str(exc))
                    plan.errors.append((advisor_id, photo, str(exc)))
                    continue
                except OSError as exc:
                    plan.errors.append((advisor_id, photo, f"could not be read ({exc.strerror or exc})"))
                    continue
                except Exception as exc:  # this reference's own failure: the others are still indexed
                    reason = f"{type(exc).__name__}: {exc}"
                    self._failed[photo] = (key, reason)
                    plan.errors.append((advisor_id, photo, reason))
                    continue
                reason = self._stale(row, sha, parsed, model_id, embeddings)
                if reason:
                    plan.index.append(Work(advisor_id, photo, sha, reason, parsed, key))
                else:
                    plan.unchanged += 1
                keep.add(spath)
                if row is not None and (row.source == "model" or row.embedding is not None):
                    plan.model_rows += 1
            plan.remove += [(advisor_id, p) for p in rows if p not in keep]
            present = set(listed)
            for memo in (self._seen, self._hashes, self._failed):  # forget files that are gone
                for gone in [p for p in memo if p.is_relative_to(folder) and p not in present]:
                    memo.pop(gone, None)
        return plan

    @staticmethod
    def _stale(row: Reference | None, sha: str, parsed: tuple | None, model_id: str | None,
               embeddings: bool) -> str:
        if row is None:
            return "new"
        if row.sha256 != sha:
            return "changed"
        if parsed is not None:
            if row.source != "human" or row.scores != parsed[0] or (row.comments or None) != parsed[1]:
                return "sidecar"
        elif row.source != "model":
            return "sidecar"  # the curator's sidecar was removed: the model derives the profile now
        if model_id is not None:
            if row.source == "model" and row.model_id != model_id:
                return "model"
            if embeddings and (row.embedding is None or row.model_id != model_id):
                return "embedding"
        elif embeddings and row.embedding is None:
            return "embedding"
        return ""

    # -- doing -------------------------------------------------------------------------------------
    def remove(self, plan: Plan, *, keep_twins: bool = False) -> list[Outcome]:
        """Delete the rows of removed files. `keep_twins` keeps, for now, those whose content a pending
        file has (a rename: the new name reuses the old row's profile instead of running the model again)."""
        out = []
        pending = {(w.advisor, w.sha256) for w in plan.index} if keep_twins else set()
        left = []
        for advisor_id, path in plan.remove:
            row = self.ledger.reference_at(advisor_id, path) if pending else None
            if row is not None and (advisor_id, row.sha256) in pending:
                left.append((advisor_id, path))
                continue
            if self.ledger.remove_reference(advisor_id, path):
                log.info("reference removed from %s's portfolio: %s", advisor_id, Path(path).name)
                out.append(Outcome(advisor_id, Path(path), "removed"))
        plan.remove = left
        return out

    def index_one(self, work: Work, advisors: dict[str, Advisor] | None = None) -> Outcome:
        """Index one reference. Runs the model only for what no row with the same content already has."""
        from ..intake.images import load_photo

        started = time.perf_counter()
        try:
            advisors = advisors or self.advisors([work.advisor])
            advisor = advisors[work.advisor]
            scores, comments = work.sidecar if work.sidecar is not None else (None, None)
            # Read and decoded even when no model pass needs its pixels (a curator's sidecar with embeddings off, or
            # a twin's profile): a text file, a truncated JPEG or a decompression bomb named .jpg is no reference,
            # whatever scores its sidecar gives it (rag would anchor critiques to it, training would choke on it).
            # Its hash is taken from the bytes read now, so a file replaced since the plan reuses no other's profile.
            photo = load_photo(work.path, self.cfg.max_pixels, timeout_s=self.cfg.job_timeout_seconds,
                               max_bytes=self.cfg.max_file_bytes)
            work.sha256 = photo.sha256
            need_embedding = self.cfg.embeddings_enabled
            embedding: bytes | None = None
            model_id: str | None = None
            current = self.model_id
            donors = [d for d in self.ledger.references_with_hash(work.advisor, work.sha256)
                      if current is not None and d.model_id == current]
            if scores is None:
                donor = next((d for d in donors if d.source == "model"), None)
                if donor is not None:
                    scores, model_id = dict(donor.scores), current
            if need_embedding:
                donor = next((d for d in donors if d.embedding is not None), None)
                if donor is not None:
                    embedding, model_id = donor.embedding, current
            computed = scores is None or (need_embedding and embedding is None)
            if computed:
                rt = self.runtime()
                encoded = rt.encode(photo.image)
                if scores is None:
                    scores, _ = extract_profile(rt, self.cfg, advisor, encoded, cancel=self.cancel)
                    model_id = rt.model_id
                if need_embedding:
                    embedding = encoded.embedding_bytes()
                    model_id = rt.model_id if embedding is not None else model_id
            self.ledger.upsert_reference(advisor=work.advisor, path=work.path, sha256=work.sha256, scores=scores,
                                         comments=comments, source=work.source, model_id=model_id,
                                         embedding=embedding)
            thumbnail(self.cfg, work.sha256, work.path)
        except (Interrupted, LedgerUnavailable):
            raise  # the daemon is stopping: not the reference's fault, it is indexed next time
        except Exception as exc:  # one bad reference must never stop the others (or the daemon)
            if not os.path.lexists(work.path):  # deleted (or moved away) while it was indexed: not a fault of it
                self._failed.pop(work.path, None)
                self.ledger.remove_reference(work.advisor, work.path)
                log.info("reference %s for %s was removed while it was indexed", work.path.name, work.advisor)
                return Outcome(work.advisor, work.path, "removed", work.source, "gone", time.perf_counter() - started)
            reason = str(exc) or type(exc).__name__
            self._failed[work.path] = (work.key, reason)
            self.ledger.remove_reference(work.advisor, work.path)  # its old profile no longer describes it
            log.warning("reference %s for %s skipped: %s", work.path.name, work.advisor, reason)
            return Outcome(work.advisor, work.path, "error", work.source, reason, time.perf_counter() - started)
        seconds = time.perf_counter() - started
        log.info("reference %s for %s indexed (%s profile, %s, %.1f s)", work.path.name, work.advisor,
                 work.source, work.reason, seconds)
        return Outcome(work.advisor, work.path, "indexed" if computed else "reused", work.source, work.reason,
                       seconds)

    def sync(self, advisors: Iterable[str] | None = None,
             progress: Callable[[Outcome, int, int], None] | None = None,
             on_plan: Callable[[Plan], None] | None = None,
             on_wait: Callable[[list[Path]], None] | None = None) -> tuple[Plan, list[Outcome]]:
        """Bring the index up to date now (for `mondrian references index`). Files still being written (just
        copied in) are waited for, by the inbox's rules, for as long as they keep changing (SETTLE_MAX_SECONDS at
        most): one command, one result, rather than "0 indexed, try later". `on_wait` gets the files still
        awaited at each look, and [] once none is."""
        advisors = list(advisors) if advisors is not None else None
        plan = self.plan(advisors, model_id=self.model_id)
        started = time.monotonic()
        waited = False
        while plan.waiting and time.monotonic() - started < SETTLE_MAX_SECONDS:
            waited = True
            if on_wait is not None:
                on_wait(list(plan.waiting))
            time.sleep(max(0.1, min(1.0, self.cfg.quiet_seconds / 4)))  # often enough to see each change
            plan = self.plan(advisors, model_id=self.model_id)
        if waited and on_wait is not None:
            on_wait(list(plan.waiting))
        if self._runtime is None and self.runtime_provider is not None and \
                (plan.needs_model or plan.model_rows or (self.cfg.embeddings_enabled and plan.index)):
            self.runtime()  # rows depend on the model: compare them with the one configured now
            plan = self.plan(advisors, model_id=self.model_id)
        if on_plan is not None:
            on_plan(plan)
        outcomes = self.remove(plan, keep_twins=True)
        known = self.advisors(advisors)
        for i, work in enumerate(plan.index):
            outcome = self.index_one(work, known)
            outcomes.append(outcome)
            if progress is not None:
                progress(outcome, i + 1, len(plan.index))
        outcomes += self.remove(plan)
        return plan, outcomes


__all__ = ["ReferenceIndexer", "reference_profile", "reference_comment", "counted_references", "picture_key",
           "reference_present", "extract_profile",
           "reference_files", "scan_references", "Scan", "sidecar_problems", "problem", "folder_problem", "shown_name", "Plan", "Work",
           "Outcome"]
