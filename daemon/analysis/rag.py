"""RAG: ground the critique in the advisor's reference portfolio (pass 1 profile, retrieval, pass 2).

1. The photo goes through the vision tower once (`runtime.encode`); its pooled features are its embedding.
2. Pass 1: the 8-dimension profile, schema-constrained and short.
3. Retrieval: the k nearest references by profile distance, combined with visual similarity when
   embeddings are enabled; the portfolio's distribution (mean and spread per dimension). A photo copied under
   several names counts once (`counted_references`: the first path's row).
4. Pass 2: the advisor prompt + portfolio context; the normal critique schema. It reuses pass 1's vision
   features and the KV cache of the prefix both prompts share (system prompt, image, advisor prompt).
5. Anchoring: each dimension's score moves towards the similarity-weighted mean of the curator scores of the
   retrieved references by `rag_reference_weight` (0.5 by default; 0 keeps the model's own), so the advisor's
   own scores of the photos most like this one count even where the model reads its prompt poorly. The report
   keeps both: `reference_prior` holds the prior, the weight and the model's own scores.

Several photos of one advisor (`analyse_batch`, a deep queue) take each step together: pass 1 in one batch,
retrieval per photo, pass 2 in one batch (daemon/model/batch.py: there each pass prefills its whole prompt).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from .advisors import references_dir
from .critique import DIMENSIONS, critique_schema
from .prompts import critique_prompt, portfolio_context
from ..model.protocol import BatchRequest
from ..references.indexer import (IMAGE_SUFFIXES, counted_references, folder_problem, profile_of, profile_request,
                                  reference_comment, reference_present, reference_profile, shown_name)
from ..references.thumbnails import thumbnail
from .retrieval import anchored, distribution, nearest, reference_prior
from . import AnalysisContext, AnalysisResult, Availability, Strategy


def reference_fingerprint(rows: list[Any]) -> str:
    """The reference set as rag reads it: each reference's content hash, scores, comments and where they came
    from, in a fixed order. Renaming or moving a reference keeps it; adding, removing or rescoring one changes it.
    `rows` are those rag counts (`counted_references`): a copy of a photo already there is not another one."""
    items = sorted(json.dumps([r.sha256, r.scores, r.comments, r.source], sort_keys=True, ensure_ascii=False)
                   for r in rows)
    return "refs:" + hashlib.sha256("\n".join(items).encode("utf-8")).hexdigest()[:32]


class RagStrategy(Strategy):
    name = "rag"
    fallback = "baseline"

    def __init__(self, cfg, ledger: Any = None):
        super().__init__(cfg)
        self.ledger = ledger
        self._present_cache: dict[str, tuple[float, bool]] = {}  # path -> (when looked, whether there)

    def is_available(self, advisor) -> Availability:
        if self.ledger is not None and self._references(advisor.id):
            return Availability(True)
        folder = references_dir(self.cfg, advisor.id)
        shown = folder.relative_to(self.cfg.home) if folder.is_relative_to(self.cfg.home) else folder
        broken = folder_problem(folder)
        if broken:  # "add photos to it" cannot be followed: say what is wrong with it instead
            return Availability(False, f"no indexed reference photos for {advisor.name}: "
                                       + broken.replace(str(folder), str(shown)))
        there = _photo_count(folder)
        if there:  # "add photos" when photos are there: they were skipped (unreadable, damaged) or wait for indexing
            return Availability(False, f"no indexed reference photos for {advisor.name}: the {there} photo(s) in "
                                       f"{shown} are not indexed yet or were skipped (`mondrian references list "
                                       f"--advisor {advisor.id}` says why any was skipped; `mondrian references "
                                       f"index --advisor {advisor.id}` indexes the others now)")
        return Availability(False, f"no indexed reference photos for {advisor.name} yet (add photos to "
                                   f"{shown} and run `mondrian references index --advisor {advisor.id}`)")

    def _references(self, advisor_id: str) -> list[Any]:
        """The references rag reads: one row per photo, however many copies of it the folder holds (a copy must
        not fill two retrieval slots nor weigh twice in the portfolio), and none deleted since it was indexed."""
        folder = references_dir(self.cfg, advisor_id)
        return counted_references(r for r in self.ledger.references(advisor_id) if self._present(folder, r.path))[0]

    PRESENT_TTL_S = 10.0  # asked 3-4 times a photo (availability, inputs, the passes): one look a reference will do

    def _present(self, folder: Path, path: str) -> bool:
        now = time.monotonic()
        cache = self._present_cache
        hit = cache.get(path)
        if hit is None or now - hit[0] > self.PRESENT_TTL_S:
            if len(cache) > 100_000:
                cache.clear()
            hit = cache[path] = (now, reference_present(folder, path))
        return hit[1]

    def inputs(self, advisor) -> str | None:
        # the same rows as the report's `inputs` (_result), so a cached report matches only what rag would read
        return reference_fingerprint(self._references(advisor.id)) if self.ledger is not None else None

    batched = True

    def analyse(self, ctx: AnalysisContext) -> AnalysisResult:
        result = self._passes([ctx], batch=False)[0]
        if isinstance(result, Exception):
            raise result
        return result

    def analyse_batch(self, ctxs: list[AnalysisContext]) -> list[AnalysisResult | Exception]:
        return self._passes(ctxs, batch=True)

    @staticmethod
    def _generate(ctxs: list[AnalysisContext], requests: list[Any], batch: bool) -> list[Any]:
        """One pass for every photo: in one batch (each photo's Generation or exception), or for the one photo."""
        if batch:
            return ctxs[0].runtime.generate_json_batch(requests)
        (r,) = requests
        return [ctxs[0].runtime.generate_json(r.image, r.prompt, r.schema, max_tokens=r.max_tokens, encoded=r.encoded,
                                              cancel=r.cancel, deadline=r.deadline)]

    def _passes(self, ctxs: list[AnalysisContext], *, batch: bool) -> list[AnalysisResult | Exception]:
        """Encode, pass 1, retrieval, pass 2 for photos of one advisor; `batch`: each pass in one batch. A photo
        that fails at a step ends there with its exception; the others go on."""
        cfg, advisor = ctxs[0].cfg, ctxs[0].advisor
        rows = self._references(advisor.id)
        out: list[Any] = [None] * len(ctxs)
        timings: list[dict[str, float]] = [{} for _ in ctxs]
        encoded: dict[int, Any] = {}
        state: dict[int, dict[str, Any]] = {i: {} for i in range(len(ctxs))}

        def step(name: str, work: Any) -> None:
            t = time.perf_counter()
            for i in range(len(ctxs)):
                if out[i] is None:
                    try:
                        work(i)
                    except Exception as exc:  # noqa: BLE001 - this photo's own outcome
                        out[i] = exc
            for i in range(len(ctxs)):
                timings[i][name] = time.perf_counter() - t

        def generate(name: str, key: str, request: Any) -> None:
            t = time.perf_counter()
            live = [i for i in range(len(ctxs)) if out[i] is None]
            gens = self._generate([ctxs[i] for i in live], [request(i) for i in live], batch) if live else []
            for i, gen in zip(live, gens):
                if isinstance(gen, Exception):
                    out[i] = gen
                else:
                    state[i][key] = gen
                timings[i][name] = time.perf_counter() - t

        step("encode_s", lambda i: encoded.__setitem__(i, ctxs[i].runtime.encode(ctxs[i].photo.image)))
        generate("profile_s", "first", lambda i: profile_request(advisor, encoded[i], **ctxs[i].limits()))
        step("retrieval_s", lambda i: state[i].update(self._retrieve(ctxs[i], rows, encoded[i],
                                                                     profile_of(state[i]["first"]))))
        generate("critique_s", "second", lambda i: BatchRequest(
            encoded[i].image, critique_prompt(advisor, state[i]["context"]), critique_schema(cfg.comment_max_chars),
            cfg.max_tokens, encoded=encoded[i], **ctxs[i].limits()))  # stop / per-photo time limit
        for photo in encoded.values():
            photo.kv = None  # free the KV cache now rather than with the photo
        for i in range(len(ctxs)):
            if out[i] is None:
                try:
                    out[i] = self._result(cfg, rows, state[i], timings[i])
                except Exception as exc:  # noqa: BLE001 - this photo's own outcome
                    out[i] = exc
        return out

    def _retrieve(self, ctx: AnalysisContext, rows: list[Any], encoded: Any, profile: dict[str, int]) -> dict[str, Any]:
        cfg = ctx.cfg
        # Never itself: a reference dropped into the inbox would find itself nearest and be anchored to its own
        # curator scores, the answer read off the portfolio. When it is the only reference nothing is retrieved.
        candidates = [r for r in rows if r.sha256 != ctx.photo.sha256]
        found = nearest(profile, candidates, k=cfg.rag_k,
                        embedding=encoded.embedding if cfg.embeddings_enabled else None, model_id=ctx.runtime.model_id)
        # The portfolio without the photo too: with it the only reference, its own scores (± 0) would be the answer.
        portfolio = distribution([r.scores for r in candidates])
        neighbours = []
        folder = references_dir(cfg, ctx.advisor.id)
        for n in found:
            prof = reference_profile(n.row)
            # by its place in the portfolio: 2019/best.jpg and 2020/best.jpg are two photos, not one name twice
            path = Path(str(n.row.path))
            name = shown_name(path.relative_to(folder) if path.is_relative_to(folder) else path.name)
            neighbours.append({"name": name, "scores": prof["scores"],
                               "comment": reference_comment(prof["comments"])})
        context = portfolio_context(portfolio["dimensions"], portfolio["count"], neighbours, profile)
        return {"profile": profile, "found": found, "neighbours": neighbours, "portfolio": portfolio,
                "context": context}

    def _result(self, cfg: Any, rows: list[Any], state: dict[str, Any], timings: dict[str, float]) -> AnalysisResult:
        first, second = state["first"], state["second"]
        critique = second.data
        own = {d: int(critique["dimensions"][d]["score"]) for d in DIMENSIONS}
        prior = reference_prior(state["found"])
        for d, v in anchored(own, prior, cfg.rag_reference_weight).items():
            critique["dimensions"][d]["score"] = int(v + 0.5)  # half up, not to even: 4.5 is 5 like 5.5 is 6

        references: list[dict[str, Any]] = []
        files: dict[str, Path] = {}
        for i, (n, info) in enumerate(zip(state["found"], state["neighbours"]), start=1):
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
        extras: dict[str, Any] = {"profile": state["profile"], "references": references}
        if state["portfolio"]["count"]:  # none when the photo is the advisor's only reference
            extras["portfolio"] = state["portfolio"]
        if prior is not None:
            extras["reference_prior"] = {"scores": prior, "weight": cfg.rag_reference_weight, "model_scores": own}
        return AnalysisResult(critique=critique, extras=extras,
                              files=files, timings=timings, inputs=reference_fingerprint(rows))


def _photo_count(folder: Path) -> int:
    """Files named like photos under a references folder (sidecars and hidden files are not)."""
    count = 0
    for _dirpath, _dirnames, names in os.walk(folder):  # links to folders not followed: no loop
        count += sum(1 for n in names if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_SUFFIXES)
    return count
