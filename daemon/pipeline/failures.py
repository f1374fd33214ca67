"""Why a photo failed, grouped by cause, and the next step that fits each cause.

A failure's reason is written where it happens (images.py, inbox.py, worker.py, publish.py, fsutil.py), in words
that already say what went wrong. This module sorts those reasons into a handful of causes so that the failure
record (`<name>.error.json`), its page (`<name>.error.html`) and the outbox index can say what to do next in a
way that fits: a mistyped `--advisor` is not "fix the photo", a time limit is a setting, a crash is set aside.

`cause_of` reads the reason text: the phrases it looks for are the ones the project writes (each cause is tested
by producing the real failure), and a reason it does not recognise gets the general advice, never a wrong one.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from ..config import MODES
from ..hints import mondrian, shell_word

if TYPE_CHECKING:
    from ..config import Config
    from ..ledger import Job


@dataclass(frozen=True)
class Cause:
    key: str
    title: str  # a short label for the index and the page's heading
    advice: str  # the next step; {again} is how to try once more (retry, or `mondrian analyze` again)
    photo_at_fault: bool  # whether the file itself must change (else: a setting, the command line, the machine)


# Templates, not text: `{mondrian}` is filled in when the advice is given (the home is known only then).
RETRY = "run `{mondrian} retry --failed`"
ANALYZE_AGAIN = "run `{mondrian} analyze` on it again"

# First match wins: the more specific causes come first.
_CAUSES: list[tuple[Cause, tuple[str, ...]]] = [
    (Cause("interrupted", "Analysis was stopped",
           "Nothing is wrong with the photo: `{mondrian} analyze` was stopped before it finished. {again_cap}.",
           False),
     (r"analyze` was stopped", r"analyze` stopped")),  # `mondrian [--home H] analyze`
    (Cause("crash", "The analysis crashed on this photo",
           "Mondrian crashed several times on this photo, also alone in a separate process, so it was set aside "
           "to let the rest of the inbox go on. Export it again (another format or a smaller size) and drop the "
           "new file into the inbox.", True),
     (r"in a separate process broke",)),
    (Cause("timeout", "Took longer than the time limit",
           "The photo is probably fine; its analysis took longer than `job_timeout_seconds` allows. Raise "
           "`job_timeout_seconds` {where_job_timeout_seconds} (or lower `max_pixels`){apply}, then {again}.", False),
     (r"job_timeout_seconds", r"took longer than")),
    (Cause("advisor_command", "Unknown advisor on the command line",
           "The photo is fine: the advisor named with `--advisor` does not exist. Check its spelling ({advisors}) "
           "and {again} with a known `--advisor`.", False),
     ()),  # chosen by where the advisor came from, see cause_of
    (Cause("advisor_definition", "The advisor's definition cannot be used",
           "The photo is fine: the definition of the advisor it was for (`advisors/<id>/advisor.toml`) cannot be "
           "used, for the reason above. Fix that file as it says, then {again}.", False),
     (r"advisor '[^']*' is not usable",)),
    (Cause("advisor_folder", "Unknown advisor folder",
           "The photo is fine: the inbox folder it was in names an advisor that is not (or no longer) defined. "
           "Known advisors: {advisors}. Put back `advisors/<id>/advisor.toml`, or drop the photo into a known "
           "advisor's folder (or the top of the inbox for the default advisor).", False),
     (r"unknown advisor", r"is not an advisor id")),
    (Cause("mode_command", "Unknown mode on the command line",
           "The photo is fine: the mode given with `--mode` is not one of " + ", ".join(MODES) + ". "
           "{again_cap} with a known `--mode`.", False),
     ()),  # chosen by where the mode came from, see cause_of
    (Cause("sidecar", "The .mode sidecar is wrong",
           "The photo is fine; its `.mode` sidecar is not. Write one of " + ", ".join(MODES) + " into it (it lies "
           "beside the photo), or delete it to use the default mode; then {again}.", False),
     (r"\bthe sidecar\b",)),
    (Cause("shape", "The model cannot take this size or shape",
           "The model's image preprocessing refuses this photo's size or shape. Export it at a more ordinary size "
           "and shape (crop a very long panorama) and drop the new file into the inbox.", True),
     (r"preprocessing refused",)),
    (Cause("model", "The model could not write a critique",
           "The photo is probably fine: the model failed on it, and would again the same way (it decodes "
           "greedily). Change what the reason names (a setting in mondrian.toml, the advisor's prompt, or the model: "
           "`MONDRIAN_MODEL`, `{mondrian} status`), then {again}.", False),
     (r"^the model could not", r"model could not be loaded")),
    (Cause("link", "A link, not a photo",
           "Mondrian does not follow links out of the inbox. Copy the photo itself (not a link or an alias) into "
           "the inbox.", True),
     (r"this is a link", r"no longer inside the inbox", r"replaced by a link")),
    (Cause("permission", "No permission to read or move it",
           "Make the photo readable and its folder writable (`chmod u+rw`), then {again}.", False),
     (r"chmod", r"permission")),
    (Cause("not_a_file", "Not a regular file",
           "This is not a file with a photo in it (a pipe, a socket, a device or a folder). Copy the photo itself "
           "into the inbox.", True),
     (r"not a file with a photo in it", r"not a regular file")),
    (Cause("too_large", "Too large",
           "Export the photo at a smaller size and drop the new file into the inbox, or raise `max_file_mb` "
           "{where_max_file_mb}{apply}, then {again}.", True),
     (r"max_file_mb", r"too large", r"more memory", r"allowed here", r"bytes, more than")),
    (Cause("unreadable", "Not a photo Mondrian can read",
           "Open the file in your photo app. If it opens, export it again as JPEG, PNG, TIFF or HEIC and drop the "
           "new file into the inbox; if it does not, copy it again from the camera or card.", True),
     (r"not a photo", r"truncated", r"damaged", r"could not be decoded", r"is empty", r"decompression bomb",
      r"could not be read")),
    (Cause("outbox", "Could not write to the outbox",
           "Mondrian could not write the report or move the photo (a full disk, a read-only or linked folder?). "
           "Fix that, then {again}.", False),
     (r"could not write", r"could not be moved", r"outbox")),
]
OTHER = Cause("other", "Could not be analysed",
              "Read the reason above; once its cause is fixed, {again}.", False)
CAUSES: dict[str, Cause] = {c.key: c for c, _ in _CAUSES} | {OTHER.key: OTHER}
_PATTERNS = [(c, re.compile("|".join(p), re.IGNORECASE)) for c, p in _CAUSES if p]


def cause_of(reason: str, *, advisor_source: str | None = None, mode_source: str | None = None) -> Cause:
    """The cause of a failure from its reason; where the advisor and mode came from (`folder`, `command`, ...)
    tells a mistyped command line from a photo or a folder."""
    for cause, pattern in _PATTERNS:
        if not pattern.search(reason or ""):
            continue
        if cause.key == "advisor_folder" and advisor_source == "command":
            return CAUSES["advisor_command"]
        if cause.key == "sidecar" and mode_source == "command":
            return CAUSES["mode_command"]
        return cause
    if mode_source == "command" and re.search(r"unknown (analysis )?mode", reason or "", re.IGNORECASE):
        return CAUSES["mode_command"]
    return OTHER


def analyzed_as(j: Job, *, name_only: bool = False) -> dict[str, Any]:
    """How a `mondrian analyze` job's photo is analysed again: its path (its file name alone for files of the
    outbox, which name no absolute path), and the --advisor and --mode its command line gave (an inbox photo's job:
    nothing, `retry --failed` puts it back)."""
    if j.owns_file:
        return {}
    return {"photo": Path(j.source_path).name if name_only else j.source_path,
            "advisor": j.advisor if j.advisor_source == "command" else None,
            "mode": j.requested_mode if j.mode_source == "command" else None}


def analyze_command(photo: str | os.PathLike[str], *, advisor: str | None = None, mode: str | None = None) -> str:
    """`mondrian analyze PHOTO` as a shell pastes it: a bare `mondrian analyze` is a usage error ("the following
    arguments are required: photo"), so the photo's own path, with the `--advisor` and `--mode` it was given."""
    words = [mondrian(), "analyze"]
    words += ["--advisor", shlex.quote(advisor)] if advisor else []
    words += ["--mode", shlex.quote(mode)] if mode else []
    # A file name alone (a failure record's) may start with "-", which the command line would read as an option.
    word = shell_word(Path(photo))
    return " ".join(words + ["./" + word if os.fspath(photo).startswith("-") else word])


def advice(cause: Cause, *, from_inbox: bool, advisors: Iterable[str] = (),
           photo: str | os.PathLike[str] | None = None, advisor: str | None = None, mode: str | None = None,
           cfg: Config | None = None, outbox: bool = False) -> str:
    """The cause's next step, for a photo of the inbox (retried with `retry --failed`) or of `mondrian analyze`
    (never moved by Mondrian: analysed again by hand). Given the `photo` of a `mondrian analyze` job (and the
    `advisor` and `mode` its command line named), the command to analyse it again names it (the terminal's
    `status`; files of the outbox name the file alone, to be run in its folder)."""
    if not from_inbox and photo is not None:
        again = "run `" + analyze_command(photo, advisor=None if cause.key == "advisor_command" else advisor,
                                          mode=None if cause.key == "mode_command" else mode) + "` again"
        if not Path(photo).is_absolute():
            again += " in the folder that holds it"
    else:
        again = (RETRY if from_inbox else ANALYZE_AGAIN).format(mondrian=mondrian())
    def where(key: str) -> str:  # the variable that overrides the file, when one does
        return cfg.where_set(key, full_path=not outbox) if cfg is not None else "in mondrian.toml"

    # The daemon reads its settings when it starts: a photo retried into a running daemon would meet the old value.
    # `mondrian analyze` reads them afresh each time.
    apply = (f" and restart the daemon so it reads the new value (`{mondrian()} service restart`, or stop "
             f"`{mondrian()} run` and start it again)" if from_inbox else "")
    text = cause.advice.format(again=again, again_cap=again[0].upper() + again[1:], mondrian=mondrian(),
                               advisors=", ".join(sorted(advisors)) or "none", apply=apply,
                               where_job_timeout_seconds=where("job_timeout_seconds"),
                               where_max_file_mb=where("max_file_mb"))
    return text


def where_it_is(*, from_inbox: bool, kept_in_inbox: bool) -> str:
    """Where the photo lies now, in one sentence for the failure record."""
    if not from_inbox:
        return f"The photo was left where it is (`{mondrian()} analyze` never moves it)."
    if kept_in_inbox:
        return "The photo was left where it is in the inbox."
    return ("The photo is in outbox/failed/, beside this record; once it is fixed you can also drop it into the inbox "
            "again.")


__all__ = ["Cause", "CAUSES", "OTHER", "cause_of", "advice", "analyze_command", "analyzed_as", "where_it_is"]
