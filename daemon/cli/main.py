"""`mondrian`: the command line, one argparse tree. Each sub-command is a thin layer over one module.

The command groups are listed in `COMMAND_GROUPS` and imported explicitly: a group that fails to import stops
`mondrian` with its traceback, instead of its commands silently disappearing."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

from peewee import DatabaseError

from ..analysis.advisors import UnknownAdvisor
from ..config import MODES, ConfigError
from ..ledger import LedgerUnavailable, ledger_problem
from .common import EX_CONFIG, EX_USAGE, config_from
from .terminal import SafeFormatter, shown

log = logging.getLogger("mondrian")


def _setup_logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    # File names reach the log: escaped, so a name cannot forge a line or send escapes to a terminal.
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for noisy in ("watchdog", "peewee", "PIL", "httpx", "huggingface_hub", "datasets", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # watchdog logs a spurious error when its inotify thread is stopped mid-read (harmless, at shutdown only)
    logging.getLogger("watchdog.observers.inotify").setLevel(logging.CRITICAL)


# -- commands ---------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from ..pipeline.supervisor import run_daemon

    return run_daemon(config_from(args), once=args.once)


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analyze import AnalyzeRefused, analyze_one

    cfg = config_from(args)
    if args.mode and args.mode.lower() not in MODES:
        print(f"unknown mode {args.mode!r}; use one of {', '.join(MODES)}", file=sys.stderr)
        return 2
    if len(args.photo) > 1:  # a shell pattern that matched several files
        print(f"`mondrian analyze` takes one photo (got {len(args.photo)}); to analyse many, drop them into the "
              f"inbox ({cfg.inbox})", file=sys.stderr)
        return 2
    try:
        result = analyze_one(cfg, args.photo[0], mode=args.mode.lower() if args.mode else None,
                             advisor=args.advisor)
    except AnalyzeRefused as exc:
        print(f"cannot analyze: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    elif result["state"] == "done":
        print(result["report_html"])
    else:
        print(f"failed: {result['error']}", file=sys.stderr)
    return 0 if result["state"] == "done" else 1


def cmd_status(args: argparse.Namespace) -> int:
    from .status import collect, render

    info = collect(config_from(args))  # refuses (exit 78) where no home is: a mistyped MONDRIAN_HOME creates none
    print(json.dumps(info, indent=2, default=str) if args.json else render(info))
    return 0


def cmd_model_smoke(args: argparse.Namespace) -> int:
    from ..model.smoke import build_smoke_model, ensure_smoke_model

    cfg = config_from(args)
    path = build_smoke_model(Path(args.dest), shapes=args.shapes) if args.dest else \
        ensure_smoke_model(cfg.var_dir, shapes=args.shapes)
    print(path)
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from .retry import retry_failed
    from .status import require_home

    cfg = config_from(args)
    require_home(cfg)  # a mistyped MONDRIAN_HOME must not become a new, empty home
    moved, left = retry_failed(cfg, ids=args.ids or None)
    for line in moved:
        print(shown(line))
    for line in left:
        print(shown(line), file=sys.stderr)
    print(f"{len(moved)} photo(s) queued again", file=sys.stderr)
    return 0


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
    demo.set_defaults(func=cmd_demo)

    an = sub.add_parser("analyze", help="analyse one photo now, without the daemon")
    an.add_argument("photo", nargs="+", help="one photo (it stays where it is)")
    an.add_argument("--mode", help=f"one of {', '.join(MODES)}")
    an.add_argument("--advisor", help="advisor id, e.g. ansel")
    an.add_argument("--model", help="model: 'smoke', a local folder or a hub id")
    an.add_argument("--json", action="store_true")
    an.set_defaults(func=cmd_analyze)

    st = sub.add_parser("status", help="what the daemon is doing")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    model = sub.add_parser("model", help="model utilities")
    msub = model.add_subparsers(dest="model_command", required=True)
    smoke = msub.add_parser("smoke", help="build the tiny offline smoke model (random weights)")
    smoke.add_argument("--shapes", choices=["smoke", "real"], default="smoke",
                       help="'real' builds random weights with the real Qwen2-VL-2B shapes (benchmarks)")
    smoke.add_argument("--dest", help="folder to build into (default: <home>/var/models/)")
    smoke.set_defaults(func=cmd_model_smoke)

    retry = sub.add_parser("retry", help="queue failed photos again")
    retry.add_argument("--failed", action="store_true", required=True, help="requeue failed photos")
    retry.add_argument("ids", nargs="*", type=int, help="only these job ids")
    retry.set_defaults(func=cmd_retry)



def command_groups() -> list[Callable[[Any], None]]:
    """Every command group of `mondrian`, in the order `--help` lists them. A new command goes into one of these
    (or a new group here): each registers its sub-commands and sets `func`, the handler `main` calls."""
    from jobs.cli import register as training_commands  # `train`, `adapters`, `evaluate`: the training side

    from ..service.install import add_service_parser
    from .references import register as references_commands

    return [add_core_commands, add_service_parser, references_commands, training_commands]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mondrian", description="A local photo-critique daemon.")
    p.add_argument("--home", help="Mondrian home folder (default: $MONDRIAN_HOME or this checkout)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    for register in command_groups():
        register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
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


if __name__ == "__main__":
    sys.exit(main())
