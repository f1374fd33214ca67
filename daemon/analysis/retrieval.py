"""Which of the advisor's own photographs does this one resemble? And what does the portfolio look like?

Two signals, both from the one model Mondrian already runs:
- the dimensional profile: the 8 scores, compared by Euclidean distance (scores are 0-10, so the largest
  possible distance is 10 * sqrt(8)); similarity = 1 - distance / largest;
- optionally, visual similarity: cosine of the pooled vision features of the photo and the reference
  (stored with each reference), mapped from [-1, 1] to [0, 1]. It is used only when both vectors exist, come
  from the same model and have the same length; otherwise the profile alone decides.

The retrieved references also give rag a prior for its scores (`reference_prior`, `anchored`): the advisor's
own scores of the photos most like this one, weighted by similarity (a k-nearest-neighbour estimate). rag blends
it with the model's scores (`rag_reference_weight`), so its scores stay on the advisor's scale even where the
model reads the references in its prompt poorly.

No MLX here: rows are plain ledger rows (or anything with `.scores`, `.embedding`, `.model_id`, `.path`,
`.source`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .critique import DIMENSIONS, SCORE_MAX

DEFAULT_K = 3
VISUAL_WEIGHT = 0.5  # share of visual similarity in the combined score, when embeddings are available
MAX_DISTANCE = SCORE_MAX * math.sqrt(len(DIMENSIONS))


@dataclass
class Neighbour:
    row: Any  # the reference (ledger row)
    similarity: float  # combined, 0-1
    profile_similarity: float
    visual_similarity: float | None
    distance: float  # Euclidean distance between profiles

    @property
    def name(self) -> str:
        return Path(str(self.row.path)).name


def profile_vector(scores: Mapping[str, Any]) -> np.ndarray:
    return np.array([float(scores[d]) for d in DIMENSIONS], dtype=np.float64)


def embedding_vector(blob: bytes | np.ndarray | None) -> np.ndarray | None:
    if blob is None:
        return None
    vec = np.asarray(blob, dtype=np.float32) if isinstance(blob, np.ndarray) else \
        np.frombuffer(bytes(blob), dtype=np.float32)
    if vec.size == 0 or not np.all(np.isfinite(vec)):
        return None
    return vec


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a.astype(np.float64), b.astype(np.float64)) / (na * nb))


def nearest(profile: Mapping[str, Any], references: Iterable[Any], *, k: int = DEFAULT_K,
            embedding: bytes | np.ndarray | None = None, model_id: str | None = None,
            visual_weight: float = VISUAL_WEIGHT) -> list[Neighbour]:
    """The k references most similar to `profile` (and to `embedding`, when given), most similar first.

    A reference's embedding counts only if it was computed by `model_id` (when one is given).
    Ties are broken by path, so the same inputs always give the same answer.
    """
    target = profile_vector(profile)
    query = embedding_vector(embedding)
    out: list[Neighbour] = []
    for row in references:
        distance = float(np.linalg.norm(profile_vector(row.scores) - target))
        p_sim = max(0.0, 1.0 - distance / MAX_DISTANCE)
        v_sim: float | None = None
        ref_vec = embedding_vector(getattr(row, "embedding", None)) if query is not None else None
        if ref_vec is not None and ref_vec.shape == query.shape and \
                (model_id is None or getattr(row, "model_id", None) == model_id):
            v_sim = (cosine(query, ref_vec) + 1.0) / 2.0
        sim = p_sim if v_sim is None else (1.0 - visual_weight) * p_sim + visual_weight * v_sim
        out.append(Neighbour(row=row, similarity=sim, profile_similarity=p_sim, visual_similarity=v_sim,
                             distance=distance))
    out.sort(key=lambda n: (-n.similarity, str(n.row.path)))
    return out[:max(0, k)]


def reference_prior(neighbours: Sequence[Neighbour]) -> dict[str, float] | None:
    """The similarity-weighted mean of the curator-scored neighbours' scores per dimension; None if none of them
    has curator scores (a model-scored reference holds the model's own opinion, not the advisor's)."""
    own = [n for n in neighbours if getattr(n.row, "source", None) == "human"]
    if not own:
        return None
    weights = np.array([max(n.similarity, 1e-6) for n in own], dtype=np.float64)
    scores = np.stack([profile_vector(n.row.scores) for n in own])
    mean = weights @ scores / weights.sum()
    return {d: round(float(v), 4) for d, v in zip(DIMENSIONS, mean)}


def anchored(model: Mapping[str, float], prior: Mapping[str, float] | None, weight: float) -> dict[str, float]:
    """The model's scores moved towards the prior by `weight` (0: the model's own, 1: the prior's)."""
    if prior is None or weight <= 0:
        return {d: float(model[d]) for d in DIMENSIONS}
    return {d: (1.0 - weight) * float(model[d]) + weight * float(prior[d]) for d in DIMENSIONS}


def distribution(score_sets: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The portfolio: mean and spread (population standard deviation) per dimension, and the count.

    Shaped as report["portfolio"]: {"dimensions": {dim: {"mean", "std"}}, "count"}.
    """
    count = len(score_sets)
    dims: dict[str, dict[str, float]] = {}
    for d in DIMENSIONS:
        values = np.array([float(s[d]) for s in score_sets], dtype=np.float64)
        dims[d] = {"mean": round(float(values.mean()), 3) if count else 0.0,
                   "std": round(float(values.std()), 3) if count else 0.0}
    return {"dimensions": dims, "count": count}
