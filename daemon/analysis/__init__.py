"""Analysis strategies behind one interface, and the fallback chain lora -> rag -> baseline.

The worker asks `resolve()` for the strategy that can serve a request; each unavailable step adds a
fallback with the reason, which the report shows. New strategies plug in here without touching the worker.
"""

from __future__ import annotations

import hashlib
import json
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .advisors import Advisor
from ..config import Config
from ..intake.images import LoadedImage

if TYPE_CHECKING:
    from ..limits import Deadline
    from ..model.protocol import Runtime


@dataclass
class AnalysisContext:
    runtime: Runtime  # daemon.model.runtime.ModelRuntime; a Protocol, so importing strategies never imports MLX
    cfg: Config
    advisor: Advisor
    photo: LoadedImage
    cancel: threading.Event | None = None  # set when the daemon stops: the photo goes back to the queue
    deadline: Deadline | None = None  # past it the photo fails (job_timeout_seconds); limits.py

    def limits(self) -> dict[str, Any]:
        """Keyword arguments for every `runtime.generate_json` call, so a stop or a stuck photo ends it."""
        return {"cancel": self.cancel, "deadline": self.deadline}


@dataclass
class AnalysisResult:
    critique: dict[str, Any]  # {"dimensions": {...}, "summary": str, "overall_grade": int}
    adapter: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)  # report sections: profile, references, portfolio
    files: dict[str, Path] = field(default_factory=dict)  # extra files for the report folder: name -> source
    timings: dict[str, float] = field(default_factory=dict)
    inputs: str | None = None  # what it actually read beyond photo and advisor (see Strategy.inputs), if any


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""


class Strategy(ABC):
    name: str
    fallback: str | None = None

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @abstractmethod
    def is_available(self, advisor: Advisor) -> Availability: ...

    batched: bool = False  # analyse_batch runs several photos in one forward pass

    @abstractmethod
    def analyse(self, ctx: AnalysisContext) -> AnalysisResult: ...

    def analyse_batch(self, ctxs: list[AnalysisContext]) -> list[AnalysisResult | Exception]:
        """Several photos of one advisor: each one's result, or the exception `analyse` raised for it. By default
        one after another; a strategy with `batched` runs them in one forward pass."""
        results: list[AnalysisResult | Exception] = []
        for ctx in ctxs:
            try:
                results.append(self.analyse(ctx))
            except Exception as exc:  # noqa: BLE001 - that photo's own outcome
                results.append(exc)
        return results

    def inputs(self, advisor: Advisor) -> str | None:
        """The version of what this mode reads besides the photo and the advisor (rag: the reference index's
        content; lora: the adapter version), read cheaply without the model. A report is reused for a photo only
        while this stays the same."""
        return None


def build_strategies(cfg: Config, ledger: Any = None) -> dict[str, Strategy]:
    """`ledger` (daemon.ledger.Ledger) lets rag read the reference index; without it rag is unavailable."""
    from .baseline import BaselineStrategy
    from .lora import LoraStrategy
    from .rag import RagStrategy

    return {s.name: s for s in (BaselineStrategy(cfg), RagStrategy(cfg, ledger), LoraStrategy(cfg))}


def context_key(sha256: str, advisor: Advisor, effective_mode: str, inputs: str | None, cfg: Config) -> str:
    """What a report depends on: the bytes, the advisor (its definition: a prompt rewritten is another voice), the
    mode used after fallbacks, that mode's inputs (the reference set, the adapter version), the model and the
    settings that shape a critique. Same key, same critique: the photo is a duplicate."""
    from ..intake.images import DECODING

    shaping = [cfg.max_pixels, cfg.max_tokens, cfg.comment_max_chars]
    if DECODING != 1:  # (1, the first, is left out: keys made before it existed stay the same)
        shaping.append(DECODING)
    if effective_mode == "rag":
        shaping += [cfg.rag_k, cfg.rag_reference_weight, cfg.embeddings_enabled]
    doc = json.dumps([sha256, advisor.id, effective_mode, inputs, cfg.model,
                      [advisor.name, advisor.prompt], shaping], ensure_ascii=False)
    return hashlib.sha256(doc.encode("utf-8")).hexdigest()


def resolve(requested: str, advisor: Advisor,
            strategies: dict[str, Strategy]) -> tuple[Strategy, list[dict[str, str]]]:
    """Walk the fallback chain from the requested mode; return the first available strategy."""
    fallbacks: list[dict[str, str]] = []
    current = strategies[requested]
    while True:
        avail = current.is_available(advisor)
        if avail.ok or current.fallback is None:
            return current, fallbacks
        fallbacks.append({"from": current.name, "to": current.fallback, "reason": avail.reason})
        current = strategies[current.fallback]
