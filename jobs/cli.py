"""`mondrian train`, `mondrian adapters [rollback]`, `mondrian evaluate` (listed in daemon/cli/main.py)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any

from daemon.cli.common import config_from, logging_redirect_tqdm, new_bar, say

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
    and the best held-out loss), log records above it."""

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
                extra = f" ({event.get('train_rows')} training rows, {event.get('held_out')} held-out photos)"
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
            parts.append(f"held-out best {val:.3f}")
        self.bar.set_postfix_str(", ".join(parts), refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# -- train ----------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from daemon.ledger import Ledger

    from .evaluate import table
    from .nightly import ProgressRecorder
    from .train import run_training

    cfg = config_from(args)
    advisor = _advisor(cfg, args.advisor)
    cfg.ensure_dirs()
    ledger = Ledger(cfg.db_path)
    recorder = ProgressRecorder(ledger, advisor.id)
    overrides: dict[str, Any] = {}
    if args.iters:
        overrides["iters"] = args.iters
    print(f"Training {advisor.name}'s adapter on model {cfg.model}…", file=sys.stderr)
    with TrainingProgress() as bar:
        def progress(event: dict[str, Any]) -> None:
            bar(event)
            recorder(event)

        outcome = run_training(cfg, advisor.id, on_progress=progress, settings=overrides,
                               promote=not args.no_promote, wait_for_lock=False)
    recorder.finish(outcome)
    if not outcome.ok:
        print(f"Training failed: {outcome.reason}", file=sys.stderr)
        return 1
    ev = outcome.metrics.get("evaluation", {})
    if ev.get("candidate") and ev.get("baseline"):
        print(table(ev["candidate"], ev["baseline"]))
    verdict = "promoted: now current" if outcome.promoted else "not promoted"
    print(f"{advisor.id}/{outcome.version} {verdict} — {outcome.reason} ({_duration(outcome.seconds)})")
    return 0 if outcome.promoted else EX_REFUSED


# -- adapters -------------------------------------------------------------------------------------
def _version_row(v: Any, current: str | None) -> dict[str, Any]:
    ev = v.metrics.get("evaluation", {})
    cand, base = ev.get("candidate", {}), ev.get("baseline", {})
    return {"advisor": v.advisor, "version": v.name, "current": v.name == current,
            "created_at": v.manifest.get("created_at"), "references": len(v.manifest.get("references", [])),
            "held_out": len(v.manifest.get("held_out", [])), "mae": cand.get("mae_mean"),
            "baseline": base.get("label"), "baseline_mae": base.get("mae_mean"),
            "valid": f"{cand.get('valid', '?')}/{cand.get('n', '?')}", "promoted": v.promoted,
            "rolled_back": v.rolled_back, "reason": v.decision.get("reason"), "path": str(v.path)}


def cmd_adapters(args: argparse.Namespace) -> int:
    from daemon.model.adapter_store import AdapterStore

    cfg = config_from(args)
    store = AdapterStore(cfg.adapters_dir)
    advisors = [_advisor(cfg, args.advisor).id] if args.advisor else store.advisors()
    rows = []
    for a in advisors:
        current = store.current_name(a)
        rows += [_version_row(v, current) for v in reversed(store.versions(a))]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        who = f"{args.advisor}" if args.advisor else "any advisor"
        print(f"No adapters for {who} yet. Train one with `mondrian train --advisor ID`.")
        return 0
    print(f"{'':2}{'advisor':<12} {'version':<8} {'created':<16} {'refs':>5} {'MAE':>6} {'vs':>14} "
          f"{'valid':>6}  status")
    for r in rows:
        created = datetime.fromtimestamp(r["created_at"]).strftime("%Y-%m-%d %H:%M") if r["created_at"] else "?"
        mae = f"{r['mae']:.2f}" if isinstance(r["mae"], (int, float)) else "–"
        vs = (f"{r['baseline']} {r['baseline_mae']:.2f}" if isinstance(r["baseline_mae"], (int, float))
              else (r["baseline"] or "–"))
        status = ("rolled back" if r["rolled_back"] else "promoted" if r["promoted"] else
                  f"refused: {r['reason']}")
        print(f"{'*' if r['current'] else ' '} {r['advisor']:<12} {r['version']:<8} {created:<16} "
              f"{r['references']:>5} {mae:>6} {vs:>14} {r['valid']:>6}  {status}")
    print("(* = current; MAE = mean absolute error of the expected scores on held-out references)")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from daemon.model.adapter_store import AdapterStore, AdapterStoreError, Busy

    cfg = config_from(args)
    _advisor(cfg, args.advisor)
    store = AdapterStore(cfg.adapters_dir)
    try:
        with store.lock(args.advisor, wait=False):
            old, new = store.rollback(args.advisor)
    except Busy as exc:
        print(f"{exc}; try again when it has finished", file=sys.stderr)
        return 1
    except AdapterStoreError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"{args.advisor}: current adapter is now {new} (was {old})")
    return 0


# -- evaluate -------------------------------------------------------------------------------------
def _resolve(store: Any, advisor: str, which: str | None):
    if which in (None, "current"):
        v = store.current(advisor)
        if v is None:
            raise SystemExit(f"{advisor} has no current adapter; train one with `mondrian train --advisor {advisor}`")
        return v.path, v.name
    if which == "base":
        return None, "base"
    v = store.version(advisor, which)
    return v.path, v.name


def cmd_evaluate(args: argparse.Namespace) -> int:
    from daemon.ledger import Ledger
    from daemon.model.adapter_store import AdapterStore, AdapterStoreError
    from daemon.model.runtime import ModelRuntime
    from daemon.analysis.prompts import critique_prompt

    from .dataset import DatasetError, collect_references, split
    from .evaluate import evaluate, table

    cfg = config_from(args)
    advisor = _advisor(cfg, args.advisor)
    store = AdapterStore(cfg.adapters_dir)
    try:
        cand_path, cand_label = _resolve(store, advisor.id, args.version)
        base_path, base_label = _resolve(store, advisor.id, args.against)
        refs = collect_references(cfg, advisor.id, Ledger(cfg.db_path))
        _, held = split(refs)
    except (AdapterStoreError, DatasetError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"Evaluating {advisor.id}: {cand_label} against {base_label} on {len(held)} held-out reference(s)…",
          file=sys.stderr)
    rt = ModelRuntime.load(cfg.model, var_dir=cfg.var_dir, max_pixels=cfg.max_pixels)
    kw = dict(comment_max_chars=cfg.comment_max_chars, max_tokens=cfg.max_tokens, max_pixels=cfg.max_pixels)
    prompt = critique_prompt(advisor)
    a = evaluate(rt, held, prompt, adapter=cand_path, label=cand_label, **kw).to_dict()
    b = evaluate(rt, held, prompt, adapter=base_path, label=base_label, **kw).to_dict()
    if args.json:
        print(json.dumps({"candidate": a, "baseline": b}, indent=2, default=str))
    else:
        print(table(a, b))
    return 0


# -- registration ---------------------------------------------------------------------------------
def register(sub: Any) -> None:
    tr = sub.add_parser("train", help="train an advisor's LoRA adapter now (progress bar), evaluate and promote it")
    tr.add_argument("--advisor", required=True)
    tr.add_argument("--model", help="base model: 'smoke', a local folder or a hub id")
    tr.add_argument("--iters", type=int, help="training steps (default: from the portfolio size)")
    tr.add_argument("--no-promote", action="store_true", help="evaluate and keep the candidate, but do not promote it")
    tr.set_defaults(func=cmd_train)

    ad = sub.add_parser("adapters", help="list adapter versions with their metrics; `adapters rollback` goes back one")
    ad.add_argument("--advisor")
    ad.add_argument("--json", action="store_true")
    ad.set_defaults(func=cmd_adapters)
    adsub = ad.add_subparsers(dest="adapters_command")
    rb = adsub.add_parser("rollback", help="make the previous promoted version current again")
    rb.add_argument("--advisor", required=True)
    rb.set_defaults(func=cmd_rollback)

    ev = sub.add_parser("evaluate", help="per-dimension MAE and Spearman of an adapter vs another (or the base)")
    ev.add_argument("--advisor", required=True)
    ev.add_argument("--version", help="adapter version to evaluate (default: current)")
    ev.add_argument("--against", default="base", help="'base' (default), 'current' or a version such as v0002")
    ev.add_argument("--model", help="base model: 'smoke', a local folder or a hub id")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_evaluate)
