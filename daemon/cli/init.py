"""`mondrian init [PATH]`: make a folder a Mondrian home (inbox/, outbox/, a commented mondrian.toml) and say
what to do next. `run` and `demo` create a home on their own; `init` is the explicit way, and the one the
commands that only look (`status`, `retry`) point at when no home is found."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..config import CONFIG_NAME, Config, ConfigError, default_home, load_config
from ..fsutil import lock_holder
from ..hints import program, shell_word
from .terminal import shown

# One line each, for the settings a new user is most likely to change; README's "Configuration" has them all.
_NOTES = {
    "model": "a hub id, a local model folder, or \"smoke\" (offline, random weights)",
    "default_advisor": "ansel, cartier, leibovitz, or one of your own in advisors/",
    "default_mode": "baseline | rag | lora",
    "max_pixels": "photos are resized to at most this many pixels (448x448)",
    "quiet_seconds": "a file is picked up once it has not changed for this long",
    "job_timeout_seconds": "a photo that takes longer fails instead of stalling the queue (photos analysed "
                           "together, batch_size: each is charged its share of the passes it is in)",
    "inbox": "folders, relative to this home (or absolute)",
}
_PATHS = {"inbox": "inbox", "outbox": "outbox", "var_dir": "var", "db_path": "var/ledger.db",
          "adapters_dir": "adapters", "advisors_dir": "advisors"}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # a TOML basic string or number for everything Config holds


def settings_template() -> str:
    """mondrian.toml with every setting commented out at its default, so the file shows what can be set."""
    lines = ["# Mondrian settings for this home. Each line below is commented out and shows the default:",
             "# remove the `#` and change the value to override it. A mistyped name or an out-of-range value",
             "# is refused when Mondrian starts, with the reason (exit 78).", ""]
    for f in fields(Config):
        if f.name in ("home", "extra", "env_set"):
            continue
        value = _PATHS.get(f.name, f.default)
        line = f"# {f.name} = {_toml_value(value)}"
        note = _NOTES.get(f.name)
        lines.append(f"{line:<56}# {note}" if note else line)
    from jobs.train import TrainSettings  # the training side owns its settings; lazily, as the CLI reaches it

    # Commented out header and all: a setting appended at the end of the file (`echo 'inbox = ...' >>`) must not
    # land in [lora], where it would be refused as an unknown training setting.
    lines += ["", "# Training of the per-advisor LoRA adapters (`mondrian train`, nightly at train_time): to change",
              "# one, remove the `#` from `[lora]` too, and keep the section at the end of the file.", "# [lora]"]
    lines += [f"# {f.name} = {_toml_value(f.default)}" for f in fields(TrainSettings)]
    return "\n".join(lines) + "\n"


def _inside_another_home(path: Path) -> str | None:
    """Why `path` cannot be a home because it lies in another home's inbox, outbox or var folder (that home's daemon
    would take the new mondrian.toml for a photo, or sweep it away), or None."""
    found = containing_home(path)
    if found is None:
        return None
    above, name = found
    path = path.resolve()
    return (f"{path} is inside the {name} of the Mondrian home {above}: its daemon would take the new "
            f"home's files for its own work. Choose a folder outside it (`{program()} init "
            f"{shell_word(above.parent / (path.name or 'Mondrian'))}`)")


def containing_home(path: Path) -> tuple[Path, str] | None:
    """The Mondrian home whose inbox, outbox, var, advisors or adapters folder holds `path`, and which of them; else
    None. (Inside `advisors/`, the new home's inbox photos were indexed as the outer advisor's references.)"""
    path = path.resolve()  # as load_config resolves the other home's folders (/tmp is /private/tmp on a Mac)
    for above in path.parents:
        # A home is its settings file, or (made by `run` or `demo`, which write none) its ledger
        if not ((above / CONFIG_NAME).is_file() or (above / "var" / "ledger.db").is_file()):
            continue
        try:
            other = load_config(above)
            folders = {"inbox": other.inbox, "outbox": other.outbox, "var": other.var_dir,
                       "advisors": other.advisors_dir, "adapters": other.adapters_dir}
        except ConfigError:  # that home's own settings are broken: its default folders still apply
            folders = {name: above / name for name in ("inbox", "outbox", "var", "advisors", "adapters")}
        for name, folder in folders.items():
            if path.is_relative_to(folder.absolute()):
                return above, name
    return None


# Where removable drives and shares mount: a missing folder right under one of these is a drive not connected.
MOUNT_ROOTS = (Path("/Volumes"), Path("/mnt"), Path("/media"), Path("/run/media"))


def _unmounted_parent(path: Path) -> Path | None:
    """The missing folder at the top of `path` where a drive would mount (`/Volumes/Photos`, `/media/me/Photos`), or
    None if `path` may be made: `init` makes missing folders anywhere else, as asked."""
    if path.is_dir():
        return None
    missing = path.absolute()
    while not missing.parent.is_dir() and missing.parent != missing:
        missing = missing.parent
    if os.path.lexists(missing):
        return None
    under = missing.parent
    mount_like = under in MOUNT_ROOTS or under.parent in (Path("/media"), Path("/run/media"))
    return missing if mount_like else None


def init_home(path: Path) -> tuple[Config, bool]:
    """Create the home at `path` (its folders, and mondrian.toml unless one is there); returns its configuration
    and whether the settings file was written. An existing mondrian.toml is kept and checked, never replaced."""
    problem = _inside_another_home(path)
    if problem:
        raise ConfigError(problem)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file, not a folder: choose another place for the home "
                          f"(`{program()} init ~/Pictures/Mondrian`)")
    missing = _unmounted_parent(path)
    if missing is not None:
        raise ConfigError(f"cannot create the home {path}: {missing} does not exist (a drive or network share that "
                          f"is not connected?). Connect it and run this again; Mondrian does not create {missing} "
                          f"itself, as that would put a plain folder where the drive mounts. If it is meant to be a "
                          f"new folder on this disk, create it first (`mkdir -p {shell_word(missing)}`)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the folder {path} ({exc.strerror or exc}): choose a place you can "
                          f"write, or create it first") from None
    cfg_file = path / CONFIG_NAME
    wrote = False
    if not cfg_file.exists():
        try:
            with open(cfg_file, "x", encoding="utf-8") as fh:  # "x": never replace a file that appeared meanwhile
                fh.write(settings_template())
            wrote = True
        except FileExistsError:
            pass
        except OSError as exc:
            raise ConfigError(f"cannot write {cfg_file} ({exc.strerror or exc}): make {path} writable for "
                              f"this user") from None
    cfg = load_config(path)
    cfg.ensure_dirs()
    return cfg, wrote


def cmd_init(args: argparse.Namespace) -> int:
    target = args.path or getattr(args, "home", None)
    path = Path(target).expanduser().absolute() if target else default_home()
    home = getattr(args, "home", None)
    if args.path and home and Path(home).expanduser().absolute() != path:
        # both given, and not the same place: say which one is made (one is likely a slip)
        print(shown(f"note: --home {home} names another place; the home made is the PATH given to init: {path}"),
              file=sys.stderr)
    cfg, wrote = init_home(path)
    print(f"{'Created' if wrote else 'Checked'} the Mondrian home {shown(cfg.home)}")
    print(f"  {shown(cfg.inbox)}/  drop photos here (in a subfolder named after an advisor, e.g. cartier/, for "
          f"that advisor)")
    print(f"  {shown(cfg.outbox)}/  reports appear here: open index.html")
    print(f"  {shown(cfg.home / CONFIG_NAME)}  settings ({'all commented out: the defaults' if wrote else 'kept'})")
    quoted = shell_word(cfg.home)  # pasted back, it must give the same bytes (a name that is not UTF-8 too)
    here = "" if cfg.home == default_home(os.environ) else f"--home {quoted} "
    running = lock_holder(cfg.var_dir / "daemon.lock")
    if running is not None:  # `run` would be refused: this home is served already
        print(f"A Mondrian daemon{f' (pid {running})' if running > 0 else ''} already serves this home: drop photos "
              f"into the inbox; `{program()} {here}status` shows what it is doing.")
        return 0
    print("Next:")
    print(f"  {program()} {here}demo      # try it offline on the sample photos (random smoke model)")
    print(f"  {program()} {here}run       # analyse what you drop into the inbox (Ctrl-C stops)")
    print(f"  {program()} {here}service install   # start it at login instead")
    if here:
        print(f"  (or `export MONDRIAN_HOME={quoted}` and leave out --home)")
    return 0


def register(sub: Any) -> None:
    """`init`."""
    p = sub.add_parser("init", help="create a Mondrian home: inbox/, outbox/ and a commented mondrian.toml")
    p.add_argument("path", nargs="?", help="the folder (default: --home, $MONDRIAN_HOME, or the default home)")
    p.set_defaults(func=cmd_init)
