"""outbox/index.html: every report and every standing failure, kept up to date incrementally.

The outbox itself is the truth: a report folder holding `report.json`, a `failed/<name>.error.json` record. What the
index shows of each is summarised once and kept in `var/outbox-index.json`, keyed by the file's identity (inode,
mtime, size), so refreshing after a job costs one read of that summary, one listing of the outbox and of failed/,
and one read of whatever is new, whatever the number of reports. Because every refresh starts from the listing, a
report folder the user deleted disappears, one published by a process that was killed before it refreshed appears,
and a damaged or missing summary file is rebuilt from the reports. The ledger only says which failures still stand
(not those whose photo was put back and analysed since).

A refresh still lists and renders every entry, so after each job it would cost more the more reports there are (a
quadratic run over a large inbox). Jobs call `changed()`, which refreshes at once while the outbox is small, and
otherwise once the jobs since the last refresh are a twentieth of what it listed, or it is STALE_SECONDS old (and at
least COST_FACTOR times its own duration): each job then pays a bounded share, however many reports there are. The
worker calls `flush()` whenever the queue is empty and when it stops, so the index is complete whenever Mondrian
is idle; a start rewrites it anyway.

Failure pages (`failed/<name>.error.html`) are rendered here from their records, so every listed failure has one,
including those recorded before pages existed or by a process killed between its record and its page.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fsutil import NotOwn, atomic_write_text, own_folder_inside, read_regular_file
from ..intake.inbox import OUTBOX_RESERVED
from .failures import CAUSES, advice, cause_of
from .report import (FailureEntry, IndexEntry, ReportInvalid, render_failure_html, rerender_report_html,
                     write_index)

if TYPE_CHECKING:
    from ..config import Config
    from ..ledger import Ledger

log = logging.getLogger("mondrian.worker")

CACHE_NAME = "outbox-index.json"
CACHE_VERSION = 1
RECORD_SUFFIX = ".error.json"
PAGE_SUFFIX = ".error.html"
MAX_RECORD_BYTES = 4 * 1024 * 1024  # a report.json is a few kB; anything far larger is not one of ours
MAX_CACHE_BYTES = 1024 * 1024 * 1024  # ~300 bytes a report: room for millions
READ_SECONDS = 10.0
BATCH_SHARE = 20  # refresh once the jobs not yet shown are 1/BATCH_SHARE of the entries listed
STALE_SECONDS = 10.0  # ... or the index is this old
COST_FACTOR = 20  # ... and older than this many times the last refresh took: the index takes <= 1/20 of the time
REPORT_KEYS = frozenset(IndexEntry.__dataclass_fields__) - {"thumb"}  # the thumbnail is looked for at each refresh
THUMBS = ("thumb.jpg", "preview.jpg")  # the card's image: the thumbnail, else the larger preview, else none


def page_name(record_name: str) -> str:
    """`x.jpg.error.json` -> `x.jpg.error.html`, the failure page beside its record."""
    return record_name[: -len(RECORD_SUFFIX)] + PAGE_SUFFIX


def _key(st: os.stat_result) -> list[int]:
    return [st.st_ino, st.st_mtime_ns, st.st_size]


def _read_json(path: Path, max_bytes: int = MAX_RECORD_BYTES) -> dict[str, Any] | None:
    try:
        data = json.loads(read_regular_file(path, max_bytes=max_bytes, timeout_s=READ_SECONDS))
    except (OSError, ValueError, MemoryError, RecursionError):  # RecursionError: `[[[[…` nested past the stack
        return None
    return data if isinstance(data, dict) else None


def report_summary(folder: str, report: dict[str, Any]) -> dict[str, Any] | None:
    """What the index shows of one report (None if it is not a report Mondrian wrote)."""
    try:
        mode, model, advisor = report["mode"], report["model"], report["advisor"]
        refs = report.get("references")
        return {"folder": folder, "file": str(report["photo"]["file"]), "advisor_id": str(advisor["id"]),
                "advisor_name": str(advisor.get("name") or advisor["id"]),
                "mode_requested": str(mode["requested"]), "mode_effective": str(mode["effective"]),
                "grade": int(report["overall_grade"]), "created_at": str(report.get("created_at", "")),
                "smoke": bool(model.get("smoke")), "adapter": model.get("adapter") or None,
                "references": len(refs) if isinstance(refs, list) else 0}
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError):  # Overflow: a grade edited to 1e999
        return None


def published_report(path: Path, job_id: int) -> dict[str, Any] | None:
    """The report `path` (a report folder's report.json) holds, if it is job `job_id`'s and one the index lists;
    else None. The one rule for whether a job's report is still there: one the user deleted, moved away, corrupted
    (`{junk`, `[]`) or replaced with another job's is gone alike, so the photo is critiqued again rather than
    filed as a duplicate of a page the index does not show, and no page links to it as an earlier critique."""
    try:  # as `_reports` lists them: a real folder holding a regular report.json, neither of them a link
        if not (stat.S_ISDIR(os.lstat(path.parent).st_mode) and stat.S_ISREG(os.lstat(path).st_mode)):
            return None
    except OSError:
        return None
    report = _read_json(path)
    if report is None or report.get("job_id") != job_id or report_summary(path.parent.name, report) is None:
        return None
    return report


def _earlier_links(report: dict[str, Any]) -> list[list[Any]]:
    """[job id, report folder] of each earlier critique a report links, as report.json records them."""
    out = []
    for e in report.get("earlier_reports") or []:
        href = e.get("report") if isinstance(e, dict) else None
        parts = href.split("/") if isinstance(href, str) else []
        job = _job_id(e.get("job_id")) if isinstance(e, dict) else None
        if job is not None and len(parts) == 3 and parts[0] == ".." and parts[2] == "report.html":
            out.append([job, parts[1]])
    return out


def _job_id(value: object) -> int | None:
    """A record's job id, if it is one: a record edited by hand to hold `[3]` or `{}` must not stop the index (the
    ledger's set of standing ids is looked up with it)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _is_file(path: Path) -> bool:
    """A plain file (never a link, which may lead out of the outbox) is there."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def failure_summary(name: str, record: dict[str, Any]) -> dict[str, Any]:
    """What the index and the failure page show of one failure record; the cause is the record's own, or (for a
    record written before causes were recorded) read from its reason."""
    reason = str(record.get("reason") or "")
    cause = CAUSES.get(str(record.get("cause"))) or cause_of(reason, advisor_source=record.get("advisor_source"),
                                                              mode_source=record.get("mode_source"))
    recorded = bool(record.get("cause"))  # else the advice of the time was generic: give the cause's own
    step = (str(record.get("next_step") or "") if recorded else "") or advice(cause, from_inbox=record.get(
        "from_inbox", True) is not False)
    return {"name": name, "file": str(record.get("file") or name), "reason": reason, "cause": cause.key,
            "title": cause.title, "next_step": step,
            "what_to_do": (str(record.get("what_to_do") or "") if recorded else "") or step,
            "kind": str(record.get("kind") or "permanent"), "advisor": str(record.get("advisor") or ""),
            "failed_at": str(record.get("failed_at") or ""), "job_id": _job_id(record.get("job_id")),
            "photo_at_fault": cause.photo_at_fault}


FAILURE_KEYS = frozenset(failure_summary("x", {}))


class OutboxIndex:
    """Rebuilds outbox/index.html (and any missing failure page), at O(1) reads a refresh and a bounded share of
    each job's time (`changed`, `flush`)."""

    def __init__(self, cfg: "Config", ledger: "Ledger | None" = None):
        self.cfg = cfg
        self.ledger = ledger
        self.cache_path = cfg.var_dir / CACHE_NAME
        self.reads = 0  # reports and records read by the last refresh (the cache's hit rate, for tests and logs)
        self.refreshes = 0  # for tests: how many refreshes ran
        self.pending = 0  # jobs published since the last refresh
        self._listed = 0  # entries the last refresh listed
        self._last_at = float("-inf")  # monotonic time the last refresh ended
        self._last_cost = 0.0  # seconds it took
        self._seen_state: tuple[int, ...] | None = None  # the outbox as the last refresh left it
        self.where: dict[int, str] = {}  # job id -> the report folder holding its report, as the last refresh found

    def changed(self) -> None:
        """A job's outcome was published: refresh now, or soon enough that the index costs each job a bounded
        share (see the module's docstring). Never raises."""
        self.pending += 1
        age = time.monotonic() - self._last_at
        if self.pending * BATCH_SHARE >= self._listed or age >= max(STALE_SECONDS, COST_FACTOR * self._last_cost):
            self.refresh()

    def _outbox_state(self) -> tuple[int, ...]:
        """When the outbox and failed/ last had an entry added, removed or renamed (a report folder deleted or
        renamed by hand changes this and nothing else Mondrian watches)."""
        out = []
        for folder in (self.cfg.outbox, self.cfg.failed_dir):
            try:
                out.append(os.stat(folder).st_mtime_ns)
            except OSError:
                out.append(-1)
        return tuple(out)

    def follow_outbox(self) -> None:
        """Refresh if the outbox changed since the last refresh (the daemon's periodic rescan calls this): a report
        folder deleted while the queue was empty stayed on the index, a dead link, until the next photo came."""
        if self._outbox_state() != self._seen_state:
            self.refresh()

    def folders(self) -> dict[int, str]:
        """Job id -> the report folder holding its report now (a folder renamed by hand is followed): the last
        refresh's, refreshed first if the outbox changed since, no more often than the index's share of the time
        allows (every report published changes the outbox: a bulk inbox asking for each photo refreshed per photo)."""
        if self._seen_state is None or time.monotonic() - self._last_at >= max(STALE_SECONDS,
                                                                               COST_FACTOR * self._last_cost):
            self.follow_outbox()
        return self.where

    def flush(self) -> None:
        """Refresh if a published job is not shown yet (the queue is empty, or Mondrian stops). Never raises."""
        if self.pending:
            self.refresh()

    # -- the summary file -----------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        data = _read_json(self.cache_path, MAX_CACHE_BYTES)
        if (not data or data.get("version") != CACHE_VERSION or data.get("outbox") != str(self.cfg.outbox)
                or not isinstance(data.get("reports"), dict) or not isinstance(data.get("failures"), dict)):
            return {"reports": {}, "failures": {}}
        return data

    def _save(self, reports: dict[str, Any], failures: dict[str, Any]) -> None:
        doc = {"version": CACHE_VERSION, "outbox": str(self.cfg.outbox), "reports": reports, "failures": failures}
        try:
            atomic_write_text(self.cache_path, json.dumps(doc, ensure_ascii=False, separators=(",", ":")),
                              durable=False)  # a cache: a lost or stale one only means reports are read again
        except OSError as exc:  # only a cache: the next refresh reads the reports again
            log.debug("could not save %s: %s", self.cache_path, exc)

    # -- listing ------------------------------------------------------------------------------
    def _reports(self, cached: dict[str, Any]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        made: dict[str, int] = {}  # report.json's ctime
        try:
            entries = list(os.scandir(self.cfg.outbox))
        except OSError as exc:
            log.warning("could not list %s: %s", self.cfg.outbox, exc)
            return found
        for entry in entries:
            name = entry.name
            if name.startswith(".") or name.lower() in OUTBOX_RESERVED:
                continue
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                st = os.stat(os.path.join(entry.path, "report.json"), follow_symlinks=False)
            except OSError:
                continue  # not a report folder (yet)
            if not stat.S_ISREG(st.st_mode):
                continue
            key = _key(st)
            hit = cached.get(name)
            report = None
            if not (isinstance(hit, dict) and hit.get("key") == key and isinstance(hit.get("entry"), dict)
                    and set(hit["entry"]) == REPORT_KEYS and isinstance(hit.get("earlier"), list)):
                self.reads += 1
                report = _read_json(Path(entry.path) / "report.json")
                summary = report_summary(name, report) if report else None
                if summary is None:
                    continue
                hit = {"key": key, "entry": summary, "job": _job_id(report.get("job_id")),
                       "earlier": _earlier_links(report)}
            found[name] = ({**hit}, report)
            made[name] = st.st_ctime_ns
        # Where each job's report is now: a folder the photographer renamed is followed, a deleted one is gone. Of
        # two folders holding one job's report, the one written first: a copy's report.json is newer (a rename keeps
        # it as it was).
        holders: dict[int, list[str]] = {}
        for name in sorted(found, key=lambda n: (made[n], n)):
            job = found[name][0].get("job")
            if isinstance(job, int):
                holders.setdefault(job, []).append(name)
        self.where = {job: names[0] for job, names in holders.items()}
        return {name: self._follow_files(hit, self.cfg.outbox / name, report, holders)
                for name, (hit, report) in found.items()}

    def _follow_files(self, hit: dict[str, Any], folder: Path, report: dict[str, Any] | None,
                      holders: dict[int, list[str]]) -> dict[str, Any]:
        """A report page links its original and shows its preview: once the photographer deleted or moved either
        away (or put it back), the page is rendered again from report.json, so that it links only what is there.
        So too its "Earlier critiques" once one of their folders was renamed (the link follows) or deleted (it goes).
        Three lstats a report and refresh; a page is rewritten only when what it can link changed (or, for a report
        not seen before, when something is missing: it was written with both)."""
        present = [_is_file(folder / os.path.basename(str(hit["entry"].get("file") or ""))),
                   _is_file(folder / "preview.jpg"),
                   # The page itself, deleted while its report.json stays: the index (and a duplicate's record) link
                   # to it, so it is written again.
                   _is_file(folder / "report.html")]
        # The folder it was linked to while that one still holds the report (a copy of it elsewhere does not take
        # the link away), else where the report is now. What the page shows is known only once this index has
        # rendered it: a page read afresh (a lost cache) is rendered again if it links any earlier critique.
        shown = hit.get("earlier_shown")
        linked = {job: name for job, name in shown or []}

        def now(job: int, recorded: str) -> str | None:
            held = holders.get(job, [])
            return next((n for n in (linked.get(job), recorded) if n in held), held[0] if held else None)

        earlier = [[job, now(job, recorded)] for job, recorded in hit["earlier"]]
        known = hit.get("files")
        if isinstance(known, list) and len(known) == 2 and present[2]:
            known = [*known, True]  # an index cached before pages were followed: nothing to rewrite for that
        if (known == present or (known is None and all(present))) and earlier == (shown if earlier else []):
            hit["files"] = present
            return hit
        if report is None:
            self.reads += 1
            report = _read_json(folder / "report.json")
        try:
            if report is None:
                raise ReportInvalid("unreadable")
            rerender_report_html(folder, report, original=present[0], preview=present[1],
                                 earlier={job: name for job, name in earlier})
            hit["files"] = [*present[:2], True]
            hit["earlier_shown"] = earlier
        except ReportInvalid:  # edited by hand past what a page can show: its page stays as it was
            hit["files"] = present
            hit["earlier_shown"] = earlier
        except OSError as exc:
            log.warning("could not rewrite %s: %s", folder / "report.html", exc)
        return hit

    def _failures(self, cached: dict[str, Any]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        failed = self.cfg.failed_dir
        try:
            own_folder_inside(failed, self.cfg.outbox)  # pages are written there: never through a link
            entries = list(os.scandir(failed))
        except (OSError, NotOwn):
            return found
        names = {e.name for e in entries}
        for entry in entries:
            name = entry.name
            if not name.endswith(RECORD_SUFFIX) or name.startswith(".") or name + RECORD_SUFFIX in names:
                continue  # the last: a failed file that is only named like a record (its own record is beside it)
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            key = _key(st)
            hit = cached.get(name)
            if not (isinstance(hit, dict) and hit.get("key") == key and isinstance(hit.get("entry"), dict)
                    and set(hit["entry"]) == FAILURE_KEYS):
                self.reads += 1
                record = _read_json(Path(entry.path))
                if record is None:
                    continue
                hit = {"key": key, "entry": failure_summary(name[: -len(RECORD_SUFFIX)], record)}
                hit["original"] = self._write_page(failed / page_name(name), hit["entry"])
            else:
                # The page links the photo kept beside it only while it is there: one the photographer deleted or
                # moved away since (or put back) gets its page again, as does a page deleted or never written.
                hit = {**hit}
                if page_name(name) not in names or hit.get("original") != _is_file(failed / hit["entry"]["name"]):
                    hit["original"] = self._write_page(failed / page_name(name), hit["entry"])
            found[name] = hit
        return found

    def _write_page(self, path: Path, entry: dict[str, Any]) -> bool | None:
        """Write a failure page; return whether it links the original (None: not written, try again next time)."""
        try:
            # linked only if it is a plain file here: never a link that leads out of the outbox
            has_original = _is_file(path.parent / entry["name"])
            atomic_write_text(path, render_failure_html(FailureEntry.from_summary(entry), has_original=has_original))
        except OSError as exc:
            log.warning("could not write the failure page %s: %s", path.name, exc)
            return None
        return has_original

    def _thumb(self, folder: str) -> str | None:
        """The image a report's card shows: never one the photographer deleted from its folder (a broken image).
        One lstat a report and refresh, as the listing already costs."""
        for name in THUMBS:
            if _is_file(self.cfg.outbox / folder / name):
                return name
        return None

    def _standing(self, failures: dict[str, Any]) -> list[dict[str, Any]]:
        """The failures that still stand: a record whose photo was put back and queued or analysed since (its
        job is no longer failed, or a later job has its file) is history, as `mondrian status` counts it."""
        entries = [f["entry"] for f in failures.values()]
        if self.ledger is None:
            return entries
        try:
            standing = self.ledger.standing_failure_ids()
        except Exception as exc:  # the ledger cannot be read now: show every record rather than none
            log.debug("could not read the ledger for the index: %s", exc)
            return entries
        return [e for e in entries if e["job_id"] in standing]

    # -- the index ------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Never raises: the index is a view of the outbox, and a problem with it must not fail a photo."""
        started = time.monotonic()
        self.pending = 0
        self.refreshes += 1
        try:
            self._refresh()
        except Exception:
            log.warning("could not update %s", self.cfg.outbox / "index.html", exc_info=True)
        self._last_at = time.monotonic()
        self._last_cost = self._last_at - started
        self._seen_state = self._outbox_state()  # after index.html is written: that write changes it too

    def _refresh(self) -> None:
        self.reads = 0
        cache = self._load()
        reports = self._reports(cache["reports"])
        failures = self._failures(cache["failures"])
        self._listed = len(reports) + len(failures)
        self._save(reports, failures)
        try:
            write_index(self.cfg.outbox, [IndexEntry(**r["entry"], thumb=self._thumb(name))
                                          for name, r in reports.items()],
                        [FailureEntry.from_summary(f) for f in self._standing(failures)])
        except OSError as exc:
            log.warning("could not update %s: %s", self.cfg.outbox / "index.html", exc)


__all__ = ["OutboxIndex", "page_name", "report_summary", "published_report", "failure_summary", "CACHE_NAME"]
