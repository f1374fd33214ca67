"""The `mondrian` command as messages name it, spelt so that pasting a hint acts on the home this process serves.

A hint such as "run `mondrian retry --failed`" would otherwise send someone who started Mondrian with `--home` (or a
launchd service with its own MONDRIAN_HOME) to the default home: a different ledger, or none. The entry points call
`serve(home)` once; every message then names `mondrian()`, which adds `--home` where a plain shell would miss it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

_home_flag = ""  # empty while this process serves the home a shell reaches without flags or MONDRIAN_HOME
_program = ""  # how a shell reaches this Mondrian (see _entry_point): found at the first message
# Set for the processes Mondrian starts itself (`python -m ...`: the isolation check, training), whose own argv
# names no entry point: their hints name the command that started the daemon.
PROGRAM_ENV = "MONDRIAN_PROGRAM"


def serve(home: Path | str) -> None:
    """Hints from this process name `home` unless a plain `mondrian` already reaches it."""
    from .config import default_home

    global _home_flag
    home = Path(home).expanduser().resolve()
    # env={}: a shell without MONDRIAN_HOME, the common case after following a hint from a service's log
    _home_flag = "" if home == default_home({}) else f" --home {shell_word(home)}"


def shell_word(path: Path) -> str:
    """`path` as one shell word that gives back its exact bytes: shlex's quoting, or for a name that is not UTF-8
    (possible on Linux) bash's and zsh's $'...' with \\x escapes, which survives the terminal's own escaping."""
    raw = os.fsencode(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or any(ord(c) < 32 or ord(c) == 127 for c in text):
        # Not UTF-8, or a control character (a line break in a folder's name): inside '...' the terminal shows it
        # escaped (`\n`), which pasted is a backslash and an n. $'...' gives the byte back.
        return "$'" + "".join(chr(b) if 32 <= b < 127 and chr(b) not in "'\\" else f"\\x{b:02x}" for b in raw) + "'"
    return shlex.quote(str(path))


def _entry_point() -> str:
    """`mondrian` where that name, in a shell, is the entry point this process was started from (installed with
    pipx or pip, or a checkout's venv activated); else that entry point's own path, quoted: in a checkout it is
    `.venv/bin/mondrian`, which a plain shell does not find as `mondrian` ("command not found"). A process started
    as `python -m daemon` has no entry point of its own to name: it keeps `mondrian`."""
    script = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if os.path.basename(script) != "mondrian" or not os.path.isfile(script):
        return os.environ.get(PROGRAM_ENV) or "mondrian"
    found = shutil.which("mondrian")
    try:
        if found and os.path.samefile(found, script):
            return "mondrian"
    except OSError:
        pass
    return shell_word(Path(os.path.abspath(script)))


def program() -> str:
    """The command that starts this Mondrian from a shell, without any --home (`mondrian init PATH` names its own)."""
    global _program
    if not _program:
        _program = _entry_point()
    return _program


def child_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for a child process of Mondrian's own, whose hints should name this process's command."""
    return {**env, PROGRAM_ENV: program()}


def mondrian() -> str:
    """`mondrian` (as a shell reaches it here), with `--home H` when the served home is not the default one."""
    return program() + _home_flag


def without_home(text: str) -> str:
    """`text` for a file of the outbox (a failure record, its page, the index): pages show no absolute path (they
    are shared, and served by the API), and a home moved later would leave them naming the old place. The terminal
    and the log keep the flag; `mondrian status` there gives each failure's next step with it."""
    return text.replace(mondrian(), "mondrian") if mondrian() != "mondrian" else text


__all__ = ["serve", "mondrian", "program", "child_env", "shell_word", "without_home"]
