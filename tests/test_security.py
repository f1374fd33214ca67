"""Issue 3, promise 7: security. Advisor ids from folder names and sidecar contents are validated (no traversal);
`<script>` in file names (through the real daemon) and in model output (through the real worker and report
writer) comes out escaped; HTML never embeds the absolute path of the user's home; ledger and outbox files
follow the user's umask (077 and 022), never world-writable."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

from daemon.analysis.advisors import UnknownAdvisor, load_advisors, references_dir
from daemon.config import load_config
from daemon.analysis.critique import DIMENSIONS
from daemon.ledger import Ledger
from daemon.pipeline.worker import Worker
from tests.harness import REPO, Daemon, env_for, make_home, photo, status, wait_for

FAST = dict(max_pixels=56 * 56, comment_max_chars=8, max_tokens=400, quiet_seconds=0.2, rescan_seconds=1)
SCRIPT = "<script>alert(1)</script>"


class _Tags(HTMLParser):
    """Every element and attribute a browser would build from the page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.handlers: list[tuple[str, str]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.handlers += [(tag, k) for k, _ in attrs if k.lower().startswith("on")]
        self.handlers += [(tag, k) for k, v in attrs if k in ("src", "href") and v and
                          v.strip().lower().startswith(("javascript:", "data:text/html"))]

    def handle_data(self, data):
        self.text.append(data)


def _assert_inert(html: str, where: str) -> str:
    parser = _Tags()
    parser.feed(html)
    assert "script" not in parser.tags, f"{where}: a <script> element got through"
    assert not parser.handlers, f"{where}: event handlers or script URLs got through: {parser.handlers}"
    return "".join(parser.text)


# -- file names and folder names through the real daemon -----------------------------------------------

def test_hostile_names_are_escaped_and_advisor_folders_are_validated(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    inbox, outbox = home / "inbox", home / "outbox"
    # A user advisor whose id tries to climb out, and one that is fine.
    (home / "advisors" / "evil").mkdir(parents=True)
    (home / "advisors" / "evil" / "advisor.toml").write_text('id = "../../evil"\nname = "x"\nprompt = "x"\n')
    names = {
        # POSIX names cannot hold "/", so "</script>" arrives as a folder "<script>alert(1)<" + "script>.jpg"
        f"{SCRIPT}.jpg": 1,
        "<img src=x onerror=alert(2)>.jpg": 2,
        '"><svg onload=alert(3)>.jpg': 3,
        "javascript:alert(4).jpg": 4,
        "ansel../a.jpg": 5, "ANSEL/b.jpg": 6, "ansel%2F..%2F..%2Fetc/c.jpg": 7, "ansel /d.jpg": 8,
        "evil/e.jpg": 9, "%2e%2e%2f/f.jpg": 10, "cartier/g.jpg": 11,
    }
    for name, seed in names.items():
        photo(inbox / name, seed=seed, size=(64, 48))
    photo(inbox / "mode traversal.jpg", seed=12, size=(64, 48))
    (inbox / "mode traversal.mode").write_text("../../../etc/passwd")
    with Daemon(home, smoke_model_path) as d:
        wait_for(lambda: (lambda c: c["done"] + c["failed"] == len(names) + 1 and not c["queued"]
                          and not c["running"])(status(home, smoke_model_path)["counts"]), 120)
        assert d.stop() == 0

    known = set(load_advisors(load_config(home)))
    assert "evil" not in known and "../../evil" not in known
    jobs = {j.rel_path: j for j in Ledger(home / "var" / "ledger.db").jobs()}
    # evil/: a folder of advisors/ whose advisor.toml is refused (its id climbs out). Its inbox folder's photo is
    # not critiqued by the default advisor in its place: it fails, saying what is wrong with the definition.
    evil = jobs.pop("evil/e.jpg")
    assert evil.advisor == "evil" and evil.state == "failed", (evil.advisor, evil.state)
    assert "advisors/evil/advisor.toml" in evil.error and "is not an advisor id" in evil.error, evil.error
    for job in jobs.values():
        assert job.advisor in known, job.advisor
        if job.output_dir:
            assert Path(job.output_dir).resolve().is_relative_to(outbox.resolve()), job.output_dir
    assert jobs["cartier/g.jpg"].advisor == "cartier" and jobs["cartier/g.jpg"].advisor_source == "folder"
    # Advisor folders match whatever their case (a photographer types `Ansel/`), always mapped to the known id.
    assert jobs["ANSEL/b.jpg"].advisor == "ansel" and jobs["ANSEL/b.jpg"].advisor_source == "folder"
    for rel in ("ansel../a.jpg", "ansel%2F..%2F..%2Fetc/c.jpg", "ansel /d.jpg", "%2e%2e%2f/f.jpg"):
        assert jobs[rel].advisor == "ansel" and jobs[rel].advisor_source == "default", rel  # the default
    mode = jobs["mode traversal.jpg"]
    assert mode.state == "failed" and "unknown" in mode.error and "baseline, rag, lora" in mode.error

    pages = list(outbox.rglob("*.html"))
    assert len(pages) >= len(names)
    for page in pages:
        html = page.read_text()
        text = _assert_inert(html, str(page.relative_to(outbox)))
        assert str(home) not in html and str(tmp_path) not in html, f"{page}: absolute path in HTML"
    index_text = _assert_inert((outbox / "index.html").read_text(), "index.html")
    for shown in ("script>.jpg", "<img src=x onerror=alert(2)>.jpg", '"><svg onload=alert(3)>.jpg'):
        assert shown in index_text, f"{shown!r} should be shown as text"
    for ref in outbox.rglob("*.json"):
        assert str(home) not in ref.read_text(), f"{ref}: absolute home path in a record"
    print(f"\nsecurity: pages={len(pages)} scripts=0 handlers=0 absolute_paths=0 "
          f"advisors_from_folders_valid={len(jobs)}/{len(jobs)} (and evil/ failed, saying why)")


def test_references_dir_refuses_traversal(tmp_path):
    cfg = load_config(make_home(tmp_path / "home"))
    for bad in ("../x", "..", "a/../../b", "/etc", "ANSEL", "a b", ""):
        with pytest.raises(UnknownAdvisor):
            references_dir(cfg, bad)


# -- model output through the real worker and report writer ---------------------------------------------

@dataclass
class _Gen:
    data: dict
    generated_tokens: int = 1


class _HostileRuntime:
    """Stands in for the model: returns schema-valid JSON full of markup (a real model could emit it)."""

    model_id = f"evil {SCRIPT} model"
    is_smoke = False

    def generate_json(self, image, prompt, schema, *, max_tokens, **_kw):
        comment = f"{SCRIPT}<img src=x onerror=alert(1)>"
        return _Gen({"dimensions": {d: {"comment": comment, "score": 5} for d in DIMENSIONS},
                     "summary": f'"><script>alert(2)</script>', "overall_grade": 5})

    def encode(self, image):  # strategies that reuse vision features fall back to plain generation
        raise NotImplementedError


def test_markup_in_model_output_is_escaped(tmp_path):
    home = make_home(tmp_path / "home")
    cfg = load_config(home, comment_max_chars=200)
    cfg.ensure_dirs()
    ledger = Ledger(cfg.db_path)
    src = photo(cfg.inbox / "plain.jpg", seed=1, size=(64, 48))
    os.utime(src, (1, 1))  # long settled
    ledger.enqueue(src, "plain.jpg", "ansel", "default", src.stat().st_size, src.stat().st_mtime)
    worker = Worker(cfg, ledger, _HostileRuntime, threading.Event())
    assert worker.run_once()
    job = ledger.jobs()[0]
    assert job.state == "done", job.error
    html = (Path(job.output_dir) / "report.html").read_text()
    text = _assert_inert(html, "report.html")
    assert SCRIPT in text and "onerror=alert(1)" in text  # shown as text, not run
    assert "Content-Security-Policy" in html
    _assert_inert((cfg.outbox / "index.html").read_text(), "index.html")


# -- file modes follow the user's umask ---------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o077, 0o022])
def test_ledger_and_outbox_files_follow_the_umask(tmp_path, smoke_model_path, umask):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    for i in range(2):
        p = photo(home / "inbox" / f"p{i}.jpg", seed=i, size=(64, 48))
        p.chmod(0o600)
    (home / "inbox" / "bad.jpg").write_bytes(b"not a photo")
    (home / "inbox" / "bad.jpg").chmod(0o600)
    log = open(tmp_path / "daemon.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "run"], env=env_for(home, smoke_model_path), cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=lambda: os.umask(umask))
    try:
        # `mondrian status` (run with this test's umask) would create the ledger itself if it came first
        wait_for(lambda: "model ready" in (tmp_path / "daemon.log").read_text(), 60)
        wait_for(lambda: (lambda c: c["done"] == 2 and c["failed"] == 1)(status(home, smoke_model_path)["counts"]),
                 120)
        created = [home / "var", *(home / "var").rglob("*"), *(home / "outbox").rglob("*")]  # outbox/ is ours
        assert any(p.name == "ledger.db-wal" for p in created)  # checked while the daemon holds the ledger open
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    bad = []
    for p in created:
        if not os.path.lexists(p):
            continue
        mode = stat.S_IMODE(os.lstat(p).st_mode)
        if mode & 0o002 or mode & umask:
            bad.append(f"{p.relative_to(home)} {oct(mode)}")
    assert not bad, f"umask {oct(umask)} not honoured: {bad}"
    print(f"\numask {oct(umask)}: {len(created)} files and folders in var/ and outbox/, none beyond the umask")


@pytest.mark.parametrize("umask", [0o077, 0o022])
def test_adapter_versions_follow_the_umask(tmp_path, smoke_model_path, umask):
    """A version folder was always 0700 (tempfile.mkdtemp): on a studio's shared adapters_dir the other accounts
    could not read it and fell back to rag. It now follows the umask, as the rest of the home does."""
    from tests.lora_helpers import adapter_home, install_version

    cfg = adapter_home(tmp_path, smoke_model_path)
    old = os.umask(umask)
    try:
        version = install_version(cfg, "ansel")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(version.path).st_mode) == 0o777 & ~umask
