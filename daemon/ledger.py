"""The job ledger: the only module that writes the database.

One row per photo dropped into the inbox. SQLite in WAL mode (readers such as `mondrian status` never
block the worker); every state change is one short transaction, so a SIGKILL at any moment leaves each
job in a state the next start-up can reason about. Claiming uses a single `UPDATE ... RETURNING`
statement, which SQLite (>= 3.35) and PostgreSQL both execute atomically.

With `ledger_url` the same tables live in a PostgreSQL database that several machines share (one inbox, one outbox):
a claim takes its photo with `FOR UPDATE SKIP LOCKED`, holds it for a lease the worker's heartbeat renews, and gets a
fencing token (the job's claim counter). Every write about a claimed job names the token its process holds, so a
worker that stalled past its lease and lost the job to another finds its writes refused (LeaseLost) and discards
its work. On SQLite (one machine) the run locks below still tell a live process from a dead one at once.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import itertools
import json
import logging
import operator
import os
import re
import secrets
import shlex
import shutil
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from peewee import (SQL, AutoField, BigIntegerField, BlobField, BooleanField, Case, CharField, Database, DatabaseError,
                    FloatField, IntegrityError, IntegerField, Model, OperationalError, PostgresqlDatabase,
                    SqliteDatabase, TextField, Value, fn)

from .errors import EX_TEMPFAIL
from .fsutil import NotOwn, check_own_folder, fsync_dir, lock_holder, open_own_file, pid_alive, read_own_file

QUEUED, RUNNING, DONE, FAILED, GONE = "queued", "running", "done", "failed", "gone"
STATES = (QUEUED, RUNNING, DONE, FAILED, GONE)
ACTIVE = (QUEUED, RUNNING)

log = logging.getLogger("mondrian.ledger")


class _Base(Model):
    # No database here: each Ledger queries through subclasses bound to its own (see `_bind`), so two ledgers
    # open in one process never share one, whichever thread uses them.
    class Meta:
        database = None
        legacy_table_names = False


class SchemaVersion(_Base):
    version = IntegerField()
    applied_at = FloatField()


class Job(_Base):
    id = AutoField()
    source_path = TextField(index=True)  # absolute path in the inbox when it was queued
    rel_path = TextField()  # path relative to the inbox, what a person recognises
    advisor = CharField()
    advisor_source = CharField(default="default")  # folder | default | command
    requested_mode = CharField(null=True)  # decided when the job starts (a late sidecar still counts)
    mode_source = CharField(null=True)  # sidecar | default | command
    effective_mode = CharField(null=True)
    fallbacks = TextField(null=True)  # JSON list of {from, to, reason}
    state = CharField(default=QUEUED, index=True)
    attempts = IntegerField(default=0)
    not_before = FloatField(default=0.0)  # exponential backoff for transient faults
    size = BigIntegerField(null=True)  # bytes: PostgreSQL's INTEGER stops at 2 GiB (a panorama TIFF passes it)
    mtime = FloatField(null=True)
    sha256 = CharField(null=True, index=True)
    duplicate_of = IntegerField(null=True)
    # What the report depends on besides the bytes' hash (daemon.analysis.context_key): a photo is a duplicate only
    # of a report with the same key, so new references or a new adapter give a new critique.
    context_key = CharField(null=True, index=True)
    error = TextField(null=True)
    error_kind = CharField(null=True)  # permanent | transient
    output_dir = TextField(null=True)  # reserved report folder (or failure file) before anything is moved
    report_json = TextField(null=True)
    report_html = TextField(null=True)
    grade = IntegerField(null=True)
    adapter = CharField(null=True)
    worker = CharField(null=True)  # host:pid:token of the process running it (Ledger.worker_id)
    enqueued_at = FloatField()
    started_at = FloatField(null=True)
    finished_at = FloatField(null=True)
    analysis_s = FloatField(null=True)
    # Whether Mondrian may move, rename or delete the file: only photos dropped into the inbox are its own.
    # `mondrian analyze` jobs point at the user's file wherever it lies, and it must stay there whatever happens.
    owns_file = BooleanField(default=True)
    # keep_originals (decided when it was queued): the photo stays where it was dropped, the report folder gets a
    # hard link or a copy, and a DONE job of this path, size and mtime means "already analysed" on every rescan.
    kept = BooleanField(default=False)
    lease_until = FloatField(null=True)  # a running job whose lease ended goes back to the queue (shared ledger)
    # Fencing token: +1 at every claim; writes of an older claim are refused.
    lease_token = IntegerField(default=0, constraints=[SQL("DEFAULT 0")])
    # xmp_embed: the hash of the original as the report folder holds it, the XMP written inside. The same photo
    # dropped in again from there is then known as the one analysed (`original_sha`), not as new bytes.
    embedded_sha256 = CharField(null=True, index=True)

    class Meta:
        # `claim` takes the oldest due queued job: without it, each claim sorts the whole queue.
        indexes = ((("state", "not_before", "id"), False),)


class Event(_Base):
    """Daemon heartbeats a person can read in `mondrian status` (last event, last rescan, model, ...)."""

    key = CharField(primary_key=True)
    value = TextField()
    at = FloatField()


class WorkerRow(_Base):
    """One process that runs jobs, as its heartbeat last wrote it (`mondrian workers`)."""

    id = CharField(primary_key=True)  # Ledger.worker_id()
    host = CharField()
    pid = IntegerField()
    started_at = FloatField()
    beat_at = FloatField()
    lease_seconds = FloatField()
    job_id = IntegerField(null=True)
    photo = TextField(null=True)
    claimed_at = FloatField(null=True)
    done = IntegerField(default=0)

    class Meta:
        table_name = "worker"


class _JSONField(TextField):
    """A JSON document stored as text; Python code sees dicts/lists."""

    def db_value(self, value: Any) -> str | None:
        return None if value is None else json.dumps(value, sort_keys=True, ensure_ascii=False)

    def python_value(self, value: Any) -> Any:
        return None if value is None else json.loads(value)


class Reference(_Base):
    """One photo of an advisor's reference portfolio and its profile (rag mode, LoRA training data)."""

    id = AutoField()
    advisor = CharField()
    path = TextField()  # absolute path of the reference photo
    sha256 = CharField(index=True)  # content hash: re-indexing an unchanged file is a no-op
    scores = _JSONField()  # {dimension: int 0-10}
    comments = _JSONField(null=True)  # {dimension: str} from a curator's sidecar, or None
    source = CharField()  # human (sidecar) | model (pass 1 of rag)
    model_id = CharField(null=True)  # model that derived the scores and/or the embedding
    indexed_at = FloatField()
    embedding = BlobField(null=True)  # float32 L2-normalised pooled vision features of model_id

    class Meta:
        table_name = "reference"
        indexes = ((("advisor", "path"), True),)


_PG_TYPES = (("INTEGER NOT NULL PRIMARY KEY", "SERIAL PRIMARY KEY"), (" REAL", " DOUBLE PRECISION"),
             (" BLOB", " BYTEA"))


def _ddl(db: Database, statement: str) -> None:
    """Run a frozen SQLite statement, in PostgreSQL's words for its types where it is the engine."""
    if isinstance(db, PostgresqlDatabase):
        for sqlite_word, pg_word in _PG_TYPES:
            statement = statement.replace(sqlite_word, pg_word)
    db.execute_sql(statement)


def _columns(db: Database, table: str) -> set[str]:
    return {c.name for c in db.get_columns(table)}


def _create_reference_table(db: Database) -> None:
    # Frozen SQL rather than create_tables(): later edits of the Reference class must come as new migrations.
    for statement in (
        'CREATE TABLE IF NOT EXISTS "reference" ("id" INTEGER NOT NULL PRIMARY KEY, '
        '"advisor" VARCHAR(255) NOT NULL, "path" TEXT NOT NULL, "sha256" VARCHAR(255) NOT NULL, '
        '"scores" TEXT NOT NULL, "comments" TEXT, "source" VARCHAR(255) NOT NULL, "model_id" VARCHAR(255), '
        '"indexed_at" REAL NOT NULL, "embedding" BLOB)',
        'CREATE UNIQUE INDEX IF NOT EXISTS "reference_advisor_path" ON "reference" ("advisor", "path")',
        'CREATE INDEX IF NOT EXISTS "reference_sha256" ON "reference" ("sha256")',
    ):
        _ddl(db, statement)


def _add_job_owns_file(db: Database) -> None:
    # A fresh ledger already has the column (the first migration creates today's Job table): add it only when
    # missing. Existing rows made by `start_direct` (enqueued and started at the very same instant; an inbox job
    # is claimed later than it was queued) are `mondrian analyze` jobs, whose files Mondrian does not own.
    # (A PostgreSQL ledger is always made with today's Job table, so these additions only ever run on SQLite.)
    if "owns_file" not in _columns(db, "job"):
        db.execute_sql('ALTER TABLE "job" ADD COLUMN "owns_file" INTEGER NOT NULL DEFAULT 1')
        db.execute_sql('UPDATE "job" SET "owns_file" = 0 WHERE "enqueued_at" = "started_at"')


def _add_job_context_and_kept(db: Database) -> None:
    # Earlier reports keep a NULL key: a photo dropped again after the upgrade is analysed again once (linking its
    # earlier report), since what those were analysed with (references, model) was never recorded.
    columns = _columns(db, "job")
    if "context_key" not in columns:
        db.execute_sql('ALTER TABLE "job" ADD COLUMN "context_key" VARCHAR(255)')
    if "kept" not in columns:
        db.execute_sql('ALTER TABLE "job" ADD COLUMN "kept" INTEGER NOT NULL DEFAULT 0')
    db.execute_sql('CREATE INDEX IF NOT EXISTS "job_context_key" ON "job" ("context_key")')
    # Every rescan asks, per photo kept in the inbox, whether that path is done: without an index, a scan each.
    db.execute_sql('CREATE INDEX IF NOT EXISTS "job_source_path" ON "job" ("source_path")')


def _index_jobs(db: Database) -> None:
    # Queueing checks the path's earlier jobs, and status the paths of failed photos: without an index each is
    # a scan of every job ever. Claiming takes the oldest due queued job: without one, each claim sorts the whole
    # queue. A fresh ledger has both already (the first migration creates today's Job table).
    db.execute_sql('CREATE INDEX IF NOT EXISTS "job_source_path" ON "job" ("source_path")')
    db.execute_sql('CREATE INDEX IF NOT EXISTS "job_state_not_before_id" ON "job" ("state", "not_before", "id")')
    _index_duplicates(db)


def _index_duplicates(db: Database) -> None:
    # Status counts duplicates: a partial index holds only them, instead of a scan of every job.
    db.execute_sql('CREATE INDEX IF NOT EXISTS "job_duplicates" ON "job" ("duplicate_of") '
                   'WHERE "duplicate_of" IS NOT NULL')


def _add_leases_and_workers(db: Database) -> None:
    # A fresh ledger has the lease columns already (the first migration creates today's Job table).
    columns = _columns(db, "job")
    if "lease_until" not in columns:
        _ddl(db, 'ALTER TABLE "job" ADD COLUMN "lease_until" REAL')
    if "lease_token" not in columns:
        db.execute_sql('ALTER TABLE "job" ADD COLUMN "lease_token" INTEGER NOT NULL DEFAULT 0')
    # One waiting or running job per inbox file, whichever node scanned it: the engine refuses a second, so two nodes
    # rescanning one shared inbox cannot queue a photo twice. `mondrian analyze` jobs (not Mondrian's file) may share
    # a path: two people may analyse one file at once.
    # A ledger kept by an older Mondrian should never hold two, but one that does must still open: the later ones
    # are set aside (the earliest job of the file carries on), rather than the index refusing to be made.
    db.execute_sql('UPDATE "job" SET "state" = \'gone\', "error" = \'a second waiting job of the same file, set '
                   'aside when Mondrian began keeping one per file\' WHERE "state" IN (\'queued\', \'running\') '
                   'AND "owns_file" AND "id" NOT IN (SELECT MIN("id") FROM "job" '
                   'WHERE "state" IN (\'queued\', \'running\') AND "owns_file" GROUP BY "source_path")')
    db.execute_sql('CREATE UNIQUE INDEX IF NOT EXISTS "job_active_source" ON "job" ("source_path") '
                   'WHERE "state" IN (\'queued\', \'running\') AND "owns_file"')
    db.create_tables([_bind(WorkerRow, db)])


def _add_job_embedded_sha256(db: Database) -> None:
    # A fresh ledger has the column already (the first migration creates today's Job table).
    if "embedded_sha256" not in _columns(db, "job"):
        _ddl(db, 'ALTER TABLE "job" ADD COLUMN "embedded_sha256" VARCHAR(255)')
    _ddl(db, 'CREATE INDEX IF NOT EXISTS "job_embedded_sha256" ON "job" ("embedded_sha256")')


def _widen_job_size(db: Database) -> None:
    # PostgreSQL's INTEGER is 32-bit: a photo over 2 GiB could not be queued on a shared ledger, and every rescan
    # tried again. SQLite's INTEGER holds 64 bits already; a fresh ledger has BIGINT (the first migration).
    if isinstance(db, PostgresqlDatabase):
        db.execute_sql('ALTER TABLE "job" ALTER COLUMN "size" TYPE BIGINT')


MODELS: list[type[Model]] = [SchemaVersion, Job, Event, Reference, WorkerRow]
_M = TypeVar("_M", bound=Model)


def _bind(model: type[_M], db: Database) -> type[_M]:
    """A subclass of `model` on `db` only: rows it returns are still instances of `model`.

    peewee's `Model.bind` and `bind_ctx` re-point the class itself, which every Ledger in the process shares."""
    meta = type("Meta", (), {"database": db, "table_name": model._meta.table_name})
    return type(model.__name__, (model,), {"Meta": meta, "__module__": model.__module__})  # type: ignore[return-value]


# Each migration moves the schema from version i to i+1. Append, never edit: a user's ledger may be at any step.
MIGRATIONS: list[Callable[[Database], None]] = [
    lambda db: db.create_tables([_bind(Job, db), _bind(Event, db)]),
    _create_reference_table,
    _add_job_owns_file,
    _add_job_context_and_kept,
    _index_jobs,
    _add_leases_and_workers,
    _add_job_embedded_sha256,
    _widen_job_size,
]
SCHEMA_VERSION = len(MIGRATIONS)


NODE_EVENT = "node:"  # + a worker's id: where that node reaches the shared outbox (`announce`)
_MIGRATION_LOCK = 0x4D6F6E6472690001  # pg advisory lock keys (bigint), "Mondri" + a number
TRAINING_LOCK = 0x4D6F6E6472690002
_RUN_TOKEN = re.compile(r"^[0-9a-f]{16}$")
_RUN_LOCK_FILE = re.compile(r"^(?:[0-9a-f]{16}\.lock|\.[0-9a-f]{16}\.new)$")  # the sweep removes nothing else
_NEW_LOCK_GRACE_S = 60.0  # a lock file is created under a hidden name and renamed once it is locked


@dataclass
class Counts:
    by_state: dict[str, int]  # a failure superseded by a later job of the same file is not in "failed"
    duplicates: int
    resolved: int = 0  # failures whose file was put back (or retried) and then analysed
    superseded: frozenset[int] = frozenset()  # ids of the failures not counted (see `recent_failures`)


# SQLite result codes that come from outside the data (the disk, the file, another process): a write that fails
# with one of them will succeed once the fault clears, so it is waited out, never blamed on a photo.
_OUTSIDE_FAULTS = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_READONLY", "SQLITE_IOERR",
                   "SQLITE_CANTOPEN", "SQLITE_PROTOCOL", "SQLITE_PERM")
RETRY_MAX_SECONDS = 30.0
# A job last claimed this much later than now was claimed by a clock that was ahead (see `Ledger._due`); machines
# sharing a ledger may disagree by a few seconds, which this leaves alone.
CLOCK_SLACK_S = 60.0
FAULT_NOTE = "ledger-fault.json"  # in var/: see FaultNote
NOTE_BYTES = 4096
_F = TypeVar("_F", bound=Callable[..., Any])


def _check_postgres_driver() -> None:
    """The optional extra, checked before peewee is handed the URL (it would raise ImproperlyConfigured: a
    traceback), so that the one line says how to install it."""
    try:
        import psycopg  # noqa: F401
        return
    except ImportError:
        pass
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        raise LedgerUnavailable("ledger_url names a PostgreSQL ledger, but its driver is not installed: run "
                                "`pip install 'mondrian[postgres]'` (or `pip install 'psycopg[binary]'`) in "
                                "Mondrian's environment (with the Makefile: .venv/bin/pip install -e '.[postgres]')") from None


class LedgerUnavailable(RuntimeError):
    """A write could not be made (disk full, locked, read-only, deleted) and the daemon is stopping, or the caller
    could not wait longer (`Ledger.bounded`)."""


class _BadLayout(Exception):
    """The ledger's tables are not those its schema version promises (see `Ledger._check_layout`)."""


class TwinFirst(RuntimeError):
    """Another job of the same photo and analysis context published (or is publishing) its report first."""

    def __init__(self, twin: Any):
        super().__init__(f"job {twin.id} ({twin.rel_path}) has the same photo and context")
        self.twin = twin


class LeaseLost(RuntimeError):
    """This process's claim on a job is no longer the current one (its lease ended and another worker claimed the
    photo): the write was refused, and whatever this process made of the job must be discarded."""


def _shown_url(url: str) -> str:
    """The ledger URL without its password, for logs and messages."""
    from .config import shown_url

    return shown_url(url)


def outside_fault(exc: BaseException) -> str | None:
    """The reason, if `exc` is a fault outside the data that waiting can clear; None for anything else.

    The chain is followed: a COMMIT that fails on a full disk ends the transaction, so the ROLLBACK that
    follows raises "no transaction is active" with the real cause as its context."""
    seen: BaseException | None = exc
    while seen is not None:
        orig = getattr(seen, "orig", None) or seen
        if (getattr(orig, "sqlite_errorname", "") or "").startswith(_OUTSIDE_FAULTS):
            return str(orig)
        # psycopg: the server is unreachable, restarting, or out of connections; a deadlock or a serialisation
        # conflict between nodes. All clear by themselves.
        if type(orig).__module__.startswith("psycopg") and any(
                k.__name__ in ("OperationalError", "InterfaceError") for k in type(orig).__mro__):
            return str(orig).strip() or type(orig).__name__
        seen = seen.__context__
    return None


def _advice(reason: str) -> str:
    low = reason.lower()
    if "full" in low or "no space left" in low:
        return "Free some space on the disk that holds it (and Mondrian's var/ folder)."
    if "locked" in low or "busy" in low:
        return "Another program holds it locked (an open `sqlite3` shell, a backup tool?): close it."
    return ("Make it and its folder writable for the user that runs Mondrian (check `ls -l`, `lsattr`, "
            "`chattr -i`, and that its disk is mounted read-write).")


def _set_aside(path: Path) -> str:
    """The shell commands that move a damaged ledger out of the way, with its -wal and -shm (an old log left beside
    a new ledger would be replayed into it)."""
    parts = ("", "-wal", "-shm")
    # A name no earlier incident left: `mv` onto one would replace that ledger, or fail onto a folder.
    aside = next(f"{path}.broken{n}" for n in ("", *(f"-{i}" for i in range(2, 10_000)))
                 if not any(os.path.lexists(f"{path}.broken{n}{s}") for s in parts))
    # The -wal and -shm only where they are when it is pasted: SQLite removes them when it closes the ledger.
    moves = [f"mv {shlex.quote(str(path))} {shlex.quote(aside)}"]
    moves += [f"{{ [ ! -e {shlex.quote(f'{path}{s}')} ] || mv {shlex.quote(f'{path}{s}')} {shlex.quote(f'{aside}{s}')}; }}"
              for s in parts[1:] if os.path.lexists(f"{path}{s}")]
    return "; ".join(moves)


_FRESH = ("and start Mondrian again: it begins a new, empty ledger. The reports and failure records already in "
          "the outbox stay where they are and outbox/index.html still lists them, but the new ledger does not know "
          "them: a photo dropped again is critiqued again, and an old failure comes back by moving its photo from "
          "outbox/failed/ into the inbox, not by `retry`)")


def ledger_problem(path: Path, exc: BaseException) -> str:
    """Why the ledger at `path` cannot be opened, and what to do: one line for the person reading the log."""
    orig = getattr(exc, "orig", None) or exc
    name = getattr(orig, "sqlite_errorname", "") or ""
    fresh = _FRESH
    if os.path.lexists(path) and not os.path.isfile(path):
        kind = "a folder" if os.path.isdir(path) else "not a regular file"
        return (f"the ledger {path} is {kind}, not a SQLite database file: move it out of the way "
                f"({_set_aside(path)}) {fresh}")
    if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")) or (isinstance(exc, DatabaseError) and
                                                                not isinstance(exc, OperationalError)):
        return (f"the ledger {path} is not a SQLite database, or is damaged ({orig}): move it aside "
                f"({_set_aside(path)}) {fresh}")
    reason = str(orig)
    return f"cannot open the ledger {path} ({reason}). {_advice(reason)}"


def writes(method: _F) -> _F:
    """Marks a Ledger method that writes: it goes through `Ledger._write`, the one place faults are handled."""

    @functools.wraps(method)
    def wrapper(self: "Ledger", *args: Any, **kwargs: Any) -> Any:
        return self._write(method.__name__, lambda: method(self, *args, **kwargs))

    return wrapper  # type: ignore[return-value]


class FaultNote:
    """A small file that tells `mondrian status` (another process) the ledger cannot be written.

    It is allocated once at start-up and then only overwritten in place, so it can still be written when the
    disk is full or the ledger itself is the thing that cannot be written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd = open_own_file(self.path)  # never through a link: it would overwrite someone else's file
        os.pwrite(self._fd, b" " * NOTE_BYTES, 0)
        os.fsync(self._fd)

    def write(self, note: dict[str, Any] | None) -> None:
        data = json.dumps(note, ensure_ascii=True).encode() if note else b""
        try:
            os.pwrite(self._fd, data[:NOTE_BYTES].ljust(NOTE_BYTES), 0)
        except OSError as exc:  # even the note cannot be written: the log still says it
            log.debug("could not write %s: %s", self.path, exc)

    @staticmethod
    def read(path: Path) -> dict[str, Any] | None:
        try:
            text = read_own_file(path)  # a link or a FIFO put there is not the note
            return json.loads(text) if text else None
        except (OSError, ValueError):
            return None


FORGET_WORKERS_AFTER_S = 86400.0


def _how_to_update() -> str:
    from .resources import checkout_root

    root = checkout_root()
    return (f"in {root}: git pull, then make install" if root else
            "pipx upgrade mondrian, or pip install -U with the source it was installed from")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (EPERM): it exists
        return True
    return True


HOME_EVENT = "home"  # the home this SQLite ledger last served (Ledger.follow_home)
_COMPANIONS = ("-wal", "-shm")  # SQLite's write-ahead log and its shared index, beside the database in WAL mode


_SHM_FDS: dict[str, int] = {}


def _shm_fd(db: Path) -> int:
    """A descriptor of the -shm file that this process never closes. SQLite keeps its WAL locks there as POSIX
    record locks, which belong to the process: closing *any* descriptor of the file drops all of them, and
    SQLite's connections then block or read a log another connection is rewriting (a daemon that opened and
    closed the file to look at it hung in its next write)."""
    key = f"{db}-shm"
    if key not in _SHM_FDS:
        _SHM_FDS[key] = os.open(key, os.O_RDONLY | os.O_CLOEXEC)
    return _SHM_FDS[key]


def _wal_cut(db: Path) -> bool:
    """Whether the write-ahead log beside `db` is shorter than its index says it is: another program emptied or cut
    it. The index (-shm) begins with two copies of its header, equal when no writer is mid-update; its page size is
    the u16 at byte 14 and its count of valid frames the u32 at byte 16, in the machine's byte order (SQLite's
    wal.c). Each frame is a 24-byte header and one page, after the log's 32-byte header."""
    try:
        fd = _shm_fd(db)
        before = os.pread(fd, 96, 0)
        size = os.path.getsize(f"{db}-wal")
        after = os.pread(fd, 96, 0)
    except OSError:
        return False  # gone or unreadable: `replaced` tells those apart
    if len(before) < 96 or before != after or before[:48] != before[48:96] or not before[12]:
        return False  # not initialised, or a writer is updating it: nothing to conclude now
    page = int.from_bytes(before[14:16], sys.byteorder)
    page = 65536 if page == 1 else page
    frames = int.from_bytes(before[16:20], sys.byteorder)
    return frames > 0 and size < 32 + frames * (24 + page)


def _in_wal_mode(db: Path) -> bool:
    """Whether the database file's header says WAL (file format versions 2): only then must a -wal and -shm be there
    while it is open (on a disk without shared memory SQLite keeps the rollback journal, which comes and goes)."""
    try:
        with open(db, "rb") as fh:
            header = fh.read(20)
    except OSError:
        return False
    return len(header) == 20 and header[18:20] == b"\x02\x02"


def _refuse_a_ledger_the_daemon_lost(db: Path, daemon_lock: Path, inbox: Path | None = None) -> None:
    """Refuse to open a ledger that the running daemon no longer has at its place: its file, -wal or -shm was
    deleted, or another database was put in its place (a backup restored with `mv` or the Finder).

    Opening it would join the live log and index to a file they do not belong to: a new, empty ledger (which the
    daemon then takes for a replacement, and `status` shows an empty history), a new, empty log (reads fail with
    "disk I/O error", and a write such as `retry`'s lands where the daemon never looks), or another database that
    this process, closing last, checkpoints the daemon's log into and then deletes that log (the daemon's records are
    lost, and the restored backup is changed). The daemon notices within seconds, writes back what it holds and
    restarts: the command works again then."""
    if not os.path.lexists(db):
        what = f"the ledger {db} is not there"
    elif _in_wal_mode(db) and (gone := [f"{db.name}{s}" for s in _COMPANIONS if not os.path.lexists(f"{db}{s}")]):
        what = f"{' and '.join(gone)} beside the ledger {db} {'is' if len(gone) == 1 else 'are'} not there"
    else:
        what = ""
    holder = lock_holder(daemon_lock)
    if holder is None and what and inbox is not None and not os.path.lexists(daemon_lock.parent):
        # Its whole folder deleted (`rm -rf var`): the daemon's lock went with it, but it still holds its inbox's.
        holder = lock_holder(inbox / daemon_lock.name)
    if holder is None:
        return  # no daemon holds it: SQLite makes what is missing (a log deleted after a clean stop held nothing)
    if not what:
        opened = _opened_by(db, holder)
        if opened is None or opened == _file_identity(db):
            return
        what = f"the ledger {db} is not the file Mondrian has open (another file was put in its place)"
    who = f"pid {holder}" if holder > 0 else "its pid unknown"
    raise LedgerUnavailable(f"{what} while Mondrian ({who}) runs: Mondrian writes back the ledger it holds (keeping "
                            f"any other file found there aside) and starts again; run the command again in a minute")


def _opened_by(db: Path, pid: int) -> tuple[int, int] | None:
    """The database file (device, inode) that process `pid` opened as `db`, as its live run lock records it."""
    runs = db.with_name(db.name + ".runs")
    try:
        entries = [e for e in os.scandir(runs) if e.name.endswith(".lock") and _RUN_LOCK_FILE.match(e.name)]
    except OSError:
        return None
    for entry in entries:
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            lines = os.pread(fd, 200, 0).decode(errors="replace").split()
            if len(lines) < 2 or lines[0] != str(pid):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                continue  # not held: a dead process's, whose pid the daemon has now
            except BlockingIOError:
                pass
            dev, _, ino = lines[1].partition(":")
            if dev.isdigit() and ino.isdigit():
                return int(dev), int(ino)
        except OSError:
            continue
        finally:
            os.close(fd)
    return None


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _writable(db: Path) -> bool:
    """Whether this user may write the database and make its log beside it (a read-only disk says no, even to root)."""
    return os.access(db, os.W_OK) and os.access(db.parent, os.W_OK | os.X_OK)


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class Ledger:
    @classmethod
    def for_config(cls, cfg: Any, **kwargs: Any) -> "Ledger":
        """The ledger `cfg` names: the shared one at `ledger_url` if set, else the SQLite file at `db_path`."""
        if not cfg.ledger_url:
            # With var/ deleted whole, only the inbox's lock tells that a daemon runs; a home that never ran (no index
            # yet) sharing its inbox with another home's daemon is told so by `run` itself, not here.
            served = kwargs.get("stop") is None and (Path(cfg.outbox) / "index.html").exists()
            _refuse_a_ledger_the_daemon_lost(Path(cfg.db_path), Path(cfg.var_dir) / "daemon.lock",
                                             Path(cfg.inbox) if served else None)
        ledger = cls(cfg.db_path, url=cfg.ledger_url or None, lease_seconds=cfg.lease_seconds, **kwargs)
        if ledger.shared:
            # Only photos this Mac can reach: another Mac may mount the share elsewhere (`/Volumes/Studio-1`), and an
            # API upload waits in its own machine's spool (named by its var/'s tag: homes of two Macs may have one
            # path). Claimed here, such a photo failed as "no longer the inbox" (or gone) for good.
            from .api.spool import spool_tag, untagged_slots

            tag = spool_tag(Path(cfg.var_dir))
            # (and this Mac's uploads queued before their folders were tagged, each by its own folder)
            ledger._claim_under = (os.path.join(str(cfg.inbox), ""), os.path.join(str(cfg.spool_dir), tag),
                                   *(os.path.join(str(p), "") for p in untagged_slots(Path(cfg.spool_dir), tag)))
        try:
            ledger.follow_home(cfg.home, cfg.inbox, cfg.outbox)
        except BaseException:
            ledger.close()
            raise
        return ledger

    @classmethod
    @contextlib.contextmanager
    def for_reading(cls, cfg: Any) -> Iterator["Ledger"]:
        """The ledger `cfg` names, for a command that only reads it (`status`); `read_only_copy` is True on what it
        yields when that is a private copy.

        SQLite cannot open a WAL database that this user may not write while no process holds it open: its shared
        index (-shm) must be made first. A home on a disk mounted read-only, another account's home, or `chmod
        555 var` then showed no status at all, only advice. Where no daemon writes the ledger, the database and its
        log are copied into a private folder and read there (the log replayed into the copy, the original left as
        it is), so status still shows what the ledger holds. While a daemon runs, its index is there to be read and
        the ledger itself is opened."""
        try:
            ledger = cls.for_config(cfg)
        except LedgerUnavailable:
            db = Path(cfg.db_path)
            if (cfg.ledger_url or not os.path.isfile(db) or _writable(db)
                    or lock_holder(Path(cfg.var_dir) / "daemon.lock") is not None):
                raise
            with tempfile.TemporaryDirectory(prefix="mondrian-ledger-") as tmp:
                copy = Path(tmp) / db.name
                try:
                    shutil.copyfile(db, copy)
                    if os.path.isfile(f"{db}-wal"):
                        shutil.copyfile(f"{db}-wal", f"{copy}-wal")
                except OSError:
                    raise LedgerUnavailable(f"the ledger {db} cannot be read by this user either: run the command "
                                            f"as the user that runs Mondrian") from None
                ledger = cls(copy)
                try:
                    # Where it stands, not where it was copied to: its run locks (which photo is live) and the home
                    # it follows are the original's.
                    ledger.path = db
                    ledger.follow_home(cfg.home, cfg.inbox, cfg.outbox)
                    ledger.read_only_copy = True
                    yield ledger
                finally:
                    ledger.close()
            return
        try:
            yield ledger
        finally:
            ledger.close()

    read_only_copy = False

    def __init__(self, path: Path, *, url: str | None = None, lease_seconds: float = 60.0,
                 stop: threading.Event | None = None, note: Path | None = None):
        """`stop` (the daemon's): a write that fails for a reason outside the data (disk full, locked by another
        process, read-only or unreadable file) is retried with backoff until it succeeds or `stop` is set, so
        nothing is lost and no job is blamed. Without it (the CLI) such a write fails at once. `note`: a
        FaultNote file kept up to date for `mondrian status`."""
        self.path = Path(path)  # with a shared ledger, still where this node keeps its run locks (`runs_dir`)
        self.url = url
        self.shared = url is not None
        self.lease_seconds = lease_seconds
        # Jobs this process claimed: id -> (fencing token, photo, claimed at). Every write about one names its token.
        self._held: dict[int, tuple[int, str, float]] = {}
        # Claims found stale: every later write about those jobs is refused too, until this process claims one again.
        self._stale: dict[int, int] = {}
        self._claim_under: tuple[str, ...] = ()  # folders whose jobs this process may claim (a shared ledger)
        self._held_lock = threading.Lock()
        self._done = 0
        self._started_at = time.time()
        self._stop = stop
        self._fault: dict[str, Any] | None = None
        self._fault_lock = threading.Lock()
        self.damaged: str | None = None  # why the daemon stopped: the SQLite file was found damaged while it ran
        self._note: FaultNote | None = None
        self._patience = threading.local()  # `bounded`: how long a write on this thread may wait out a fault
        self._swept = False  # dead workers' rows are forgotten at this process's first heartbeat
        # The daemon waits locks out itself, a few seconds at a time, so a stop request is never held up by
        # a lock another process keeps.
        busy_ms = 2000 if stop is not None else 30000
        if url is not None:
            _check_postgres_driver()
            # FLOAT as double precision: PostgreSQL's REAL (4 bytes) would round every timestamp to minutes.
            self.db: Database = PostgresqlDatabase(url, prefer_psycopg3=True, field_types={"FLOAT": "DOUBLE PRECISION"},
                                                   connect_timeout=10, application_name="mondrian")
        else:
            self.db = SqliteDatabase(
                str(self.path),
                pragmas={"journal_mode": "wal", "synchronous": "full", "busy_timeout": busy_ms,
                         "foreign_keys": 1},
                timeout=busy_ms / 1000,
                check_same_thread=False,
            )
        self.SchemaVersion = _bind(SchemaVersion, self.db)
        self.Job = _bind(Job, self.db)
        self.Event = _bind(Event, self.db)
        self.Reference = _bind(Reference, self.db)
        self.Worker = _bind(WorkerRow, self.db)
        self._run: tuple[int, Path, str] | None = None  # (fd, file, worker id) of the run lock this process holds
        if url is not None:
            self._open_shared(url, note)
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(self.path) and not os.path.isfile(self.path):
                raise IsADirectoryError(self.path)  # a folder or a pipe: SQLite's own error would mislead
            self._note = FaultNote(note) if note is not None else None
            self.db.connect(reuse_if_open=True)
            self._migrate()
            self._check_layout()
            if stop is not None:
                self._probe()
            st = os.stat(self.path)
        except LedgerUnavailable:
            self.db.close()
            raise
        except NotOwn as exc:
            self.db.close()
            raise LedgerUnavailable(str(exc)) from None
        except _BadLayout as exc:
            self.db.close()  # first: its -wal and -shm go with it, and the advice names only the files left
            raise LedgerUnavailable(
                f"the ledger {self.path} is not laid out as this Mondrian (schema {SCHEMA_VERSION}) expects: {exc}. "
                f"Another program (or an edit by hand) changed it: put back a copy saved before that, or move it "
                f"aside ({_set_aside(self.path)}) {_FRESH}") from None
        except (DatabaseError, OSError) as exc:  # DatabaseError: OperationalError, and a damaged or foreign file
            self.db.close()
            raise LedgerUnavailable(ledger_problem(self.path, exc)) from None
        self._identity: tuple[int, int] | None = (st.st_dev, st.st_ino)
        # The log and its index belong to the database as much as the file: while this process has them open, SQLite
        # never makes them anew, so one gone or another file in its place means someone deleted it ("just a temp
        # file"): the latest changes are then only in this process, and another process opening the ledger would
        # make a new, empty log beside the live one.
        companions = {suffix: _file_identity(Path(f"{self.path}{suffix}")) for suffix in _COMPANIONS}
        self._companions: dict[str, tuple[int, int]] = {k: v for k, v in companions.items() if v is not None}

    def _open_shared(self, url: str, note: Path | None) -> None:
        self._identity = None
        self._companions = {}
        try:
            self._note = FaultNote(note) if note is not None else None
            self.db.connect(reuse_if_open=True)
            self._migrate()
            if self._stop is not None:
                self._probe()
        except LedgerUnavailable:
            self.db.close()
            raise
        except NotOwn as exc:
            self.db.close()
            raise LedgerUnavailable(str(exc)) from None
        except (DatabaseError, OSError) as exc:
            self.db.close()
            why = " ".join(str(exc).split())  # psycopg's messages span lines
            raise LedgerUnavailable(f"cannot open the shared ledger {_shown_url(url)} ({why}): check "
                                    f"that the PostgreSQL server is running and reachable from this machine, and "
                                    f"that ledger_url names an existing database and a user allowed to create "
                                    f"tables in it (a password holding @, :, / or ? is written percent-encoded in "
                                    f"the URL: @ as %40)") from None

    def _tx(self) -> Any:
        """A write transaction: on SQLite it takes the write lock at once (no deadlock between two upgraders)."""
        return self.db.atomic("IMMEDIATE") if not self.shared else self.db.atomic()

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads that all see one moment of the ledger, for `status`: counted and listed query by query, a photo
        that starts or finishes in between is counted in one state and listed in another (running 0, one listed
        running; queued below zero). SQLite's deferred transaction keeps the first read's WAL snapshot; PostgreSQL
        needs REPEATABLE READ for that. Only reads belong in it."""
        with self.db.atomic(isolation_level="REPEATABLE READ") if self.shared else self.db.atomic("DEFERRED"):
            yield

    @property
    def where(self) -> str:
        """The ledger, as a person would name it (the password left out)."""
        return _shown_url(self.url) if self.url else str(self.path)

    def _probe(self) -> None:
        """A real write at start-up: a read-only or immutable ledger opens without complaint and would only
        fail at the first write. A lock held by another process is waited out like any write."""
        record = lambda: self._put_event("opened_by", f"{socket.gethostname()}:{os.getpid()}")  # noqa: E731
        try:
            record()
        except OperationalError as exc:
            name = getattr(getattr(exc, "orig", None), "sqlite_errorname", "")
            if not name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
                raise
            self._write("start-up", record)

    # -- faults outside the data ----------------------------------------------------------------
    @contextlib.contextmanager
    def bounded(self, seconds: float) -> Iterator[None]:
        """Writes on this thread inside the block wait out a fault (a full disk, a lock another program holds)
        for `seconds` at most, then raise LedgerUnavailable: a client waiting for an answer gets one instead of a
        request that hangs until the fault ends. The daemon's own writes wait as long as it takes."""
        self._patience.until = time.monotonic() + seconds
        try:
            yield
        finally:
            self._patience.until = None

    def _write(self, what: str, do: Callable[[], Any]) -> Any:
        delay = 0.25
        failed = False
        while True:
            try:
                result = do()
            except OperationalError as exc:
                reason = outside_fault(exc)
                # Inside a caller's transaction the caller's own write retries the whole transaction.
                if reason is None or self.db.in_transaction():
                    raise
                if self._stop is None:  # a command: it says so once and stops; nothing waits for the ledger
                    raise LedgerUnavailable(f"the ledger {self.where} cannot be written ({reason}). "
                                            f"{_advice(reason)} Then run the command again.") from exc
                self._set_fault(reason, what)
                if self.shared:  # a broken connection is not reused: the next try opens a new one
                    try:
                        self.db.close()
                    except Exception:  # closing a connection the server dropped may fail too
                        pass
                failed = True
                if self._stop.is_set():
                    raise LedgerUnavailable(f"the ledger {self.path} cannot be written ({reason})") from exc
                until = getattr(self._patience, "until", None)
                if until is not None and time.monotonic() >= until:
                    advice = "Check that the PostgreSQL server is running and reachable." if self.shared else \
                        _advice(reason)
                    raise LedgerUnavailable(f"the ledger {self.where} cannot be written ({reason}). {advice}") from exc
                self._stop.wait(delay if until is None else min(delay, until - time.monotonic()))
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                continue
            except DatabaseError as exc:
                self.found_damage(exc)
                raise
            if failed:  # only a write that failed proves it by succeeding (a no-op UPDATE writes nothing)
                self._clear_fault()
            return result

    def found_damage(self, exc: BaseException) -> None:
        """Raises LedgerUnavailable, and stops the daemon, if `exc` says the SQLite file is damaged (another program
        emptied its log, or wrote into it): every later read and write would fail the same way, each with a
        traceback, once a second, for ever. The daemon stops with the line that says what to do, as at a start."""
        orig = getattr(exc, "orig", None) or exc
        name = getattr(orig, "sqlite_errorname", "") or ""
        if not name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")) or self._stop is None:
            return
        self.stop_if_log_cut()  # the usual cause: its log emptied by another program
        with self._fault_lock:
            first, self.damaged = self.damaged is None, self.damaged or ledger_problem(self.path, exc)
        if first:
            log.error("%s. Mondrian stops (the photos stay where they are)", self.damaged)
        self._stop.set()
        raise LedgerUnavailable(self.damaged) from exc

    def _set_fault(self, reason: str, what: str) -> None:
        if "disk i/o error" in reason.lower():  # a short read of a log that was cut, not a disk to fix
            self.stop_if_log_cut()
        with self._fault_lock:
            if self._fault is not None and self._fault["reason"] == reason:
                return
            self._fault = {"reason": reason, "since": (self._fault or {}).get("since", time.time()),
                           "pid": os.getpid()}
            note = self._fault
        advice = ("Check that the PostgreSQL server is running and reachable." if self.shared else _advice(reason))
        log.error("the ledger %s cannot be written (%s, while recording %s). %s Mondrian waits and carries on "
                  "by itself once it can write again; nothing is lost meanwhile.", self.where, reason, what, advice)
        if self._note is not None:
            self._note.write(note)

    def _clear_fault(self) -> None:
        with self._fault_lock:
            if self._fault is None:
                return
            since, self._fault = self._fault["since"], None
        log.warning("the ledger can be written again (after %.0f s); carrying on", time.time() - since)
        if self._note is not None:
            self._note.write(None)

    def replaced(self) -> str | None:
        """Why the file at `path` is no longer the database this Ledger writes (deleted, or replaced), else None.

        SQLite in WAL mode keeps writing to a deleted file without an error; what it holds would be lost at stop."""
        if self._identity is None:
            return None  # a shared ledger: the server keeps it
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return f"{self.path} was deleted while Mondrian was using it"
        except OSError as exc:
            return f"{self.path} cannot be looked at ({exc.strerror or exc})"
        if (st.st_dev, st.st_ino) != self._identity:
            return f"{self.path} was replaced by another file while Mondrian was using it"
        for suffix, ident in self._companions.items():
            now = _file_identity(Path(f"{self.path}{suffix}"))
            if now != ident:
                what = "deleted" if now is None else "replaced by another file"
                return (f"the ledger {self.path} lost its {self.path.name}{suffix} file ({what} while Mondrian was "
                        f"using it; it holds the latest changes)")
        self.stop_if_log_cut()
        return None

    def stop_if_log_cut(self) -> None:
        """Ends this daemon at once if another program emptied or cut the ledger's log (`: > ledger.db-wal`).

        Its latest changes are gone with it, and every read of them fails ("disk I/O error", "file is not a
        database"). Worse, closing the ledger would copy the missing pages, read as zeros, into the database file
        itself and damage it for good. So the process ends without closing it: the next start finds the file as
        it was at its last checkpoint, and recovers from there as after a crash (photos still in the inbox are
        queued again; published reports stay in the outbox). launchd and systemd start it again (exit 75)."""
        if self._identity is None or self._stop is None or not _wal_cut(self.path):
            return
        log.error("the ledger's log %s-wal was emptied or cut by another program while Mondrian was using it: "
                  "its latest changes are gone. Mondrian stops at once, without closing the ledger (closing it "
                  "would copy the missing pages into %s and damage it); the next start carries on from the ledger's "
                  "last checkpoint (launchd and systemd start it again; otherwise run it again)", self.path,
                  self.path.name)
        logging.shutdown()
        os._exit(EX_TEMPFAIL)

    def rescue(self) -> Path:
        """Write what the open (deleted or replaced) database holds back to `path`, through SQLite's backup API.
        A database found at `path` meanwhile is moved aside whole; returns where it went (else `path`). Call it
        when no other thread writes any more."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.replaced-{stamp}")
        tmp = self.path.with_name(f".{self.path.name}.rescue-{os.getpid()}")
        self.path.parent.mkdir(parents=True, exist_ok=True)  # its whole folder may have been deleted
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm"), Path(f"{tmp}-journal")):
            leftover.unlink(missing_ok=True)
        # What is written back must be a whole database: a file truncated or written over in place (same inode,
        # so not "replaced") leaves the open connection reading garbage, and a copy of that is no rescue.
        try:
            check = self.db.execute_sql("PRAGMA quick_check").fetchone()
            check = check[0] if check else "no answer"
            if check == "ok" and not self.db.execute_sql(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'job'").fetchone():
                check = "it holds no jobs table: the file was emptied"
        except DatabaseError as exc:
            check = str(exc)
        if check != "ok":
            first = " / ".join(check.splitlines()[:2])  # quick_check lists every page
            raise DatabaseError(f"what the open ledger holds is damaged too ({first}), so nothing was written back")
        target = sqlite3.connect(str(tmp))
        try:
            self.db.connection().backup(target)
        finally:
            target.close()
        # Only another database is kept aside: this process's own file (its -wal or -shm was what went) is in the copy.
        found = os.path.lexists(self.path) and _file_identity(self.path) != self._identity
        for suffix in ("", "-wal", "-shm"):
            here = Path(f"{self.path}{suffix}")
            ours = _file_identity(here) == (self._identity if not suffix else self._companions.get(suffix))
            if found and not ours and os.path.lexists(here):
                os.replace(here, Path(f"{aside}{suffix}"))  # someone else's database: kept whole, not deleted
            else:
                # Our own log and index (their content is in the copy): kept beside the other database, SQLite would
                # replay our log into it when it is opened.
                here.unlink(missing_ok=True)
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        return aside if found else self.path

    # -- schema -------------------------------------------------------------------------------
    def _migrate(self) -> None:
        if self._schema_is_current():
            return  # nothing to write: a reader (`mondrian status`) opens a ledger another process holds locked
        with self._tx():
            if self.shared:  # nodes starting together: one migrates, the others wait for it and find it done
                self.db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            self.db.create_tables([self.SchemaVersion])
            current = self.SchemaVersion.select(fn.MAX(self.SchemaVersion.version)).scalar() or 0
            if current > SCHEMA_VERSION:
                # A shared ledger: every Mac must run a Mondrian that knows it (db_path does nothing while
                # ledger_url is set).
                instead = ("or point ledger_url at another database" if self.shared else
                           "or give it a ledger of its own (db_path in mondrian.toml)")
                raise LedgerUnavailable(
                    f"the ledger {self.where} was written by a newer Mondrian (schema {current}; this one knows "
                    f"{SCHEMA_VERSION}) and is left as it is: update this Mondrian ({_how_to_update()}"
                    f"{', on every Mac that shares it' if self.shared else ''}), {instead}")
            for version in range(current, SCHEMA_VERSION):
                MIGRATIONS[version](self.db)
                self.SchemaVersion.create(version=version + 1, applied_at=time.time())

    def _check_layout(self) -> None:
        """Refuse, in one line, a ledger whose tables are not those its schema version promises (a column dropped
        or a NOT NULL one added with the sqlite3 shell or another tool): every query would fail later, one by one,
        as "no such column", which read like a permissions problem."""
        wrong = []
        for model in (self.Job, self.Event, self.Reference, self.Worker, self.SchemaVersion):
            table = model._meta.table_name
            columns = {c.name: c for c in self.db.get_columns(table)}
            if not columns:
                wrong.append(f"it has no {table} table")
                continue
            fields = {f.column_name for f in model._meta.sorted_fields}
            wrong += [f"its {table} table has no {name} column" for name in sorted(fields - set(columns))]
            wrong += [f"its {table} table has a column {name} that Mondrian does not know and that may not be left "
                      f"empty" for name, c in sorted(columns.items())
                      if name not in fields and not c.null and c.default is None and not c.primary_key]
        if wrong:
            raise _BadLayout("; ".join(wrong))

    def _schema_is_current(self) -> bool:
        return self.SchemaVersion.table_exists() and self.schema_version() == SCHEMA_VERSION

    def schema_version(self) -> int:
        return self.SchemaVersion.select(fn.MAX(self.SchemaVersion.version)).scalar() or 0

    def close(self) -> None:
        self._release_run_lock()
        if not self.db.is_closed():
            self.db.close()

    # -- who runs a job -----------------------------------------------------------------------
    # A pid cannot tell whether the process that started a job still runs: pids are reused (after a reboot the
    # new daemon may get the dead one's pid, or any process may hold it). So each process that runs jobs (the
    # daemon, `mondrian analyze`) signs them `host:pid:token` and holds an flock on `<ledger>.runs/<token>.lock`
    # for as long as it lives. The kernel drops the lock when the process dies, however it dies, so a job is live
    # exactly while its token's file is locked.
    @property
    def runs_dir(self) -> Path:
        return self.path.with_name(self.path.name + ".runs")

    def worker_id(self) -> str:
        """This process's signature on the jobs it runs (see above); takes its run lock on first use."""
        if self._run is None:
            try:
                self._run = self._take_run_lock()
                atexit.register(self._release_run_lock)
            except OSError as exc:  # e.g. a full disk: the job still runs, but a crash of ours cannot be told apart
                log.warning("could not create a run lock in %s (%s); jobs are signed without one", self.runs_dir,
                            exc.strerror or exc)
                return f"{socket.gethostname()}:{os.getpid()}:-"
        return self._run[2]

    def _take_run_lock(self) -> tuple[int, Path, str]:
        self.runs_dir.mkdir(exist_ok=True)
        check_own_folder(self.runs_dir)  # a link there would put our files (and the sweep) in someone else's folder
        token = secrets.token_hex(8)
        new, final = self.runs_dir / f".{token}.new", self.runs_dir / f"{token}.lock"
        fd = os.open(new, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The pid for a person looking; the database file this process has open for `_opened_by`.
            ident = getattr(self, "_identity", None)
            os.pwrite(fd, f"{os.getpid()}\n{f'{ident[0]}:{ident[1]}' if ident else '-'}\n".encode(), 0)
            os.rename(new, final)  # only ever seen under its real name while locked
        except BaseException:
            os.close(fd)
            try:
                os.unlink(new)
            except OSError:
                pass
            raise
        return fd, final, f"{socket.gethostname()}:{os.getpid()}:{token}"

    def _release_run_lock(self) -> None:
        if self._run is None:
            return
        fd, path, _ = self._run
        self._run = None
        atexit.unregister(self._release_run_lock)
        try:
            os.unlink(path)  # before the unlock: a file seen unlocked always belonged to a dead process
        except OSError:
            pass
        os.close(fd)

    def _signer_runs(self, worker: str | None) -> bool:
        """Whether the process that signed `worker` still runs. Unsigned (an older Mondrian's `host:pid`, a
        failed lock) or not locked: it is gone, whatever process has its pid now."""
        if self._run is not None and worker == self._run[2]:
            return True
        token = (worker or "").rpartition(":")[2]
        if not _RUN_TOKEN.match(token):
            return False
        try:
            fd = os.open(self.runs_dir / f"{token}.lock", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError:
            return True  # cannot look (permissions): never take over a job that may be live
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def clock(self) -> float:
        """Now, for what several machines compare (leases, heartbeats, backoffs, when a job started and ended): the
        database server's clock on a shared ledger, so Macs whose clocks differ by a minute agree on when a lease
        ends (one ahead took over the others' photos); this machine's own otherwise."""
        if not self.shared:
            return time.time()
        return float(self.db.execute_sql("SELECT EXTRACT(EPOCH FROM clock_timestamp())").fetchone()[0])

    def job_is_live(self, job: Job) -> bool:
        """Whether the process running `job` still runs (its run lock is held); False for a job not running."""
        if self.shared:
            if job.lease_until is None:  # a `mondrian analyze` job: live unless it was this machine's and is gone
                return job.state == RUNNING and not self._gone_from_here(job.worker)
            return job.state == RUNNING and (job.lease_until >= self.clock() or self.holds(job.id) is not None)
        # Unsigned (no run lock could be taken): its pid still running here is the best sign there is.
        return job.state == RUNNING and (self._signer_runs(job.worker) or not self._signer_gone(job.worker))

    def sweep_run_locks(self) -> int:
        """Remove the run locks of processes that are gone; returns how many. Raises NotOwn if the runs folder is
        a link (it would delete in the folder it points to): the daemon refuses to start with that line."""
        try:
            check_own_folder(self.runs_dir)
            entries = list(os.scandir(self.runs_dir))
        except NotOwn:
            raise
        except OSError:
            return 0
        removed = 0
        for entry in entries:
            if self._run is not None and entry.path == str(self._run[1]):
                continue
            if not _RUN_LOCK_FILE.match(entry.name) or not entry.is_file(follow_symlinks=False):
                continue  # not a run lock: never Mondrian's to delete
            try:
                if entry.name.startswith(".") and time.time() - entry.stat().st_mtime < _NEW_LOCK_GRACE_S:
                    continue  # being created: it is locked before its rename, not necessarily before this look
                fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(entry.path)
                removed += 1
            except OSError:
                pass  # held: its process runs
            finally:
                os.close(fd)
        return removed

    # -- intake -------------------------------------------------------------------------------
    @writes
    def enqueue(self, source_path: Path, rel_path: str, advisor: str, advisor_source: str,
                size: int | None, mtime: float | None, ctime: float | None = None, *,
                kept: bool = False) -> Job | None:
        """Queue a photo unless the same path already has a job waiting or running, or it is a failed photo
        that never left the inbox (`failed_in_place`). `kept`: keep_originals, the photo stays where it is."""
        with self._tx():
            return self._enqueue_one(source_path, rel_path, advisor, advisor_source, size, mtime,
                                     self._on_ledger_clock(ctime), kept=kept)

    @writes
    def enqueue_many(self, items: Iterable[tuple[Path, str, str, str, int | None, float | None, float | None]], *,
                     kept: bool = False) -> list[Job | None]:
        """`enqueue` for many photos (each a tuple of enqueue's arguments) in one transaction: a card of 1,000
        photos costs one commit (one fsync) instead of 1,000."""
        skew = self._skew()
        with self._tx():
            return [self._enqueue_one(*item[:6], None if item[6] is None else item[6] + skew, kept=kept)
                    for item in items]

    def _skew(self) -> float:
        """How far the ledger's clock (`clock`: a shared ledger's server's) is ahead of this machine's."""
        return self.clock() - time.time() if self.shared else 0.0

    def _on_ledger_clock(self, ctime: float | None) -> float | None:
        """A file's ctime (this machine's clock) on the ledger's clock, to be compared with a job's `finished_at`: with
        the database server's clock five minutes ahead, a photo put back from failed/ seemed to have come back before
        it failed, and was never queued again."""
        return None if ctime is None else ctime + self._skew()

    def _enqueue_one(self, source_path: Path, rel_path: str, advisor: str, advisor_source: str,
                     size: int | None, mtime: float | None, ctime: float | None = None, *,
                     kept: bool = False) -> Job | None:
        # One indexed read of the path's earlier jobs decides both refusals (`is_active`, `failed_in_place`).
        job = self.Job
        for state, f_size, f_mtime, finished_at in (
                job.select(job.state, job.size, job.mtime, job.finished_at)
                .where(job.source_path == str(source_path)).order_by(job.id.desc()).tuples()):
            if state in ACTIVE:
                return None
            if (state == FAILED and size is not None and f_size == size and f_mtime == mtime
                    and (ctime is None or finished_at is None or ctime <= finished_at)):
                return None
        # Another node may queue the same file between that read and this insert: the unique index on active jobs
        # refuses the second row, and the insert then returns none (already queued), never an error.
        rows = list(self.Job.insert(source_path=str(source_path), rel_path=rel_path, advisor=advisor,
                                    advisor_source=advisor_source, size=size, mtime=mtime, enqueued_at=time.time(),
                                    kept=kept).on_conflict_ignore().returning(self.Job).execute())
        return rows[0] if rows else None

    def kept_in_place(self, source_path: Path, size: int | None, mtime: float | None) -> Job | None:
        """The latest report of a photo kept where it was dropped (keep_originals), if the file is still the one
        analysed (same size and mtime): it is done, however often the inbox is rescanned or Mondrian restarted.
        An edited file (other bytes, so another size or mtime) is new work."""
        if size is None:
            return None
        return (self.Job.select().where((self.Job.source_path == str(source_path)) & (self.Job.state == DONE) &
                                        (self.Job.kept == True) & (self.Job.size == size) &  # noqa: E712
                                        (self.Job.mtime == mtime)).order_by(self.Job.id.desc()).first())

    @writes
    def enqueue_upload(self, source_path: Path, rel_path: str, advisor: str, advisor_source: str, mode: str,
                       size: int, mtime: float) -> Job:
        """Queue a photo received through the HTTP API (daemon/api/), already in Mondrian's spool: one row, with the
        mode the request asked for, so a crash after this line loses nothing and the worker honours the request."""
        return self.Job.create(source_path=str(source_path), rel_path=rel_path, advisor=advisor,
                               advisor_source=advisor_source, requested_mode=mode, mode_source="command",
                               size=size, mtime=mtime, enqueued_at=time.time())

    def failed_in_place(self, source_path: Path, size: int | None, mtime: float | None,
                        ctime: float | None) -> Job | None:
        """The failed job of this very file if it never left the inbox (its original could not be moved out,
        e.g. an outbox that is not writable): queueing it on every rescan would fail it again and again.

        A file the user puts back after its failure (`mv` or `cp -p` from failed/, as the error record tells
        them, keeping size and mtime) is new work: putting it there changed its ctime after the failure (the
        kernel sets ctime; no copy tool can keep it), while a file that never left keeps its older ctime even
        where a copy of it did reach failed/. A changed file is new work too."""
        if size is None:
            return None
        q = (self.Job.select().where((self.Job.source_path == str(source_path)) & (self.Job.state == FAILED) &
                                     (self.Job.size == size) & (self.Job.mtime == mtime)).order_by(self.Job.id.desc()))
        ctime = self._on_ledger_clock(ctime)
        for job in q:
            if ctime is None or job.finished_at is None or ctime <= job.finished_at:
                return job
        return None

    @writes
    def record_unreachable(self, source_path: Path, rel_path: str, advisor: str, reason: str) -> Job:
        """A failure for a path Mondrian cannot even look at (longer than the system allows): it stays where it
        is, and `status` lists it with the reason. Recorded once per path: returns the earlier job if any."""
        with self._tx():
            earlier = (self.Job.select().where(self.Job.source_path == str(source_path))
                       .order_by(self.Job.id.desc()).first())
            if earlier is not None:
                return earlier
            now = time.time()
            return self.Job.create(source_path=str(source_path), rel_path=rel_path, advisor=advisor, state=FAILED,
                                   error=reason, error_kind="permanent", enqueued_at=now, finished_at=now)

    def accounted_for(self, files: list[tuple[Path, int, float]]) -> set[str]:
        """Of these inbox files (path, size, mtime), the paths the ledger already answers for: queued or in
        progress, kept where they are and done as they are now (keep_originals), or failed and left in place."""
        known: set[str] = set()
        paths = [str(p) for p, _, _ in files]
        now = {str(p): (size, mtime) for p, size, mtime in files}
        for i in range(0, len(paths), 500):  # SQLite's bound-variable limit
            q = (self.Job.select(self.Job.source_path, self.Job.state, self.Job.kept, self.Job.size, self.Job.mtime)
                 .where(self.Job.source_path.in_(paths[i:i + 500])))
            for j in q:
                same = (j.size, j.mtime) == now[j.source_path]
                if j.state in ACTIVE or (j.state == DONE and j.kept and same) or \
                        (j.state == FAILED and (same or j.size is None)):
                    known.add(j.source_path)
        return known

    def is_active(self, source_path: Path) -> bool:
        return self.Job.select().where((self.Job.source_path == str(source_path)) &
                                       (self.Job.state.in_(ACTIVE))).exists()

    def has_job(self, source_path: Path) -> bool:
        """Whether a photo at this path was ever queued (an API upload's file the sweep must leave alone)."""
        return self.Job.select().where(self.Job.source_path == str(source_path)).exists()

    def duplicates_of(self, job_id: int) -> list[Job]:
        """The jobs filed as duplicates of job `job_id`."""
        return list(self.Job.select().where((self.Job.duplicate_of == job_id) & (self.Job.state == DONE)))

    def taken_in(self, source_path: Path) -> bool:
        """Whether a photo at this path was queued and has not failed or gone since: an inbox link's target that
        is analysed as itself (a link to a file that failed, a loop's other link say, points at no such photo)."""
        return self.Job.select().where((self.Job.source_path == str(source_path))
                                       & self.Job.state.not_in([FAILED, GONE])).exists()

    @writes
    def start_direct(self, source_path: Path, rel_path: str, advisor: str, advisor_source: str) -> Job:
        """A job run in-process by `mondrian analyze`: created already running so no daemon claims it."""
        now = self.clock()
        return self.Job.create(source_path=str(source_path), rel_path=rel_path, advisor=advisor,
                               advisor_source=advisor_source, state=RUNNING, attempts=1, worker=self.worker_id(),
                               enqueued_at=now, started_at=now, owns_file=False)

    # -- claiming -----------------------------------------------------------------------------
    @writes
    def claim(self, worker: str | None = None, now: float | None = None) -> Job | None:
        """Atomically move the oldest due queued job to running and return it."""
        now = self.clock() if now is None else now
        worker = worker or self.worker_id()
        cond = (self.Job.state == QUEUED) & self._due(now)
        if self._claim_under:  # compared as text: LIKE would read `_` and `%` in a folder's name as wildcards
            cond &= functools.reduce(operator.or_, [fn.SUBSTR(self.Job.source_path, 1, len(p)) == p
                                                    for p in self._claim_under])
        due = self.Job.select(self.Job.id).where(cond).order_by(self.Job.not_before, self.Job.id).limit(1)
        if self.shared:
            # Nodes claiming at once each lock a different row instead of queueing behind one another's.
            due = due.for_update("FOR UPDATE SKIP LOCKED")
        # `id = (one id)`, evaluated once before the update: with `id IN (...)` PostgreSQL may run the locking subquery
        # as a join and update the row without returning it (a claimed job nobody knows it holds).
        query = (self.Job.update(state=RUNNING, worker=worker, started_at=now, attempts=self.Job.attempts + 1,
                                 lease_until=now + self.lease_seconds, lease_token=self.Job.lease_token + 1)
                 .where((self.Job.id == due) & (self.Job.state == QUEUED))
                 .returning(self.Job))
        rows = list(query.execute())
        if not rows:
            return None
        job = rows[0]
        with self._held_lock:
            self._held[job.id] = (job.lease_token, job.rel_path, now)
            self._stale.pop(job.id, None)
        if worker == self.worker_id():
            self._show_hand()
        return job

    def _show_hand(self) -> None:
        """This worker's row says at once what it holds and has done: `mondrian workers` showed a node as idle
        from its claim until its next beat (a third of a lease), and a finished photo as in hand until then."""
        self.Worker.update(done=self._done, **self._in_hand()).where(self.Worker.id == self.worker_id()).execute()

    def _in_hand(self) -> dict[str, Any]:
        """What this worker's row names: the first job (by id) it holds, and how many more (a batch holds several:
        `workers` named one photo of eight)."""
        with self._held_lock:
            held = sorted(self._held.items())
        job_id, (_, photo, claimed_at) = held[0] if held else (None, (None, None, None))
        if len(held) > 1:
            photo = f"{photo} and {len(held) - 1} more"
        return dict(job_id=job_id, photo=photo, claimed_at=claimed_at)

    # -- leases and fencing ---------------------------------------------------------------------
    def holds(self, job_id: int) -> int | None:
        """The fencing token of this process's claim on `job_id`, if it holds one."""
        with self._held_lock:
            held = self._held.get(job_id)
        return held[0] if held else None

    def let_go(self, job_id: int) -> None:
        """Stop renewing this process's lease on `job_id` without writing anything (the ledger cannot be reached):
        its lease ends, and the photo is claimed again, here or on another machine, once the ledger answers."""
        with self._held_lock:
            held = self._held.pop(job_id, None)
            if held is not None:
                self._stale[job_id] = held[0]

    def _mine(self, job_id: int) -> tuple[Any, int | None]:
        """The condition that a write about `job_id` applies to: with this process's claim on it, only while that
        claim is the current one (same token, still running)."""
        with self._held_lock:
            held = self._held.get(job_id)
            token = held[0] if held else self._stale.get(job_id)
        cond = self.Job.id == job_id
        if token is not None:
            cond &= (self.Job.lease_token == token) & (self.Job.state == RUNNING)
        return cond, token

    def _fenced(self, job_id: int, what: str, values: dict[Any, Any], *, ends: bool = False,
                give_back: bool = False, extra: Any = None) -> int:
        """One UPDATE of a job, refused (LeaseLost) if this process's claim on it is stale: the check and the write
        are one statement, so no other worker's claim can come between them. `give_back` (requeue): a stale claim
        has nothing to give back: refused and logged, but no error. `ends`: the claim ends with this write."""
        cond, token = self._mine(job_id)
        if extra is not None:
            cond &= extra
        n = self.Job.update(values).where(cond).execute()
        if token is None:
            return n
        if n == 0:
            with self._held_lock:
                self._held.pop(job_id, None)
                self._stale[job_id] = token
            self._lost(job_id, token, what, raise_it=not give_back)
        elif ends:
            with self._held_lock:
                self._held.pop(job_id, None)
            self._done += 0 if give_back else 1
            self._show_hand()
        return n

    def _lost(self, job_id: int, token: int, what: str, raise_it: bool = True) -> None:
        photo = self.Job.select(self.Job.rel_path).where(self.Job.id == job_id).scalar() or f"job {job_id}"
        log.warning("refused: %s (job %d) was taken over by another worker after this one's lease ended (its claim "
                    "%d is stale); this worker's %s is discarded", photo, job_id, token, what)
        try:
            self._put_event(f"refused:{job_id}:{token}", {"job": job_id, "token": token, "what": what,
                                                          "worker": self.worker_id()})
        except (OperationalError, LedgerUnavailable):
            pass  # the refusal stands; only its record for status is missing
        if raise_it:
            raise LeaseLost(f"{photo} (job {job_id}) belongs to another worker now; {what} refused")

    def lease_left(self, job_id: int, now: float | None = None) -> float | None:
        """Seconds until this process's lease on `job_id` ends (negative: it ended), if it holds the job."""
        token = self.holds(job_id)
        if token is None:
            return None
        until = self.Job.select(self.Job.lease_until).where(
            (self.Job.id == job_id) & (self.Job.lease_token == token)).scalar()
        return None if until is None else until - (self.clock() if now is None else now)

    @writes
    def renew_leases(self, now: float | None = None) -> list[int]:
        """Extend the lease of every job this process holds; returns the ids it no longer holds (taken over)."""
        now = self.clock() if now is None else now
        with self._held_lock:
            held = dict(self._held)
        lost = []
        for job_id, (token, _, _) in held.items():
            n = self.Job.update(lease_until=now + self.lease_seconds).where(
                (self.Job.id == job_id) & (self.Job.lease_token == token) & (self.Job.state == RUNNING)).execute()
            if n == 0:
                lost.append(job_id)
        return lost

    @writes
    def requeue_expired(self, now: float | None = None, max_attempts: int | None = None) -> list[Job]:
        """Running jobs whose lease ended (their worker died, or stalled past it) back to the queue, first in line;
        never this process's own. Returns them.

        `max_attempts`: a job whose worker died that many times with it in hand is not queued again, where it would
        be taken by the next worker and maybe crash it too, for ever: the crash check of start-up recovery
        (`Worker.recover`) must see it. On one Mac the daemon's next start does (a restart slower than the lease
        used to find it queued already, and the check never ran); on a shared ledger, where the other Macs do not
        restart, it is set aside as failed with its reason."""
        now = self.clock() if now is None else now
        with self._held_lock:
            mine = list(self._held)
        cond = (self.Job.state == RUNNING) & self.Job.lease_until.is_null(False) & (self.Job.lease_until < now)
        if mine:
            cond &= self.Job.id.not_in(mine)
        if max_attempts is not None:
            exhausted = cond & (self.Job.attempts >= max_attempts)
            cond &= self.Job.attempts < max_attempts
            if self.shared:
                from .hints import mondrian

                for job in self.Job.update(
                        state=FAILED, error_kind="transient", finished_at=now, lease_until=None,
                        error=f"the Mondrian analysing it stopped {max_attempts} time(s) with this photo in hand "
                              f"(crashed, killed or cut off), on one Mac or several: it is set aside so it cannot "
                              f"stop another; `{mondrian()} retry --failed` tries it again").where(
                        exhausted).returning(self.Job).execute():
                    log.warning("lease ended %d time(s): %s (job %d) is set aside", max_attempts, job.rel_path,
                                job.id)
        rows = list(self.Job.update(state=QUEUED, worker=None, lease_until=None,
                                    error="its worker stopped renewing its lease (stopped, killed or cut off); "
                                          "queued again").where(cond).returning(self.Job).execute())
        for job in rows:
            log.warning("lease ended: %s (job %d) goes back to the queue", job.rel_path, job.id)
        return rows

    @writes
    def beat(self, now: float | None = None) -> None:
        """This process's row in the workers table: what it runs, since when, and how much it has done."""
        now = self.clock() if now is None else now
        started = now - (time.time() - self._started_at)  # on the ledger's clock, as the beat is
        values = dict(host=socket.gethostname(), pid=os.getpid(), started_at=started, beat_at=now,
                      lease_seconds=self.lease_seconds, done=self._done, **self._in_hand())
        w = self.Worker
        w.insert(id=self.worker_id(), **values).on_conflict(
            conflict_target=[w.id], update={getattr(w, k): v for k, v in values.items()}).execute()
        if not self._swept:
            self._swept = True
            self._forget_dead_workers(now)

    def _forget_dead_workers(self, now: float) -> None:
        """Rows of workers that are gone for good: a process of this machine that no longer exists (killed, or the
        Mac restarted), or any worker silent for a day, once it holds no running photo. Without this every crash
        left a row that `mondrian workers` showed as LOST for ever."""
        w, host = self.Worker, socket.gethostname()
        running = {j.id for j in self.Job.select(self.Job.id).where(self.Job.state == RUNNING)}
        gone = []
        for row in w.select().where(w.id != self.worker_id()):
            if row.job_id is not None and row.job_id in running:
                continue  # its photo goes back to the queue when its lease ends: the row says so until then
            if row.host == host and not _pid_alive(row.pid) or now - row.beat_at > FORGET_WORKERS_AFTER_S:
                gone.append(row.id)
        if gone:
            w.delete().where(w.id.in_(gone)).execute()
            self.Event.delete().where(self.Event.key.in_([NODE_EVENT + g for g in gone])).execute()
            log.info("forgot %d worker(s) that stopped without retiring (killed or restarted)", len(gone))

    @writes
    def retire(self) -> None:
        """Remove this process's row from the workers table (a clean stop)."""
        self.Worker.delete().where(self.Worker.id == self.worker_id()).execute()
        self.Event.delete().where(self.Event.key == NODE_EVENT + self.worker_id()).execute()

    def workers(self) -> list[WorkerRow]:
        return list(self.Worker.select().order_by(self.Worker.host, self.Worker.pid))

    @writes
    def announce(self, outbox: str) -> None:
        """Where this node reaches the shared outbox, and (on the ledger's clock) when it last marked it there: how
        the others tell whether they reach the same folder by the same path (pipeline/share.py)."""
        self._put_event(NODE_EVENT + self.worker_id(), {"outbox": outbox, "marked_at": self.clock()})

    def other_nodes(self) -> list[tuple[WorkerRow, dict[str, Any]]]:
        """The other workers whose heartbeat is within its lease, each with what it announced (none: not listed)."""
        e, now = self.Event, self.clock()
        said = {ev.key[len(NODE_EVENT):]: json.loads(ev.value)
                for ev in e.select().where(e.key.startswith(NODE_EVENT))}
        return [(row, said[row.id]) for row in self.workers()
                if row.id != self.worker_id() and row.id in said and now - row.beat_at <= row.lease_seconds]

    @contextlib.contextmanager
    def training_turn(self) -> Iterator[bool]:
        """Whether this node may train now: on a shared ledger, one node at a time in the whole studio (a
        PostgreSQL advisory lock, held by this thread's connection until the block ends, or the node dies).
        On SQLite the home is one machine's, and its own locks (the nightly job's, the adapter store's) suffice."""
        if not self.shared:
            yield True
            return
        got = bool(self.db.execute_sql("SELECT pg_try_advisory_lock(%s)", (TRAINING_LOCK,)).fetchone()[0])
        try:
            yield got
        finally:
            if got:
                self.db.execute_sql("SELECT pg_advisory_unlock(%s)", (TRAINING_LOCK,))

    def next_due_in(self, now: float | None = None) -> float | None:
        now = self.clock() if now is None else now
        t = self.Job.select(fn.MIN(self.Job.not_before)).where(self.Job.state == QUEUED).scalar()
        return None if t is None else max(0.0, t - now)

    def orphaned_running(self, *, proven: bool = False) -> list[Job]:
        """Jobs left running by a process that no longer runs (crash, SIGKILL, power loss), even if its pid has
        been given to another process since (a reboot, or the new daemon itself).

        `proven`: only those whose process is known to be gone even to a daemon that is not just starting (a
        `mondrian analyze` killed meanwhile): its run lock is free, or, unsigned, no process has its pid here."""
        running = self.Job.select().where(self.Job.state == RUNNING).order_by(self.Job.id)
        if self.shared:
            # Run locks are files of one machine: on a shared ledger a lease that ended tells a job is orphaned. A
            # `mondrian analyze` job holds no lease; one started on this machine whose process is gone (killed) is
            # orphaned too, else it stayed "in progress" for ever and `run --once` waited for it.
            now = self.clock()
            return [j for j in running if self.holds(j.id) is None and (
                (j.lease_until is not None and j.lease_until < now)
                or (j.lease_until is None and self._gone_from_here(j.worker)))]
        return [j for j in running if not self._signer_runs(j.worker) and (not proven or self._signer_gone(j.worker))]

    def _gone_from_here(self, worker: str | None) -> bool:
        """A job signed by a process of this machine that no longer runs (no run lock held, no such pid)."""
        host, _, rest = (worker or "").partition(":")
        pid = rest.partition(":")[0]
        return (host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid))
                and not self._signer_runs(worker))

    def _signer_gone(self, worker: str | None) -> bool:
        host, _, rest = (worker or "").partition(":")
        pid, _, token = rest.partition(":")
        if _RUN_TOKEN.match(token):
            return True  # its run lock is free (checked by the caller)
        return host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid))

    # -- progress inside a job ----------------------------------------------------------------
    @writes
    def set_mode(self, job_id: int, requested: str, source: str) -> None:
        self._fenced(job_id, "mode", {self.Job.requested_mode: requested, self.Job.mode_source: source})

    @writes
    def set_hash(self, job_id: int, sha256: str) -> None:
        self._fenced(job_id, "hash", {self.Job.sha256: sha256})

    @writes
    def move_source(self, job_id: int, source_path: Path) -> bool:
        """The claimed job's photo is at `source_path` now (the inbox setting changed, its photos moved with it).
        False when another active job holds that path already (the start-up rescan queued it there)."""
        if self.is_active(source_path):
            return False
        try:
            with self._tx():
                self._fenced(job_id, "source", {self.Job.source_path: str(source_path)})
        except IntegrityError:  # queued there between the look and the write
            return False
        return True

    @writes
    def reserve_output(self, job_id: int, output_dir: Path, context_key: str | None = None,
                       still_there: Callable[[Job], bool] = lambda job: True) -> None:
        """Checked just before the outcome is renamed into place: a worker that lost the job stops here (LeaseLost).
        With the report's `context_key`, a twin (the same bytes and context, taken at the same moment by another
        Mac) being published or published, and `still_there` (where this photo's report would go, its folder not
        deleted since), raises TwinFirst: two reports of one key must never both land."""
        if context_key is None:
            self._fenced(job_id, "publish", {self.Job.output_dir: str(output_dir)})
            return
        with self._tx():
            if self.shared:  # one reservation of a key at a time across the studio (SQLite's write lock is global)
                self.db.execute_sql("SELECT pg_advisory_xact_lock(hashtext(%s))", (context_key,))
            j = self.Job
            twins = (j.select().where((j.context_key == context_key) & (j.id != job_id) & j.duplicate_of.is_null()
                                      & ((j.state == DONE) | ((j.state == RUNNING) & j.output_dir.is_null(False))))
                     .order_by(j.id.desc()))
            for twin in twins:
                if still_there(twin):
                    raise TwinFirst(twin)
            try:
                self._fenced(job_id, "publish", {j.output_dir: str(output_dir), j.context_key: context_key})
            except LeaseLost as exc:  # raised after the commit: the refusal's record is written with it
                lost = exc
            else:
                lost = None
        if lost is not None:
            raise lost

    def reserved_outputs(self) -> set[str]:
        q = self.Job.select(self.Job.output_dir).where(self.Job.output_dir.is_null(False) & self.Job.state.in_(ACTIVE))
        return {j.output_dir for j in q}

    def outputs_starting(self, prefix: Path) -> set[str]:
        """Every outcome path ever recorded (any state) that starts with `prefix` (and a few more: the match ignores
        ASCII case, as SQLite's LIKE does), for picking names no earlier job was published under."""
        q = self.Job.select(self.Job.output_dir).where(self.Job.output_dir.startswith(str(prefix)))
        return {j.output_dir for j in q}

    def find_done(self, context_key: str, exclude: int) -> Job | None:
        """The latest report made with this very analysis context (same bytes, advisor, effective mode, reference
        set, adapter, model), if any: the photo is then a duplicate of it. The latest: an earlier one's folder may
        have been deleted since, and the photo analysed again."""
        return (self.Job.select().where((self.Job.context_key == context_key) & (self.Job.state == DONE) &
                                        self.Job.duplicate_of.is_null() & (self.Job.id != exclude))
                .order_by(self.Job.id.desc()).first())

    def original_sha(self, sha256: str) -> str | None:
        """The hash of the photo as it was analysed, when `sha256` is that photo with a report's XMP embedded by
        Mondrian (xmp_embed) and nothing else changed since."""
        j = self.Job
        row = (j.select(j.sha256).where((j.embedded_sha256 == sha256) & (j.state == DONE))
               .order_by(j.id.desc()).first())
        return row.sha256 if row is not None else None

    def earlier_reports(self, sha256: str, exclude: int, limit: int = 20) -> list[Job]:
        """Reports of the same bytes made before (any advisor or context), oldest first; at most the `limit`
        latest, so a photo dropped a thousand times does not make a page a thousand links long. A copy holding
        an embedded report's XMP is the same photo (`original_sha`)."""
        same = {sha256, self.original_sha(sha256) or sha256}
        q = (self.Job.select().where(self.Job.sha256.in_(list(same)) & (self.Job.state == DONE) &
                                     self.Job.duplicate_of.is_null() & (self.Job.id != exclude))
             .order_by(self.Job.id.desc()).limit(limit))
        return list(reversed(list(q)))

    # -- terminal states ----------------------------------------------------------------------
    @writes
    def finish(self, job_id: int, *, effective_mode: str, fallbacks: list[dict[str, str]],
               report_json: Path, report_html: Path, grade: int, adapter: str | None,
               analysis_s: float, output_dir: Path, context_key: str | None = None,
               embedded_sha256: str | None = None) -> None:
        j = self.Job
        self._fenced(job_id, "report", {
            j.state: DONE, j.effective_mode: effective_mode, j.fallbacks: json.dumps(fallbacks),
            j.context_key: context_key, j.report_json: str(report_json), j.report_html: str(report_html),
            j.embedded_sha256: embedded_sha256,
            j.grade: grade, j.adapter: adapter, j.analysis_s: analysis_s, j.output_dir: str(output_dir),
            j.finished_at: self.clock(), j.error: None, j.error_kind: None, j.lease_until: None}, ends=True)

    @writes
    def finish_duplicate(self, job_id: int, first: Job, output_dir: Path,
                         fallbacks: list[dict[str, str]] | None = None) -> None:
        j = self.Job
        self._fenced(job_id, "duplicate record", {
            j.state: DONE, j.duplicate_of: first.id, j.effective_mode: first.effective_mode,
            j.context_key: first.context_key,
            j.fallbacks: first.fallbacks if fallbacks is None else json.dumps(fallbacks),
            j.report_json: first.report_json,
            j.report_html: first.report_html, j.grade: first.grade, j.adapter: first.adapter,
            j.output_dir: str(output_dir), j.finished_at: self.clock(), j.lease_until: None}, ends=True)

    @writes
    def fail(self, job_id: int, reason: str, output_dir: Path | None, kind: str = "permanent") -> None:
        j = self.Job
        self._fenced(job_id, "failure record", {
            j.state: FAILED, j.error: reason, j.error_kind: kind, j.finished_at: self.clock(),
            j.output_dir: str(output_dir) if output_dir else None, j.lease_until: None}, ends=True)

    @writes
    def retry_later(self, job_id: int, reason: str, delay_s: float) -> None:
        j = self.Job
        self._fenced(job_id, "retry", {j.state: QUEUED, j.error: reason, j.error_kind: "transient", j.worker: None,
                                       j.not_before: self.clock() + delay_s, j.lease_until: None},
                     ends=True, give_back=True)

    @writes
    def requeue(self, job_id: int, reason: str | None = None, delay_s: float = 0.0,
                undo_attempt: bool = False, keep_place: bool = False, reset_attempts: bool = False) -> None:
        """Back to the queue without blame (graceful stop, crash recovery, a file still being written).

        `keep_place`: keep its place in the queue (claimed again first), so a job interrupted after its report
        was published is finished before a copy of the same photo could be analysed a second time.
        `reset_attempts`: the photo was cleared of the crashes counted against it (daemon/pipeline/isolation.py)."""
        upd: dict[Any, Any] = {self.Job.state: QUEUED, self.Job.worker: None, self.Job.lease_until: None}
        if not keep_place:
            upd[self.Job.not_before] = self.clock() + delay_s
        if reason:
            upd[self.Job.error] = reason
        if undo_attempt:
            upd[self.Job.attempts] = _one_less(self.Job.attempts)
        if reset_attempts:
            upd[self.Job.attempts] = 0
        self._fenced(job_id, "requeue", upd, ends=True, give_back=True, extra=self.Job.state == RUNNING)

    @writes
    def requeue_changed(self, job_id: int, size: int, mtime: float, delay_s: float) -> None:
        """The file changed after it was queued: remember how it is now and look again after `delay_s`,
        without blame (the attempt is given back)."""
        j = self.Job
        self._fenced(job_id, "requeue", {j.state: QUEUED, j.worker: None, j.size: size, j.mtime: mtime,
                                         j.not_before: self.clock() + delay_s, j.attempts: _one_less(j.attempts),
                                         j.lease_until: None},
                     ends=True, give_back=True, extra=j.state == RUNNING)

    @writes
    def mark_gone(self, job_id: int, reason: str, *, was: str | None = None) -> bool:
        """`was`: only while the job is still in that state (`retry` clears a failure it listed, never a job that
        moved on meanwhile). Whether it was marked."""
        j = self.Job
        return self._fenced(job_id, "removal record", {j.state: GONE, j.error: reason, j.finished_at: self.clock(),
                                                       j.lease_until: None}, ends=True,
                            extra=None if was is None else j.state == was) > 0

    def retry_failed(self, ids: Iterable[int] | None = None) -> list[Job]:
        """Failed jobs to queue again; not those whose file has a later job (put back since): that one is its job
        now, and queueing the old one too would give one file two jobs."""
        q = self.Job.select().where(self.Job.state == FAILED)
        if ids is not None:
            q = q.where(self.Job.id.in_(list(ids)))
        superseded, _ = self._superseded_failures()
        return [j for j in q.order_by(self.Job.id) if j.id not in superseded]

    @writes
    def check_writable(self) -> None:
        """Take the write lock and let it go: a command that moves files first and records it after (retry) asks
        this before it moves anything, so a ledger it cannot write leaves every file where it was."""
        with self._tx():
            pass

    @writes
    def requeue_failed(self, job_id: int, source_path: Path, advisor: str | None = None) -> None:
        """`advisor`: the one its inbox folder names now (its definition fixed, or the folder renamed)."""
        fields = {"advisor": advisor} if advisor is not None else {}
        self.Job.update(state=QUEUED, source_path=str(source_path), attempts=0, not_before=0.0, worker=None,
                        output_dir=None, error=None, error_kind=None, finished_at=None, **fields).where(
            (self.Job.id == job_id) & (self.Job.state == FAILED) & (self.Job.owns_file == True)).execute()  # noqa: E712

    # -- reading ------------------------------------------------------------------------------
    def get(self, job_id: int) -> Job:
        return self.Job.get_by_id(job_id)

    def later_done(self, source_path: str, after_id: int) -> Job | None:
        """A job analysed since `after_id` of a file at the same place (the photo put back fixed, or another photo of
        that name), if there is one."""
        job = self.Job
        return job.select().where((job.source_path == source_path) & (job.state == DONE) & (job.id > after_id)) \
            .order_by(job.id.desc()).first()

    def later_job_at(self, source_path: str, after_id: int) -> Job | None:
        """The newest job since `after_id` of a file at `source_path`, whatever its state, if there is one."""
        job = self.Job
        return job.select().where((job.source_path == source_path) & (job.id > after_id)) \
            .order_by(job.id.desc()).first()

    def other_job_at(self, source_paths: Iterable[str], exclude: int) -> Job | None:
        """The newest job but `exclude` of a file at one of `source_paths` (a path as given and as resolved)."""
        job = self.Job
        return job.select().where(job.source_path.in_(list(source_paths)) & (job.id != exclude)) \
            .order_by(job.id.desc()).first()

    def earlier_failures(self, source_path: str, before_id: int) -> list[Job]:
        """Failed jobs of the same file before `before_id` (their records are stale once it is analysed)."""
        job = self.Job
        return list(job.select().where((job.source_path == source_path) & (job.state == FAILED)
                                       & (job.id < before_id)).order_by(job.id))

    def _superseded_failures(self) -> tuple[set[int], set[int]]:
        """Failed jobs whose file has a later job (put back, or dropped in again), and those of them whose file was
        analysed since. One pass over the jobs of files that failed once (source_path has no index)."""
        job = self.Job
        failed_paths = job.select(job.source_path).where(job.state == FAILED)
        by_path: dict[str, list[tuple[int, str, str | None]]] = {}
        for path, job_id, state, kept in job.select(job.source_path, job.id, job.state, job.output_dir).where(
                job.source_path.in_(failed_paths)).tuples():
            by_path.setdefault(path, []).append((job_id, state, kept))
        superseded, resolved = set(), set()
        for rows in by_path.values():
            for job_id, state, kept in rows:
                if state != FAILED:
                    continue
                later = [later_state for i, later_state, _ in rows if i > job_id]
                # Still in failed/: a later job of that inbox path is another file of the same name (IMG_0001.JPG
                # from a second card), and this failure still stands; taken back out, the later job is its own. A
                # link kept there is no photo to stand for: the photo copied in its place, as advised, is its own.
                if later and not (kept and os.path.lexists(kept) and not os.path.islink(kept)):
                    superseded.add(job_id)
                    if DONE in later:
                        resolved.add(job_id)
        return superseded, resolved

    def counts(self) -> Counts:
        by_state = {s: 0 for s in STATES}
        job = self.Job
        for row in job.select(job.state, fn.COUNT(job.id).alias("n")).group_by(job.state).dicts():
            by_state[row["state"]] = row["n"]
        # A failed photo the user fixed and put back is a new job: its old failure is history, not a failure now.
        superseded, resolved = self._superseded_failures()
        by_state[FAILED] -= len(superseded)
        dups = self.Job.select().where(self.Job.duplicate_of.is_null(False)).count()
        return Counts(by_state=by_state, duplicates=dups, resolved=len(resolved), superseded=frozenset(superseded))

    def running(self) -> list[Job]:
        return list(self.Job.select().where(self.Job.state == RUNNING).order_by(self.Job.started_at))

    def delayed(self, now: float | None = None) -> list[Job]:
        """Queued jobs waiting out a backoff (a transient fault, a file still settling), soonest first."""
        now = self.clock() if now is None else now
        return list(self.Job.select().where((self.Job.state == QUEUED) & ~self._due(now))
                    .order_by(self.Job.not_before))

    def _due(self, now: float) -> Any:
        """A queued job may start now: its backoff is over, or it was set by a clock that has since gone back (a
        Mac whose clock ran ahead, set right by the network): its last claim lies in the future, and its backoff
        of seconds would otherwise last as long as the clock was off (hours, or days)."""
        job = self.Job
        return (job.not_before <= now) | (job.started_at.is_null(False) & (job.started_at > now + CLOCK_SLACK_S))

    def recent_durations(self, limit: int = 20) -> list[float]:
        """Seconds from claim to report of the latest analysed photos, newest first: what the next ones may take."""
        job = self.Job
        q = (job.select(job.started_at, job.finished_at)
             .where((job.state == DONE) & job.duplicate_of.is_null() & job.started_at.is_null(False)
                    & job.finished_at.is_null(False))
             .order_by(job.finished_at.desc()).limit(limit))
        return [end - start for start, end in q.tuples() if end >= start]

    def recent_failures(self, limit: int = 5, superseded: "set[int] | frozenset[int] | None" = None) -> list[Job]:
        """The latest failures that still stand: not those of a file put back and queued again since
        (`superseded`: `Counts.superseded` just read, to skip finding them again)."""
        if superseded is None:
            superseded, _ = self._superseded_failures()
        standing = (j for j in self.Job.select().where(self.Job.state == FAILED).order_by(self.Job.finished_at.desc())
                    if j.id not in superseded)
        return list(itertools.islice(standing, limit))

    def standing_failure_ids(self) -> set[int]:
        """Ids of the failures that still stand (as `recent_failures` counts them), for the outbox index."""
        superseded, _ = self._superseded_failures()
        return {i for (i,) in self.Job.select(self.Job.id).where(self.Job.state == FAILED).tuples()} - superseded

    def reports(self) -> list[Job]:
        """Analysed photos with their own report (duplicates point at another job's)."""
        return list(self.Job.select().where((self.Job.state == DONE) & self.Job.duplicate_of.is_null())
                    .order_by(self.Job.finished_at.desc()))

    def jobs(self) -> list[Job]:
        return list(self.Job.select().order_by(self.Job.id))

    # -- reference portfolios (rag) -------------------------------------------------------------
    def references(self, advisor_id: str) -> list[Reference]:
        """The advisor's indexed references, by path. Rows: see `Reference`; `reference_profile(row)` reads one."""
        ref = self.Reference
        return list(ref.select().where(ref.advisor == advisor_id).order_by(ref.path))

    def reference_counts(self) -> dict[str, int]:
        ref = self.Reference
        q = ref.select(ref.advisor, fn.COUNT(ref.id).alias("n")).group_by(ref.advisor)
        return {row["advisor"]: row["n"] for row in q.dicts()}

    def reference_at(self, advisor_id: str, path: Path | str) -> Reference | None:
        return self.Reference.get_or_none((self.Reference.advisor == advisor_id) & (self.Reference.path == str(path)))

    def references_with_hash(self, advisor_id: str, sha256: str) -> list[Reference]:
        """This advisor's rows with this content (the file itself, or a renamed or copied twin), newest first."""
        ref = self.Reference
        return list(ref.select().where((ref.advisor == advisor_id) & (ref.sha256 == sha256))
                    .order_by(ref.indexed_at.desc()))

    @writes
    def upsert_reference(self, *, advisor: str, path: Path | str, sha256: str, scores: dict[str, int],
                         comments: dict[str, str] | None, source: str, model_id: str | None,
                         embedding: bytes | None) -> Reference:
        values = dict(sha256=sha256, scores=scores, comments=comments, source=source, model_id=model_id,
                      embedding=embedding, indexed_at=time.time())
        with self._tx():
            row = self.reference_at(advisor, path)
            if row is None:
                return self.Reference.create(advisor=advisor, path=str(path), **values)
            self.Reference.update(**values).where(self.Reference.id == row.id).execute()
        return self.Reference.get_by_id(row.id)

    @writes
    def remove_reference(self, advisor_id: str, path: Path | str) -> bool:
        return self.Reference.delete().where((self.Reference.advisor == advisor_id) &
                                             (self.Reference.path == str(path))).execute() > 0

    # -- daemon facts for status --------------------------------------------------------------
    def follow_home(self, home: Path, inbox: Path, outbox: Path) -> int:
        """A home moved or copied as a folder (`mv`, the Finder, a new disk) brings its ledger along, whose paths
        name the old place: status would call every failure record unwritten and `retry` would find no photo.
        Rebase every path under the home the ledger last served onto `home`; paths outside it (an inbox on a
        share) stay. Returns how many paths moved. A shared ledger is left alone: each Mac has its own home, and
        the shared folders keep one path for all of them; so is a SQLite file outside the home (`db_path`)."""
        if self.shared:
            return 0
        if not self.path.resolve().is_relative_to(Path(home).resolve()):
            self._serves_one_home(Path(home))  # a ledger kept outside the home (var_dir, db_path) did not move with it
            return 0
        home_s = str(Path(home).resolve())
        recorded = self.events().get(HOME_EVENT)
        old = recorded[0] if recorded else self._home_before_it_was_recorded(Path(home), Path(inbox), Path(outbox))
        if old == home_s:
            return 0
        job, ref = self.Job, self.Reference
        columns = [(job, job.source_path), (job, job.output_dir), (job, job.report_json), (job, job.report_html),
                   (ref, ref.path)]

        def rebase() -> int:
            moved = 0
            with self._tx():
                if old:
                    prefix = old.rstrip("/") + "/"
                    for model, col in columns:  # substr, not LIKE: a path may hold % or _
                        moved += model.update({col: Value(home_s + "/").concat(fn.substr(col, len(prefix) + 1))}) \
                            .where(fn.substr(col, 1, len(prefix)) == prefix).execute()
                    # Reasons name commands for the home (`mondrian --home /old analyze …`): pasted, they would
                    # find no home there any more.
                    job.update({job.error: fn.replace(job.error, old, home_s)}).where(job.error.is_null(False)).execute()
                self._put_event(HOME_EVENT, home_s)
            return moved

        try:
            moved = self._write("where the home is", rebase)
        except (LedgerUnavailable, OperationalError) as exc:
            if not old:
                return 0  # only the record of a home that did not move: the next open makes it
            # Read with the old paths, status would call records missing and retry would find nothing: stop here.
            why = str(exc) if isinstance(exc, LedgerUnavailable) else (
                f"the ledger {self.path} cannot be written ({outside_fault(exc) or exc}). Make it writable, then run "
                f"the command again")
            raise LedgerUnavailable(f"this home was at {old} before and its ledger must follow it, but {why}") \
                from None
        if old and moved:
            log.info("the home moved from %s to %s: %d path(s) in the ledger follow it", old, home_s, moved)
        return moved

    def _serves_one_home(self, home: Path) -> None:
        """A SQLite ledger outside its home (var_dir or db_path set to a shared folder) serves that one home: the
        daemon of a second home on it took the first home's queued photos and failed them as outside its inbox,
        after which the first home's daemon passed them by as failed. Refused while the home it serves is there."""
        home_s = str(home.resolve())
        recorded = self.events().get(HOME_EVENT)
        other = recorded[0] if recorded else None
        if other and other != home_s and _same_folder(Path(other), home):
            other = home_s  # one folder spelled two ways (a Mac's disk ignores case; é composed or not)
        if other and other != home_s and ((Path(other) / "mondrian.toml").exists() or (Path(other) / "inbox").is_dir()):
            raise LedgerUnavailable(
                f"the ledger {self.path} is the Mondrian home {other}'s, not this home's ({home_s}): two homes "
                f"cannot share one ledger (each daemon would take the other's photos). Give this home a var_dir "
                f"(or db_path) of its own in {home / 'mondrian.toml'}")
        if other != home_s:
            try:
                self._write("where the home is", lambda: self._put_event(HOME_EVENT, home_s))
            except (LedgerUnavailable, OperationalError):
                pass  # a read-only look (status of a ledger it cannot write): nothing to record

    def _home_before_it_was_recorded(self, home: Path, inbox: Path, outbox: Path) -> str | None:
        """For a ledger written before the home was recorded: the home of its latest inbox photo (its source_path
        ends with the inbox's place in the home and the photo's rel_path), else of its latest report (in a folder
        of the outbox). Folders configured outside the home tell nothing about it."""
        job, home = self.Job, home.resolve()
        clues = (
            (inbox, job.select(job.source_path, job.rel_path).where(job.owns_file == True),  # noqa: E712
             lambda row: (row.source_path, row.rel_path)),
            (outbox, job.select(job.report_json).where(job.report_json.is_null(False)),
             lambda row: (row.report_json, str(Path(row.report_json).relative_to(Path(row.report_json).parents[1])))),
        )
        for folder, query, path_and_tail in clues:
            try:
                inside = folder.resolve().relative_to(home)
            except ValueError:
                continue
            last = query.order_by(job.id.desc()).first()
            if last is None:
                continue
            path, rel = path_and_tail(last)
            tail = "/" + "/".join(p for p in (str(inside), rel) if p != ".")
            if path.endswith(tail):
                return path[:-len(tail)]
        return None

    @writes
    def set_event(self, key: str, value: Any) -> None:
        self._put_event(key, value)

    def _put_event(self, key: str, value: Any) -> None:
        e = self.Event
        e.insert(key=key, value=json.dumps(value), at=time.time()).on_conflict(
            conflict_target=[e.key], preserve=[e.value, e.at]).execute()

    def events(self) -> dict[str, tuple[Any, float]]:
        return {e.key: (json.loads(e.value), e.at) for e in self.Event.select()}

    def integrity_check(self) -> str:
        if self.shared:
            return "ok"  # the server checks its own pages
        return self.db.execute_sql("PRAGMA integrity_check").fetchone()[0]


def _one_less(column: Any) -> Any:
    """`column - 1`, never below 0, in SQL both engines know (SQLite's two-argument MAX is not PostgreSQL's)."""
    return Case(None, [(column > 0, column - 1)], 0)


def job_dict(job: Job) -> dict[str, Any]:
    d = {f: getattr(job, f) for f in job._meta.sorted_field_names}
    d["fallbacks"] = json.loads(job.fallbacks) if job.fallbacks else []
    return d


__all__ = ["Ledger", "LeaseLost", "WorkerRow", "Job", "Reference", "STATES", "QUEUED", "RUNNING", "DONE", "FAILED",
           "GONE", "job_dict",
           "SCHEMA_VERSION", "SQL"]
