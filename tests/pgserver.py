"""A real, throw-away PostgreSQL server for the shared-ledger tests: initdb into a temporary folder, started on a
unix socket in that folder (no TCP port to collide with), one fresh database per test, stopped at the end."""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

_counter = itertools.count()


def pg_bin_dir() -> Path | None:
    """Where initdb, pg_ctl and postgres are: PATH, /usr/local/bin, else Debian's /usr/lib/postgresql/<newest>/bin."""
    found = shutil.which("initdb") or shutil.which("initdb", path="/usr/local/bin")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def _demote() -> tuple[Callable[[], None] | None, int | None]:
    """PostgreSQL refuses to run as root: there, run it as `nobody`."""
    if os.geteuid() != 0:
        return None, None
    nobody = pwd.getpwnam("nobody")

    def drop() -> None:
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    return drop, nobody.pw_uid


class PgServer:
    def __init__(self, bin_dir: Path, **env: str):
        """`env`: more environment for the server (LD_PRELOAD and FAKETIME: a server whose clock is off)."""
        self.bin = bin_dir
        # A short path: a unix socket's path must fit in 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="mondrian-pg-"))
        self.data = self.root / "data"
        self.preexec, uid = _demote()
        if uid is not None:
            os.chown(self.root, uid, -1)
        self.env = {**os.environ, "LC_ALL": "C", "PGTZ": "UTC", **env}

    def _run(self, *args: str) -> None:
        out = subprocess.run([str(a) for a in args], preexec_fn=self.preexec, env=self.env, capture_output=True,
                             text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({out.returncode}): {out.stdout}\n{out.stderr}")

    def start(self) -> None:
        self._run(self.bin / "initdb", "-D", self.data, "-U", "mondrian", "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        # fsync off: the tests prove the protocol, not the disk.
        opts = f"-k {self.root} -c listen_addresses='' -F -c max_connections=200"
        self._run(self.bin / "pg_ctl", "-D", self.data, "-o", opts, "-l", self.root / "server.log", "-w", "-t", "60",
                  "start")

    def bounce(self, down_s: float = 1.0) -> None:
        """A restart of the server (an update, a reboot of the NAS that runs it): every connection is cut."""
        import time

        self._run(self.bin / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")
        time.sleep(down_s)
        opts = f"-k {self.root} -c listen_addresses='' -F -c max_connections=200"
        self._run(self.bin / "pg_ctl", "-D", self.data, "-o", opts, "-l", self.root / "server.log", "-w", "-t", "60",
                  "start")

    def stop(self) -> None:
        try:
            self._run(self.bin / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, dbname: str) -> str:
        return f"postgresql://mondrian@/{dbname}?host={self.root}"

    def new_database(self) -> str:
        """A fresh empty database; returns its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(_counter)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)
