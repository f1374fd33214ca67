"""`mondrian`: the command line, one argparse tree. Each sub-command is a thin layer over one module.

The command groups are listed in `COMMAND_GROUPS` and imported explicitly: a group that fails to import stops
`mondrian` with its traceback, instead of its commands silently disappearing."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from peewee import DatabaseError

from .. import __version__
from ..analysis.advisors import UnknownAdvisor, advisor_arg
from ..config import MODES, ConfigError, default_home, load_config
from ..ledger import LedgerUnavailable, ledger_problem
from ..errors import EX_IOERR
from .common import EX_CONFIG, EX_USAGE, config_from
from .terminal import SafeFormatter, shown
from ..hints import mondrian, serve

log = logging.getLogger("mondrian")


def _setup_logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    # File names reach the log: escaped, so a name cannot forge a line or send escapes to a terminal.
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                                       datefmt="%Y-%m-%d %H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for noisy in ("watchdog", "peewee", "PIL", "httpx", "huggingface_hub", "datasets", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # watchdog logs a spurious error when its inotify thread is stopped mid-read (harmless, at shutdown only)
    logging.getLogger("watchdog.observers.inotify").setLevel(logging.CRITICAL)


# -- commands ---------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from ..pipeline.supervisor import run_daemon
    from ..service.logrotate import StdStreamRotator

    # Before anything can fail: a service that cannot start (a typo in mondrian.toml) is started again every 30 s,
    # each time adding its lines to a log that only a running daemon rotated.
    rotator = StdStreamRotator.from_env()
    if rotator is not None:
        rotator.rotate()
    return run_daemon(config_from(args), once=args.once)


def cmd_analyze(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .analyze import AnalyzeRefused, analyze_many, prepare
    from .common import progress_bar
    from .status import require_home

    cfg = config_from(args)
    if (getattr(args, "home", None) or os.environ.get("MONDRIAN_HOME")) and not os.path.lexists(cfg.home):
        # A home named but not there is a typo (`--home ~/Mondrain`) more often than a wish: a whole new home made
        # there would take the report while the photographer looks in theirs. The default home is still made.
        require_home(cfg)
    if args.mode and args.mode.lower() not in MODES:
        print(f"unknown mode {args.mode!r}; use one of {', '.join(MODES)}", file=sys.stderr)
        return 2
    try:
        request = prepare(cfg, args.photo, mode=args.mode.lower() if args.mode else None, advisor=args.advisor,
                          adapter=args.adapter)
    except AnalyzeRefused as exc:
        print(shown(f"cannot analyze: {exc}"), file=sys.stderr)
        return exc.exit_code
    failed = 0
    noticed: set[str] = set()
    with progress_bar(len(request.photos), unit="photo") as bar:
        def loading() -> None:
            bar.set_postfix_str(shown(f"loading model {cfg.model}…"))

        def start(path: Path) -> None:
            bar.set_postfix_str(shown(path.name))

        def result(job: dict[str, Any]) -> None:
            nonlocal failed
            bar.update(1)
            if args.json:  # one object a line, as each photo finishes
                tqdm.write(json.dumps(job, default=str, ensure_ascii=False), file=sys.stdout)
            elif job["state"] == "done":
                tqdm.write(shown(f"{job['grade']}/10  {job['source_path']}: {job.get('summary') or ''}"),
                           file=sys.stdout)
                tqdm.write(shown(f"      {job['report_html']}"), file=sys.stdout)
                if job.get("notice") and job["notice"] not in noticed:  # once, beside the first grade it concerns
                    noticed.add(job["notice"])  # on stderr: stdout stays two lines a photo, for scripts
                    tqdm.write(shown(f"note: {job['notice']}"), file=sys.stderr)
            if job["state"] != "done":
                failed += 1
                if not args.json:
                    tqdm.write(shown(f"failed: {job['source_path']}: {job['error']}"), file=sys.stderr)

        try:
            results = analyze_many(cfg, request, on_loading=loading, on_start=start, on_result=result)
        except AnalyzeRefused as exc:
            print(shown(f"cannot analyze: {exc}"), file=sys.stderr)
            return exc.exit_code
    if len(results) > 1:
        print(f"{len(results) - failed} of {len(results)} photo(s) analysed" + (f", {failed} failed" if failed else ""),
              file=sys.stderr)
    return 1 if failed else 0


def cmd_status(args: argparse.Namespace) -> int:
    from .status import collect, render, watch

    cfg = config_from(args)
    if args.watch is not None:
        if not 0.1 <= args.watch <= 86400:  # NaN and infinity too; 1e-300 would redraw with no pause at all
            print(f"--watch takes a number of seconds from 0.1 to 86400 (got {args.watch:g})", file=sys.stderr)
            return EX_USAGE
        return watch(cfg, args.watch, args.json)
    info = collect(cfg)  # refuses (exit 78) where no home is: a mistyped MONDRIAN_HOME creates none
    print(json.dumps(info, indent=2, default=str) if args.json else render(info))
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    from .status import require_home
    from .terminal import shown
    from .workers import list_workers

    cfg = config_from(args)
    require_home(cfg)
    out = list_workers(cfg, args.json)
    print(out if args.json else "\n".join(shown(line) for line in out.splitlines()))
    return 0


def cmd_model_smoke(args: argparse.Namespace) -> int:
    from ..model.smoke import DIR_NAMES, SmokeModelUnwritable, build_smoke_model, ensure_smoke_model, is_smoke_model

    cfg = config_from(args)
    try:
        if not args.dest:
            path = ensure_smoke_model(cfg.var_dir, shapes=args.shapes)
        else:
            dest = Path(args.dest).expanduser()
            if dest.exists() and not dest.is_dir():
                print(f"--dest {dest} is a file; name a folder to build the model into", file=sys.stderr)
                return EX_USAGE
            if dest.is_dir() and any(dest.iterdir()) and not is_smoke_model(dest):
                dest = dest / DIR_NAMES[args.shapes]  # a folder of the user's, holding other things: build inside it
            path = build_smoke_model(dest, shapes=args.shapes)
    except SmokeModelUnwritable as exc:  # a full disk: one line saying where, not MLX's "[write] Unable to write"
        print(str(exc), file=sys.stderr)
        return EX_CONFIG
    print(path)
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from .retry import failed_now, retry_failed
    from .status import require_home

    cfg = config_from(args)
    require_home(cfg)  # a mistyped MONDRIAN_HOME must not become a new, empty home
    if not args.failed:
        failed, permanent = failed_now(cfg)
        print(f"`{mondrian()} retry` puts failed photos back in the queue; nothing was queued. Now {failed} photo(s) "
              f"failed, {permanent} of them permanently (a damaged photo, a bad sidecar, a folder Mondrian may not "
              f"write) with nothing changed since.\n"
              f"  {mondrian()} retry --failed          queue the failed photos again, except the unchanged permanent "
              f"ones\n"
              f"  {mondrian()} retry --failed --all    queue the permanent ones too\n"
              f"  {mondrian()} retry --failed ID ...   queue only these jobs (ids: `{mondrian()} status --json`)")
        return EX_USAGE if args.ids or args.all else 0
    result = retry_failed(cfg, ids=args.ids or None, everything=args.all)
    for line in result.queued:
        print(shown(line))
    for line in result.left:
        print(shown(line), file=sys.stderr)
    if result.skipped:
        names = ", ".join(j.rel_path for j in result.skipped[:5]) + (" …" if len(result.skipped) > 5 else "")
        print(shown(f"skipped {len(result.skipped)} permanent failure(s) that nothing has changed since, so they "
                    f"would fail the same way: {names}. Fix them (re-export the photo, correct the sidecar, chmod) "
                    f"and run `{mondrian()} retry --failed` again, or `{mondrian()} retry --failed --all` to try them "
                    f"anyway"), file=sys.stderr)
    print(f"{len(result.queued)} photo(s) queued again", file=sys.stderr)
    return EX_USAGE if args.ids and not result.queued and result.left else 0


def add_core_commands(sub: Any) -> None:
    """`run`, `demo`, `analyze`, `status`, `model smoke`, `retry`."""
    from .demo import cmd_demo
    run = sub.add_parser("run", help="run the daemon in the foreground (what launchd runs)")
    run.add_argument("--once", action="store_true", help="process what the inbox holds now, then exit")
    run.add_argument("--model", help="model: 'smoke', a local folder or a hub id")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="offline: a sample portfolio, a small adapter, and the sample photos analysed "
                                       "in all three modes")
    demo.add_argument("--model", help="model (default: the offline smoke model)")
    demo.add_argument("--serve", action="store_true",
                      help="then keep the daemon running, with the /analyze API, until Ctrl-C")
    demo.set_defaults(func=cmd_demo)

    an = sub.add_parser("analyze", help="analyse photos now, without the daemon (they stay where they are)")
    an.add_argument("photo", nargs="+", help="photos, or folders (searched recursively for photos)")
    an.add_argument("--mode", help=f"one of {', '.join(MODES)}")
    an.add_argument("--advisor", type=advisor_arg, help="advisor id, e.g. ansel")
    an.add_argument("--adapter", metavar="VERSION", help="with lora: this adapter version (e.g. v0002) instead of "
                                                         "the advisor's current one")
    an.add_argument("--model", help="model: 'smoke', a local folder or a hub id")
    an.add_argument("--json", action="store_true", help="one JSON object a line, one line a photo")
    an.set_defaults(func=cmd_analyze)

    st = sub.add_parser("status", help="what the daemon is doing")
    st.add_argument("--json", action="store_true", help="for scripts (with --watch: one JSON object a line)")
    st.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
                    help="show it again every SECONDS (default 2) until Ctrl-C")
    st.set_defaults(func=cmd_status)

    wk = sub.add_parser("workers", help="every process running photos on this ledger (all machines sharing it)")
    wk.add_argument("--json", action="store_true", help="for scripts")
    wk.set_defaults(func=cmd_workers)

    model = sub.add_parser("model", help="model utilities")
    msub = model.add_subparsers(dest="model_command", required=True)
    smoke = msub.add_parser("smoke", help="build the tiny offline smoke model (random weights)")
    smoke.add_argument("--shapes", choices=["smoke", "real"], default="smoke",
                       help="'real' builds random weights with the real Qwen2-VL-2B shapes (benchmarks)")
    smoke.add_argument("--dest", help="folder to build into (default: <home>/var/models/)")
    smoke.set_defaults(func=cmd_model_smoke)

    retry = sub.add_parser("retry", help="queue failed photos again")
    retry.add_argument("--failed", action="store_true",
                       help="requeue failed photos (not permanent failures nothing has changed since)")
    retry.add_argument("--all", action="store_true", help="with --failed: permanent failures too")
    retry.add_argument("ids", nargs="*", type=int, help="only these job ids (permanent or not)")
    retry.set_defaults(func=cmd_retry)



def command_groups() -> list[Callable[[Any], None]]:
    """Every command group of `mondrian`, in the order `--help` lists them. A new command goes into one of these
    (or a new group here): each registers its sub-commands and sets `func`, the handler `main` calls."""
    from jobs.cli import register as training_commands  # `train`, `adapters`, `evaluate`: the training side

    from ..service.install import add_service_parser
    from .init import register as init_commands
    from .references import register as references_commands

    return [add_core_commands, init_commands, add_service_parser, references_commands, training_commands]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mondrian", description="A local photo-critique daemon.")
    p.add_argument("--home", help="Mondrian home folder (default: $MONDRIAN_HOME, else the checkout Mondrian runs "
                                   "from, else ~/Pictures/Mondrian on macOS, $XDG_DATA_HOME/mondrian elsewhere)")
    p.add_argument("--version", action="version", version=f"mondrian {__version__}")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    for register in command_groups():
        register(sub)
    _home_after_the_command(p)
    return p


def _home_after_the_command(parser: argparse.ArgumentParser) -> None:
    """`mondrian status --home X` as well as `mondrian --home X status`: people put it after the command. SUPPRESS
    keeps a --home given before the command when none follows it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in {id(c): c for c in action.choices.values()}.values():
                if "--home" not in child._option_string_actions:
                    child.add_argument("--home", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
                _home_after_the_command(child)


# Commands that only read or change an existing home: at a mistyped --home or MONDRIAN_HOME they must not create a
# new one (its ledger, its adapters folder) and then report on it as if it were the user's.
NEEDS_HOME = frozenset({"status", "workers", "retry", "references", "adapters", "train", "evaluate"})


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        # A terminal or log under LANG=C (cron, ssh without a locale, PYTHONIOENCODING=ascii) cannot encode a dash or a
        # photo's accented name: write a stand-in for those characters rather than die on them with a traceback.
        if stream is not None and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        try:
            return _main(argv)
        finally:
            if sys.stdout is not None:  # None when started with stdout closed (`mondrian status >&-`)
                sys.stdout.flush()  # here, not at exit: a reader that is gone by now is caught below as well
    except KeyboardInterrupt:  # Ctrl-C while the command line is still being read (its modules imported)
        return 130
    except BrokenPipeError:
        # The reader went away (`mondrian status | head -1`): what it wanted it has. Python would print a
        # traceback, and another one at exit when it flushes stdout; point stdout at /dev/null instead.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE  # what a command killed by SIGPIPE returns, as `git log | head` does


def _refuse_empty(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`--home ''` (an unset shell variable: `--home "$STUDIO"`) would quietly mean the default home, and `init ''`
    would make whatever folder the default is into a home: an empty value is a mistake, said as one."""
    for name, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and not item.strip():
                where = f"--{name.replace('_', '-')}" if name not in ("path", "photo") else f"the {name}"
                parser.error(f"{where} is empty; give it a value, or leave it out for the default")


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _refuse_empty(parser, args)
    _setup_logging(args.verbose)
    serve(getattr(args, "home", None) or default_home())  # before any message names a command
    try:
        if args.command in NEEDS_HOME:
            from .status import require_home

            require_home(load_config(getattr(args, "home", None)))
        return int(args.func(args) or 0)
    except ConfigError as exc:
        log.error("configuration problem: %s", exc)
        return EX_CONFIG
    except UnknownAdvisor as exc:  # every --advisor of every command is checked by get_advisor
        print(shown(exc.args[0] if exc.args else str(exc)), file=sys.stderr)
        return EX_USAGE
    except LedgerUnavailable as exc:
        log.error("%s", exc)  # one line that says what to fix, not a traceback
        return EX_CONFIG
    except DatabaseError as exc:  # damage found after the ledger opened: the same line as at opening
        log.error("%s", ledger_problem(config_from(args).db_path, exc))
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        raise  # the reader went away (`| head`): main() handles that quietly
    except OSError as exc:
        # A folder made read-only, a full disk, a drive gone: the system's words and the file, not a traceback
        # (with -v, the traceback too, for a bug report).
        log.error("%s%s: %s; check that folder (permissions, free space, the drive), then run the command again",
                  f"{exc.filename}: " if exc.filename else "", type(exc).__name__, exc.strerror or exc,
                  exc_info=args.verbose)
        return EX_IOERR


if __name__ == "__main__":
    sys.exit(main())
