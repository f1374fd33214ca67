"""Notice photos in the inbox once they are completely written.

Filesystem events are only hints (FSEvents coalesces them, copies fire many, moves may arrive as creates,
some never arrive): every hinted path becomes a *candidate*, and a candidate is handed on only after its
size, mtime and ctime have stayed the same for the quiet time (measured on the monotonic clock: an mtime may be
years off). A full rescan at start-up and every `rescan_seconds` catches anything the events missed, and keeps
working if the observer thread dies.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from watchdog.events import (DirCreatedEvent, DirDeletedEvent, DirMovedEvent, FileClosedEvent, FileCreatedEvent,
                             FileDeletedEvent, FileModifiedEvent, FileMovedEvent, FileSystemEvent,
                             FileSystemEventHandler)
from watchdog.observers import Observer

from .. import testhooks
from .inbox import is_ignored, is_report_file
from ..hints import mondrian

log = logging.getLogger("mondrian.watcher")

# A hidden file created and removed at once on every liveness check: its events prove that the observer still
# delivers. An observer thread that is alive but delivers nothing (stalled) is restarted like a dead one.
# Each canary has a new name (`.mondrian-watch.<random>`) and is created only if nothing has that name: whatever
# someone put in the inbox (a link to one of their files) is never opened, truncated or removed.
CANARY_NAME = ".mondrian-watch"


@dataclass
class _Candidate:
    key: tuple[int, int, int]  # size, mtime, ctime: any change to the file changes one of them
    since: float  # monotonic time the key last changed; never compared with mtime, which may be far off


def _key(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _path_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 4096


# What changes a file or the tree. Not a file opened or closed unwritten: reading a file makes those, and the
# watcher itself reads what an event names (a report folder's report.json, to know it for one), so each read made
# two more events, for ever: a full core at idle with a report folder copied into the inbox (inotify, Linux).
EVENTS = [FileCreatedEvent, FileModifiedEvent, FileMovedEvent, FileDeletedEvent, FileClosedEvent,
          DirCreatedEvent, DirMovedEvent, DirDeletedEvent]
_READ_ONLY = ("opened", "closed_no_write")  # the same, for an observer that does not filter in the kernel


class _Hints(FileSystemEventHandler):
    def __init__(self, watcher: "InboxWatcher"):
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        testhooks.observer_fault(os.path.basename(os.fsdecode(event.src_path)))
        # An exception here would silently kill watchdog's dispatch thread: never let one out.
        try:
            if event.event_type in _READ_ONLY:
                return
            if os.path.basename(os.fsdecode(event.src_path)).startswith(CANARY_NAME):
                self.watcher.canary_seen_at = time.monotonic()
                return
            self.watcher.last_event_at = time.time()
            for attr in ("src_path", "dest_path"):
                raw = getattr(event, attr, None)
                if not raw:
                    continue
                path = self.watcher.from_watched(Path(os.fsdecode(raw)))
                if event.is_directory and event.event_type in ("created", "moved"):
                    self.watcher.note_tree(path)  # a folder moved in whole brings files without their own events
                elif not event.is_directory:
                    self.watcher.note(path)
        except Exception:  # pragma: no cover - defensive
            log.exception("ignored an error while handling %r", event)


class InboxWatcher:
    def __init__(self, inbox: Path, on_stable: Callable[[Path], None], quiet_seconds: float,
                 is_known: Callable[[Path], bool] = lambda p: False,
                 on_unreachable: Callable[[Path, str], None] = lambda p, why: None,
                 on_stable_many: Callable[[list[Path]], None] | None = None, make_within: Path | None = None):
        self.inbox = inbox
        self.make_within = make_within  # the home: an inbox inside it that was removed is made again
        self.on_stable = on_stable
        self.on_stable_many = on_stable_many  # if given, a poll's settled files in one call (one transaction)
        self.on_unreachable = on_unreachable  # called from poll(), with a reason a person can act on
        self._unreachable: dict[Path, str] = {}  # found by any thread, handed on by poll()
        self._told: set[Path] = set()  # unreachable or unreadable paths already handed on or logged
        self.quiet = quiet_seconds
        self.is_known = is_known  # already queued/running: no need to watch it settle
        self._lock = threading.Lock()
        self._pending: dict[Path, _Candidate] = {}
        self._observer: Observer | None = None
        self.last_event_at: float | None = None
        self.last_rescan_at: float | None = None
        self.inbox_missing = False  # said once, until it is back
        self.restarts = 0
        self._watched = inbox  # the folder the observer watches: the inbox, or the folder it links to
        self.watch_error: str | None = None  # why the observer could not be started, until it can
        self.canary_seen_at = 0.0
        self._bad_names: set[Path] = set()
        self._canary_sent_at: float | None = None

    # -- observer -----------------------------------------------------------------------------
    def start(self) -> bool:
        """Start watching. Returns False if the system refused (the inbox gone that moment, the inotify watch or
        instance limit reached): never raised, since the rescans keep the inbox covered, and `ensure_alive` tries
        again at each of them."""
        observer = Observer()
        try:
            # The folder itself, when the inbox is a link to it (`inbox -> /Volumes/Photos/inbox`): watchdog watches
            # a link as a link (IN_DONT_FOLLOW), which brings no event from inside the folder, so the observer was
            # taken for stalled and restarted at every rescan. Its events are named back under `self.inbox`.
            self._watched = Path(os.path.realpath(self.inbox))
            observer.schedule(_Hints(self), str(self._watched), recursive=True, event_filter=EVENTS)
            observer.daemon = True
            observer.start()
        except OSError as exc:
            self._observer = None
            self._cannot_watch(exc)
            return False
        self._observer = observer
        if self.watch_error is not None:
            log.info("watching the inbox %s for new files again", self.inbox)
            self.watch_error = None
        self._sweep_canaries()
        return True

    def _sweep_canaries(self) -> None:
        """Remove canaries a killed process left (SIGKILLed between creating and removing one): only empty plain
        files of this user with exactly a canary's name, never a link or anything someone else put there."""
        try:
            entries = list(os.scandir(self.inbox))
        except OSError:
            return
        for entry in entries:
            name = entry.name
            if not (name.startswith(CANARY_NAME + ".") and len(name) == len(CANARY_NAME) + 13
                    and all(c in "0123456789abcdef" for c in name[len(CANARY_NAME) + 1:])):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_size == 0 and st.st_uid == os.getuid():
                    os.unlink(entry.path)
            except OSError:
                pass

    def from_watched(self, path: Path) -> Path:
        """An event's path, named under the inbox as configured (the watch is on the folder a link leads to)."""
        watched = self._watched
        if watched == self.inbox:
            return path
        try:
            return self.inbox / path.relative_to(watched)
        except ValueError:
            return path

    def _cannot_watch(self, exc: OSError) -> None:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            why = "it is not there"  # said by rescan() (an unplugged drive); watched again once it is back
        elif exc.errno == errno.ENOSPC:
            why = ("the system's limit on watched folders is reached (inotify watch limit; other programs, Dropbox or "
                   "an editor, may use them up): raise it, e.g. `sudo sysctl fs.inotify.max_user_watches=524288`")
        elif exc.errno == errno.EMFILE:
            why = ("the system's limit on folder watchers is reached (inotify instance limit): raise it, e.g. "
                   "`sudo sysctl fs.inotify.max_user_instances=1024`")
        else:
            why = exc.strerror or str(exc)
        first = self.watch_error != why
        self.watch_error = why
        if first and exc.errno not in (errno.ENOENT, errno.ENOTDIR):
            log.warning("cannot watch the inbox %s for new files (%s); meanwhile photos are found by the periodic "
                        "rescan (rescan_seconds), and watching is tried again at each", self.inbox, why)

    def stop(self) -> None:
        obs, self._observer = self._observer, None
        if obs is not None:
            # In a helper thread: a stalled dispatch thread holds the lock that stop() needs, and shutting down
            # must not hang on it (both are daemon threads, so a stuck one does not keep the process alive).
            stopper = threading.Thread(target=obs.stop, name="observer-stop", daemon=True)
            stopper.start()
            stopper.join(timeout=2)
            obs.join(timeout=3)

    def observer_alive(self) -> bool:
        return self._observer is not None and self._observer.is_alive()

    def stalled(self) -> bool:
        """The last canary (sent at least a second ago) brought no event back."""
        sent = self._canary_sent_at
        return sent is not None and self.canary_seen_at < sent and time.monotonic() - sent >= 1.0

    def _send_canary(self) -> None:
        canary = self.inbox / f"{CANARY_NAME}.{secrets.token_hex(6)}"
        try:
            self._canary_sent_at = time.monotonic()
            fd = os.open(canary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.close(fd)
            os.unlink(canary)  # ours: created just now (were it swapped for a link, only the link goes)
        except OSError:  # a read-only inbox: liveness then rests on is_alive() and the rescans
            self._canary_sent_at = None

    def ensure_alive(self) -> bool:
        """Restart a dead or stalled observer, then send a new canary. Returns True if it had to restart."""
        alive = self.observer_alive()
        if alive and not self.stalled():
            self._send_canary()
            return False
        if self._observer is None and self.watch_error is not None:  # could not start: quietly try again
            if self.start():
                self.restarts += 1
                self._canary_sent_at = None
                self.rescan()
                self._send_canary()
            return True
        log.warning("the inbox observer %s; restarting it (rescans kept the inbox covered meanwhile)",
                    "stopped delivering events" if alive else "stopped")
        self._restart(alive)
        return True

    def renew(self) -> None:
        """The inbox folder was made anew (deleted and made again, its drive plugged back): the observer still
        watches the old folder and sees nothing of the new one, so photos dropped there waited for a rescan (up to
        two, while `status` called them arriving). Watch the new folder now, and take in what it holds."""
        log.info("watching the inbox folder made anew, %s", self.inbox)
        self._restart(self.observer_alive())

    def _restart(self, alive: bool) -> None:
        obs, self._observer = self._observer, None
        try:
            if obs is not None and alive:
                # Stalled: its dispatch thread may hold the observer's lock forever, so stop() could hang. Stop
                # its emitters (no more events queued for it) and leave the stuck daemon thread behind.
                obs.stopped_event.set()
                for emitter in list(obs.emitters):
                    emitter.stop()
            elif obs is not None:
                obs.stop()
                obs.join(timeout=0.5)
        except Exception:  # pragma: no cover - a dead observer may fail to stop
            log.debug("ignored an error while stopping the old observer", exc_info=True)
        self._canary_sent_at = None
        if self.start():
            self.restarts += 1
            self.rescan()
            self._send_canary()

    # -- candidates ---------------------------------------------------------------------------
    def note(self, path: Path) -> None:
        if is_ignored(path, self.inbox) or not self._name_ok(path):
            return
        try:
            st = os.lstat(path)
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                self._too_long(path, folder=False)
            elif exc.errno in (errno.EACCES, errno.EPERM):
                # A folder that can be listed but not entered (`chmod -R 644`): its names are seen, its files
                # cannot be looked at. The folder's failure, as for one that cannot be listed at all.
                self._walk_error(OSError(exc.errno, exc.strerror, str(path.parent)))
            with self._lock:
                self._pending.pop(path, None)  # deleted right after creation: nothing to do
            return
        if stat.S_ISDIR(st.st_mode):
            return  # folders are walked; pipes, devices and sockets are queued and fail with a reason
        key = _key(st)
        with self._lock:
            cand = self._pending.get(path)
            if cand is None or cand.key != key:
                self._pending[path] = _Candidate(key, time.monotonic())

    def _too_long(self, path: Path, folder: bool) -> None:
        """A path longer than the system allows cannot be opened, moved or even looked at: it stays where it is,
        and gets a failure (status lists it) instead of being skipped in silence."""
        length, limit = len(os.fsencode(path)), _path_max(self.inbox)
        what = "folder is nested so deeply" if folder else "file is nested so deeply"
        where = "look inside it" if folder else "read or move it"
        reason = (f"this {what} that its path is {length} bytes long, more than the {limit} this system allows, "
                  f"so Mondrian cannot {where}; move it nearer the top of the inbox")
        with self._lock:
            if path not in self._told:
                self._unreachable[path] = reason

    def _walk_error(self, exc: OSError) -> None:
        path = Path(os.fsdecode(exc.filename)) if exc.filename else self.inbox
        if exc.errno == errno.ENAMETOOLONG:
            self._too_long(path, folder=True)
            return
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return  # removed or replaced while the walk went by: nothing there to see
        if path != self.inbox and path.is_relative_to(self.inbox):
            # e.g. a folder without read permission: its photos cannot be seen. A failure (status lists it), not
            # only a log line; `mondrian retry --failed` clears it once the folder can be read.
            shown = Path(self.inbox.name, path.relative_to(self.inbox)).as_posix()
            reason = (f"Mondrian cannot look inside the folder {shown}/ ({exc.strerror or exc}), so its photos are "
                      f"not seen: make it readable (chmod u+rwx: its photos are moved out of it too); its photos are "
                      f"then queued, and `{mondrian()} retry --failed` clears this entry")
            with self._lock:
                if path not in self._told:
                    self._unreachable[path] = reason
            return
        with self._lock:
            first = path not in self._told
            self._told.add(path)
        if first:
            log.warning("cannot look inside the inbox %s (%s); no photo is seen until it can be read",
                        path, exc.strerror or exc)

    def _name_ok(self, path: Path) -> bool:
        """Linux lets a file name hold bytes that are not UTF-8 (macOS does not); such a path cannot be recorded,
        so it is left where it is, with one warning saying why."""
        try:
            str(path).encode("utf-8")
            return True
        except UnicodeEncodeError:
            if path not in self._bad_names:
                from ..references.indexer import not_utf8

                self._bad_names.add(path)
                log.warning("left alone: %s — %s", ascii(path.name), not_utf8(self.inbox, path))
            return False

    def note_tree(self, root: Path) -> None:
        if root != self.inbox and os.path.islink(root):
            # os.walk always lists its top, link or not. A link to a folder arrives here as a "created folder"
            # (watchdog reports the links inside a folder moved in as folders): walking it would queue every photo
            # it leads to under a second name (`album/up/IMG_1.jpg` for a link `up -> ..`), or a whole tree outside
            # the inbox. The link itself is refused with its reason, like any link to a folder.
            self.note(root)
            return
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=self._walk_error):
            dirnames[:] = [d for d in dirnames if not is_ignored(Path(dirpath) / d, self.inbox)]
            for name in filenames:
                self.note(Path(dirpath) / name)
            for name in dirnames:  # a link to a folder is never followed; it is refused with a reason instead
                if os.path.islink(os.path.join(dirpath, name)):
                    self.note(Path(dirpath) / name)

    def rescan(self) -> None:
        here = self.inbox.is_dir()
        inside = self.make_within is not None and self.make_within.is_dir() \
            and self.inbox.is_relative_to(self.make_within)
        if not here and inside and self.inbox_missing:
            # Removed by hand (`rm -rf inbox`) and still missing at a second look (not being replaced by a link
            # this moment): inside the home it is made again, as at start. Elsewhere a missing inbox is a drive
            # not connected, where a folder made now would sit on the startup disk.
            try:
                self.inbox.mkdir(parents=True, exist_ok=True)
                log.info("the inbox %s was removed; made it again", self.inbox)
                here = True
            except OSError as exc:
                log.warning("the inbox %s was removed and could not be made again: %s", self.inbox, exc)
        if not here and not self.inbox_missing:
            log.warning("the inbox %s is not there (%s); photos dropped there are picked up once it is back",
                        self.inbox, "removed? it is made again at the next look" if inside else
                        "a drive or network share that is not connected?")
        elif here and self.inbox_missing:
            log.info("the inbox %s is back; looking at what it holds", self.inbox)
        self.inbox_missing = not here
        self.note_tree(self.inbox)
        self.last_rescan_at = time.time()

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def poll(self) -> int:
        """Hand on every candidate that has been still for the quiet time. Returns how many."""
        now = time.monotonic()
        ready: list[Path] = []
        with self._lock:
            items = list(self._pending.items())
        for path, cand in items:
            try:
                st = os.lstat(path)
            except OSError:
                with self._lock:
                    self._pending.pop(path, None)
                continue
            if _key(st) != cand.key:
                with self._lock:
                    self._pending[path] = _Candidate(_key(st), now)
                continue
            if st.st_size == 0 and stat.S_ISREG(st.st_mode):
                # A zero-byte file is usually a copy that has not started; keep waiting a while longer.
                if now - cand.since < max(self.quiet * 5, 10.0):
                    continue
            if now - cand.since >= self.quiet:
                ready.append(path)
        with self._lock:
            unreachable, self._unreachable = self._unreachable, {}
            self._told.update(unreachable)
        for path, reason in unreachable.items():
            try:
                self.on_unreachable(path, reason)
            except Exception:  # one odd file must never stop the watcher (or the daemon's main loop)
                log.exception("could not record %s", path)
        batch: list[Path] = []
        for path in ready:
            with self._lock:
                self._pending.pop(path, None)
            try:
                if self.is_known(path) or is_report_file(path):
                    continue  # a report folder's own file is known only once its report.json has been copied too
                if self.on_stable_many is not None and len(ready) > 1:
                    batch.append(path)
                else:
                    self.on_stable(path)
            except Exception:  # one odd file must never stop the watcher (or the daemon's main loop)
                log.exception("could not queue %s", path)
        if batch:
            try:
                self.on_stable_many(batch)
            except Exception:  # a batch that fails is handed on one file at a time: only the odd one fails
                log.warning("could not queue %d files at once; queueing them one by one", len(batch))
                for path in batch:
                    try:
                        self.on_stable(path)
                    except Exception:
                        log.exception("could not queue %s", path)
        return len(ready)
