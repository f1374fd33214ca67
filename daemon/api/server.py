"""uvicorn on a thread of the daemon. The socket is bound on the calling (main) thread first, so a port that is
taken stops the start-up with a line that says what to do, before any photo is touched."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import threading
from typing import Any, Callable

import uvicorn

from ..config import CONFIG_NAME, Config
from .app import Door, build_app

log = logging.getLogger("mondrian.api")

STOP_SECONDS = 10.0


class PortUnavailable(OSError):
    """The API's address cannot be bound; `str()` says what to do."""


def bind(cfg: Config) -> socket.socket:
    host, port = cfg.api_host, cfg.api_port
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortUnavailable(f"api_host {host!r} is not an address of this machine ({exc.strerror}); set api_host "
                              f"in {cfg.home / CONFIG_NAME} to 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart is not held up by TIME_WAIT
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        where = f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise PortUnavailable(
                f"the API port {where} is taken by another program (another Mondrian? `lsof -i :{port}` shows "
                f"which); stop it, or set api_port in {cfg.home / CONFIG_NAME} to a free port (api_port = 0 turns "
                f"the API off)") from None
        raise PortUnavailable(f"cannot serve the API on {where} ({exc.strerror or exc}); set api_port (a port above "
                              f"1024) or api_host in {cfg.home / CONFIG_NAME}, or api_port = 0 to turn it off") from None
    sock.setblocking(False)
    return sock


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
        self._sock: socket.socket | None = None
        self._server: _QuietServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._sock.getsockname()[:2] if self._sock else (self.door.cfg.api_host, self.door.cfg.api_port)
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def start(self) -> None:
        """Bind (PortUnavailable if it cannot), sweep the spool, then serve on a thread of its own."""
        self._sock = bind(self.door.cfg)
        self.door.spool.prepare()
        swept = self.door.spool.sweep(self.door.ledger.has_job)
        if swept:
            log.info("removed %d upload(s) interrupted before they were queued", swept)
        config = uvicorn.Config(build_app(self.door), log_config=None, access_log=False, lifespan="off",
                                loop="asyncio", http="h11", ws="none", server_header=False, date_header=True,
                                timeout_graceful_shutdown=STOP_SECONDS)
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its start/stop lines say nothing ours do not
        self._server = _QuietServer(config)
        self._server.every_second = self.door.spool.reap  # upload folders the worker has emptied since
        self._thread = threading.Thread(target=self._serve, name="api", daemon=True)
        self._thread.start()
        log.info("API: POST %s/analyze (GET /health, /jobs/<id>)", self.url)

    def _serve(self) -> None:
        assert self._server is not None and self._sock is not None
        try:
            self._server.run(sockets=[self._sock])
        except BaseException:  # the inbox must go on being served whatever happens to the API
            log.exception("the API stopped")

    def stop(self) -> None:
        """Stop taking requests; requests waiting for a report answer 202 (the daemon's stop flag is set first)."""
        if self._server is not None:
            self._server.should_exit = True
            self._server.wake()
        if self._thread is not None:
            self._thread.join(timeout=STOP_SECONDS + 5)
        if self._sock is not None:
            self._sock.close()

    def info(self) -> dict[str, Any]:
        return {"url": self.url}
