"""One place that decides where things live and how the daemon behaves.

Defaults work with no file at all; `<home>/mondrian.toml` overrides them, and a few environment
variables (MONDRIAN_HOME, MONDRIAN_MODEL, ANALYSIS_MODE, MONDRIAN_ADVISOR) override the file, so that
launchd plists and tests can steer the daemon without editing files.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import sys
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

import platformdirs

from .resources import checkout_root
from .fsutil import NotReadable, read_text_file
from .hints import program, shell_word

log = logging.getLogger(__name__)

MODES = ("baseline", "rag", "lora")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_NAME = "mondrian.toml"


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which setting and how to fix it."""


@dataclass(frozen=True)
class Config:
    home: Path
    inbox: Path
    outbox: Path
    db_path: Path
    var_dir: Path
    adapters_dir: Path
    advisors_dir: Path
    model: str = "mlx-community/Qwen2-VL-2B-Instruct-4bit"
    default_advisor: str = "ansel"
    default_mode: str = "rag"
    max_pixels: int = 448 * 448
    quiet_seconds: float = 2.0
    rescan_seconds: float = 60.0
    max_tokens: int = 1400
    comment_max_chars: int = 160
    # Photos analysed together in one forward pass when the queue holds several (same advisor and mode); 1: one
    # at a time; 0: chosen for the machine by the model runtime (`Runtime.suggested_batch_size`: 4 on a GPU, where
    # a decode step is launch-bound and 4 photos a pass gave 2.0x the photos per minute at real shapes, bf16 and
    # 4-bit; 1 on a CPU, where a step is compute-bound and batching gained 1.2x at best). bench/RESULTS.md `batch`.
    batch_size: int = 0
    job_timeout_seconds: float = 600.0
    # No photo is this large; a bigger file (a sparse 10 GB `.jpg`, a disk image) is refused before it is read.
    max_file_mb: int = 512
    max_attempts: int = 4
    retry_base_seconds: float = 5.0
    embeddings_enabled: bool = True
    rag_k: int = 3
    # Share of the retrieved references' similarity-weighted curator scores in rag's scores (0: the model's own).
    rag_reference_weight: float = 0.5
    train_time: str = "02:30"
    expose_paths: bool = False
    # Also write the report's XMP into JPEG/TIFF originals in the outbox (as a new file: never through a link).
    xmp_embed: bool = False
    # The original design's HTTP API (/analyze), served by `mondrian run` beside the inbox; port 0 turns it off.
    api_enabled: bool = True
    api_host: str = "127.0.0.1"  # loopback only, unless set otherwise on purpose
    api_port: int = 5100
    api_wait_seconds: float = 300.0  # a request waits this long for its report, then gets 202 and a job URL
    # Leave each photo where it was dropped (a Lightroom catalogue's links survive); its report folder gets a hard
    # link to it, or a copy where no link can be made (another disk). The ledger remembers it as done.
    keep_originals: bool = False
    # A shared ledger for several machines on one inbox and outbox (`postgresql://user@host/db`); empty: the SQLite
    # file at db_path, for one machine. Each claim holds its photo for lease_seconds, renewed every third of it
    # while the worker lives; a worker silent for longer loses the photo to another.
    ledger_url: str = ""
    lease_seconds: float = 60.0
    extra: Mapping[str, Any] = field(default_factory=dict)
    # Settings given by an environment variable (setting -> variable): they override mondrian.toml, so advice to
    # edit the file must name the variable instead (`where_set`).
    env_set: Mapping[str, str] = field(default_factory=dict)

    def where_set(self, key: str, *, full_path: bool = True) -> str:
        """Where to change setting `key` so the change takes, for advice: "in <home>/mondrian.toml", or the
        environment variable that overrides it (a service keeps the value it was installed with). `full_path=False`
        for the outbox's pages, which name no absolute path."""
        file = self.home / CONFIG_NAME if full_path else CONFIG_NAME
        var = self.env_set.get(key)
        if var:
            return (f"in the environment variable {var}, which overrides {file} (a service keeps the value it was "
                    f"installed with: run `{program()} service install` again after changing it)")
        return f"in {file}"

    @property
    def max_file_bytes(self) -> int:
        return self.max_file_mb * 1024 * 1024

    @property
    def api_serves(self) -> bool:
        return self.api_enabled and self.api_port != 0

    @property
    def shared(self) -> bool:
        """Whether several machines share the ledger (and so the inbox and outbox): see `ledger_url`."""
        return bool(self.ledger_url)

    def check_shared_storage(self) -> None:
        """With a shared ledger, every node publishes by renaming from the inbox into the outbox: only a rename within
        one filesystem is atomic, so a node that crashes mid-move cannot leave a half-copied photo another finishes."""
        if not self.shared:
            return  # one machine: a move across disks is a copy then a delete, recovered after a crash
        try:
            devices = {d: os.stat(d).st_dev for d in (self.inbox, self.outbox)}
        except OSError as exc:
            raise ConfigError(f"cannot look at {exc.filename} ({exc.strerror}): mount the shared folder") from None
        if devices[self.inbox] != devices[self.outbox]:
            raise ConfigError(f"the inbox ({self.inbox}) and the outbox ({self.outbox}) are on different "
                              f"filesystems: with a shared ledger (ledger_url) they must be folders of one share, so "
                              f"that every move between them is an atomic rename. Put both in the same share "
                              f"(e.g. /Volumes/Studio/Mondrian/inbox and /Volumes/Studio/Mondrian/outbox) and set "
                              f"inbox and outbox in {self.home / CONFIG_NAME}")

    @property
    def spool_dir(self) -> Path:
        """Photos uploaded through the API, each in a folder of its own until the worker moves it to the outbox."""
        return self.var_dir / "spool"

    @property
    def failed_dir(self) -> Path:
        return self.outbox / "failed"

    @property
    def staging_dir(self) -> Path:
        return self.outbox / ".staging"

    @property
    def logs_dir(self) -> Path:
        return self.var_dir / "logs"

    def ensure_dirs(self) -> None:
        """Create the folders Mondrian writes; a ConfigError says which one is in the way and how to fix it."""
        new_home = not self.home.exists()
        refuse_file_as_home(self.home)
        self._refuse_unmounted(self.home, within=(Path.home(), Path(platformdirs.user_data_dir())))
        own = [self.failed_dir, self.staging_dir, self.outbox / "duplicates", self.var_dir, self.adapters_dir,
               self.advisors_dir, self.db_path.with_name(self.db_path.name + ".runs"), self.spool_dir,
               *(self.var_dir / name for name in ("logs", "models", "cache", "datasets"))]
        try:
            own += [self.adapters_dir / name for name in os.listdir(self.adapters_dir)]  # one folder per advisor
        except OSError:
            pass
        for d in own:
            # Its sweeps delete and its moves write in these folders: through a link they would do it outside
            # the home. (The inbox and outbox may be links: their paths are resolved when the config is read.)
            if os.path.islink(d):
                raise ConfigError(f"{d} is a symbolic link (to {os.readlink(d)}), where Mondrian keeps a folder of "
                                  f"its own: remove the link (`rm {shell_word(d)}` removes only the link, not what it "
                                  f"points to) and start again")
        for d in (self.inbox, self.outbox, self.failed_dir, self.staging_dir, self.var_dir,
                  self.adapters_dir, self.advisors_dir):
            self._refuse_unmounted(d, within=(self.home, Path.home(), Path(platformdirs.user_data_dir())))
            try:
                d.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                raise ConfigError(f"{d} should be a folder, but a file is in the way: move that file elsewhere "
                                  f"(Mondrian needs the name for its own folder)") from None
            except OSError as exc:
                raise ConfigError(f"cannot create the folder {d} ({exc.strerror or exc}): make its parent "
                                  f"writable for the user that runs Mondrian, or point the setting elsewhere "
                                  f"in {self.home / CONFIG_NAME}") from None
        if new_home:
            log.info("created a new Mondrian home at %s: drop photos into %s, reports appear in %s", self.home,
                     self.inbox, self.outbox)
        for d in (self.outbox, self.failed_dir, self.staging_dir, self.var_dir):
            if not os.access(d, os.W_OK | os.X_OK):
                raise ConfigError(f"the folder {d} cannot be written (read-only, immutable or not yours): make "
                                  f"it writable for the user that runs Mondrian (`ls -ld`, `lsattr -d`, "
                                  f"`chattr -i`, a read-only mount?)")

    def _refuse_unmounted(self, folder: Path, within: tuple[Path, ...]) -> None:
        """Folders are made with their missing parents only `within` this home or the user's home or data folder.
        Elsewhere (`/Volumes/Photos/outbox`, `/mnt/nas/inbox`) a missing parent is a drive or share not connected,
        and making it would put a plain folder on the startup disk where the drive mounts (macOS then mounts it as
        `Photos 1`). Refused instead; as a service, Mondrian starts again by itself every 30 s until it is there."""
        if folder.is_dir() or folder.parent.is_dir():
            return
        if any(folder.is_relative_to(root) for root in within):
            return
        missing = folder.parent
        while not missing.parent.is_dir() and missing.parent != missing:
            missing = missing.parent
        raise ConfigError(f"{folder} cannot be reached: {missing} does not exist (a drive or network share that "
                          f"is not connected?). Connect it and run the command again (as a service Mondrian tries "
                          f"again by itself every 30 s), or point "
                          f"{'MONDRIAN_HOME' if folder == self.home else 'the setting'} "
                          f"elsewhere{'' if folder == self.home else ' in ' + str(self.home / CONFIG_NAME)}. "
                          f"Mondrian does not create {missing} itself: that would put a plain folder where the drive "
                          f"mounts{self._init_hint(folder)}")

    def _init_hint(self, folder: Path) -> str:
        return (f" (once it is connected, `{program()} init {shell_word(folder)}` makes a new home there)"
                if folder == self.home else "")


_SCALARS = {f.name: f.type for f in fields(Config)}
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
PATH_SETTINGS = ("inbox", "outbox", "var_dir", "db_path", "adapters_dir", "advisors_dir")
TABLES = ("lora",)  # sections of mondrian.toml read elsewhere: [lora] by jobs/train.py
# What each number may be: (lowest, highest, whether the lowest itself is allowed). A value outside (or NaN, or
# infinite) is refused at start: accepted, it would fail every photo later with a reason that names no setting,
# or hang (a NaN quiet time never lets a file settle).
LIMITS: dict[str, tuple[float, float, bool]] = {
    "quiet_seconds": (0, 86400, True),
    "rescan_seconds": (0, 86400, False),
    "job_timeout_seconds": (0, 7 * 86400, False),
    "retry_base_seconds": (0, 86400, True),
    "max_pixels": (28 * 28, 16384 * 28 * 28, True),  # Qwen2-VL's own upper limit
    "max_tokens": (1, 32768, True),
    "comment_max_chars": (1, 4000, True),
    "batch_size": (0, 64, True),
    "max_attempts": (1, 100, True),
    "rag_k": (1, 100, True),
    "rag_reference_weight": (0, 1, True),
    "max_file_mb": (1, 1024 * 1024, True),
    "api_port": (0, 65535, True),
    "api_wait_seconds": (0, 86400, True),
    "lease_seconds": (1, 86400, True),
}
_TIME_OF_DAY = re.compile(r"^\s*(\d{1,2}):(\d{2})(?::(\d{2}))?\s*$")


def is_true(text: str) -> bool:
    """How an environment variable or a TOML string says yes: 1, true, yes or on, in any case."""
    return text.strip().lower() in TRUE_WORDS


def time_of_day(text: str) -> tuple[int, int, int]:
    """`train_time` ("HH:MM" or "HH:MM:SS", local time) as hours, minutes, seconds."""
    m = _TIME_OF_DAY.match(str(text))
    if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59 or int(m.group(3) or 0) > 59:
        raise ConfigError(f"train_time {text!r} is not a time of day; write it as HH:MM (e.g. \"02:30\")")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def coerce_setting(name: str, value: Any, default: Any, origin: str) -> Any:
    """`value` as the type of `default`, strictly: a typo must not turn into a different setting silently."""
    kind = {bool: "true or false", int: "a whole number", float: "a number", str: "a text in quotes"}[type(default)]
    wrong = ConfigError(f"{origin}: {name} must be {kind}")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
            return is_true(value)
        raise wrong
    if isinstance(default, str):
        if not isinstance(value, str):
            raise wrong
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise wrong
    try:
        number = float(value)
    except ValueError:
        raise wrong from None
    if isinstance(default, int):
        if not number.is_integer():  # also NaN and infinities
            raise wrong
        return int(number)
    return number


def _check_range(name: str, value: float, default: float, origin: str) -> None:
    lo, hi, lo_ok = LIMITS[name]
    if math.isfinite(value) and (value >= lo if lo_ok else value > lo) and value <= hi:
        return
    unit = " (seconds)" if name.endswith("_seconds") else ""
    shown = lambda x: f"{x:,.0f}" if float(x).is_integer() else f"{x:g}"  # noqa: E731
    raise ConfigError(f"{origin}: {name}{unit} must be {'at least' if lo_ok else 'more than'} {shown(lo)} and at "
                      f"most {shown(hi)} (the default is {shown(default)})")


# Names people bring from the original design and the environment variables (ANALYSIS_MODE, MONDRIAN_ADVISOR).
_SETTING_ALIASES = {"analysis_mode": "default_mode", "mode": "default_mode", "advisor": "default_advisor",
                    "advisor_id": "default_advisor", "model_path": "model", "port": "api_port"}


def _unknown(key: str, cfg_file: Path) -> ConfigError:
    names = sorted({f.name for f in fields(Config)} - {"home", "extra", "env_set"} | set(TABLES))
    alias = _SETTING_ALIASES.get(key.lower())
    close = [alias] if alias else difflib.get_close_matches(key, names, n=1)
    hint = f"did you mean `{close[0]}`?" if close else f"the settings are: {', '.join(names)}"
    return ConfigError(f"unknown setting `{key}` in {cfg_file}; {hint}")


def user_home() -> Path:
    """Where an installed Mondrian keeps its home: a photographer's folder on macOS (~/Pictures/Mondrian), the
    XDG data folder elsewhere ($XDG_DATA_HOME/mondrian, else ~/.local/share/mondrian)."""
    if sys.platform == "darwin":
        return Path(platformdirs.user_pictures_dir()) / "Mondrian"
    return Path(platformdirs.user_data_dir("mondrian", appauthor=False))


def default_home(env: Mapping[str, str] = os.environ) -> Path:
    """MONDRIAN_HOME, else the checkout Mondrian runs from (the design card keeps inbox/ and outbox/ at its top
    level), else, for an installed package, `user_home()`."""
    return Path(env.get("MONDRIAN_HOME") or checkout_root() or user_home()).expanduser().resolve()


def _check_apart(inbox: Path, others: dict[str, Path], cfg_file: Path) -> None:
    """Everything in the inbox is taken as work (and moved out): Mondrian's own files must live elsewhere."""
    for name, path in others.items():
        if path == inbox or path.is_relative_to(inbox):
            raise ConfigError(f"{name} ({path}) is inside the inbox ({inbox}): Mondrian would analyse and move "
                              f"its own files. Set {name} (or inbox) in {cfg_file} to a folder outside the other")
    outbox = others["outbox"]
    if inbox.is_relative_to(outbox):
        raise ConfigError(f"the inbox ({inbox}) is inside the outbox ({outbox}): Mondrian would analyse its own "
                          f"reports. Set inbox (or outbox) in {cfg_file} to a folder outside the other")
    var_dir = others["var_dir"]
    if var_dir.is_relative_to(outbox) or outbox.is_relative_to(var_dir):
        # Each is locked and swept of leftovers as Mondrian's own: one inside the other took its own lock for
        # another daemon's, and the outbox's index and the ledger's files would be mixed.
        raise ConfigError(f"var_dir ({var_dir}) and the outbox ({outbox}) overlap: Mondrian keeps its ledger, lock and "
                          f"working files in var_dir and publishes reports in the outbox. Set var_dir (or outbox) in "
                          f"{cfg_file} to a folder outside the other")


def refuse_file_as_home(home: Path) -> None:
    """`init` cannot turn a file into a home, so a mistyped MONDRIAN_HOME naming one gets its own advice."""
    if os.path.lexists(home) and not home.is_dir():
        # A concrete folder, not a placeholder: `mondrian init FOLDER` pasted as printed made a home named FOLDER.
        beside = home.with_name(home.name + " home")
        raise ConfigError(f"no Mondrian home at {home}: it is a file, not a folder. Set MONDRIAN_HOME (or --home) to "
                          f"your home folder, or create one beside it with `{program()} init {shell_word(beside)}` "
                          f"(it then says how to use it)")


# tomllib's words for the mistakes people make editing the file by hand, in theirs.
_TOML_HINTS = {"Cannot overwrite a value": "a setting is given twice: keep one of the two lines",
               "Invalid value": 'a value is a number, true or false, or text in double quotes (model = "smoke")'}


def toml_problem(path: Path, text: str, exc: tomllib.TOMLDecodeError, remedy: str) -> str:
    """The line a TOML error is on, quoted, with a plain hint where there is one, and what to do (`remedy`)."""
    where = re.search(r"\(at line (\d+), column \d+\)", str(exc))
    shown = ""
    lines = text.splitlines()
    if where and 0 < int(where.group(1)) <= len(lines):
        shown = f" line {where.group(1)}, `{lines[int(where.group(1)) - 1].strip()}`"
    hint = next((h for words, h in _TOML_HINTS.items() if str(exc).startswith(words)), None)
    return f"{path}{shown} is not valid TOML: {hint + ' (' + str(exc) + ')' if hint else exc}; {remedy}"


def _read_config_text(cfg_file: Path, home: Path) -> str | None:
    """mondrian.toml's text, None when there is none. A FIFO or device there must not hang every command."""
    try:
        return read_text_file(cfg_file)
    except (FileNotFoundError, NotADirectoryError):  # a home that is a file is refused with its own words later
        if os.path.islink(cfg_file):  # a link to settings kept elsewhere (a synced folder, a drive not mounted)
            raise ConfigError(f"{cfg_file} is a link to {os.readlink(cfg_file)}, which is not there (a drive or "
                              f"synced folder not connected?); connect it, or replace the link with the settings "
                              f"file itself") from None
        return None
    except NotReadable as exc:
        raise ConfigError(f"cannot read {cfg_file}: {exc}; or delete it for the defaults") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {cfg_file} ({exc.strerror or exc}): make the home "
                          f"{home} and that file readable for the user that runs Mondrian") from None


# Settings an environment variable gives, over mondrian.toml (`service install` carries those set in its shell
# into the service, which otherwise starts with none of them).
ENV_SETTINGS = {"MONDRIAN_MODEL": "model", "ANALYSIS_MODE": "default_mode",
                "MONDRIAN_ADVISOR": "default_advisor", "EMBEDDINGS_ENABLED": "embeddings_enabled",
                "MONDRIAN_QUIET_SECONDS": "quiet_seconds", "MONDRIAN_MAX_PIXELS": "max_pixels",
                "MONDRIAN_COMMENT_MAX_CHARS": "comment_max_chars",
                "MONDRIAN_JOB_TIMEOUT": "job_timeout_seconds",
                "MONDRIAN_RESCAN_SECONDS": "rescan_seconds", "MONDRIAN_API_PORT": "api_port",
                "MONDRIAN_LEDGER_URL": "ledger_url"}


def shown_url(url: str) -> str:
    """A ledger URL as logs and messages show it: its password left out, whether in the user part (up to the last
    `@`: an unencoded `@` in a password must not give away the rest of it) or as a `password=` parameter."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return re.sub(r"((?:^|\s)(?:ssl)?password\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|\S*)", r"\1***", url,
                      flags=re.IGNORECASE)
    # Up to the last `@` anywhere: a password's unencoded `/`, `?` or `@` stays inside the part masked (a `@` in a
    # parameter hides the host too, which says less but never gives a password away).
    at = rest.rfind("@")
    if at >= 0 and ":" in rest[:at]:
        rest = f"{rest[:at].split(':', 1)[0]}:***{rest[at:]}"
    rest = re.sub(r"([?&](?:ssl)?password=)[^&#]*", r"\1***", rest, flags=re.IGNORECASE)
    return f"{scheme}{sep}{rest}"


def load_config(home: Path | str | None = None, env: Mapping[str, str] = os.environ,
                **overrides: Any) -> Config:
    home = Path(home).expanduser().resolve() if home else default_home(env)
    data: dict[str, Any] = {}
    cfg_file = home / CONFIG_NAME
    text = _read_config_text(cfg_file, home)
    try:
        if text is not None:
            data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(toml_problem(cfg_file, text or "", exc, "fix it, or delete the file for the defaults")) from exc

    def said(key: str, value: Any) -> str:  # a setting as an error quotes it: never a ledger's password
        return repr(shown_url(str(value))) if key == "ledger_url" else repr(value)

    origins = {key: f"{key} = {said(key, value)} in {cfg_file}" for key, value in data.items()}
    env_set: dict[str, str] = {}
    for var, key in ENV_SETTINGS.items():
        if env.get(var):
            data[key] = env[var]
            origins[key] = f"{var}={said(key, env[var])} (environment)"
            env_set[key] = var
    for key, value in overrides.items():
        if value is not None:
            data[key] = value
            origins[key] = f"{key}={said(key, value)}"
    for key in data:
        if key not in _SCALARS or key in ("home", "extra", "env_set"):
            if key not in TABLES:
                raise _unknown(key, cfg_file)
            if not isinstance(data[key], dict):
                raise ConfigError(f"{origins[key]}: `{key}` is a section: write it as [{key}] followed by its "
                                  f"settings, one a line")

    def path_setting(key: str, default: Path) -> Path:
        raw = data.pop(key, default)
        if not isinstance(raw, (str, Path)) or not str(raw).strip():
            raise ConfigError(f"{origins[key]}: {key} must be a folder (a path in quotes)")
        p = Path(str(raw)).expanduser()
        p = p if p.is_absolute() else home / p
        if key in ("var_dir", "adapters_dir", "advisors_dir") and os.path.islink(p):
            # Resolved first, the link would pass as the folder it points to, and Mondrian's sweeps of its own
            # leftovers would delete there. (The inbox and outbox may be links: only photos move through them.)
            raise ConfigError(f"{p} is a symbolic link (to {os.readlink(p)}), where Mondrian keeps a folder of its "
                              f"own: remove the link (`rm {shell_word(p)}` removes only the link, not what it points "
                              f"to) and start again, or name the folder it points to as {key} in {cfg_file} "
                              f"({key} = \"{os.path.realpath(p)}\")")
        p = p.resolve()
        if key != "db_path" and p.exists() and not p.is_dir():
            raise ConfigError(f"{origins.get(key, key)}: {p} is a file, not a folder; name a folder for {key}")
        return p

    var_dir = path_setting("var_dir", home / "var")
    user_home = Path.home().resolve()
    if var_dir == user_home or home.is_relative_to(var_dir):
        # Its staging/ and spool/ are swept of leftovers: in a folder shared with other things they are someone's.
        what = "your user folder" if var_dir == user_home else "the home" if var_dir == home else "a folder above the home"
        raise ConfigError(f"{origins.get('var_dir', 'var_dir')}: var_dir ({var_dir}) is {what}; Mondrian keeps its "
                          f"ledger, logs and working folders there and clears leftovers out of them, so it needs a "
                          f"folder of its own: name one (the default is {home / 'var'})")
    paths = dict(
        inbox=path_setting("inbox", home / "inbox"),
        outbox=path_setting("outbox", home / "outbox"),
        db_path=path_setting("db_path", var_dir / "ledger.db"),
        adapters_dir=path_setting("adapters_dir", home / "adapters"),
        advisors_dir=path_setting("advisors_dir", home / "advisors"),
    )
    _check_apart(paths["inbox"], {"outbox": paths["outbox"], "var_dir": var_dir, "db_path": paths["db_path"],
                                  "adapters_dir": paths["adapters_dir"], "advisors_dir": paths["advisors_dir"]},
                 cfg_file)
    if home == paths["inbox"] or home.is_relative_to(paths["inbox"]):
        # Its mondrian.toml would be taken for a photo, failed and moved out: the home would be gone.
        raise ConfigError(f"the home ({home}) is inside the inbox ({paths['inbox']}): Mondrian would move its own "
                          f"{CONFIG_NAME} out as a failed photo. Set inbox in {cfg_file} to a folder outside the home")
    folders = {"the home": home, "var_dir": var_dir, **{k: v for k, v in paths.items() if k != "db_path"}}
    taken = next((name for name, folder in folders.items() if paths["db_path"] == folder), None)
    if taken:
        raise ConfigError(f"{origins.get('db_path', 'db_path')}: db_path is the ledger's file, and {paths['db_path']} "
                          f"is {taken}; name a file in it instead (e.g. {paths['db_path'] / 'ledger.db'})")
    cfg = Config(home=home, var_dir=var_dir, **paths)
    known = {f.name for f in fields(Config)} - set(paths) - {"home", "var_dir", "extra", "env_set"}
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        if key in known:
            values[key] = coerce_setting(key, value, getattr(cfg, key), origins[key])
            if key in LIMITS:
                _check_range(key, values[key], getattr(cfg, key), origins[key])
        else:
            extra[key] = value  # a section (TABLES), read by the part of Mondrian it belongs to
    cfg = replace(cfg, extra=extra, env_set={k: v for k, v in env_set.items() if overrides.get(k) is None}, **values)
    if cfg.default_mode.strip().lower() not in MODES:
        raise ConfigError(f"{origins.get('default_mode', 'default_mode')}: the mode is unknown; use one of "
                          f"{', '.join(MODES)}")
    # An advisor's id is lowercase; `Cartier`, as a name is written, is cartier here as in the inbox and the API.
    cfg = replace(cfg, default_mode=cfg.default_mode.strip().lower(), default_advisor=cfg.default_advisor.lower())
    for key, what in (("model", "a Hugging Face model id (mlx-community/Qwen2-VL-2B-Instruct-4bit), a local "
                                "folder holding an MLX checkpoint, or `smoke`"),
                      ("default_advisor", "an advisor id (a folder of advisors/, e.g. ansel)")):
        if not str(getattr(cfg, key)).strip():  # else it fails only once the model loads or a photo arrives
            raise ConfigError(f"{origins.get(key, key)}: {key} is empty; name {what}, or leave the line out for "
                              f"the default ({getattr(Config, key, None) or 'see mondrian.toml'})")
    if not cfg.api_host.strip():
        raise ConfigError(f"{origins.get('api_host', 'api_host')}: api_host is empty; use \"127.0.0.1\" (this "
                          f"machine only, the default) or, on purpose, \"0.0.0.0\" (every network it is on)")
    model = str(cfg.model).strip()
    if origins.get("model", "").endswith(f" in {cfg_file}") and not Path(model).expanduser().is_absolute() \
            and (home / Path(model).expanduser()).is_dir():
        # A folder named in mondrian.toml is the home's, like inbox and outbox, wherever the command runs from
        # (a hub id such as mlx-community/Qwen2-VL-2B-Instruct-4bit is no folder of the home).
        cfg = replace(cfg, model=str((home / model).resolve()))
    url = cfg.ledger_url.strip()
    if url and not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"{origins['ledger_url']}: a shared ledger is a PostgreSQL URL "
                          f"(postgresql://user:password@host:5432/mondrian); leave ledger_url out to keep the "
                          f"ledger in {cfg.db_path}")
    if url and url.partition("://")[2].split("?", 1)[0].count("@") > 1:
        # libpq takes the first `@` as the end of the password and the rest for the host, and its error then
        # names that "host": the rest of the password.
        raise ConfigError(f"{origins['ledger_url']}: the URL has more than one @ before its host: a password "
                          f"holding @ (or :, /, ?) is written percent-encoded, @ as %40")
    if url.startswith("postgres://"):
        # libpq's other spelling: peewee hands psycopg only postgresql:// as a URL, anything else as a database *name*
        # (so the whole URL, password and all, went to the local server and into its log).
        url = "postgresql://" + url[len("postgres://"):]
    cfg = replace(cfg, ledger_url=url)
    if "train_time" in origins:
        try:
            time_of_day(cfg.train_time)
        except ConfigError as exc:
            raise ConfigError(f"{origins['train_time']}: {exc}") from None
    return cfg
