"""The routes: `POST /analyze` (the original design's contract), `GET /jobs/<id>`, `GET /health`."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

from .. import testhooks
from ..analysis.advisors import UnknownAdvisor, get_advisor, load_advisors
from ..config import MODES, Config
from ..fsutil import NotOwn
from ..intake.images import image_format  # importing it registers the HEIC opener: iPhone photos are recognised
from ..ledger import ACTIVE, Ledger, LedgerUnavailable
from ..outbox_room import OutboxBlocked, outbox_room
from . import upload
from .answers import answer, error, job_url
from .guard import LocalOnly
from .spool import Spool, spool_name
from ..hints import mondrian

log = logging.getLogger("mondrian.api")

POLL_SECONDS = 0.1
UPLOAD_GRACE_SECONDS = 6.0  # an upload under way when Mondrian stops: inside the server's grace (STOP_SECONDS)
ROUTES = "POST /analyze, GET /jobs/<id> and GET /health"
MAX_UPLOADS = 16  # uploads streaming at once; beyond it 503: stalled clients must not use up the open files
# How long an upload waits for a ledger it cannot write (a full disk, a lock another program holds) before the
# client is answered 503 with the reason: the daemon's own writes wait as long as it takes, a client should not.
LEDGER_PATIENCE_SECONDS = 10.0


@dataclass
class Door:
    """What the API may use of the daemon: its configuration, its ledger (the only way to the database), the stop
    flag, and a nudge that wakes the worker thread."""

    cfg: Config
    ledger: Ledger
    stopping: threading.Event
    wake: Callable[[], None]
    spool: Spool
    model_state: Callable[[], dict | None] = lambda: None  # this daemon's model: None until it is loaded


def _stopping() -> JSONResponse:
    response = error(503, "Mondrian is stopping and takes no new photos; send it again once it runs "
                          f"(`{mondrian()} service start`, or `{mondrian()} run`)")
    response.headers["Retry-After"] = "30"
    return response


def _busy(why: str, then: str = "send it again in a minute (or drop it into the inbox)") -> JSONResponse:
    response = error(503, f"Mondrian cannot take this photo now: {why}; {then}")
    response.headers["Retry-After"] = "30"
    return response


def _unwritable(exc: OSError, spool: Path) -> JSONResponse:
    """503 for an upload the spool could not take, with the fix for its cause: waiting a minute mends a burst of
    connections, not a full disk or a folder Mondrian may not write."""
    if isinstance(exc, NotOwn) or (isinstance(exc, FileNotFoundError) and exc.filename is None):
        return _busy(exc.strerror or str(exc), "then send it again")  # the spool's own words (Spool.usable)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return _busy(f"the disk that holds {spool} is full ({exc.strerror})", "free some space, then send it again")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return _busy(f"Mondrian may not write in {spool} ({exc.strerror})",
                     f"make it writable for the user that runs Mondrian (`chmod u+rwx {spool}`), then send it again")
    if exc.errno == errno.EROFS:
        return _busy(f"{spool} is on a disk mounted read-only", "mount it read-write, then send it again")
    return _busy(f"the upload could not be written ({exc.strerror or exc})")


def build_app(door: Door) -> LocalOnly:
    cfg = door.cfg
    # Each address with and without a trailing slash: Starlette's default answers `/analyze/` with a bare 307,
    # which `curl -F` (no -L) shows as nothing at all.
    app = FastAPI(title="Mondrian", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    uploading = [0]  # on the event loop's one thread: no lock

    stop_seen: list[float] = []

    def upload_deadline() -> float | None:
        """Once Mondrian is stopping, the time by which an upload must have arrived to be queued: before the
        server's own grace ends, where it would cancel the request and answer a bare 500."""
        if not door.stopping.is_set():
            return None
        if not stop_seen:
            stop_seen.append(time.monotonic() + UPLOAD_GRACE_SECONDS)
        return stop_seen[0]

    @app.post("/analyze/")
    @app.post("/analyze")
    async def analyze(request: Request) -> JSONResponse:
        if door.stopping.is_set():
            return _stopping()
        limit = cfg.max_file_bytes
        try:
            boundary = upload.check_headers(request.headers.get("content-type"),
                                            request.headers.get("content-length"), limit, str(request.base_url))
        except upload.Refused as exc:
            return error(exc.status, exc.message, **exc.extra)
        if uploading[0] >= MAX_UPLOADS:
            return _busy(f"{MAX_UPLOADS} uploads are arriving already")
        # An outbox that cannot take a report (full, read-only, unplugged) would hold the photo queued and the client
        # waiting for api_wait_seconds, to be told "still running": say why now instead.
        blocked = await run_in_threadpool(_outbox_problem, cfg)
        if blocked is not None:
            return _busy(*blocked)
        uploading[0] += 1
        slot = None
        try:
            slot = door.spool.new_slot()
            got = await upload.receive(request.stream(), boundary, door.spool.partial(slot), limit,
                                       testhooks.upload_idle_seconds(upload.IDLE_SECONDS), until=upload_deadline)
            job = await run_in_threadpool(_enqueue, door, slot, got, str(request.base_url), request.query_params)
        except upload.Refused as exc:
            door.spool.discard(slot)
            return error(exc.status, exc.message, **exc.extra)
        except upload.Stopping:
            door.spool.discard(slot)
            return _stopping()
        except ClientDisconnect:
            door.spool.discard(slot)
            return error(400, "the client went away before the upload was complete")
        except LedgerUnavailable as exc:
            door.spool.discard(slot)
            if door.stopping.is_set():
                return _stopping()
            log.error("an upload could not be queued: %s", exc)
            return _busy(str(exc).rstrip("."), "then send it again (or drop it into the inbox)")
        except OSError as exc:  # out of open files or disk space, or the spool gone: say so in JSON, and the fix
            if slot is not None:
                door.spool.discard(slot)
            log.error("an upload could not be taken: %s", exc)
            return _unwritable(exc, door.spool.folder)
        except BaseException:
            if slot is not None:
                door.spool.discard(slot)
            raise
        finally:
            uploading[0] -= 1
        door.spool.queued(slot)  # answered 202, its folder would outlive the photo: the server's tick removes it
        log.info("queued %s for %s (%s) from the API (job %d)", job.rel_path, job.advisor, job.requested_mode, job.id)
        door.wake()
        deadline = time.monotonic() + cfg.api_wait_seconds
        while job.state in ACTIVE and time.monotonic() < deadline and not door.stopping.is_set():
            await asyncio.sleep(POLL_SECONDS)
            if await request.is_disconnected():
                # Nobody to answer: stop asking the ledger ten times a second for the rest of api_wait_seconds.
                log.info("the client of job %d went away before its report; the photo is analysed all the same "
                         "(GET %s)", job.id, job_url(job.id))
                break
            job = await run_in_threadpool(door.ledger.get, job.id)
        if job.state not in ACTIVE:
            door.spool.release(slot)
        return await run_in_threadpool(answer, job, waited_out=job.state in ACTIVE, stopping=door.stopping.is_set())

    # HEAD too: monitors and `curl -I` ask with it, and HTTP wants every GET answered to a HEAD.
    @app.api_route("/jobs/{job_id}/", methods=["GET", "HEAD"])
    @app.api_route("/jobs/{job_id}", methods=["GET", "HEAD"])
    async def job_status(job_id: str) -> JSONResponse:
        number = int(job_id) if job_id.isascii() and job_id.isdigit() and len(job_id) < 19 else None
        job = None if number is None else await run_in_threadpool(_job_or_none, door.ledger, number)
        if job is None:
            return error(404, f"there is no job {job_id[:40]!r} in this Mondrian's ledger (job ids are the numbers "
                              f"`job_id` in its answers)")
        return await run_in_threadpool(answer, job, stopping=door.stopping.is_set())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Every answer is JSON with an `error`, as the README promises: also a wrong address or method.
        if exc.status_code == 404:
            message = f"no such address {request.url.path[:80]!r}; Mondrian answers {ROUTES}"
        elif exc.status_code == 405:
            message = f"{request.method} is not how to ask {request.url.path[:80]!r}; Mondrian answers {ROUTES}"
        else:
            message = str(exc.detail)
        response = error(exc.status_code, message)
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug of ours still answers in JSON, as every other error does (a client parsing `error` gets a line).
        log.error("API: %s %s failed: %s: %s", request.method, request.url.path[:80], type(exc).__name__, exc)
        return error(500, f"Mondrian could not answer this request ({type(exc).__name__}); the daemon's log has "
                          f"the details, and the photo (if one was queued) is in `mondrian status`")

    @app.api_route("/health/", methods=["GET", "HEAD"])
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        return JSONResponse(await run_in_threadpool(_health, door))

    if every_network(cfg):
        return LocalOnly(app, extra_hosts=own_names(), any_address=True)
    return LocalOnly(app, extra_hosts=frozenset({cfg.api_host.lower()}))


def every_network(cfg: Config) -> bool:
    """Whether api_host asks for every network this machine is on (`0.0.0.0`, `::`)."""
    return cfg.api_host.strip() in ("0.0.0.0", "::", "[::]")


def own_names() -> frozenset[str]:
    """The names other machines call this one by: its host name, with and without `.local` (Bonjour on a Mac), and
    its fully qualified name."""
    import socket

    host = socket.gethostname().lower().rstrip(".")
    names = {host, host.partition(".")[0], host.partition(".")[0] + ".local"}
    try:
        names.add(socket.getfqdn().lower().rstrip("."))
    except OSError:
        pass
    return frozenset(n for n in names if n and n != ".local")


def _asked(fields: dict[str, str], query: QueryParams, repeated: dict[str, list[str]] | None = None
           ) -> dict[str, str]:
    """The form's fields, with `advisor` and `mode` from the address when the form has none: the original read the
    form only, so `/analyze?mode=lora` was served in the default mode without a word. Two different values (in the
    address and the form, or twice in the form) are refused rather than one of them picked."""
    asked = dict(fields)
    for key in ("advisor", "mode"):
        values = [v.strip() for v in query.getlist(key) if v.strip()]
        values += [v.strip() for v in (repeated or {}).get(key) or [fields.get(key, "")] if v.strip()]
        if len({v.lower() for v in values}) > 1:
            raise upload.Refused(400, f"`{key}` is given more than once, with different values "
                                      f"({', '.join(map(repr, values))}); give it once, e.g. -F {key}={values[-1]}")
        if values:
            asked[key] = values[-1]
    return asked


def _enqueue(door: Door, slot: Path, got: upload.Received, base_url: str,
             query: QueryParams):  # -> Job (on a thread of the server)
    """Check the request, give the upload its real name and queue it: refused requests leave nothing behind."""
    cfg = door.cfg
    if not got.images or (got.size == 0 and not got.filename):
        raise upload.Refused(400, f"no image: send the photo in the form field `image`, e.g. "
                                  f"{upload.example(base_url)}")
    got.fields = _asked(got.fields, query, got.repeated)
    mode = (got.fields.get("mode") or cfg.default_mode).strip().lower()
    if mode not in MODES:
        # The original design's own words (AnalysisContext.set_strategy's ValueError).
        raise upload.Refused(400, f"Unknown mode: {got.fields.get('mode')}. Use: {list(MODES)}",
                             valid_modes=list(MODES))
    advisor_id = (got.fields.get("advisor") or cfg.default_advisor).strip().lower()
    try:
        advisor = get_advisor(cfg, advisor_id)
    except UnknownAdvisor as exc:
        raise upload.Refused(400, str(exc.args[0] if exc.args else exc),
                             valid_advisors=sorted(load_advisors(cfg))) from None
    partial = door.spool.partial(slot)
    fmt = image_format(partial) if got.size else None
    if fmt is None:
        sent = (got.filename or "").replace("\\", "/").rsplit("/", 1)[-1][:120] or "the upload"  # as the client named it
        raise upload.Refused(415, f"{sent!r} is not an image Mondrian can read (JPEG, PNG, TIFF, "
                                  f"HEIC, WebP, camera raw, …): send the photo itself")
    final = door.spool.commit(slot, spool_name(got.filename, fmt))
    testhooks.crashpoint("upload_committed")  # a crash here leaves a file with no job: swept at the next start
    st = os.lstat(final)
    with door.ledger.bounded(LEDGER_PATIENCE_SECONDS):
        return door.ledger.enqueue_upload(final, f"api/{final.name}", advisor.id,
                                          "command" if got.fields.get("advisor") else "default", mode,
                                          st.st_size, st.st_mtime)


def _outbox_problem(cfg: Config) -> tuple[str, str] | None:
    """Why the outbox cannot take a report now, and what to do before sending the photo again; None if it can."""
    if not cfg.outbox.is_dir():
        if cfg.outbox.parent.is_dir():
            return None  # deleted: the worker makes it again (where its drive is, a missing parent says it is not)
        return (f"its outbox {cfg.outbox} is not there, nor {cfg.outbox.parent} (a drive or network share that is "
                f"not connected?)", "connect it, then send the photo again")
    try:
        outbox_room(cfg.outbox)
    except OutboxBlocked as exc:
        return exc.reason, f"{exc.fix}, then send the photo again"
    except OSError:
        return None  # not known to be blocked: the worker says what it finds
    return None


def _job_or_none(ledger: Ledger, job_id: int):  # -> Job | None
    try:
        return ledger.get(job_id)
    except ledger.Job.DoesNotExist:
        return None


def _health(door: Door) -> dict:
    ledger = door.ledger
    # This daemon's own model, not the ledger's last word on it: on a shared ledger that is another Mac's.
    value = door.model_state()
    model = {"id": door.cfg.model, "loaded": False} if value is None else {**value, "loaded": value.get("loaded", True)}
    counts = ledger.counts().by_state
    running = ledger.running()
    return {"status": "stopping" if door.stopping.is_set() else "ok",
            "model": model, "default_mode": door.cfg.default_mode, "default_advisor": door.cfg.default_advisor,
            "modes": list(MODES), "advisors": sorted(load_advisors(door.cfg)),
            "queue": {"queued": counts["queued"], "running": counts["running"],
                      "in_progress": [{"job_id": j.id, "file": Path(j.rel_path).name} for j in running]},
            "max_file_mb": door.cfg.max_file_mb,
            "outbox_problem": None if (problem := _outbox_problem(door.cfg)) is None else "; ".join(problem)}
