"""LoRA: one pass through the advisor's own adapter, trained on their references."""

from __future__ import annotations

from . import AnalysisContext, AnalysisResult, Availability, Strategy


class LoraStrategy(Strategy):
    name = "lora"
    fallback = "rag"

    def is_available(self, advisor) -> Availability:
        return Availability(False, f"no trained adapter for {advisor.name} yet (run `mondrian train --advisor "
                                   f"{advisor.id}`)")

    def analyse(self, ctx: AnalysisContext) -> AnalysisResult:  # pragma: no cover - never available yet
        raise NotImplementedError("lora analysis arrives with adapter training")
