"""How good is an adapter on the advisor's held-out references, and is it better than what we have?

For each held-out reference the model writes its report with schema-constrained greedy decoding (that is
also the smoke check: every report must validate). Each dimension's score is then read, as Q-Align
does, as the probability-weighted expectation over the score tokens the schema allows at that point,
rather than as the single sampled integer (`ModelRuntime.expected_scores`, daemon/model/scoring.py).

Per dimension: mean absolute error and Spearman rank correlation against the advisor's scores. A
candidate is promoted only if all its reports are schema-valid and its mean MAE is not worse than the
current adapter's (or the base model's, for the first one) on the same photos.
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
            out[d] = {"mae": mae(pred, true), "spearman": spearman(pred, true)}
        return out

    def mae_mean(self) -> float | None:
        values = [v["mae"] for v in self.per_dim().values() if v["mae"] is not None]
        return float(np.mean(values)) if values else None

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "n": self.n, "valid": self.valid, "smoke_ok": self.smoke_ok,
                "mae_mean": self.mae_mean(), "per_dim": self.per_dim(),
                "photos": [{"sha256": p.sha256, "expected": p.expected, "generated": p.generated,
                            "target": p.target, "error": p.error} for p in self.photos]}


# -- statistics -----------------------------------------------------------------------------------
def mae(pred: Sequence[float], true: Sequence[float]) -> float | None:
    if not pred:
        return None
    return float(np.mean(np.abs(np.asarray(pred, dtype=float) - np.asarray(true, dtype=float))))


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


def evaluate(runtime: Runtime, references: Iterable[Any], prompt: str, *, adapter: str | Path | None,
             label: str, comment_max_chars: int, max_tokens: int, max_pixels: int,
             on_photo: Callable[[int, int], None] = lambda done, total: None) -> Evaluation:
    """Run the held-out references through the model with `adapter` (None: the base model). `on_photo(done,
    total)` before each photo and after the last (progress)."""
    from daemon.intake.images import load_photo
    from daemon.model.runtime import GenerationError

    schema = critique_schema(comment_max_chars)
    result = Evaluation(label=label)
    references = list(references)
    for done, ref in enumerate(references):
        on_photo(done, len(references))
        photo = load_photo(Path(ref.path), max_pixels)
        try:
            gen = runtime.generate_json(photo.image, prompt, schema, max_tokens=max_tokens, adapter=adapter)
        except GenerationError as exc:
            result.photos.append(PhotoScores(ref.sha256, None, None, dict(ref.scores), error=str(exc)))
            continue
        generated = {d: int(gen.data["dimensions"][d]["score"]) for d in DIMENSIONS}
        expected = runtime.expected_scores(photo.image, prompt, gen.text, adapter=adapter)
        result.photos.append(PhotoScores(ref.sha256, expected, generated, dict(ref.scores)))
    on_photo(len(references), len(references))
    return result


# -- decision and display -------------------------------------------------------------------------
def decide(candidate: dict[str, Any], baseline: dict[str, Any], tolerance: float = 0.0) -> dict[str, Any]:
    """Promote only a schema-valid candidate whose mean MAE is not worse than the baseline's."""
    if not candidate.get("smoke_ok"):
        return {"promoted": False, "reason": f"smoke check failed: {candidate.get('valid')}/{candidate.get('n')} "
                                             f"held-out reports were schema-valid"}
    c, b = candidate.get("mae_mean"), baseline.get("mae_mean")
    if c is None:
        return {"promoted": False, "reason": "no held-out photo could be scored"}
    if b is not None and c > b + tolerance:
        return {"promoted": False, "reason": f"worse than {baseline.get('label')}: mean MAE {c:.3f} vs {b:.3f}"}
    vs = f"{b:.3f}" if b is not None else "n/a"
    return {"promoted": True, "reason": f"mean MAE {c:.3f} vs {vs} for {baseline.get('label')}; "
                                        f"all {candidate.get('n')} held-out reports schema-valid"}


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
    lines.append(f"{'mean':<20} {_fmt(candidate['mae_mean']):>14} {_fmt(baseline['mae_mean']):>14}")
    lines.append(f"schema-valid reports: {a} {candidate['valid']}/{candidate['n']}, "
                 f"{b} {baseline['valid']}/{baseline['n']}")
    return "\n".join(lines)
