"""An advisor's training set: their indexed references as chat rows (photo + the report they would write).

Source: the reference profiles the RAG index keeps in the ledger (`Ledger.references(advisor)`). A
curator's sidecar next to the photo (`<stem>.json`, the advisor's own scores and comments) wins over a
model-derived profile. Each reference becomes a row whose user turn is exactly what the lora strategy
sends at inference (same prompt, same pixel cap) and whose assistant turn is the report JSON in the
layout the schema-constrained decoder produces, so the model learns the very tokens it will emit.

Only references the curator scored (a sidecar) become training targets: a reference the model scored
itself would teach the adapter the base model's own opinion. `use_model_scores` (a named option) lets
them in. Where the curator wrote no comment the target says "—": no template text is put in the
advisor's mouth.

Small portfolios are augmented (crop 90-100%, horizontal flip unless the advisor disables it,
+-0.2 EV exposure, +-5 degree rotation; several variants per reference, seeded by the photo's hash so
a rebuild is identical). Three splits, fixed by content hash (a photo's place in the hash space decides,
whatever else is added): `test` (the lowest `holdout_fraction`: promotion and every reported metric;
never seen by training), `validation` (the next `validation_fraction`: early stopping and the choice of
checkpoint), and `train`. When too few fall in a split, the next hashes make up its minimum (2 test,
1 validation, for portfolios large enough). Validation and test rows are never augmented.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from PIL import Image

from daemon.analysis.advisors import Advisor, references_dir
from daemon.analysis.critique import DIMENSIONS, JSON_LAYOUT
from daemon.analysis.prompts import critique_prompt
from daemon.config import Config
from daemon.intake.images import ImageRejected, fit_size, load_photo
from daemon.references.sidecar import SidecarInvalid, parse_sidecar
from daemon.hints import mondrian

log = logging.getLogger("mondrian.dataset")

MIN_REFERENCES = 3  # fewer cannot give a training, a validation and a test photo
HOLDOUT_MIN = 2  # test photos, when the portfolio allows
VALIDATION_MIN = 1
NO_COMMENT = "—"  # the curator wrote nothing: say nothing in their name (the schema needs one character)


class DatasetError(RuntimeError):
    """The references cannot make a training set; the message says what to add or fix."""


@dataclass
class Reference:
    path: str
    sha256: str
    scores: dict[str, int]
    source: str  # human | model
    comments: dict[str, str] = field(default_factory=dict)
    summary: str | None = None
    overall_grade: int | None = None
    model_id: str | None = None

    def key(self) -> str:
        return "|".join([self.sha256, json.dumps(self.scores, sort_keys=True),
                         json.dumps(self.comments, sort_keys=True), self.summary or "",
                         str(self.overall_grade), self.source])


# -- reading references ---------------------------------------------------------------------------
def read_human_profile(photo: Path) -> tuple[dict[str, int], dict[str, str], str | None, int | None] | None:
    """The curator's sidecar next to a reference photo (the RAG index's reader, the same rules), if it is valid."""
    from daemon.references.sidecar import SidecarInvalid, read_profile, sidecar_path

    sidecar = sidecar_path(Path(photo))
    if sidecar is None:
        return None
    try:
        profile = read_profile(sidecar)
    except SidecarInvalid:
        return None
    return dict(profile.scores), dict(profile.comments or {}), profile.summary, profile.overall_grade


def _row_value(row: Any, name: str) -> Any:
    return row.get(name) if isinstance(row, Mapping) else getattr(row, name, None)


def reference_from_row(row: Any) -> Reference | None:
    """One `Ledger.references()` row (or an equivalent mapping); a human sidecar on disk wins."""
    path = str(_row_value(row, "path") or "")
    sha = str(_row_value(row, "sha256") or "")
    if not path or not sha:
        return None
    human = read_human_profile(Path(path))
    if human is None and _has_sidecar(Path(path)):
        return None  # a curator's sidecar that no longer reads: the index skips the photo, and so does training
    if human is not None:
        scores, comments, summary, grade = human
        return Reference(path=path, sha256=sha, scores=scores, source="human", comments=comments,
                         summary=summary, overall_grade=grade, model_id=None)
    raw_scores = _row_value(row, "scores")
    raw_comments = _row_value(row, "comments")
    try:
        scores_obj = json.loads(raw_scores) if isinstance(raw_scores, str) else raw_scores
        comments_obj = json.loads(raw_comments) if isinstance(raw_comments, str) else raw_comments
    except ValueError:
        return None
    try:  # the indexer stored what the sidecar parser (or the model's schema) produced: the same rules hold
        scores, comments = parse_sidecar({"scores": scores_obj or {}, "comments": comments_obj or None})
    except SidecarInvalid:
        return None
    return Reference(path=path, sha256=sha, scores=scores, source=str(_row_value(row, "source") or "model"),
                     comments=comments or {}, summary=None, overall_grade=None,
                     model_id=_row_value(row, "model_id"))


def collect_references(cfg: Config, advisor_id: str, ledger: Any | None = None) -> list[Reference]:
    """The advisor's indexed references that still exist on disk, sorted by content hash."""
    if ledger is None:
        from daemon.ledger import Ledger

        ledger = Ledger.for_config(cfg)
    if not hasattr(ledger, "references"):
        raise DatasetError("this Mondrian has no reference index yet (the RAG index provides it)")
    from daemon.references.indexer import counted_references

    found, changed, unreadable = [], [], []
    for row in ledger.references(advisor_id):
        ref = reference_from_row(row)
        if ref is None:
            path = Path(str(_row_value(row, "path") or ""))
            if path.is_file() and _has_sidecar(path):
                unreadable.append(path.name)  # a curator's sidecar broken since it was indexed: said, not dropped
            continue
        if not Path(ref.path).is_file():
            continue
        if _changed_since_indexed(Path(ref.path), _row_value(row, "indexed_at"), ref.sha256):
            changed.append(ref.path)  # its recorded hash decides the split: a test photo may now be a train one
            continue
        found.append(ref)
    if unreadable:
        log.warning("%s: %d reference(s) are left out because their sidecar (the curator's scores) no longer reads "
                    "since they were indexed; `%s references list --advisor %s` says why: %s", advisor_id,
                    len(unreadable), mondrian(), advisor_id,
                    ", ".join(unreadable[:5]) + (" …" if len(unreadable) > 5 else ""))
    if changed:
        log.warning("%s: %d reference(s) changed since they were indexed and are left out until `%s references index "
                    "--advisor %s` reads them again: %s", advisor_id, len(changed), mondrian(), advisor_id,
                    ", ".join(Path(p).name for p in changed[:5]) + (" …" if len(changed) > 5 else ""))
    # The same photo twice (a copy, or RAW+JPEG beside each other) counts once: else one could train the adapter
    # and also sit in the held-out test that judges it.
    return sorted(counted_references(found)[0], key=lambda r: r.sha256)


def _has_sidecar(photo: Path) -> bool:
    from daemon.references.sidecar import sidecar_path

    return sidecar_path(photo) is not None


def _changed_since_indexed(path: Path, indexed_at: Any, sha256: str) -> bool:
    """Whether the photo's bytes are no longer those the index hashed. Only a file written or replaced since it was
    indexed (its ctime or mtime later) is read again: a portfolio of large files is not hashed at every training."""
    try:
        st = os.stat(path)
        if isinstance(indexed_at, (int, float)) and max(st.st_ctime, st.st_mtime) <= indexed_at:
            return False
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest() != sha256
    except OSError:
        return True


def fingerprint(refs: Iterable[Reference]) -> str:
    """Identifies a reference set: photos and their profiles (a changed sidecar score changes it)."""
    h = hashlib.sha256()
    for key in sorted(r.key() for r in refs):
        h.update(key.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


# -- split ----------------------------------------------------------------------------------------
def hash_position(sha256: str) -> float:
    """Where a photo's content hash falls in [0, 1): independent of every other photo."""
    return int(sha256[:16], 16) / float(1 << 64)


@dataclass
class Splits:
    """train (fitting), validation (early stopping, checkpoint choice), test (promotion, every reported metric)."""

    train: list[Reference]
    validation: list[Reference]
    test: list[Reference]

    def record(self) -> dict[str, list[str]]:
        """What a version's manifest keeps: the content hashes of each split."""
        return {"train": [r.sha256 for r in self.train], "validation": [r.sha256 for r in self.validation],
                "test": [r.sha256 for r in self.test]}


def split(refs: list[Reference], holdout_fraction: float = 0.2, validation_fraction: float = 0.15) -> Splits:
    """Three disjoint splits fixed by content hash: test (lowest hashes), validation (next), train (the rest)."""
    n = len(refs)
    if n < MIN_REFERENCES:
        raise DatasetError(f"{n} usable reference photo(s); training needs at least {MIN_REFERENCES} "
                           f"(some to learn from, one to stop training early, some to test the result)")
    ordered = sorted(refs, key=lambda r: (hash_position(r.sha256), r.sha256))
    n_test = sum(1 for r in ordered if hash_position(r.sha256) < holdout_fraction)
    n_test = min(max(n_test, min(HOLDOUT_MIN, n - 2)), n - 2)  # always leave one to train, one to validate
    rest = ordered[n_test:]
    top = holdout_fraction + validation_fraction
    n_val = sum(1 for r in rest if hash_position(r.sha256) < top)
    n_val = min(max(n_val, VALIDATION_MIN), len(rest) - 1)
    test, validation = ordered[:n_test], rest[:n_val]
    taken = {r.sha256 for r in test + validation}
    return Splits(train=[r for r in refs if r.sha256 not in taken], validation=validation, test=test)


def training_references(refs: list[Reference], use_model_scores: bool = False) -> tuple[list[Reference], list[Reference]]:
    """(usable as targets, left out): the curator-scored references, or all of them with `use_model_scores`."""
    if use_model_scores:
        return list(refs), []
    return [r for r in refs if r.source == "human"], [r for r in refs if r.source != "human"]


def select_targets(refs: list[Reference], advisor_id: str, use_model_scores: bool = False) -> tuple[list[Reference], list[Reference]]:
    """`training_references`, refusing (with what to do) when too few curator-scored references are left."""
    usable, left_out = training_references(refs, use_model_scores)
    if left_out and len(usable) < MIN_REFERENCES and len(refs) < MIN_REFERENCES:
        raise DatasetError(
            f"{advisor_id} has {len(refs)} indexed reference(s), {len(usable)} with curator scores (a sidecar "
            f"`<photo>.json`); training needs at least {MIN_REFERENCES}: add reference photos, each with its "
            f"sidecar")
    if left_out and len(usable) < MIN_REFERENCES:
        raise DatasetError(
            f"{len(usable)} of {advisor_id}'s {len(refs)} references have curator scores (a sidecar "
            f"`<photo>.json`); training needs at least {MIN_REFERENCES}. The other {len(left_out)} were scored "
            f"by the model itself, and an adapter trained on them learns the model's own opinion: add sidecars, "
            f"or train on them anyway with `{mondrian()} train --advisor {advisor_id} --use-model-scores` ([lora] "
            f"use_model_scores = true)")
    return usable, left_out


def sources(refs: Iterable[Reference]) -> dict[str, int]:
    """How many references had curator scores (human) and how many were scored by the model."""
    out = {"curator": 0, "model": 0}
    for r in refs:
        out["curator" if r.source == "human" else "model"] += 1
    return out


# -- the assistant turn ---------------------------------------------------------------------------
def _fit(text: str, limit: int) -> str:
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[:max(1, limit - 1)].rsplit(" ", 1)[0] if " " in text[:limit] else text[:limit - 1]
    return (cut.rstrip(" ,;:") + "…")[:limit]


def target_report(ref: Reference, comment_max_chars: int) -> dict[str, Any]:
    """The report this advisor would write for the photo: their scores, their words where they gave any, and
    "—" where they gave none (never a made-up sentence in their name)."""
    dims = {}
    for d in DIMENSIONS:
        comment = ref.comments.get(d)
        dims[d] = {"comment": _fit(comment, comment_max_chars) if comment else NO_COMMENT,
                   "score": int(ref.scores[d])}
    grade = ref.overall_grade if ref.overall_grade is not None else \
        int(round(sum(ref.scores.values()) / len(DIMENSIONS)))
    summary = _fit(ref.summary, comment_max_chars) if ref.summary else NO_COMMENT
    return {"dimensions": dims, "summary": summary, "overall_grade": int(grade)}


def report_text(report: Mapping[str, Any]) -> str:
    """The exact text the constrained decoder emits for this report (key order and separators)."""
    return json.dumps(report, **JSON_LAYOUT)


# -- augmentation ---------------------------------------------------------------------------------
@dataclass
class Augment:
    crop: float = 1.0  # side fraction kept
    crop_x: float = 0.5  # where the crop sits, 0..1
    crop_y: float = 0.5
    flip: bool = False
    ev: float = 0.0
    rotate: float = 0.0  # degrees

    def describe(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def draw_augment(seed: int, allow_flip: bool, *, exposure: bool = True) -> Augment:
    rng = np.random.default_rng(seed)
    return Augment(crop=float(rng.uniform(0.90, 1.0)), crop_x=float(rng.uniform()), crop_y=float(rng.uniform()),
                   flip=bool(allow_flip and rng.uniform() < 0.5),
                   ev=float(rng.uniform(-0.2, 0.2)) if exposure else 0.0,
                   rotate=float(rng.uniform(-5.0, 5.0)))


def _inscribed(w: int, h: int, degrees: float) -> tuple[int, int]:
    """Largest axis-aligned rectangle inside a w x h image rotated by `degrees` (no black corners)."""
    a = math.radians(abs(degrees))
    if a < 1e-9:
        return w, h
    sin, cos = math.sin(a), math.cos(a)
    long, short = max(w, h), min(w, h)
    if short <= 2 * sin * cos * long or abs(sin - cos) < 1e-10:
        x = 0.5 * short
        wr, hr = (x / sin, x / cos) if w >= h else (x / cos, x / sin)
    else:
        cos2 = cos * cos - sin * sin
        wr, hr = (w * cos - h * sin) / cos2, (h * cos - w * sin) / cos2
    return max(1, int(wr)), max(1, int(hr))


def apply_augment(image: Image.Image, aug: Augment, max_pixels: int) -> Image.Image:
    img = image.convert("RGB")
    if aug.rotate:
        w, h = img.size
        img = img.rotate(aug.rotate, resample=Image.Resampling.BICUBIC, expand=False)
        iw, ih = _inscribed(w, h, aug.rotate)
        left, top = (w - iw) // 2, (h - ih) // 2
        img = img.crop((left, top, left + iw, top + ih))
    if aug.crop < 1.0:
        w, h = img.size
        cw, ch = max(1, round(w * aug.crop)), max(1, round(h * aug.crop))
        left, top = round((w - cw) * aug.crop_x), round((h - ch) * aug.crop_y)
        img = img.crop((left, top, left + cw, top + ch))
    if aug.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if aug.ev:
        arr = np.asarray(img, dtype=np.float32) / 255.0
        linear = np.power(arr, 2.2) * (2.0 ** aug.ev)
        img = Image.fromarray((np.power(np.clip(linear, 0, 1), 1 / 2.2) * 255 + 0.5).astype(np.uint8))
    fw, fh = fit_size(img.width, img.height, max_pixels)
    return img.resize((fw, fh), Image.Resampling.LANCZOS) if (fw, fh) != img.size else img


# -- building -------------------------------------------------------------------------------------
@dataclass
class DatasetSettings:
    variants: int = 4  # augmented copies per training reference (plus the original)
    holdout_fraction: float = 0.2  # the test split
    validation_fraction: float = 0.15
    augment: bool = True
    exposure: bool = True


@dataclass
class BuiltDataset:
    path: Path
    splits: Splits
    train_rows: int
    validation_rows: int
    fingerprint: str
    left_out: list[str] = field(default_factory=list)  # references that could not be read: "name: why"

    @property
    def train(self) -> list[Reference]:
        return self.splits.train

    @property
    def test(self) -> list[Reference]:
        return self.splits.test


def chat_row(image: Image.Image, prompt: str, answer: str) -> dict[str, Any]:
    """One mlx-vlm training row; `messages` is JSON text (mlx-vlm's VisionDataset parses it)."""
    return {"images": [image],
            "messages": json.dumps([
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
                {"role": "assistant", "content": answer}], ensure_ascii=False)}


def first_few(reasons: list[str], n: int = 3) -> str:
    """`reasons` for one line: the first `n`, then an ellipsis for the rest."""
    return "; ".join(reasons[:n]) + (" …" if len(reasons) > n else "")


def build_rows(refs: list[Reference], advisor: Advisor, cfg: Config, *, variants: int, augment: bool,
               left_out: list[str], exposure: bool = True) -> dict[str, list[Any]]:
    """The chat rows of `refs`. A reference that cannot be read any more (renamed, moved or removed since it was
    indexed: training runs at night, for an hour) is left out, its name and why appended to `left_out`."""
    prompt = critique_prompt(advisor)
    cols: dict[str, list[Any]] = {"images": [], "messages": [], "sha256": [], "variant": [], "augment": []}
    for ref in refs:
        try:
            photo = load_photo(Path(ref.path), cfg.max_pixels, max_bytes=cfg.max_file_bytes)
        except ImageRejected as exc:
            left_out.append(f"{Path(ref.path).name}: {exc}")
            continue
        if photo.sha256 != ref.sha256:  # replaced since it was indexed: its scores and its split were the old bytes'
            left_out.append(f"{Path(ref.path).name}: the file changed since it was indexed")
            continue
        answer = report_text(target_report(ref, cfg.comment_max_chars))
        seed0 = int(ref.sha256[:15], 16)
        for v in range(1 + (variants if augment else 0)):
            aug = Augment() if v == 0 else draw_augment(seed0 + v, advisor.flip_augmentation, exposure=exposure)
            img = photo.image if v == 0 else apply_augment(photo.image, aug, cfg.max_pixels)
            row = chat_row(img, prompt, answer)
            cols["images"].append(row["images"])
            cols["messages"].append(row["messages"])
            cols["sha256"].append(ref.sha256)
            cols["variant"].append(v)
            cols["augment"].append(json.dumps(aug.describe()))
    return cols


def build_dataset(cfg: Config, advisor: Advisor, refs: list[Reference], dest: Path,
                  settings: DatasetSettings | None = None, splits: Splits | None = None) -> BuiltDataset:
    """Write a `datasets.DatasetDict` (train, validation) with `save_to_disk` into `dest`; the test split is
    recorded (mondrian_split.json) but holds no rows: nothing in training can read it.

    `splits` overrides the hash split (the learning benchmark fixes its own test set)."""
    import datasets

    settings = settings or DatasetSettings()
    splits = splits or split(refs, settings.holdout_fraction, settings.validation_fraction)
    features = datasets.Features({"images": datasets.List(datasets.Image()), "messages": datasets.Value("string"),
                                  "sha256": datasets.Value("string"), "variant": datasets.Value("int32"),
                                  "augment": datasets.Value("string")})
    left_out: list[str] = []
    train_cols = build_rows(splits.train, advisor, cfg, variants=settings.variants, augment=settings.augment,
                            exposure=settings.exposure, left_out=left_out)
    val_cols = build_rows(splits.validation, advisor, cfg, variants=0, augment=False, left_out=left_out)
    for name, part, cols in (("training", splits.train, train_cols), ("validation", splits.validation, val_cols)):
        if part and not cols["messages"]:
            raise DatasetError(f"none of the {len(part)} {name} references could be read "
                               f"({first_few(left_out)}): were they moved? "
                               f"`{mondrian()} references index --advisor {advisor.id}` indexes them where they are "
                               f"now; then train again")
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(train_cols, features=features),
        "validation": datasets.Dataset.from_dict(val_cols, features=features),
    })
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.writing")
    shutil.rmtree(tmp, ignore_errors=True)
    dd.save_to_disk(str(tmp))
    (tmp / "mondrian_split.json").write_text(json.dumps({
        "advisor": advisor.id, "fingerprint": fingerprint(refs), "splits": splits.record(),
        "settings": asdict(settings)}, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return BuiltDataset(path=dest, splits=splits, train_rows=len(train_cols["messages"]),
                        validation_rows=len(val_cols["messages"]), fingerprint=fingerprint(refs), left_out=left_out)


def load_built(path: Path):
    import datasets

    return datasets.load_from_disk(str(path))


def references_folder(cfg: Config, advisor_id: str) -> Path:
    return references_dir(cfg, advisor_id)
