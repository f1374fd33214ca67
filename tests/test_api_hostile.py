"""The `/analyze` API against odd and hostile clients on the same machine: the real daemon (subprocess, smoke model),
real sockets and real files. Its promises: a clear JSON error that says what to do, never a crash or a hang of the
daemon, nothing lost, nothing analysed twice, nothing written outside the home."""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Daemon, ledger_jobs, make_home, photo, reports, wait_for


# -- a raw HTTP client: real clients send what curl never would -------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Answer:
    def __init__(self, raw: bytes):
        self.raw = raw
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}

    def json(self) -> Any:
        assert self.headers.get("content-type") == "application/json", self.raw[:500]
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Answer({self.raw[:600]!r})"


def exchange(port: int, data: bytes, timeout: float = 60, half_close: bool = False) -> Answer:
    """Send `data` as is, read until the server closes (every request here says Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return Answer(got)


def request(port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"",
            timeout: float = 60) -> Answer:
    head = {"Host": "127.0.0.1", "Connection": "close", **(headers or {})}
    if body and "Content-Length" not in head and "Transfer-Encoding" not in head:
        head["Content-Length"] = str(len(body))
    lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
    return exchange(port, f"{method} {path} HTTP/1.1\r\n{lines}\r\n".encode("latin-1") + body, timeout)


BOUNDARY = "hostile-boundary"


def form(*parts: tuple[bytes, bytes | None, bytes]) -> bytes:
    """multipart/form-data of (field name, file name or None, data), as bytes: names may be anything."""
    out = b""
    for name, filename, data in parts:
        disposition = b'form-data; name="' + name + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
        out += b"--" + BOUNDARY.encode() + b"\r\nContent-Disposition: " + disposition + b"\r\n"
        if filename is not None:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + data + b"\r\n"
    return out + b"--" + BOUNDARY.encode() + b"--\r\n"


def upload(port: int, *parts: tuple[bytes, bytes | None, bytes], path: str = "/analyze",
           timeout: float = 120) -> Answer:
    return request(port, "POST", path, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}, form(*parts),
                   timeout=timeout)


def image(data: bytes, name: bytes = b"photo.jpg") -> tuple[bytes, bytes, bytes]:
    return (b"image", name, data)


def field(name: str, value: str | bytes) -> tuple[bytes, None, bytes]:
    return (name.encode(), None, value if isinstance(value, bytes) else value.encode())


def jpeg(tmp: Path, seed: int, size: tuple[int, int] = (160, 120)) -> bytes:
    return photo(tmp / f"src-{seed}-{size[0]}.jpg", seed=seed, size=size).read_bytes()


def serving(d: Daemon, port: int, timeout: float = 120) -> None:
    def up() -> bool:
        assert d.proc.poll() is None, d.output()
        try:
            a = request(port, "GET", "/health", timeout=5)
            return a.status == 200 and a.json()["model"]["loaded"]
        except OSError:
            return False
    wait_for(up, timeout=timeout, what="the API to answer /health with the model loaded")


def start(tmp_path: Path, smoke_model_path: Path, env: dict[str, str] | None = None,
          **settings: Any) -> tuple[Daemon, int, Path]:
    port = free_port()
    home = make_home(tmp_path / "home", api_port=port, **settings)
    d = Daemon(home, smoke_model_path, **(env or {}))
    serving(d, port)
    return d, port, home


def all_jobs(home: Path) -> list[Any]:
    """Every job in the ledger (two uploads may share a name: ledger_jobs keys by it)."""
    from daemon.ledger import Ledger

    ledger = Ledger(home / "var" / "ledger.db")
    try:
        return list(ledger.jobs())
    finally:
        ledger.close()


def spool_files(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home / "var" / "spool")) for p in (home / "var" / "spool").rglob("*"))


def report_folders(home: Path) -> list[str]:
    return sorted(p.parent.name for p in reports(home / "outbox"))


# -- odd requests that held: each answered in JSON, nothing queued, nothing left ------------------------------
def test_odd_uploads_are_refused_in_json_and_leave_nothing(tmp_path, smoke_model_path) -> None:
    d, port, home = start(tmp_path, smoke_model_path, env={"MONDRIAN_TEST_UPLOAD_IDLE_SECONDS": "2"})
    with d:
        pic = jpeg(tmp_path, 1)
        ctype = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}

        def refused(answer: Answer, status: int, words: str) -> None:
            assert answer.status == status and words in answer.json()["error"], answer

        refused(upload(port, field("advisor", "ansel")), 400, "field `image`")  # no file at all
        refused(upload(port), 400, "field `image`")  # a form with no part
        refused(upload(port, image(pic, b"a.jpg"), image(pic, b"b.jpg")), 400, "one photo per request")
        refused(upload(port, image(b"", b"empty.jpg")), 415, "not an image")
        refused(upload(port, image(b"GIF89a" + b"\0" * 10, b"cut.gif")), 415, "not an image")
        refused(upload(port, image(b"<svg/>" * 20, b"../logo.svg")), 415, "'logo.svg' is not an image")  # its name
        # A Content-Length smaller than the body: the form ends early.
        body = form(image(pic))
        refused(request(port, "POST", "/analyze", {**ctype, "Content-Length": "300"}, body), 400, "ended before")
        # Larger than the body, then nothing: the stall is answered (408), not waited on for ever.
        started = time.monotonic()
        refused(request(port, "POST", "/analyze", {**ctype, "Content-Length": str(len(body) + 5000)}, body, timeout=30),
                408, "stalled")
        assert time.monotonic() - started < 20
        # Chunked, cut off midway and left open: the same.
        chunk = body[: len(body) // 2]
        refused(request(port, "POST", "/analyze", {**ctype, "Transfer-Encoding": "chunked"},
                        f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n", timeout=30), 408, "stalled")
        # A client that goes away midway: nothing to answer, nothing kept.
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(f"POST /analyze HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                      f"boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:2000])
            time.sleep(0.5)
        # Odd values: unknown, sidecar-like, with a NUL, a path; the error lists what is valid.
        for mode in ("turbo", "rag.mode", "lora\0", "base line"):
            bad = upload(port, image(pic), field("mode", mode))
            refused(bad, 400, "Unknown mode")
            assert bad.json()["valid_modes"] == ["baseline", "rag", "lora"]
        for advisor in ("../../etc", "nobody", "ansel/../cartier", ".mode"):
            bad = upload(port, image(pic), field("advisor", advisor))
            refused(bad, 400, "advisor")
            assert "ansel" in bad.json()["valid_advisors"]
        refused(upload(port, image(pic), field("mode", "x" * 2000)), 400, "longer than")
        refused(upload(port, *[field(f"f{i}", "x") for i in range(20)], image(pic)), 400, "more than")

        # Nothing was queued or left anywhere, and the daemon still serves.
        wait_for(lambda: spool_files(home) == [], timeout=10, what="an empty spool")
        assert ledger_jobs(home) == {} and report_folders(home) == []
        assert request(port, "GET", "/health").status == 200
        assert d.stop() == 0


def test_odd_but_valid_requests_are_analysed_and_keep_their_promises(tmp_path, smoke_model_path) -> None:
    """Names a client may send (paths, NUL, very long, not UTF-8, only dots, the report's own file names), modes in
    any case, odd job ids and methods: every photo analysed once, into the outbox and nowhere else."""
    outside = tmp_path / "outside"
    outside.mkdir()
    d, port, home = start(tmp_path, smoke_model_path)
    with d:
        names = [b"../../../outside/evil.jpg", b"..\\..\\outside\\win.jpg", b"a\x00b.jpg", b"x" * 400 + b".jpg",
                 b"\xff\xfe\xfd.jpg", b"..", b"...", b".hidden.jpg", b"report.html", b"report.json", b"index.html",
                 b".upload.part", b"noext", b"/etc/passwd", b"con.jpg "]
        answers = []
        for i, name in enumerate(names):
            a = upload(port, image(jpeg(tmp_path, 10 + i), name))
            assert a.status == 200, (name, a)
            answers.append(a.json())
        files = [a["photo"]["file"] for a in answers]
        assert all("/" not in f and "\\" not in f and "\0" not in f and not f.startswith(".") for f in files), files
        # The report's own files are never replaced by a photo named like them.
        for a in answers:
            folder = home / "outbox" / a["job"]["report_folder"]
            assert json.loads((folder / "report.json").read_text())["job_id"] == a["job_id"]
            assert (folder / a["photo"]["file"]).is_file()
        assert list(outside.iterdir()) == []
        assert len(report_folders(home)) == len(names)

        # Mode and advisor in any case and with spaces, or empty (the default): as the original read them.
        pic = jpeg(tmp_path, 40)
        a = upload(port, image(pic), field("mode", " BASELINE\n"), field("advisor", "Cartier"))
        assert a.status == 200 and a.json()["advisor_id"] == "cartier", a
        assert a.headers["x-requested-mode"] == "baseline"
        a = upload(port, image(jpeg(tmp_path, 41)), field("mode", ""), field("advisor", ""))
        assert a.status == 200 and a.json()["advisor_id"] == "ansel" and a.json()["mode_used"] == "baseline"

        # Job ids: negative, zero, huge, not a number, not ASCII digits: 404 in JSON. An inbox job is a job too.
        for job_id in ("-1", "0", "99999999999999999999999", "1e3", "%00", "%D9%A3", "1%2F..", "%201"):
            a = request(port, "GET", f"/jobs/{job_id}")
            assert a.status in (404, 400) and "error" in a.json(), (job_id, a)
        photo(home / "inbox" / "dropped.jpg", seed=60)
        inbox_job = wait_for(lambda: {j.id for r, j in ledger_jobs(home).items() if r == "dropped.jpg"
                                      and j.state == "done"}, timeout=60, what="the inbox photo analysed")
        a = request(port, "GET", f"/jobs/{min(inbox_job)}")
        assert a.status == 200 and a.json()["photo"]["file"] == "dropped.jpg"
        # A trailing slash, as people type addresses: served, not a bare redirect `curl -F` shows as nothing.
        a = upload(port, image(jpeg(tmp_path, 42), b"slash.jpg"), path="/analyze/")
        assert a.status == 200 and a.json()["photo"]["file"] == "slash.jpg", a
        assert request(port, "GET", f"/jobs/{a.json()['job_id']}/").status == 200
        assert request(port, "GET", "/health/").status == 200

        # Methods it does not serve: 405 in JSON, with what it does serve.
        for method in ("PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND"):
            a = request(port, method, "/analyze")
            assert a.status == 405 and "POST /analyze" in a.json()["error"], (method, a)

        jobs = all_jobs(home)
        assert {j.state for j in jobs} == {"done"} and len(jobs) == len(names) + 4
        wait_for(lambda: spool_files(home) == [], timeout=10, what="an empty spool")
        assert d.stop() == 0


# -- fixes: each test below failed before its fix --------------------------------------------------------------
def test_head_not_http_and_a_second_file_get_straight_answers(tmp_path, smoke_model_path) -> None:
    d, port, home = start(tmp_path, smoke_model_path)
    with d:
        # HEAD is how monitors and `curl -I` ask: answered like GET, without a body (was 405).
        a = request(port, "HEAD", "/health")
        assert a.status == 200 and a.headers["content-type"] == "application/json" and a.body == b"", a
        assert request(port, "HEAD", "/jobs/77").status == 404

        # Not HTTP at all (a Content-Length that is no number): JSON like every other error (was text/plain).
        for bad in (b"POST /analyze HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
                    b"POST /analyze HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -5\r\n\r\n",
                    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 40):  # a TLS hello: https:// by mistake
            a = exchange(port, bad, timeout=10)
            assert a.status == 400 and "not valid HTTP" in a.json()["error"], a

        # A second file under another name: said so, not "a form field longer than 1024 bytes" (was so).
        pic = jpeg(tmp_path, 3)
        a = upload(port, image(pic), (b"sidecar", b"photo.xmp", b"<x:xmpmeta>" + b" " * 2000 + b"</x:xmpmeta>"))
        assert a.status == 400 and "a second file, in the field `sidecar`" in a.json()["error"], a
        a = upload(port, image(pic), (b"", b"other.jpg", pic))
        assert a.status == 400 and "a second file, in a part without a name" in a.json()["error"], a
        # The photo under another field's name, and no `image` (`-F photo=@IMG_1.jpg`): no "second" file there.
        a = upload(port, (b"photo", b"IMG_1.jpg", pic))
        error = a.json()["error"]
        assert a.status == 400 and "second" not in error and "not in the field `image`" in error, a
        assert "-F image=@photo.jpg" in error, a
        assert ledger_jobs(home) == {}
        # A small file is a value, as before: a `.mode` sidecar sent as it lies (-F mode=@IMG_1.mode).
        a = upload(port, image(pic, b"IMG_1.jpg"), (b"mode", b"IMG_1.mode", b"rag\n"))
        assert a.status == 200 and a.headers["x-requested-mode"] == "rag", a
        assert d.stop() == 0


def test_mode_and_advisor_in_the_address_are_used_or_refused_not_ignored(tmp_path, smoke_model_path) -> None:
    """`POST /analyze?mode=turbo` was analysed in the default mode without a word: a script that put its choice in
    the address never learnt it was not used."""
    d, port, home = start(tmp_path, smoke_model_path)
    with d:
        pic = jpeg(tmp_path, 5)
        bad = upload(port, image(pic), path="/analyze?mode=turbo")
        assert bad.status == 400 and bad.json()["error"] == "Unknown mode: turbo. Use: ['baseline', 'rag', 'lora']"
        bad = upload(port, image(pic), path="/analyze?advisor=nobody")
        assert bad.status == 400 and "unknown advisor 'nobody'" in bad.json()["error"]
        bad = upload(port, image(pic), field("mode", "rag"), path="/analyze?mode=lora")
        assert bad.status == 400 and "more than once" in bad.json()["error"], bad
        bad = upload(port, image(pic), path="/analyze?mode=rag&mode=lora")
        assert bad.status == 400 and "more than once" in bad.json()["error"], bad
        # Twice in the form (a script that sends its default, then the user's choice): the first was taken.
        for key, a, b in (("mode", "baseline", "lora"), ("advisor", "cartier", "ansel")):
            bad = upload(port, image(pic), field(key, a), field(key, b))
            assert bad.status == 400 and f"`{key}` is given more than once" in bad.json()["error"], bad
        assert ledger_jobs(home) == {}

        ok = upload(port, image(pic), path="/analyze?mode=LoRA&advisor=Cartier")
        assert ok.status == 200, ok
        assert ok.headers["x-requested-mode"] == "lora" and ok.headers["x-advisor-id"] == "cartier"
        # The same value twice, or an empty one beside the form's, is no conflict.
        ok = upload(port, image(jpeg(tmp_path, 6)), field("mode", "rag"), path="/analyze?mode=RAG&advisor=")
        assert ok.status == 200 and ok.headers["x-requested-mode"] == "rag" and ok.headers["x-advisor-id"] == "ansel"
        ok = upload(port, image(jpeg(tmp_path, 7)), field("mode", "rag"), field("mode", "RAG"), field("mode", ""))
        assert ok.status == 200 and ok.headers["x-requested-mode"] == "rag", ok
        assert d.stop() == 0


def _hold_connections(port: int, count: int, stop: threading.Event, answers: list[bytes]) -> None:
    """Keep `count` connections open that send their headers a byte now and then and never finish them
    (slowloris); whatever the server answers is kept, and a closed connection is opened again."""
    held: list[socket.socket] = []
    try:
        while not stop.is_set():
            while len(held) < count and not stop.is_set():
                try:
                    s = socket.create_connection(("127.0.0.1", port), timeout=2)
                    s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                    s.setblocking(False)
                    held.append(s)
                except OSError:
                    break
            for s in list(held):
                try:
                    data = s.recv(4096)
                    if data:
                        answers.append(data)
                    held.remove(s)
                    s.close()
                except BlockingIOError:
                    try:
                        s.send(b"a")
                    except OSError:
                        held.remove(s)
                        s.close()
                except OSError:
                    held.remove(s)
                    s.close()
            stop.wait(0.5)
    finally:
        for s in held:
            s.close()


def test_connections_that_never_finish_their_headers_cannot_stall_the_daemon(tmp_path, smoke_model_path) -> None:
    """A program on the machine that opens connections and sends its headers a byte at a time (slowloris) held an
    open file each, for ever: with a Mac's 256 open files the daemon could then write no ledger and take no photo,
    from the inbox either, until the program stopped."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # a Mac's default, inherited by the daemon
    try:
        d, port, home = start(tmp_path, smoke_model_path, env={"MONDRIAN_TEST_UPLOAD_IDLE_SECONDS": "3"})
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with d:
        assert resource.prlimit(d.proc.pid, resource.RLIMIT_NOFILE)[0] == 256
        stop, answers = threading.Event(), []
        attacker = threading.Thread(target=_hold_connections, args=(port, 400, stop, answers), daemon=True)
        attacker.start()
        try:
            time.sleep(2)
            photo(home / "inbox" / "during.jpg", seed=70)
            wait_for(lambda: report_folders(home) == ["during"], timeout=60,
                     what="the inbox photo analysed while the connections are held")
            if os.path.isdir(f"/proc/{d.proc.pid}/fd"):  # room left all along for photos, the ledger and the model
                most = 0
                for _ in range(100):
                    most = max(most, len(os.listdir(f"/proc/{d.proc.pid}/fd")))
                    time.sleep(0.05)
                assert most < 200, f"the daemon had {most} files open of its 256"
            # The held connections are told why they are dropped: 503 beyond the limit, 408 when too slow.
            wait_for(lambda: any(a.startswith(b"HTTP/1.1 408") for a in answers), timeout=30, what="a 408")
            assert any(a.startswith(b"HTTP/1.1 503") and b"connections open" in a for a in answers)
            assert all(b"application/json" in a for a in answers), answers[:3]
        finally:
            stop.set()
            attacker.join(timeout=30)
        # Once the program stops, the API serves at once.
        wait_for(lambda: request(port, "GET", "/health", timeout=5).status == 200, timeout=30, what="/health")
        assert d.stop() == 0


def test_a_spool_deleted_replaced_or_linked_away_while_running(tmp_path, smoke_model_path) -> None:
    """var/spool deleted while the daemon runs was answered 503 "send it again in a minute" until a restart; a file
    there got the same non-advice; a link there carried the upload out of the home."""
    outside = tmp_path / "outside"
    outside.mkdir()
    d, port, home = start(tmp_path, smoke_model_path, api_wait_seconds=0)
    spool = home / "var" / "spool"
    with d:
        spool.rmdir()
        a = upload(port, image(jpeg(tmp_path, 1)))
        assert a.status == 202, a  # made again, and the photo queued
        assert "made again" in d.output()

        wait_for(lambda: [j.state for j in all_jobs(home)] == ["done"], timeout=60, what="the first photo analysed")
        wait_for(lambda: spool_files(home) == [], timeout=10, what="an empty spool")
        spool.rmdir()
        spool.write_text("someone's notes\n")
        a = upload(port, image(jpeg(tmp_path, 2)))
        assert a.status == 503 and a.headers["retry-after"], a
        assert f"{spool} is a file" in a.json()["error"] and "move the file elsewhere" in a.json()["error"]
        assert spool.read_text() == "someone's notes\n"

        spool.unlink()
        spool.symlink_to(outside)
        a = upload(port, image(jpeg(tmp_path, 3)))
        assert a.status == 503 and "symbolic link" in a.json()["error"] and "Remove the link" in a.json()["error"], a
        assert list(outside.iterdir()) == []  # nothing written outside the home

        spool.unlink()  # as the answer says: and the next upload is taken
        a = upload(port, image(jpeg(tmp_path, 4)))
        assert a.status == 202, a
        assert len(all_jobs(home)) == 2
        wait_for(lambda: {j.state for j in all_jobs(home)} == {"done"}, timeout=60, what="all done")
        assert d.stop() == 0


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small filesystem as the spool")
def test_a_full_or_read_only_spool_says_what_to_do(tmp_path, smoke_model_path) -> None:
    """The spool on a disk that fills up or turns read-only: 503 naming the cause and its fix (it said "send it again
    in a minute", which a full disk does not mend), no partial file left, and the daemon serves once it is fixed.
    The spool is on another filesystem than the outbox here, as a spool on a small disk would be."""
    port = free_port()
    home = make_home(tmp_path / "home", api_port=port)
    spool = home / "var" / "spool"
    if not _mount_tmpfs(spool, "256k"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        with Daemon(home, smoke_model_path) as d:
            serving(d, port)
            big = photo(tmp_path / "big.png", seed=80, size=(600, 600)).read_bytes()  # noise: ~1 MB as PNG
            assert len(big) > 512 * 1024
            a = upload(port, image(big, b"big.png"))
            assert a.status == 503 and a.headers["retry-after"], a
            assert "is full" in a.json()["error"] and "free some space" in a.json()["error"], a
            assert spool_files(home) == []  # the partial upload is gone, the space is free again

            subprocess.run(["mount", "-o", "remount,ro", str(spool)], check=True)
            a = upload(port, image(jpeg(tmp_path, 81)))
            assert a.status == 503 and "read-only" in a.json()["error"] and "read-write" in a.json()["error"], a

            subprocess.run(["mount", "-o", "remount,rw", str(spool)], check=True)
            a = upload(port, image(jpeg(tmp_path, 82), b"small.jpg"))
            assert a.status == 200 and (home / "outbox" / a.json()["job"]["report_folder"] / "small.jpg").is_file(), a
            assert ledger_jobs(home)["api/small.jpg"].state == "done" and len(ledger_jobs(home)) == 1
            assert d.stop() == 0
    finally:
        subprocess.run(["umount", "-l", str(spool)], capture_output=True)


def test_a_report_replaced_by_a_named_pipe_does_not_hang_the_api(tmp_path, smoke_model_path) -> None:
    """report.json was read on the server's event loop with a plain read: replaced by a FIFO (or on a network
    drive that hangs), one `GET /jobs/<id>` stopped every request, /health included, for ever."""
    d, port, home = start(tmp_path, smoke_model_path)
    with d:
        done = upload(port, image(jpeg(tmp_path, 7))).json()
        report = home / "outbox" / done["job"]["report_folder"] / "report.json"
        report.unlink()
        os.mkfifo(report)
        started = time.monotonic()
        a = request(port, "GET", f"/jobs/{done['job_id']}", timeout=20)
        assert a.status == 500 and "named pipe" in a.json()["error"], a
        assert request(port, "GET", "/health", timeout=20).status == 200
        assert time.monotonic() - started < 15
        report.unlink()
        report.write_text("{" * 100)  # and a damaged one
        a = request(port, "GET", f"/jobs/{done['job_id']}", timeout=20)
        assert a.status == 500 and "cannot be read" in a.json()["error"]
        assert done["job"]["report_folder"] in a.json()["error"]
        # The photographer renames the report folder, or deletes it: gone, said so, with what to do; not a 500.
        folder = report.parent
        folder.rename(folder.with_name("keeper"))
        a = request(port, "GET", f"/jobs/{done['job_id']}", timeout=20)
        assert a.status == 410 and "no longer in the outbox" in a.json()["error"], a
        assert "send the photo again" in a.json()["error"] and str(home) not in a.json()["error"], a
        shutil.rmtree(folder.with_name("keeper"))
        assert request(port, "GET", f"/jobs/{done['job_id']}", timeout=20).status == 410
        assert d.stop() == 0


def test_a_client_that_leaves_while_waiting_is_not_waited_for_and_its_photo_is_analysed(tmp_path,
                                                                                        smoke_model_path) -> None:
    """A client that gives up (its own timeout) while its photo waits: the photo is analysed all the same, and the
    daemon stops polling the ledger for it (ten times a second, for the rest of api_wait_seconds, per request)."""
    d, port, home = start(tmp_path, smoke_model_path, env={"MONDRIAN_TEST_TOKEN_SECONDS": "0.1"})
    with d:
        body = form(image(jpeg(tmp_path, 9), b"left.jpg"))
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(f"POST /analyze HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                      f"boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_for(lambda: "api/left.jpg" in ledger_jobs(home), timeout=30, what="the upload queued")
        (job,) = ledger_jobs(home).values()
        wait_for(lambda: f"the client of job {job.id} went away" in d.output(), timeout=10,
                 what="the request to stop waiting for its client")
        assert ledger_jobs(home)["api/left.jpg"].state in ("queued", "running")  # it did not wait for the report
        wait_for(lambda: ledger_jobs(home)["api/left.jpg"].state == "done", timeout=120, what="the photo analysed")
        assert request(port, "GET", f"/jobs/{job.id}").status == 200
        assert d.stop() == 0


# -- held: concurrency, stops and restarts ---------------------------------------------------------------------
def test_the_same_photo_sent_twenty_times_at_once_is_analysed_once(tmp_path, smoke_model_path) -> None:
    d, port, home = start(tmp_path, smoke_model_path)
    with d:
        pic = jpeg(tmp_path, 11)
        results: list[Answer] = []
        barrier = threading.Barrier(20)

        def send() -> None:
            barrier.wait()
            results.append(upload(port, image(pic, b"same.jpg"), field("mode", "baseline")))

        threads = [threading.Thread(target=send) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert len(results) == 20
        busy = [a for a in results if a.status == 503]  # 16 uploads streaming at once is the documented limit
        assert all(a.headers["retry-after"] for a in busy)
        ok = [a.json() for a in results if a.status == 200]
        assert len(ok) + len(busy) == 20 and ok, results
        originals = {a["job_id"] for a in ok if a.get("duplicate_of") is None}
        assert len(originals) == 1, [(a["job_id"], a.get("duplicate_of")) for a in ok]
        assert {a["duplicate_of"] for a in ok if a.get("duplicate_of") is not None} <= originals
        assert len({json.dumps(a["dimensional_analysis"], sort_keys=True) for a in ok}) == 1
        assert len({a["job_id"] for a in ok}) == len(ok)
        assert report_folders(home) == ["same"]
        jobs = all_jobs(home)
        assert len(jobs) == len(ok) and {j.state for j in jobs} == {"done"}
        wait_for(lambda: spool_files(home) == [], timeout=10, what="an empty spool")
        assert d.stop() == 0


def test_sigterm_with_uploads_in_flight_then_restart_analyses_each_accepted_upload_once(tmp_path,
                                                                                        smoke_model_path) -> None:
    """Uploads waiting for their report, one half sent, and new ones arriving when SIGTERM comes: each one answered
    202 is analysed exactly once after the restart; one refused or cut off left no job and no file."""
    env = {"MONDRIAN_TEST_TOKEN_SECONDS": "0.3"}
    d, port, home = start(tmp_path, smoke_model_path, env=env)
    answers: dict[str, Answer] = {}

    def send(name: str, seed: int) -> None:
        try:
            answers[name] = upload(port, image(jpeg(tmp_path, seed), f"{name}.jpg".encode()), timeout=120)
        except OSError:  # the listener is closed already: refused, no answer
            answers[name] = Answer(b"")

    with d:
        waiting = [threading.Thread(target=send, args=(f"w{i}", 20 + i)) for i in range(4)]
        for t in waiting:
            t.start()
        wait_for(lambda: len(ledger_jobs(home)) == 4, timeout=60, what="four uploads queued")
        # One upload half sent when the stop comes, then finished during the stop.
        body = form(image(jpeg(tmp_path, 30), b"half.jpg"))
        half = socket.create_connection(("127.0.0.1", port), timeout=60)
        half.sendall(f"POST /analyze HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                     f"boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                     + body[: len(body) // 2])
        time.sleep(0.5)
        d.signal(signal.SIGTERM)
        time.sleep(0.3)
        late = threading.Thread(target=send, args=("late", 31))
        late.start()
        try:
            half.sendall(body[len(body) // 2:])
            got = b""
            while chunk := half.recv(65536):
                got += chunk
        except OSError:
            got = b""
        half.close()
        answers["half"] = Answer(got)
        for t in [*waiting, late]:
            t.join(timeout=120)
        assert d.wait(timeout=90) == 0, d.output()

    accepted = {name: a.json()["job_id"] for name, a in answers.items() if a.status in (200, 202)}
    for name, a in answers.items():
        assert a.status in (200, 202, 503) or a.raw == b"", (name, a)
        if a.status == 503:
            assert "stopping" in a.json()["error"] and a.headers["retry-after"]
        if a.status == 202:
            assert a.headers["location"] == f"/jobs/{a.json()['job_id']}"
    assert {f"w{i}" for i in range(4)} <= set(accepted), answers
    before = ledger_jobs(home)
    assert {j.id for j in before.values()} >= set(accepted.values())

    with Daemon(home, smoke_model_path) as d2:
        serving(d2, port)
        wait_for(lambda: {j.state for j in ledger_jobs(home).values()} == {"done"}, timeout=180,
                 what="every accepted upload analysed after the restart")
        for name, job_id in accepted.items():
            a = request(port, "GET", f"/jobs/{job_id}")
            assert a.status == 200 and a.json()["photo"]["file"] == f"{name}.jpg", (name, a)
        assert d2.stop() == 0
    jobs = ledger_jobs(home)
    assert len(jobs) == len(before)  # no job twice
    # One report per job, each with its original: nothing analysed twice, nothing lost.
    assert sorted(report_folders(home)) == sorted(Path(r).stem for r in jobs), (report_folders(home), list(jobs))
    assert [p for p in (home / "var" / "spool").rglob("*") if p.is_file()] == []


def test_an_upload_still_arriving_when_mondrian_stops_is_told_it_is_stopping_in_json(tmp_path,
                                                                                      smoke_model_path) -> None:
    """A slow upload under way at SIGTERM was cancelled by the server at the end of its grace: a bare text/plain
    500, and a traceback in the log. Now it is answered as the README says (503, JSON, Retry-After) and leaves no
    file and no job."""
    d, port, home = start(tmp_path, smoke_model_path)
    with d:
        body = form(image(jpeg(tmp_path, 40), b"slow.jpg"))
        slow = socket.create_connection(("127.0.0.1", port), timeout=60)
        slow.sendall(f"POST /analyze HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                     f"boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                     + body[: len(body) // 2])
        wait_for(lambda: spool_files(home), timeout=30, what="the upload spooling")
        d.signal(signal.SIGTERM)  # ...and the rest never comes (a slow link, a laptop lid closed)
        got = b""
        try:
            while chunk := slow.recv(65536):
                got += chunk
        except OSError:
            pass
        slow.close()
        assert d.wait(timeout=90) == 0, d.output()
    a = Answer(got)
    assert a.status == 503 and "stopping" in a.json()["error"] and a.headers["retry-after"], a
    assert "Traceback" not in d.output() and "CancelledError" not in d.output(), d.output()[-3000:]
    assert ledger_jobs(home) == {} and spool_files(home) == []


def test_a_truncated_upload_fails_at_once_with_advice_for_a_sender(tmp_path, smoke_model_path) -> None:
    """A photo that ends early in the inbox may be a copy still under way, so it is looked at again for a while. An
    upload was received whole: it waited out that grace all the same (60 s at the defaults) and was then told to
    "copy it again"."""
    d, port, home = start(tmp_path, smoke_model_path)
    with d:
        whole = jpeg(tmp_path, 50, size=(320, 240))
        a = upload(port, image(whole[: len(whole) // 2], b"cut.jpg"))
        assert d.stop() == 0
    assert a.status == 422, a
    assert "truncated" in a.json()["error"] and "send the original again" in a.json()["error"], a
    assert "copy it again" not in a.json()["error"], a
    assert "looking again shortly" not in d.output(), d.output()[-3000:]


def test_a_request_after_the_model_failed_to_load_is_told_why(tmp_path, smoke_model_path) -> None:
    """A damaged model file: the daemon stays up, /health says the model is not loaded and why, and a request is
    answered (not left waiting) with the reason and the command that retries it once the model is fixed."""
    import shutil

    damaged = tmp_path / "damaged-model"
    shutil.copytree(smoke_model_path, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    port = free_port()
    home = make_home(tmp_path / "home", api_port=port, max_attempts=1, api_wait_seconds=60)
    with Daemon(home, damaged) as d:
        def health() -> dict | None:
            assert d.proc.poll() is None, d.output()
            try:
                h = request(port, "GET", "/health", timeout=5).json()
            except (OSError, AssertionError, ValueError):
                return None
            return h if h["model"].get("error") else None
        h = wait_for(health, timeout=60, what="/health to report the model that failed to load")
        assert h["model"]["loaded"] is False and "safetensors" in h["model"]["error"]
        a = upload(port, image(jpeg(tmp_path, 90)), timeout=90)
        assert a.status == 422 and "model could not be loaded" in a.json()["error"], a
        assert "retry --failed" in a.json()["error"]
        assert request(port, "GET", f"/jobs/{a.json()['job_id']}").status == 422
        assert d.stop() == 0


def test_postscript_and_other_non_photo_formats_never_reach_their_decoders(tmp_path, smoke_model_path) -> None:
    """Pillow opens EPS through Ghostscript, which runs the file's PostScript, and some thirty formats no camera
    writes (ICO, SPIDER, ...). Named `holiday.jpg`, through the API or the inbox: refused as not a photo, and no
    Ghostscript is ever started (a `gs` on the PATH that leaves a mark when run)."""
    from PIL import Image

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mark = tmp_path / "gs-ran"
    (bin_dir / "gs").write_text(f"#!/bin/sh\necho \"$@\" >> {mark}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 41 30\n(hello) print\nshowpage\n"
    ico_path = tmp_path / "icon.ico"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(ico_path, "ICO")
    ico = ico_path.read_bytes()
    d, port, home = start(tmp_path, smoke_model_path, env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    with d:
        for data, name in ((eps, b"holiday.jpg"), (ico, b"icon.jpg")):
            answer = upload(port, image(data, name))
            assert answer.status == 415 and "not an image" in answer.json()["error"], answer
        (home / "inbox" / "holiday.jpg").write_bytes(eps)
        (home / "inbox" / "icon.jpg").write_bytes(ico)
        failed = home / "outbox" / "failed"
        wait_for(lambda: {"holiday.jpg.error.json", "icon.jpg.error.json"} <= {p.name for p in failed.glob("*")},
                 timeout=120, what="both files failed")
        for name in ("holiday.jpg", "icon.jpg"):
            why = json.loads((failed / f"{name}.error.json").read_text())
            assert "not a photo Mondrian can read" in json.dumps(why), why
        assert d.proc.poll() is None and d.stop() == 0
    assert not mark.exists(), mark.read_text()


def test_an_upload_is_named_after_what_it_holds_and_a_resend_leaves_no_copy(tmp_path, smoke_model_path) -> None:
    """The client's name is kept, its suffix only where it fits the photo: a JPEG sent as `x.mode` or `x.xmp` was
    stored as a sidecar in its report folder (a report folder dropped back in then critiqued nothing), `curl -F
    image=@-` made a folder named `-`, and `index.html` holding a JPEG opened as a page. RFC 5987's `filename*`
    names it. The same photo sent again (a script reading its critique) is answered from the first report and
    leaves no copy in duplicates/. A report.json edited into another shape is a JSON error, its text never a
    header of its own; and a request without a Host (HTTP/1.0, `nc`) is answered."""
    d, port, home = start(tmp_path, smoke_model_path)
    with d:
        sent = {b"x.mode": "x.jpg", b"y.xmp": "y.jpg", b"-": "upload.jpg", b"index.html": "index.jpg",
                b"shot.JPEG": "shot.jpeg", b"b.png": "b.jpg"}
        for i, (name, want) in enumerate(sent.items()):
            a = upload(port, image(jpeg(tmp_path, 200 + i), name))
            assert a.status == 200 and a.json()["photo"]["file"] == want, (name, a)
            folder = home / "outbox" / a.json()["job"]["report_folder"]
            assert (folder / want).is_file() and not folder.name.startswith("-"), sorted(folder.iterdir())
            assert f'id="original" href="{want}"' in (folder / "report.html").read_text(), name
        from daemon.api.spool import spool_name

        # Camera raws Pillow reads as TIFF (DNG, NEF, CR2, ARW) keep their own suffix: `.tif` would open as a TIFF
        assert [spool_name(n, "TIFF") for n in ("DSC_1.NEF", "IMG_1.DNG", "a.arw", "b.tiff", "c.jpg")] == \
            ["DSC_1.nef", "IMG_1.dng", "a.arw", "b.tiff", "c.tif"]
        # Every format taken in keeps (or gets) its suffix: WebP and HEIC were stored with none (`upload`, `w2`),
        # so the report page had no link to the original and `analyze` of the folder found no photo in it.
        assert [spool_name(n, f) for n, f in (("-", "WEBP"), ("w2.mode", "WEBP"), ("p.heic", "HEIF"), ("q", "HEIF"),
                                              ("s.avif", "AVIF"), ("j", "JPEG2000"), ("layers.psd", "PSD"))] == \
            ["upload.webp", "w2.webp", "p.heic", "q.heic", "s.avif", "j.jp2", "layers.psd"]
        webp = tmp_path / "sent.webp"
        from PIL import Image

        Image.open(io.BytesIO(jpeg(tmp_path, 231))).save(webp, "WEBP")
        a = upload(port, image(webp.read_bytes(), b"-"))
        assert a.status == 200 and a.json()["photo"]["file"] == "upload.webp", a
        folder = home / "outbox" / a.json()["job"]["report_folder"]
        assert 'id="original" href="upload.webp"' in (folder / "report.html").read_text()
        disposition = "form-data; name=\"image\"; filename*=UTF-8''caf%C3%A9%20noir.jpg"
        body = (f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n").encode() + jpeg(tmp_path, 230) \
            + f"\r\n--{BOUNDARY}--\r\n".encode()
        a = request(port, "POST", "/analyze", {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}, body)
        assert a.status == 200 and a.json()["photo"]["file"] == "café noir.jpg", a

        pic = jpeg(tmp_path, 240)
        first = upload(port, image(pic, b"again.jpg")).json()
        for _ in range(3):
            again = upload(port, image(pic, b"again.jpg"))
            assert again.status == 200 and again.json()["duplicate_of"] == first["job_id"], again
        dups = home / "outbox" / "duplicates"
        assert not dups.exists() or sorted(dups.iterdir()) == [], sorted(dups.iterdir())
        wait_for(lambda: spool_files(home) == [], timeout=10, what="an empty spool")

        raw = exchange(port, b"GET /health HTTP/1.0\r\n\r\n")
        assert raw.status == 200, raw
        report = home / "outbox" / first["job"]["report_folder"] / "report.json"
        for edited in ("[]", "null"):
            report.write_text(edited)
            a = request(port, "GET", f"/jobs/{first['job_id']}")
            assert a.status == 500 and "holds no report" in a.json()["error"], (edited, a)
        report.write_text('{"mode_used": 5, "metadata": [1]}')
        a = request(port, "GET", f"/jobs/{first['job_id']}")
        assert a.status == 200 and a.headers["x-analysis-mode"] == "baseline", a
        report.write_text(json.dumps({"advisor_id": "x\r\nSet-Cookie: stolen=1", "mode_used": "rag\nX-Evil: 1"}))
        a = request(port, "GET", f"/jobs/{first['job_id']}")
        assert a.status == 200 and "set-cookie" not in a.headers and "x-evil" not in a.headers, a
        assert a.headers["x-advisor-id"] == "x  Set-Cookie: stolen=1", a
        assert d.proc.poll() is None and d.stop() == 0


def test_an_upload_trickling_in_is_refused_so_it_cannot_hold_a_slot(tmp_path, smoke_model_path) -> None:
    """A byte every few seconds is never idle for the stall limit: sixteen such clients held every upload slot. Past
    the stall limit an upload must have averaged 16 KB/s (the limit shortened to 2 s here)."""
    d, port, home = start(tmp_path, smoke_model_path, env={"MONDRIAN_TEST_UPLOAD_IDLE_SECONDS": "2"})
    with d:
        body = form(image(jpeg(tmp_path, 250)))
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(f"POST /analyze HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary="
                      f"{BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:200])
            started = time.monotonic()
            got = b""
            for byte in body[200:260]:
                try:
                    s.sendall(bytes([byte]))
                except OSError:
                    break
                s.settimeout(0.5)
                try:
                    got += s.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    break
                if got:
                    break
            s.settimeout(10)
            try:
                while chunk := s.recv(65536):
                    got += chunk
            except OSError:
                pass
        answer = Answer(got)
        assert answer.status == 408 and "too slow" in answer.json()["error"], answer
        assert time.monotonic() - started < 15
        wait_for(lambda: spool_files(home) == [], timeout=10, what="an empty spool")
        assert upload(port, image(jpeg(tmp_path, 251))).status == 200
        assert d.stop() == 0


def test_an_api_bound_to_every_network_is_called_by_address_and_says_it_is_open(tmp_path, smoke_model_path) -> None:
    """`api_host = "0.0.0.0"` is the photographer asking for the network: a client calls it by this machine's
    address or name (both were refused, while a faked `Host: localhost` got in), a DNS name that is not this
    machine's is still refused (rebinding), and the log says plainly that anyone on the network may use it."""
    from daemon.api.app import own_names

    d, port, home = start(tmp_path, smoke_model_path, api_host="0.0.0.0")
    with d:
        address = socket.gethostbyname(socket.gethostname())
        for host in (f"{address}:{port}", f"192.0.2.7:{port}", f"[::1]:{port}", *sorted(own_names())):
            assert request(port, "GET", "/health", {"Host": host}).status == 200, host
        a = request(port, "GET", "/health", {"Host": f"rebind.example.com:{port}"})
        assert a.status == 403 and "names neither this machine nor an address" in a.json()["error"], a
        assert d.stop() == 0
    assert "listening on every network this machine is on" in d.output() and "no password" in d.output()


def test_forms_the_parser_cannot_take_are_json_errors_and_leak_nothing(tmp_path, smoke_model_path) -> None:
    """Found by a red-team pass:
    - a boundary past 256 characters made the form parser raise before the upload's file was looked after: a plain
      text 500, a traceback, and one open file leaked a request (macOS gives a process 256);
    - `filename*=idna''…` raised UnicodeError from the parser's callback: a plain text 500;
    - a chunked upload (no Content-Length) was never capped as a whole: 200 MB after the form's end was read;
    - a small file in a field Mondrian does not take (`-F other=@small.png`) was accepted in silence."""
    d, port, home = start(tmp_path, smoke_model_path, max_file_mb=1)
    with d:
        def open_files() -> int:
            return len(os.listdir(f"/proc/{d.proc.pid}/fd"))

        pic = jpeg(tmp_path, 260)
        before = open_files()
        long_boundary = "b" * 300
        body = (f"--{long_boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n"
                .encode() + pic + f"\r\n--{long_boundary}--\r\n".encode())
        for _ in range(20):
            a = request(port, "POST", "/analyze", {"Content-Type": f"multipart/form-data; boundary={long_boundary}"},
                        body)
            assert a.status == 400 and "boundary" in a.json()["error"], a
        assert open_files() <= before + 2, (before, open_files())  # (a connection or two may still be closing)

        for charset in ("idna", "punycode", "undefined"):
            disposition = f"form-data; name=\"image\"; filename*={charset}''caf%C3%A9.jpg"
            body = (f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n").encode() + pic \
                + f"\r\n--{BOUNDARY}--\r\n".encode()
            a = request(port, "POST", "/analyze", {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
                        body)
            assert a.status == 200 and a.headers["content-type"] == "application/json", (charset, a)

        # Chunked: the form, then 3 MB past its end (max_file_mb = 1 here).
        payload = form(image(pic, b"c.jpg")) + b"x" * (3 * 2**20)
        chunks = b"".join(b"%x\r\n" % len(payload[i:i + 65536]) + payload[i:i + 65536] + b"\r\n"
                          for i in range(0, len(payload), 65536)) + b"0\r\n\r\n"
        a = exchange(port, b"POST /analyze HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nTransfer-Encoding: "
                           b"chunked\r\nContent-Type: multipart/form-data; boundary=" + BOUNDARY.encode() + b"\r\n\r\n"
                     + chunks)
        assert a.status == 413 and "max_file_mb" in a.json()["error"], a

        small = jpeg(tmp_path, 261, size=(8, 8))
        assert len(small) < 1024
        a = upload(port, image(pic, b"d.jpg"), (b"other", b"small.jpg", small))
        assert a.status == 400 and "a second file, in the field `other`" in a.json()["error"], a
        # A browser's file input left empty (`filename=""`, no bytes) is no file: the photo is taken.
        a = upload(port, image(pic, b"e.jpg"), (b"notes", b"", b""))
        assert a.status == 200, a
        names = {Path(p).name for p in ledger_jobs(home)}
        assert not {"a.jpg", "c.jpg", "d.jpg"} & names and "e.jpg" in names, names  # refused: no job
        wait_for(lambda: spool_files(home) == [], timeout=10, what="an empty spool")
        assert d.proc.poll() is None and d.stop() == 0


def test_a_resent_photo_whose_first_original_left_its_report_folder_is_kept(tmp_path, smoke_model_path) -> None:
    """A resend is answered from the first report and its copy discarded, "the report folder has these very bytes".
    Once the photographer had moved that original into their library (or edited it), the resent copy was deleted
    too: the photo was nowhere in the home. It is kept in duplicates/ then, as an inbox duplicate is."""
    d, port, home = start(tmp_path, smoke_model_path)
    with d:
        pic = jpeg(tmp_path, 270)
        first = upload(port, image(pic, b"keep.jpg")).json()
        folder = home / "outbox" / first["job"]["report_folder"]
        (folder / "keep.jpg").rename(tmp_path / "library-keep.jpg")
        for _ in range(3):  # one copy kept, however often it is sent again
            again = upload(port, image(pic, b"keep.jpg"))
            assert again.status == 200 and again.json()["duplicate_of"] == first["job_id"], again
        kept = [p for p in (home / "outbox" / "duplicates").iterdir() if not p.name.endswith((".json", ".html"))]
        assert [p.read_bytes() for p in kept] == [pic], kept
        # With the original in place, a resend still leaves no copy.
        other = jpeg(tmp_path, 271)
        upload(port, image(other, b"other.jpg"))
        assert upload(port, image(other, b"other.jpg")).json()["duplicate_of"] is not None
        assert len([p for p in (home / "outbox" / "duplicates").iterdir()
                    if not p.name.endswith((".json", ".html"))]) == 1
        assert d.stop() == 0


def test_an_api_host_naming_two_addresses_is_served_on_both(tmp_path) -> None:
    """Attack: `api_host = "localhost"` on a Mac, where localhost is ::1 and 127.0.0.1 (::1 first): only ::1 was
    bound, and a client of the original Mondrian calling http://127.0.0.1:5100 found nothing. Each address the
    name gives is served now. (This machine's localhost may be IPv4 alone: the two addresses are given as a Mac's
    resolver gives them, and bound for real.)"""
    from daemon.api.server import bind_addresses
    from daemon.config import load_config

    port = free_port()
    macs_localhost = [*socket.getaddrinfo("::1", port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE),
                      *socket.getaddrinfo("127.0.0.1", port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)]
    socks = bind_addresses(load_config(make_home(tmp_path / "home")), macs_localhost)
    try:
        assert sorted(s.getsockname()[0] for s in socks) == ["127.0.0.1", "::1"]
        for family, address in ((socket.AF_INET6, "::1"), (socket.AF_INET, "127.0.0.1")):
            with socket.socket(family) as client:
                client.settimeout(5)
                client.connect((address, port))  # refused if nothing listens there
    finally:
        for s in socks:
            s.close()
    # Another program on one of the two (an `ssh -L` tunnel on 127.0.0.1 alone): the other is served, not nothing.
    with socket.socket(socket.AF_INET) as tunnel:
        tunnel.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tunnel.bind(("127.0.0.1", port))
        tunnel.listen(1)
        socks = bind_addresses(load_config(tmp_path / "home"), macs_localhost)
        try:
            assert [s.getsockname()[0] for s in socks] == ["::1"]
        finally:
            for s in socks:
                s.close()
