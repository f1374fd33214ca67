"""The words sent to the model. Kept apart so that prompt changes are reviewed as prompt changes."""

from __future__ import annotations

from typing import Any, Mapping

from .advisors import Advisor
from .critique import DIMENSION_LABELS, DIMENSIONS

_DIMENSION_LIST = "\n".join(f"- {d}: {DIMENSION_LABELS[d]}" for d in DIMENSIONS)


def critique_prompt(advisor: Advisor, context: str = "") -> str:
    return (
        f"{advisor.prompt}\n\n"
        "Critique the photograph in your own voice. For each dimension below, write one or two specific "
        "sentences about what you see, then a score from 0 (poor) to 10 (masterful):\n"
        f"{_DIMENSION_LIST}\n"
        "Then a one-sentence summary and an overall grade from 0 to 10.\n"
        + (f"\n{context}\n" if context else "")
        + "Answer only with the JSON object."
    )


def profile_prompt(advisor: Advisor) -> str:
    return (
        f"{advisor.prompt}\n\n"
        "Score the photograph from 0 to 10 on each dimension, with no comments:\n"
        f"{_DIMENSION_LIST}\n"
        "Answer only with the JSON object."
    )


def portfolio_context(distribution: Mapping[str, Mapping[str, float]], count: int,
                      neighbours: list[Mapping[str, Any]], profile: Mapping[str, int]) -> str:
    """Pass 2 of RAG: ground the critique in what the advisor actually shot."""
    if count:
        lines = [f"Your own portfolio ({count} photographs) scores, mean ± spread per dimension:"]
        lines += [f"- {d}: {distribution[d]['mean']:.1f} ± {distribution[d]['std']:.1f}" for d in DIMENSIONS]
    else:
        lines = ["Your own portfolio holds no other photograph yet."]
    lines.append("Your photographs most similar to this one:")
    if not neighbours:
        lines.append("- none besides this photograph itself, which is one of yours")
    for n in neighbours:
        scores = ", ".join(f"{d}={n['scores'][d]}" for d in DIMENSIONS)
        note = f" — {n['comment']}" if n.get("comment") else ""
        lines.append(f"- {n['name']}: {scores}{note}")
    lines.append("A first look at this photograph scored it: "
                 + ", ".join(f"{d}={profile[d]}" for d in DIMENSIONS))
    lines.append("Compare this photograph with your own work when you critique and score it.")
    return "\n".join(lines)
