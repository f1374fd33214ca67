"""RAG: ground the critique in the advisor's reference portfolio (pass 1 profile, retrieval, pass 2)."""

from __future__ import annotations

from ..advisors import references_dir
from . import AnalysisContext, AnalysisResult, Availability, Strategy


class RagStrategy(Strategy):
    name = "rag"
    fallback = "baseline"

    def is_available(self, advisor) -> Availability:
        folder = references_dir(self.cfg, advisor.id)
        return Availability(False, f"no indexed reference photos for {advisor.name} yet (add photos to "
                                   f"{folder.relative_to(self.cfg.home) if folder.is_relative_to(self.cfg.home) else folder}"
                                   f" and run `mondrian references index --advisor {advisor.id}`)")

    def analyse(self, ctx: AnalysisContext) -> AnalysisResult:  # pragma: no cover - never available yet
        raise NotImplementedError("rag analysis arrives with the reference index")
