"""uvicorn on a thread of the daemon. The socket is bound on the calling (main) thread first, so a port that is
taken stops the start-up with a line that says what to do, before any photo is touched."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import resource
import socket
import threading
import time
from typing import Any, Callable

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .. import testhooks
from ..config import CONFIG_NAME, Config
from .app import Door, build_app, every_network

log = logging.getLogger("mondrian.api")

STOP_SECONDS = 10.0
HEADER_SECONDS = 20.0  # a request's headers are a few hundred bytes: every real client sends them at once
MAX_CONNECTIONS = 1024  # and never more than an eighth of the files this process may open (connection_limit)


class PortUnavailable(OSError):
    """The API's address cannot be bound; `str()` says what to do."""


def bind(cfg: Config) -> list[socket.socket]:
    """The API's listening sockets: one for each address api_host names. `localhost` is ::1 and 127.0.0.1 on a
    Mac (::1 first): bound to the first alone, a client that asks for 127.0.0.1 found nothing there."""
    host, port = cfg.api_host, cfg.api_port
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortUnavailable(f"api_host {host!r} is not an address of this machine ({exc.strerror}); set api_host "
                              f"{cfg.where_set('api_host')} to 127.0.0.1") from None
    return bind_addresses(cfg, infos)


def bind_addresses(cfg: Config, infos: list[tuple[Any, ...]]) -> list[socket.socket]:
    """Listening sockets on each of `infos` (getaddrinfo's answer for api_host) that can be served. Start-up stops
    (PortUnavailable) only when none can: an address this machine does not have (IPv6 turned off) is passed by, and
    one another program holds (an `ssh -L` tunnel on 127.0.0.1 alone) is served by the rest, with a warning."""
    seen: set[tuple[int, Any]] = set()
    unique = [i for i in infos if (i[0], i[4][:2]) not in seen and not seen.add((i[0], i[4][:2]))]
    socks: list[socket.socket] = []
    failed: list[tuple[Any, OSError]] = []
    for family, kind, proto, _, address in unique:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError as exc:  # no IPv6 in this kernel
            failed.append((address, exc))
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart is not held up by TIME_WAIT
            sock.bind(address)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            failed.append((address, exc))
            continue
        sock.setblocking(False)
        socks.append(sock)
    if not socks:
        raise _unbindable(cfg, next((e for _, e in failed if e.errno == errno.EADDRINUSE), failed[0][1]))
    for address, exc in failed:
        if exc.errno == errno.EADDRINUSE:
            log.warning("API: port %d of %s is taken by another program (`lsof -i :%d` shows which): clients calling "
                        "that address reach it, not Mondrian; served on the other address(es) only", cfg.api_port,
                        address[0], cfg.api_port)
        else:
            log.debug("API: %s is not available here (%s)", address[0], exc.strerror or exc)
    return socks


def _unbindable(cfg: Config, exc: OSError) -> PortUnavailable:
    host, port = cfg.api_host, cfg.api_port
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return PortUnavailable(
            f"the API port {where} is taken by another program (another Mondrian? `lsof -i :{port}` shows "
            f"which); stop it, or set api_port {cfg.where_set('api_port')} to a free port (api_port = 0 turns "
            f"the API off)")
    return PortUnavailable(f"cannot serve the API on {where} ({exc.strerror or exc}); set api_port (a port above "
                           f"1024) {cfg.where_set('api_port')}, or api_host {cfg.where_set('api_host')}, or "
                           f"api_port to 0 to turn it off")


def header_seconds() -> float:
    # The tests' stalled-upload setting shortens this wait too: both are "the client stopped sending".
    return testhooks.upload_idle_seconds(HEADER_SECONDS)


def connection_limit() -> int:
    """Open API connections allowed: an eighth of this process's open files (macOS gives a process 256), so clients
    can never take the files the worker needs for photos, the ledger and the model. The listen backlog is the same
    number (at most 128): asyncio accepts that many at once before any is looked at, so a burst costs at most twice
    as many."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(MAX_CONNECTIONS, soft // 8)) if soft != resource.RLIM_INFINITY else MAX_CONNECTIONS


def refusal(status: int, reason: str, message: str, retry_after: int | None = None) -> bytes:
    """A whole JSON error answer, for the connection itself (no request of it reached the app)."""
    body = json.dumps({"error": message}).encode()
    extra = f"Retry-After: {retry_after}\r\n" if retry_after else ""
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n").encode("latin-1") + body


class GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 connection with the limits it lacks. It waits for ever for a request's headers (only a
    kept-alive connection that sends nothing is closed) and takes any number of connections: a program that opens
    connections and sends nothing, or its headers a byte at a time (slowloris), held an open file each until the
    whole daemon could open no photo and write no ledger. Here a request's headers must be complete within
    `header_seconds()` of its turn on the connection (else 408), connections beyond `connection_limit()` are answered
    503 at once, and a request that is not HTTP gets its 400 as JSON like every other error."""

    _deadline: asyncio.TimerHandle | None = None
    _warned_at = -1e9

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limit = connection_limit()
        if len(self.connections) > limit:
            now = time.monotonic()
            if now - GuardedH11._warned_at > 60:  # once a minute: a flood of connections must not flood the log
                GuardedH11._warned_at = now
                log.warning("refusing API connections: %d are open already (a program opening connections and "
                            "sending nothing?)", limit)
            transport.write(refusal(503, "Service Unavailable", f"Mondrian's API has {limit} connections open "
                                    f"already; send the request again in a minute", retry_after=30))
            transport.close()
            return
        self._await_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_headers()  # kept alive: the next request's headers are due in time too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            self.transport.close()  # an answer is under way: a second one would garble it
            return
        self.transport.write(refusal(400, "Bad Request", f"the request is not valid HTTP/1.1 ({msg.rstrip('.')}: "
                                     f"a bad Content-Length, header or request line); send it as curl does, e.g. "
                                     f"curl -X POST http://127.0.0.1:<port>/analyze -F image=@photo.jpg"))
        self.transport.close()

    def _await_headers(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if not self.transport.is_closing():
            self._deadline = self.loop.call_later(header_seconds(), self._headers_late, self.cycle)

    def _headers_late(self, cycle: Any) -> None:
        # A request that began since is a new cycle (its end sets the next deadline); a request in progress has
        # its own limits (the upload's stall, api_wait_seconds).
        if self.transport.is_closing() or self.cycle is not cycle:
            return
        if cycle is not None and not cycle.response_complete:
            return
        if self.conn.trailing_data[0]:  # part of a request came: say why it is dropped
            self.transport.write(refusal(408, "Request Timeout", f"the request's headers did not all arrive within "
                                         f"{header_seconds():g} s; send the request again, all at once"))
        self.transport.close()


class _QuietServer(uvicorn.Server):
    """uvicorn's own main loop wakes ten times a second to see whether it should stop: with an empty inbox that was
    most of the daemon's idle CPU. This one wakes once a second (what the Date header needs), or when `wake` is
    called after a stop was asked for."""

    _loop: asyncio.AbstractEventLoop | None = None
    _woken: asyncio.Event | None = None
    every_second: Callable[[], None] | None = None  # housekeeping on the loop's thread, between requests

    async def main_loop(self) -> None:
        self._woken = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864000  # a whole second each time: on_tick renews the Date header
            self._chores()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._woken.wait(), 1.0)

    def _chores(self) -> None:
        if self.every_second is None:
            return
        try:
            self.every_second()
        except Exception:  # housekeeping must never end the server's loop
            log.exception("the API's housekeeping failed")

    def wake(self) -> None:
        """From another thread: look at `should_exit` now rather than within the second."""
        if self._loop is not None and self._woken is not None:
            with contextlib.suppress(RuntimeError):  # its loop has already ended
                self._loop.call_soon_threadsafe(self._woken.set)


class ApiServer:
    def __init__(self, door: Door):
        self.door = door
        self._socks: list[socket.socket] = []
        self._server: _QuietServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def urls(self) -> list[str]:
        """One for each address served (`localhost`: IPv6 and IPv4)."""
        names = [s.getsockname()[:2] for s in self._socks] or [(self.door.cfg.api_host, self.door.cfg.api_port)]
        return [f"http://{f'[{host}]' if ':' in host else host}:{port}" for host, port in names]

    def start(self) -> None:
        """Bind (PortUnavailable if it cannot), sweep the spool, then serve on a thread of its own."""
        self._socks = bind(self.door.cfg)
        self.door.spool.prepare()
        swept = self.door.spool.sweep(self.door.ledger.has_job)
        if swept:
            log.info("removed %d upload(s) interrupted before they were queued", swept)
        config = uvicorn.Config(build_app(self.door), log_config=None, access_log=False, lifespan="off",
                                loop="asyncio", http=GuardedH11, ws="none", server_header=False, date_header=True,
                                backlog=min(128, connection_limit()),
                                timeout_graceful_shutdown=STOP_SECONDS)
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its start/stop lines say nothing ours do not
        self._server = _QuietServer(config)
        self._server.every_second = self.door.spool.reap  # upload folders the worker has emptied since
        self._thread = threading.Thread(target=self._serve, name="api", daemon=True)
        self._thread.start()
        log.info("API: POST %s/analyze (GET /health, /jobs/<id>)%s", self.url,
                 "".join(f"; also {u}" for u in self.urls[1:]))
        if every_network(self.door.cfg):
            log.warning("API: listening on every network this machine is on (api_host = %r), with no password: "
                        "anyone who can reach port %d can send photos and read every report. Set api_host = "
                        "\"127.0.0.1\" in %s to keep it to this machine", self.door.cfg.api_host,
                        self._socks[0].getsockname()[1], self.door.cfg.home / CONFIG_NAME)

    def _serve(self) -> None:
        assert self._server is not None and self._socks
        try:
            self._server.run(sockets=self._socks)
        except BaseException:  # the inbox must go on being served whatever happens to the API
            log.exception("the API stopped")

    def stop(self) -> None:
        """Stop taking requests; requests waiting for a report answer 202 (the daemon's stop flag is set first)."""
        if self._server is not None:
            self._server.should_exit = True
            self._server.wake()
        if self._thread is not None:
            self._thread.join(timeout=STOP_SECONDS + 5)
        for sock in self._socks:
            sock.close()

    def info(self) -> dict[str, Any]:
        return {"url": self.url}
