"""`mondrian demo`: all three analysis modes, offline, on the bundled sample photos, with the smoke model.

1. The default advisor gets a small portfolio: the sample photos copied into
   `advisors/<id>/references/mondrian-demo/`, each with a curator sidecar of scores written for the demo
   (the sidecar format of the README), indexed with a progress bar.
2. A small LoRA adapter is trained on it for the smoke model (jobs/train.py, in its child process, with a
   progress bar) and made current. The smoke model cannot really learn, so the demo promotes its adapter
   without the quality gate (`promote="always"`) and says so; with a real model the gate decides as always.
3. The samples go into the inbox with one `.mode` sidecar each (baseline, rag, lora in turn) and the daemon
   analyses them once, so outbox/index.html shows a baseline report, a rag report with its references and a lora
   report naming its adapter version.

Running it again in the same home works: files already in place are left as they are, the index finds nothing
new, and a current adapter for this base model is used instead of training another. The demo never mixes its
samples into a portfolio of the user's own, nor replaces an adapter trained for another base model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import filecmp
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..analysis.advisors import Advisor, get_advisor, references_dir
from ..analysis.critique import DIMENSIONS
from ..config import MODES, Config
from ..fsutil import atomic_write_bytes, lock_holder
from ..resources import samples_dir
from .common import EX_CONFIG, config_from, progress_bar, say
from .terminal import shown
from ..hints import mondrian, program

DEMO_FOLDER = "mondrian-demo"  # inside the advisor's references/: the demo's own, easy to see and to delete
# Short training: a handful of steps, one augmented copy per photo (the whole demo stays near a minute).
DEMO_TRAINING = {"iters": 10, "variants": 1, "eval_every": 5}
# The curator scores written for the demo, in the order of DIMENSIONS, and one comment each.
DEMO_SCORES: dict[str, tuple[tuple[int, ...], str]] = {
    "astronaut": ((7, 6, 8, 6, 7, 4, 7, 6), "Even studio light; the flags crowd the frame's right side."),
    "camera": ((8, 7, 6, 5, 8, 6, 7, 7), "A full scale of greys, from the black coat to the pale sky."),
    "chelsea": ((6, 5, 7, 6, 7, 5, 6, 7), "The eyes hold the frame; the background is too busy."),
    "coffee": ((7, 6, 8, 7, 8, 5, 8, 5), "A clean, balanced still life; it asks little of the viewer."),
    "rocket": ((6, 8, 6, 5, 5, 7, 6, 8), "The plume is the light source, and the drama of the frame."),
}
DEFAULT_SCORES = ((6, 6, 6, 6, 6, 6, 6, 6), "A sample photo, scored for the demo.")


@dataclass
class Step:
    ok: bool
    line: str  # what happened, for the summary


def sample_photos() -> list[Path]:
    return sorted(p for p in samples_dir().iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def sidecar_for_demo(stem: str) -> dict[str, Any]:
    scores, comment = DEMO_SCORES.get(stem, DEFAULT_SCORES)
    return {"scores": dict(zip(DIMENSIONS, scores)),
            "comments": {"lighting": comment},
            "note": "Written by `mondrian demo` for its sample portfolio: not the photographer's own scores."}


def _own_references(folder: Path) -> list[str]:
    """What the user keeps in the advisor's references folder besides the demo's own subfolder."""
    try:
        return sorted(n for n in os.listdir(folder) if n != DEMO_FOLDER and not n.startswith("."))
    except OSError:
        return []


def _put(path: Path, data: bytes, *, mtime: float) -> bool:
    """Write `data` to `path` unless it already holds exactly that (a second demo changes nothing); the mtime is
    set in the past, as a portfolio's would be, so the indexer need not wait for the file to settle."""
    if path.is_file() and not path.is_symlink() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)  # replaces a link planted there instead of writing through it
    os.utime(path, (mtime, mtime), follow_symlinks=False)
    return True


def set_up_references(cfg: Config, advisor: Advisor) -> Step:
    """The sample photos with demo sidecars in the advisor's `references/mondrian-demo/`."""
    folder = references_dir(cfg, advisor.id)
    theirs = _own_references(folder)
    if theirs:
        return Step(False, f"{advisor.name} already has reference photos of your own in {shown(str(folder))}; the "
                           f"demo does not mix its samples into them (run the demo in a fresh home to see rag and "
                           f"lora: MONDRIAN_HOME=/tmp/mondrian-demo {program()} demo)")
    dest = folder / DEMO_FOLDER
    old = time.time() - 3600
    changed = 0
    for photo in sample_photos():
        changed += _put(dest / photo.name, photo.read_bytes(), mtime=old)
        doc = json.dumps(sidecar_for_demo(photo.stem), indent=2, ensure_ascii=False) + "\n"
        changed += _put(dest / f"{photo.stem}.json", doc.encode("utf-8"), mtime=old)
    what = f"wrote {changed} file(s)" if changed else "already in place"
    return Step(True, f"sample portfolio for {advisor.name}: {len(sample_photos())} photos with demo curator scores "
                      f"in {shown(str(dest))} ({what})")


def index_references(cfg: Config, advisor: Advisor) -> Step:
    from ..ledger import Ledger
    from ..references.indexer import ReferenceIndexer

    def load_runtime() -> Any:
        from ..model.runtime import ModelRuntime

        return ModelRuntime.load(cfg.model, var_dir=cfg.var_dir, max_pixels=cfg.max_pixels)

    ledger = Ledger.for_config(cfg)
    bars = contextlib.ExitStack()
    bar: list[Any] = []

    def on_plan(plan: Any) -> None:
        if plan.index:
            bar.append(bars.enter_context(progress_bar(len(plan.index), desc="  indexing ", unit="photo")))

    def progress(outcome: Any, done: int, total: int) -> None:
        bar[0].set_postfix_str(shown(outcome.path.name), refresh=False)
        bar[0].update(done - bar[0].n)
        if outcome.action == "error":
            say(shown(f"  skipped {outcome.path.name}: {outcome.reason}"))

    try:
        with bars:
            plan, outcomes = ReferenceIndexer(cfg, ledger, load_runtime).sync([advisor.id], progress=progress,
                                                                              on_plan=on_plan)
        indexed = sum(1 for o in outcomes if o.action in ("indexed", "reused"))
        count = len(ledger.references(advisor.id))
    finally:
        ledger.close()
    return Step(count > 0, f"reference index: {indexed} indexed now, {plan.unchanged} unchanged, {count} in all")


def _is_smoke(cfg: Config) -> bool:
    from ..model.runtime import resolve_model_path
    from ..model.smoke import is_smoke_model

    try:
        return is_smoke_model(resolve_model_path(cfg.model, cfg.var_dir))
    except Exception:  # the daemon reports a model that cannot be found, in its own words
        return False


def ensure_adapter(cfg: Config, advisor: Advisor) -> Step:
    """A current adapter for this base model: the one an earlier demo made, or a new one trained now."""
    from jobs.cli import TrainingProgress  # the training side's own progress display
    from jobs.train import run_training

    from ..model.adapter_store import AdapterStore, base_model_fingerprint
    from ..model.runtime import resolve_model_path

    store = AdapterStore(cfg.adapters_dir)
    current = store.current(advisor.id)
    base = base_model_fingerprint(resolve_model_path(cfg.model, cfg.var_dir))
    if current is not None:
        trained_on = (current.manifest.get("base_model") or {}).get("fingerprint")
        if trained_on == base:
            return Step(True, f"adapter {current.label} is current for this model (trained earlier); used as it is")
        return Step(False, f"{advisor.name}'s current adapter {current.label} was trained for another model; the "
                           f"demo leaves it alone, so its lora photo falls back (the report says why)")
    smoke = _is_smoke(cfg)
    say(f"Training a small LoRA adapter for {advisor.name} on model {cfg.model!r} "
        f"({DEMO_TRAINING['iters']} steps)…")
    if smoke:
        say("  (the smoke model cannot really learn: the demo promotes its adapter without the quality gate)")
    with TrainingProgress() as bar:
        outcome = run_training(cfg, advisor.id, on_progress=bar, settings=dict(DEMO_TRAINING),
                               promote="always" if smoke else True, wait_for_lock=True)
    if not outcome.ok:
        return Step(False, f"training failed: {outcome.reason}; the lora photo falls back (the report says why)")
    if not outcome.promoted:
        return Step(False, f"adapter {advisor.id}/{outcome.version} was not promoted ({outcome.reason}); the lora "
                           f"photo falls back")
    return Step(True, f"adapter {advisor.id}/{outcome.version} trained in {outcome.seconds:.0f} s and made current"
                      + (" without the quality gate (demo)" if smoke else f": {outcome.reason}"))


def _waiting_sample(cfg: Config, name: str, sample: Path, mode: str) -> bool:
    """Whether the inbox holds this sample, with its `.mode`, from a demo stopped before it finished."""
    here = cfg.inbox / name
    sidecar = here.with_suffix(".mode")
    try:
        return (here.is_file() and not here.is_symlink() and filecmp.cmp(here, sample, shallow=False)
                and sidecar.is_file() and sidecar.read_text(errors="replace").strip() == mode)
    except OSError:
        return False


def queue_samples(cfg: Config) -> list[tuple[str, str]]:
    """The samples into the inbox, each with a `.mode` sidecar: baseline, rag, lora in turn. Returns (name, mode).
    A sample still waiting there from a demo stopped with Ctrl-C is taken as it is, not dropped a second time."""
    queued = []
    for i, photo in enumerate(sample_photos()):
        mode = MODES[i % len(MODES)]
        stem, n = photo.stem, 1
        while any((cfg.inbox / f"{stem}{s}").exists() for s in (photo.suffix, ".mode")):
            if _waiting_sample(cfg, f"{stem}{photo.suffix}", photo, mode):
                break
            n += 1  # never overwrite what the user keeps in the inbox
            stem = f"{photo.stem}-{n}"
        else:
            # The sidecar first: the photo is never seen without it.
            (cfg.inbox / f"{stem}.mode").write_text(mode + "\n")
            shutil.copyfile(photo, cfg.inbox / f"{stem}{photo.suffix}")
        queued.append((f"{stem}{photo.suffix}", mode))
    return queued


def summary(cfg: Config, queued: list[tuple[str, str]], first_job: int,
            carried: frozenset[int] = frozenset()) -> tuple[list[str], int]:
    """A line per sample photo, and how many of them are not finished (the demo was stopped)."""
    from ..ledger import Ledger

    ledger = Ledger.for_config(cfg)
    try:
        # This run's jobs, and a sample that waited from a stopped demo: its job was queued before this run began.
        jobs = {j.rel_path: j for j in sorted(ledger.jobs(), key=lambda j: j.id) if j.id > first_job or j.id in carried}
    finally:
        ledger.close()
    lines = []
    unfinished = 0
    for name, mode in queued:
        job = jobs.get(name)
        if job is None or job.state in ("queued", "running"):
            lines.append(f"  {mode:<8} {name}: not analysed yet")
            unfinished += 1
            continue
        where = shown(os.path.relpath(job.report_html, cfg.home)) if job.report_html else ""
        if job.state != "done":
            lines.append(f"  {mode:<8} {name}: {job.state}: {shown(job.error or '')}")
            continue
        used = job.effective_mode or "?"
        extra = f" with adapter {job.adapter}" if used == "lora" and job.adapter else ""
        fell = f" (fell back from {mode})" if used != mode else ""
        dup = " (same as an earlier demo's report)" if job.duplicate_of else ""
        lines.append(f"  {mode:<8} {name}: {used}{extra}{fell}, grade {job.grade}{dup} → {where}")
    return lines, unfinished


def _cannot_serve(cfg: Config) -> str | None:
    """Why `demo --serve` could not serve the API at the end (off, or its port taken), or None."""
    from ..api.server import PortUnavailable, bind

    if not (cfg.api_enabled and cfg.api_port):
        return "--serve needs the API: set api_enabled = true and an api_port in mondrian.toml"
    try:
        for sock in bind(cfg):
            sock.close()
    except PortUnavailable as exc:
        return f"--serve: {exc}"
    return None


def cmd_demo(args: argparse.Namespace) -> int:
    """The offline demo: a sample portfolio, an adapter, and the sample photos through the real daemon."""
    from ..ledger import Ledger
    from ..pipeline.supervisor import run_daemon

    cfg = config_from(args, model=args.model or "smoke")
    pid = lock_holder(cfg.var_dir / "daemon.lock")
    if pid is not None:
        print(f"A Mondrian daemon (pid {pid if pid > 0 else '?'}) is running on {cfg.home}; stop it first "
              f"(`{mondrian()} service stop`, or Ctrl-C where it runs), or run the demo in another home "
              f"(MONDRIAN_HOME=/tmp/mondrian-demo {program()} demo)", file=sys.stderr)
        return 1
    if getattr(args, "serve", False):  # found before a minute of demo, not after it
        problem = _cannot_serve(cfg)
        if problem:
            print(problem, file=sys.stderr)
            return EX_CONFIG
    cfg.ensure_dirs()
    advisor = get_advisor(cfg, cfg.default_advisor)
    say(f"Mondrian demo in {cfg.home}, model {cfg.model!r}, advisor {advisor.name}")
    try:
        steps = [set_up_references(cfg, advisor)]
        say(f"· {steps[-1].line}")
        if steps[0].ok:
            steps.append(index_references(cfg, advisor))
            say(f"· {steps[-1].line}")
            if steps[-1].ok:
                steps.append(ensure_adapter(cfg, advisor))
                say(f"· {steps[-1].line}")
    except KeyboardInterrupt:
        say(f"The demo was stopped with Ctrl-C before its sample photos were queued; what it had finished is kept "
            f"(nothing half-made). Run `{mondrian()} demo` again to go on.")
        return 130
    ledger = Ledger.for_config(cfg)
    try:
        before = ledger.jobs()
    finally:
        ledger.close()
    first_job = max((j.id for j in before), default=0)
    carried = frozenset(j.id for j in before if j.state in ("queued", "running"))
    queued = queue_samples(cfg)
    say(f"· {len(queued)} sample photos into {shown(str(cfg.inbox))}, one .mode each "
        f"({', '.join(f'{n}: {m}' for n, m in queued)}); analysing them…")
    rc = run_daemon(cfg, once=True)
    if rc != 0:
        return rc
    lines, waiting = summary(cfg, queued, first_job, carried)
    print("\n".join(["", "Reports (asked for → used):", *lines, "",
                     f"Open {cfg.outbox / 'index.html'} in a browser to see them."]))
    if waiting:  # the daemon stops gracefully on Ctrl-C, with exit 0: the demo did not finish
        say(f"The demo was stopped before it finished: {waiting} sample photo(s) wait in {shown(str(cfg.inbox))}. "
            f"Run `{mondrian()} demo` again to finish them.")
        return 130
    if _is_smoke(cfg):
        print("(These reports come from the random smoke model: the scores are not meaningful.)")
    if not getattr(args, "serve", False):
        return 0
    # The demo's daemon stays up, with the smoke model and the adapter the demo made, so the original design's
    # curl commands can be tried against it.
    say(f"Serving the inbox and the /analyze API on http://{cfg.api_host}:{cfg.api_port} with the demo's model; "
        f"try: curl -X POST http://localhost:{cfg.api_port}/analyze -F image=@photo.jpg -F mode=lora "
        f"(Ctrl-C stops)")
    return run_daemon(cfg, once=False)


__all__ = ["cmd_demo", "DEMO_FOLDER", "DEMO_SCORES", "sidecar_for_demo", "queue_samples"]
