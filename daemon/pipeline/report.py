"""Write a finished critique to disk: report.json (the contract), report.html, preview/thumb, and the outbox index.

Everything shown in HTML comes from a model or a file name, so it is untrusted: Jinja autoescapes it, URLs
built from file names are percent-encoded, and each page carries a CSP that forbids scripts and any load
from outside its own folder. Pages must open offline straight from disk (no JS, no CDN, no web fonts).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, Sequence
from urllib.parse import quote

import jsonschema
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup, escape
from PIL import Image

from ..analysis.advisors import Advisor
from ..analysis.critique import DIMENSION_LABELS, DIMENSIONS, SCORE_MAX
from ..intake.images import PHOTO_SUFFIXES
from ..intake.inbox import REPORT_FILES
from ..fsutil import atomic_write_bytes, atomic_write_text
from ..resources import templates_dir

if TYPE_CHECKING:
    from ..config import Config
    from ..intake.images import LoadedImage
    from ..ledger import Job
    from ..model.protocol import Runtime

log = logging.getLogger("mondrian.worker")

SCHEMA_PATH: Path = Path(__file__).resolve().parent / "report_schema.json"
TEMPLATES_DIR: Path = templates_dir()

SMOKE_NOTICE = ("These scores come from Mondrian's smoke model: a tiny, randomly initialised network used for "
                "tests and the offline demo. They are not meaningful. Set MONDRIAN_MODEL to a real Qwen2-VL "
                "model for real critiques.")
THUMB_MAX_PX = 320
JPEG_QUALITY = 85

MODE_LABELS = {
    "baseline": "Baseline",
    "rag": "RAG — with portfolio references",
    "lora": "LoRA — advisor-tuned adapter",
}
SOURCE_LABELS = {"sidecar": "set in the photo's sidecar", "default": "the default", "command": "set on the command line"}


class ReportInvalid(ValueError):
    """The report does not satisfy report_schema.json; the message names the field and the problem."""


# --------------------------------------------------------------------------------------------- validation


def _is_rfc3339(value: object) -> bool:
    # jsonschema only checks "date-time" when rfc3339-validator is installed; checking it ourselves keeps
    # validation identical on every machine. RFC 3339 needs the 'T' separator and an explicit offset.
    if not isinstance(value, str):
        return True  # type errors are reported by "type", not twice
    if len(value) < 11 or value[10] not in "Tt":
        return False
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return False
    return dt.tzinfo is not None


@lru_cache(maxsize=1)
def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    checker = jsonschema.FormatChecker(formats=())
    checker.checks("date-time")(_is_rfc3339)
    return jsonschema.Draft202012Validator(schema, format_checker=checker)


def _where(path: Any) -> str:
    parts = [f"[{p}]" if isinstance(p, int) else f".{p}" for p in path]
    return "report" + "".join(parts)


def validate_report(report: dict) -> None:
    """Raise ReportInvalid unless `report` satisfies the committed schema and is strict JSON."""
    errors = sorted(_validator().iter_errors(report), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    if errors:
        lines = [f"{_where(e.absolute_path)}: {e.message}" for e in errors[:8]]
        more = f" (and {len(errors) - 8} more)" if len(errors) > 8 else ""
        raise ReportInvalid("report does not match report_schema.json: " + "; ".join(lines) + more)
    try:
        # NaN/inf pass the schema ("number") but would make report.json unreadable by strict parsers.
        json.dumps(report, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ReportInvalid(f"report is not plain JSON: {exc}") from exc


# ----------------------------------------------------------------------------------------------- helpers


def _code_spans(text: object) -> Markup:
    """Escaped text in which `backticked` commands and settings are shown as code (advice and reasons use them)."""
    parts = str(text or "").split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: show the text as it is
        return Markup(escape(str(text or "")))
    return Markup("").join(escape(p) if i % 2 == 0 else Markup("<code>%s</code>") % p for i, p in enumerate(parts))


# Bidirectional embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069). In a file name or a model's text
# they reorder what follows them on the page: `x\u202egpj.exe` shows as `xexe.jpg`, and in a caption everything after
# the name (its size, "full resolution") came out backwards. Every value a page shows shows them as their code instead.
_BIDI_CONTROLS = re.compile("[\u202a-\u202e\u2066-\u2069]")


def _visible_bidi(text: str) -> str:
    return _BIDI_CONTROLS.sub(lambda m: f"[U+{ord(m.group()):04X}]", text)


def _finalize(value: Any) -> Any:
    """Jinja's last step before escaping each {{ value }}: bidi controls made visible (Markup stays Markup: the
    replacement adds no markup)."""
    if isinstance(value, Markup):
        return Markup(_visible_bidi(str(value)))
    if isinstance(value, str):
        return _visible_bidi(value)
    return value


@lru_cache(maxsize=1)
def _env() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=True,
        undefined=StrictUndefined,  # a template typo should fail the test suite, not print an empty cell
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,  # bundled templates do not change while Mondrian runs: no stat of each at every render
        finalize=_finalize,
    )
    env.filters["code"] = _code_spans
    return env


def _bare_name(name: object) -> str:
    # Reports must never reveal where files live: only the last component is shown. The separators are this
    # system's own, as in the paths the names were taken from: on Linux and macOS a backslash is an ordinary
    # character of a file name (`back\slash.jpg` is one file), and splitting on it showed and linked `slash.jpg`.
    # Names from elsewhere that may be Windows paths (an API upload's client name) are already reduced to a bare
    # name where they come in (daemon/api/spool.py:spool_name).
    text = str(name or "")
    if os.altsep:
        text = text.replace(os.altsep, os.sep)
    return text.rstrip(os.sep).rsplit(os.sep, 1)[-1]


def _relative_href(name: object) -> str | None:
    """A percent-encoded relative URL for a file inside the report folder, or None if it points elsewhere."""
    if not isinstance(name, str) or not name:
        return None
    if PurePosixPath(name).is_absolute() or any(part in ("..", "") for part in name.split("/")):
        return None
    # quote() also encodes ':', so "http://x" or "C:/x" can only ever become a relative path.
    return quote(name, safe="/")


def _original_href(name: object) -> str | None:
    """The link to an original beside the page, only under a photo's own suffix: a file named `x.html`, `x.svg` or
    with no suffix at all is opened (or sniffed) by a browser as a page and would run what it holds."""
    if not isinstance(name, str) or not name.lower().endswith(PHOTO_SUFFIXES):
        return None
    return _relative_href(name)


def _local_time(iso: str) -> tuple[str, datetime | None]:
    try:
        dt = datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        return str(iso), None
    # Pages are rendered on the photographer's own machine, so its local time zone is the one they live in.
    dt = dt.astimezone() if dt.tzinfo else dt
    return dt.strftime("%-d %b %Y, %H:%M"), dt


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _signed(value: float | int | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    if digits == 0:
        value = int(round(value))
        return f"+{value}" if value > 0 else ("±0" if value == 0 else f"−{-value}")
    text = f"{abs(value):.{digits}f}"
    return "±" + text if round(value, digits) == 0 else ("+" if value > 0 else "−") + text


def _timing_label(key: str) -> str:
    base = key[:-2] if key.endswith("_s") else key
    return base.replace("_", " ").strip().capitalize() or key


def _fmt_seconds(value: float) -> str:
    if value < 10:
        return f"{value:.2f} s"
    if value < 120:
        return f"{value:.1f} s"
    return f"{int(value // 60)} min {int(round(value % 60))} s"


# --------------------------------------------------------------------------------------------- the chart

# Geometry of the SVG score chart in viewBox units. An SVG scales as a whole, so one layout cannot suit both a
# laptop and a phone: "wide" puts labels left of the bars, "compact" (shown by CSS on narrow screens) above them.
_LAYOUTS = {
    "wide": {"width": 720, "bar_x": 200, "bar_w": 440, "top": 34, "row_h": 38, "bar_dy": 0, "bar_h": 18},
    "compact": {"width": 340, "bar_x": 6, "bar_w": 296, "top": 30, "row_h": 50, "bar_dy": 20, "bar_h": 14},
}


def _chart(dims: dict[str, Any], portfolio: dict[str, Any] | None, layout: str) -> dict[str, Any]:
    c = _LAYOUTS[layout]
    wide = layout == "wide"
    unit = c["bar_w"] / SCORE_MAX
    x_of = lambda v: round(c["bar_x"] + min(max(v, 0.0), float(SCORE_MAX)) * unit, 2)  # noqa: E731
    rows = []
    for i, name in enumerate(DIMENSIONS):
        score = int(dims[name]["score"])
        top = c["top"] + i * c["row_h"]
        bar_y = top + c["bar_dy"]
        cy = bar_y + c["bar_h"] / 2
        row = {
            "name": name,
            "label": DIMENSION_LABELS.get(name, name),
            "score": score,
            "bar_y": bar_y,
            "cy": cy,
            "bar_w": round(score * unit, 2),
            # wide: label right-aligned in the left column, centred on the bar; compact: on the line above
            "label_x": c["bar_x"] - 10 if wide else c["bar_x"],
            "label_y": cy if wide else top + 12,
            "pf": None,
        }
        stats = portfolio.get(name) if isinstance(portfolio, dict) else None
        mean = _num(stats.get("mean")) if isinstance(stats, dict) else None
        if mean is not None:
            std = abs(_num(stats.get("std")) or 0.0)
            row["pf"] = {
                "mean": mean,
                "std": std,
                "x_mean": x_of(mean),
                "x_lo": x_of(mean - std),
                "x_hi": x_of(mean + std),
                "delta": _signed(score - mean, 1),
            }
        rows.append(row)
    ticks = [{"v": v, "x": x_of(v)} for v in range(0, SCORE_MAX + 1, 2)]
    grid_bottom = rows[-1]["bar_y"] + c["bar_h"] + 6
    return {**c, "layout": layout, "wide": wide, "rows": rows, "ticks": ticks, "height": grid_bottom + 4,
            "grid_bottom": grid_bottom, "value_x": c["bar_x"] + c["bar_w"] + (18 if wide else 10)}


# ----------------------------------------------------------------------------------------------- report


def _references(report: dict) -> list[dict[str, Any]]:
    refs = report.get("references")
    if not isinstance(refs, list):
        return []
    out = []
    for ref in refs:
        if not isinstance(ref, dict):
            continue
        scores = ref.get("scores") if isinstance(ref.get("scores"), dict) else {}
        delta = ref.get("delta") if isinstance(ref.get("delta"), dict) else {}
        sim = _num(ref.get("similarity"))
        dims = []
        for name in DIMENSIONS:
            d = _num(delta.get(name))
            if d is None and _num(scores.get(name)) is not None:
                d = report["dimensions"][name]["score"] - scores[name]  # same convention: this photo − reference
            dims.append({
                "name": name,
                "label": DIMENSION_LABELS.get(name, name),
                "score": scores.get(name) if _num(scores.get(name)) is not None else "–",
                "delta": _signed(d),
                "sign": "pos" if d and d > 0 else ("neg" if d and d < 0 else "zero"),
            })
        out.append({
            "href": _relative_href(ref.get("thumb")),
            "name": _bare_name(ref.get("file") or ref.get("name") or ""),
            "similarity": f"{sim * 100:.0f}%" if sim is not None else "–",
            "comment": str(ref.get("comment") or ""),
            "dims": dims,
        })
    return out


def _earlier(report: dict) -> list[dict[str, Any]]:
    out = []
    for e in report.get("earlier_reports") or []:
        href = e.get("report") if isinstance(e, dict) else None
        # Only a sibling report folder's page: `../<folder>/report.html`, percent-encoded like every other link.
        parts = href.split("/") if isinstance(href, str) else []
        if len(parts) != 3 or parts[0] != ".." or parts[2] != "report.html" or parts[1] in ("", ".", ".."):
            continue
        created_text, _ = _local_time(e.get("created_at", ""))
        out.append({"href": "../" + quote(parts[1], safe="") + "/report.html", "job_id": e.get("job_id"),
                    "advisor": str(e.get("advisor") or ""), "mode": MODE_LABELS.get(e.get("mode"), e.get("mode")),
                    "adapter": e.get("adapter"), "grade": e.get("grade"), "created_text": created_text})
    return out


def render_report_html(report: dict, *, photo_href: str | None = "preview.jpg", original: bool = True) -> str:
    """HTML for one report. `photo_href` is used as a URL as given (relative to report.html); None: no preview is
    left to show. `original=False`: the original is no longer beside the page (not linked)."""
    dims = report["dimensions"]
    portfolio = report.get("portfolio") if isinstance(report.get("portfolio"), dict) else None
    pf_dims = portfolio.get("dimensions") if portfolio and isinstance(portfolio.get("dimensions"), dict) else None
    pf_count = portfolio.get("count") if portfolio else None
    model = report["model"]
    mode = report["mode"]
    photo = report["photo"]
    created_text, _ = _local_time(report.get("created_at", ""))
    chart = _chart(dims, pf_dims, "wide")
    ctx = {
        "title_file": _bare_name(photo.get("file")),
        "photo_href": photo_href,
        # The original lies beside report.html under photo.file (moved in once the report is published).
        "original_href": _original_href(_bare_name(photo.get("file"))) if original else None,
        "original_gone": not original,
        "photo": {
            "file": _bare_name(photo.get("file")),
            "size": f"{photo.get('width')} × {photo.get('height')} px",
            "analysed": (f"{photo['analysed_width']} × {photo['analysed_height']} px"
                         if photo.get("analysed_width") and photo.get("analysed_height") else None),
            "format": photo.get("format"),
            "sha256": str(photo.get("sha256", ""))[:12],
        },
        "advisor": report["advisor"],
        "grade": int(report["overall_grade"]),
        "grade_max": SCORE_MAX,
        "summary": report.get("summary", ""),
        "mode": {
            "requested": mode["requested"],
            "effective": mode["effective"],
            "requested_label": MODE_LABELS.get(mode["requested"], mode["requested"]),
            "effective_label": MODE_LABELS.get(mode["effective"], mode["effective"]),
            "source_label": SOURCE_LABELS.get(mode.get("source"), mode.get("source")),
            "fallbacks": [f for f in mode.get("fallbacks", []) if isinstance(f, dict)],
        },
        "smoke": bool(model.get("smoke")),
        "notice": model.get("notice") or ("These scores come from a random smoke-test model and are not a "
                                          "real critique."),
        "model": {"id": model.get("id", ""), "adapter": model.get("adapter")},
        "chart": chart,
        "chart_compact": _chart(dims, pf_dims, "compact"),
        "portfolio": {"count": pf_count if isinstance(pf_count, int) else None} if pf_dims else None,
        "dimensions": [
            {**row, "comment": dims[row["name"]].get("comment", "")} for row in chart["rows"]
        ],
        "references": _references(report),
        "earlier": _earlier(report),
        "timings": [
            {"label": _timing_label(k), "value": _fmt_seconds(v) if k.endswith("_s") else f"{v:g}"}
            for k, v in report.get("timings", {}).items() if _num(v) is not None
        ],
        "job_id": report.get("job_id"),
        "created_text": created_text,
        "created_iso": report.get("created_at", ""),
    }
    return _env().get_template("report.html").render(**ctx)


def rerender_report_html(folder: Path, report: dict, *, original: bool, preview: bool,
                         earlier: dict[int, str | None] | None = None) -> None:
    """Write a report folder's page again from its report.json, linking the original and showing the preview only
    if they are there (the outbox index calls it when the photographer deleted or moved one of them). `earlier`:
    where each earlier critique's report folder is now (None: gone), over what report.json recorded. Raises
    ReportInvalid for a report.json that no longer satisfies the schema (edited by hand): its page is left alone."""
    validate_report(report)
    if earlier is not None:
        moved = []
        for e in report.get("earlier_reports") or []:
            job = e.get("job_id") if isinstance(e, dict) else None
            if job in earlier and earlier[job] is None:
                continue
            moved.append({**e, "report": f"../{earlier[job]}/report.html"} if job in earlier else e)
        report = {**report, "earlier_reports": moved}
    html = render_report_html(report, photo_href="preview.jpg" if preview else None, original=original)
    atomic_write_text(Path(folder) / "report.html", html, durable=False)


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)  # optimize=True: 3x the time for 2 % fewer bytes
    return buf.getvalue()


def original_name(name: str) -> str:
    """The original's name in its report folder: its own, unless the report's files use it (`thumb.jpg` goes
    in as `thumb-original.jpg`); the report's `photo.file` names it."""
    if not REPORT_FILES.fullmatch(name) and not name.startswith("."):
        return name
    p = Path(name)
    return f"{p.stem.lstrip('.') or 'photo'}-original{p.suffix}"


def write_report_folder(folder: Path, report: dict, preview: Image.Image, *, durable: bool = True) -> dict[str, Path]:
    """Validate, then write preview.jpg, thumb.jpg, report.html and finally report.json, each atomically.

    report.json goes last so that its presence means the folder is complete. `durable=False`: not fsynced yet, for a
    staging folder the caller syncs once (`fsutil.fsync_files`) before renaming it into the outbox.
    """
    validate_report(report)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rgb = preview if preview.mode == "RGB" else preview.convert("RGB")
    thumb = rgb.copy()
    thumb.thumbnail((THUMB_MAX_PX, THUMB_MAX_PX), Image.Resampling.LANCZOS)
    paths = {
        "preview": folder / "preview.jpg",
        "thumb": folder / "thumb.jpg",
        "html": folder / "report.html",
        "json": folder / "report.json",
    }
    html = render_report_html(report)  # render before writing anything, so a template bug leaves no half folder
    atomic_write_bytes(paths["preview"], _jpeg_bytes(rgb), durable=durable)
    atomic_write_bytes(paths["thumb"], _jpeg_bytes(thumb), durable=durable)
    atomic_write_text(paths["html"], html, durable=durable)
    atomic_write_text(paths["json"], json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                      durable=durable)
    return paths


# ------------------------------------------------------------------------------------------------ index


@dataclass
class IndexEntry:
    folder: str  # report folder name relative to outbox, e.g. "IMG_1" or "IMG_1-2"
    file: str  # original photo file name
    advisor_id: str
    advisor_name: str
    mode_requested: str
    mode_effective: str
    grade: int
    created_at: str  # ISO 8601
    smoke: bool
    adapter: str | None = None  # lora: the adapter version used, e.g. "ansel/v0003"
    references: int = 0  # rag: how many portfolio references the report compares with
    thumb: str | None = "thumb.jpg"  # the image the card shows, in the report folder; None: none is left there


@dataclass
class FailureEntry:
    name: str  # the failed file's name in outbox/failed/ (its record is `<name>.error.json`)
    file: str  # the photo's own name
    reason: str
    cause: str  # a key of failures.CAUSES
    title: str
    what_to_do: str  # the next step and where the photo is now (the page)
    next_step: str = ""  # the next step alone (the index's card)
    kind: str = "permanent"
    advisor: str = ""
    failed_at: str = ""  # ISO 8601
    job_id: int | None = None
    photo_at_fault: bool = True

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> "FailureEntry":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in summary.items() if k in known})


def _sort_key(created_at: str) -> float:
    _, dt = _local_time(created_at)
    if dt is None:
        return float("-inf")  # unparseable dates sink to the bottom instead of breaking the page
    return (dt if dt.tzinfo else dt.astimezone()).timestamp()


FAILED_FOLDER = "failed"
FAILURE_PAGE_SUFFIX = ".error.html"


def _index_items(entries: Sequence[IndexEntry], failures: Sequence[FailureEntry]) -> list[dict[str, Any]]:
    items: list[tuple[float, dict[str, Any]]] = []
    for e in entries:
        base = _relative_href(e.folder)
        if base is None:
            continue  # a folder outside the outbox cannot be linked safely
        created_text, _ = _local_time(e.created_at)
        items.append((_sort_key(e.created_at), {
            "kind": "report",
            "folder": e.folder,
            "report_href": f"{base}/report.html",
            "thumb_href": f"{base}/{quote(e.thumb, safe='')}" if isinstance(e.thumb, str) and e.thumb else None,
            "file": _bare_name(e.file),
            "advisor": e.advisor_name or e.advisor_id,
            "mode_effective": e.mode_effective,
            "mode_requested": e.mode_requested,
            "adapter": e.adapter,
            "references": e.references,
            "grade": int(e.grade),
            "created_text": created_text,
            "created_iso": e.created_at,
            "smoke": bool(e.smoke),
        }))
    for f in failures:
        page = _relative_href(_bare_name(f.name) + FAILURE_PAGE_SUFFIX)
        if page is None:
            continue
        failed_text, _ = _local_time(f.failed_at)
        items.append((_sort_key(f.failed_at), {
            "kind": "failure",
            "name": _bare_name(f.name),
            "page_href": f"{FAILED_FOLDER}/{page}",
            "file": _bare_name(f.file),
            "reason": f.reason,
            "cause": f.cause,
            "title": f.title,
            "what_to_do": f.next_step or f.what_to_do,
            "transient": f.kind == "transient",
            "created_text": failed_text,
            "created_iso": f.failed_at,
        }))
    items.sort(key=lambda pair: pair[0], reverse=True)
    return [item for _, item in items]


def render_index_html(entries: Sequence[IndexEntry], failures: Sequence[FailureEntry] = ()) -> str:
    items = _index_items(list(entries), list(failures))
    reports = [i for i in items if i["kind"] == "report"]
    return _env().get_template("index.html").render(
        items=items, entries=reports, failures=[i for i in items if i["kind"] == "failure"],
        grade_max=SCORE_MAX, grades=list(range(SCORE_MAX, -1, -1)), any_smoke=any(i["smoke"] for i in reports))


def write_index(outbox: Path, entries: Sequence[IndexEntry], failures: Sequence[FailureEntry] = ()) -> Path:
    """outbox/index.html listing every report and failure, newest first (sortable by grade, filterable). Not fsynced:
    it is a view of the outbox, rewritten at every start (OutboxIndex.refresh)."""
    path = Path(outbox) / "index.html"
    atomic_write_text(path, render_index_html(entries, failures), durable=False)
    return path


def render_failure_html(f: FailureEntry, *, has_original: bool = True) -> str:
    """The page beside a failure record in outbox/failed/: what failed, why, and what to do next."""
    failed_text, _ = _local_time(f.failed_at)
    name = _bare_name(f.name)
    return _env().get_template("failure.html").render(
        name=name, file=_bare_name(f.file), reason=f.reason, cause=f.cause, title=f.title,
        what_to_do=f.what_to_do, transient=f.kind == "transient", advisor=f.advisor, job_id=f.job_id,
        failed_text=failed_text, failed_iso=f.failed_at, photo_at_fault=f.photo_at_fault,
        original_href=_original_href(name) if has_original else None, has_original=has_original,
        record_href=_relative_href(name + ".error.json"))


# ------------------------------------------------------------------------------------------- assembling


def now_iso(ts: float | None = None) -> str:
    return datetime.fromtimestamp(ts or time.time(), tz=timezone.utc).isoformat(timespec="seconds")


def earlier_report_links(cfg: "Config", jobs: list["Job"], moved: Callable[[], dict[int, str]] | None = None
                         ) -> list[dict[str, Any]]:
    """report.json's `earlier_reports`: the reports of the same bytes made before, each as a link relative to a
    report folder (all of them are folders of the outbox), with what tells them apart. Only those whose folder still
    holds that job's report: the ledger remembers the folder a report was published to, not what the user did with
    it since, and a folder deleted or renamed may hold another report by now (this very photo's new one, published
    under the freed name: a link to the page itself, labelled as the old job)."""
    from .outbox_index import published_report  # here, not above: outbox_index imports this module

    def holds(folder: Path, job_id: int) -> bool:
        return folder.parent == cfg.outbox and published_report(folder / "report.json", job_id) is not None

    links = []
    for j in jobs:
        # Where the ledger published it, else where the outbox index finds it now (`moved`: a folder renamed by
        # hand; asked only then, as it may have to look at the outbox).
        folder = Path(j.output_dir) if j.output_dir and holds(Path(j.output_dir), j.id) else None
        if folder is None and moved is not None and j.id in (where := moved()):
            folder = cfg.outbox / where[j.id] if holds(cfg.outbox / where[j.id], j.id) else None
        if folder is None:
            continue
        links.append({"job_id": j.id, "report": f"../{folder.name}/report.html", "advisor": j.advisor,
                      "mode": j.effective_mode or "baseline", "adapter": j.adapter,
                      "grade": j.grade if j.grade is not None else 0, "created_at": now_iso(j.finished_at)})
    return links


def assemble(runtime: Runtime, job: Job, src: Path, photo: LoadedImage, advisor: Advisor, requested: str,
              source: str, effective: str, fallbacks: list[dict[str, str]], result: Any,
              timings: dict[str, float], *, context: dict[str, Any] | None = None,
              earlier: list[dict[str, Any]] | None = None, original: str | None = None) -> dict[str, Any]:
    """`original`: how the original reaches the report folder (see report_schema.json); by default moved, or for
    a job under keep_originals linked (the publisher says "copied" where a hard link cannot be made)."""
    rt = runtime
    model = {"id": rt.model_id, "adapter": result.adapter, "smoke": bool(rt.is_smoke)}
    if rt.is_smoke:
        model["notice"] = SMOKE_NOTICE
    critique = result.critique
    report: dict[str, Any] = {
        "schema_version": 1,
        "job_id": job.id,
        "photo": {"file": original_name(src.name), "sha256": photo.sha256, "width": photo.width, "height": photo.height,
                  "analysed_width": photo.image.width, "analysed_height": photo.image.height,
                  "format": photo.format, "original": original or ("linked" if job.kept else "moved")},
        "advisor": {"id": advisor.id, "name": advisor.name},
        "mode": {"requested": requested, "effective": effective, "source": source, "fallbacks": fallbacks},
        "model": model,
        "dimensions": critique["dimensions"],
        "overall_grade": critique["overall_grade"],
        "summary": critique["summary"],
        "timings": {k: round(float(v), 4) for k, v in timings.items()},
        "created_at": now_iso(),
    }
    if context is not None:
        report["context"] = context
    if earlier:
        report["earlier_reports"] = earlier
    report.update(result.extras)
    report.update(contract_fields(report))
    return report


def contract_fields(report: dict[str, Any]) -> dict[str, Any]:
    """The original design's names for what the report holds (its `/analyze` answer: `dimensional_analysis`,
    `mode_used`, `advisor_id`, `metadata`), written beside Mondrian's own, so that one parser reads report.json
    and the API's answers alike. File names only, never paths."""
    mode, model = report["mode"], report["model"]
    metadata: dict[str, Any] = {"requested_mode": mode["requested"], "effective_mode": mode["effective"],
                                "mode_source": mode["source"], "fallbacks": mode["fallbacks"],
                                "model": model["id"], "adapter": model["adapter"], "smoke": model["smoke"],
                                "timings": report["timings"]}
    if "profile" in report:
        metadata["user_profile"] = report["profile"]
    if isinstance(report.get("references"), list):
        metadata["similar_images"] = [_bare_name(r.get("file") or r.get("name")) for r in report["references"]
                                      if isinstance(r, dict)]
    return {"dimensional_analysis": report["dimensions"], "mode_used": mode["effective"],
            "advisor_id": report["advisor"]["id"], "metadata": metadata}
