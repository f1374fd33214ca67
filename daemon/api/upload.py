"""`multipart/form-data` streamed from the socket into the spool with python-multipart's push parser: the photo is
written to disk chunk by chunk as it arrives and refused as soon as it passes the size limit, so a request never
holds a photo (or a mistaken multi-GB upload) in memory."""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable
from urllib.parse import unquote

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from ..fsutil import HUGE_BYTES

IMAGE_FIELD = "image"
FIELD_MAX_BYTES = 1024  # advisor and mode are short words
VALUE_FIELDS = ("advisor", "mode")  # what a form may carry besides the photo (a `.mode` may come as a small file)
BOUNDARY_MAX_BYTES = 70  # RFC 2046
FORM_OVERHEAD_BYTES = 64 * 1024  # boundaries, part headers and the small fields around the photo
MAX_PARTS = 16  # image, advisor, mode and a few a client may add: a form of thousands is not a photo request
HEADER_MAX_BYTES = 8 * 1024  # a part's headers (its name and file name)
IDLE_SECONDS = 60.0  # a photo upload that sends nothing for this long has stalled (a slow link still sends)
# Past its first IDLE_SECONDS an upload must have come at least this fast on average: a client sending a byte every
# 59 s is never idle for 60, and sixteen of them would hold every upload slot for as long as they like. A phone on
# poor Wi-Fi sends a hundred times faster.
MIN_BYTES_PER_S = 16 * 1024
WATCH_SECONDS = 1.0  # how often an upload that is waiting for the client looks whether Mondrian is stopping


class Refused(Exception):
    """The request cannot be taken: an HTTP status and a sentence that says what to do."""

    def __init__(self, status: int, message: str, **extra: object):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


@dataclass
class Received:
    fields: dict[str, str] = field(default_factory=dict)  # each field's first value
    repeated: dict[str, list[str]] = field(default_factory=dict)  # every value of a field given more than once
    filename: str | None = None  # the client's name for the photo
    size: int = 0
    images: int = 0  # parts named `image` seen (more than one is refused)
    complete: bool = False  # the closing boundary was read


_FILENAME_STAR = re.compile(rb"""filename\*\s*=\s*([^;'\s]*)'[^']*'([^;\s]*)""", re.IGNORECASE)


def _extended_filename(disposition: bytes) -> str:
    """RFC 5987's `filename*=UTF-8''caf%C3%A9.jpg`, which some clients send alone for a name beyond ASCII (the form
    parser reads only `filename`): the name, or "" when there is none."""
    found = _FILENAME_STAR.search(disposition)
    if not found:
        return ""
    charset = found.group(1).decode("latin-1") or "utf-8"
    try:
        return unquote(found.group(2).decode("latin-1"), encoding=charset, errors="replace")
    except (LookupError, UnicodeError, ValueError):  # a charset Python does not know, or cannot decode with (idna)
        return unquote(found.group(2).decode("latin-1"), errors="replace")


def too_large(limit: int, what: str) -> Refused:
    mb = limit / 2**20
    return Refused(413, f"the {what} is larger than the {mb:g} MB Mondrian accepts (max_file_mb in mondrian.toml); "
                        f"{'no photo is that large: ' if limit >= HUGE_BYTES else ''}export it again smaller, or "
                        f"raise max_file_mb",
                   max_file_mb=round(mb, 3))


def example(base_url: str) -> str:
    return f"curl -X POST {base_url.rstrip('/')}/analyze -F image=@photo.jpg -F advisor=ansel -F mode=rag"


def check_headers(content_type: str | None, content_length: str | None, limit: int, base_url: str) -> bytes:
    """The form's boundary, or Refused before a byte of the body is read."""
    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise Refused(400, f"send the photo as a multipart/form-data upload in the field `image`, e.g. "
                           f"{example(base_url)}")
    if len(params[b"boundary"]) > BOUNDARY_MAX_BYTES:  # RFC 2046; the form parser refuses past 256, mid-request
        raise Refused(400, f"the form's boundary is longer than the {BOUNDARY_MAX_BYTES} characters a multipart form "
                           f"allows; send it as curl -F does, e.g. {example(base_url)}")
    if content_length and content_length.strip().isdigit() and int(content_length) > limit + FORM_OVERHEAD_BYTES:
        raise too_large(limit, "upload")
    return params[b"boundary"]


class Stopping(Exception):
    """Mondrian began to stop and the upload did not end in time to be queued: the caller answers 503."""


async def receive(chunks: AsyncIterator[bytes], boundary: bytes, dest: Path, limit: int,
                  idle_s: float = IDLE_SECONDS, until: Callable[[], float | None] = lambda: None) -> Received:
    """Parse the form from `chunks`, writing the `image` part to `dest` (created, fsynced). Raises Refused (the
    caller removes `dest`) for a malformed form, a second image, a long field, a photo over `limit` bytes, or a
    client that sends nothing for `idle_s` seconds (it would hold its open file and its slot forever); Stopping
    once `until()` gives a deadline (time.monotonic) that passes before the upload ends."""
    got = Received()
    part: dict[str, object] = {}
    fd = -1  # opened once the parser is made: a parser refusing the form must not leave the file open

    parts = [0]

    def on_part_begin() -> None:
        parts[0] += 1
        if parts[0] > MAX_PARTS:
            raise Refused(400, f"the form has more than {MAX_PARTS} fields; send image, advisor and mode")
        part.clear()
        part.update(headers={}, name=b"", value=b"", file=False, header_field=b"", header_value=b"")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part["header_field"] = part["header_field"] + data[start:end]  # type: ignore[operator]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part["header_value"] = part["header_value"] + data[start:end]  # type: ignore[operator]
        if len(part["header_value"]) + len(part["header_field"]) > HEADER_MAX_BYTES:  # type: ignore[arg-type]
            raise Refused(400, f"a part of the form has headers longer than {HEADER_MAX_BYTES} bytes (a file name "
                               f"that long?); send the photo under a shorter name")

    def on_header_end() -> None:
        name = bytes(part["header_field"]).decode("latin-1").strip().lower()  # type: ignore[arg-type]
        part["headers"][name] = bytes(part["header_value"])  # type: ignore[index]
        part["header_field"], part["header_value"] = b"", b""

    def on_headers_finished() -> None:
        _, params = parse_options_header(part["headers"].get("content-disposition", b""))  # type: ignore[union-attr]
        part["name"] = params.get(b"name", b"").decode("utf-8", "replace")
        # However small, a file in a field Mondrian has no use for was taken in silence (a 638-byte PNG): refused
        # at its first byte. A browser's file input left empty (`filename=""`, no bytes) is no file at all.
        part["stray"] = part["name"] not in (IMAGE_FIELD, *VALUE_FIELDS) and params.get(b"filename") is not None
        if part["name"] == IMAGE_FIELD:
            got.images += 1
            if got.images > 1:
                raise Refused(400, "one photo per request: send a single `image` field")
            part["file"] = True
            got.filename = params.get(b"filename", b"").decode("utf-8", "replace") or _extended_filename(
                part["headers"].get("content-disposition", b""))  # type: ignore[union-attr]
        else:
            part["filename"] = params.get(b"filename")  # a small file is a value (`-F mode=@IMG_1.mode`)

    def stray_file() -> Refused:
        where = f"the field `{part['name']}`" if part["name"] else "a part without a name"
        what = "a second file" if got.images else "a file that is not in the field `image`"
        return Refused(400, f"the form carries {what}, in {where}; Mondrian takes one photo per request, in the "
                            f"field `image` (e.g. -F image=@photo.jpg)")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if part.get("stray"):  # called only with bytes: an empty part never gets here
            raise stray_file()
        if part["file"]:
            got.size += end - start
            if got.size > limit:
                raise too_large(limit, "photo")
            view = memoryview(data)[start:end]
            while view:
                view = view[os.write(fd, view):]
            return
        value = part["value"] + data[start:end]  # type: ignore[operator]
        if len(value) > FIELD_MAX_BYTES and part.get("filename") is not None:
            raise stray_file()  # not "a field longer than 1024 bytes": the client may not know it sent a file
        if len(value) > FIELD_MAX_BYTES:
            raise Refused(400, f"the form field `{part['name']}` is longer than {FIELD_MAX_BYTES} bytes; "
                               f"advisor and mode are short words (e.g. advisor=ansel, mode=rag)")
        part["value"] = value

    def on_part_end() -> None:
        if part["file"] or not part["name"]:
            return
        name, value = str(part["name"]), bytes(part["value"]).decode("utf-8", "replace").strip()  # type: ignore
        if name in got.fields:  # `-F mode=rag -F mode=lora`: the caller decides which is meant, not the order
            got.repeated.setdefault(name, [got.fields[name]]).append(value)
        else:
            got.fields[name] = value

    def on_end() -> None:
        got.complete = True

    stream = chunks.__aiter__()
    waiting: asyncio.Future | None = None
    started = last = time.monotonic()
    received = 0
    try:
        parser = MultipartParser(boundary, callbacks={  # type: ignore[arg-type]
            "on_end": on_end, "on_part_begin": on_part_begin, "on_header_field": on_header_field,
            "on_header_value": on_header_value, "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished, "on_part_data": on_part_data, "on_part_end": on_part_end})
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        while True:
            # The next chunk is awaited without being cancelled between looks (cancelling it would end the
            # request's stream), so a stop is noticed within a second even while the client sends nothing.
            waiting = waiting or asyncio.ensure_future(stream.__anext__())
            done, _ = await asyncio.wait({waiting}, timeout=min(idle_s, WATCH_SECONDS))
            deadline = until()
            if deadline is not None and time.monotonic() >= deadline:
                raise Stopping()
            now = time.monotonic()
            if not done and now - last >= idle_s:
                raise Refused(408, f"the upload stalled: nothing arrived for {idle_s:g} s; send it again")
            if now - started > idle_s and received < MIN_BYTES_PER_S * (now - started):
                raise Refused(408, f"the upload is too slow: {received / 1024:.0f} KB in {now - started:.0f} s, less "
                                   f"than the {MIN_BYTES_PER_S // 1024} KB/s Mondrian waits for; send it again over a "
                                   f"faster link")
            if not done:
                continue
            try:
                chunk = waiting.result()
            except StopAsyncIteration:
                waiting = None
                break
            waiting, last = None, now
            if chunk:
                received += len(chunk)
                if received > limit + FORM_OVERHEAD_BYTES:  # chunked, or past its Content-Length's promise
                    raise too_large(limit, "upload")
                parser.write(chunk)
        parser.finalize()
        if not got.complete:
            raise Refused(400, "the upload ended before the end of its form (interrupted?); send it again")
        os.fsync(fd)
    except FormParserError as exc:
        raise Refused(400, f"the multipart form could not be read ({exc}); send it as curl -F does") from None
    finally:
        if waiting is not None:
            waiting.cancel()
        if fd >= 0:
            os.close(fd)
    return got
