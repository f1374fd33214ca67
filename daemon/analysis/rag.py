"""RAG: ground the critique in the advisor's reference portfolio (pass 1 profile, retrieval, pass 2).

1. The photo goes through the vision tower once (`runtime.encode`); its pooled features are its embedding.
2. Pass 1: the 8-dimension profile, schema-constrained and short.
3. Retrieval: the k nearest references by profile distance, combined with visual similarity when
   embeddings are enabled; the portfolio's distribution (mean and spread per dimension).
4. Pass 2: the advisor prompt + portfolio context; the normal critique schema. It reuses pass 1's vision
   features and the KV cache of the prefix both prompts share (system prompt, image, advisor prompt).
5. Anchoring: each dimension's score moves towards the similarity-weighted mean of the curator scores of the
   retrieved references by `rag_reference_weight` (0.5 by default; 0 keeps the model's own), so the advisor's
   own scores of the photos most like this one count even where the model reads its prompt poorly. The report
   keeps both: `reference_prior` holds the prior, the weight and the model's own scores.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from .advisors import references_dir
from .critique import DIMENSIONS, critique_schema
from .prompts import critique_prompt, portfolio_context
from ..references.indexer import extract_profile, reference_comment, reference_profile
from ..references.thumbnails import thumbnail
from .retrieval import anchored, distribution, nearest, reference_prior
from . import AnalysisContext, AnalysisResult, Availability, Strategy


def reference_fingerprint(rows: list[Any]) -> str:
    """The reference set as rag reads it: each reference's content hash, scores, comments and where they came
    from, in a fixed order. Renaming or moving a reference keeps it; adding, removing or rescoring one changes it."""
    items = sorted(json.dumps([r.sha256, r.scores, r.comments, r.source], sort_keys=True, ensure_ascii=False)
                   for r in rows)
    return "refs:" + hashlib.sha256("\n".join(items).encode("utf-8")).hexdigest()[:32]


class RagStrategy(Strategy):
    name = "rag"
    fallback = "baseline"

    def __init__(self, cfg, ledger: Any = None):
        super().__init__(cfg)
        self.ledger = ledger

    def _count(self, advisor_id: str) -> int:
        if self.ledger is None:
            return 0
        return int(self.ledger.reference_counts().get(advisor_id, 0))

    def is_available(self, advisor) -> Availability:
        if self._count(advisor.id) > 0:
            return Availability(True)
        folder = references_dir(self.cfg, advisor.id)
        shown = folder.relative_to(self.cfg.home) if folder.is_relative_to(self.cfg.home) else folder
        return Availability(False, f"no indexed reference photos for {advisor.name} yet (add photos to "
                                   f"{shown} and run `mondrian references index --advisor {advisor.id}`)")

    def inputs(self, advisor) -> str | None:
        return reference_fingerprint(self.ledger.references(advisor.id)) if self.ledger is not None else None

    def analyse(self, ctx: AnalysisContext) -> AnalysisResult:
        cfg, rt, advisor = ctx.cfg, ctx.runtime, ctx.advisor
        rows = self.ledger.references(advisor.id)
        timings: dict[str, float] = {}

        t = time.perf_counter()
        encoded = rt.encode(ctx.photo.image)
        timings["encode_s"] = time.perf_counter() - t

        t = time.perf_counter()
        profile, first = extract_profile(rt, cfg, advisor, encoded, **ctx.limits())
        timings["profile_s"] = time.perf_counter() - t

        t = time.perf_counter()
        candidates = [r for r in rows if r.sha256 != ctx.photo.sha256] or rows  # not itself, if it is one
        found = nearest(profile, candidates, k=cfg.rag_k,
                        embedding=encoded.embedding if cfg.embeddings_enabled else None, model_id=rt.model_id)
        portfolio = distribution([r.scores for r in rows])
        neighbours = []
        for n in found:
            prof = reference_profile(n.row)
            neighbours.append({"name": n.name, "scores": prof["scores"],
                               "comment": reference_comment(prof["comments"])})
        context = portfolio_context(portfolio["dimensions"], portfolio["count"], neighbours, profile)
        timings["retrieval_s"] = time.perf_counter() - t

        t = time.perf_counter()
        second = rt.generate_json(encoded.image, critique_prompt(advisor, context),
                                  critique_schema(cfg.comment_max_chars), max_tokens=cfg.max_tokens,
                                  encoded=encoded, **ctx.limits())  # stop / per-photo time limit
        timings["critique_s"] = time.perf_counter() - t
        critique = second.data
        encoded.kv = None  # free the KV cache now rather than with the photo
        own = {d: int(critique["dimensions"][d]["score"]) for d in DIMENSIONS}
        prior = reference_prior(found)
        for d, v in anchored(own, prior, cfg.rag_reference_weight).items():
            critique["dimensions"][d]["score"] = int(v + 0.5)  # half up, not to even: 4.5 is 5 like 5.5 is 6

        references: list[dict[str, Any]] = []
        files: dict[str, Path] = {}
        for i, (n, info) in enumerate(zip(found, neighbours), start=1):
            entry: dict[str, Any] = {
                "name": info["name"],
                "similarity": round(n.similarity, 4),
                "profile_similarity": round(n.profile_similarity, 4),
                "source": n.row.source,
                "scores": info["scores"],
                "delta": {d: int(critique["dimensions"][d]["score"]) - info["scores"][d] for d in DIMENSIONS},
            }
            if n.visual_similarity is not None:
                entry["visual_similarity"] = round(n.visual_similarity, 4)
            if info["comment"]:
                entry["comment"] = info["comment"]
            thumb = thumbnail(cfg, n.row.sha256, n.row.path)
            if thumb is not None:
                name = f"ref-{i}.jpg"
                files[name] = thumb
                entry["thumb"] = name
            references.append(entry)

        timings["generated_tokens"] = first.generated_tokens + second.generated_tokens
        timings["reused_prompt_tokens"] = second.reused_tokens
        if first.forward_passes is not None and second.forward_passes is not None:
            timings["forward_passes"] = first.forward_passes + second.forward_passes
        extras = {"profile": profile, "references": references, "portfolio": portfolio}
        if prior is not None:
            extras["reference_prior"] = {"scores": prior, "weight": cfg.rag_reference_weight, "model_scores": own}
        return AnalysisResult(critique=critique, extras=extras,
                              files=files, timings=timings, inputs=reference_fingerprint(rows))
