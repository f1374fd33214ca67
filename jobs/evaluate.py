"""How good is an adapter on the advisor's test references, and is it better than what we have?

For each test reference the model writes its report with schema-constrained greedy decoding (that is
also the smoke check: every report must validate). Each dimension's score is then read, as Q-Align
does, as the probability-weighted expectation over the score tokens the schema allows at that point,
rather than as the single sampled integer (`ModelRuntime.expected_scores`, daemon/model/scoring.py).

Per dimension: mean absolute error, squared error and Spearman rank correlation against the advisor's
scores, always on the version's test split (never seen by training, nor by early stopping). The gate
(`decide`): a candidate is promoted only if all its reports are schema-valid, the test split holds at least
`min_test_photos`, its mean MAE beats the current adapter's (or the base model's, for the first one) by
`promote_margin`, and its mean Spearman does not drop. Both means come with a bootstrap confidence interval
(photos resampled with replacement), so a reader can see how little a handful of test photos proves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from daemon.analysis.critique import DIMENSION_LABELS, DIMENSIONS, critique_schema

if TYPE_CHECKING:
    from daemon.model.protocol import Runtime


@dataclass
class PhotoScores:
    sha256: str
    expected: dict[str, float] | None  # None when the report was not valid (smoke check failed)
    generated: dict[str, int] | None
    target: dict[str, int]
    error: str | None = None


@dataclass
class Evaluation:
    label: str  # "base", "v0003", "candidate"
    photos: list[PhotoScores] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.photos)

    @property
    def valid(self) -> int:
        return sum(1 for p in self.photos if p.expected is not None)

    @property
    def smoke_ok(self) -> bool:
        return self.n > 0 and self.valid == self.n

    def per_dim(self) -> dict[str, dict[str, float | None]]:
        out: dict[str, dict[str, float | None]] = {}
        ok = [p for p in self.photos if p.expected is not None]
        for d in DIMENSIONS:
            pred = [p.expected[d] for p in ok]  # type: ignore[index]
            true = [p.target[d] for p in ok]
            out[d] = {"mae": mae(pred, true), "spearman": spearman(pred, true), "mse": mse(pred, true)}
        return out

    def mae_mean(self) -> float | None:
        values = [v["mae"] for v in self.per_dim().values() if v["mae"] is not None]
        return float(np.mean(values)) if values else None

    def to_dict(self) -> dict[str, Any]:
        ok = [p for p in self.photos if p.expected is not None]
        pred = [[p.expected[d] for d in DIMENSIONS] for p in ok]  # type: ignore[index]
        true = [[p.target[d] for d in DIMENSIONS] for p in ok]
        return {"label": self.label, "n": self.n, "valid": self.valid, "smoke_ok": self.smoke_ok,
                "mae_mean": self.mae_mean(), "spearman_mean": spearman_mean(pred, true),
                "mse": mse(np.ravel(pred).tolist(), np.ravel(true).tolist()), "per_dim": self.per_dim(),
                "photos": [{"sha256": p.sha256, "expected": p.expected, "generated": p.generated,
                            "target": p.target, "error": p.error} for p in self.photos]}


# -- statistics -----------------------------------------------------------------------------------
def mae(pred: Sequence[float], true: Sequence[float]) -> float | None:
    if not pred:
        return None
    return float(np.mean(np.abs(np.asarray(pred, dtype=float) - np.asarray(true, dtype=float))))


def mse(pred: Sequence[float], true: Sequence[float]) -> float | None:
    """Mean squared error (the original design's evaluation metric)."""
    if len(pred) == 0:
        return None
    return float(np.mean((np.asarray(pred, dtype=float) - np.asarray(true, dtype=float)) ** 2))


def mae_mean(pred: Any, true: Any) -> float | None:
    """Mean over dimensions of the MAE; `pred` and `true` are photos x dimensions."""
    p, t = np.asarray(pred, dtype=float), np.asarray(true, dtype=float)
    return float(np.mean(np.abs(p - t))) if p.size else None


def spearman_mean(pred: Any, true: Any) -> float | None:
    """Mean Spearman over the dimensions whose targets vary (elsewhere ranking means nothing). A model that gives
    every photo the same score on such a dimension ranks nothing: it counts 0. None when no target varies."""
    p, t = np.asarray(pred, dtype=float), np.asarray(true, dtype=float)
    if p.ndim != 2 or len(p) < 2:
        return None
    values = []
    for j in range(t.shape[1]):
        if np.ptp(t[:, j]) == 0:
            continue
        rho = spearman(p[:, j], t[:, j])
        values.append(0.0 if rho is None else rho)
    return float(np.mean(values)) if values else None


def _ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks with ties averaged (what Spearman's rho needs)."""
    a = np.asarray(values, dtype=float)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a))
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and a[order[j + 1]] == a[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho; None when it is undefined (fewer than 2 photos, or a constant side)."""
    if len(x) < 2:
        return None
    rx, ry = _ranks(x), _ranks(y)
    if np.std(rx) == 0 or np.std(ry) == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


@dataclass
class TestPhoto:
    """A test reference read once, before both evaluations: the two models are judged on the very same pictures
    even if the file is renamed or removed between them (an evaluation with a real model takes many minutes)."""
    sha256: str
    scores: dict[str, int]
    path: str
    image: Any  # PIL image, as load_photo made it


def readable(references: Iterable[Any], max_pixels: int) -> tuple[list[TestPhoto], list[str]]:
    """The test references that can be read, each read now, and why each other one cannot: a reference renamed,
    moved or deleted while its advisor trained (hours, at night) is left out of both evaluations, so the candidate
    and the model it is compared with are judged on the same photos, instead of the whole run failing."""
    from daemon.intake.images import ImageRejected, load_photo

    kept, gone = [], []
    for ref in references:
        try:
            photo = load_photo(Path(ref.path), max_pixels)
        except ImageRejected as exc:
            gone.append(f"{Path(ref.path).name}: {exc}")
            continue
        if photo.sha256 != ref.sha256:
            # Replaced since it was indexed (another photo saved under its name): the curator's scores are not
            # this picture's, and its split was drawn from the old bytes: it may be one the candidate learned from.
            gone.append(f"{Path(ref.path).name}: the file changed since it was indexed")
            continue
        kept.append(TestPhoto(ref.sha256, dict(ref.scores), str(ref.path), photo.image))
    return kept, gone


def seen_by(manifest: dict[str, Any]) -> set[str]:
    """The photos (content hashes) an adapter version learned from: its train and validation splits. Judging it on
    them favours it; a photo's split moves when its file changes (a rating written into it) or the fractions do."""
    splits = manifest.get("splits")
    if isinstance(splits, dict):
        return {str(h) for key in ("train", "validation") for h in splits.get(key) or []}
    return {str(r.get("sha256")) for r in manifest.get("references") or []
            if isinstance(r, dict) and r.get("split") in ("train", "validation")}


def evaluate(runtime: Runtime, photos: Iterable[TestPhoto], prompt: str, *, adapter: str | Path | None,
             label: str, comment_max_chars: int, max_tokens: int,
             on_photo: Callable[[int, int], None] = lambda done, total: None) -> Evaluation:
    """Run the test photos (`readable`) through the model with `adapter` (None: the base model).
    `on_photo(done, total)` before each photo and after the last (progress)."""
    from daemon.model.runtime import GenerationError

    schema = critique_schema(comment_max_chars)
    result = Evaluation(label=label)
    photos = list(photos)
    for done, photo in enumerate(photos):
        on_photo(done, len(photos))
        try:
            gen = runtime.generate_json(photo.image, prompt, schema, max_tokens=max_tokens, adapter=adapter)
        except GenerationError as exc:
            result.photos.append(PhotoScores(photo.sha256, None, None, dict(photo.scores), error=str(exc)))
            continue
        generated = {d: int(gen.data["dimensions"][d]["score"]) for d in DIMENSIONS}
        expected = runtime.expected_scores(photo.image, prompt, gen.text, adapter=adapter)
        result.photos.append(PhotoScores(photo.sha256, expected, generated, dict(photo.scores)))
    on_photo(len(photos), len(photos))
    return result


# -- confidence intervals -------------------------------------------------------------------------
def _paired(candidate: dict[str, Any], baseline: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(candidate, baseline, target) arrays, photos x dimensions, over the photos both scored."""
    base = {p["sha256"]: p for p in baseline.get("photos", []) if p.get("expected") is not None}
    rows = [(p, base[p["sha256"]]) for p in candidate.get("photos", [])
            if p.get("expected") is not None and p["sha256"] in base]
    c = np.array([[a["expected"][d] for d in DIMENSIONS] for a, _ in rows], dtype=float)
    b = np.array([[bb["expected"][d] for d in DIMENSIONS] for _, bb in rows], dtype=float)
    t = np.array([[a["target"][d] for d in DIMENSIONS] for a, _ in rows], dtype=float)
    return c, b, t


MIN_INTERVAL_PHOTOS = 5


def bootstrap(candidate: dict[str, Any], baseline: dict[str, Any], *, resamples: int = 1000, level: float = 0.95,
              seed: int = 0) -> dict[str, Any]:
    """Percentile bootstrap intervals of mean MAE and mean Spearman for both models and their difference,
    resampling the test photos (the same resample for both: the comparison is paired)."""
    c, b, t = _paired(candidate, baseline)
    n = len(t)
    out: dict[str, Any] = {"n": n, "resamples": resamples, "level": level}
    if n < MIN_INTERVAL_PHOTOS:  # resampling 2-4 photos gives intervals as narrow as "0.71 [0.71, 0.71]": false comfort
        out["note"] = (f"too few test photos ({n}) for a bootstrap interval; it needs at least "
                       f"{MIN_INTERVAL_PHOTOS}")
        return out
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in ("mae_c", "mae_b", "mae_d", "rho_c", "rho_b", "rho_d")}
    for _ in range(resamples):
        i = rng.integers(0, n, n)
        mc, mb = mae_mean(c[i], t[i]), mae_mean(b[i], t[i])
        draws["mae_c"].append(mc)
        draws["mae_b"].append(mb)
        draws["mae_d"].append(mc - mb)
        rc, rb = spearman_mean(c[i], t[i]), spearman_mean(b[i], t[i])
        if rc is not None and rb is not None:
            draws["rho_c"].append(rc)
            draws["rho_b"].append(rb)
            draws["rho_d"].append(rc - rb)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100

    def interval(values: list[float]) -> list[float] | None:
        return [round(float(np.percentile(values, lo)), 4), round(float(np.percentile(values, hi)), 4)] \
            if values else None

    out["mae"] = {"candidate": interval(draws["mae_c"]), "baseline": interval(draws["mae_b"]),
                  "difference": interval(draws["mae_d"])}
    out["spearman"] = {"candidate": interval(draws["rho_c"]), "baseline": interval(draws["rho_b"]),
                       "difference": interval(draws["rho_d"])}
    return out


# -- decision and display -------------------------------------------------------------------------
@dataclass(frozen=True)
class Gate:
    """What a candidate must show on the test split to become current."""

    min_test_photos: int = 5
    mae_margin: float = 0.1  # mean MAE must be at least this much lower than the current one's
    spearman_tolerance: float = 0.0  # mean Spearman may not drop by more than this
    holdout_fraction: float = 0.2  # the test split's share of the references (what "add references" means in numbers)


def decide(candidate: dict[str, Any], baseline: dict[str, Any], gate: Gate | None = None) -> dict[str, Any]:
    """Promote only a schema-valid candidate, judged on enough test photos, whose mean MAE beats the baseline's
    by the margin and whose mean Spearman does not drop. The reason says which rule decided."""
    gate = gate or Gate()
    n, who = int(candidate.get("n") or 0), baseline.get("label")
    if n < gate.min_test_photos:
        # The split is by hash, so the test share is about holdout_fraction of them: that many in all, roughly.
        needed = math.ceil(gate.min_test_photos / gate.holdout_fraction) if gate.holdout_fraction > 0 else None
        about = (f"; the test split holds about {gate.holdout_fraction:.0%} of them, so that takes about {needed} "
                 f"curator-scored references in all" if needed else "")
        return {"promoted": False, "reason": f"too few test photos to judge: {n}, the gate needs at least "
                                             f"{gate.min_test_photos}{about} (add curator-scored references, or "
                                             f"lower [lora] min_test_photos)"}
    if not candidate.get("smoke_ok"):
        return {"promoted": False, "reason": f"smoke check failed: {candidate.get('valid')}/{n} "
                                             f"test reports were schema-valid"}
    c, b = candidate.get("mae_mean"), baseline.get("mae_mean")
    if c is None:
        return {"promoted": False, "reason": "no test photo could be scored"}
    if b is not None and c > b - gate.mae_margin:
        return {"promoted": False, "reason": f"mean MAE {c:.3f} vs {b:.3f} for {who}: not better by the margin "
                                             f"of {gate.mae_margin:g}"}
    rc, rb = candidate.get("spearman_mean"), baseline.get("spearman_mean")
    if rb is not None and (rc is None or rc < rb - gate.spearman_tolerance):
        return {"promoted": False, "reason": f"mean Spearman drops: {_fmt(rc, '.3f')} vs {rb:.3f} for {who} "
                                             f"(mean MAE {c:.3f} vs {b:.3f})"}
    vs = f"{b:.3f}" if b is not None else "n/a"
    return {"promoted": True, "reason": f"mean MAE {c:.3f} vs {vs} and mean Spearman {_fmt(rc, '.3f')} vs "
                                        f"{_fmt(rb, '.3f')} for {who}, on {n} test photos, all schema-valid"}


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "  –  " if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(candidate: dict[str, Any], baseline: dict[str, Any]) -> str:
    """The per-dimension comparison `mondrian evaluate` prints."""
    a, b = candidate["label"], baseline["label"]
    head = f"{'dimension':<20} {'MAE ' + a:>14} {'MAE ' + b:>14} {'ρ ' + a:>12} {'ρ ' + b:>12}"
    lines = [head, "-" * len(head)]
    for d in DIMENSIONS:
        ca, cb = candidate["per_dim"][d], baseline["per_dim"][d]
        lines.append(f"{DIMENSION_LABELS[d]:<20} {_fmt(ca['mae']):>14} {_fmt(cb['mae']):>14} "
                     f"{_fmt(ca['spearman']):>12} {_fmt(cb['spearman']):>12}")
    lines.append("-" * len(head))
    lines.append(f"{'mean':<20} {_fmt(candidate['mae_mean']):>14} {_fmt(baseline['mae_mean']):>14} "
                 f"{_fmt(candidate.get('spearman_mean')):>12} {_fmt(baseline.get('spearman_mean')):>12}")
    lines.append(f"schema-valid reports: {a} {candidate['valid']}/{candidate['n']}, "
                 f"{b} {baseline['valid']}/{baseline['n']}")
    ma, mb = candidate.get("mse"), baseline.get("mse")
    gain = f"{(1 - ma / mb) * 100:.1f} %" if isinstance(ma, float) and isinstance(mb, float) and mb > 0 else "n/a"
    lines.append(f"{b} MSE: {_fmt(mb, '.4f')}   {a} MSE: {_fmt(ma, '.4f')}   Improvement: {gain}")
    ci = bootstrap(candidate, baseline)
    if "note" in ci:
        lines.append(f"No bootstrap intervals: {ci['note']}.")
    if "mae" in ci:
        pct = int(round(ci["level"] * 100))

        def span(v: list[float] | None) -> str:
            return f"[{v[0]:.2f}, {v[1]:.2f}]" if v else "[ – ]"

        lines.append(f"{pct} % bootstrap intervals ({ci['resamples']} resamples of the {ci['n']} test photos):")
        for key, name, ca, cb in (("mae", "mean MAE", candidate["mae_mean"], baseline["mae_mean"]),
                                  ("spearman", "mean ρ", candidate.get("spearman_mean"),
                                   baseline.get("spearman_mean"))):
            iv = ci[key]
            lines.append(f"  {name:<9} {a} {_fmt(ca)} {span(iv['candidate'])}   {b} {_fmt(cb)} "
                         f"{span(iv['baseline'])}   difference {span(iv['difference'])}")
    return "\n".join(lines)
