"""`mondrian train`, `mondrian adapters [rollback]`, `mondrian evaluate` (listed in daemon/cli/main.py)."""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import os
import signal
import sys
from pathlib import Path
from datetime import datetime
from typing import Any, Container

from daemon.analysis.advisors import advisor_arg
from daemon.cli.common import config_from, logging_redirect_tqdm, new_bar, say
from daemon.hints import mondrian

EX_REFUSED = 3  # trained, evaluated, but not promoted


def _advisor(cfg, advisor_id: str):
    from daemon.analysis.advisors import get_advisor

    return get_advisor(cfg, advisor_id)  # UnknownAdvisor: one line and exit 2 (daemon/cli/main.py)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class TrainingProgress:
    """Training events on the command line's one progress bar: phases as lines, steps as the bar (with the loss
    and the best validation loss), log records above it."""

    def __init__(self) -> None:
        self._logs = logging_redirect_tqdm()
        self.bar: Any = None
        self._what = ""

    def __enter__(self) -> "TrainingProgress":
        self._logs.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
        self._logs.__exit__(*exc)

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("event") == "phase":
            self.close()
            extra = ""
            if event.get("phase") == "loading":
                extra = (f" ({event.get('train_rows')} training rows, {event.get('validation')} validation and "
                         f"{event.get('held_out')} test photos; {event.get('curator')} references with curator "
                         f"scores, {event.get('model_scored')} model-scored left out)")
                if event.get("reason"):
                    extra += f"; {event['reason']}"
            elif event.get("phase") == "samples checked":
                extra = (f": every sample carries its image ({event.get('train_image_tokens_min')}-"
                         f"{event.get('train_image_tokens_max')} image tokens, at most "
                         f"{event.get('train_tokens_max')} tokens)")
            elif event.get("reason"):
                extra = f": {event['reason']}"
            say(f"· {event.get('phase')}{extra}")
            return
        step, steps = event.get("step"), event.get("steps")
        if step is None or not steps:
            return
        # One bar per stretch of work: the training steps, then each evaluation's held-out photos.
        what = "  step " if event.get("phase", "training") == "training" else \
            f"  {event.get('phase')} {event.get('label', '')}: "
        if self.bar is None or self.bar.total != steps or self._what != what:
            self.close()
            self._what = what
            self.bar = new_bar(steps, desc=what, unit="step" if what == "  step " else "photo")
        loss = event.get("loss")
        val = event.get("best_val_loss", event.get("val_loss"))
        parts = [f"loss {loss:.3f}"] if isinstance(loss, (int, float)) else []
        if isinstance(val, (int, float)):
            parts.append(f"validation best {val:.3f}")
        self.bar.set_postfix_str(", ".join(parts), refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# -- train ----------------------------------------------------------------------------------------
class _Signalled(KeyboardInterrupt):
    """`kill` or a closed terminal (SIGTERM, SIGHUP) on `train`: handled as Ctrl-C is (the child stopped, its
    half-made version removed, the stop said and recorded), instead of an exit with no word and a staging folder
    left behind."""


def _stop_on(signum: int, _frame: Any) -> None:
    raise _Signalled(signal.Signals(signum).name)


def cmd_train(args: argparse.Namespace) -> int:
    from daemon.ledger import Ledger
    from daemon.model.adapter_store import AdapterStore

    from .evaluate import table
    from .nightly import ProgressRecorder
    from .train import TrainOutcome, TrainSettings, run_training

    cfg = config_from(args)
    advisor = _advisor(cfg, args.advisor)
    overrides: dict[str, Any] = {}
    if args.iters:
        overrides["iters"] = args.iters
    if args.use_model_scores:
        overrides["use_model_scores"] = True
    TrainSettings.from_config(cfg, **overrides)  # a bad [lora] setting is refused before status hears of a run
    cfg.ensure_dirs()
    ledger = Ledger.for_config(cfg)
    recorder = ProgressRecorder(ledger, advisor.id)
    print(f"Training {advisor.name}'s adapter on model {cfg.model}…", file=sys.stderr)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stop_on)
    store = AdapterStore(cfg.adapters_dir)
    kept_before: set[str] = set()
    with contextlib.suppress(OSError):  # unreadable: training says so itself
        kept_before = {v.name for v in store.versions(advisor.id)}
    try:
        with TrainingProgress() as bar:
            def progress(event: dict[str, Any]) -> None:
                bar(event)
                recorder(event)

            outcome = run_training(cfg, advisor.id, on_progress=progress, settings=overrides,
                                   promote="never" if args.no_promote else "always" if args.promote_anyway else "gate",
                                   wait_for_lock=False)
    except KeyboardInterrupt as exc:  # run_training has stopped the child and removed its half-made version by now
        how = f"by {exc.args[0]}" if isinstance(exc, _Signalled) and exc.args else "with Ctrl-C"
        made = []
        with contextlib.suppress(OSError):
            made = [v for v in store.versions(advisor.id) if v.name not in kept_before]
        if made:  # stopped after its version was recorded: kept, and said so (never "nothing was kept")
            v = made[-1]
            what = "promoted and current" if store.current_name(advisor.id) == v.name else \
                "promoted" if v.promoted else "kept, not promoted"
            reason = (f"stopped {how} after {v.label} was recorded ({what}); `{mondrian()} adapters` shows it"
                      + (f", and `{mondrian()} adapters rollback --advisor {advisor.id}` undoes the promotion"
                         if v.promoted else ""))
            recorder.finish(TrainOutcome(advisor.id, True, version=v.name, promoted=v.promoted, reason=reason))
            print(f"Training {reason}.", file=sys.stderr)
            return 128 + (signal.Signals[exc.args[0]] if isinstance(exc, _Signalled) and exc.args else signal.SIGINT)
        why = f"stopped {how} before it finished; nothing was kept"
        model = f" --model {shlex.quote(args.model)}" if getattr(args, "model", None) else ""  # as it was started
        again = f"`{mondrian()} train --advisor {advisor.id}{model}` starts it again"
        recorder.finish(TrainOutcome(advisor.id, False, reason=f"{why}; {again}", stopped=True))
        print(f"Training {why}: {advisor.id}'s adapters are as they were. {again}.",
              file=sys.stderr)
        return 128 + (signal.Signals[exc.args[0]] if isinstance(exc, _Signalled) and exc.args else signal.SIGINT)
    recorder.finish(outcome)
    if not outcome.ok:
        print(f"Training failed: {outcome.reason}", file=sys.stderr)
        return 1
    ev = outcome.metrics.get("evaluation", {})
    if ev.get("candidate") and ev.get("baseline"):
        print(f"On the test split ({ev.get('held_out')} photos never seen by training):")
        print(table(ev["candidate"], ev["baseline"]))
    version = AdapterStore(cfg.adapters_dir).version(advisor.id, outcome.version)
    print(sources_line(version.manifest))
    verdict = "promoted: now current" if outcome.promoted else "not promoted"
    print(f"{advisor.id}/{outcome.version} {verdict} — {outcome.reason} ({_duration(outcome.seconds)})")
    return 0 if outcome.promoted else EX_REFUSED


# -- adapters -------------------------------------------------------------------------------------
def curator_counts(manifest: dict[str, Any]) -> dict[str, Any]:
    """Which of a version's references had curator scores, and whether model-scored ones were trained on."""
    refs = manifest.get("references", [])
    curator = [r for r in refs if r.get("source") == "human"]
    return {"curator": len(curator), "model": len(refs) - len(curator),
            "used_model_scores": bool((manifest.get("sources") or {}).get("used_model_scores")),
            "curator_scored": [Path(str(r.get("path", ""))).name for r in curator],
            "model_scored": [Path(str(r.get("path", ""))).name for r in refs if r.get("source") != "human"]}


def sources_line(manifest: dict[str, Any]) -> str:
    c = curator_counts(manifest)
    if not c["model"]:
        return f"Targets: all {c['curator']} references had curator scores."
    how = "trained on anyway (--use-model-scores)" if c["used_model_scores"] else "left out of training"
    return (f"Targets: {c['curator']} references had curator scores; {c['model']} were scored by the model and "
            f"{how}: {', '.join(c['model_scored'][:5])}{' …' if c['model'] > 5 else ''}")


def _version_row(v: Any, current: str | None, known: Container[str] = ()) -> dict[str, Any]:
    from daemon.model.adapter_store import REQUIRED_FILES

    ev = v.metrics.get("evaluation", {})
    cand, base = ev.get("candidate", {}), ev.get("baseline", {})
    splits = v.manifest.get("splits") or {}
    counts = curator_counts(v.manifest)
    ci = ev.get("intervals") or {}
    return {"advisor": v.advisor, "version": v.name, "current": v.name == current,
            "created_at": v.manifest.get("created_at"), "references": len(v.manifest.get("references", [])),
            "curator_scored": counts["curator"], "model_scored": counts["model"],
            "used_model_scores": counts["used_model_scores"],
            "train": len(splits.get("train", [])), "validation": len(splits.get("validation", [])),
            "test": len(splits.get("test", v.manifest.get("held_out", []))),
            "held_out": len(v.manifest.get("held_out", [])), "mae": cand.get("mae_mean"),
            "mae_ci": (ci.get("mae") or {}).get("candidate"), "spearman": cand.get("spearman_mean"),
            "spearman_ci": (ci.get("spearman") or {}).get("candidate"),
            "baseline": base.get("label"), "baseline_mae": base.get("mae_mean"),
            "baseline_spearman": base.get("spearman_mean"),
            "valid": f"{cand.get('valid', '?')}/{cand.get('n', '?')}", "promoted": v.promoted,
            "promotion": (v.manifest.get("promotion") or {}).get("mode", "gate"), "forced": bool(v.decision.get("forced")),
            "rolled_back": v.rolled_back, "reason": v.decision.get("reason"), "path": str(v.path),
            "missing": [f for f in REQUIRED_FILES if not (v.path / f).is_file()],
            "problem": v.problem() or v.copied_from(known)}


def _created(value: Any) -> str:
    """A manifest's created_at as a date: seconds since the epoch, as a number or a string, or an ISO date (a hand-
    edited or foreign manifest); "?" for anything else, never an error that hides the whole listing."""
    try:
        return datetime.fromtimestamp(float(value)).strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError, OverflowError, OSError):
        pass
    try:
        return datetime.fromisoformat(str(value)).strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError):
        return "?"


def _status(r: dict[str, Any]) -> str:
    if r.get("missing"):  # no decision to show: the files that make a version are not all there
        return f"incomplete (no {', '.join(r['missing'])})"
    if r["rolled_back"]:
        status = "rolled back"
    elif r["promoted"]:
        status = "promoted anyway" if r["forced"] else "promoted"
    else:
        status = f"refused: {r['reason']}" if r["reason"] else "refused"
    # A copy cut short or a hand edit: photos fall back from it, so the listing must not call it fine.
    return f"{status}; unusable: {r['problem']}" if r.get("problem") else status


def cmd_adapters(args: argparse.Namespace) -> int:
    from daemon.model.adapter_store import AdapterStore

    cfg = config_from(args)
    store = AdapterStore(cfg.adapters_dir)
    advisors = [_advisor(cfg, args.advisor).id] if args.advisor else store.advisors()
    from daemon.analysis.advisors import advisor_ids

    known = advisor_ids(cfg)  # a version copied from another advisor is listed as unusable
    rows = []
    pointers = {}  # advisor -> why its `current` points at nothing usable
    unsettled = {}  # advisor -> why a promotion cut short could not be finished
    for a in advisors:
        # A promotion cut short is finished first, never listed as promoted yet not current.
        if (why := store.settle(a)) is not None:
            unsettled[a] = why
        current = store.current_name(a)
        rows += [_version_row(v, current, known) for v in reversed(store.versions(a))]
        problem = store.current_problem(a)
        if problem:
            pointers[a] = problem
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    notes = [f"{a}: current points at {p}, so its photos fall back to rag; {store.remedy(a)}"
             for a, p in pointers.items()] + [f"{a}: {why}" for a, why in unsettled.items()]
    if not rows:
        who = advisors[0] if args.advisor else "any advisor"
        # A command that runs when pasted: the advisor asked about, else the default one (`ID` was taken for one).
        print(f"No adapters for {who} yet. Train one with `{mondrian()} train --advisor "
              f"{advisors[0] if args.advisor else cfg.default_advisor}`.")
        for a in advisors:
            original = store.original_layout(a, mondrian())
            if original:
                print(f"Note: {original}.")
        for note in notes:
            print(note)
        return 0
    def num(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, (int, float)) else "–"

    def ci(v: Any) -> str:
        return f"[{v[0]:.2f},{v[1]:.2f}]" if v else ""

    print(f"{'':2}{'advisor':<12} {'version':<8} {'created':<16} {'curator':>9} {'test':>4} {'MAE [95% CI]':>18} "
          f"{'ρ [95% CI]':>19} {'vs':>18} {'valid':>6}  status")
    for r in rows:
        created = _created(r["created_at"])
        vs = (f"{r['baseline']} {num(r['baseline_mae'])}/{num(r['baseline_spearman'])}"
              if isinstance(r["baseline_mae"], (int, float)) else (r["baseline"] or "–"))
        status = _status(r)
        curator = f"{r['curator_scored']}/{r['references']}" + ("*" if r["used_model_scores"] else "")
        print(f"{'*' if r['current'] else ' '} {r['advisor']:<12} {r['version']:<8} {created:<16} {curator:>9} "
              f"{r['test']:>4} {num(r['mae']) + ' ' + ci(r['mae_ci']):>18} "
              f"{num(r['spearman']) + ' ' + ci(r['spearman_ci']):>19} {vs:>18} {r['valid']:>6}  {status}")
    print("(* = current; curator = references with curator scores / all (a trailing * means model-scored ones "
          "were trained on too); MAE and ρ (mean Spearman) of the expected scores on the test split, never seen "
          "by training, with 95 % bootstrap intervals; vs = the model it was compared with, MAE/ρ)")
    for note in notes:
        print(note)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from daemon.model.adapter_store import AdapterStore, AdapterStoreError, Busy, configured_base, unwritable

    cfg = config_from(args)
    _advisor(cfg, args.advisor)
    store = AdapterStore(cfg.adapters_dir)
    try:
        with store.lock(args.advisor, wait=False):
            # A promotion killed before `current` was switched is finished first, as `adapters` and the daemon's
            # start would finish it: rolled back from the version before it, it came back at the next listing.
            finished = store.finish_promotion(args.advisor)
            problem = store.current_problem(args.advisor)  # dangling or incomplete: rollback repairs the pointer
            old, new = store.rollback(args.advisor, base=configured_base(cfg))
    except Busy as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except AdapterStoreError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except OSError as exc:  # the pointer or the rollback note could not be written (read-only, full disk)
        print(unwritable(store.advisor_dir(args.advisor), exc), file=sys.stderr)
        return 1
    if finished:
        print(f"{args.advisor}: the promotion of {finished} had been interrupted; it was finished first")
    if problem:
        print(f"{args.advisor}: current pointed at {problem}; it now points at {new}, the newest complete promoted "
              f"version")
    else:
        print(f"{args.advisor}: current adapter is now {new} (was {old})")
    return 0


def _managed_folder(cfg: Any, dest: Path) -> Path | None:
    """The folder Mondrian manages that `dest` lies in (the adapters folder: a version name there is pruned and a
    hidden one removed by the next training; the training datasets: pruned), or None."""
    def real(p: Path) -> Path:
        return Path(os.path.realpath(p))

    target = real(dest.absolute())
    for folder in (cfg.adapters_dir, cfg.var_dir / "datasets"):
        root = real(Path(folder).absolute())
        if target == root or root in target.parents:
            return Path(folder)
    return None


def cmd_fuse(args: argparse.Namespace) -> int:
    """Merge a version's adapter into the base weights; keep the folder only if it scores like base + adapter."""
    from daemon.analysis.critique import critique_schema
    from daemon.analysis.prompts import critique_prompt
    from daemon.intake.images import load_photo
    from daemon.ledger import Ledger
    from daemon.model.adapter_store import AdapterStore, AdapterStoreError
    from daemon.model.fuse import FuseError, fuse_adapter
    from daemon.model.runtime import ModelNotFoundError, resolve_model_path
    from PIL import Image

    from .dataset import collect_references

    cfg = config_from(args)
    advisor = _advisor(cfg, args.advisor)
    store = AdapterStore(cfg.adapters_dir)
    try:
        version = store.version(advisor.id, args.version) if args.version else store.current(advisor.id)
        if version is None:
            raise AdapterStoreError(f"{advisor.id} has no current adapter; name one with --version "
                                    f"(`{mondrian()} adapters --advisor {advisor.id}` lists them)")
        base = resolve_model_path(cfg.model, cfg.var_dir)
    except (AdapterStoreError, ModelNotFoundError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    other = _other_base(cfg, [version])
    if other:
        print(f"{other}: fuse it with `--model` set to that base", file=sys.stderr)
        return 1
    dest = Path(args.out).expanduser() if args.out else cfg.var_dir / "models" / f"fused-{advisor.id}-{version.name}"
    owned = _managed_folder(cfg, dest)
    if owned:  # Mondrian prunes and recovers these folders: a fused model there would be deleted or taken for one
        print(f"--out {dest} is inside {owned}, which Mondrian manages (training prunes and recovers what is "
              f"there): choose a folder outside it, or leave --out out for {cfg.var_dir / 'models'}", file=sys.stderr)
        return 1
    # Check on the version's own test photos (up to 3); a grey gradient when none is indexed any more.
    recorded = set((version.manifest.get("splits") or {}).get("test") or version.manifest.get("held_out") or [])
    refs = [r for r in collect_references(cfg, advisor.id, Ledger.for_config(cfg)) if r.sha256 in recorded][:3]
    probes = [load_photo(Path(r.path), cfg.max_pixels).image for r in refs] or \
        [Image.linear_gradient("L").convert("RGB").resize((112, 112))]
    print(f"Fusing {version.label} into the base weights of {cfg.model}…", file=sys.stderr)
    try:
        result = fuse_adapter(base, version.path, dest, probes=probes, prompt=critique_prompt(advisor),
                              schema=critique_schema(cfg.comment_max_chars), max_tokens=cfg.max_tokens,
                              max_pixels=cfg.max_pixels,
                              provenance={"advisor": advisor.id, "version": version.name, "base_model": cfg.model})
    except FuseError as exc:
        print(f"Fusing {version.label} failed: {exc}", file=sys.stderr)
        return 1
    print(f"{version.label} fused into {result.path}")
    print(f"Checked on {result.photos} photo(s): the same reports and expected scores as base + adapter (largest "
          f"score difference {result.max_score_difference:.4f})" +
          ("" if result.differs_from_base else "; note: on these photos the adapter changes nothing"))
    print(f"Use it with `mlx_vlm.load({str(result.path)!r})`, or as the model: MONDRIAN_MODEL={result.path}")
    return 0


# -- evaluate -------------------------------------------------------------------------------------
def _resolve(store: Any, advisor: str, which: str | None):
    if which in (None, "current"):
        v = store.current(advisor)
        problem = store.current_problem(advisor) if v is None else None
        if problem:  # a dangling or incomplete pointer has its own remedy
            raise SystemExit(f"{advisor}'s current adapter points at {problem}; {store.remedy(advisor)}, or name "
                             f"one with --version")
        if v is None:
            raise SystemExit(f"{advisor} has no current adapter; train one with "
                             f"`{mondrian()} train --advisor {advisor}`")
        return v.path, v.name, v
    if which == "base":
        return None, "base", None
    v = store.version(advisor, which)
    return v.path, v.name, v


def recorded_test_set(cfg: Any, version: Any, refs: list[Any]) -> tuple[list[Any], str]:
    """The test references `version` recorded in its manifest (as they are indexed now), and a line saying so.
    A version that recorded none is evaluated on the hash split of today's curator-scored references, with the
    [lora] fractions of mondrian.toml."""
    from .dataset import split, training_references
    from .train import TrainSettings

    recorded = (version.manifest.get("splits") or {}).get("test") or version.manifest.get("held_out") or []
    if recorded:
        by_sha = {r.sha256: r for r in refs}
        test = [by_sha[s] for s in recorded if s in by_sha]
        gone = len(recorded) - len(test)
        note = f"the {len(recorded)} test photos recorded in {version.name}'s manifest"
        if gone:
            note += f" ({gone} no longer indexed as they were, left out)"
        return test, note
    settings = TrainSettings.from_config(cfg)
    usable, _ = training_references(refs, settings.use_model_scores)
    test = split(usable, settings.holdout_fraction, settings.validation_fraction).test
    return test, (f"{len(test)} test photos: {version.name} recorded no test split, so today's references are "
                  f"split by content hash (holdout_fraction {settings.holdout_fraction:g})")


def _other_base(cfg: Any, versions: list[Any]) -> str | None:
    """'<advisor>/<version>, trained for base model X, not the configured Y' for the first of `versions` whose manifest
    names another base model than the configured one (as `fuse` and the daemon check it), or None."""
    from daemon.model.adapter_store import configured_base

    configured = configured_base(cfg)
    if configured is None:
        return None
    for v in versions:
        base = v.manifest.get("base_model") or {}
        if base.get("fingerprint") and base["fingerprint"] != configured:
            return f"{v.label}: it was trained for base model {base.get('spec')}, not the configured {cfg.model}"
    return None


def cmd_evaluate(args: argparse.Namespace) -> int:
    from daemon.config import ConfigError
    from daemon.ledger import Ledger
    from daemon.model.adapter_store import AdapterStore, AdapterStoreError, AdapterUnusable, adapter_problem
    from daemon.model.runtime import ModelRuntime
    from daemon.analysis.prompts import critique_prompt

    from .dataset import DatasetError, collect_references
    from .dataset import first_few as ds_first_few
    from .evaluate import bootstrap, evaluate, readable, seen_by, table

    cfg = config_from(args)
    advisor = _advisor(cfg, args.advisor)
    store = AdapterStore(cfg.adapters_dir)
    try:
        cand_path, cand_label, version = _resolve(store, advisor.id, args.version)
        base_path, base_label, against = _resolve(store, advisor.id, args.against)
        refs = collect_references(cfg, advisor.id, Ledger.for_config(cfg))
        if version is None:
            raise DatasetError("--version names the adapter to evaluate (base is what it is compared with)")
        held, where = recorded_test_set(cfg, version, refs)
    except (AdapterStoreError, DatasetError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 78
    for path, label in ((cand_path, cand_label), (base_path, base_label)):
        problem = adapter_problem(path) if path is not None else None
        if problem:  # found from the files, before minutes of model loading
            print(f"{advisor.id}: cannot evaluate {label}: {Path(path) / problem}; train a new version "
                  f"(`{mondrian()} train --advisor {advisor.id}`) or name another with --version", file=sys.stderr)
            return 1
    other = _other_base(cfg, [v for v in (version, against) if v is not None])
    if other:  # the daemon never serves such an adapter; scoring it on this base gives figures that mean nothing
        print(f"{advisor.id}: cannot evaluate {other}; evaluate it with `--model` set to that base, or train "
              f"a new version for {cfg.model} (`{mondrian()} train --advisor {advisor.id}`)", file=sys.stderr)
        return 1
    if not held:
        print(f"{advisor.id}: none of {where} is indexed as it was any more (moved, deleted or changed since: "
              f"`{mondrian()} references index --advisor {advisor.id}` reads them again); nothing to evaluate on",
              file=sys.stderr)
        return 1
    if against is not None:  # judged on photos it learned from, the version compared with would be favoured
        seen = seen_by(against.manifest)
        learned = [r for r in held if r.sha256 in seen]
        if learned:
            held = [r for r in held if r.sha256 not in seen]
            where += (f", less {len(learned)} that {against.name} learned from "
                      f"({ds_first_few([Path(r.path).name for r in learned])})")
        if not held:
            print(f"{advisor.id}: {against.name} learned from every one of {version.name}'s test photos; compare "
                  f"it with the base model instead (leave out --against)", file=sys.stderr)
            return 1
    photos, unread = readable(held, cfg.max_pixels)  # read once: both evaluations see the very same pictures
    if unread:
        where += f", less {len(unread)} that cannot be read ({ds_first_few(unread)})"
    if not photos:  # two evaluations of nothing would print a table of dashes and exit 0
        print(f"{advisor.id}: none of {where.split(', less ')[0]} can be read ({ds_first_few(unread)}); put them "
              f"back, or train a new version on the references there are now (`{mondrian()} train --advisor "
              f"{advisor.id}`)", file=sys.stderr)
        return 1
    print(f"Evaluating {advisor.id}: {cand_label} against {base_label} on {where}…", file=sys.stderr)
    from daemon.model.runtime import ModelNotFoundError

    try:
        rt = ModelRuntime.load(cfg.model, var_dir=cfg.var_dir, max_pixels=cfg.max_pixels)
    except ModelNotFoundError as exc:
        print(f"cannot evaluate: {exc}", file=sys.stderr)
        return 78
    kw = dict(comment_max_chars=cfg.comment_max_chars, max_tokens=cfg.max_tokens)
    prompt = critique_prompt(advisor)
    try:
        a = evaluate(rt, photos, prompt, adapter=cand_path, label=cand_label, **kw).to_dict()
        b = evaluate(rt, photos, prompt, adapter=base_path, label=base_label, **kw).to_dict()
    except AdapterUnusable as exc:  # a broken adapter file is a state to report in words, not a crash
        print(f"{advisor.id}: cannot evaluate: {exc}; train a new version (`{mondrian()} train --advisor "
              f"{advisor.id}`) or name another with --version", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"candidate": a, "baseline": b, "test_set": where, "intervals": bootstrap(a, b)},
                         indent=2, default=str))
    else:
        print(table(a, b))
        print(sources_line(version.manifest))
    return 0


# -- registration ---------------------------------------------------------------------------------
def register(sub: Any) -> None:
    tr = sub.add_parser("train", help="train an advisor's LoRA adapter now (progress bar), evaluate and promote it")
    tr.add_argument("--advisor", type=advisor_arg, required=True)
    tr.add_argument("--model", help="base model: 'smoke', a local folder or a hub id")
    tr.add_argument("--iters", type=int, help="training steps (default: from the portfolio size)")
    how = tr.add_mutually_exclusive_group()
    how.add_argument("--no-promote", action="store_true", help="evaluate and keep the candidate, but do not promote it")
    how.add_argument("--promote-anyway", action="store_true",
                     help="promote the candidate whatever the gate says (recorded in its manifest); for the smoke "
                          "model's demo, whose random weights cannot pass the gate")
    tr.add_argument("--use-model-scores", action="store_true",
                    help="also train on references without curator scores, on the model's own scores (circular)")
    tr.set_defaults(func=cmd_train)

    ad = sub.add_parser("adapters", help="list adapter versions with their metrics; `adapters rollback` goes back one")
    ad.add_argument("--advisor", type=advisor_arg)
    ad.add_argument("--json", action="store_true")
    ad.set_defaults(func=cmd_adapters)
    adsub = ad.add_subparsers(dest="adapters_command")
    rb = adsub.add_parser("rollback", help="make the previous promoted version current again")
    rb.add_argument("--advisor", type=advisor_arg, required=True)
    rb.set_defaults(func=cmd_rollback)
    fu = adsub.add_parser("fuse", help="merge an adapter into the base weights: a model folder mlx_vlm.load reads, "
                                       "checked to score like base + adapter")
    fu.add_argument("--advisor", type=advisor_arg, required=True)
    fu.add_argument("--version", help="adapter version (default: current)")
    fu.add_argument("--out", help="folder to create (default: var/models/fused-<advisor>-<version>)")
    fu.add_argument("--model", help="base model: 'smoke', a local folder or a hub id")
    fu.set_defaults(func=cmd_fuse)

    ev = sub.add_parser("evaluate", help="per-dimension MAE and Spearman of an adapter vs another (or the base)")
    ev.add_argument("--advisor", type=advisor_arg, required=True)
    ev.add_argument("--version", help="adapter version to evaluate (default: current)")
    ev.add_argument("--against", default="base", help="'base' (default), 'current' or a version such as v0002")
    ev.add_argument("--model", help="base model: 'smoke', a local folder or a hub id")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_evaluate)
