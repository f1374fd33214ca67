"""What every command shares: the configuration from the command line, exit codes, the one progress bar."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..analysis.advisors import UnknownAdvisor, get_advisor
from ..config import CONFIG_NAME, Config, ConfigError, load_config
from ..errors import EX_CONFIG, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE

# One look for every bar: count, bar, time so far and left, then what the command adds (loss, the file).
BAR_FORMAT = "{desc}{n_fmt}/{total_fmt} |{bar:28}| {elapsed}, {remaining} left{postfix}"


def config_from(args: argparse.Namespace, *, model: str | None = None) -> Config:
    """The configuration of the home and model a command was given (--home, --model), else the defaults; a
    default advisor that does not exist is refused here, before any photo would fail on it."""
    cfg = load_config(getattr(args, "home", None), model=model or getattr(args, "model", None))
    try:
        get_advisor(cfg, cfg.default_advisor)
    except UnknownAdvisor as exc:
        raise ConfigError(f"default_advisor (in {cfg.home / CONFIG_NAME} or MONDRIAN_ADVISOR): "
                          f"{exc.args[0] if exc.args else exc}") from None
    return cfg


def new_bar(total: int | None, *, desc: str = "", unit: str = "it") -> tqdm:
    """A progress bar on stderr, redrawn in place on a terminal; silent otherwise (a log file or a pipe would get
    every redraw as a line of its own: the command's summary line says what was done)."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, bar_format=BAR_FORMAT, dynamic_ncols=True,
                mininterval=0.2, disable=not sys.stderr.isatty())


@contextlib.contextmanager
def progress_bar(total: int | None, *, desc: str = "", unit: str = "it") -> Iterator[tqdm]:
    """`new_bar` for the length of a `with`, with log records written above the bar instead of through it."""
    with logging_redirect_tqdm(), new_bar(total, desc=desc, unit=unit) as bar:
        yield bar


def say(line: str) -> None:
    """A line on stderr that does not break a progress bar being drawn."""
    tqdm.write(line, file=sys.stderr)


__all__ = ["config_from", "new_bar", "progress_bar", "say", "logging_redirect_tqdm", "BAR_FORMAT", "EX_CONFIG",
           "EX_TEMPFAIL", "EX_UNAVAILABLE", "EX_USAGE"]
