"""`mondrian references index|list`: an advisor's reference portfolio, indexed on demand and shown."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from ..analysis.advisors import advisor_arg
from ..errors import EX_IOERR
from ..fsutil import lock_holder
from .common import EX_CONFIG, config_from, progress_bar, say
from ..hints import mondrian


def _advisor_ids(cfg, wanted: str | None) -> list[str] | None:
    from ..analysis.advisors import get_advisor

    if wanted is None:
        return None
    return [get_advisor(cfg, wanted).id]  # raises UnknownAdvisor with the known ids


def cmd_index(args: argparse.Namespace) -> int:
    from ..analysis.advisors import UnknownAdvisor
    from ..ledger import Ledger
    from ..references.indexer import SETTLE_MAX_SECONDS, ReferenceIndexer, problem, shown_name
    from .terminal import shown

    cfg = config_from(args)
    try:
        advisors = _advisor_ids(cfg, args.advisor)
    except UnknownAdvisor as exc:
        print(str(exc.args[0] if exc.args else exc), file=sys.stderr)
        return 2
    cfg.ensure_dirs()
    pid = lock_holder(cfg.var_dir / "daemon.lock")
    if pid is not None and not args.force:
        shown_pid = pid if pid > 0 else "?"
        print(f"The Mondrian daemon (pid {shown_pid}) is running on {cfg.home}: it indexes new, changed and removed "
              f"references itself, between photos. `{mondrian()} references list` shows what is indexed "
              f"(or pass --force to index here as well).", file=sys.stderr)
        return 0

    def load_runtime():
        from ..model.runtime import ModelRuntime

        say(f"loading model {cfg.model!r}…")
        return ModelRuntime.load(cfg.model, var_dir=cfg.var_dir, max_pixels=cfg.max_pixels)

    ledger = Ledger.for_config(cfg)
    indexer = ReferenceIndexer(cfg, ledger, load_runtime)
    bars = contextlib.ExitStack()
    bar: list[Any] = []
    settling = contextlib.ExitStack()
    awaited: set[Path] = set()

    def on_wait(still: list[Path]) -> None:
        """Files just copied in: one line to say why the command waits, then a bar of those settled so far."""
        if not awaited and still:
            say(f"waiting for {len(still)} reference(s) still being written: each is indexed once it has not "
                f"changed for {cfg.quiet_seconds:g} s…")
            bar.append(settling.enter_context(progress_bar(len(still), desc="settled ", unit="file")))
        awaited.update(still)
        if bar:
            bar[0].total = len(awaited)
            bar[0].n = len(awaited) - len(still)
            bar[0].set_postfix_str(shown(still[0].name) if still else "", refresh=True)
        if not still:
            settling.close()
            bar.clear()

    def on_plan(plan) -> None:
        settling.close()
        bar.clear()
        for path in plan.waiting:
            say(shown(f"waiting: {path} is still being written after {SETTLE_MAX_SECONDS:g} s; index again once "
                      f"the copy is complete"))
        for advisor, path, reason in plan.errors:
            say(shown(f"skipped: {advisor}: {shown_name(path.name)}: {reason}"))
        if plan.index:
            bar.append(bars.enter_context(progress_bar(len(plan.index), unit="photo")))

    def progress(outcome, done: int, total: int) -> None:
        bar[0].set_postfix_str(shown(f"{outcome.advisor}/{outcome.path.name}"), refresh=False)
        bar[0].update(done - bar[0].n)
        if outcome.action == "error":
            say(shown(f"skipped: {outcome.advisor}: {shown_name(outcome.path.name)}: {outcome.reason}"))

    try:
        with bars, settling:
            plan, outcomes = indexer.sync(advisors, progress=progress, on_plan=on_plan, on_wait=on_wait)
    except Exception as exc:
        from ..model.runtime import ModelNotFoundError

        if isinstance(exc, ModelNotFoundError):
            print(f"cannot index: {exc}", file=sys.stderr)
            return EX_CONFIG
        raise
    counts = {k: sum(1 for o in outcomes if o.action == k) for k in ("indexed", "reused", "removed", "error")}
    errors = counts["error"] + len(plan.errors)
    # Kept where the daemon keeps its own (the ledger's reference_errors), so `references list` and `status` show
    # what this run skipped too; the other advisors' entries stay as they were.
    skipped = [problem(cfg, a, p, r) for a, p, r in plan.errors] + \
        [problem(cfg, o.advisor, o.path, o.reason) for o in outcomes if o.action == "error"]
    ran_for = set(advisors) if advisors else None
    earlier = ledger.events().get("reference_errors", ([], None))[0] or []
    ledger.set_event("reference_errors", sorted(
        [e for e in earlier if ran_for is not None and e.get("advisor") not in ran_for] + skipped,
        key=lambda e: (e["advisor"], e["file"])))
    print(f"{counts['indexed'] + counts['reused']} indexed, {plan.unchanged} unchanged, {counts['removed']} "
          f"removed, {errors} skipped, {len(plan.waiting)} still being written", file=sys.stderr)
    return 1 if errors else 0


def _row(row, cfg, twin: Any = None) -> dict[str, Any]:
    """One indexed file; `twin`: the row counted in its place when it is a copy of another reference."""
    from ..analysis.advisors import references_dir
    from ..references.indexer import reference_profile

    prof = reference_profile(row)
    try:
        shown = str(Path(row.path).relative_to(cfg.home))
    except ValueError:
        shown = row.path
    same_as = None
    if twin is not None:
        folder = references_dir(cfg, row.advisor)
        same_as = str(Path(twin.path).relative_to(folder)) if Path(twin.path).is_relative_to(folder) else twin.path
    folder = references_dir(cfg, row.advisor)
    place = Path(row.path).relative_to(folder) if Path(row.path).is_relative_to(folder) else Path(row.path).name
    return {"advisor": row.advisor, "path": shown, "file": Path(row.path).name, "in_portfolio": str(place),
            "sha256": row.sha256,
            "source": prof["source"], "scores": prof["scores"], "comments": prof["comments"],
            "model_id": row.model_id, "embedding": row.embedding is not None,
            "indexed_at": row.indexed_at,
            # a copy of another reference (same bytes) is listed, as the folder holds it, but counted once, with
            # the first path's profile, as rag counts it; `profile_used` says when that is not this file's own
            "same_as": same_as, "counted": twin is None,
            "profile_used": None if twin is None or reference_profile(twin) == prof else same_as}


def _same_photo_note(r: dict[str, Any]) -> str:
    """Why a listed file does not count: the text form of `same_as` / `profile_used`."""
    note = f"same photo as {r['same_as']}, counted once"
    if r["profile_used"] is not None:
        note += ", with that file's scores and comments (this file's differ and are not used)"
    return note


def cmd_list(args: argparse.Namespace) -> int:
    from ..analysis.advisors import UnknownAdvisor, load_advisors
    from ..analysis.critique import DIMENSIONS
    from ..ledger import Ledger
    from ..analysis.advisors import references_dir
    from ..references.indexer import counted_references, reference_present, sidecar_problems
    from ..analysis.retrieval import distribution
    from .terminal import column, shown

    cfg = config_from(args)
    try:
        advisors = _advisor_ids(cfg, args.advisor) or sorted(load_advisors(cfg))
    except UnknownAdvisor as exc:
        print(str(exc.args[0] if exc.args else exc), file=sys.stderr)
        return 2
    ledger = Ledger.for_config(cfg)
    recorded = ledger.events().get("reference_errors", ([], None))[0]  # what the daemon could not index
    result = {}
    for advisor in advisors:
        rows = ledger.references(advisor)
        # the photos rag counts: a copy under another name is no other, nor one deleted since it was indexed
        folder = references_dir(cfg, advisor)
        counted, twins = counted_references(r for r in rows if reference_present(folder, r.path))
        skipped = {e["file"]: e for e in recorded if e.get("advisor") == advisor}
        skipped.update({e["file"]: e for e in sidecar_problems(cfg, advisor)})  # checked now: the newest word
        result[advisor] = {"count": len(counted), "files": len(rows),
                           "references": [_row(r, cfg, twins.get(str(r.path))) for r in rows],
                           "portfolio": distribution([r.scores for r in counted]) if counted else None,
                           "skipped": [{"file": f, "reason": e["reason"]} for f, e in sorted(skipped.items())]}
    if args.json:
        print(json.dumps(result if args.advisor is None else result[advisors[0]], indent=2, ensure_ascii=False))
        return 0
    abbrev = " ".join(d[:4] for d in DIMENSIONS)
    for advisor, info in result.items():
        copies = info["files"] - info["count"]
        print(f"{advisor}: {info['count']} reference(s)" + (f" ({copies} more file(s) the same photo as another, "
                                                            f"counted once)" if copies else ""))
        for e in info["skipped"]:
            print(shown(f"  skipped: {e['file']}: {e['reason']}"))
        if not info["count"]:
            continue
        print(f"  {'file':<32} {'source':<6} {abbrev}")
        for r in info["references"]:
            scores = " ".join(f"{r['scores'][d]:>4}" for d in DIMENSIONS)
            print(f"  {column(shown(r['in_portfolio']), 32)} {r['source']:<6} {scores}")
            if r["same_as"] is not None:
                print(shown(f"    {_same_photo_note(r)}"))
        pf = info["portfolio"]["dimensions"]
        print(f"  {'mean':<32} {'':<6} " + " ".join(f"{pf[d]['mean']:>4.1f}" for d in DIMENSIONS))
        print(f"  {'spread':<32} {'':<6} " + " ".join(f"{pf[d]['std']:>4.1f}" for d in DIMENSIONS))
    return 0


def cmd_import_db(args: argparse.Namespace) -> int:
    from ..references.importer import ImportRefused, import_db
    from .terminal import shown

    cfg = config_from(args)
    try:
        advisor = _advisor_ids(cfg, args.advisor)
    except Exception as exc:  # UnknownAdvisor: the message names the known ones
        print(str(exc.args[0] if exc.args else exc), file=sys.stderr)
        return 2
    cfg.ensure_dirs()
    try:
        summary = import_db(cfg, Path(args.path).expanduser(), advisor[0] if advisor else None)
    except ImportRefused as exc:
        print(shown(f"cannot import: {exc}"), file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([o.__dict__ for o in summary.outcomes], indent=2, ensure_ascii=False))
    for o in summary.outcomes:
        if o.action == "imported":
            say(shown(f"imported: {o.advisor}: {o.image} -> advisors/{o.advisor}/references/{o.file}"))
        elif o.action == "skipped":
            say(shown(f"skipped: {o.row} ({o.advisor or '?'}: {o.image or '?'}): {o.reason}"))
    if summary.stopped:
        print(shown(f"stopped: {summary.stopped}"), file=sys.stderr)
    print(f"{summary.count('imported')} imported, {summary.count('present')} already there, "
          f"{summary.count('skipped')} skipped. A running daemon indexes the new references by itself; otherwise "
          f"run `{mondrian()} references index`", file=sys.stderr)
    return EX_IOERR if summary.stopped else 1 if summary.count("skipped") else 0


def register(subparsers: Any) -> None:
    refs = subparsers.add_parser("references", help="an advisor's reference photos (rag mode): index, list")
    rsub = refs.add_subparsers(dest="references_command", required=True)
    idx = rsub.add_parser("index", help="index new, changed and removed reference photos now")
    idx.add_argument("--advisor", type=advisor_arg, help="only this advisor (default: all)")
    idx.add_argument("--model", help="model: 'smoke', a local folder or a hub id")
    idx.add_argument("--force", action="store_true", help="index even while a daemon runs on this home")
    idx.set_defaults(func=cmd_index)
    ls = rsub.add_parser("list", help="show the indexed references and the portfolio's distribution")
    ls.add_argument("--advisor", type=advisor_arg, help="only this advisor (default: all)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)
    imp = rsub.add_parser("import-db", help="import the scored references of an original Mondrian database "
                                            "(its dimensional_profiles table), read-only")
    imp.add_argument("path", help="the original database, e.g. mondrian/mondrian.db")
    imp.add_argument("--advisor", type=advisor_arg, help="only this advisor's rows (default: every known advisor's)")
    imp.add_argument("--json", action="store_true", help="every row's outcome as JSON on stdout")
    imp.set_defaults(func=cmd_import_db)
