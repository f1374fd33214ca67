"""Baseline: one pass, the advisor's prompt and the photo, nothing else."""

from __future__ import annotations

import time

from .critique import critique_schema
from .prompts import critique_prompt
from . import AnalysisContext, AnalysisResult, Availability, Strategy


class BaselineStrategy(Strategy):
    name = "baseline"

    def is_available(self, advisor) -> Availability:
        return Availability(True)

    def analyse(self, ctx: AnalysisContext) -> AnalysisResult:
        t0 = time.perf_counter()
        gen = ctx.runtime.generate_json(ctx.photo.image, critique_prompt(ctx.advisor),
                                        critique_schema(ctx.cfg.comment_max_chars),
                                        max_tokens=ctx.cfg.max_tokens, **ctx.limits())
        return AnalysisResult(critique=gen.data, timings={"generate_s": time.perf_counter() - t0,
                                                          "generated_tokens": gen.generated_tokens})
