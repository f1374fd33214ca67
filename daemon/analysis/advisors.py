"""Advisor definitions: who is looking at the photo, and in whose voice the critique is written.

Each advisor is a folder `advisors/<id>/` with an `advisor.toml` (id, name, prompt) and, optionally, a
`references/` folder of that photographer's own work (used by the rag and lora modes). Definitions ship
with Mondrian; a studio can add its own under `<home>/advisors/`, which wins on a clash.
"""

from __future__ import annotations

import logging
import re
import tomllib
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, toml_problem
from ..fsutil import NotReadable, read_text_file
from ..hints import shell_word
from ..resources import advisors_dir

ADVISOR_ID = re.compile(r"^[a-z][a-z0-9_-]{0,39}\Z")  # \Z: "$" would let a trailing newline in
BUILTIN_DIR = advisors_dir()
PROMPT_MAX_CHARS = 32_000  # the built-in voices are ~600; the model runtime refuses a prompt past 8,192 tokens
log = logging.getLogger("mondrian.advisors")


class UnknownAdvisor(LookupError):
    pass


@dataclass(frozen=True)
class Advisor:
    id: str
    name: str
    prompt: str
    flip_augmentation: bool = True


class _Refused(ValueError):
    """Why an advisor.toml is not used, in words for a person."""


def _read(path: Path, shown: str) -> Advisor:
    """The advisor `path` defines, or _Refused naming the file as `shown` (reasons reach failure pages, which never
    show an absolute path)."""
    try:
        text = read_text_file(path)
    except NotReadable as exc:  # a FIFO (which would hang every command), a folder, text that is not UTF-8
        raise _Refused(f"{shown} cannot be read: {exc}") from None
    except OSError as exc:
        raise _Refused(f"{shown} cannot be read ({exc.strerror or exc}): make it readable") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _Refused(toml_problem(Path(shown), text, exc, "fix it")) from None
    missing = [key for key in ("id", "name", "prompt") if key not in data]
    if missing:
        raise _Refused(f"{shown} has no {' and no '.join(missing)}: an advisor needs id, name and prompt "
                       f"(the README's Advisors section has an example)")
    wrong = [key for key in ("id", "name", "prompt") if not isinstance(data[key], str)]
    if wrong:
        raise _Refused(f"{shown}: {', '.join(wrong)} must be text in double quotes")
    if not isinstance(data.get("flip_augmentation", True), bool):  # "no" is text, and bool("no") is True
        raise _Refused(f"{shown}: flip_augmentation must be true or false, without quotes")
    adv = Advisor(id=data["id"], name=data["name"].strip(), prompt=data["prompt"].strip(),
                  flip_augmentation=data.get("flip_augmentation", True))
    folder = path.parent.name
    if not ADVISOR_ID.match(adv.id) or adv.id != folder:
        # One way out, the same whichever of the two is wrong: an id a folder on any disk can have, in both places
        # ("make them the same" sent `Degas/` with id "degas" to id "Degas", refused in turn).
        wanted = adv.id if ADVISOR_ID.match(adv.id) else (suggested_id(adv.id) or suggested_id(folder))
        what = (f"id {adv.id!r} is not an advisor id (lowercase letters, digits, '-' and '_', starting with a "
                f"letter)" if not ADVISOR_ID.match(adv.id) else
                f"its id {adv.id!r} is not its folder's name {folder!r}")
        if wanted is None:
            raise _Refused(f"{shown}: {what}; give it an id of lowercase letters, digits, '-' and '_', and name its "
                           f"folder the same")
        here, there = path.parent, path.parent.with_name(wanted)
        # A change of case only goes in two steps: on a Mac's disk `mv Degas degas` finds `degas` there (itself)
        # and fails trying to move it inside.
        rename = (f"mv {shell_word(here)} {shell_word(there)}" if _folded(folder) != _folded(wanted) else
                  f"mv {shell_word(here)} {shell_word(here.with_name(folder + '.renaming'))} && "
                  f"mv {shell_word(here.with_name(folder + '.renaming'))} {shell_word(there)}")
        steps = ([f'write id = "{wanted}" in it'] if adv.id != wanted else []) + \
                ([f"rename its folder to {wanted} (`{rename}`)"] if folder != wanted else [])
        raise _Refused(f"{shown}: {what}; {' and '.join(steps)}")
    if len(adv.prompt) > PROMPT_MAX_CHARS:
        raise _Refused(f"{shown}: its prompt is {len(adv.prompt):,} characters; an advisor's voice fits in "
                       f"{PROMPT_MAX_CHARS:,} (a longer one would not fit beside the photo): shorten it")
    if not adv.prompt or not adv.name:
        raise _Refused(f"{shown}: its {'prompt' if not adv.prompt else 'name'} is empty; write the advisor's voice "
                       f"into it")
    return adv


def suggested_id(text: str) -> str | None:
    """An advisor id made from a name as a person writes it ("Degas", "Claude Monet", "Brassaï"), or None."""
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9_-]+", "-", plain).strip("-_")[:40]
    return slug if ADVISOR_ID.match(slug) else None


_warned: set[tuple[Path, str]] = set()


def _scan(cfg: Config) -> tuple[dict[str, Advisor], dict[str, str]]:
    """Every usable advisor, and why each refused advisor.toml is not used (by its folder's name). A studio's
    definition wins over a built-in one of the same id."""
    found: dict[str, Advisor] = {}
    refused: dict[str, str] = {}
    for root in (BUILTIN_DIR, cfg.advisors_dir):
        if not root.is_dir():
            continue
        for toml in sorted(root.glob("*/advisor.toml")):
            try:
                adv = _read(toml, f"{'advisors' if root == cfg.advisors_dir else 'built-in advisors'}/"
                                  f"{toml.parent.name}/advisor.toml")
            except _Refused as why:
                refused[toml.parent.name] = str(why)
                # A studio's broken override of a built-in advisor (`advisors/Ansel/` too, in any case): its photos
                # fail naming the file, never get the built-in prompt the studio meant to replace.
                for same in [i for i in found if _folded(i) == _folded(toml.parent.name)]:
                    found.pop(same)
                if (toml, str(why)) not in _warned:  # once per problem: load_advisors runs for every photo
                    _warned.add((toml, str(why)))
                    log.warning("advisor definition not used (%s): %s", toml, why)
                continue
            found[adv.id] = adv
            refused.pop(adv.id, None)
    return found, refused


def load_advisors(cfg: Config) -> dict[str, Advisor]:
    return _scan(cfg)[0]


def advisor_ids(cfg: Config) -> set[str]:
    """The usable advisors' ids; none when the definitions cannot be read (that is reported where they are loaded)."""
    try:
        return set(load_advisors(cfg))
    except Exception:  # noqa: BLE001 - a broken definition must not break the caller's own check
        return set()


def advisor_problems(cfg: Config) -> dict[str, str]:
    """Why each advisor.toml that is there is not used, by its folder's name (for `status` and error messages)."""
    return _scan(cfg)[1]


def advisor_folders(cfg: Config) -> dict[str, str]:
    """The names an inbox folder may have, each with the advisor it selects: every usable advisor's id, and every
    advisor whose definition is refused (a photo in `inbox/monet/` while monet's advisor.toml is broken must fail
    saying so, not be critiqued by the default advisor), whatever its folder is named (`advisors/Degas/`: the
    inbox's `Degas/` is that advisor's). A usable advisor's display name selects it too, where no id and no other
    advisor has that name: `inbox/Claude Monet/` waits for monet while `advisors/Claude Monet/` is refused (its
    id is not its folder's name), and is monet's once that folder is renamed as the advice says."""
    found, refused = _scan(cfg)
    folders = {name: name for name in (*found, *refused)}
    taken = {_folded(name) for name in folders}
    names: dict[str, list[str]] = {}
    for adv in found.values():
        names.setdefault(_folded(adv.name), []).append(adv.id)
    for name, ids in names.items():
        # Never over an id, nor over the id a person's way of naming the folder gives (`inbox/Ansel Adams/` is the
        # studio's `ansel-adams` where there is one, not the built-in `ansel` named "Ansel Adams").
        if len(ids) == 1 and name not in taken and suggested_id(name) not in taken - {ids[0]}:
            folders[name] = ids[0]
    return folders


def _folded(name: str) -> str:
    return unicodedata.normalize("NFC", name).casefold()


def references_dir(cfg: Config, advisor_id: str) -> Path:
    if not ADVISOR_ID.match(advisor_id):
        raise UnknownAdvisor(advisor_id)
    return cfg.advisors_dir / advisor_id / "references"


def advisor_arg(text: str) -> str:
    """An advisor id as a person types it on the command line (`--advisor Cartier`): ids are lowercase, and the
    API and the inbox's folders take any case too. Nothing else is forgiven: a stray newline or space is more
    likely a script's mistake than a name, and is refused as before."""
    return text.lower()


def get_advisor(cfg: Config, advisor_id: str) -> Advisor:
    """The one check of an advisor id, for every command and the daemon: a known advisor, or UnknownAdvisor with a
    message naming the known ones. An id is never used in a path before it has passed here."""
    advisors, refused = _scan(cfg)
    if advisor_id in advisors:
        return advisors[advisor_id]
    # A refused definition by its folder's name in any case: `--advisor Degas` (lowered) or `inbox/degas/` must say
    # what is wrong with advisors/Degas/advisor.toml, not "unknown advisor, add advisors/degas/advisor.toml" (on a
    # Mac's disk, the very file that is there).
    why = refused.get(advisor_id) or next((r for name, r in sorted(refused.items())
                                          if _folded(name) == _folded(advisor_id)), None)
    if why is not None:
        raise UnknownAdvisor(f"advisor {advisor_id!r} is not usable: {why}; known advisors: "
                             f"{', '.join(sorted(advisors)) or 'none'}")
    if not ADVISOR_ID.match(advisor_id):
        raise UnknownAdvisor(
            f"{advisor_id!r} is not an advisor id (lowercase letters, digits, '-' and '_', starting with a letter); "
            f"known advisors: {', '.join(sorted(advisors)) or 'none'}")
    raise UnknownAdvisor(
        f"unknown advisor {advisor_id!r}; known advisors: {', '.join(sorted(advisors)) or 'none'}. "
        f"Add one as advisors/{advisor_id}/advisor.toml or use a known id")
