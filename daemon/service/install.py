"""`mondrian service ...`: run the daemon as a login service.

macOS: a launchd agent (~/Library/LaunchAgents/<label>.plist) driven with the modern launchctl verbs
(bootstrap / bootout / kickstart / kill / print). Linux: a systemd user unit
(~/.config/systemd/user/mondrian.service) driven with `systemctl --user`. Both run the daemon in the
foreground as `<venv python> -m daemon run`, restart it after a crash but not after a clean stop, and
give it ExitTimeOut seconds after SIGTERM to finish or requeue the current photo.

Files are rendered from the templates in launchd/; `--dry-run` prints them and the commands instead
of writing or running anything.
"""

from __future__ import annotations

import argparse
import os
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TextIO

import jinja2

import platformdirs

from daemon.config import (ENV_SETTINGS, PROJECT_ROOT, Config, ConfigError, default_home, load_config,
                            refuse_file_as_home)
from daemon.errors import EX_CONFIG, EX_UNAVAILABLE
from daemon.fsutil import lock_holder
from daemon.resources import service_templates_dir
from daemon.hints import PROGRAM_ENV, mondrian, program, serve, shell_word

DEFAULT_LABEL = "com.mondrian.daemon"
ACTIONS = ("install", "uninstall", "start", "stop", "restart", "status")
PLATFORMS = ("macos", "linux")
PROCESS_TYPES = ("Interactive", "Standard")
TEMPLATE_DIR = service_templates_dir()
PLIST_TEMPLATE = "com.mondrian.daemon.plist.j2"
UNIT_TEMPLATE = "mondrian.service.j2"

THROTTLE_INTERVAL = 30  # s between (re)starts: launchd ThrottleInterval, systemd RestartSec
EXIT_TIMEOUT = 60  # s from SIGTERM to SIGKILL; the CPU prefill of a real model can take ~20 s
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 3

NOT_RUNNING = 3  # status: installed but not running, or not installed (LSB convention)
# The service's working directory: one that always exists. The home may be on a drive that is not connected at
# login; as the working directory, launchd and systemd (status 200/CHDIR) would then fail to start the process at
# all, and the daemon could never say why. It gets its home from MONDRIAN_HOME, and resolves every path against it.
SERVICE_CWD = Path("/")

_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*(\.[A-Za-z0-9][A-Za-z0-9-]*)+$")


class ServiceError(Exception):
    """Something the user must fix; the message says what."""


# ---------------------------------------------------------------------------------------------
# What the service runs


@dataclass(frozen=True)
class ServiceSpec:
    """Everything the plist and the unit say, resolved to absolute paths."""

    platform: str
    label: str
    python: Path
    home: Path
    model: str
    user_home: Path
    environment: dict[str, str] = field(default_factory=dict)
    process_type: str = "Interactive"
    throttle_interval: int = THROTTLE_INTERVAL
    exit_timeout: int = EXIT_TIMEOUT
    # The home's configuration as read at install time: None when it could not be read (stop, uninstall and
    # status still act then: they need only the label and the installed file).
    config: Config | None = field(default=None, compare=False, repr=False)
    model_from_shell: bool = False  # pinned by MONDRIAN_MODEL in the installing shell, not by --model

    @property
    def model_line(self) -> str:
        """Where the installed service's model comes from, and how to change it: a pin from the shell is easy to
        miss, and then editing mondrian.toml seems to do nothing."""
        if "MONDRIAN_MODEL" not in self.environment:
            return (f"Model: {self.model}, read from mondrian.toml at each start (edit `model` there, then "
                    f"`{mondrian()} service restart`).")
        if self.model_from_shell:
            return (f"Model: {self.model}, pinned by MONDRIAN_MODEL, set in this shell: editing mondrian.toml will "
                    f"not change it. To follow mondrian.toml, `unset MONDRIAN_MODEL` and install again.")
        return f"Model: {self.model}, pinned by --model: to change it, install again."

    @property
    def settings_line(self) -> str | None:
        """The settings this shell's environment gives the service, which editing mondrian.toml will not change."""
        given = [f"{var} ({ENV_SETTINGS[var]})" for var in ENV_SETTINGS
                 if var != "MONDRIAN_MODEL" and var in self.environment]
        if not given:
            return None
        return (f"Settings from this shell, written into the service: {', '.join(given)}; they win over "
                f"mondrian.toml. To follow mondrian.toml, `unset` them and install again.")

    @property
    def program_arguments(self) -> list[str]:
        return [str(self.python), "-m", "daemon", "run"]

    @property
    def working_directory(self) -> Path:
        return SERVICE_CWD

    @property
    def log_dir(self) -> Path:
        return self.user_home / "Library" / "Logs" / "Mondrian"

    @property
    def _log_stem(self) -> str:
        # A second agent (tests, a second home) must not share the default agent's files.
        return "mondrian" if self.label == DEFAULT_LABEL else self.label

    @property
    def stdout_path(self) -> Path:
        return self.log_dir / f"{self._log_stem}.out.log"

    @property
    def stderr_path(self) -> Path:
        return self.log_dir / f"{self._log_stem}.err.log"

    @property
    def plist_path(self) -> Path:
        return self.user_home / "Library" / "LaunchAgents" / f"{self.label}.plist"

    @property
    def unit_name(self) -> str:
        return ("mondrian" if self.label == DEFAULT_LABEL else self.label) + ".service"

    @property
    def unit_path(self) -> Path:
        config_home = os.environ.get("XDG_CONFIG_HOME") or str(self.user_home / ".config")
        return Path(config_home) / "systemd" / "user" / self.unit_name

    def plist_dict(self) -> dict[str, Any]:
        """The agent as launchd will read it; the rendered template must parse back to exactly this."""
        return {
            "Label": self.label,
            "ProgramArguments": self.program_arguments,
            "WorkingDirectory": str(self.working_directory),
            "RunAtLoad": True,
            "KeepAlive": {"SuccessfulExit": False},
            "ThrottleInterval": self.throttle_interval,
            "ProcessType": self.process_type,
            "ExitTimeOut": self.exit_timeout,
            "EnvironmentVariables": dict(self.environment),
            "StandardOutPath": str(self.stdout_path),
            "StandardErrorPath": str(self.stderr_path),
        }


def detect_platform() -> str:
    if sys.platform == "darwin":
        return "macos"
    if sys.platform.startswith("linux"):
        return "linux"
    raise ServiceError(f"no service manager support for {sys.platform}; "
                       "Mondrian runs as a launchd agent on macOS or a systemd user unit on Linux")


def _is_local_model(model: str, home: Path) -> bool:
    path = Path(model).expanduser()
    return model == "smoke" or (path if path.is_absolute() else home / path).is_dir()


def _home_model(model: str, home: Path) -> str:
    """A pinned model folder named relative to the home (as mondrian.toml names one), as an absolute path: the
    service does not run in the home, and the daemon would look for a relative one in SERVICE_CWD."""
    path = Path(model).expanduser()
    if model == "smoke" or path.is_absolute() or not (home / path).exists():
        return model
    return str((home / path).resolve())


HUB_CACHE_VARS = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")


def build_spec(platform: str | None = None, label: str = DEFAULT_LABEL, home: str | Path | None = None,
               model: str | None = None, python: str | Path | None = None,
               user_home: str | Path | None = None, process_type: str = "Interactive",
               env: Mapping[str, str] = os.environ) -> ServiceSpec:
    """Resolve the service from the Mondrian config, failing (ConfigError/ServiceError) on anything
    that would make the installed service crash-loop. The daemon's own start-up checks (advisor, [lora],
    model folder) need the service's environment: `startup_problem` runs them before an install."""
    platform = platform or detect_platform()
    if platform not in PLATFORMS:
        raise ServiceError(f"unknown platform {platform!r}; use one of {', '.join(PLATFORMS)}")
    if not _LABEL_RE.match(label):
        raise ServiceError(f"label {label!r} is not reverse-DNS (like {DEFAULT_LABEL})")
    if process_type not in PROCESS_TYPES:
        raise ServiceError(f"ProcessType {process_type!r}: use one of {', '.join(PROCESS_TYPES)}")
    # The venv's python itself, NOT its resolved target: resolving the symlink would lose the venv.
    py = Path(python or sys.executable).expanduser().absolute()
    if not (py.is_file() and os.access(py, os.X_OK)):
        raise ServiceError(f"python {py} is not an executable file")

    # Pinned only when asked for (--model, or MONDRIAN_MODEL in this shell): otherwise the daemon reads `model`
    # from mondrian.toml at each start, so editing it and `service restart` switches models as the README says.
    from_shell = not model and bool(env.get("MONDRIAN_MODEL"))
    pinned = model or env.get("MONDRIAN_MODEL") or None
    if pinned and pinned != "smoke" and Path(pinned).expanduser().exists():
        pinned = str(Path(pinned).expanduser().resolve())  # the service runs in another directory
    # The other settings this shell gives (`export MONDRIAN_LEDGER_URL=…`, ANALYSIS_MODE): `run` from here follows
    # them, so the service must too; left behind, a studio Mac's service kept a private ledger beside the shared one.
    from_env = {var: env[var] for var in ENV_SETTINGS if var != "MONDRIAN_MODEL" and env.get(var)}
    # Check the config with the environment the service will have, not this shell's.
    cfg = load_config(home or env.get("MONDRIAN_HOME") or None, env=from_env, model=pinned)
    if pinned:
        pinned = _home_model(pinned, cfg.home)
        cfg = replace(cfg, model=pinned)
    model = cfg.model

    bin_dirs = [str(py.parent)]
    bin_dirs += ["/opt/homebrew/bin", "/usr/local/bin"] if platform == "macos" else ["/usr/local/bin"]
    environment = {
        "MONDRIAN_HOME": str(cfg.home),
        **({"MONDRIAN_MODEL": model} if pinned else {}),
        **from_env,
        # Where this shell keeps its Hugging Face models: without it the service looked in the default cache, did
        # not find a model the shell runs, and downloaded it again (or failed at every start offline).
        **{var: env[var] for var in HUB_CACHE_VARS if env.get(var)},
        # Hints in the service's log and failure pages name the command that installed it (`.venv/bin/mondrian`
        # in a checkout), not a bare `mondrian` that a shell may not find.
        PROGRAM_ENV: program(),
        # Launchers start with a bare PATH; the venv first so helper tools resolve to this install.
        "PATH": ":".join(bin_dirs + ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]),
        # `-m daemon` must find this checkout even when it is not pip-installed into the venv:
        # the working directory is SERVICE_CWD, not the checkout.
        "PYTHONPATH": str(PROJECT_ROOT),
        # stdout to a file is block-buffered; logs should appear as they happen.
        "PYTHONUNBUFFERED": "1",
    }
    if pinned and _is_local_model(model, cfg.home):
        # A local model needs no network: make sure a login-time start never waits on the hub.
        # A hub id may still need its first download, so it is left online; so is a model read from
        # mondrian.toml, which may be changed to a hub id later without reinstalling.
        environment["HF_HUB_OFFLINE"] = "1"
    if platform == "macos":
        # launchd never rotates StandardOutPath/StandardErrorPath: the daemon does (daemon/service/logrotate.py).
        environment.update({"MONDRIAN_LOG_ROTATE": "1", "MONDRIAN_LOG_MAX_BYTES": str(LOG_MAX_BYTES),
                            "MONDRIAN_LOG_BACKUPS": str(LOG_BACKUPS)})
    uh = Path(user_home).expanduser().absolute() if user_home else Path.home()
    return ServiceSpec(platform=platform, label=label, python=py, home=cfg.home, model=model,
                       user_home=uh, environment=environment, process_type=process_type, config=cfg,
                       model_from_shell=from_shell)


def bare_spec(platform: str | None = None, label: str = DEFAULT_LABEL, home: str | Path | None = None,
              python: str | Path | None = None, user_home: str | Path | None = None,
              process_type: str = "Interactive", env: Mapping[str, str] = os.environ) -> ServiceSpec:
    """The service as far as it is known without reading mondrian.toml: its label, files and home. Enough to stop,
    uninstall or inspect a service whose configuration is broken (a restart-looping one most needs stopping)."""
    platform = platform or detect_platform()
    if platform not in PLATFORMS:
        raise ServiceError(f"unknown platform {platform!r}; use one of {', '.join(PLATFORMS)}")
    if not _LABEL_RE.match(label):
        raise ServiceError(f"label {label!r} is not reverse-DNS (like {DEFAULT_LABEL})")
    py = Path(python or sys.executable).expanduser().absolute()
    h = Path(home).expanduser().resolve() if home else default_home(env)  # as load_config resolves it
    uh = Path(user_home).expanduser().absolute() if user_home else Path.home()
    return ServiceSpec(platform=platform, label=label, python=py, home=h, model="", user_home=uh,
                       environment={"MONDRIAN_HOME": str(h), "PYTHONPATH": str(PROJECT_ROOT)},
                       process_type=process_type if process_type in PROCESS_TYPES else "Interactive")


# What `python -m daemon run` checks before it serves a photo, run by the service's own python in the service's own
# environment: config_from (mondrian.toml, the environment, the default advisor), the [lora] settings that
# run_daemon reads first, and a model given as a folder. A hub id is left out: its first start may download it.
_STARTUP_CHECK = """
import argparse, sys
from pathlib import Path
from daemon.config import ConfigError
from daemon.cli.common import config_from
from jobs.nightly import nightly_enabled
try:
    cfg = config_from(argparse.Namespace(home=None, model=None))  # what `run` reads: MONDRIAN_HOME, MONDRIAN_MODEL
    nightly_enabled(cfg)
    spec = cfg.model.strip()
    local = Path(spec).expanduser()
    local = local if local.is_absolute() else cfg.home / local  # a relative folder is the home's (build_spec)
    from daemon.model.runtime import ModelNotFoundError, _looks_like_path, resolve_model_path
    if spec != "smoke" and (local.exists() or _looks_like_path(spec)):
        try:
            resolve_model_path(str(local), cfg.var_dir)
        except ModelNotFoundError as exc:
            raise ConfigError(f"model {spec!r}: {exc}") from None
except ConfigError as exc:
    print(exc)  # on stdout: stderr may also carry log records
    sys.exit(78)
"""


def startup_problem(spec: ServiceSpec) -> str | None:
    """Why the daemon, started as this service, would exit 78 at once (and again every ThrottleInterval), or None."""
    with tempfile.TemporaryDirectory(prefix="mondrian-check-") as state:
        # XDG_STATE_HOME: importing the model runtime may note a missing OpenBLAS in the user's state folder;
        # a check (and a --dry-run) writes nothing of the user's.
        env = {"HOME": str(spec.user_home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "XDG_STATE_HOME": state, **spec.environment}
        try:
            proc = subprocess.run([str(spec.python), "-c", _STARTUP_CHECK], capture_output=True, text=True,
                                  timeout=120, env=env, cwd=str(spec.working_directory))
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"could not check the configuration with {spec.python}: {exc}"
    if proc.returncode == 0:
        return None
    if proc.returncode == 78 and proc.stdout.strip():
        return proc.stdout.strip()
    lines = proc.stderr.strip().splitlines()
    return f"{spec.python} could not check the configuration (exit {proc.returncode}): " + "\n".join(lines[-5:])


# ---------------------------------------------------------------------------------------------
# Rendering


def _reject_control_chars(spec: ServiceSpec) -> None:
    # Neither XML 1.0 nor a unit file line can carry control characters; fail with a clear message.
    for value in [*spec.program_arguments, str(spec.home), *spec.environment.values(), str(spec.user_home)]:
        if any(ord(c) < 32 for c in value):
            raise ServiceError(f"path or value {value!r} contains a control character; rename it")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a name from another system's encoding (Linux allows it): no text can carry it
            raise ServiceError(f"the path {shell_word(Path(value))} is not valid UTF-8 (it came from a system with "
                               f"another encoding), and a service file cannot name it: rename it (`mv`) to a UTF-8 "
                               f"name, then install again") from None


def render_plist(spec: ServiceSpec) -> str:
    """Render launchd/com.mondrian.daemon.plist.j2 and prove it parses back to `spec.plist_dict()`."""
    _reject_control_chars(spec)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    text = env.get_template(PLIST_TEMPLATE).render(
        label=spec.label, program_arguments=spec.program_arguments,
        working_directory=str(spec.working_directory),
        throttle_interval=spec.throttle_interval, process_type=spec.process_type,
        exit_timeout=spec.exit_timeout, environment=spec.environment,
        stdout_path=str(spec.stdout_path), stderr_path=str(spec.stderr_path))
    try:
        parsed = plistlib.loads(text.encode("utf-8"))
    except Exception as exc:  # expat errors, bad values: never write such a file
        raise ServiceError(f"rendered plist does not parse: {exc}") from exc
    expected = spec.plist_dict()
    if parsed != expected:
        diff = sorted(k for k in expected.keys() | parsed.keys() if parsed.get(k) != expected.get(k))
        raise ServiceError(f"rendered plist differs from the intended one in {', '.join(diff)}")
    return text


def systemd_quote(value: str, exec_line: bool = False) -> str:
    """One double-quoted word for a unit file: C escapes and `%` specifiers everywhere; `$` only
    in ExecStart= arguments, the one place systemd expands $VARIABLES."""
    quoted = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return '"' + (quoted.replace("$", "$$") if exec_line else quoted) + '"'


def _exec_start(argv: Sequence[str]) -> str:
    # systemd takes the executable path literally ($ is not expanded there) and refuses one that
    # contains quotes or backslashes ("Executable name contains special characters").
    if any(c in argv[0] for c in "\"'\\"):
        raise ServiceError(f"systemd cannot run {argv[0]!r}: its path contains a quote or backslash; "
                           "recreate the virtualenv in a folder without them")
    return " ".join([systemd_quote(argv[0])] + [systemd_quote(a, exec_line=True) for a in argv[1:]])


def render_unit(spec: ServiceSpec) -> str:
    """Render launchd/mondrian.service.j2 (a systemd user unit)."""
    _reject_control_chars(spec)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=False,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["systemd_quote"] = systemd_quote
    return env.get_template(UNIT_TEMPLATE).render(
        label=spec.label, unit_name=spec.unit_name,
        exec_start=_exec_start(spec.program_arguments),
        # WorkingDirectory= takes the raw rest of the line: only specifiers need escaping.
        working_directory=str(spec.working_directory).replace("%", "%%"),
        environment=spec.environment, throttle_interval=spec.throttle_interval,
        exit_timeout=spec.exit_timeout)


def render(spec: ServiceSpec) -> tuple[Path, str]:
    """(where the service file goes, its text) for the spec's platform."""
    if spec.platform == "macos":
        return spec.plist_path, render_plist(spec)
    return spec.unit_path, render_unit(spec)


# ---------------------------------------------------------------------------------------------
# Doing things (or, with --dry-run, saying what would be done)


class Shell:
    """Runs commands and writes files, echoing each; in dry-run mode only prints them."""

    def __init__(self, dry_run: bool, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.dry_run = dry_run
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def say(self, msg: str) -> None:
        print(msg, file=self.out, flush=True)

    def warn(self, msg: str) -> None:
        print(msg, file=self.err, flush=True)

    def run(self, argv: Sequence[str], note: str = "", quiet_fail: bool = False,
            timeout: float = 120) -> int:
        line = shlex.join(argv) + (f"    # {note}" if note else "")
        if self.dry_run:
            self.say(line)
            return 0
        self.say(f"$ {line}")
        try:
            proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            self.warn(f"{argv[0]}: command not found")
            return 127
        except subprocess.TimeoutExpired:
            self.warn(f"{argv[0]} did not answer within {timeout:.0f} s")
            return 124
        if proc.stdout.strip():
            self.say(proc.stdout.rstrip())
        if proc.stderr.strip() and not (quiet_fail and proc.returncode):
            self.warn(proc.stderr.rstrip())
        return proc.returncode

    def mkdir(self, path: Path) -> None:
        if self.dry_run:
            if not path.is_dir():
                self.say(f"mkdir -p {shlex.quote(str(path))}")
            return
        path.mkdir(parents=True, exist_ok=True)

    def write(self, path: Path, text: str) -> None:
        if self.dry_run:
            self.say(f"# would write {path}:")
            self.say(text.rstrip("\n"))
            self.say(f"# end of {path.name}")
            return
        # Write-then-rename: the service manager never reads half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            # launchd refuses agents writable by group/others; a shared ledger's URL may hold its password
            os.chmod(tmp, 0o600 if "MONDRIAN_LEDGER_URL" in text else 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.say(f"wrote {path}")

    def remove(self, path: Path) -> None:
        if self.dry_run:
            self.say(f"rm -f {shlex.quote(str(path))}")
            return
        if path.exists():
            path.unlink()
            self.say(f"removed {path}")


def _query(argv: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a read-only command quietly (state checks; also fine during --dry-run)."""
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(list(argv), 127, "", str(exc))


def _wait(predicate: Callable[[], bool], timeout: float, step: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def mondrian_status(spec: ServiceSpec, sh: Shell) -> None:
    """Mondrian's own view (queue, photo in progress, failures) for the service's home."""
    env = {**os.environ, **spec.environment}
    try:
        proc = subprocess.run([str(spec.python), "-m", "daemon", "status"], capture_output=True,
                              text=True, timeout=60, env=env, cwd=str(spec.home))
    except (OSError, subprocess.TimeoutExpired) as exc:
        sh.say(f"(mondrian status unavailable: {exc})")
        return
    if proc.returncode == 0:
        sh.say(proc.stdout.rstrip())
    else:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        sh.say(f"(mondrian status unavailable: {last})")


# --- macOS: launchd -----------------------------------------------------------------------------


class Launchd:
    def __init__(self, spec: ServiceSpec, sh: Shell) -> None:
        self.spec, self.sh = spec, sh
        self.domain = f"gui/{os.getuid()}"
        self.target = f"{self.domain}/{spec.label}"

    def usable(self) -> str | None:
        """None when launchctl can be used, else why not."""
        if not shutil.which("launchctl"):
            return "launchctl is not available (launchd agents exist only on macOS; try --platform linux)"
        if sys.platform == "darwin" and os.getuid() == 0:
            # sudo would target root's gui domain, which has no login session to run in.
            return "a launchd agent belongs to your login session: run this without sudo"
        return None

    def info(self) -> dict[str, str] | None:
        """Parsed `launchctl print` of the agent, or None when it is not loaded."""
        proc = _query(["launchctl", "print", self.target])
        if proc.returncode != 0:
            return None
        info: dict[str, str] = {}
        for key in ("state", "pid", "last exit code"):
            m = re.search(rf"^\s*{key} = (.+)$", proc.stdout, re.MULTILINE)
            if m:
                info[key] = m.group(1).strip()
        return info

    def running(self) -> bool:
        info = self.info()
        return bool(info and info.get("state") == "running")

    def main_pid(self) -> int | None:
        """The pid launchd runs the agent as, or None when it runs nothing now."""
        pid = (self.info() or {}).get("pid", "")
        return int(pid) if pid.isdigit() and int(pid) > 0 else None

    def _bootout(self) -> None:
        if self.sh.dry_run:
            self.sh.run(["launchctl", "bootout", self.target], note="only if an agent is loaded")
            return
        if self.info() is None:
            return
        self.sh.run(["launchctl", "bootout", self.target], timeout=self.spec.exit_timeout + 30)
        # bootout returns before launchd forgets the job; bootstrapping too early fails with EIO.
        if not _wait(lambda: self.info() is None, self.spec.exit_timeout + 10):
            raise ServiceError(f"{self.spec.label} is still loaded after bootout; try again in a minute")

    def _bootstrap(self) -> int:
        # A previously `launchctl disable`d label refuses to bootstrap: clear that first.
        self.sh.run(["launchctl", "enable", self.target])
        rc = 0
        for attempt in range(3):
            rc = self.sh.run(["launchctl", "bootstrap", self.domain, str(self.spec.plist_path)])
            if rc == 0 or self.sh.dry_run:
                return 0
            time.sleep(2 * (attempt + 1))  # launchd may still be tearing the old job down
        self.sh.warn(f"launchctl bootstrap failed ({rc}); see `launchctl print {self.target}` and "
                     f"{self.spec.stderr_path}")
        return rc or 1

    def install(self, text: str) -> int:
        sh, spec = self.sh, self.spec
        sh.mkdir(spec.home)  # where _refuse_unmounted_home allows it: the home is there once installed
        sh.mkdir(spec.plist_path.parent)
        sh.mkdir(spec.log_dir)
        sh.write(spec.plist_path, text)  # written first: if this fails the old agent keeps running
        self._bootout()  # installing again, or upgrading, replaces the loaded agent
        rc = self._bootstrap()
        if rc == 0 and not sh.dry_run:
            sh.say(f"Mondrian is installed as {spec.label}; it starts now and at every login.")
            sh.say(f"Logs: {spec.stdout_path} and {spec.stderr_path}")
        if rc == 0:  # a dry run too: where the model and settings come from is what one checks before installing
            sh.say(spec.model_line)
            if spec.settings_line:
                sh.say(spec.settings_line)
        return rc

    def uninstall(self) -> int:
        self._bootout()
        self.sh.remove(self.spec.plist_path)
        if not self.sh.dry_run:
            self.sh.say(f"Mondrian's agent is removed; logs stay in {self.spec.log_dir}")
        return 0

    def start(self) -> int:
        if not self.sh.dry_run and not self.spec.plist_path.exists():
            self.sh.warn(f"{self.spec.label} is not installed; run `{mondrian()} service install` first")
            return 1
        if self.sh.dry_run or self.info() is None:
            if self.sh.dry_run:
                self.sh.say("# if the agent is not loaded:")
            rc = self._bootstrap()  # RunAtLoad starts it
            if self.sh.dry_run:
                self.sh.say("# if it is loaded:")
            else:
                return rc
        return self.sh.run(["launchctl", "kickstart", self.target])

    def stop(self) -> int:
        if not self.sh.dry_run and not self.running():
            code = (self.info() or {}).get("last exit code", "0")
            if code.strip() not in ("0", "(never exited)"):
                # Between two tries of an agent that cannot start (a typo in mondrian.toml: exit 78): KeepAlive
                # starts it again within ThrottleInterval, so "not running" would not stop it. Unloaded instead,
                # until the next login or `service start`.
                self._bootout()
                self.sh.say(f"{self.spec.label} was not running, but launchd was starting it again every "
                            f"{self.spec.throttle_interval} s (it last exited with {code}): stopped until your next "
                            f"login or `{mondrian()} service start`")
                return 0
            self.sh.say(f"{self.spec.label} is not running")
            return 0
        # SIGTERM -> the daemon requeues its photo and exits 0 -> KeepAlive leaves it stopped
        # (until the next login or `mondrian service start`). Same as `launchctl stop <label>`.
        rc = self.sh.run(["launchctl", "kill", "SIGTERM", self.target])
        if rc == 0 and not self.sh.dry_run:
            if not _wait(lambda: not self.running(), self.spec.exit_timeout + 5):
                self.sh.warn(f"{self.spec.label} is still running after {self.spec.exit_timeout} s")
                return 1
            self.sh.say(f"{self.spec.label} stopped")
        return rc

    def restart(self) -> int:
        if not self.sh.dry_run and self.info() is None:
            return self.start()
        return self.sh.run(["launchctl", "kickstart", "-k", self.target], timeout=self.spec.exit_timeout + 30)

    def status(self) -> int:
        if self.sh.dry_run:
            self.sh.run(["launchctl", "print", self.target])
            return 0
        info = self.info()
        installed = self.spec.plist_path.exists()
        if info is None:
            self.sh.say(f"{self.spec.label}: {'installed but not loaded' if installed else 'not installed'}")
        else:
            state = info.get("state", "unknown")
            pid = f" (pid {info['pid']})" if "pid" in info else ""
            self.sh.say(f"{self.spec.label}: loaded, {state}{pid}; "
                        f"last exit code {info.get('last exit code', 'unknown')}")
        self.sh.say(f"agent: {self.spec.plist_path}")
        self.sh.say(f"logs:  {self.spec.stdout_path}\n       {self.spec.stderr_path}")
        mondrian_status(self.spec, self.sh)
        return 0 if info and info.get("state") == "running" else NOT_RUNNING


# --- Linux: systemd --user ------------------------------------------------------------------------


class Systemd:
    def __init__(self, spec: ServiceSpec, sh: Shell) -> None:
        self.spec, self.sh = spec, sh
        self.unit = spec.unit_name

    def usable(self) -> str | None:
        if not shutil.which("systemctl"):
            return "systemctl is not available (no systemd on this machine)"
        proc = _query(["systemctl", "--user", "show-environment"], timeout=15)
        if proc.returncode != 0:
            why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            return (f"systemctl --user cannot reach your user service manager ({why}). It needs a "
                    "systemd user session: log in normally (desktop or SSH); on a server run "
                    "`loginctl enable-linger $USER` once, then log in again")
        return None

    def _sc(self, *args: str, **kw: Any) -> int:
        return self.sh.run(["systemctl", "--user", *args], **kw)

    def install(self, text: str) -> int:
        sh, spec = self.sh, self.spec
        sh.mkdir(spec.home)  # where _refuse_unmounted_home allows it: the home is there once installed
        sh.mkdir(spec.unit_path.parent)
        sh.write(spec.unit_path, text)
        rc = self._sc("daemon-reload") or self._sc("enable", self.unit)
        # restart, not `enable --now`: --now leaves an already running (older) daemon untouched.
        rc = rc or self._sc("restart", self.unit, timeout=spec.exit_timeout + 30)
        if rc == 0 and not sh.dry_run:
            sh.say(f"Mondrian is installed as {self.unit}; it starts now and at every login.")
            sh.say(f"Logs: journalctl --user -u {self.unit} -f")
        if rc == 0:  # a dry run too (as for launchd)
            sh.say(spec.model_line)
            if spec.settings_line:
                sh.say(spec.settings_line)
        if rc == 0 and not sh.dry_run:
            sh.say("To keep it running while you are logged out (a server): loginctl enable-linger $USER")
        return rc

    def uninstall(self) -> int:
        self._sc("disable", "--now", self.unit, quiet_fail=True, timeout=self.spec.exit_timeout + 30)
        self.sh.remove(self.spec.unit_path)
        self._sc("daemon-reload")
        self._sc("reset-failed", self.unit, quiet_fail=True)
        return 0

    def main_pid(self) -> int | None:
        """The pid systemd runs the unit as, or None when it runs nothing now."""
        pid = _query(["systemctl", "--user", "show", "-p", "MainPID", "--value", self.unit], timeout=15).stdout.strip()
        return int(pid) if pid.isdigit() and int(pid) > 0 else None

    def _need_unit(self) -> bool:
        if self.sh.dry_run or self.spec.unit_path.exists():
            return True
        self.sh.warn(f"{self.unit} is not installed; run `{mondrian()} service install` first")
        return False

    def start(self) -> int:
        return self._sc("start", self.unit) if self._need_unit() else 1

    def stop(self) -> int:
        return self._sc("stop", self.unit, timeout=self.spec.exit_timeout + 30)

    def restart(self) -> int:
        return self._sc("restart", self.unit, timeout=self.spec.exit_timeout + 30) if self._need_unit() else 1

    def status(self) -> int:
        self._sc("status", self.unit, "--no-pager", "--lines=10", quiet_fail=True)
        if self.sh.dry_run:
            return 0
        mondrian_status(self.spec, self.sh)
        active = _query(["systemctl", "--user", "is-active", "--quiet", self.unit]).returncode == 0
        return 0 if active else NOT_RUNNING


def _refuse_unmounted_home(spec: ServiceSpec) -> None:
    """Install makes the home: with the rule the rest of Mondrian makes folders by, never where a drive or share
    that is not connected should be mounted."""
    if spec.config is None:
        return
    refuse_file_as_home(spec.home)
    # The same folders ensure_dirs allows a new home's missing parents in.
    spec.config._refuse_unmounted(spec.home, within=(Path.home(), Path(platformdirs.user_data_dir())))


def _refuse_a_daemon_run_by_hand(spec: ServiceSpec, manager: "Launchd | Systemd", served: Config | None) -> None:
    """A daemon already serving the home the service serves (`served`) that is not the service's own (`mondrian run`
    in a terminal): the service would find the home taken and exit 78 every ThrottleInterval, silently, for as long
    as that one runs."""
    if served is None:
        return
    holder = lock_holder(served.var_dir / "daemon.lock")
    if holder is None or (holder > 0 and holder == manager.main_pid()):
        return
    if holder <= 0 and manager.main_pid() is not None:
        return  # no pid to compare with: a running service is taken to be the holder
    who = f"pid {holder}" if holder > 0 else "a process"
    raise ServiceError(f"a Mondrian daemon ({who}) started by hand already serves {served.home}; the service would "
                      f"find the home taken and stop at once, every {spec.throttle_interval} s. Stop that one first "
                      f"(Ctrl-C where `mondrian run` runs{f', or `kill {holder}`' if holder > 0 else ''}), then run "
                      f"this again. Nothing was changed")


def installed_home(spec: ServiceSpec) -> Path | None:
    """The home the installed agent or unit of `spec.label` serves (its MONDRIAN_HOME), or None if none is
    installed or its file cannot be read."""
    try:
        if spec.platform == "macos":
            env = plistlib.loads(spec.plist_path.read_bytes()).get("EnvironmentVariables", {})
            value = env.get("MONDRIAN_HOME")
        else:
            value = None
            for line in spec.unit_path.read_text(encoding="utf-8").splitlines():
                if line.startswith("Environment="):
                    words = shlex.split(line[len("Environment="):])  # systemd_quote's C escapes, as a shell's
                    value = next((w.split("=", 1)[1].replace("%%", "%") for w in words
                                  if w.startswith("MONDRIAN_HOME=")), value)
    except (OSError, ValueError, plistlib.InvalidFileException):
        return None
    return Path(value) if isinstance(value, str) and value else None


# ---------------------------------------------------------------------------------------------
# Entry points


def service_action(action: str, *, platform: str | None = None, label: str = DEFAULT_LABEL,
                   dry_run: bool = False, home: str | Path | None = None, model: str | None = None,
                   process_type: str = "Interactive", user_home: str | Path | None = None,
                   out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Do `action` for the service; returns a process exit code. Used by the CLI and by tests."""
    sh = Shell(dry_run, out, err)
    if action not in ACTIONS:
        sh.warn(f"unknown action {action!r}; use one of {', '.join(ACTIONS)}")
        return 2
    try:
        config_problem = None
        # The shell's settings are the service's only at install: a stale ANALYSIS_MODE in the shell must not block
        # `service restart` of a service installed without it.
        env = os.environ if action == "install" else \
            {k: v for k, v in os.environ.items() if k not in ENV_SETTINGS or k == "MONDRIAN_MODEL"}
        try:
            spec = build_spec(platform=platform, label=label, home=home, model=model,
                              user_home=user_home, process_type=process_type, env=env)
        except ConfigError as exc:
            if action not in ("stop", "uninstall", "status"):
                raise
            # A broken mondrian.toml is when a restart-looping service most needs stopping or removing: these
            # need only the label and the installed file, so they go on and say what is broken.
            config_problem = str(exc)
            spec = bare_spec(platform=platform, label=label, home=home, user_home=user_home,
                             process_type=process_type)
            sh.warn(f"mondrian service {action}: note: configuration problem: {exc} (the service cannot "
                    f"start until it is fixed)")
        serve(spec.home)
        manager = Launchd(spec, sh) if spec.platform == "macos" else Systemd(spec, sh)
        if dry_run:
            where = "launchd agent" if spec.platform == "macos" else "systemd user unit"
            sh.say(f"# mondrian service {action} ({where} {spec.label}), dry run: nothing is written or run")
        else:
            why = manager.usable()
            if why:
                sh.warn(f"mondrian service {action}: {why}. Nothing was changed. "
                        f"`{mondrian()} service {action} --dry-run` shows the file and commands.")
                if action == "status":
                    # What can be told without the service manager: whether the service is installed at all.
                    path = spec.plist_path if spec.platform == "macos" else spec.unit_path
                    sh.say(f"{spec.label}: {'installed' if path.exists() else 'not installed'} ({path}); its "
                           f"state is unknown without {'launchctl' if spec.platform == 'macos' else 'systemctl'}")
                    mondrian_status(spec, sh)  # the daemon may still run by hand: show what it does
                return EX_UNAVAILABLE
        if action == "install" and not dry_run:
            _refuse_a_daemon_run_by_hand(spec, manager, spec.config)
        if action == "install":
            _refuse_unmounted_home(spec)
            # The daemon's own start-up checks, in the service's environment: a config it would refuse must not
            # be installed as a service that exits 78 every ThrottleInterval.
            problem = startup_problem(spec)
            if problem:
                raise ConfigError(f"{problem.rstrip('.')}. Nothing was installed: the service would stop at once and try "
                                  f"again every {spec.throttle_interval} s")
            _path, text = render(spec)
            return manager.install(text)
        other = installed_home(spec)
        # A home asked for (--home, or MONDRIAN_HOME, which `init` advises exporting) is this home's service; a plain
        # `service stop` is the installed service's, whichever home it serves.
        named = home is not None or bool(os.environ.get("MONDRIAN_HOME"))
        if named and action in ("start", "stop", "restart", "uninstall") and other and other != spec.home:
            # One label, one service: `--home B service start` would start (or stop, or remove) home A's daemon.
            fix = (f"Remove it with `{program()} --home {shell_word(other)} service uninstall`"
                   if action == "uninstall" else
                   f"Run this home in the foreground with `{mondrian()} run`, or make the service serve it with "
                   f"`{mondrian()} service install` (replacing the other)")
            sh.warn(f"mondrian service {action}: the installed service {spec.label} serves {other}, not "
                    f"{spec.home}; nothing was done. {fix}")
            return EX_CONFIG
        if action in ("start", "restart") and not dry_run:
            # The home the installed service serves (a plain `service restart` names none): its lock, not this one's.
            served = spec.config
            if other and other != spec.home:
                try:
                    served = load_config(other)
                except ConfigError:
                    served = None  # its own start says what is wrong with it
            _refuse_a_daemon_run_by_hand(spec, manager, served)
        if named and action == "status" and other and other != spec.home:
            # The unit state below is the other home's; the queue shown is this one's.
            sh.say(f"note: the installed service {spec.label} serves {other}, not {spec.home}: its state below "
                   f"is that home's daemon")
        return getattr(manager, action)()
    except ConfigError as exc:
        sh.warn(f"mondrian service {action}: configuration problem: {exc}")
        return EX_CONFIG
    except ServiceError as exc:
        sh.warn(f"mondrian service {action}: {exc}")
        return 1


def handle(args: argparse.Namespace) -> int:
    """argparse handler for `mondrian service ...`."""
    return service_action(args.service_action, platform=args.service_platform, label=args.service_label,
                          dry_run=args.service_dry_run,
                          home=args.service_home or getattr(args, "home", None),  # `mondrian --home X service ...`
                          model=args.service_model, process_type=args.service_process_type)


def add_service_parser(subparsers: Any) -> None:
    """Register `service {install,uninstall,start,stop,restart,status}` on a CLI's subparsers.

    Destinations are prefixed `service_` so they cannot clobber the main parser's options
    (argparse copies every subparser default over the parent namespace)."""
    p = subparsers.add_parser(
        "service", help="run Mondrian at login (launchd agent on macOS, systemd user unit on Linux)",
        description="Install, control and inspect Mondrian as a login service: a launchd agent on macOS, "
                    "a systemd user unit on Linux.")
    p.add_argument("service_action", metavar="action", choices=ACTIONS, help=" | ".join(ACTIONS))
    p.add_argument("--dry-run", dest="service_dry_run", action="store_true",
                   help="print the service file and the commands instead of writing or running anything")
    p.add_argument("--label", dest="service_label", default=DEFAULT_LABEL,
                   help=f"reverse-DNS service label (default {DEFAULT_LABEL})")
    p.add_argument("--platform", dest="service_platform", choices=PLATFORMS, default=None,
                   help="render for this platform instead of the one detected (for --dry-run)")
    p.add_argument("--home", dest="service_home", default=None,
                   help="Mondrian home the service uses (default: MONDRIAN_HOME, else the default home: the "
                        "checkout Mondrian runs from, or the user folder of an installed Mondrian)")
    p.add_argument("--model", dest="service_model", default=None,
                   help="pin the model the service loads (default: MONDRIAN_MODEL if set, else none: the daemon "
                        "reads `model` from mondrian.toml at each start, so `service restart` picks up an edit); "
                        "a pinned model is written into the service file, so reinstall to change it")
    p.add_argument("--process-type", dest="service_process_type", choices=PROCESS_TYPES,
                   default="Interactive", help="launchd ProcessType (default Interactive)")
    p.set_defaults(func=handle)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m daemon.service ...` (daemon/service/__main__.py): the same commands without the main CLI."""
    parser = argparse.ArgumentParser(prog="mondrian")
    add_service_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
