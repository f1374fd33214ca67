"""What a critique is: the eight dimensions and the JSON Schema the model's output must satisfy."""

from __future__ import annotations

from typing import Any

# How a report is written as text wherever a model reads or learns one (training targets, the ordinal loss's score
# positions): the spacing the constrained decoder emits (daemon.model.constrained.JSON_OPTIONS), so a model trains
# on exactly the tokens it later writes.
JSON_LAYOUT: dict[str, Any] = {"separators": (", ", ": "), "ensure_ascii": False}

DIMENSIONS: tuple[str, ...] = (
    "composition",
    "lighting",
    "focus_sharpness",
    "color_harmony",
    "subject_isolation",
    "depth_perspective",
    "visual_balance",
    "emotional_impact",
)

DIMENSION_LABELS: dict[str, str] = {
    "composition": "Composition",
    "lighting": "Lighting",
    "focus_sharpness": "Focus & sharpness",
    "color_harmony": "Color harmony",
    "subject_isolation": "Subject isolation",
    "depth_perspective": "Depth & perspective",
    "visual_balance": "Visual balance",
    "emotional_impact": "Emotional impact",
}

SCORE_MIN, SCORE_MAX = 0, 10


def critique_schema(comment_max_chars: int = 160) -> dict[str, Any]:
    """The schema the model decodes against. Comment comes before score so a real model reasons first.

    Comments are length-bounded so that a decoder with `max_tokens` headroom always closes the JSON.
    """
    dim = {
        "type": "object",
        "properties": {
            "comment": {"type": "string", "minLength": 1, "maxLength": comment_max_chars},
            "score": {"type": "integer", "minimum": SCORE_MIN, "maximum": SCORE_MAX},
        },
        "required": ["comment", "score"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {
            "dimensions": {
                "type": "object",
                "properties": {d: dim for d in DIMENSIONS},
                "required": list(DIMENSIONS),
                "additionalProperties": False,
            },
            "summary": {"type": "string", "minLength": 1, "maxLength": comment_max_chars},
            "overall_grade": {"type": "integer", "minimum": SCORE_MIN, "maximum": SCORE_MAX},
        },
        "required": ["dimensions", "summary", "overall_grade"],
        "additionalProperties": False,
    }


def profile_schema() -> dict[str, Any]:
    """Pass 1 of RAG: scores only, so it is short to decode."""
    score = {"type": "integer", "minimum": SCORE_MIN, "maximum": SCORE_MAX}
    return {
        "type": "object",
        "properties": {d: score for d in DIMENSIONS},
        "required": list(DIMENSIONS),
        "additionalProperties": False,
    }
