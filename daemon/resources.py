"""Where Mondrian's bundled files live: templates, advisor definitions, sample photos, service templates.

One place answers for a checkout and an installed package alike, so no module guesses paths from `__file__`.
In a checkout they are the top-level folders (`templates/`, `advisors/`, `samples/`, `launchd/`); an installed
package (a wheel, `pip install .`, `pipx`, `uv tool`) carries the same folders as `daemon/bundled/<name>/`
(setup.py maps them there), because an install has no checkout around it.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

BUNDLED = ("templates", "advisors", "samples", "launchd")
INSTALLED_DIR = "bundled"  # inside the daemon package, in a wheel only (never in a checkout)


def code_root() -> Path:
    """The folder that holds the `daemon` package: the checkout, or site-packages (or a `--target` folder).
    A child process given it on PYTHONPATH runs this very code."""
    return Path(str(files("daemon"))).resolve().parent


def _installed() -> Path | None:
    path = Path(str(files("daemon"))).resolve() / INSTALLED_DIR
    return path if path.is_dir() else None


def checkout_root() -> Path | None:
    """The source checkout this code runs from (an editable install counts), or None for an installed package."""
    if _installed() is not None:
        return None
    root = code_root()
    return root if (root / "pyproject.toml").is_file() and (root / "templates").is_dir() else None


def bundled(name: str) -> Path:
    """The bundled folder `name` (`templates`, `advisors`, `samples`, `launchd`)."""
    if name not in BUNDLED:
        raise ValueError(f"{name!r} is not a bundled folder; use one of {', '.join(BUNDLED)}")
    installed = _installed()
    if installed is not None:
        return installed / name
    root = checkout_root()
    if root is None:
        raise RuntimeError(f"Mondrian's bundled files ({', '.join(BUNDLED)}) are missing: neither "
                           f"{code_root() / 'daemon' / INSTALLED_DIR} (an installed package) nor a checkout around "
                           f"{code_root()} has them. Reinstall Mondrian from its source folder (`pip install .`, "
                           f"`pipx install .`), or run it from the checkout")
    return root / name


def templates_dir() -> Path:
    return bundled("templates")


def advisors_dir() -> Path:
    return bundled("advisors")


def samples_dir() -> Path:
    return bundled("samples")


def service_templates_dir() -> Path:
    return bundled("launchd")
