"""A deep queue analysed several photos per forward pass (issue 11 item 7, `batch_size`).

At batch 1 a decode step is launch-bound, so when the queue holds more than one photo the worker claims up to
`batch_size` jobs (`Ledger.claim()`, one after another: claiming is the ledger's business) and runs the ones
that can share a pass together: the same advisor and the same mode after fallbacks (a strategy with `batched`:
baseline; lora, with that advisor's adapter; rag, each of its two passes), none of them taken up again after a
crash. Everything else per job is what `Worker.process` does, in its order:
`prepare` (settle checks, hashing, a duplicate found without the model), the model, `finish` (the photo still
the one analysed, the key, the report), and each job's own outcome (`Worker.outcome`), so a photo that fails in
a batch fails alone with its reason. Jobs that cannot share a pass run one by one, as they always did.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from .. import testhooks
from ..analysis import AnalysisContext, resolve
from ..errors import TimedOut
from ..limits import TimeShare

if TYPE_CHECKING:
    from ..ledger import Job
    from .worker import Prepared, Worker

log = logging.getLogger("mondrian.worker")


def run_batch(worker: "Worker", first: "Job") -> bool:
    """Claim more jobs after `first` (up to `batch_size`) and process them all; True (work was done)."""
    jobs = [first]
    while len(jobs) < worker.batch_size() and not worker.stop.is_set():
        job = worker.ledger.claim()
        if job is None:
            break
        jobs.append(job)
    worker.batch = jobs
    worker.current = first
    worker._room_reserved = 0  # the batch's photos reserve outbox room for one another as each is prepared
    worker.busy.set()
    try:
        prepared: list[Prepared] = []
        alone: list[Job] = []
        keys: set[str] = set()
        for job in jobs:
            with worker.outcome(job):
                testhooks.crashpoint("claimed")
                prep = worker.prepare(job, mode_override=_override(job))
                if prep is None:
                    _done(worker, job)
                elif prep.key in keys and not prep.keep_original:
                    alone.append(job)  # the same photo twice in one batch: after the first is published, a duplicate
                else:
                    keys.add(prep.key)
                    prepared.append(prep)
        for group in _groups(worker, prepared):
            if len(group) > 1:
                _analyse_together(worker, group)
            else:
                _analyse_alone(worker, group[0])
        for job in alone:
            with worker.outcome(job):
                worker.process(job, mode_override=_override(job))
            _done(worker, job)
    finally:
        worker.batch = []
        worker.current = None
        worker.busy.clear()
    return True


def _override(job: "Job") -> str | None:
    # A mode asked for with the photo (an API request) is part of the job; inbox photos read their sidecar.
    return job.requested_mode if job.mode_source == "command" else None


def _done(worker: "Worker", job: "Job") -> None:
    worker.batch = [j for j in worker.batch if j.id != job.id]


def _groups(worker: "Worker", prepared: list["Prepared"]) -> list[list["Prepared"]]:
    """Jobs that can share a pass, in claim order: same advisor, same planned mode, a strategy that batches."""
    groups: dict[tuple, list[Prepared]] = {}
    for prep in prepared:
        # A job in hand when Mondrian died before runs alone: if a photo crashes the process, the next crash
        # takes only that photo down, and the crash check (Worker._judge) sees it by itself.
        shared = prep.planned.batched and prep.job.attempts <= 1
        key = (prep.advisor.id, prep.planned.name) if shared else ("alone", prep.job.id)
        groups.setdefault(key, []).append(prep)
    return list(groups.values())


def _analyse_alone(worker: "Worker", prep: "Prepared") -> None:
    with worker.outcome(prep.job):
        t1 = time.perf_counter()
        try:
            strategy, fallbacks, result = worker._analyse(prep.job, prep.src, prep.photo, prep.advisor,
                                                          prep.requested)
        except TimedOut:
            worker.timed_out(prep)
        else:
            worker.finish(prep, strategy, fallbacks, result, time.perf_counter() - t1)
    _done(worker, prep.job)


def _analyse_together(worker: "Worker", group: list["Prepared"]) -> None:
    """One batched pass for the group; then each job finishes (or fails) on its own."""
    t1 = time.perf_counter()
    try:
        runtime = worker.loaded_runtime()
    except Exception as exc:  # every job of the batch meets it, each with its own outcome
        for prep in group:
            with worker.outcome(prep.job):
                raise exc
            _done(worker, prep.job)
        return
    # Resolved again now the model is loaded, as `_analyse` does; a job whose mode changed meanwhile runs alone.
    strategy = group[0].planned
    resolved = [resolve(p.requested, p.advisor, worker.strategies) for p in group]
    together = [i for i, (s, _) in enumerate(resolved) if s is strategy]
    for i in range(len(group)):
        if i not in together:
            _analyse_alone(worker, group[i])
    if not together:
        return
    preps = [group[i] for i in together]
    log.info("analysing %d photos together as %s (%s): %s", len(preps), preps[0].advisor.name, strategy.name,
             ", ".join(p.job.rel_path for p in preps))
    for prep in preps:
        testhooks.poison_point(prep.src.name)
    # job_timeout_seconds is each photo's: one limit for the batch timed out all of them where each alone took a
    # fraction of it (and `retry` batched them again), and a batch's sum of limits let one photo run on the others'
    # share once they had finished. Each is charged its share of the time spent on the photos in hand.
    contexts = [AnalysisContext(runtime=runtime, cfg=worker.cfg, advisor=p.advisor, photo=p.photo, cancel=worker.stop,
                                deadline=TimeShare(worker.cfg.job_timeout_seconds, among=len(preps))) for p in preps]
    testhooks.crashpoint("analysing")
    try:
        outcomes = strategy.analyse_batch(contexts)
    except Exception as exc:  # the batch as a whole (an adapter that cannot be loaded): each job meets it
        outcomes = [exc] * len(preps)
    analysis_s = time.perf_counter() - t1
    for i, prep, outcome in zip(together, preps, outcomes):
        with worker.outcome(prep.job):
            if isinstance(outcome, TimedOut):
                worker.timed_out(prep)
            elif isinstance(outcome, Exception):
                raise outcome
            else:
                # analysis_s is the batch's, shared: the report says with how many photos (generate_s: its own).
                outcome.timings["photos_analysed_together"] = len(preps)
                worker.finish(prep, strategy, resolved[i][1], outcome, analysis_s)
        _done(worker, prep.job)
