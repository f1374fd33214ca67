"""One share, one path: the Macs of a studio must reach the shared inbox and outbox by the same path.

The shared ledger names photos by their paths. A Mac that mounts the share elsewhere (macOS mounts it as
`/Volumes/Studio-1` when a leftover folder holds `/Volumes/Studio`) queues every photo a second time under its own
path, and each copy the others take first ends on it as "removed before analysis". A Mac whose configured path is
not the share at all (not mounted: a local folder of that name in its place) takes the others' photos for gone.
Neither can be seen from the ledger alone, so each node leaves a mark in the outbox (`.nodes/<its id>`) and
announces in the ledger the path it reaches it by: a mark of a live node seen under another path, or missing under
the same path, stops the node with what to fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Callable

from ..config import CONFIG_NAME, Config
from ..fsutil import atomic_write_text
from ..ledger import Ledger
from ..testhooks import share_settle_seconds

log = logging.getLogger("mondrian.share")

MARKS = ".nodes"
# A share's client may cache a folder's listing (macOS's SMB client for up to a minute): another node's mark counts as
# missing only once it is older than this, and only if it is still missing when looked for again.
SETTLE_SECONDS = 60.0
LOOK_AGAIN_SECONDS = 10.0  # twice the beat at which a node puts back its own mark deleted from outside


class SharedOutbox:
    def __init__(self, cfg: Config, ledger: Ledger):
        self.cfg, self.ledger = cfg, ledger
        self.settle = share_settle_seconds(SETTLE_SECONDS)
        self.look_again = LOOK_AGAIN_SECONDS
        self.mine = self._mark(ledger.worker_id())
        self._missing: dict[str, tuple[float, float]] = {}  # worker id: (first seen missing, its marked_at then)
        self._planted = False
        self._warned = False

    def _mark(self, worker_id: str) -> Path:
        return self.cfg.outbox / MARKS / hashlib.sha1(worker_id.encode()).hexdigest()[:16]

    def plant(self) -> None:
        """This node's mark, then its announcement (never the other way round: an announced node with no mark
        would read as one on another folder)."""
        note = {"host": socket.gethostname(), "pid": os.getpid(), "outbox": str(self.cfg.outbox)}
        try:
            self.mine.parent.mkdir(exist_ok=True)
            atomic_write_text(self.mine, json.dumps(note) + "\n", durable=False)
        except OSError as exc:
            if not self._warned:  # tried again at every beat: said once
                self._warned = True
                log.warning("could not leave this node's mark in %s (%s): the other Macs cannot check that they "
                            "reach this outbox by the same path", self.mine.parent, exc.strerror or exc)
            return
        self.ledger.announce(str(self.cfg.outbox))
        self._planted = True

    def keep(self) -> None:
        """The mark put back if it was deleted from outside (with a new announcement, so nobody takes its short
        absence for another folder)."""
        if not self._planted or not self.mine.exists():
            self.plant()

    def remove(self) -> None:
        try:
            self.mine.unlink(missing_ok=True)
        except OSError:
            pass  # the share is gone: the mark of a node that is not live is never looked at

    def conflict(self) -> str | None:
        """None while every live node that announced itself reaches this outbox by this node's path, else what to
        fix."""
        mine = str(self.cfg.outbox)
        try:
            now, others = self.ledger.clock(), self.ledger.other_nodes()
        except Exception as exc:  # the server restarting: the heartbeat and the worker say so; looked at next beat
            log.debug("could not read the other nodes: %s", exc)
            return None
        for row, said in others:
            theirs = said.get("outbox")
            try:
                seen = self._mark(row.id).exists()
            except OSError:
                continue  # cannot look (the share is away): nothing to conclude
            if seen and theirs != mine:
                return (f"this Mac reaches the studio's outbox as {mine}, and {row.host} (pid {row.pid}) as {theirs}: "
                        f"every Mac must use the same path, or each queues the photos again under its own path and "
                        f"records the copies the others took as removed. Mount the share on every Mac at one path "
                        f"(on macOS a leftover folder in /Volumes makes it mount as \"…-1\": eject the share, remove "
                        f"the leftover folder, connect again), then set inbox and outbox in "
                        f"{self.cfg.home / CONFIG_NAME} to the same paths on every Mac")
            if seen or theirs != mine or now - float(said.get("marked_at", now)) < self.settle:
                self._missing.pop(row.id, None)
                continue
            first = self._missing.get(row.id)
            if first is None or first[1] != said.get("marked_at"):
                self._missing[row.id] = (time.monotonic(), said.get("marked_at"))
            elif time.monotonic() - first[0] >= self.look_again:
                return (f"{mine} on this Mac is not the outbox that {row.host} (pid {row.pid}) uses at the same path: "
                        f"its mark {self._mark(row.id).name} is not in {self.cfg.outbox / MARKS}. The studio's share "
                        f"is probably not mounted here, and a local folder stands in its place. Mount the share (Finder: "
                        f"Go > Connect to Server), then start Mondrian again")
        return None

    def conflict_at_start(self, wait: Callable[[float], bool]) -> str | None:
        """`conflict`, looking again after a pause where a live node's mark is missing (`wait` returns True when
        the daemon is asked to stop meanwhile)."""
        found = self.conflict()
        if found is None and self._missing:
            log.info("another node's mark is missing from %s: looking again in %.0f s before starting",
                     self.cfg.outbox / MARKS, self.look_again)
            if wait(self.look_again):
                return None
            found = self.conflict()
        return found
