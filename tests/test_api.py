"""Issue 14: the original design's `/analyze` API, served by the real daemon (subprocess, smoke model) on a real
socket, called with the real `curl` and `jq`; the seed's own commands run exactly as written."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Daemon, ledger_jobs, make_home, photo, reports, status, wait_for

SEED = Path(__file__).resolve().parent / "seed" / "api_contract.md"
SEED_PORT = 5100
DIMS = ("composition", "lighting", "focus_sharpness", "color_harmony", "subject_isolation", "depth_perspective",
        "visual_balance", "emotional_impact")
CONTRACT_HEADERS = ("X-Analysis-Mode", "X-Requested-Mode", "X-Advisor-ID", "X-Strategy-Available")

# Under CI a missing tool fails the tests instead of skipping them (as the browser tests do).
pytestmark = pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")) and not os.environ.get("CI"),
                                reason="needs curl and jq (tests/system_deps.sh installs them)")


# -- helpers -------------------------------------------------------------------------------------------
def free_port(preferred: int = 0) -> int:
    """`preferred` if nothing listens there now, else a free port."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise AssertionError("no free port")


def seed_block(heading: str) -> str:
    """The first ```bash block under `heading` in the verbatim seed excerpt."""
    text = SEED.read_text(encoding="utf-8")
    after = text[text.index(heading):]
    return re.search(r"```bash\n(.*?)```", after, re.S).group(1)


def run_seed(heading: str, cwd: Path, port: int) -> subprocess.CompletedProcess:
    """The seed's commands as a shell script; only the port is rewritten, and only when 5100 was taken."""
    script = seed_block(heading)
    if port != SEED_PORT:
        script = script.replace(f"localhost:{SEED_PORT}", f"localhost:{port}")
    (cwd / "seed.sh").write_text(script)
    return subprocess.run(["bash", "seed.sh"], cwd=cwd, capture_output=True, text=True, timeout=600)


def curl(url: str, *args: str, timeout: float = 600) -> tuple[int, dict[str, str], str]:
    """(status, headers as sent, body) of one real curl call."""
    out = subprocess.run(["curl", "-s", "-D", "-", *args, url], capture_output=True, timeout=timeout)
    assert out.returncode == 0, f"curl failed ({out.returncode}): {out.stderr.decode(errors='replace')}"
    head, _, body = out.stdout.decode().partition("\r\n\r\n")
    while head.startswith("HTTP/1.1 100"):  # `Expect: 100-continue` for large uploads
        head, _, body = body.partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    headers.update({k.lower(): v for k, v in headers.items()})  # as sent, and lowercased
    return int(lines[0].split()[1]), headers, body


def json_docs(text: str) -> list[Any]:
    """Consecutive JSON documents (curl prints answers back to back, without newlines)."""
    dec, docs, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text) or text[i] not in "{[":
            return docs
        doc, i = dec.raw_decode(text, i)
        docs.append(doc)


def api_home(tmp_path: Path, port: int, **settings: Any) -> Path:
    return make_home(tmp_path / "home", api_port=port, **settings)


def wait_until_serving(d: Daemon, port: int) -> None:
    def up() -> bool:
        assert d.proc.poll() is None, d.output()
        try:
            code, _, body = curl(f"http://127.0.0.1:{port}/health")
            return code == 200 and json.loads(body)["model"]["loaded"]
        except AssertionError:
            return False
    wait_for(up, timeout=90, what="the API to answer /health with the model loaded")


def add_references(home: Path, advisor: str, n: int = 3) -> None:
    """Reference photos with curator sidecars, old enough to count as settled."""
    refs = home / "advisors" / advisor / "references"
    old = time.time() - 120
    for i in range(n):
        p = photo(refs / f"ref{i}.png", seed=100 + i)
        p.with_suffix(".json").write_text(json.dumps({"scores": {d: 3 + i for d in DIMS}}))
        for f in (p, p.with_suffix(".json")):
            os.utime(f, (old, old))


def reference_count(home: Path, advisor: str) -> int:
    from daemon.ledger import Ledger

    ledger = Ledger(home / "var" / "ledger.db")
    try:
        return sum(1 for r in ledger.references(advisor) if r.embedding is not None)
    finally:
        ledger.close()


def install_adapter(home: Path, smoke_model_path: Path, advisor: str) -> None:
    import mlx_vlm

    from daemon.config import load_config
    from tests.lora_helpers import install_version, random_adapter

    model, _ = mlx_vlm.load(str(smoke_model_path))
    src = random_adapter(home.parent / "adapter-src", model, seed=7)
    install_version(load_config(home, env={}), advisor, src, model_path=smoke_model_path)


# -- the seed's own commands -----------------------------------------------------------------------------
def test_the_seeds_testing_modes_and_fallback_check_work_verbatim(tmp_path, smoke_model_path) -> None:
    port = free_port(SEED_PORT)
    home = api_home(tmp_path, port)
    work = tmp_path / "work"
    photo(work / "x.jpg", seed=1)
    photo(work / "test.jpg", seed=2)
    with Daemon(home, smoke_model_path) as d:
        wait_until_serving(d, port)
        # "Mode fallback occurring": no adapter and no references yet, so lora falls back to baseline.
        out = run_seed("### Mode fallback occurring", work, port)
        assert out.returncode == 0 and out.stdout.strip() == "< X-Analysis-Mode: baseline", out.stdout + out.stderr
        code, headers, body = curl(f"http://localhost:{port}/jobs/1")
        assert code == 200 and headers["X-Analysis-Mode"] == "baseline" and headers["X-Requested-Mode"] == "lora"
        assert headers["X-Advisor-ID"] == "ansel" and headers["X-Strategy-Available"] == "True"
        answer = json.loads(body)
        assert [(f["from"], f["to"]) for f in answer["metadata"]["fallbacks"]] == [("lora", "rag"), ("rag", "baseline")]
        assert "no trained adapter" in answer["metadata"]["fallbacks"][0]["reason"]

        # Give ansel references (rag) and an adapter (lora), as the seed's modes require.
        add_references(home, "ansel")
        install_adapter(home, smoke_model_path, "ansel")
        wait_for(lambda: reference_count(home, "ansel") == 3, timeout=120, what="ansel's references indexed")

        out = run_seed("### Testing Modes", work, port)
        assert out.returncode == 0, out.stderr
        first, _, loop = out.stdout.partition("=== baseline ===")
        answers = json_docs(first)
        assert [a["mode_used"] for a in answers] == ["baseline", "rag", "lora"], out.stdout[:2000]
        for a, mode in zip(answers, ("baseline", "rag", "lora")):
            assert set(a["dimensional_analysis"]) == set(DIMS)
            assert all(set(v) >= {"score", "comment"} and 0 <= v["score"] <= 10
                       for v in a["dimensional_analysis"].values())
            assert a["advisor_id"] == "ansel" and isinstance(a["overall_grade"], int)
            meta = a["metadata"]
            assert meta["requested_mode"] == mode and meta["fallbacks"] == [] and meta["model"]
            assert {"analysis_s"} <= set(meta["timings"])
            # report.json carries the very same fields: one parser reads both.
            report = json.loads((home / "outbox" / a["job"]["report_folder"] / "report.json").read_text())
            assert {k: v for k, v in a.items() if k != "job"} == report
        assert answers[1]["metadata"]["similar_images"] and answers[1]["metadata"]["user_profile"]
        assert re.fullmatch(r"ansel/v\d{4}", answers[2]["metadata"]["adapter"])
        # The loop: each mode's `jq '.dimensional_analysis'`.
        sections = re.split(r"=== (baseline|rag|lora) ===\n", "=== baseline ===" + loop)[1:]
        assert sections[0::2] == ["baseline", "rag", "lora"]
        for mode, text in zip(sections[0::2], sections[1::2]):
            (dims,) = json_docs(text)
            assert dims == answers[("baseline", "rag", "lora").index(mode)]["dimensional_analysis"]

        # The fallback check again, now that lora can serve: the header names the mode used.
        photo(work / "x.jpg", seed=3)
        out = run_seed("### Mode fallback occurring", work, port)
        assert out.stdout.strip() == "< X-Analysis-Mode: lora", out.stdout + out.stderr

        # Every request is one ledger job, visible in `status` and the outbox index.
        jobs = [j for j in ledger_jobs(home).values()]
        info = status(home, smoke_model_path)
        assert info["counts"]["done"] == 8 and info["counts"]["failed"] == 0
        index = (home / "outbox" / "index.html").read_text()
        for a in answers:
            assert f'data-folder="{a["job"]["report_folder"]}"' in index
        assert len(reports(home / "outbox")) == 5  # x.jpg twice, test.jpg per mode; the loop's are duplicates
        assert not any((home / "var" / "spool").iterdir())  # every upload left the spool for the outbox
        assert jobs
        assert d.stop() == 0


# -- bad requests ----------------------------------------------------------------------------------------
def test_bad_requests_get_a_clear_json_error_and_leave_nothing_behind(tmp_path, smoke_model_path) -> None:
    port = free_port()
    home = api_home(tmp_path, port, max_file_mb=1)
    url = f"http://127.0.0.1:{port}"
    work = tmp_path / "work"
    pic = photo(work / "ok.jpg", seed=4)
    (work / "notes.jpg").write_text("not a photo at all\n" * 50)
    (work / "big.jpg").write_bytes(os.urandom(3 * 2**20))
    with Daemon(home, smoke_model_path) as d:
        wait_until_serving(d, port)

        def refused(expect: int, *args: str, path: str = "/analyze") -> dict:
            code, headers, body = curl(url + path, *args)
            assert code == expect, (code, body)
            lower = {k.lower(): v for k, v in headers.items()}
            assert lower["content-type"] == "application/json" and "access-control-allow-origin" not in lower
            return json.loads(body)

        assert "field `image`" in refused(400, "-X", "POST", "-F", "advisor=ansel")["error"]
        assert "multipart/form-data" in refused(400, "-X", "POST", "-d", "image=x")["error"]
        assert "not an image" in refused(415, "-F", f"image=@{work / 'notes.jpg'}")["error"]
        big = refused(413, "-F", f"image=@{work / 'big.jpg'}")
        assert "max_file_mb" in big["error"] and big["max_file_mb"] == 1
        # Without a Content-Length the photo is counted as it streams in, and refused at the limit.
        assert "max_file_mb" in refused(413, "-H", "Transfer-Encoding: chunked",
                                        "-F", f"image=@{work / 'big.jpg'}")["error"]
        bad = refused(400, "-F", f"image=@{pic}", "-F", "advisor=nobody")
        assert "unknown advisor 'nobody'" in bad["error"] and "ansel" in bad["valid_advisors"]
        bad = refused(400, "-F", f"image=@{pic}", "-F", "mode=turbo")
        assert bad["error"] == "Unknown mode: turbo. Use: ['baseline', 'rag', 'lora']"  # the original's ValueError
        assert bad["valid_modes"] == ["baseline", "rag", "lora"]
        refused(404, path="/jobs/12345")
        # A local service: a request addressed to another name (DNS rebinding) or sent by a web page is refused.
        for header in ("Host: attacker.example", f"Host: attacker.example:{port}", "Host: 127.0.0.1.nip.io"):
            assert "loopback" in refused(403, "-H", header, "-F", f"image=@{pic}")["error"]
        assert "web page" in refused(403, "-H", "Origin: http://attacker.example", "-F", f"image=@{pic}")["error"]
        assert "loopback" in refused(403, "-H", "Host: attacker.example", path="/health")["error"]
        code, headers, _ = curl(url + "/analyze", "-X", "OPTIONS", "-H", "Origin: http://attacker.example",
                                "-H", "Access-Control-Request-Method: POST")
        assert code == 403 and not any(k.lower().startswith("access-control") for k in headers)

        # Nothing was queued, written or left in the spool by any of them.
        assert ledger_jobs(home) == {}
        assert list((home / "var" / "spool").iterdir()) == []
        assert [p.name for p in (home / "outbox").iterdir() if p.name not in (".staging", "duplicates", "failed", "index.html")] == []
        assert not any((home / "outbox" / "failed").iterdir())

        # And the daemon still serves: /health names the model and the queue.
        code, _, body = curl(url + "/health")
        health = json.loads(body)
        assert code == 200 and health["model"]["smoke"] is True and health["queue"]["queued"] == 0
        assert d.stop() == 0


def _stalled_upload(port: int, timeout: float) -> str:
    """Send the headers of a 10 kB upload and 2 bytes of it, then nothing: what the server answers, if anything."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"POST /analyze HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=xx\r\n"
                  b"Content-Length: 10000\r\n\r\n--")
        reply = b""
        try:
            while not reply.endswith(b"}"):  # the JSON answer's end (the server may send head and body apart)
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
        except socket.timeout:
            pass
        return reply.decode("latin-1")


def test_pages_stalled_uploads_odd_addresses_and_repeat_requests_get_straight_answers(tmp_path,
                                                                                       smoke_model_path) -> None:
    port = free_port()
    home = api_home(tmp_path, port)
    url = f"http://127.0.0.1:{port}"
    work = tmp_path / "work"
    pic = photo(work / "again.png", seed=8)
    # A photo named like a web page (a PNG underneath): analysed, but never linked from its report, where a click
    # would open it as a page and run what it carries.
    (work / "poly.html").write_bytes(photo(work / "poly.png", seed=9).read_bytes() + b"<script>alert(1)</script>")
    with Daemon(home, smoke_model_path, MONDRIAN_TEST_UPLOAD_IDLE_SECONDS="2") as d:
        wait_until_serving(d, port)

        def answered(expect: int, path: str, *args: str) -> dict:
            code, headers, body = curl(url + path, *args)
            assert code == expect and headers["content-type"] == "application/json", (path, code, body)
            return json.loads(body)

        # A page served by this machine on another port is still a web page (a dev server, Jupyter, a download).
        for origin in ("http://localhost:3000", f"http://127.0.0.1:{port + 1}", "http://localhost"):
            assert "web page" in answered(403, "/analyze", "-H", f"Origin: {origin}", "-F", f"image=@{pic}")["error"]
        answered(200, "/health", "-H", f"Origin: {url}")  # its own origin is no other page
        # Every wrong address or method answers JSON with an `error`, never a 500 or FastAPI's own shape.
        for path in ("/jobs/abc", "/jobs/1.5", "/jobs/99999999999999999999", "/jobs/9223372036854775808", "/nope"):
            assert "error" in answered(404, path)
        assert "POST /analyze" in answered(405, "/analyze")["error"]
        assert "error" in answered(405, "/jobs/1", "-X", "DELETE")
        # A client that stops sending mid-upload is answered (408) and leaves nothing behind.
        started = time.monotonic()
        reply = _stalled_upload(port, timeout=30)
        assert reply.startswith("HTTP/1.1 408") and "stalled" in reply, reply[:500]
        assert time.monotonic() - started < 20
        assert list((home / "var" / "spool").iterdir()) == []

        # The same photo asked for again in another mode that falls back to the same one: the earlier critique,
        # but this request's own facts (what it asked for, its job, how it fell back).
        first = answered(200, "/analyze", "-F", f"image=@{pic}", "-F", "mode=rag")
        code, headers, body = curl(url + "/analyze", "-F", f"image=@{pic}", "-F", "mode=lora")
        second = json.loads(body)
        assert code == 200 and headers["X-Requested-Mode"] == "lora" and second["mode_used"] == "baseline"
        assert second["job_id"] == int(headers["X-Job-ID"]) != first["job_id"]
        assert second["duplicate_of"] == first["job_id"] and "already analysed" in second["message"]
        assert second["mode"]["requested"] == second["metadata"]["requested_mode"] == "lora"
        assert [(f["from"], f["to"]) for f in second["metadata"]["fallbacks"]] == [("lora", "rag"), ("rag", "baseline")]
        assert second["dimensional_analysis"] == first["dimensional_analysis"]
        again = answered(200, f"/jobs/{second['job_id']}")
        assert again["mode"]["requested"] == "lora" and again["duplicate_of"] == first["job_id"]

        page = answered(200, "/analyze", "-F", f"image=@{work / 'poly.html'}")
        folder = home / "outbox" / page["job"]["report_folder"]
        # A PNG that is also a page, sent as poly.html: stored as what it holds, so no browser opens it as a page
        assert (folder / "poly.png").is_file()
        assert sorted(p.name for p in folder.glob("*.htm*")) == ["report.html"]
        assert 'id="original" href="poly.png"' in (folder / "report.html").read_text()
        assert d.stop() == 0


def test_a_request_the_model_cannot_finish_in_time_gets_202_and_a_job_url(tmp_path, smoke_model_path) -> None:
    port = free_port()
    home = api_home(tmp_path, port, api_wait_seconds=0)
    pic = photo(tmp_path / "p.jpg", seed=5)
    with Daemon(home, smoke_model_path) as d:
        wait_until_serving(d, port)
        code, headers, body = curl(f"http://127.0.0.1:{port}/analyze", "-F", f"image=@{pic}", "-F", "mode=rag")
        pending = json.loads(body)
        assert code == 202 and headers["location"] == pending["job_url"] == f"/jobs/{pending['job_id']}"
        assert headers["X-Requested-Mode"] == "rag" and headers["X-Advisor-ID"] == "ansel"

        def finished() -> dict | None:
            code, headers, body = curl(f"http://127.0.0.1:{port}{pending['job_url']}")
            return json.loads(body) if code == 200 else None
        report = wait_for(finished, timeout=120, what="the job's report")
        assert report["mode_used"] == "baseline" and report["job"]["job_id"] == pending["job_id"]
        assert d.stop() == 0


def test_uploads_answered_202_leave_no_folder_behind_in_the_spool(tmp_path, smoke_model_path) -> None:
    """Each upload has a folder of its own in the spool; answered 202, the request is over before the worker moves
    the photo out, and that folder must still go once it has: while the daemon runs, not only at its next start.
    Also what an earlier run left: an emptied folder, and a queued upload whose photo is still in its folder."""
    from daemon.config import load_config
    from daemon.ledger import Ledger

    port = free_port()
    home = api_home(tmp_path, port, api_wait_seconds=0)
    cfg = load_config(home, env={})
    cfg.ensure_dirs()
    (cfg.spool_dir / "0123456789abcdef").mkdir(parents=True)  # emptied by the worker of an earlier run
    earlier = photo(cfg.spool_dir / "fedcba9876543210" / "earlier.jpg", seed=20)  # queued, then the daemon stopped
    ledger = Ledger(cfg.db_path)
    try:
        st = earlier.stat()
        ledger.enqueue_upload(earlier, "api/earlier.jpg", "ansel", "default", "baseline", st.st_size, st.st_mtime)
    finally:
        ledger.close()
    with Daemon(home, smoke_model_path) as d:
        wait_until_serving(d, port)
        pending = []
        for i in range(3):
            pic = photo(tmp_path / f"q{i}.jpg", seed=21 + i)
            code, _, body = curl(f"http://127.0.0.1:{port}/analyze", "-F", f"image=@{pic}")
            assert code == 202, body
            pending.append(json.loads(body)["job_url"])

        def all_done() -> bool:
            return {j.state for j in ledger_jobs(home).values()} == {"done"}
        wait_for(all_done, timeout=180, what="every upload analysed")
        assert len(ledger_jobs(home)) == 4 and len(reports(home / "outbox")) == 4
        assert all(curl(f"http://127.0.0.1:{port}{url}")[0] == 200 for url in pending)
        # The daemon is still running: the folders went as the photos left, not at a restart.
        def left() -> list[str]:
            return sorted(str(p.relative_to(cfg.spool_dir)) for p in cfg.spool_dir.rglob("*"))
        try:
            wait_for(lambda: not left(), timeout=10, what="an empty spool")
        except AssertionError:
            raise AssertionError(f"left in the spool after every job was done: {left()}") from None
        assert d.stop() == 0


def test_a_photo_that_fails_analysis_answers_422_with_the_reason(tmp_path, smoke_model_path) -> None:
    port = free_port()
    home = api_home(tmp_path, port)
    broken = tmp_path / "broken.jpg"
    data = photo(tmp_path / "whole.jpg", seed=6).read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # a JPEG header Pillow recognises, with half its data
    with Daemon(home, smoke_model_path) as d:
        wait_until_serving(d, port)
        code, _, body = curl(f"http://127.0.0.1:{port}/analyze", "-F", f"image=@{broken}")
        failed = json.loads(body)
        assert code == 422 and failed["state"] == "failed" and "could not be analysed" in failed["error"]
        assert (home / "outbox" / "failed" / "broken.jpg").exists()  # recorded like an inbox photo
        assert (home / "outbox" / "failed" / "broken.jpg.error.json").exists()
        assert d.stop() == 0


# -- crashes and stops -------------------------------------------------------------------------------------
def test_sigkill_while_a_request_is_in_flight_loses_nothing(tmp_path, smoke_model_path) -> None:
    port = free_port()
    home = api_home(tmp_path, port)
    pic = photo(tmp_path / "inflight.jpg", seed=8)
    with Daemon(home, smoke_model_path, MONDRIAN_TEST_STOP_AT="analysing") as d:
        wait_until_serving(d, port)
        client = subprocess.Popen(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-F", f"image=@{pic}",
                                   "-F", "mode=baseline", f"http://127.0.0.1:{port}/analyze"],
                                  stdout=subprocess.PIPE, text=True)
        wait_for(lambda: open(f"/proc/{d.proc.pid}/stat").read().split(")")[1].split()[0] == "T",
                 timeout=120, what="the daemon stopped in the middle of the analysis")
        d.kill()
        assert client.wait(timeout=60) != 0 or client.stdout.read() == "000"  # the client got no answer
    (job,) = ledger_jobs(home).values()
    assert job.rel_path == "api/inflight.jpg" and job.state == "running"
    with Daemon(home, smoke_model_path) as d:
        wait_until_serving(d, port)

        def done() -> dict | None:
            code, headers, body = curl(f"http://127.0.0.1:{port}/jobs/{job.id}")
            return (headers, json.loads(body)) if code == 200 else None
        headers, report = wait_for(done, timeout=120, what="the interrupted job finished after the restart")
        assert report["job_id"] == job.id and headers["X-Analysis-Mode"] == "baseline"
        assert d.stop() == 0
    (again,) = ledger_jobs(home).values()  # exactly once: no second job, one report, the original beside it
    assert again.state == "done" and again.id == job.id
    (folder,) = [p.parent for p in reports(home / "outbox")]
    assert (folder / "inflight.jpg").read_bytes() == pic.read_bytes()
    assert [p for p in (home / "var" / "spool").rglob("*") if not p.is_dir()] == []


def test_an_upload_killed_before_it_was_queued_leaves_nothing(tmp_path, smoke_model_path) -> None:
    """Killed between the upload's last byte and its ledger row: the client had no answer, so there is no job, and
    the next start sweeps the file out of the spool instead of leaving it there for ever."""
    port = free_port()
    home = api_home(tmp_path, port)
    with Daemon(home, smoke_model_path, MONDRIAN_TEST_CRASH_AT="upload_committed") as d:
        wait_until_serving(d, port)
        out = subprocess.run(["curl", "-s", "-F", f"image=@{photo(tmp_path / 'lost.jpg')}",
                              f"http://127.0.0.1:{port}/analyze"], capture_output=True, timeout=120)
        assert out.returncode != 0 and d.wait(timeout=60) == -signal.SIGKILL
    assert [p.name for p in (home / "var" / "spool").rglob("*") if p.is_file()] == ["lost.jpg"]
    with Daemon(home, smoke_model_path) as d:
        wait_until_serving(d, port)
        assert list((home / "var" / "spool").iterdir()) == [] and ledger_jobs(home) == {}
        assert d.stop() == 0


def test_sigterm_answers_the_waiting_request_and_the_job_finishes_at_the_next_start(tmp_path,
                                                                                    smoke_model_path) -> None:
    port = free_port()
    home = api_home(tmp_path, port)
    pic = photo(tmp_path / "slow.jpg", seed=9)
    with Daemon(home, smoke_model_path, MONDRIAN_TEST_TOKEN_SECONDS="0.5") as d:
        wait_until_serving(d, port)
        result: dict[str, Any] = {}
        t = threading.Thread(target=lambda: result.update(answer=curl(f"http://127.0.0.1:{port}/analyze",
                                                                      "-F", f"image=@{pic}")))
        t.start()
        wait_for(lambda: status(home, smoke_model_path)["counts"]["running"] == 1, timeout=120,
                 what="the photo in analysis")
        d.signal(signal.SIGTERM)
        t.join(timeout=60)
        code, headers, body = result["answer"]
        pending = json.loads(body)
        assert code == 202 and "stopping" in pending["message"] and headers["location"] == pending["job_url"]
        assert d.wait(timeout=60) == 0, d.output()
    assert [j.state for j in ledger_jobs(home).values()] == ["queued"]
    with Daemon(home, smoke_model_path) as d:
        wait_until_serving(d, port)
        wait_for(lambda: curl(f"http://127.0.0.1:{port}{pending['job_url']}")[0] == 200, timeout=120,
                 what="the job finished after the restart")
        assert d.stop() == 0


def test_new_requests_while_stopping_get_503(tmp_path) -> None:
    """The server as the daemon runs it, with the daemon's stop flag set (its window in a real stop is the worker's
    wind-down): a real socket and a real curl."""
    from daemon.api.app import Door
    from daemon.api.server import ApiServer
    from daemon.api.spool import Spool
    from daemon.config import load_config
    from daemon.ledger import Ledger

    port = free_port()
    cfg = load_config(make_home(tmp_path / "home", api_port=port), env={})
    cfg.ensure_dirs()
    ledger, stopping = Ledger(cfg.db_path), threading.Event()
    server = ApiServer(Door(cfg, ledger, stopping, lambda: None, Spool(cfg.spool_dir)))
    server.start()
    try:
        stopping.set()
        code, headers, body = curl(f"http://127.0.0.1:{port}/analyze", "-F", f"image=@{photo(tmp_path / 'p.jpg')}")
        assert code == 503 and "stopping" in json.loads(body)["error"] and headers["retry-after"]
        assert ledger.jobs() == [] and list(cfg.spool_dir.iterdir()) == []
    finally:
        server.stop()
        ledger.close()


def test_an_upload_the_ledger_cannot_take_is_answered_503_with_why_not_left_hanging(tmp_path,
                                                                                   smoke_model_path) -> None:
    """Attack: with the ledger locked by another program (an open `sqlite3` shell), an upload waited for the lock as
    long as it was held: the client hung without a word. It is answered 503 with the reason and the fix after a few
    seconds, nothing is kept of it, and once the lock is gone the same upload is critiqued."""
    import sqlite3

    port = free_port()
    home = api_home(tmp_path, port)
    shot = photo(tmp_path / "p.jpg", seed=3)
    with Daemon(home, smoke_model_path) as d:
        wait_until_serving(d, port)
        holder = sqlite3.connect(home / "var" / "ledger.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            began = time.monotonic()
            code, headers, body = curl(f"http://127.0.0.1:{port}/analyze", "-F", f"image=@{shot}", timeout=120)
            waited = time.monotonic() - began
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        said = json.loads(body)["error"]
        assert code == 503 and headers["retry-after"], (code, body)
        assert waited < 40, waited
        assert "cannot be written (database is locked)" in said and "close it" in said, said
        assert ledger_jobs(home) == {} and list((home / "var" / "spool").iterdir()) == []
        code, _, body = curl(f"http://127.0.0.1:{port}/analyze", "-F", f"image=@{shot}")
        assert code == 200, body
        assert d.proc.poll() is None and d.stop() == 0


def test_an_upload_while_the_outbox_cannot_take_reports_is_answered_503_with_why(tmp_path, smoke_model_path) -> None:
    """Attack: with the outbox read-only (or its disk full), an upload was queued to wait and its client held for
    api_wait_seconds, then told "still running" with no reason, while /health said all was well."""
    from tests.test_faults import read_only

    port = free_port()
    home = api_home(tmp_path, port)
    shot = photo(tmp_path / "p.jpg", seed=3)
    with Daemon(home, smoke_model_path) as d:
        wait_until_serving(d, port)
        with read_only(home / "outbox"):
            began = time.monotonic()
            code, headers, body = curl(f"http://127.0.0.1:{port}/analyze", "-F", f"image=@{shot}", timeout=120)
            assert time.monotonic() - began < 20
            said = json.loads(body)["error"]
            assert code == 503 and headers["retry-after"], (code, body)
            assert "is on a disk mounted read-only" in said and "mount it read-write, then send the photo again" \
                in said, said
            health = json.loads(curl(f"http://127.0.0.1:{port}/health")[2])
            assert "read-only" in (health["outbox_problem"] or ""), health
        assert ledger_jobs(home) == {} and list((home / "var" / "spool").iterdir()) == []
        assert json.loads(curl(f"http://127.0.0.1:{port}/health")[2])["outbox_problem"] is None
        code, _, body = curl(f"http://127.0.0.1:{port}/analyze", "-F", f"image=@{shot}")
        assert code == 200, body
        assert d.stop() == 0


def test_a_taken_port_stops_the_start_with_what_to_do(tmp_path, smoke_model_path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        home = api_home(tmp_path, port)
        (home / "inbox" / "p.jpg").write_bytes(photo(tmp_path / "p.jpg").read_bytes())
        with Daemon(home, smoke_model_path) as d:
            assert d.wait(timeout=60) == 78
            out = d.output()
    assert f"127.0.0.1:{port} is taken" in out and "api_port" in out and "api_port = 0" in out
    assert (home / "inbox" / "p.jpg").exists() and not reports(home / "outbox")  # nothing was touched


# -- importing an original database ------------------------------------------------------------------------
def _original_db(path: Path, rows: list[tuple]) -> Path:
    import sqlite3

    db = sqlite3.connect(path)
    cols = ", ".join(f"{d}_score REAL, {d}_comment TEXT" for d in DIMS)
    db.execute(f"CREATE TABLE dimensional_profiles (id TEXT PRIMARY KEY, advisor_id TEXT NOT NULL, "
               f"image_path TEXT NOT NULL, {cols})")
    for row_id, advisor, image, scores in rows:
        values = [row_id, advisor, image]
        for d, s in zip(DIMS, scores):
            values += [s, f"{d.replace('_', ' ')} as Ansel saw it" if s is not None else None]
        db.execute(f"INSERT INTO dimensional_profiles VALUES ({', '.join('?' * len(values))})", values)
    db.commit()
    db.close()
    return path


def test_import_db_brings_in_scored_references_read_only_and_idempotently(tmp_path, smoke_model_path) -> None:
    from tests.harness import mondrian

    home = make_home(tmp_path / "home")
    orig = tmp_path / "original"
    (orig / "mondrian").mkdir(parents=True)
    good = [7.0, 8.0, 6.0, 5.0, 9.0, 7.0, 8.0, 9.6]
    photo(orig / "source" / "ansel" / "moon.jpg", seed=20)
    photo(orig / "source" / "ansel" / "dunes.jpg", seed=21)
    photo(orig / "temp" / "analyze_image_1.jpg", seed=22)
    db = _original_db(orig / "mondrian" / "mondrian.db", [
        ("a1", "ansel", "source/ansel/moon.jpg", good),  # relative to the original project, as it kept them
        ("a2", "ansel", str(orig / "source" / "ansel" / "dunes.jpg"), [5] * 8),
        ("a3", "ansel", "source/ansel/gone.jpg", good),
        ("a4", "ansel", "source/ansel/moon.jpg", good[:7] + [None]),
        ("a5", "ansel", "source/ansel/dunes.jpg", [11] + good[1:]),
        ("a6", "weston", "source/ansel/moon.jpg", good),
        ("a7", "ansel", "temp/analyze_image_1.jpg", good),
        ("c1", "cartier", "source/ansel/dunes.jpg", good),
        ("n1", "", "source/ansel/moon.jpg", good),  # whose? the row does not say
    ])
    before = db.read_bytes()
    out = mondrian(home, smoke_model_path, "references", "import-db", str(db), "--json")
    assert out.returncode == 1, out.stderr  # some rows were skipped
    outcome = {o["row"]: o for o in json.loads(out.stdout)}
    assert [k for k, o in outcome.items() if o["action"] == "imported"] == ["a1", "a2", "c1"]
    assert "image not found" in outcome["a3"]["reason"]
    assert "bad scores" in outcome["a4"]["reason"] and "emotional_impact score is missing" in outcome["a4"]["reason"]
    assert "bad scores" in outcome["a5"]["reason"] and "11" in outcome["a5"]["reason"]
    assert "unknown advisor 'weston'" in outcome["a6"]["reason"]
    assert "uploaded for analysis" in outcome["a7"]["reason"]
    assert "names no advisor" in outcome["n1"]["reason"] and "advisor.toml" not in outcome["n1"]["reason"]
    assert "3 imported, 0 already there, 6 skipped" in out.stderr
    refs = home / "advisors" / "ansel" / "references"
    assert sorted(p.name for p in refs.iterdir()) == ["dunes.jpg", "dunes.json", "moon.jpg", "moon.json"]
    assert (refs / "moon.jpg").read_bytes() == (orig / "source" / "ansel" / "moon.jpg").read_bytes()
    from daemon.references.sidecar import read_profile

    moon = read_profile(refs / "moon.json")  # the curator-sidecar parser every reference goes through
    assert moon.scores == dict(zip(DIMS, (7, 8, 6, 5, 9, 7, 8, 10)))
    assert moon.comments["lighting"] == "lighting as Ansel saw it"
    assert db.read_bytes() == before and not Path(f"{db}-wal").exists()  # read-only: not even a journal

    again = mondrian(home, smoke_model_path, "references", "import-db", str(db), "--json")
    assert [o["action"] for o in json.loads(again.stdout)].count("imported") == 0
    assert "0 imported, 3 already there, 6 skipped" in again.stderr
    assert sorted(p.name for p in refs.iterdir()) == ["dunes.jpg", "dunes.json", "moon.jpg", "moon.json"]

    # --advisor takes that advisor's rows only; the references index reads the sidecars as the curator's.
    only = mondrian(home, smoke_model_path, "references", "import-db", str(db), "--advisor", "cartier")
    assert "0 imported, 1 already there, 0 skipped" in only.stderr and only.returncode == 0
    idx = mondrian(home, smoke_model_path, "references", "index", "--advisor", "ansel")
    assert idx.returncode == 0, idx.stderr
    listed = json.loads(mondrian(home, smoke_model_path, "references", "list", "--advisor", "ansel",
                                 "--json").stdout)
    assert listed["count"] == 2 and {r["source"] for r in listed["references"]} == {"human"}
    bad = mondrian(home, smoke_model_path, "references", "import-db", str(home / "mondrian.toml"))
    assert bad.returncode == 1 and "not a readable SQLite database" in bad.stderr
