"""Adapter versions on disk, the `current` pointer, promotion, rollback and pruning; the base-model fingerprint.

Inference reads this store (the lora strategy serves `current`); training (jobs/) writes it. It imports no
MLX, so listing or rolling back adapters never loads the model runtime.

Layout, per advisor::

    adapters/<advisor>/v0001/  adapter_config.json  adapters.safetensors  metrics.json  manifest.json
    adapters/<advisor>/v0002/  ...
    adapters/<advisor>/current -> v0002        (a relative symlink; mlx-vlm's --adapter-path accepts it)
    adapters/<advisor>/history.jsonl            (promotions, refusals, rollbacks; for people)

A candidate is written into a hidden staging folder, completely and fsynced; committing it is one
`rename` of that folder to its version name, and promoting it is one `os.replace` of a new symlink over
`current`. Each step is atomic, so a crash (or SIGKILL) at any moment leaves either the old or the new
adapter current and never a half-written one; leftovers of an interrupted commit are hidden folders
that `recover()` removes. Versions are immutable once committed, except for the rollback note in
metrics.json (written atomically).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Container, Iterator

from .. import testhooks
from ..analysis.advisors import ADVISOR_ID
from ..fsutil import NotOwn, atomic_write_text, fsync_dir, open_own_file
from ..hints import mondrian
from .smoke import MARKER_NAME

log = logging.getLogger(__name__)

# The files of an adapter folder as mlx-vlm writes and reads them (daemon.model.adapters uses these too).
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapters.safetensors"
METRICS_NAME = "metrics.json"
MANIFEST_NAME = "manifest.json"
CURRENT = "current"
HISTORY = "history.jsonl"
REQUIRED_FILES = (CONFIG_NAME, WEIGHTS_NAME, METRICS_NAME, MANIFEST_NAME)
VERSION_RE = re.compile(r"^v(\d{4,})$")


def version_name(wanted: str) -> str:
    """The folder name a person means by `v3`, `3` or `v0003` (anything else is taken as written)."""
    digits = re.fullmatch(r"[vV]?(\d+)", wanted.strip())
    return f"v{int(digits.group(1)):04d}" if digits else wanted
STAGING_PREFIX = ".staging-"
DEFAULT_KEEP = 5


class AdapterStoreError(RuntimeError):
    pass


class Busy(AdapterStoreError):
    """Another process is training or promoting this advisor's adapter."""


class AdapterUnusable(ValueError):
    """An adapter's files cannot be used with the model (daemon.model.adapters.AdapterError is one). Defined here,
    without MLX, so the worker can tell it from other faults: the photo falls back to rag rather than failing."""


def files_identity(folder: Path) -> tuple[Any, ...]:
    """What a verdict on an adapter folder holds for: its real path and the size and mtime_ns of the files that are
    loaded. A repaired file, or another version promoted under the same name, gives another identity."""
    folder = Path(folder).resolve()
    out: list[Any] = [str(folder)]
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            st = os.stat(folder / name)
            out.append((name, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((name, None, None))
    return tuple(out)


def adapter_problem(folder: Path) -> str | None:
    """Why the adapter in `folder` cannot be loaded, found from its files alone (no MLX, no model), or None if
    nothing is visibly wrong. Catches what a hand edit, a full disk or a copy cut short leaves: a config that is not
    JSON or lacks rank/scale/keys, and weights that are truncated or whose LoRA rank differs from the config. The
    message starts with the file's name (the caller says where the folder is: pages never show absolute paths)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{CONFIG_NAME} is missing"
    except (OSError, ValueError) as exc:
        return f"{CONFIG_NAME} is unreadable ({exc})"
    params = config.get("lora_parameters") if isinstance(config, dict) else None
    if not isinstance(params, dict):
        return f"{CONFIG_NAME} has no lora_parameters"
    if str(config.get("fine_tune_type", "lora")) != "lora":
        return f"{CONFIG_NAME} is a {config.get('fine_tune_type')!r} adapter, not LoRA"
    try:
        rank, scale = int(params["rank"]), float(params["scale"])
        keys = [str(k) for k in params["keys"]]
    except KeyError as exc:
        return f"{CONFIG_NAME} has no {exc.args[0]!r} in lora_parameters"
    except (TypeError, ValueError) as exc:
        return f"{CONFIG_NAME} has an unreadable lora_parameters ({exc})"
    if not math.isfinite(scale):  # NaN or infinite logits: every critique ran out of tokens, "raise max_tokens"
        return f"{CONFIG_NAME} has a scale that is not a finite number ({params['scale']!r})"
    if not keys:
        return f"{CONFIG_NAME} lists no target modules (lora_parameters.keys)"
    # safetensors: 8 bytes of header length, a JSON header naming each tensor's shape and byte range, the data.
    try:
        with open(folder / WEIGHTS_NAME, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                return f"{WEIGHTS_NAME} is truncated or not a safetensors file ({size} bytes)"
            header = json.loads(fh.read(n))
    except FileNotFoundError:
        return f"{WEIGHTS_NAME} is missing"
    except (OSError, ValueError) as exc:
        return f"{WEIGHTS_NAME} is unreadable ({exc})"
    if not isinstance(header, dict):
        return f"{WEIGHTS_NAME} is not a safetensors file"
    tensors = {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    try:
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        shapes = {k: [int(d) for d in v["shape"]] for k, v in tensors.items()}
    except (KeyError, IndexError, TypeError, ValueError):
        return f"{WEIGHTS_NAME} has an unreadable header"
    if 8 + n + end != size:
        return f"{WEIGHTS_NAME} is truncated ({size} bytes, its header describes {8 + n + end})"
    for key in keys:
        a, b = shapes.get(f"{key}.lora_a"), shapes.get(f"{key}.lora_b")
        if a is None or b is None:
            return f"{WEIGHTS_NAME} has no weights for {key}, which {CONFIG_NAME} lists"
        if len(a) != 2 or len(b) != 2 or a[1] != rank or b[0] != rank:
            return (f"{WEIGHTS_NAME} does not match {CONFIG_NAME}: {key} has LoRA weights of shapes {tuple(a)} and "
                    f"{tuple(b)}, which do not fit its rank {rank}")
    return None


def nonfinite_weights(folder: Path) -> str | None:
    """The first LoRA tensor holding NaN or infinite values (a file damaged on disk, or a training that diverged),
    said as a problem, or None. Reads the whole file: call it once per file version (the lora mode caches it), not
    in listings."""
    import numpy as np
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(Path(folder) / WEIGHTS_NAME))
    except Exception:  # noqa: BLE001 - bf16 that numpy cannot hold, a file that went: loading says those
        return None
    for name, value in tensors.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return f"{WEIGHTS_NAME} holds values that are not numbers (NaN or infinite) in {name}: it is damaged"
    return None


def unwritable(folder: Path, exc: OSError) -> str:
    """One line naming `folder`, what went wrong writing there, and what to fix."""
    why = exc.strerror or str(exc)
    if exc.errno == errno.EROFS:
        fix = "it is on a read-only file system: remount it read-write (or set adapters_dir to a writable folder)"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        fix = "make it writable by this user (chmod u+w, or chown)"
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "its disk is full: free some space"
    else:
        fix = "check that it exists and is writable"
    return f"cannot write in the adapters folder {folder} ({why}): {fix}, then run the command again"


def base_model_fingerprint(model_path: str | Path) -> str:
    """Identifies the base weights an adapter was trained on (config + smoke marker + weight sizes)."""
    p = Path(model_path)
    h = hashlib.sha256()
    for name in ("config.json", MARKER_NAME):
        try:
            h.update((p / name).read_bytes())
        except OSError:
            pass
    for w in sorted(p.glob("*.safetensors")):
        h.update(f"{w.name}:{w.stat().st_size}".encode())
    return h.hexdigest()[:16]


def atomic_write_json(path: Path, data: Any) -> None:
    # One atomic writer for the whole project: honours the umask, fsyncs the file and its folder.
    atomic_write_text(Path(path), json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class Version:
    advisor: str
    name: str
    path: Path
    manifest: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def number(self) -> int:
        return int(VERSION_RE.match(self.name).group(1))  # type: ignore[union-attr]

    @property
    def decision(self) -> dict[str, Any]:
        return self.metrics.get("decision") or {}

    @property
    def promoted(self) -> bool:
        return bool(self.decision.get("promoted"))

    @property
    def rolled_back(self) -> bool:
        return bool(self.decision.get("rolled_back_at"))

    @property
    def fingerprint(self) -> str | None:
        return self.manifest.get("fingerprint")

    @property
    def label(self) -> str:
        return f"{self.advisor}/{self.name}"

    def complete(self) -> bool:
        return all((self.path / f).is_file() for f in REQUIRED_FILES)

    def problem(self) -> str | None:
        """Why this version cannot serve photos, from its files alone: missing files, or weights a copy cut short
        or a hand edit broke (`adapter_problem`); None when it looks loadable."""
        missing = [f for f in REQUIRED_FILES if not (self.path / f).is_file()]
        if missing:
            return f"incomplete (no {', '.join(missing)})"
        return adapter_problem(self.path)

    def usable(self) -> bool:
        return self.problem() is None

    def copied_from(self, advisors: Container[str]) -> str | None:
        """Why this version is not this advisor's, when its manifest names another advisor that exists: a version
        folder copied between advisors served its photos with another advisor's eye, named as this one's. (An advisor
        renamed, adapters and all, names one that no longer exists: its adapters still serve it.)"""
        trained_for = self.manifest.get("advisor")
        if isinstance(trained_for, str) and trained_for != self.advisor and trained_for in advisors:
            return f"trained for {trained_for}, not {self.advisor} (a folder copied from adapters/{trained_for}/?)"
        return None


def configured_base(cfg: Any) -> str | None:
    """The fingerprint of the base model `cfg` names, or None when it is not here (reported when the model is
    loaded): never a download, which `adapters rollback` or `evaluate` would otherwise start for a hub id."""
    from .runtime import resolve_model_path

    try:
        return base_model_fingerprint(resolve_model_path(cfg.model, cfg.var_dir, download=False))
    except Exception:  # noqa: BLE001 - a missing model has its own message where it is loaded
        return None


def _fits(version: Version, base: str | None) -> bool:
    """Whether `version` was trained for the base model of fingerprint `base` (or either is unknown)."""
    trained_on = (version.manifest.get("base_model") or {}).get("fingerprint")
    return not (base and trained_on and trained_on != base)


class AdapterStore:
    def __init__(self, adapters_dir: Path, keep: int = DEFAULT_KEEP) -> None:
        self.root = Path(adapters_dir)
        self.keep = max(1, int(keep))

    def advisor_dir(self, advisor: str) -> Path:
        if not ADVISOR_ID.match(advisor):  # never a path out of the adapters folder, whoever the caller is
            raise AdapterStoreError(f"{advisor!r} is not an advisor id")
        return self.root / advisor

    def advisors(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and ADVISOR_ID.match(p.name))

    def original_layout(self, advisor: str, command: str = "mondrian") -> str | None:
        """What the original Mondrian left in the advisor's folder (`adapters/ansel/adapter_config.json` and
        `adapters.safetensors`, written by `mlx_vlm.lora --output-path adapters/ansel`), said as the reason it is not
        used, or None (`command`: how the message names Mondrian; reports name no home). Its config lacks what a version here records (the base model it was trained for, its test
        set and metrics) and its format is the old trainer's: loading it could only guess. Never touched."""
        try:
            d = self.advisor_dir(advisor)
            found = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if (d / n).is_file()]
        except (AdapterStoreError, OSError):
            return None
        if not found:
            return None
        where = f"{self.root.name}/{advisor}"  # the folder's own name: `adapters_dir` may be anywhere
        return (f"{where}/ holds an adapter in the original Mondrian's layout ({' and '.join(found)} "
                f"directly in it), which Mondrian does not load: its adapters are versions ({where}/v0001, "
                f"…) trained, evaluated and promoted by `{command} train --advisor {advisor}` (the original's "
                f"references first: `{command} references import-db mondrian/mondrian.db`)")

    # -- reading ---------------------------------------------------------------------------------
    def versions(self, advisor: str) -> list[Version]:
        d = self.advisor_dir(advisor)
        if not d.is_dir():
            return []
        out = []
        for p in d.iterdir():
            if VERSION_RE.match(p.name) and p.is_dir() and not p.is_symlink():
                out.append(Version(advisor, p.name, p, _read_json(p / MANIFEST_NAME), _read_json(p / METRICS_NAME)))
        return sorted(out, key=lambda v: v.number)

    def version(self, advisor: str, name: str) -> Version:
        """The version `name` means (`v3`, `3` and `v0003` alike); else an error listing the versions kept."""
        wanted = version_name(name)
        versions = self.versions(advisor)
        for v in versions:
            if v.name == wanted:
                return v
        kept = f"its versions are {', '.join(v.name for v in versions)}" if versions else "it has none yet"
        raise AdapterStoreError(f"{advisor} has no adapter version {name!r}; {kept} (`{mondrian()} adapters "
                                f"--advisor {advisor}` shows each)")

    def current_name(self, advisor: str) -> str | None:
        pointer = self.advisor_dir(advisor) / CURRENT
        try:
            target = os.readlink(pointer)
        except OSError:
            # A folder where the link was: `rsync -rL`, `cp -R`, a sync service or an exFAT drive copy the version
            # it pointed at. Its manifest still names that version.
            return self._copied_current(pointer)
        name = Path(target).name
        return name if VERSION_RE.match(name) else None

    @staticmethod
    def _copied_current(pointer: Path) -> str | None:
        """The version a folder in `current`'s place is a copy of, if it is one."""
        if pointer.is_symlink() or not pointer.is_dir():
            return None
        name = str(_read_json(pointer / MANIFEST_NAME).get("version") or "")
        return name if VERSION_RE.match(name) else None

    def _settle_copied_current(self, advisor: str) -> bool:
        """Turn a folder in `current`'s place back into the link; whether there was one. It becomes its version's
        folder where that was lost or is incomplete (a sync cut short: the copy is the whole of it), else it goes
        (the version folder holds the same files). A folder that names no version is not Mondrian's to delete: it
        is moved aside, as `current-copy-<time>`."""
        d = self.advisor_dir(advisor)
        pointer = d / CURRENT
        name = self._copied_current(pointer)
        if pointer.is_symlink() or not pointer.is_dir():
            return False
        trash = d / f"{STAGING_PREFIX}copied-{CURRENT}-{secrets.token_hex(4)}"
        if name is None:
            os.rename(pointer, d / f"{CURRENT}-copy-{time.strftime('%Y%m%dT%H%M%S')}")
        elif not (d / name).exists() or not all((d / name / f).is_file() for f in REQUIRED_FILES):
            if (d / name).exists():
                os.rename(d / name, trash)  # the partial version, replaced by the whole copy
            os.rename(pointer, d / name)
        else:
            os.rename(pointer, trash)
        shutil.rmtree(trash, ignore_errors=True)
        if name is not None and (d / name).is_dir():
            self.switch(advisor, name)
        fsync_dir(d)
        return True

    def current(self, advisor: str) -> Version | None:
        """The current version if it is complete; None if there is none (or the pointer is dangling)."""
        name = self.current_name(advisor)
        if name is None:
            return None
        path = self.advisor_dir(advisor) / name
        if not path.is_dir():
            return None
        v = Version(advisor, name, path, _read_json(path / MANIFEST_NAME), _read_json(path / METRICS_NAME))
        return v if v.complete() else None

    def latest(self, advisor: str) -> Version | None:
        versions = self.versions(advisor)
        return versions[-1] if versions else None

    def history(self, advisor: str) -> list[dict[str, Any]]:
        try:
            lines = (self.advisor_dir(advisor) / HISTORY).read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):  # a line edited into a list or a number would sink every commit
                    out.append(entry)
        return out

    # -- writing ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, advisor: str, *, wait: bool = False) -> Iterator[None]:
        """One trainer/promoter per advisor across processes (the daemon's nightly job and the CLI)."""
        d = self.advisor_dir(advisor)
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd = open_own_file(d / ".lock")  # never through a link: it is truncated below
        except NotOwn as exc:
            raise AdapterStoreError(str(exc)) from None
        except OSError as exc:
            # A read-only mount, a folder of another user's, a full disk: nothing can be trained or promoted here,
            # and the callers say so in one line rather than a traceback.
            raise AdapterStoreError(unwritable(d, exc)) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise Busy(f"{advisor}'s adapter is being trained or promoted by another process (`{mondrian()} "
                           f"status` shows its progress); try again when it has finished") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)

    def new_staging(self, advisor: str) -> Path:
        d = self.advisor_dir(advisor)
        d.mkdir(parents=True, exist_ok=True)
        # Not tempfile.mkdtemp: it makes the folder 0700, and the version it becomes would stay unreadable to the
        # other accounts of a studio sharing adapters_dir (each falling back to rag). os.mkdir applies the umask.
        while True:
            staging = d / f"{STAGING_PREFIX}{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"
            try:
                staging.mkdir(mode=0o777)
                return staging
            except FileExistsError:
                continue

    def recover(self, advisor: str) -> list[str]:
        """Remove what an interrupted commit left behind (hold the lock)."""
        d = self.advisor_dir(advisor)
        removed = []
        if not d.is_dir():
            return removed
        for p in d.iterdir():
            if p.name.startswith(STAGING_PREFIX) or p.name.startswith(f".{CURRENT}.") or \
                    (p.name.startswith(".") and p.name.endswith(".tmp")):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        p.unlink()
                removed.append(p.name)
        self.finish_promotion(advisor)
        return removed

    def _next_name(self, advisor: str) -> str:
        """Never reuses a number, even of a version pruned or deleted by hand (reports name versions)."""
        numbers = [v.number for v in self.versions(advisor)]
        for record in self.history(advisor):
            m = VERSION_RE.match(str(record.get("version", "")))
            if m:
                numbers.append(int(m.group(1)))
        return f"v{(max(numbers) + 1) if numbers else 1:04d}"

    def commit(self, advisor: str, staging: Path, decision: dict[str, Any]) -> Version:
        """Turn a complete staging folder into the next version; make it current if `decision` promotes it."""
        staging = Path(staging)
        missing = [f for f in (CONFIG_NAME, WEIGHTS_NAME, METRICS_NAME, MANIFEST_NAME) if not (staging / f).is_file()]
        if missing:
            raise AdapterStoreError(f"candidate {staging.name} is incomplete (missing {', '.join(missing)})")
        name = self._next_name(advisor)
        manifest = _read_json(staging / MANIFEST_NAME)
        manifest["version"] = name
        atomic_write_json(staging / MANIFEST_NAME, manifest)
        metrics = _read_json(staging / METRICS_NAME)
        metrics["decision"] = {**decision, "decided_at": time.time()}
        atomic_write_json(staging / METRICS_NAME, metrics)
        fsync_dir(staging)
        final = self.advisor_dir(advisor) / name
        os.rename(staging, final)  # atomic: the version appears complete or not at all
        fsync_dir(final.parent)
        testhooks.crashpoint("promoting")
        if decision.get("promoted"):
            self.switch(advisor, name)  # before the history says so: killed in between, `recover` finishes it
        self._log(advisor, {"event": "promoted" if decision.get("promoted") else "refused", "version": name,
                            "reason": decision.get("reason")})
        self.prune(advisor)
        return self.version(advisor, name)

    def finish_promotion(self, advisor: str) -> str | None:
        """A promotion killed between its version's rename and the switch of `current`: the newest version says it
        was promoted, yet `current` is an older one and no record names it. `adapters`, the history and `status`
        contradicted each other, and photos used the older version, until the next training. Finish it (hold the
        lock): switch, then record. (Killed after the switch, only its history line is missing: nothing to do.)
        Returns the version so finished, if any."""
        newest = self.unfinished_promotion(advisor)
        if newest is None:
            return None
        self.switch(advisor, newest.name)
        self._log(advisor, {"event": "promoted", "version": newest.name, "reason": newest.decision.get("reason"),
                            "finished": "after an interruption"})
        log.info("adapters: finished promoting %s/%s, interrupted before `current` was switched", advisor,
                 newest.name)
        return newest.name

    def unfinished_promotion(self, advisor: str) -> Version | None:
        """The version a promotion was killed on before `current` was switched to it (`finish_promotion`), if any."""
        versions = self.versions(advisor)
        if not versions:
            return None
        newest = versions[-1]
        current = self.current(advisor)
        if not newest.promoted or newest.rolled_back or (current is not None and current.number >= newest.number):
            return None  # rolled back on purpose (its metrics say so, whatever became of the history), or done
        # The history is written after the switch: a version it names was switched to, and whatever moved
        # `current` since (a rollback, a hand's edit) is not undone here.
        if any(newest.name in (r.get("version"), r.get("from"), r.get("to")) for r in self.history(advisor)):
            return None
        if not newest.usable():  # damaged or cut short since: switching to it would fail photos (and `rollback`)
            return None
        return newest

    def settle(self, advisor: str) -> str | None:
        """`recover`, where no training or promotion holds the advisor's adapters now (never waits). Returns why a
        promotion cut short could not be finished (a read-only adapters folder), else None: `status` sends the
        person here to finish it, and silence would leave them with nothing changed."""
        try:
            with self.lock(advisor):
                self.recover(advisor)
        except Busy:
            return None
        except (AdapterStoreError, OSError) as exc:
            with contextlib.suppress(AdapterStoreError, OSError):
                pending = self.unfinished_promotion(advisor)
                if pending is not None:
                    why = str(exc) if isinstance(exc, AdapterStoreError) else unwritable(self.advisor_dir(advisor),
                                                                                         exc)
                    return f"the promotion of {pending.name} cannot be finished: {why}"
        return None

    def switch(self, advisor: str, name: str) -> None:
        """Point `current` at version `name` with one atomic rename of a fresh symlink."""
        d = self.advisor_dir(advisor)
        target = d / name
        if not target.is_dir() or not all((target / f).is_file() for f in REQUIRED_FILES):
            raise AdapterStoreError(f"{advisor}/{name} is not a complete adapter version")
        if not (d / CURRENT).is_symlink() and (d / CURRENT).is_dir():
            self._settle_copied_current(advisor)  # a rename cannot replace a folder with the link
        tmp = d / f".{CURRENT}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(name, tmp)
        os.replace(tmp, d / CURRENT)
        fsync_dir(d)

    def rollback(self, advisor: str, base: str | None = None) -> tuple[str | None, str]:
        """Make the previous promoted version current again; returns (from, to). `base`: the configured base model's
        fingerprint; a version trained for another base model is never gone back to (its photos would all fall
        back, and the version rolled back from could not be made current again)."""
        problem = self.current_problem(advisor)
        if self._settle_copied_current(advisor) and problem and self.current(advisor) is not None:
            name = self.current_name(advisor)  # the copy was all of its version: repaired, nothing to go back from
            self._log(advisor, {"event": "rollback", "from": name, "to": name, "reason": f"current was {problem}"})
            return name, name  # type: ignore[return-value]
        current = self.current(advisor)
        if current is None or problem:  # e.g. its weights truncated: nothing sound to roll back *from*
            return self._repair_current(advisor, base)
        promoted = [v for v in self.versions(advisor) if v.number < current.number and v.promoted
                    and not v.rolled_back]
        broken = [(v.name, v.problem()) for v in promoted]
        broken = [(name, problem) for name, problem in broken if problem]
        others = [v for v in promoted if v.name not in dict(broken)]
        earlier = [v for v in others if _fits(v, base)]
        if not earlier:
            skipped = [v.name for v in others if not _fits(v, base)]
            why = (f"; {', '.join(skipped)} {'was' if len(skipped) == 1 else 'were'} trained for another base model"
                   if skipped else "")
            # An earlier promoted version passed over for its files is named with why: "no earlier promoted
            # adapter" beside a list showing one read as a contradiction.
            why += "".join(f"; {name} cannot be used: {problem}" for name, problem in broken)
            raise AdapterStoreError(f"{advisor} has no earlier promoted adapter than {current.name} to roll back "
                                    f"to (kept versions: {', '.join(v.name for v in self.versions(advisor))}{why})")
        target = earlier[-1]
        metrics = dict(current.metrics)
        metrics["decision"] = {**current.decision, "rolled_back_at": time.time()}
        atomic_write_json(current.path / METRICS_NAME, metrics)
        self.switch(advisor, target.name)
        self._log(advisor, {"event": "rollback", "from": current.name, "to": target.name})
        return current.name, target.name

    def current_problem(self, advisor: str) -> str | None:
        """Why `current` points at nothing usable, in words ("v0009, which does not exist"), or None when it is
        fine or no version was ever promoted."""
        name = self.current_name(advisor)
        pointer = self.advisor_dir(advisor) / CURRENT
        if name is None:
            promoted = [v.name for v in self.versions(advisor) if v.promoted and not v.rolled_back]
            if not promoted:
                return None
            if os.path.lexists(pointer):
                return f"nothing Mondrian can read (`{CURRENT}` is neither a link nor a copy of a version)"
            return f"nothing: `{CURRENT}` is missing (deleted, or left out by a copy), though {promoted[-1]} was promoted"
        path = self.advisor_dir(advisor) / name
        if not path.is_dir():
            return f"{name}, which does not exist"
        problem = Version(advisor, name, path, {}, {}).problem()
        if problem is None:
            return None
        return f"{name}, which is {problem}" if problem.startswith("incomplete") else f"{name}, whose {problem}"

    def repair_targets(self, advisor: str, base: str | None = None) -> list[Version]:
        """The complete promoted versions a broken `current` could point at instead (oldest first)."""
        name = self.current_name(advisor)
        return [v for v in self.versions(advisor) if v.name != name and v.promoted and not v.rolled_back
                and v.usable() and _fits(v, base)]

    def remedy(self, advisor: str) -> str:
        """What to run when `current` points at nothing usable: a rollback only where there is a version to go to."""
        if self.repair_targets(advisor):
            return (f"`{mondrian()} adapters rollback --advisor {advisor}` points it at the newest complete promoted "
                    f"version")
        return f"no other complete version is kept: train a new one with `{mondrian()} train --advisor {advisor}`"

    def _repair_current(self, advisor: str, base: str | None = None) -> tuple[str | None, str]:
        """`current` is missing, dangling or names an incomplete version: there is nothing to roll back *from*, but
        the advisor still has complete promoted versions, and the remedy the fallback reason suggests is this
        command. Point `current` at the newest of them (not one rolled back before, nor one for another base)."""
        problem = self.current_problem(advisor)
        if problem is None:
            raise AdapterStoreError(f"{advisor} has no current adapter to roll back")
        name = self.current_name(advisor)
        usable = self.repair_targets(advisor, base)
        if not usable:
            raise AdapterStoreError(f"{advisor}'s current adapter points at {problem}, and no other complete promoted "
                                    f"version is kept to go back to; train one with `{mondrian()} train --advisor "
                                    f"{advisor}`")
        target = usable[-1]
        self.switch(advisor, target.name)
        self._log(advisor, {"event": "rollback", "from": name, "to": target.name, "reason": f"current was {problem}"})
        return name, target.name

    def prune(self, advisor: str) -> list[str]:
        """Keep the newest `keep` versions, the current one, and the one a rollback would go to."""
        versions = self.versions(advisor)
        current = self.current_name(advisor)
        keep = {v.name for v in versions[-self.keep:]}
        if current:
            keep.add(current)
            cur_num = int(VERSION_RE.match(current).group(1))  # type: ignore[union-attr]
            earlier = [v for v in versions if v.number < cur_num and v.promoted and not v.rolled_back]
            if earlier:
                keep.add(earlier[-1].name)
        removed = []
        for v in versions:
            if v.name in keep:
                continue
            trash = v.path.with_name(f"{STAGING_PREFIX}pruned-{v.name}")
            try:
                os.rename(v.path, trash)  # disappears atomically, then is deleted at leisure
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                continue
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(v.name)
        return removed

    def _log(self, advisor: str, record: dict[str, Any]) -> None:
        record = {"at": time.time(), **record}
        try:
            with open(self.advisor_dir(advisor) / HISTORY, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        except OSError:
            pass
