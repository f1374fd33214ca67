"""Mondrian as a user installs it, away from the checkout: a wheel built from the source (as `pip install .`,
`pipx install .` and `uv tool install .` build it), installed into a folder of its own, run from elsewhere with
HOME and the XDG folders in tmp. The bundled folders must travel in the wheel, and an installed Mondrian must keep
its home in the user's folder, never in site-packages or in the checkout it was built from."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

import daemon
from daemon.cli.init import settings_template
from daemon.config import Config, default_home, load_config
from daemon.resources import BUNDLED
from tests.harness import REPO

DEMO_TIMEOUT = 600
USER_REFERENCE = Path("advisors/ansel/references/mine.jpg")


def _source_copy(dest: Path) -> Path:
    """The checkout's own files (tracked, or new and not ignored): not its venv, ledger, photos or build/."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A non-editable install of a wheel built from this checkout (pip --target: no venv to build, ~5 s)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git checkout, to build the wheel from its files")
    root = tmp_path_factory.mktemp("install")
    src = _source_copy(root / "src")
    # A checkout is also the default home: the user's reference photos live in advisors/<id>/references/.
    (src / USER_REFERENCE).parent.mkdir(parents=True)
    (src / USER_REFERENCE).write_bytes(b"a photographer's own photo")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # No build isolation: the venv's setuptools (the test extra) builds it, with no download.
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "wheels"), str(src)],
                   check=True, cwd=root, timeout=300)
    wheels = list((root / "wheels").glob("mondrian-*.whl"))
    assert len(wheels) == 1, wheels
    target = root / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheels[0])], check=True, cwd=root,
                   timeout=300)
    return target


def _env(tmp: Path, site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MONDRIAN_", "XDG_")) and k not in ("ANALYSIS_MODE", "PYTHONPATH")}
    env.update(HOME=str(tmp / "user"), XDG_DATA_HOME=str(tmp / "data"), XDG_STATE_HOME=str(tmp / "state"),
               XDG_CONFIG_HOME=str(tmp / "config"), PYTHONPATH=str(site), HF_HUB_OFFLINE="1",
               PYTHONDONTWRITEBYTECODE="1")
    (tmp / "user").mkdir(exist_ok=True)
    return env


def _mondrian(site: Path, tmp: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The installed `mondrian` script (its first line is this venv's python), run outside the checkout."""
    return subprocess.run([str(site / "bin" / "mondrian"), *args], env=_env(tmp, site), cwd=tmp,
                          capture_output=True, text=True, timeout=timeout)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if "__pycache__" not in p.parts}


def _checkout_home() -> set[str]:
    """What the checkout holds as a home (where a demo run from it writes)."""
    return {f"{name}/{p}" for name in ("inbox", "outbox", "var", "adapters") for p in _tree(REPO / name)}


def test_the_installed_package_runs_with_its_bundled_folders(installed: Path, tmp_path: Path) -> None:
    code = ("import daemon, daemon.resources as r; print(daemon.__file__); print(r.checkout_root()); "
            "print(*(r.bundled(n) for n in r.BUNDLED), sep='\\n')")
    out = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path, installed), cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    module, checkout, *folders = out.stdout.splitlines()
    assert Path(module).is_relative_to(installed), f"imported {module}, not the installed package"
    assert checkout == "None"
    for name, folder in zip(BUNDLED, folders):
        assert Path(folder) == installed / "daemon" / "bundled" / name
        tracked = {p.relative_to(REPO / name) for p in (REPO / name).rglob("*")
                   if p.is_file() and "references" not in p.parts and not p.name.startswith(".")}
        shipped = {p.relative_to(folder) for p in Path(folder).rglob("*") if p.is_file()}
        assert tracked <= shipped, f"{name}/ lacks {sorted(map(str, tracked - shipped))} in the wheel"
    assert (installed / "daemon" / "pipeline" / "report_schema.json").is_file()
    assert not list(installed.rglob(USER_REFERENCE.name)), "the wheel carries a user's reference photo"

    version = _mondrian(installed, tmp_path, "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"mondrian {daemon.__version__}", version


def test_installed_init_creates_a_home_that_status_accepts(installed: Path, tmp_path: Path) -> None:
    missing = _mondrian(installed, tmp_path, "status")  # the default home does not exist yet
    assert missing.returncode == 78, missing
    assert "mondrian init" in missing.stderr and str(tmp_path / "data" / "mondrian") in missing.stderr

    home = tmp_path / "My Photos" / "mondrian home"
    made = _mondrian(installed, tmp_path, "init", str(home))
    assert made.returncode == 0, made.stderr
    assert (home / "inbox").is_dir() and (home / "outbox").is_dir() and (home / "mondrian.toml").is_file()
    assert "--home '" + str(home) + "' demo" in made.stdout, made.stdout  # the next step, quoted for the shell
    looked = _mondrian(installed, tmp_path, "--home", str(home), "status", "--json")
    assert looked.returncode == 0, looked.stderr

    settings = (home / "mondrian.toml").read_text()
    again = _mondrian(installed, tmp_path, "init", str(home))  # a second init keeps the user's settings
    assert again.returncode == 0 and (home / "mondrian.toml").read_text() == settings, again

    import sqlite3

    with sqlite3.connect(home / "var" / "ledger.db") as db:  # a newer Mondrian on another Mac wrote it
        db.execute("UPDATE schema_version SET version = 99")
    newer = _mondrian(installed, tmp_path, "--home", str(home), "status")
    assert newer.returncode == 78 and "newer Mondrian" in newer.stderr, newer.stderr
    assert "pipx upgrade mondrian" in newer.stderr and "git pull" not in newer.stderr  # no checkout to pull in


def test_installed_demo_writes_into_the_user_folder(installed: Path, tmp_path: Path) -> None:
    site_before = _tree(installed)
    checkout_before = _checkout_home()
    out = _mondrian(installed, tmp_path, "demo", timeout=DEMO_TIMEOUT)
    assert out.returncode == 0, out.stderr[-3000:]
    home = tmp_path / "data" / "mondrian"  # $XDG_DATA_HOME/mondrian: platformdirs' user data folder on Linux
    reports = sorted(home.glob("outbox/*/report.html"))
    assert reports, f"no report in {home / 'outbox'}"
    assert (home / "outbox" / "index.html").is_file() and str(home / "outbox" / "index.html") in out.stdout
    assert list((home / "var" / "models").glob("*/model.safetensors")), "the smoke model belongs in the home"
    assert _tree(installed) == site_before, "the demo wrote into the installed package"
    assert _checkout_home() == checkout_before, "the installed demo wrote into the checkout"


def test_a_checkout_is_its_own_default_home() -> None:
    assert default_home({}) == REPO.resolve()


def test_the_settings_template_shows_every_default(tmp_path: Path) -> None:
    """Every line of `mondrian init`'s mondrian.toml, uncommented, must load and change nothing."""
    from jobs.train import TrainSettings

    template = settings_template()
    names = [f.name for f in fields(Config) if f.name not in ("home", "extra", "env_set")]
    training = [f.name for f in fields(TrainSettings)]
    assert re.findall(r"^# (\w+) = ", template, flags=re.M) == names + training
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "mondrian.toml").write_text(re.sub(r"^# (\w+ = |\[lora\])", r"\1", template, flags=re.M))
    (tmp_path / "plain").mkdir()
    written, plain = load_config(tmp_path / "set", env={}), load_config(tmp_path / "plain", env={})
    for name in names:
        mine, default = getattr(written, name), getattr(plain, name)
        if isinstance(default, Path):
            mine, default = mine.relative_to(written.home), default.relative_to(plain.home)
        assert mine == default, name
    assert sorted(written.extra["lora"]) == sorted(training)
    assert TrainSettings.from_config(written) == TrainSettings.from_config(plain)
    # As written, the [lora] header is commented out too: a setting appended to the file is a top-level one.
    (tmp_path / "appended").mkdir()
    (tmp_path / "appended" / "mondrian.toml").write_text(template + 'max_tokens = 900\n')
    assert load_config(tmp_path / "appended", env={}).max_tokens == 900
