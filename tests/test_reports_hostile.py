"""Reports under attack: hostile photo names, hand-edited report.json and failure records, files deleted from the
outbox, thousands of reports, and the photographer's own XMP (malformed, with a DOCTYPE, foreign namespaces).

Real daemon (`mondrian run --once`, smoke model), real files, real exiv2 and exiftool, a real headless Chromium."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from daemon.config import load_config
from daemon.pipeline.outbox_index import OutboxIndex
from daemon.pipeline.report import write_report_folder
from daemon.pipeline.xmp import sidecar_bytes
from tests.browser import CHROMIUM_ARGS, find_chromium, require_playwright
from tests.harness import make_home, mondrian, photo
from tests.test_report_html import make_image, sample_report

RLO = "\u202e"


def run_once(home: Path, model: Path) -> subprocess.CompletedProcess:
    out = mondrian(home, model, "run", "--once", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def cards(outbox: Path) -> str:
    return (outbox / "index.html").read_text(encoding="utf-8")


def crawl(outbox: Path, **context) -> tuple[list[tuple], list[str], dict[str, object]]:
    """Open outbox/index.html in Chromium and follow every link to a page of the outbox; return the dead links
    (an <a href> or <img src> whose file is not there), the dialogs (a script ran) and `probe`'s value per page."""
    from playwright.sync_api import sync_playwright

    outbox = outbox.resolve()
    queue, seen, dead, dialogs = [(outbox / "index.html").as_uri()], set(), [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_ARGS)
        try:
            ctx = browser.new_context(service_workers="block", **context)
            ctx.route(lambda u: not u.startswith("file:"), lambda route: route.abort("blockedbyclient"))
            page = ctx.new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            while queue:
                url = queue.pop()
                if url in seen:
                    continue
                seen.add(url)
                page.goto(url, wait_until="load")
                links = page.evaluate("""() => [...document.querySelectorAll('a[href], img[src]')]
                                            .map(e => [e.tagName, e.href || e.src])""")
                for tag, target in links:
                    parsed = urlparse(target)
                    path = Path(unquote(parsed.path))
                    if parsed.scheme != "file" or parsed.query or parsed.fragment or not path.exists():
                        dead.append((url, tag, target))
                    elif tag == "A" and path.suffix == ".html":
                        queue.append(path.as_uri())
        finally:
            browser.close()
    return dead, dialogs, {}


# --------------------------------------------------------------------------- hand-edited report.json and records


def test_hand_edited_json_with_wrong_types_neither_freezes_the_index_nor_fails_a_photo(tmp_path, smoke_model_path):
    """A report.json whose grade was edited to 1e999 (Python reads it as infinity), one nested `[[[[…` past the
    parser's stack, and a failure record whose job id is a list: each made every later refresh of outbox/index.html
    raise (OverflowError, RecursionError, TypeError), so the index stayed frozen and new failures got no page; and
    the same photo dropped again failed with "unexpected error: OverflowError" (the duplicate check reads the old
    report). Now each is just not a report the index lists."""
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    photo(inbox / "a.jpg", seed=1)
    photo(inbox / "b.jpg", seed=2)
    (inbox / "notes.jpg").write_text("not a photo")
    run_once(home, smoke_model_path)
    assert 'data-folder="a"' in cards(outbox) and 'data-failure="notes.jpg"' in cards(outbox)

    report_a = outbox / "a" / "report.json"
    text = report_a.read_text()
    grade = json.loads(text)["overall_grade"]
    report_a.write_text(text.replace(f'"overall_grade": {grade},', '"overall_grade": 1e999,', 1))
    (outbox / "b" / "report.json").write_text("[" * 100_000)
    record = outbox / "failed" / "notes.jpg.error.json"
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "job_id": [data["job_id"]]}))

    photo(inbox / "c.jpg", seed=3)
    photo(inbox / "a-again.jpg", seed=1)  # the same bytes as a.jpg: its duplicate check reads a/report.json
    (inbox / "junk.jpg").write_text("not a photo either")
    out = run_once(home, smoke_model_path)
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    html = cards(outbox)
    assert 'data-folder="c"' in html and 'data-folder="a-again"' in html, "the index was not updated"
    assert 'data-folder="a"' not in html and 'data-folder="b"' not in html  # no longer reports the index can list
    assert not (outbox / "failed" / "a-again.jpg.error.json").exists()
    assert 'data-failure="junk.jpg"' in html and (outbox / "failed" / "junk.jpg.error.html").is_file()


# ------------------------------------------------------------------------ files deleted from the outbox


def test_after_deleting_a_thumbnail_or_a_failed_original_no_page_links_a_file_that_is_gone(tmp_path,
                                                                                          smoke_model_path):
    """Hostile names (markup, `#`, `?`, `%`, quotes, `javascript:`) link the right files from disk and run nothing.
    Then the photographer deletes a report's thumbnail, another's thumbnail and preview, and an original kept in
    failed/: after the next refresh the index showed a broken image, and the failure page still linked the deleted
    photo (its page is rewritten only when its record changes). Crawled in Chromium: no link leads nowhere."""
    require_playwright()
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    for i, name in enumerate(['<img src=x onerror=alert(1)>.jpg', "q\"';--.jpg", "javascript:alert(3).jpg",
                              "hash#frag.jpg", "what?q=1.jpg", "pct%41%2e.jpg"]):
        photo(inbox / name, seed=i + 1)
    (inbox / "<b onmouseover=alert(4)>bad#?.jpg").write_text("not a photo")
    (inbox / "fail%20x#y?.jpg").write_text("not a photo")
    run_once(home, smoke_model_path)
    dead, dialogs, _ = crawl(outbox)
    assert dead == [] and dialogs == []

    (outbox / "hash#frag" / "thumb.jpg").unlink()
    (outbox / "what?q=1" / "thumb.jpg").unlink()
    (outbox / "what?q=1" / "preview.jpg").unlink()
    (outbox / "failed" / "fail%20x#y?.jpg").unlink()
    run_once(home, smoke_model_path)  # an empty inbox: the start refreshes the index
    dead, dialogs, _ = crawl(outbox)
    assert dead == [] and dialogs == [], dead
    html = cards(outbox)
    assert 'src="hash%23frag/preview.jpg"' in html  # the larger preview stands in for the thumbnail
    page = (outbox / "failed" / "fail%20x#y?.jpg.error.html").read_text(encoding="utf-8")
    assert "(not in outbox/failed/)" in page

    shutil.copy(outbox / "failed" / "<b onmouseover=alert(4)>bad#?.jpg", outbox / "failed" / "fail%20x#y?.jpg")
    OutboxIndex(load_config(home, env={})).refresh()  # put back: linked again
    page = (outbox / "failed" / "fail%20x#y?.jpg.error.html").read_text(encoding="utf-8")
    assert 'href="fail%2520x%23y%3F.jpg"' in page


def test_a_report_page_whose_original_or_preview_was_deleted_no_longer_links_it(tmp_path, smoke_model_path):
    """The photographer moves the original out of its report folder (into a photo library) or deletes the preview:
    report.html went on linking the original and showing a broken image for ever, since a page was written once.
    After the next refresh the page says each is gone (Chromium finds no dead link); put back, it is linked again.
    A page whose report.json was edited past the schema is left as it was."""
    require_playwright()
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    for i, name in enumerate(("moved away.jpg", "no#preview.jpg", "edited.jpg")):
        photo(inbox / name, seed=i + 1)
    run_once(home, smoke_model_path)
    kept = tmp_path / "library.jpg"
    shutil.move(outbox / "moved away" / "moved away.jpg", kept)
    (outbox / "no#preview" / "preview.jpg").unlink()
    edited = outbox / "edited" / "report.json"
    edited.write_text(json.dumps({**json.loads(edited.read_text()), "dimensions": "none"}))
    (outbox / "edited" / "edited.jpg").unlink()
    before = (outbox / "edited" / "report.html").read_bytes()
    run_once(home, smoke_model_path)

    dead, dialogs, _ = crawl(outbox)
    dead = [d for d in dead if "/edited/" not in d[0]]
    assert dead == [] and dialogs == [], dead
    moved = (outbox / "moved away" / "report.html").read_text(encoding="utf-8")
    assert 'id="original-gone"' in moved and 'href="moved%20away.jpg"' not in moved and 'src="preview.jpg"' in moved
    preview_gone = (outbox / "no#preview" / "report.html").read_text(encoding="utf-8")
    assert 'id="preview-gone"' in preview_gone and 'src="preview.jpg"' not in preview_gone
    assert 'href="no%23preview.jpg"' in preview_gone and 'id="smoke-notice"' in preview_gone
    assert (outbox / "edited" / "report.html").read_bytes() == before

    shutil.move(kept, outbox / "moved away" / "moved away.jpg")
    OutboxIndex(load_config(home, env={})).refresh()
    moved = (outbox / "moved away" / "report.html").read_text(encoding="utf-8")
    assert 'id="original" href="moved%20away.jpg"' in moved and 'id="original-gone"' not in moved


# --------------------------------------------------------------------------------- right-to-left overrides


def test_a_right_to_left_override_in_a_photo_name_does_not_reverse_the_rest_of_the_page(tmp_path,
                                                                                       smoke_model_path):
    """`rtl<U+202E>gpj.exe.jpg`: the override reversed everything after the name on its line, so the report's
    caption read "rtl xp 48 × 211 ta desylana · noituloser lluf ,xp 021 × 061 · gpj.exe.jpg" and the name itself
    posed as another. The control is shown as its code point; the caption reads left to right in Chromium."""
    require_playwright()
    from playwright.sync_api import sync_playwright

    home = make_home(tmp_path / "home", smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    photo(inbox / f"rtl{RLO}gpj.exe.jpg", seed=5, size=(160, 120))
    (inbox / f"bad{RLO}gpj.txt.jpg").write_text("not a photo")
    run_once(home, smoke_model_path)
    report_page = outbox / f"rtl{RLO}gpj.exe" / "report.html"
    failure_page = outbox / "failed" / f"bad{RLO}gpj.txt.jpg.error.html"
    # Where each piece of the caption lands on screen: left to right, as written.
    probe = """() => {
      const cap = document.querySelector('figcaption');
      const text = cap.textContent;
      const x = (needle) => {
        const walker = document.createTreeWalker(cap, NodeFilter.SHOW_TEXT);
        for (let n = walker.nextNode(); n; n = walker.nextNode()) {
          const i = n.data.indexOf(needle);
          if (i >= 0) { const r = document.createRange(); r.setStart(n, i); r.setEnd(n, i + needle.length);
                        return r.getBoundingClientRect().left; }
        }
        return null;
      };
      return {text, title: document.title, size: x('160'), full: x('full'), analysed: x('analysed'),
              body: document.body.innerText};
    }"""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(report_page.as_uri(), wait_until="load")
            got = page.evaluate(probe)
            page.goto(failure_page.as_uri(), wait_until="load")
            failure_text = page.evaluate("document.title + '\\n' + document.body.innerText")
            page.goto((outbox / "index.html").as_uri(), wait_until="load")
            index_text = page.evaluate("document.title + '\\n' + document.body.innerText")
        finally:
            browser.close()
    assert got["size"] is not None and got["full"] is not None and got["analysed"] is not None, got
    assert got["size"] < got["full"] < got["analysed"], got  # left to right, as written
    for text in (got["title"], got["body"], failure_text, index_text):
        assert RLO not in text
    assert "rtl[U+202E]gpj.exe.jpg" in got["body"] and "bad[U+202E]gpj.txt.jpg" in failure_text
    assert "rtl[U+202E]gpj.exe.jpg" in index_text and "bad[U+202E]gpj.txt.jpg" in index_text
    # The files themselves keep their names: links still reach them.
    assert (outbox / f"rtl{RLO}gpj.exe" / f"rtl{RLO}gpj.exe.jpg").is_file()
    assert (outbox / "failed" / f"bad{RLO}gpj.txt.jpg").is_file()


# ------------------------------------------------------------------------------ thousands of reports


def test_an_index_of_thousands_of_reports_loads_the_thumbnails_it_shows_not_all_of_them(tmp_path):
    """3,000 reports: the index asked for all 3,000 thumbnails before its load event (15 s here with 5,000); it now
    loads those on screen, and the others as they are scrolled to."""
    require_playwright()
    from playwright.sync_api import sync_playwright

    home = make_home(tmp_path / "home")
    cfg = load_config(home, env={})
    cfg.ensure_dirs()
    first = cfg.outbox / "IMG_00000"
    write_report_folder(first, sample_report(references=[]), make_image(320, 240), durable=False)
    report = json.loads((first / "report.json").read_text())
    n = 3000
    for i in range(1, n):
        folder = cfg.outbox / f"IMG_{i:05d}"
        folder.mkdir()
        for name in ("thumb.jpg", "preview.jpg", "report.html"):
            os.link(first / name, folder / name)
        report.update(job_id=i + 1, overall_grade=i % 11, created_at=f"2025-11-25T20:{i // 60 % 60:02d}:{i % 60:02d}Z")
        report["photo"]["file"] = f"IMG_{i:05d}.jpg"
        (folder / "report.json").write_text(json.dumps(report))
    started = time.monotonic()
    OutboxIndex(cfg).refresh()
    assert time.monotonic() - started < 60
    html = cards(cfg.outbox)
    assert html.count('class="card report') == n

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            thumbs: list[str] = []
            page.on("request", lambda r: thumbs.append(r.url) if r.url.endswith("/thumb.jpg") else None)
            page.goto((cfg.outbox / "index.html").as_uri(), wait_until="load", timeout=120_000)
            on_load = len(thumbs)
            last = page.locator("li.card img").last
            last.scroll_into_view_if_needed()
            page.wait_for_function("() => { const i = [...document.querySelectorAll('li.card img')].pop();"
                                   " return i.complete && i.naturalWidth > 0; }", timeout=60_000)
        finally:
            browser.close()
    assert 0 < on_load < 200, on_load


# ---------------------------------------------------------------------------------- the photographer's XMP


THEIRS_BODY = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"'
    ' xmlns:crs="http://ns.adobe.com/camera-raw-settings/1.0/" xmlns:foo="http://example.com/foo/1.0/"'
    ' crs:WhiteBalance="Custom" foo:attr="v"><crs:Exposure2012>+0.50</crs:Exposure2012>'
    '<foo:Bar>baz &amp; &lt;x&gt;</foo:Bar>'
    '<dc:subject><rdf:Bag><rdf:li>family</rdf:li><rdf:li>mondrian:grade=1</rdf:li></rdf:Bag></dc:subject>'
    '</rdf:Description></rdf:RDF></x:xmpmeta>')


def _exiftool(path: Path) -> dict:
    exe = shutil.which("exiftool")
    if not exe:
        pytest.skip("exiftool is not installed")
    out = subprocess.run([exe, "-json", "-struct", "-XMP:all", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)[0]


def test_the_photographers_xmp_keeps_its_foreign_namespaces_even_after_a_blank_line(tmp_path, smoke_model_path):
    """Their sidecar's own namespaces, attributes and keywords stay in Mondrian's (exiftool reads them back), and
    Mondrian's older keywords are replaced. One beginning with blank lines was not recognised as XMP at all by exiv2
    ("unknown image type"): its develop settings and keywords were left out of Mondrian's sidecar."""
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    photo(inbox / "kept.jpg", seed=1)
    (inbox / "kept.xmp").write_text(THEIRS_BODY)
    photo(inbox / "blank.jpg", seed=2)
    (inbox / "blank.xmp").write_text("\n\n  " + THEIRS_BODY)
    out = run_once(home, smoke_model_path)
    for stem in ("kept", "blank"):
        got = _exiftool(outbox / stem / f"{stem}.xmp")
        assert got.get("WhiteBalance") == "Custom" and got.get("Exposure2012") == "+0.50", (stem, got)
        assert got["Bar"] == "baz & <x>" and got["Attr"] == "v", (stem, got)
        subject = got["Subject"]
        assert "family" in subject and "mondrian:grade=1" not in subject, (stem, subject)
        assert f"mondrian:grade={json.loads((outbox / stem / 'report.json').read_text())['overall_grade']}" in subject
    assert "the XMP that came with it could not be read" not in out.stderr, out.stderr[-3000:]


def test_a_broken_xmp_of_the_photographers_is_said_to_be_left_out_and_no_entity_is_expanded(tmp_path,
                                                                                         smoke_model_path, caplog):
    """One that is not well-formed (a tag left open), or carries a DOCTYPE with a billion-laughs entity and an
    external one, was dropped without a word from Mondrian: exiv2 only printed "XMP Toolkit error 201" on stderr,
    naming no photo. The log now says which photo's XMP could not be merged; theirs is kept byte for byte beside
    Mondrian's, and nothing of an entity is ever expanded, nor a file read through one."""
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    photo(inbox / "open.jpg", seed=3)
    (inbox / "open.xmp").write_text(THEIRS_BODY.replace("<rdf:li>family</rdf:li>", "<rdf:li>family"))
    laughs = "".join(f'<!ENTITY l{i} "{(f"&l{i - 1};" if i else "lol") * 10}">' for i in range(10))
    photo(inbox / "laughs.jpg", seed=4)
    (inbox / "laughs.xmp").write_text(
        f'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><!DOCTYPE x:xmpmeta [{laughs}'
        f'<!ENTITY xxe SYSTEM "file:///etc/hostname">]>'
        + THEIRS_BODY.replace("<rdf:li>family</rdf:li>", "<rdf:li>family</rdf:li><rdf:li>&l9;&xxe;</rdf:li>"))
    written = {stem: (inbox / f"{stem}.xmp").read_bytes() for stem in ("open", "laughs")}
    out = run_once(home, smoke_model_path)
    for stem in ("open", "laughs"):
        mine = (outbox / stem / f"{stem}.xmp").read_bytes()
        assert b"family" not in mine and b"lollol" not in mine and b"mondrian:grade=" in mine
        assert (outbox / stem / f"{stem}.original.xmp").read_bytes() == written[stem]  # theirs, byte for byte
        assert f"{stem}.jpg: the XMP that came with it could not be read" in out.stderr, out.stderr[-3000:]

    # An empty packet is not a broken one: no warning.
    report = {"photo": {"file": "x.jpg"}, "overall_grade": 7, "summary": "s", "advisor": {"id": "a", "name": "A"},
              "mode": {"effective": "baseline"}, "model": {"adapter": None, "smoke": False}}
    empty = ('<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="t"><rdf:RDF '
             'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about=""/>'
             '</rdf:RDF></x:xmpmeta>').encode()
    with caplog.at_level(logging.WARNING, logger="mondrian.worker"):
        assert b"mondrian:grade=7" in sidecar_bytes(report, empty)
    assert not caplog.records
