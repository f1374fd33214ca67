"""Advisor definitions: who is looking at the photo, and in whose voice the critique is written.

Each advisor is a folder `advisors/<id>/` with an `advisor.toml` (id, name, prompt) and, optionally, a
`references/` folder of that photographer's own work (used by the rag and lora modes). Definitions ship
with Mondrian; a studio can add its own under `<home>/advisors/`, which wins on a clash.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..resources import advisors_dir

ADVISOR_ID = re.compile(r"^[a-z][a-z0-9_-]{0,39}\Z")  # \Z: "$" would let a trailing newline in
BUILTIN_DIR = advisors_dir()


class UnknownAdvisor(LookupError):
    pass


@dataclass(frozen=True)
class Advisor:
    id: str
    name: str
    prompt: str
    flip_augmentation: bool = True


def _read(path: Path) -> Advisor | None:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        adv = Advisor(id=str(data["id"]), name=str(data["name"]), prompt=str(data["prompt"]).strip(),
                      flip_augmentation=bool(data.get("flip_augmentation", True)))
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return None
    if not ADVISOR_ID.match(adv.id) or adv.id != path.parent.name:
        return None
    return adv


def load_advisors(cfg: Config) -> dict[str, Advisor]:
    found: dict[str, Advisor] = {}
    for root in (BUILTIN_DIR, cfg.advisors_dir):
        if not root.is_dir():
            continue
        for toml in sorted(root.glob("*/advisor.toml")):
            adv = _read(toml)
            if adv:
                found[adv.id] = adv
    return found


def references_dir(cfg: Config, advisor_id: str) -> Path:
    if not ADVISOR_ID.match(advisor_id):
        raise UnknownAdvisor(advisor_id)
    return cfg.advisors_dir / advisor_id / "references"


def get_advisor(cfg: Config, advisor_id: str) -> Advisor:
    """The one check of an advisor id, for every command and the daemon: a known advisor, or UnknownAdvisor with a
    message naming the known ones. An id is never used in a path before it has passed here."""
    advisors = load_advisors(cfg)
    if advisor_id in advisors:
        return advisors[advisor_id]
    if not ADVISOR_ID.match(advisor_id):
        raise UnknownAdvisor(
            f"{advisor_id!r} is not an advisor id (lowercase letters, digits, '-' and '_', starting with a letter); "
            f"known advisors: {', '.join(sorted(advisors)) or 'none'}")
    raise UnknownAdvisor(
        f"unknown advisor {advisor_id!r}; known advisors: {', '.join(sorted(advisors)) or 'none'}. "
        f"Add one as advisors/{advisor_id}/advisor.toml or use a known id")
