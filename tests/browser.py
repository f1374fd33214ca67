"""Open a page in a real headless Chromium and report what it rendered and every URL it asked for.

Used by the report tests and the end-to-end tests:

    from tests.browser import render, require_browser, urls_outside
    require_browser()                      # pytest.skip when no Chromium is installed
    page = render(path.as_uri())
    assert urls_outside(page.requests, folder) == []

Two engines: Playwright driving the system Chromium (records each request as it happens, can evaluate JS,
sees alert() dialogs), or, when the playwright package is missing, `chromium --headless --dump-dom` with a
NetLog, which sees the final DOM and every network (non-file) request. Playwright never downloads a browser
here: it is pointed at the installed one. Set MONDRIAN_CHROMIUM to use another binary, and
MONDRIAN_BROWSER_ENGINE=dump-dom to force the fallback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

CHROMIUM_ARGS = [
    "--no-sandbox",  # tests run as root in CI, where the sandbox refuses to start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-dev-shm-usage",  # small /dev/shm in containers crashes renderers
    "--no-default-browser-check",
]


@dataclass
class Rendered:
    url: str
    dom: str  # document.documentElement.outerHTML after load
    requests: list[str] = field(default_factory=list)  # every URL the page requested (page itself included)
    console: list[str] = field(default_factory=list)  # console messages, e.g. CSP violations
    dialogs: list[str] = field(default_factory=list)  # alert/confirm/prompt messages: a script ran
    errors: list[str] = field(default_factory=list)  # uncaught page errors
    value: Any = None  # result of `evaluate`, Playwright only
    engine: str = "playwright"


def find_chromium() -> str | None:
    env = os.environ.get("MONDRIAN_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    mac = Path("/Applications/Google Chrome.app/Contents/MacOS/Google Chrome")
    return str(mac) if mac.exists() else None


def _have_playwright() -> bool:
    if os.environ.get("MONDRIAN_BROWSER_ENGINE") == "dump-dom":
        return False
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


def require_browser() -> str:
    """Return the Chromium binary, or skip the calling test with a reason. Under CI (`CI` set, as `.ci/run` does)
    a missing browser fails instead: a skipped browser test there would hide that nothing was checked."""
    import pytest

    exe = find_chromium()
    if not exe:
        reason = "no Chromium found (install chromium or set MONDRIAN_CHROMIUM)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; under CI the browser tests must run")
        pytest.skip(reason)
    return exe


def render(url: str, *, evaluate: str | None = None, timeout_s: float = 60.0, screenshot: Path | None = None,
           **context: Any) -> Rendered:
    """Load `url`, wait for the load event (images included) and return what the browser saw. `context` goes to
    Playwright's `new_context` (e.g. `viewport={"width": 390, "height": 844}, color_scheme="dark"`); `screenshot`
    saves the whole page as PNG there."""
    exe = find_chromium()
    if not exe:
        raise RuntimeError("no Chromium found")
    if _have_playwright():
        return _render_playwright(exe, url, evaluate, timeout_s, screenshot, context)
    if evaluate is not None or screenshot is not None or context:
        raise RuntimeError("evaluate, screenshots and emulation need the playwright package")
    return _render_dump_dom(exe, url, timeout_s)


def _render_playwright(exe: str, url: str, evaluate: str | None, timeout_s: float, screenshot: Path | None = None,
                       context_options: dict[str, Any] | None = None) -> Rendered:
    from playwright.sync_api import sync_playwright

    out = Rendered(url=url, dom="")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, timeout=timeout_s * 1000)
        try:
            context = browser.new_context(service_workers="block", **(context_options or {}))
            # Nothing may leave the machine even if a page is wrong: record, then refuse, every non-file request.
            context.route(lambda u: not u.startswith("file:"), lambda route: route.abort("blockedbyclient"))
            page = context.new_page()
            page.on("request", lambda r: out.requests.append(r.url))
            page.on("websocket", lambda ws: out.requests.append(ws.url))
            page.on("console", lambda m: out.console.append(m.text))
            page.on("pageerror", lambda e: out.errors.append(str(e)))

            def on_dialog(d: Any) -> None:
                out.dialogs.append(d.message)
                d.dismiss()

            page.on("dialog", on_dialog)
            page.goto(url, wait_until="load", timeout=timeout_s * 1000)
            out.dom = page.evaluate("document.documentElement.outerHTML")
            if evaluate is not None:
                out.value = page.evaluate(evaluate)
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return out


def require_playwright() -> None:
    """Skip the calling test unless Playwright can drive the browser (screenshots, clicks, colour schemes); under
    CI a missing package fails instead, as a missing browser does."""
    import pytest

    require_browser()
    if not _have_playwright():
        reason = "the playwright package is not installed (pip install -e '.[test]')"
        if os.environ.get("CI"):
            pytest.fail(reason + "; under CI the browser tests must run")
        pytest.skip(reason)


class Screens:
    """One headless Chromium (Playwright) for many screenshots: `with Screens() as s: s.shot(url, path, ...)`."""

    def __init__(self, timeout_s: float = 60.0) -> None:
        self.timeout_ms = timeout_s * 1000

    def __enter__(self) -> "Screens":
        from playwright.sync_api import sync_playwright

        exe = find_chromium()
        if not exe:
            raise RuntimeError("no Chromium found")
        self._pw = sync_playwright().start()
        self._browser = self._pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, timeout=self.timeout_ms)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._browser.close()
        self._pw.stop()

    def shot(self, url: str, path: Path, *, width: int = 1280, height: int = 900, color_scheme: str = "light",
             clicks: tuple[str, ...] = (), evaluate: str | None = None) -> Rendered:
        """Load `url` in a `width` px wide window with `color_scheme` ("light" or "dark", as the system would set
        prefers-color-scheme), click `clicks` (CSS selectors) in turn, then save a full-page PNG to `path` and
        return what `evaluate` gave. Network requests are refused and recorded, as in `render`."""
        out = Rendered(url=url, dom="")
        context = self._browser.new_context(service_workers="block", viewport={"width": width, "height": height},
                                            color_scheme=color_scheme)
        try:
            context.route(lambda u: not u.startswith("file:"), lambda route: route.abort("blockedbyclient"))
            page = context.new_page()
            page.on("request", lambda r: out.requests.append(r.url))
            page.on("console", lambda m: out.console.append(m.text))
            page.on("pageerror", lambda e: out.errors.append(str(e)))
            page.goto(url, wait_until="load", timeout=self.timeout_ms)
            for selector in clicks:
                page.click(selector, timeout=self.timeout_ms)
            if evaluate is not None:
                out.value = page.evaluate(evaluate)
            page.screenshot(path=str(path), full_page=True)
            out.dom = page.evaluate("document.documentElement.outerHTML")
        finally:
            context.close()
        return out


def _render_dump_dom(exe: str, url: str, timeout_s: float) -> Rendered:
    with tempfile.TemporaryDirectory(prefix="mondrian-chromium-") as tmp:
        netlog = Path(tmp) / "netlog.json"
        # A dead proxy keeps the browser's own chatter (update checks, network time) off the real network.
        cmd = [exe, "--headless", *CHROMIUM_ARGS, f"--user-data-dir={tmp}/profile", f"--log-net-log={netlog}",
               "--proxy-server=http://127.0.0.1:9", "--virtual-time-budget=5000", "--dump-dom", url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not proc.stdout.strip():
            raise RuntimeError(f"chromium --dump-dom failed ({proc.returncode}): {proc.stderr[-2000:]}")
        # file:// loads never reach the network stack, so the NetLog holds exactly the network requests.
        requests = [url, *_netlog_page_urls(netlog)]
    return Rendered(url=url, dom=proc.stdout, requests=requests, engine="dump-dom")


def _netlog_page_urls(path: Path) -> list[str]:
    """URLs of network requests a page started; the browser's own (initiator 'not an origin') are left out."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace").rstrip().rstrip(",")
        data = json.loads(text if text.endswith("}") else text + "]}")  # an unfinished log lacks its closing
        start_job = data["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    except (OSError, ValueError, KeyError) as exc:
        raise RuntimeError(f"unreadable Chromium NetLog {path}: {exc}") from exc
    urls: list[str] = []
    for event in data.get("events", []):
        params = event.get("params") or {}
        if event.get("type") != start_job or params.get("initiator") == "not an origin":
            continue
        u = params.get("url")
        if isinstance(u, str) and u not in urls:
            urls.append(u)
    return urls


def urls_outside(requests: list[str], folder: Path) -> list[str]:
    """The requested URLs that are not file:// URLs of files inside `folder`."""
    root = Path(folder).resolve()
    bad = []
    for u in requests:
        parsed = urlparse(u)
        if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
            bad.append(u)
            continue
        if not Path(unquote(parsed.path)).resolve().is_relative_to(root):
            bad.append(u)
    return bad
