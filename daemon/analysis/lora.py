"""LoRA: one pass through the advisor's own adapter, trained on their references (jobs/train.py).

The adapter is the advisor's `current` version (adapters/<advisor>/current -> vNNNN). It is resolved to
its version folder once per photo, and that folder's weights are what the runtime swaps into the one
shared base model for this generation only; the report names that version. Without a usable adapter
(none trained yet, a dangling pointer, trained for another base model, or one that failed to load) the
chain falls back to rag, and the reason says which.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .advisors import advisor_ids
from .baseline import critique_request
from .critique import critique_schema
from .prompts import critique_prompt
from . import AnalysisContext, AnalysisResult, Availability, Strategy

log = logging.getLogger("mondrian.lora")


def _adapter_inputs(version) -> str:
    # The label names the version; the fingerprint (of its weights, when the manifest has one) tells a version
    # folder made again under a reused name from the one a report was made with.
    return f"adapter:{version.label}:{version.fingerprint or ''}"


class LoraStrategy(Strategy):
    name = "lora"
    fallback = "rag"
    batched = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        from ..model.adapter_store import AdapterStore

        self.store = AdapterStore(cfg.adapters_dir)
        self._base_fingerprint: str | None = None
        # Why an adapter could not be used, keyed by its files' identity (real path, size and mtime_ns of config and
        # weights), not by folder: a repaired file or a version promoted again under that name is tried afresh.
        # Holds both what a look at the files found (None: nothing visibly wrong) and what loading it raised.
        self._broken: dict[tuple, str | None] = {}
        self.pinned: dict[str, str] = {}  # advisor id -> version to use instead of current (`analyze --adapter`)

    def _version(self, advisor_id: str):
        """The version to use: the pinned one if the command asked for one, else `current`. None if unusable."""
        name = self.pinned.get(advisor_id)
        if name is None:
            return self.store.current(advisor_id)
        version = next((v for v in self.store.versions(advisor_id) if v.name == name), None)
        return version if version is not None and version.complete() else None

    def _base(self) -> str | None:
        """Fingerprint of the configured base model (computed once; None if it cannot be resolved here)."""
        if self._base_fingerprint is None:
            from ..model.adapter_store import configured_base

            self._base_fingerprint = configured_base(self.cfg)  # None again until it can be found
        return self._base_fingerprint

    def is_available(self, advisor) -> Availability:
        train = f"`mondrian train --advisor {advisor.id}`"
        version = self._version(advisor.id)
        if version is None:
            name = self.pinned.get(advisor.id) or self.store.current_name(advisor.id)
            if name:
                return Availability(False, f"{advisor.name}'s current adapter {name} is missing or incomplete (run "
                                           f"`mondrian adapters rollback --advisor {advisor.id}` or {train})")
            problem = self.store.current_problem(advisor.id)
            if problem:  # `current` deleted or lost in a copy, or its weights damaged
                remedy = (f"`mondrian adapters rollback --advisor {advisor.id}`" if self.store.repair_targets(advisor.id)
                          else train)
                return Availability(False, f"{advisor.name}'s current adapter points at {problem} (run {remedy})")
            latest = self.store.latest(advisor.id)
            if latest is not None and not latest.promoted:  # "run train" would only repeat the same refusal
                why = latest.decision.get("reason") or "the quality gate refused it"
                return Availability(False, f"no adapter of {advisor.name} has passed the quality gate yet: "
                                           f"{latest.name} was not promoted ({why})")
            original = self.store.original_layout(advisor.id)
            if original:
                return Availability(False, f"no adapter of {advisor.name} Mondrian can use yet: {original}")
            return Availability(False, f"no trained adapter for {advisor.name} yet (run {train})")
        broken = self._problem(version)
        if broken:
            return Availability(False, f"{advisor.name}'s adapter {version.name} could not be loaded ({broken}); "
                                       f"run {train}")
        copied = version.copied_from(advisor_ids(self.cfg))
        if copied:
            return Availability(False, f"{advisor.name}'s adapter {version.name} was {copied}: run {train}")
        trained_on = (version.manifest.get("base_model") or {}).get("fingerprint")
        base = self._base()
        if trained_on and base and trained_on != base:
            spec = (version.manifest.get("base_model") or {}).get("spec", "another model")
            return Availability(False, f"{advisor.name}'s adapter {version.name} was trained for base model {spec}, "
                                       f"not the configured {self.cfg.model} (run {train})")
        return Availability(True)

    def _shown(self, version, text: str) -> str:
        """`text` with the version folder's absolute path (as given or resolved) said relative to the home, as
        adapters/<advisor>/vNNNN: reports never show absolute paths."""
        shown = f"adapters/{version.advisor}/{version.name}"
        try:
            rel = Path(os.path.relpath(version.path, self.cfg.home)).as_posix()
            shown = shown if rel.startswith("..") else rel  # an adapters folder set outside the home
        except ValueError:
            pass
        for folder in sorted({str(Path(version.path).resolve()), str(version.path)}, key=len, reverse=True):
            text = text.replace(folder, shown)
        for home in sorted({str(Path(self.cfg.home).resolve()), str(self.cfg.home)}, key=len, reverse=True):
            text = text.replace(home + os.sep, "")
        return text

    def _problem(self, version) -> str | None:
        """Why this version's adapter cannot be loaded (what loading it raised, or what its files show without the
        model), or None. Checked before the photo is analysed, so a broken adapter falls back on the first photo."""
        from ..model.adapter_store import adapter_problem, files_identity, nonfinite_weights

        key = files_identity(version.path)
        if key not in self._broken:
            if len(self._broken) > 256:  # every edit of an adapter adds one: never grows without bound
                self._broken.clear()
            problem = adapter_problem(version.path) or nonfinite_weights(version.path)
            self._broken[key] = self._shown(version, f"{version.path}/{problem}") if problem else None
        return self._broken[key]

    def inputs(self, advisor) -> str | None:
        version = self.store.current(advisor.id)
        return _adapter_inputs(version) if version is not None else None

    def analyse(self, ctx: AnalysisContext) -> AnalysisResult:
        return self._run([ctx], batch=False)[0]

    def analyse_batch(self, ctxs: list[AnalysisContext]) -> list[AnalysisResult | Exception]:
        return self._run(ctxs, batch=True)

    def _run(self, ctxs: list[AnalysisContext], *, batch: bool) -> list:
        """The advisor's adapter version, resolved once for all `ctxs` (one advisor), through `generate_json`
        for one photo (raising), or `generate_json_batch` (each photo's result or exception)."""
        from ..model.adapters import AdapterError

        advisor = ctxs[0].advisor
        version = self._version(advisor.id)
        if version is None:  # the pointer changed since is_available: never guess another adapter
            raise RuntimeError(f"{advisor.name}'s adapter disappeared while the photo was queued")
        folder = Path(version.path).resolve()  # this version's own folder, whatever `current` says later
        t0 = time.perf_counter()
        try:
            if batch:
                gens = ctxs[0].runtime.generate_json_batch([critique_request(c) for c in ctxs], adapter=folder)
            else:
                ctx = ctxs[0]
                gens = [ctx.runtime.generate_json(ctx.photo.image, critique_prompt(ctx.advisor),
                                                  critique_schema(ctx.cfg.comment_max_chars),
                                                  max_tokens=ctx.cfg.max_tokens, adapter=folder, **ctx.limits())]
        except AdapterError as exc:
            # Keyed by the files as they were when they failed: is_available sends this advisor's photos to the
            # fallback from now on, until the files change. The worker analyses this photo again (no attempt spent),
            # and it falls back too. The message is the one the report shows: no absolute path.
            from ..model.adapter_store import files_identity

            shown = self._shown(version, str(exc))
            self._broken[files_identity(folder)] = shown
            log.warning("adapter %s cannot be used: %s", version.label, shown)
            raise AdapterError(shown) from exc
        return [g if isinstance(g, Exception) else
                AnalysisResult(critique=g.data, adapter=version.label, inputs=_adapter_inputs(version),
                               timings={"generate_s": g.seconds if batch else time.perf_counter() - t0,
                                        "generated_tokens": g.generated_tokens})
                for g in gens]
