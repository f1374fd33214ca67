"""Who may call a local service: a request must name this machine's loopback (DNS rebinding) and come from no web
page of another origin (a form on any site can POST to 127.0.0.1; the browser sends its `Origin`)."""

from __future__ import annotations

import ipaddress
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

from starlette.responses import JSONResponse

LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost", "ip6-loopback"})


def host_name(value: str) -> str:
    """The host part of a Host header or URL authority, without port or brackets, lowercased."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") > 1:  # a bare IPv6 address: no port can be told apart
        return value
    return value.partition(":")[0]


def is_loopback(name: str) -> bool:
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def allowed_host(value: str | None, extra: frozenset[str] = frozenset(), any_address: bool = False) -> bool:
    """`any_address`: the API was bound to every network on purpose, so a client calls it by this machine's address
    (`http://192.168.1.20:5100/`). A name is still checked: DNS rebinding goes through a name, never an address."""
    if not value:
        return True  # HTTP/1.0 (`nc`, old monitors): every browser sends one, so no web page is without it
    name = host_name(value)
    if is_loopback(name) or name in extra:
        return True
    if any_address:
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False
    return False


def allowed_origin(value: str | None, host: str | None) -> bool:
    """No Origin (curl, scripts) is fine. The API serves no page, so a browser's Origin can only be some other page:
    one served on this machine under another port (a dev server, Jupyter, `python -m http.server` in Downloads) is
    another origin too. Only the API's own origin, scheme, host and port exactly as the request addressed it, passes."""
    if value is None:
        return True
    try:
        parts = urlsplit(value.strip())
    except ValueError:
        return False
    return parts.scheme == "http" and bool(host) and parts.netloc.lower() == (host or "").strip().lower()


class LocalOnly:
    """ASGI middleware: refuses (403, JSON) a request whose Host is not a loopback name (or `extra`, the host the API
    was configured to bind), or that comes from a web page (an Origin other than the API's own). No CORS headers are
    ever added."""

    def __init__(self, app: Callable[..., Awaitable[None]], extra_hosts: frozenset[str] = frozenset(),
                 any_address: bool = False):
        self.app = app
        self.extra = extra_hosts
        self.any_address = any_address

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = None
        if not allowed_host(headers.get("host"), self.extra, self.any_address):
            if self.any_address:
                problem = (f"refused: the Host header {headers.get('host')!r} names neither this machine nor an "
                           f"address (a web page could otherwise reach the API by DNS rebinding); call it by this "
                           f"machine's address, e.g. http://192.168.1.20:<port>/, or by one of its names: "
                           f"{', '.join(sorted(self.extra)) or 'localhost'}")
            else:
                problem = (f"refused: the Host header {headers.get('host')!r} is not this machine's loopback name. "
                           f"Mondrian's API answers only requests addressed to localhost, 127.0.0.1 or [::1] (a web "
                           f"page could otherwise reach it by DNS rebinding); call it as http://127.0.0.1:<port>/")
        elif not allowed_origin(headers.get("origin"), headers.get("host")):
            problem = (f"refused: a request from the web page {headers.get('origin')!r}. Mondrian's API is for "
                       f"programs on this machine (curl, scripts), not for web pages, even ones served from this "
                       f"machine")
        if problem is None:
            await self.app(scope, receive, send)
            return
        await JSONResponse({"error": problem}, status_code=403)(scope, receive, send)
