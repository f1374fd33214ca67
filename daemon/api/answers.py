"""A job as an HTTP answer: its report in the original `/analyze` shape with the original headers, or where it
stands (202 and the URL to poll), or why it failed."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from starlette.responses import JSONResponse

from ..fsutil import NotReadable, kind_of, read_regular_file
from ..ledger import DONE, FAILED, GONE, Job

REPORT_MAX_BYTES = 16 * 2**20  # a report is a few kB; a bigger report.json is not one Mondrian wrote
REPORT_READ_SECONDS = 5.0


def job_url(job_id: int) -> str:
    return f"/jobs/{job_id}"


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _text(value: Any) -> str:
    """A report field as a header's text: a report.json edited by hand may hold anything there."""
    return value if isinstance(value, str) else ""


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _with_headers(response: JSONResponse, headers: dict[str, str]) -> JSONResponse:
    # Starlette lowercases header names; HTTP does not care, but the original design's own checks grep for
    # `X-Analysis` (`curl -v … | grep X-Analysis`), so these keep its spelling on the wire. A value never carries a
    # line break: it would end the header and start one of the report's own choosing.
    for name, value in headers.items():
        response.raw_headers.append((name.encode("latin-1"), _CONTROL.sub(" ", value).encode("latin-1", "replace")))
    return response


def _job_facts(job: Job) -> dict[str, Any]:
    return {"job_id": job.id, "state": job.state, "job_url": job_url(job.id), "file": Path(job.rel_path).name,
            "advisor_id": job.advisor, "requested_mode": job.requested_mode}


def _request_headers(job: Job) -> dict[str, str]:
    headers = {"X-Advisor-ID": job.advisor, "X-Job-ID": str(job.id)}
    if job.requested_mode:
        headers["X-Requested-Mode"] = job.requested_mode
    return headers


def answer(job: Job, *, waited_out: bool = False, stopping: bool = False) -> JSONResponse:
    """What a client is told about `job`, whatever its state. It may read the outbox: call it off the event loop."""
    if job.state == DONE:
        return _report(job)
    if job.state == FAILED:
        return _with_headers(error(422, f"the photo could not be analysed: {job.error}", **_job_facts(job)),
                             _request_headers(job))
    if job.state == GONE:
        return _with_headers(error(410, f"the job ended without a report: {job.error}", **_job_facts(job)),
                             _request_headers(job))
    if stopping:
        note = ("Mondrian is stopping; the photo is analysed when it starts again (one being analysed now goes back "
                f"to the queue). Ask GET {job_url(job.id)} then")
    elif waited_out:
        note = f"still {job.state} (the queue is long, or the model slow); ask GET {job_url(job.id)} for the report"
    else:
        note = f"{job.state}; ask GET {job_url(job.id)} again for the report"
    response = JSONResponse({**_job_facts(job), "message": note}, status_code=202)
    response.headers["Location"] = job_url(job.id)
    response.headers["Retry-After"] = "5"
    return _with_headers(response, _request_headers(job))


def _as_this_request(report: dict[str, Any], job: Job) -> None:
    """A duplicate's answer is the earlier job's critique (same bytes, advisor and mode used), but what this request
    asked for and how it fell back are its own: a `mode=lora` request must not read as the earlier `mode=rag` one."""
    try:
        fallbacks = json.loads(job.fallbacks) if job.fallbacks else []
    except ValueError:
        fallbacks = []
    report["job_id"] = job.id
    report["duplicate_of"] = job.duplicate_of
    report["message"] = (f"the same photo was already analysed with the same advisor and mode used (job "
                         f"{job.duplicate_of}); this is that critique")
    for section, keys in (("mode", ("requested", "source", "fallbacks")),
                          ("metadata", ("requested_mode", "mode_source", "fallbacks"))):
        if isinstance(report.get(section), dict):
            report[section].update(zip(keys, (job.requested_mode, job.mode_source, fallbacks)))


def _report(job: Job) -> JSONResponse:
    path = Path(job.report_json or "")
    try:
        # The outbox is the user's: report.json may have been replaced by a named pipe, or sit on a network drive
        # that hangs. A plain read would wait for ever, and every request that asks for it with it.
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise NotReadable(f"it is {kind_of(mode)}, not a file")
        report = json.loads(read_regular_file(path, max_bytes=REPORT_MAX_BYTES,
                                              timeout_s=REPORT_READ_SECONDS).decode("utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        # The photographer deleted or renamed the report folder: theirs to do, and nothing here is broken.
        return error(410, f"job {job.id} is done but its report folder "
                          f"{Path(job.output_dir or '').name or '?'} is no longer in the outbox (deleted or renamed); "
                          f"send the photo again for a new critique", **_job_facts(job))
    except (OSError, ValueError) as exc:
        return error(500, f"job {job.id} is done but its report cannot be read ({exc}); the report folder is "
                          f"{Path(job.output_dir or '').name or '?'} in the outbox", **_job_facts(job))
    if not isinstance(report, dict):  # edited by hand, or another program's file under the name
        return error(500, f"job {job.id} is done but its report.json holds no report (a JSON "
                          f"{type(report).__name__}, edited or replaced since); the report folder is "
                          f"{Path(job.output_dir or '').name or '?'} in the outbox: send the photo again for a new "
                          f"critique", **_job_facts(job))
    report["job"] = {**_job_facts(job), "report_folder": Path(job.report_json or "").parent.name,
                     "duplicate_of": job.duplicate_of}
    if job.duplicate_of is not None:
        _as_this_request(report, job)
    metadata = report.get("metadata") if isinstance(report.get("metadata"), dict) else {}
    effective = _text(report.get("mode_used")) or job.effective_mode or ""
    requested = job.requested_mode or _text(metadata.get("requested_mode"))
    return _with_headers(JSONResponse(report), {
        "X-Analysis-Mode": effective, "X-Requested-Mode": requested,
        "X-Advisor-ID": _text(report.get("advisor_id")) or job.advisor,
        "X-Strategy-Available": str(bool(effective)), "X-Job-ID": str(job.id)})
