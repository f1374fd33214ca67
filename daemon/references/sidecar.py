"""The curator's sidecar: `<stem>.json` next to a reference photo, with the 8 scores a person gave it.

The one parser of that file, for the RAG index and for training's dataset alike. Accepted shapes (comments are
optional, any subset of the dimensions; `summary` and `overall_grade` are optional at the top level):
    {"scores": {"composition": 8, ...}, "comments": {"composition": "...", ...}}
    {"dimensions": {"composition": {"score": 8, "comment": "..."}, ...}}     (a report's shape)
    {"composition": 8, "lighting": 7, ...}                                    (scores only)
Scores are whole numbers from SCORE_MIN to SCORE_MAX: anything else (7.5, "8", true, NaN) makes the sidecar
invalid, with a message saying what to fix, rather than being rounded into a score the curator did not give.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..analysis.critique import DIMENSIONS, SCORE_MAX, SCORE_MIN
from ..fsutil import NotReadable, companion, files_in, is_folder, read_regular_file

SIDECAR_SUFFIX = ".json"
SIDECAR_MAX_BYTES = 256 * 1024
SIDECAR_READ_SECONDS = 30.0
COMMENT_MAX_CHARS = 2000
TOP_LEVEL_EXTRAS = ("summary", "overall_grade", "grade")  # optional in every shape (parse_profile)


class SidecarInvalid(ValueError):
    """A reference's sidecar cannot be used; the message says what to fix."""


def _brief(value: Any, limit: int = 40) -> str:
    """`value` as a message quotes it: a 400-digit number or a whole nested object is cut short."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** limit:
        return "a number of more than 40 digits"
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (list, str, type(None))) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _score(value: Any, where: str) -> int:
    # The range check comes first: NaN and infinity (JSON allows both) fail it instead of reaching int().
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not SCORE_MIN <= value <= SCORE_MAX \
            or value != int(value):
        raise SidecarInvalid(f"{where} is {_brief(value)}; scores are whole numbers from {SCORE_MIN} to {SCORE_MAX}")
    return int(value)


def parse_sidecar(data: Any, name: str = "the sidecar") -> tuple[dict[str, int], dict[str, str] | None]:
    """(scores, comments) from a sidecar document; raises SidecarInvalid naming the problem."""
    if not isinstance(data, dict):
        raise SidecarInvalid(f"{name} must hold a JSON object with the 8 scores")
    raw_comments: Any = None
    for key, what in (("scores", "an object of dimension -> score"), ("dimensions", "an object of dimension -> "
                                                                                 "{\"score\": …, \"comment\": …}")):
        other = "dimensions" if key == "scores" else "scores"  # the other shape, if the sidecar has it, is read
        if key in data and not isinstance(data[key], dict) and not isinstance(data.get(other), dict):
            raise SidecarInvalid(f"{name}: {key} must be {what}, not {_brief(data[key])}")
    if isinstance(data.get("dimensions"), dict):
        dims = data["dimensions"]
        raw_scores, raw_comments = {}, {}
        for d, v in dims.items():
            if not isinstance(v, dict):
                raise SidecarInvalid(f"{name}: dimensions.{d} must be an object with a score")
            if "score" in v:
                raw_scores[d] = v["score"]
            if v.get("comment") is not None:
                raw_comments[d] = v["comment"]
    elif isinstance(data.get("scores"), dict):
        raw_scores, raw_comments = data["scores"], data.get("comments")
    else:  # flat: the scores at the top level, beside the optional summary and grade
        raw_scores = {k: v for k, v in data.items() if k not in TOP_LEVEL_EXTRAS}
    unknown = sorted(set(raw_scores) - set(DIMENSIONS))
    if unknown:
        raise SidecarInvalid(f"{name} names unknown dimensions {', '.join(unknown)}; use {', '.join(DIMENSIONS)}")
    missing = [d for d in DIMENSIONS if d not in raw_scores]
    if missing:
        raise SidecarInvalid(f"{name} lacks scores for {', '.join(missing)}; give all 8 dimensions")
    scores = {d: _score(raw_scores[d], f"{name}: the {d} score") for d in DIMENSIONS}
    comments: dict[str, str] | None = None
    if raw_comments:
        if not isinstance(raw_comments, dict):
            raise SidecarInvalid(f"{name}: comments must be an object of dimension -> text")
        unknown = sorted(set(raw_comments) - set(DIMENSIONS))
        if unknown:
            raise SidecarInvalid(f"{name}: comments name unknown dimensions {', '.join(unknown)}")
        comments = {}
        for d in DIMENSIONS:
            text = raw_comments.get(d)
            if text is None:
                continue
            if not isinstance(text, str):
                raise SidecarInvalid(f"{name}: the {d} comment must be text")
            text = " ".join(text.split())[:COMMENT_MAX_CHARS]
            if text:
                comments[d] = text
        comments = comments or None
    return scores, comments


@dataclass(frozen=True)
class CuratorProfile:
    """Everything a sidecar says about its photo."""

    scores: dict[str, int]
    comments: dict[str, str] | None
    summary: str | None = None
    overall_grade: int | None = None


def parse_profile(data: Any, name: str = "the sidecar") -> CuratorProfile:
    """The scores and comments (strict: see `parse_sidecar`), and the optional summary and grade, which are left
    out when they are not text / not a whole number in range (they never make the sidecar invalid)."""
    scores, comments = parse_sidecar(data, name)
    summary = data.get("summary")
    summary = (summary.strip() or None) if isinstance(summary, str) else None
    grade = data.get("overall_grade", data.get("grade"))
    try:
        grade = _score(grade, "")
    except SidecarInvalid:
        grade = None
    return CuratorProfile(scores, comments, summary, grade)


class _Repeated(ValueError):
    pass


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are each given once: `"lighting": 4, …, "lighting": 9` took the last in silence."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _Repeated(key)
        seen[key] = value
    return seen


def read_profile(path: Path) -> CuratorProfile:
    """`parse_profile` of the file at `path` (read without ever blocking); raises SidecarInvalid."""
    try:
        size = path.stat().st_size
        if size > SIDECAR_MAX_BYTES:
            raise SidecarInvalid(f"{path.name} is {size} bytes; a reference sidecar holds only scores and comments")
        data = json.loads(read_regular_file(path, max_bytes=SIDECAR_MAX_BYTES,
                                            timeout_s=SIDECAR_READ_SECONDS).decode("utf-8-sig"),
                          object_pairs_hook=_no_repeats)
    except SidecarInvalid:
        raise
    except _Repeated as exc:
        raise SidecarInvalid(f"{path.name} gives {exc.args[0]!r} twice: give each once") from None
    except RecursionError:
        raise SidecarInvalid(f"{path.name} nests too deeply to be a reference sidecar; it holds only scores "
                             f"and comments") from None
    except NotReadable as exc:  # a pipe, a device: not a sidecar (the reader's own advice is about photos)
        what = str(exc).split(",")[0].removeprefix("this is ") if str(exc).startswith("this is ") else str(exc)
        raise SidecarInvalid(f"{path.name} cannot be read as a sidecar ({what}); the sidecar must be a plain JSON "
                             f"file") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SidecarInvalid(f"{path.name} is not readable JSON ({exc})") from exc
    return parse_profile(data, path.name)


def read_sidecar(path: Path) -> tuple[dict[str, int], dict[str, str] | None]:
    """(scores, comments) of the sidecar at `path`; raises SidecarInvalid naming the problem."""
    profile = read_profile(path)
    return profile.scores, profile.comments


def sidecar_path(photo: Path) -> Path | None:
    """The photo's sidecar, if there is one: `IMG_1.jpg.json` (the whole name, as darktable and digiKam name theirs:
    this photo's alone), else `IMG_1.json` (any case of the suffix; shared by IMG_1.jpg and IMG_1.png)."""
    # Looked up exactly first: asked for every reference at every rescan, a listing of the folder each time
    # (companion's any-case, any-Unicode-form search) made a rescan of a 1,000-photo folder take seconds.
    for exact in (photo.with_name(photo.name + SIDECAR_SUFFIX), photo.with_name(photo.stem + SIDECAR_SUFFIX)):
        if os.path.lexists(exact) and not is_folder(exact):
            return exact
    names = files_in(photo.parent)  # listed once for both spellings
    return (companion(photo, SIDECAR_SUFFIX, whole=True, names=names)
            or companion(photo, SIDECAR_SUFFIX, names=names))


__all__ = ["SidecarInvalid", "CuratorProfile", "parse_sidecar", "parse_profile", "read_profile", "read_sidecar",
           "sidecar_path", "SIDECAR_SUFFIX"]
