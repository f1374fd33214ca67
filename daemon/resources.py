"""Where Mondrian's bundled files live: templates, advisor definitions, sample photos, service templates.

One place answers for a checkout and an installed package alike, so no module guesses paths from `__file__`.
"""
from __future__ import annotations

from pathlib import Path

from .config import PROJECT_ROOT


def bundled(name: str) -> Path:
    """The bundled folder `name` (`templates`, `advisors`, `samples`, `launchd`)."""
    return PROJECT_ROOT / name


def templates_dir() -> Path:
    return bundled("templates")


def advisors_dir() -> Path:
    return bundled("advisors")


def samples_dir() -> Path:
    return bundled("samples")


def service_templates_dir() -> Path:
    return bundled("launchd")
