"""Train one advisor's LoRA adapter in a child process, evaluate it, and promote it if it earns it.

`run_training()` (called by the nightly job in the daemon and by `mondrian train`) starts
`python -m jobs.train` as a child process, so a crash or an out-of-memory kill in MLX cannot take the
daemon down; the daemon keeps serving the inbox meanwhile. The child reports progress as JSON lines on
a pipe of its own (the trainer prints plenty on stdout, which goes to a log file instead); the parent
hands each line to its `on_progress` callback (the daemon and the CLI record it with
`ledger.set_event("training", ...)` for `mondrian status`).

The child: builds the dataset from the curator-scored references (jobs.dataset: train / validation / test
fixed by content hash), loads the base model exactly as the daemon does (same pixel cap, same chat
template), fits LoRA on it (daemon.model.fitting: rank 8, alpha 16 by default, completion tokens only,
every sample checked for its image tokens, early-stopped on validation loss, keeping the best weights),
then evaluates the candidate and the current adapter (or the base model) on the test references
(jobs.evaluate) and writes the candidate's folder: adapter_config.json, adapters.safetensors,
metrics.json, manifest.json (which records the three splits). The parent then decides (the gate, or
`promote="always"` / `--promote-anyway`, recorded in the manifest) and commits atomically
(daemon.model.adapter_store). The child has `max_minutes` of wall-clock time; past that it is killed and
the run fails with that reason (the nightly scheduler goes on).

Settings come from the `[lora]` table of mondrian.toml (see `TrainSettings`).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal

from daemon.analysis.advisors import advisor_arg
from daemon.config import CONFIG_NAME, Config, ConfigError, coerce_setting, load_config
from daemon import testhooks
from daemon.hints import child_env, mondrian, serve
from daemon.fsutil import check_own_folder, open_own_file

if TYPE_CHECKING:
    from daemon.model.fitting import FitSettings

    from .evaluate import Gate

log = logging.getLogger("mondrian.train")

PROGRESS_FD_ENV = "MONDRIAN_TRAIN_PROGRESS_FD"


# (lowest allowed, first not allowed) of each numeric [lora] setting; None: no bound on that side. A negative
# learning rate trains away from the advisor, and a rank of 0 fails only after the dataset is built.
LIMITS: dict[str, tuple[float | None, float | None]] = {
    "rank": (1, 1025), "alpha": (0.001, None), "dropout": (0, 1), "learning_rate": (1e-8, 1),
    "iters": (0, None), "epochs": (0.01, None), "min_iters": (1, None), "max_iters": (1, None),
    "batch_size": (1, 1025), "eval_every": (0, None), "patience": (1, None), "variants": (0, 101),
    "holdout_fraction": (0, 1), "validation_fraction": (0, 1), "keep_versions": (1, None),
    "promote_margin": (0, None), "min_test_photos": (1, None), "max_minutes": (0.01, None),
    "max_seq_length": (1, None), "seed": (0, None)}


@dataclass(frozen=True)
class TrainSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    learning_rate: float = 1e-4
    iters: int = 0  # 0: epochs x training rows, clamped to [min_iters, max_iters]
    epochs: float = 6.0
    min_iters: int = 60
    max_iters: int = 1500
    batch_size: int = 1
    eval_every: int = 0  # 0: about ten validation evaluations per run
    patience: int = 3  # evaluations without improvement before stopping early
    variants: int = 4  # augmented copies per training reference
    augment: bool = True
    exposure: bool = True
    holdout_fraction: float = 0.2  # the test split: promotion and every reported metric
    validation_fraction: float = 0.15  # early stopping and the choice of checkpoint
    keep_versions: int = 5
    promote_margin: float = 0.1  # mean MAE on the test split must beat the current one's by this much
    min_test_photos: int = 5  # fewer test photos: nothing is promoted (the reason says so)
    use_model_scores: bool = False  # also train on references the model scored itself (circular: off)
    max_minutes: float = 180.0  # wall-clock limit of one training run
    max_seq_length: int = 8192
    seed: int = 0
    nightly: bool = True

    @classmethod
    def from_config(cls, cfg: Config, **overrides: Any) -> "TrainSettings":
        table = dict(cfg.extra.get("lora", {}) or {})
        given = {k: v for k, v in overrides.items() if v is not None}  # the command line's (`train --iters`)
        table.update(given)
        known = {f.name: f for f in fields(cls)}

        def origin(key: str, value: Any) -> str:
            return (f"--{key.replace('_', '-')} {value!r} on the command line" if key in given
                    else f"[lora] {key} = {value!r} in {cfg.home / CONFIG_NAME}")
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key not in known:  # a typo must not silently train with the default instead
                close = difflib.get_close_matches(key, list(known), n=1)
                hint = f"did you mean `{close[0]}`?" if close else f"the settings are: {', '.join(sorted(known))}"
                if key in {f.name for f in fields(Config)}:  # written below `[lora]`, it belongs to that section
                    hint = (f"`{key}` is a setting of its own, not a training one: move its line above the [lora] "
                            f"line (every line after a [section] header belongs to that section)")
                raise ConfigError(f"unknown setting `{key}` in the [lora] section of {cfg.home / CONFIG_NAME}; {hint}")
            # As strictly as the top-level settings: `rank = 8.9` or `augment = "flase"` is refused, not trained on.
            values[key] = coerce_setting(key, value, getattr(cls, key), origin(key, value))
        for key, value in values.items():
            low, high = LIMITS.get(key, (None, None))
            if isinstance(value, bool) or (low is None and high is None):
                continue
            if value != value or value in (float("inf"), float("-inf")) or \
                    (low is not None and value < low) or (high is not None and value >= high):
                where = ("a finite number, " if value != value or abs(value) == float("inf") else "") + \
                        (f"at least {low:g}" if low is not None else "") + \
                        (" and " if low is not None and high is not None else "") + \
                        (f"below {high:g}" if high is not None else "")
                raise ConfigError(f"{origin(key, value)}: it must be {where}")
        settings = cls(**values)
        if settings.max_iters < settings.min_iters:
            raise ConfigError(f"[lora] max_iters = {settings.max_iters} is below min_iters = {settings.min_iters} in "
                              f"{cfg.home / CONFIG_NAME}")
        return settings

    def gate(self) -> "Gate":
        from .evaluate import Gate

        return Gate(min_test_photos=self.min_test_photos, mae_margin=self.promote_margin,
                    holdout_fraction=self.holdout_fraction)

    def iterations(self, train_rows: int) -> int:
        if self.iters > 0:
            return self.iters
        n = int(round(self.epochs * train_rows / max(1, self.batch_size)))
        return max(self.min_iters, min(self.max_iters, n))

    def fit_settings(self, train_rows: int) -> "FitSettings":
        """The settings of the LoRA fit itself, for `train_rows` training rows."""
        from daemon.model.fitting import FitSettings

        return FitSettings(steps=self.iterations(train_rows), rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                           learning_rate=self.learning_rate, batch_size=self.batch_size, eval_every=self.eval_every,
                           patience=self.patience, max_seq_length=self.max_seq_length, seed=self.seed)


def _when_test_photos_moved(gate: dict[str, Any], ev: dict[str, Any], needed: int, advisor_id: str) -> dict[str, Any]:
    """A refusal for too few test photos where enough were there until some were renamed or moved during the run:
    its advice ("add curator-scored references") was wrong, and the nightly job took the run for a judgement of these
    very references and never tried again. Marked so (`references_moved`), it says what happened and is tried again."""
    left_out = ev.get("left_out") or []
    n = int((ev.get("candidate") or {}).get("n") or 0)
    if gate.get("promoted") or not left_out or n >= needed or int(ev.get("held_out") or 0) < needed:
        return gate
    return {**gate, "references_moved": True,
            "reason": f"too few test photos to judge: {n}, because {len(left_out)} of the {ev.get('held_out')} were "
                      f"renamed, moved or removed while it trained; once the references stay where they are, run "
                      f"`{mondrian()} references index --advisor {advisor_id}` and `{mondrian()} train --advisor "
                      f"{advisor_id}` (the nightly job tries again by itself)"}


class TrainingError(RuntimeError):
    pass


@dataclass
class TrainOutcome:
    advisor: str
    ok: bool
    version: str | None = None
    promoted: bool = False
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    log_path: str | None = None
    stopped: bool = False  # stopped on purpose (Mondrian shutting down, Ctrl-C): not a failure


# ================================================================================================
# The child process
# ================================================================================================
class _Reporter:
    def __init__(self, fd: int | None) -> None:
        self.fh = os.fdopen(fd, "w", buffering=1, encoding="utf-8") if fd is not None else None

    def send(self, **event: Any) -> None:
        if self.fh is None:
            return
        try:
            self.fh.write(json.dumps(event, default=str) + "\n")
            self.fh.flush()
        except (BrokenPipeError, OSError):
            os._exit(3)  # the parent is gone: nobody will use this adapter


def _watch_parent(parent: int) -> None:
    """Exit when the parent dies (a SIGKILLed daemon must not leave a trainer running)."""
    def loop() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(4)

    threading.Thread(target=loop, daemon=True, name="parent-watch").start()


def child_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.train")
    ap.add_argument("--home", required=True)
    ap.add_argument("--advisor", type=advisor_arg, required=True)
    ap.add_argument("--staging", required=True)
    ap.add_argument("--model")
    ap.add_argument("--settings", default="{}", help="JSON overrides of the [lora] settings")
    ap.add_argument("--parent", type=int, default=0)
    args = ap.parse_args(argv)
    fd = os.environ.get(PROGRESS_FD_ENV)
    rep = _Reporter(int(fd) if fd else None)
    if args.parent:
        _watch_parent(args.parent)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        cfg = load_config(args.home, model=args.model)
        serve(cfg.home)  # the refusals it writes name commands for this home
        settings = TrainSettings.from_config(cfg, **json.loads(args.settings))
        metrics = train_candidate(cfg, args.advisor, Path(args.staging), settings, rep.send)
    except Exception as exc:  # report it in words, then fail
        log.exception("training failed")
        rep.send(event="error", message=f"{type(exc).__name__}: {exc}")
        return 1
    rep.send(event="done", staging=args.staging, metrics=metrics)
    return 0


def train_candidate(cfg: Config, advisor_id: str, staging: Path, settings: TrainSettings,
                    send: Callable[..., None]) -> dict[str, Any]:
    """Everything the child does; writes the candidate folder and returns its metrics."""
    from daemon.analysis.advisors import get_advisor
    from daemon.analysis.prompts import critique_prompt
    from daemon.model.adapter_store import (MANIFEST_NAME, METRICS_NAME, AdapterStore, atomic_write_json,
                                            base_model_fingerprint)

    from . import dataset as ds

    started = time.time()
    advisor = get_advisor(cfg, advisor_id)
    store = AdapterStore(cfg.adapters_dir, keep=settings.keep_versions)
    send(event="phase", phase="dataset", pid=os.getpid())
    refs = ds.collect_references(cfg, advisor_id)
    if len(refs) < ds.MIN_REFERENCES:  # too few even with the model's scores: photos not indexed yet come first
        _refuse_unindexed(cfg, advisor_id, refs, len(refs))
    usable, left_out = ds.select_targets(refs, advisor_id, settings.use_model_scores)
    if len(usable) < ds.MIN_REFERENCES:
        _refuse_unindexed(cfg, advisor_id, refs, len(usable))
    data_dir = cfg.var_dir / "datasets" / advisor_id / staging.name.lstrip(".")
    if os.path.lexists(data_dir.parent):  # a file (or a link) in its place: named, not "Not a directory"
        check_own_folder(data_dir.parent)
    testhooks.crashpoint("dataset")
    built = ds.build_dataset(cfg, advisor, usable, data_dir,
                             ds.DatasetSettings(variants=settings.variants, holdout_fraction=settings.holdout_fraction,
                                                validation_fraction=settings.validation_fraction,
                                                augment=settings.augment, exposure=settings.exposure))
    _prune_datasets(data_dir.parent, keep=2)
    splits = built.splits
    for why in built.left_out:
        log.warning("reference left out of training (renamed, moved or removed since it was indexed?): %s", why)
    unread = (f"{len(built.left_out)} reference(s) left out of training, renamed, moved or removed since they were "
              f"indexed: {ds.first_few(built.left_out)}") if built.left_out else None
    send(event="phase", phase="loading", train_rows=built.train_rows, validation=len(splits.validation),
         held_out=len(splits.test), curator=ds.sources(refs)["curator"], model_scored=len(left_out),
         **({"reason": unread} if unread else {}))

    from daemon.model.fitting import fit_lora
    from daemon.model.runtime import ModelRuntime

    runtime = ModelRuntime.load(cfg.model, var_dir=cfg.var_dir, max_pixels=cfg.max_pixels)
    data = ds.load_built(built.path)
    fitted = fit_lora(runtime, data["train"], data["validation"], settings.fit_settings(built.train_rows),
                      scratch=Path(built.path) / "trainer-scratch.safetensors", on_progress=lambda e: send(**e))
    fit = fitted.metrics

    # -- the candidate folder -----------------------------------------------------------------
    fitted.save(staging)

    from .evaluate import evaluate, readable, seen_by

    testhooks.crashpoint("evaluating")
    test, gone = readable(splits.test, cfg.max_pixels)
    for why in gone:
        log.warning("test reference left out of the evaluation (renamed, moved or removed during training?): %s", why)
    notes = [f"{len(gone)} test reference(s) left out of the evaluation, renamed, moved or removed during training: "
             f"{ds.first_few(gone)}"] if gone else []

    current = store.current(advisor_id)
    base_fp = base_model_fingerprint(runtime.path)
    baseline_adapter, baseline_label = None, "base"
    unfair: list[str] = []
    if current is not None and current.manifest.get("base_model", {}).get("fingerprint") == base_fp:
        # The current version is judged only on test photos it did not learn from. Too few of those left (the
        # fractions changed, ratings were written into the files): the candidate must beat the base model instead.
        seen = seen_by(current.manifest)
        fair = [p for p in test if p.sha256 not in seen]
        unfair = [Path(p.path).name for p in test if p.sha256 in seen]
        if len(fair) >= settings.min_test_photos or not unfair:
            baseline_adapter, baseline_label, test = current.path, current.name, fair
            if unfair:
                notes.append(f"{len(unfair)} test photo(s) left out of the comparison: {current.name} learned from "
                             f"them ({ds.first_few(unfair)})")
        else:
            notes.append(f"{len(unfair)} of the {len(test)} test photos were in {current.name}'s own training, too "
                         f"many to judge it fairly: the candidate is compared with the base model")
            unfair = []
    for note in notes[1 if gone else 0:]:
        log.warning("%s", note)
    send(event="phase", phase="evaluating", held_out=len(test), **({"reason": "; ".join(notes)} if notes else {}))

    prompt = critique_prompt(advisor)
    kw = dict(comment_max_chars=cfg.comment_max_chars, max_tokens=cfg.max_tokens)

    def progress(label: str) -> Any:  # each test photo, as training reports its steps
        return lambda done, total: send(event="progress", phase="evaluating", label=label, step=done, steps=total)

    candidate = evaluate(runtime, test, prompt, adapter=staging, label="candidate",
                         on_photo=progress("candidate"), **kw)
    testhooks.crashpoint("evaluating_baseline")
    try:
        baseline = evaluate(runtime, test, prompt, adapter=baseline_adapter, label=baseline_label,
                            on_photo=progress(baseline_label), **kw)
    except Exception as exc:  # an unusable current adapter: compare with the base model instead
        log.warning("current adapter %s cannot be evaluated (%s); comparing with the base model", baseline_label, exc)
        baseline = evaluate(runtime, test, prompt, adapter=None, label="base", on_photo=progress("base"), **kw)

    from .evaluate import bootstrap

    cand, base = candidate.to_dict(), baseline.to_dict()
    metrics = {"advisor": advisor_id, "training": fit, "evaluation": {
        "candidate": cand, "baseline": base, "held_out": len(splits.test), "split": "test", "left_out": gone,
        "left_out_seen_by_baseline": unfair,
        "intervals": bootstrap(cand, base)}, "dataset_left_out": built.left_out,
        "seconds": round(time.time() - started, 2)}
    member = {sha: name for name, shas in splits.record().items() for sha in shas}
    manifest = {
        # Of every reference, model-scored ones included: what the nightly check compares (jobs.nightly)
        "advisor": advisor_id, "created_at": time.time(), "fingerprint": ds.fingerprint(refs),
        "references": [{"sha256": r.sha256, "path": r.path, "source": r.source, "scores": r.scores,
                        "split": member.get(r.sha256, "left out: model-scored"),
                        "held_out": member.get(r.sha256) == "test"} for r in refs],
        "splits": splits.record(),
        "held_out": [r.sha256 for r in splits.test],  # = splits.test (older readers)
        "sources": {**ds.sources(refs), "used_model_scores": settings.use_model_scores},
        "base_model": {"id": runtime.model_id, "spec": cfg.model, "path": runtime.path, "fingerprint": base_fp},
        "max_pixels": cfg.max_pixels, "comment_max_chars": cfg.comment_max_chars,
        "settings": asdict(settings), "dataset": str(built.path), "train_rows": built.train_rows,
    }
    atomic_write_json(staging / MANIFEST_NAME, manifest)
    atomic_write_json(staging / METRICS_NAME, metrics)
    return metrics


def _refuse_unindexed(cfg: Config, advisor_id: str, refs: list[Any], usable: int) -> None:
    """Too few references to train on: say why in terms that lead somewhere. Photos the index has not seen yet
    (copied in while no daemon ran), or changed since it read them, are indexed by a command; copies of one photo
    count once and references skipped for a bad sidecar stay skipped however often they are indexed again (that
    advice went round in a circle), so those are named as what they are; an empty folder is named as the place
    references go."""
    from daemon.analysis.advisors import references_dir
    from daemon.intake.images import PHOTO_SUFFIXES
    from daemon.ledger import Ledger
    from daemon.references.indexer import shown_name

    from .dataset import MIN_REFERENCES, DatasetError, _changed_since_indexed, _row_value, reference_from_row

    folder = references_dir(cfg, advisor_id)
    counted = set()
    for r in refs:
        with contextlib.suppress(OSError):
            counted.add(os.path.realpath(r.path))
    ledger = Ledger.for_config(cfg)
    try:
        rows = {}
        for row in ledger.references(advisor_id):
            with contextlib.suppress(OSError, TypeError):
                rows[os.path.realpath(str(_row_value(row, "path")))] = row
        skipped = {str(e.get("file")) for e in (ledger.events().get("reference_errors", ([], None))[0] or [])
                   if e.get("advisor") == advisor_id}
    finally:
        ledger.close()
    waiting = copies = passed_over = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if f.startswith(".") or not f.lower().endswith(PHOTO_SUFFIXES):
                continue
            path = os.path.join(root, f)
            real = os.path.realpath(path)
            row = rows.get(real)
            if real in counted:
                continue
            if row is not None and reference_from_row(row) is not None and not _changed_since_indexed(
                    Path(real), _row_value(row, "indexed_at"), str(_row_value(row, "sha256"))):
                copies += 1  # indexed as it is, and left out as a copy of a photo counted
            elif row is None and shown_name(os.path.relpath(path, folder)) in skipped or (
                    row is not None and reference_from_row(row) is None):
                passed_over += 1  # its sidecar cannot be used: indexing again changes nothing
            else:
                waiting += 1  # not indexed, or changed since it was
    have = f"{usable} usable reference photo(s) are indexed; training needs at least {MIN_REFERENCES}"
    if waiting:
        raise DatasetError(f"{have}, and {waiting} photo(s) in {folder} are not indexed as they are now: index "
                           f"them with `{mondrian()} references index --advisor {advisor_id}` (the running daemon "
                           f"does it by itself), then train again")
    why = []
    if copies:
        why.append(f"{copies} are copies of photos already counted (the same photo counts once)")
    if passed_over:
        why.append(f"{passed_over} were skipped (`{mondrian()} references list --advisor {advisor_id}` says why; "
                   f"fix them, then `{mondrian()} references index --advisor {advisor_id}`)")
    raise DatasetError(f"{have}" + (f": of the photos in {folder}, {' and '.join(why)}" if why else "")
                       + f". Add more of {advisor_id}'s photos (each with its scores, see the README's "
                         f"\"References\") to {folder}, then train again")


def _prune_datasets(folder: Path, keep: int) -> None:
    try:
        dirs = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: p.stat().st_mtime)
    except OSError:
        return
    for old in dirs[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ================================================================================================
# The parent side
# ================================================================================================
PROMOTE_MODES = ("gate", "always", "never")


def run_training(cfg: Config, advisor_id: str, *, on_progress: Callable[[dict[str, Any]], None] | None = None,
                 settings: dict[str, Any] | None = None, promote: bool | str = "gate",
                 stop: threading.Event | None = None, wait_for_lock: bool = False) -> TrainOutcome:
    """Train `advisor_id` in a child process, then commit the candidate (promoted or refused).

    `promote`: "gate" (default; also True) promotes only what passes the gate on the test split; "always"
    promotes regardless of the gate (`mondrian train --promote-anyway`: for the smoke model's demo, whose
    random weights cannot pass it), "never" (also False) keeps the candidate without promoting it. The mode
    and the gate's own verdict are recorded in the version's manifest and metrics."""
    from daemon.model.adapter_store import (MANIFEST_NAME, AdapterStore, AdapterStoreError, Busy, atomic_write_json,
                                            unwritable)

    from .evaluate import decide

    mode = {True: "gate", False: "never"}.get(promote, promote) if isinstance(promote, bool) else promote
    if mode not in PROMOTE_MODES:
        raise ValueError(f"promote={promote!r}: use one of {', '.join(PROMOTE_MODES)}")
    started = time.time()
    resolved = TrainSettings.from_config(cfg, **(settings or {}))
    store = AdapterStore(cfg.adapters_dir, keep=resolved.keep_versions)
    emit = on_progress or (lambda _e: None)
    cfg.logs_dir.mkdir(parents=True, exist_ok=True)
    log_path = cfg.logs_dir / f"train-{advisor_id}.log"
    try:
        with store.lock(advisor_id, wait=wait_for_lock):
            store.recover(advisor_id)
            staging = store.new_staging(advisor_id)
            try:
                ok, result = _run_child(cfg, advisor_id, staging, settings or {}, log_path, emit, stop,
                                        limit_s=resolved.max_minutes * 60)
                if not ok:
                    shutil.rmtree(staging, ignore_errors=True)
                    return TrainOutcome(advisor_id, False, reason=result.get("message", "training failed"),
                                        seconds=time.time() - started, log_path=str(log_path),
                                        stopped=bool(result.get("stopped")))
                metrics = result.get("metrics") or {}
                ev = metrics.get("evaluation", {})
                gate = decide(ev.get("candidate", {}), ev.get("baseline", {}), resolved.gate())
                gate = _when_test_photos_moved(gate, ev, resolved.min_test_photos, advisor_id)
                decision = {**gate, "mode": mode, "gate": dict(gate)}
                if mode == "never":
                    decision.update(promoted=False, reason=f"not promoted (--no-promote); the gate said: "
                                                           f"{'promote' if gate['promoted'] else 'refuse'}: "
                                                           f"{gate['reason']}")
                elif mode == "always":
                    decision.update(promoted=True, forced=True,
                                    reason=f"promoted without the quality gate (promote-anyway); the gate said: "
                                           f"{'promote' if gate['promoted'] else 'refuse'}: {gate['reason']}")
                manifest = json.loads((staging / MANIFEST_NAME).read_text(encoding="utf-8"))
                manifest["promotion"] = {"mode": mode, "forced": mode == "always", "gate_passed": gate["promoted"]}
                atomic_write_json(staging / MANIFEST_NAME, manifest)
                emit({"event": "phase", "phase": "promoting" if decision["promoted"] else "refusing",
                      "reason": decision["reason"]})
                with _ctrl_c_after(f"{advisor_id}'s new version was being recorded"):
                    version = store.commit(advisor_id, staging, decision)
                testhooks.crashpoint("recorded")
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    except Busy as exc:
        return TrainOutcome(advisor_id, False, reason=str(exc), seconds=time.time() - started)
    except AdapterStoreError as exc:  # e.g. the adapters folder is read-only: one line, no traceback
        return TrainOutcome(advisor_id, False, reason=str(exc), seconds=time.time() - started)
    except OSError as exc:  # committing the candidate (a full disk, a folder gone read-only meanwhile)
        return TrainOutcome(advisor_id, False, reason=unwritable(store.advisor_dir(advisor_id), exc),
                            seconds=time.time() - started)
    return TrainOutcome(advisor_id, True, version=version.name, promoted=version.promoted,
                        reason=decision["reason"], metrics=version.metrics, seconds=time.time() - started,
                        log_path=str(log_path))


@contextlib.contextmanager
def _ctrl_c_after(doing: str) -> Iterator[None]:
    """Ctrl-C waits for the block: a version renamed into place but not yet made current was promoted all the same
    (`adapters` finishes it), while the message said "nothing was kept". Said, and the block finished, instead.
    Only the main thread can take signals (the daemon's nightly job runs in another, and stops otherwise)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {signum: signal.signal(signum, lambda signum, _frame: came.append(signum)) for signum in stops}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if came:
            print(f"{'Ctrl-C' if came[0] == signal.SIGINT else signal.Signals(came[0]).name} came while {doing}: that was finished first, so the outcome below stands "
                  f"(`{mondrian()} adapters rollback` undoes a promotion).", file=sys.stderr)


def _run_child(cfg: Config, advisor_id: str, staging: Path, settings: dict[str, Any], log_path: Path,
               emit: Callable[[dict[str, Any]], None], stop: threading.Event | None,
               limit_s: float = float("inf")) -> tuple[bool, dict[str, Any]]:
    read_fd, write_fd = os.pipe()
    env = child_env(dict(os.environ))
    env[PROGRESS_FD_ENV] = str(write_fd)
    env.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", ""))
    cmd = [sys.executable, "-m", "jobs.train", "--home", str(cfg.home), "--advisor", advisor_id,
           "--staging", str(staging), "--model", cfg.model, "--settings", json.dumps(settings),
           "--parent", str(os.getpid())]
    project_root = Path(__file__).resolve().parent.parent
    try:
        # Never through a link, never a FIFO (opening one for writing waits for a reader: training hung before it
        # began, holding the advisor's lock).
        log_fd = open_own_file(log_path, os.O_WRONLY | os.O_APPEND)
    except OSError as exc:
        os.close(read_fd)
        os.close(write_fd)
        return False, {"message": f"the training log cannot be written: {exc}"}
    with os.fdopen(log_fd, "ab") as logf:
        logf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} training {advisor_id} ===\n".encode())
        logf.flush()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                pass_fds=(write_fd,), env=env, cwd=project_root, start_new_session=True)
    os.close(write_fd)
    result: dict[str, Any] = {}
    deadline = time.monotonic() + limit_s
    timed_out = threading.Event()

    def watch() -> None:
        # A hung child (no output, never exits) must not block whoever waits for it: the nightly
        # scheduler runs one check at a time, so without this every later night would be skipped.
        while proc.poll() is None:
            if stop is not None and stop.is_set():
                _terminate(proc)
                return
            if time.monotonic() >= deadline:
                timed_out.set()
                _terminate(proc)
                return
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True, name="train-watch").start()
    try:
        with os.fdopen(read_fd, "r", encoding="utf-8") as pipe:
            for line in pipe:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") in ("done", "error"):
                    result = event
                else:
                    try:
                        emit(event)
                    except Exception:  # a display problem must not abort training
                        log.exception("progress callback failed")
    finally:
        if proc.poll() is None and result.get("event") != "done":
            _terminate(proc)  # Ctrl-C or an error here: the child must not outlive its purpose
    rc = proc.wait()
    if timed_out.is_set():
        return False, {"message": f"it ran past its time limit of {limit_s / 60:g} min and was "
                                  f"stopped (raise [lora] max_minutes, or lower iters / max_pixels) (log: {log_path})"}
    if stop is not None and stop.is_set():
        return False, {"message": "stopped as Mondrian shut down, before it finished; nothing was kept, and it runs "
                                  "again at the next start", "stopped": True}
    if rc != 0 or result.get("event") != "done":
        why = out_of_space(result.get("message") or "", staging.parent) or result.get("message") or _exit_reason(rc)
        # Callers say "Training failed: <message>": the message itself does not say "failed" again.
        return False, {"message": f"{why} (log: {log_path})"}
    return True, result


def out_of_space(message: str, folder: Path, min_free: int = 16 << 20) -> str | None:
    """The child's error in words when it is a full disk: MLX's "[write] Unable to write N bytes to file." names
    neither the folder nor the cause, so when a write failed and the folder's file system has little room left
    (`min_free`), say which folder and that it is out of space. None when that is not what happened."""
    if not any(s in message for s in ("Unable to write", "No space left", "Errno 28", "Disk quota")):
        return None
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:  # the staging folder is removed after a failure
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return None
    if usage.free >= min_free and "No space left" not in message and "Errno 28" not in message:
        return None
    return (f"the disk holding {folder} is out of space ({usage.free / 2**20:.1f} MiB free of "
            f"{usage.total / 2**20:.0f} MiB) and the adapter could not be written: free some space and train again")


def _exit_reason(rc: int) -> str:
    if rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        return f"the training process was killed by {name}" + (" (out of memory?)" if -rc == signal.SIGKILL else "")
    return f"the training process exited with status {rc}"


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    # The child leads its own session (start_new_session): signal the group, so nothing it started lingers.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
        os.killpg(proc.pid, signal.SIGCONT)  # a stopped child (Ctrl-Z, a debugger) acts on TERM only once resumed
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


if __name__ == "__main__":
    from daemon.model import blas

    blas.preload_openblas()
    sys.exit(child_main())
