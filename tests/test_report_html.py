"""report.json / report.html / index.html: schema, atomic writes, escaping, and a real headless Chromium."""

from __future__ import annotations

import copy
import json
import os
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from PIL import Image, ImageDraw, ImageStat

from daemon.analysis.critique import DIMENSIONS
from daemon.fsutil import atomic_write_bytes
from daemon.pipeline.report import (
    IndexEntry,
    ReportInvalid,
    render_report_html,
    validate_report,
    write_index,
    write_report_folder,
)

try:
    from tests.browser import render, require_browser, urls_outside
    from tests.harness import make_home, mondrian
except ImportError:  # tests/ is not a package and the repo root is not on sys.path
    from browser import render, require_browser, urls_outside
    from harness import make_home, mondrian

XSS_SCRIPT = "<script>document.documentElement.dataset.pwned='script';alert(1)</script>"
XSS_ATTR = '"><img src=x onerror="document.documentElement.dataset.pwned=\'img\';alert(2)">'
XSS_FILE = 'IMG_"><img src=x onerror=alert(3)>.jpg'


def sample_report(**over) -> dict:
    scores = dict(zip(DIMENSIONS, (7, 6, 8, 5, 9, 4, 7, 6)))
    report = {
        "schema_version": 1,
        "job_id": 42,
        "photo": {"file": "IMG_0042.jpg", "sha256": "ab" * 32, "width": 6000, "height": 4000,
                  "analysed_width": 448, "analysed_height": 308, "format": "JPEG"},
        "advisor": {"id": "ansel", "name": "Ansel Adams"},
        "mode": {"requested": "lora", "effective": "baseline", "source": "sidecar",
                 "fallbacks": [{"from": "lora", "to": "baseline", "reason": "no adapter trained for ansel yet"}]},
        "model": {"id": "smoke", "adapter": None, "smoke": True,
                  "notice": "Scores come from a random smoke model and are not meaningful."},
        "dimensions": {d: {"score": s, "comment": f"Comment on {d.replace('_', ' ')}."} for d, s in scores.items()},
        "overall_grade": 7,
        "summary": "A strong frame let down by flat midtones.",
        "timings": {"analysis_s": 3.21, "load_s": 0.04},
        "created_at": "2025-11-25T20:26:00+00:00",
        "portfolio": {"dimensions": {d: {"mean": 6.0 + i * 0.25, "std": 1.2} for i, d in enumerate(DIMENSIONS)},
                      "count": 24},
        "references": [
            {"thumb": "refs/ref-1.jpg", "file": "moonrise.jpg", "similarity": 0.91,
             "scores": {d: 8 for d in DIMENSIONS}, "delta": {d: s - 8 for d, s in scores.items()},
             "comment": "Same open sky, stronger tonal separation."},
            {"thumb": "refs/ref 2#.jpg", "similarity": 0.74,
             "scores": {d: 5 for d in DIMENSIONS}, "delta": {d: s - 5 for d, s in scores.items()}},
        ],
    }
    report.update(over)
    return report


def make_image(w: int, h: int, seed: int = 0) -> Image.Image:
    img = Image.new("RGB", (w, h), (40 + seed * 30, 90, 140))
    draw = ImageDraw.Draw(img)
    draw.rectangle((w // 5, h // 4, w // 2, h - h // 5), fill=(230, 200, 60))
    draw.ellipse((w // 2, h // 6, w - w // 8, h // 2), fill=(200, 40, 30))
    return img


def write_refs(folder: Path, report: dict) -> None:
    for i, ref in enumerate(report.get("references", [])):
        path = folder / ref["thumb"]
        path.parent.mkdir(parents=True, exist_ok=True)
        make_image(160, 120, seed=i + 1).save(path, "JPEG", quality=80)


class ScoreParser(HTMLParser):
    """Reads the data-score / data-grade attributes, which are the DOM contract for tests."""

    def __init__(self) -> None:
        super().__init__()
        self.scores: dict[str, int] = {}
        self.grades: list[int] = []
        self.folders: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if "data-score" in a:
            self.scores[a["data-dimension"]] = int(a["data-score"])
        if "data-grade" in a:
            self.grades.append(int(a["data-grade"]))
        if "data-folder" in a:
            self.folders.append(a["data-folder"])


def parse(html: str) -> ScoreParser:
    p = ScoreParser()
    p.feed(html)
    return p


# ------------------------------------------------------------------------------------------------ schema


def test_sample_report_is_valid() -> None:
    validate_report(sample_report())
    validate_report(sample_report(model={"id": "qwen2-vl-2b", "adapter": "ansel-v3", "smoke": False}))


def _broken(mutate) -> dict:
    r = sample_report()
    mutate(r)
    return r


@pytest.mark.parametrize("report, needle", [
    (_broken(lambda r: r["dimensions"]["lighting"].update(score=11)), "dimensions.lighting.score"),
    (_broken(lambda r: r["dimensions"].pop("emotional_impact")), "emotional_impact"),
    (_broken(lambda r: r["dimensions"].update(sharpness={"score": 3, "comment": "x"})), "sharpness"),
    (_broken(lambda r: r.update(overall_grade=-1)), "overall_grade"),
    (_broken(lambda r: r["model"].pop("notice")), "notice"),
    (_broken(lambda r: r["mode"].update(effective="turbo")), "mode.effective"),
    (_broken(lambda r: r.update(created_at="2025-11-25 20:26")), "created_at"),
    (_broken(lambda r: r.update(created_at="2025-11-25T20:26:00")), "created_at"),  # no offset
    (_broken(lambda r: r["timings"].update(analysis_s=float("nan"))), "JSON"),
])
def test_broken_report_is_rejected_readably(report: dict, needle: str) -> None:
    with pytest.raises(ReportInvalid) as exc:
        validate_report(report)
    assert needle in str(exc.value)
    assert isinstance(exc.value, ValueError)


# ---------------------------------------------------------------------------------------------- writing


def test_write_report_folder_writes_everything(tmp_path: Path) -> None:
    folder = tmp_path / "IMG_0042"
    report = sample_report()
    folder.mkdir()
    write_refs(folder, report)
    old = os.umask(0o027)
    try:
        paths = write_report_folder(folder, report, make_image(448, 308))
    finally:
        os.umask(old)

    assert set(paths) == {"json", "html", "preview", "thumb"}
    assert all(p.parent == folder and p.is_file() for p in paths.values())
    assert json.loads(paths["json"].read_text(encoding="utf-8")) == report
    assert paths["json"].read_text(encoding="utf-8").startswith('{\n  "schema_version": 1,')
    with Image.open(paths["preview"]) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (448, 308))
    with Image.open(paths["thumb"]) as im:
        assert im.format == "JPEG" and max(im.size) <= 320
    # Exactly the four files (plus the caller's refs/): no temp files left behind.
    assert sorted(p.name for p in folder.iterdir()) == ["preview.jpg", "refs", "report.html", "report.json",
                                                         "thumb.jpg"]
    # The umask is honoured (0o666 & ~0o027), not forced to 0600 or 0666.
    assert {p.stat().st_mode & 0o777 for p in paths.values()} == {0o640}


def test_unicode_survives_round_trip(tmp_path: Path) -> None:
    report = sample_report(summary="Lumière dorée — 光と影", photo={**sample_report()["photo"], "file": "Été.jpg"})
    paths = write_report_folder(tmp_path / "r", report, make_image(64, 48).convert("RGBA"))
    raw = paths["json"].read_text(encoding="utf-8")
    assert "光と影" in raw  # ensure_ascii=False: readable by a human
    assert json.loads(raw) == report
    assert "Lumière dorée — 光と影" in paths["html"].read_text(encoding="utf-8")


def test_invalid_report_writes_nothing(tmp_path: Path) -> None:
    report = sample_report()
    report["dimensions"]["composition"]["score"] = 11
    with pytest.raises(ReportInvalid):
        write_report_folder(tmp_path / "bad", report, make_image(64, 48))
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_atomic_write_replaces_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    blocker = tmp_path / "dir"
    (blocker / "child").mkdir(parents=True)
    with pytest.raises(OSError):
        atomic_write_bytes(blocker, b"x")  # os.replace onto a non-empty directory fails
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "f.txt"]


# -------------------------------------------------------------------------------------- html (static)


def test_report_html_contents() -> None:
    report = sample_report()
    html = render_report_html(report)
    p = parse(html)
    assert p.scores == {d: v["score"] for d, v in report["dimensions"].items()}
    assert p.grades == [7]
    # The smoke notice comes before the photo and everything else.
    assert html.index('id="smoke-notice"') < html.index("<header")
    assert report["model"]["notice"] in html
    assert '<img src="preview.jpg"' in html
    assert "Requested <b>lora</b> → used <b>baseline</b>: no adapter trained for ansel yet" in html
    assert html.count("data-portfolio-mean=") == 8 and "Portfolio mean ± std" in html and "24 photos" in html
    assert "Compared with the portfolio" in html and "91%" in html and "74%" in html
    assert 'src="refs/ref-1.jpg"' in html and 'src="refs/ref%202%23.jpg"' in html
    assert "Ansel Adams" in html and "Analysis" in html and "3.21 s" in html
    for needle in ("http://", "https://", "<script", "<link", "@import", "url("):
        assert needle not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_report_html_minimal_has_no_optional_sections() -> None:
    report = sample_report(model={"id": "qwen", "adapter": "ansel-v1", "smoke": False},
                           mode={"requested": "rag", "effective": "rag", "source": "default", "fallbacks": []})
    del report["portfolio"], report["references"]
    html = render_report_html(report)
    assert "smoke-notice" not in html and "Compared with the portfolio" not in html
    assert 'class="pf"' not in html and 'id="fallbacks"' not in html and 'id="references"' not in html
    assert "ansel-v1" in html and len(parse(html).scores) == 8


def test_untrusted_text_is_escaped() -> None:
    report = sample_report()
    report["dimensions"]["composition"]["comment"] = XSS_SCRIPT
    report["dimensions"]["lighting"]["comment"] = XSS_ATTR
    report["summary"] = XSS_ATTR
    report["photo"]["file"] = XSS_FILE
    report["advisor"]["name"] = XSS_SCRIPT
    report["mode"]["fallbacks"][0]["reason"] = XSS_ATTR
    report["model"]["notice"] = XSS_SCRIPT
    report["references"][0]["comment"] = XSS_SCRIPT
    report["references"][0]["file"] = XSS_FILE
    validate_report(report)
    html = render_report_html(report)
    for raw in (XSS_SCRIPT, XSS_ATTR, XSS_FILE, "<script", "<img src=x"):
        assert raw not in html
    assert "&lt;script&gt;" in html and "&#34;&gt;&lt;img src=x onerror=" in html


def test_no_absolute_paths_or_escaping_urls() -> None:
    report = sample_report()
    report["photo"]["file"] = "/Users/ansel/Secret Shoots/IMG_1.jpg"
    report["references"][0]["thumb"] = "/Users/ansel/refs/moonrise.jpg"
    report["references"][1]["thumb"] = "../../etc/passwd"
    report["references"].append({"thumb": "http://evil.example/x.jpg", "similarity": 0.5, "scores": {}, "delta": {}})
    html = render_report_html(report)
    assert "/Users" not in html and "Secret Shoots" not in html and "IMG_1.jpg" in html
    assert "passwd" not in html and "evil.example" not in html and 'src="/' not in html


def test_a_backslash_in_a_file_name_is_part_of_the_name(tmp_path: Path, smoke_model_path: Path) -> None:
    """On Linux and macOS `back\\slash.jpg` is one file: its report, its failure page and the index showed and linked
    `slash.jpg` (a file that does not exist), as if the backslash were a folder separator. Real daemon, smoke model."""
    home = make_home(tmp_path / "home", smoke_model_path)
    Image.new("RGB", (64, 48), (90, 120, 30)).save(home / "inbox" / "back\\slash.jpg")
    (home / "inbox" / "not\\a photo.jpg").write_text("not a photo")
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    outbox = home / "outbox"
    [folder] = [p.parent for p in outbox.glob("*/report.json")]
    assert json.loads((folder / "report.json").read_text())["photo"]["file"] == "back\\slash.jpg"
    assert (folder / "back\\slash.jpg").is_file()
    html = (folder / "report.html").read_text(encoding="utf-8")
    assert "<title>back\\slash.jpg — critique" in html and "<dt>File</dt><dd>back\\slash.jpg</dd>" in html
    # Percent-encoded: a browser reads a bare "\" in a URL as "/", so the link must say %5C to reach the file.
    assert '<a id="original" href="back%5Cslash.jpg">back\\slash.jpg</a>' in html
    assert 'href="slash.jpg"' not in html
    # failed/ holds it as `not_a photo.jpg`; its page and card still name the photo the user dropped.
    failure = (outbox / "failed" / "not_a photo.jpg.error.html").read_text(encoding="utf-8")
    assert "<title>not\\a photo.jpg — could not be analysed" in failure
    assert '<h1 class="file" id="file">not\\a photo.jpg</h1>' in failure
    index = (outbox / "index.html").read_text(encoding="utf-8")
    assert '<span class="file" title="back\\slash.jpg">back\\slash.jpg</span>' in index
    assert '<span class="file" title="not\\a photo.jpg">not\\a photo.jpg</span>' in index
    for page in (html, failure, index):
        assert str(home) not in page and str(tmp_path) not in page  # still never where the files live


# ------------------------------------------------------------------------------------------------ index


def _entry(folder: str, created: str, grade: int, **kw) -> IndexEntry:
    base = dict(folder=folder, file=f"{folder}.jpg", advisor_id="ansel", advisor_name="Ansel Adams",
                mode_requested="rag", mode_effective="rag", grade=grade, created_at=created, smoke=False)
    base.update(kw)
    return IndexEntry(**base)


def make_outbox(tmp_path: Path) -> tuple[Path, list[IndexEntry]]:
    outbox = tmp_path / "outbox"
    entries = [
        _entry("IMG_1", "2025-11-24T09:00:00+00:00", 5),
        _entry("IMG_3", "2025-11-25T21:00:00+01:00", 8, mode_requested="lora", mode_effective="baseline",
               smoke=True),  # 20:00 UTC: newest
        _entry('IMG_"><img src=x onerror=alert(4)>', "2025-11-25T10:00:00Z", 6, file=XSS_FILE,
               advisor_name=XSS_SCRIPT),
    ]
    for i, e in enumerate(entries):
        r = sample_report(overall_grade=e.grade, created_at=e.created_at)
        r["photo"]["file"] = e.file
        write_refs(outbox / e.folder, r)
        write_report_folder(outbox / e.folder, r, make_image(300, 200, seed=i))
    return outbox, entries


def test_index_lists_newest_first_and_escapes(tmp_path: Path) -> None:
    outbox, entries = make_outbox(tmp_path)
    path = write_index(outbox, entries)
    assert path == outbox / "index.html"
    html = path.read_text(encoding="utf-8")
    p = parse(html)
    assert p.folders == ["IMG_3", entries[2].folder, "IMG_1"]
    assert p.grades == [8, 6, 5]
    assert 'href="IMG_3/report.html"' in html and 'src="IMG_3/thumb.jpg"' in html
    assert 'href="IMG_%22%3E%3Cimg%20src%3Dx%20onerror%3Dalert%284%29%3E/report.html"' in html
    assert "(requested lora)" in html and ">smoke<" in html
    for raw in (XSS_SCRIPT, XSS_FILE, "<script", "<img src=x"):
        assert raw not in html
    assert sorted(x.name for x in outbox.iterdir() if x.is_file()) == ["index.html"]


def test_empty_index_explains_inbox(tmp_path: Path) -> None:
    html = write_index(tmp_path, []).read_text(encoding="utf-8")
    assert "No critiques yet" in html and "inbox/" in html and "data-folder" not in html


# ------------------------------------------------------------------------------------- headless Chromium

PROBE = """() => ({
  scores: Object.fromEntries([...document.querySelectorAll('[data-score]')]
            .map(e => [e.dataset.dimension, Number(e.dataset.score)])),
  grade: document.querySelector('#grade') && document.querySelector('#grade').textContent.trim(),
  firstBlock: document.body.firstElementChild.id,
  notice: document.querySelector('#smoke-notice') && document.querySelector('#smoke-notice').innerText,
  images: [...document.images].map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0]),
  comment: document.querySelector('#dim-composition .comment').textContent,
  summary: document.querySelector('#summary').textContent,
  pwned: document.documentElement.dataset.pwned || null,
  scripts: document.scripts.length,
  handlers: document.querySelectorAll('[onerror],[onload]').length,
  chartBars: document.querySelectorAll('[data-score] rect.fill').length,
})"""


def test_report_renders_in_chromium_offline(tmp_path: Path) -> None:
    require_browser()
    folder = tmp_path / "IMG_0042"
    report = sample_report()
    report["dimensions"]["composition"]["comment"] = XSS_SCRIPT
    report["summary"] = XSS_ATTR
    folder.mkdir()
    write_refs(folder, report)
    paths = write_report_folder(folder, report, make_image(448, 308))

    page = render(paths["html"].as_uri(), evaluate=PROBE)
    v = page.value
    assert v["scores"] == {d: x["score"] for d, x in report["dimensions"].items()}
    assert v["grade"] == "7" and v["chartBars"] == 8
    assert v["firstBlock"] == "smoke-notice" and report["model"]["notice"] in v["notice"]
    # Untrusted text shows as literal text and nothing ran.
    assert v["comment"] == XSS_SCRIPT and v["summary"] == XSS_ATTR
    assert (v["pwned"], v["scripts"], v["handlers"], page.dialogs, page.errors) == (None, 0, 0, [], [])
    # Every image loaded, so the request log below is not vacuous.
    assert v["images"] == [["preview.jpg", True], ["refs/ref-1.jpg", True], ["refs/ref%202%23.jpg", True]]
    assert any(u.endswith("/preview.jpg") for u in page.requests)
    assert len(page.requests) == 4  # the page, the photo and two reference thumbs
    assert urls_outside(page.requests, folder) == []
    assert not [m for m in page.console if "Content Security Policy" in m]


def test_index_renders_in_chromium_offline(tmp_path: Path) -> None:
    require_browser()
    outbox, entries = make_outbox(tmp_path)
    write_index(outbox, entries)
    # Thumbnails load lazily (as they scroll into view): each card is shown, and its image awaited, before looking.
    page = render((outbox / "index.html").as_uri(), evaluate="""async () => {
      for (const img of document.querySelectorAll('[data-folder] img')) {
        img.scrollIntoView();
        try { await img.decode(); } catch (e) { /* a broken image: naturalWidth stays 0 below */ }
      }
      return {
      cards: [...document.querySelectorAll('[data-folder]')].map(e => [e.dataset.folder, Number(e.dataset.grade),
              e.querySelector('a').href.split('/').slice(-2).join('/'), e.querySelector('img').naturalWidth > 0]),
      pwned: document.documentElement.dataset.pwned || null, scripts: document.scripts.length }; }""")
    cards = page.value["cards"]
    assert [c[0] for c in cards] == ["IMG_3", entries[2].folder, "IMG_1"]
    assert [c[1] for c in cards] == [8, 6, 5]
    assert cards[0][2] == "IMG_3/report.html" and all(c[3] for c in cards)
    assert (page.value["pwned"], page.value["scripts"], page.dialogs) == (None, 0, [])
    assert len(page.requests) == 4 and urls_outside(page.requests, outbox) == []
    # Each link really leads to a report that renders its scores.
    target = render((outbox / entries[2].folder / "report.html").as_uri())
    assert len(parse(target.dom).scores) == 8


def test_browser_harness_sees_network_requests(tmp_path: Path) -> None:
    """Positive control: a page that does reach out is caught (port 9 on loopback: nothing leaves the host)."""
    require_browser()
    page_path = tmp_path / "leaky.html"
    page_path.write_text('<!doctype html><img src="http://127.0.0.1:9/pixel.png"><p>hi</p>', encoding="utf-8")
    page = render(page_path.as_uri())
    assert urls_outside(page.requests, tmp_path) == ["http://127.0.0.1:9/pixel.png"]


def test_dump_dom_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the playwright package the helper still renders with Chromium and still sees network requests."""
    require_browser()
    monkeypatch.setenv("MONDRIAN_BROWSER_ENGINE", "dump-dom")
    folder = tmp_path / "r"
    report = sample_report()
    report["dimensions"]["composition"]["comment"] = XSS_SCRIPT
    folder.mkdir()
    write_refs(folder, report)
    paths = write_report_folder(folder, report, make_image(200, 150))
    page = render(paths["html"].as_uri())
    assert page.engine == "dump-dom"
    p = parse(page.dom)
    assert p.scores == {d: x["score"] for d, x in report["dimensions"].items()} and p.grades == [7]
    assert "data-pwned" not in page.dom
    assert urls_outside(page.requests, folder) == []

    leaky = tmp_path / "leaky.html"
    leaky.write_text('<!doctype html><img src="http://127.0.0.1:9/pixel.png">', encoding="utf-8")
    assert urls_outside(render(leaky.as_uri()).requests, tmp_path) == ["http://127.0.0.1:9/pixel.png"]


# ----------------------------------------------------------------------------------- phone, desktop, dark

VIEW_PROBE = """() => {
  const css = (sel, prop) => { const e = document.querySelector(sel); return e && getComputedStyle(e)[prop]; };
  const chart = [...document.querySelectorAll('svg.chart')].find(s => s.getBoundingClientRect().width > 0);
  const original = document.querySelector('#original');
  return {
    inner: window.innerWidth, scroll: document.documentElement.scrollWidth, bodyScroll: document.body.scrollWidth,
    wider: [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > window.innerWidth + 1)
             .map(e => e.tagName + '.' + e.className).slice(0, 5),
    paper: css('body', 'backgroundColor'), ink: css('#summary', 'color'), card: css('section.block', 'backgroundColor'),
    muted: css('.facts dt', 'color'), comment: css('#dim-composition .comment', 'color'),
    chart: chart && {layout: chart.getAttribute('class'), label: getComputedStyle(chart.querySelector('text.label')).fill,
                     value: getComputedStyle(chart.querySelector('text.value')).fill,
                     bar: getComputedStyle(chart.querySelector('rect.fill')).fill,
                     track: getComputedStyle(chart.querySelector('rect.track')).fill},
    original: original && original.href,
    photoLink: document.querySelector('.photo a') && document.querySelector('.photo a').href,
  };
}"""


def _rgb(css: str) -> tuple[float, float, float]:
    parts = css[css.index("(") + 1:css.index(")")].replace(",", " ").split()
    return tuple(float(x) for x in parts[:3])  # type: ignore[return-value]


def _luminance(css: str) -> float:
    def lin(c: float) -> float:
        c /= 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = _rgb(css)
    return 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b)


def contrast(a: str, b: str) -> float:
    """WCAG contrast ratio of two computed CSS colours."""
    hi, lo = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_report_page_fits_a_phone_and_a_desktop_in_light_and_dark(tmp_path: Path) -> None:
    """Screenshots at 390 px and 1280 px, with the system in light and in dark mode: nothing wider than the
    window, body text, muted text and the chart readable on their background (WCAG AA: 4.5:1 for text, 3:1 for the
    bars against their track), dark really dark, and the full-resolution original linked and there."""
    require_browser()
    long_name = "IMG_" + "x" * 110 + ".jpg"  # no break opportunity: a phone must wrap it, not scroll sideways
    report = sample_report(summary="A strong frame. " + "Unbroken" * 20)
    report["photo"]["file"] = long_name
    folder = tmp_path / "IMG_0042"
    folder.mkdir()
    write_refs(folder, report)
    make_image(1800, 1200).save(folder / long_name, "JPEG", quality=80)  # the original, moved in by the daemon
    paths = write_report_folder(folder, report, make_image(448, 298))
    seen: dict[tuple[str, str], dict] = {}
    shots: dict[tuple[str, str], Path] = {}
    for view, size in (("phone", {"width": 390, "height": 844}), ("desktop", {"width": 1280, "height": 900})):
        for scheme in ("light", "dark"):
            shot = tmp_path / f"report-{view}-{scheme}.png"
            page = render(paths["html"].as_uri(), evaluate=VIEW_PROBE, screenshot=shot, viewport=size,
                          color_scheme=scheme, is_mobile=view == "phone")
            v = seen[view, scheme] = page.value
            shots[view, scheme] = shot
            where = f"{view}/{scheme}"
            assert v["inner"] == size["width"], where
            assert v["scroll"] <= v["inner"] and v["bodyScroll"] <= v["inner"] and not v["wider"], (where, v)
            assert v["chart"]["layout"] == ("chart chart-compact" if view == "phone" else "chart chart-wide"), where
            for name in ("ink", "comment"):
                assert contrast(v[name], v["card"]) >= 7, (where, name, v[name], v["card"])
            assert contrast(v["muted"], v["card"]) >= 4.5, (where, v["muted"], v["card"])
            assert contrast(v["chart"]["label"], v["card"]) >= 4.5 and contrast(v["chart"]["value"], v["card"]) >= 4.5
            assert contrast(v["chart"]["bar"], v["chart"]["track"]) >= 3, (where, v["chart"])
            # The link leads to the original beside the report, and it is there; the page still loads only files
            # of its own folder (a link is not a load).
            assert v["original"] == v["photoLink"] == (folder / long_name).as_uri(), where
            assert Path(unquote(urlparse(v["original"]).path)).is_file()
            assert urls_outside(page.requests, folder) == [] and not (page.errors or page.dialogs)
    for view in ("phone", "desktop"):
        light, dark = seen[view, "light"], seen[view, "dark"]
        assert (light["paper"], light["ink"], light["card"]) != (dark["paper"], dark["ink"], dark["card"])
        assert _luminance(light["card"]) > 0.8 and _luminance(dark["card"]) < 0.05, (light["card"], dark["card"])
        assert _luminance(dark["ink"]) > 0.6 and _luminance(light["ink"]) < 0.05
        # What the screenshots show, not only what the styles say: the dark page is dark as a whole.
        with Image.open(shots[view, "light"]) as lit, Image.open(shots[view, "dark"]) as night:
            assert lit.width == night.width == (390 if view == "phone" else 1280)
            mean = lambda im: ImageStat.Stat(im.convert("L")).mean[0]  # noqa: E731
            assert mean(lit) > 170 and mean(night) < 80, (view, mean(lit), mean(night))
