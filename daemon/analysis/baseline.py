"""Baseline: one pass, the advisor's prompt and the photo, nothing else."""

from __future__ import annotations

import time

from ..model.protocol import BatchRequest
from .critique import critique_schema
from .prompts import critique_prompt
from . import AnalysisContext, AnalysisResult, Availability, Strategy


def critique_request(ctx: AnalysisContext) -> BatchRequest:
    """One photo's critique pass (baseline's, lora's through its adapter)."""
    return BatchRequest(ctx.photo.image, critique_prompt(ctx.advisor), critique_schema(ctx.cfg.comment_max_chars),
                        ctx.cfg.max_tokens, cancel=ctx.cancel, deadline=ctx.deadline)


class BaselineStrategy(Strategy):
    name = "baseline"
    batched = True

    def is_available(self, advisor) -> Availability:
        return Availability(True)

    def analyse(self, ctx: AnalysisContext) -> AnalysisResult:
        t0 = time.perf_counter()
        gen = ctx.runtime.generate_json(ctx.photo.image, critique_prompt(ctx.advisor),
                                        critique_schema(ctx.cfg.comment_max_chars),
                                        max_tokens=ctx.cfg.max_tokens, **ctx.limits())
        return _result(gen, t0)

    def analyse_batch(self, ctxs: list[AnalysisContext]) -> list[AnalysisResult | Exception]:
        t0 = time.perf_counter()
        gens = ctxs[0].runtime.generate_json_batch([critique_request(c) for c in ctxs])
        return [g if isinstance(g, Exception) else _result(g, t0, own=True) for g in gens]


def _result(gen, t0: float, own: bool = False) -> AnalysisResult:
    """`own`: the row's own time in its batch (from its group's pass to its last token), not the whole batch's."""
    seconds = gen.seconds if own else time.perf_counter() - t0
    return AnalysisResult(critique=gen.data, timings={"generate_s": seconds, "generated_tokens": gen.generated_tokens})
