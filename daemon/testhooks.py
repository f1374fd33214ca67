"""Test-only fault injection, in one place. Every hook is off unless its environment variable is set, which
only the tests do; each variable is read once, at the first hook call (not at import), and costs one cached
lookup after that.

- `MONDRIAN_TEST_CRASH_AT=<point>[:<n>]`: SIGKILL this process the n-th time (default 1st) it reaches <point>,
  to hit the narrow windows of publishing that random external kills rarely land in (issue 3's crash soak).
- `MONDRIAN_TEST_STOP_AT=<point>[:<n>]`: SIGSTOP it there (the n-th time only), so a test can act while a photo
  is in hand (kill it from outside, overwrite the photo) whatever the machine's speed, then SIGCONT or SIGKILL
  it. The point "analysing" (the photo decoded, the model about to run) is reached by the isolation check's
  child process too.
- `MONDRIAN_TEST_POISON=<file name>`: analysing a photo of that name kills the process with SIGABRT (as a
  native crash in a decoder or in the model would), or with `MONDRIAN_TEST_POISON_SIGNAL` (KILL: as the OOM
  killer would), in the daemon and in the isolation check's child alike.
- `MONDRIAN_TEST_OBSERVER_FAULT=die|stall`: the first inbox event for a file named `OBSERVER_FAULT_TRIGGER`
  makes the watcher's handler raise (a real death of watchdog's dispatch thread) or block forever (a stall).
- `MONDRIAN_TEST_UPLOAD_IDLE_SECONDS=<s>`: an API upload that sends nothing for that long is refused (408) instead
  of after a minute, so the test of a stalled client does not wait a minute.
- `MONDRIAN_TEST_STRAY_SECONDS=<s>`: `mondrian status` calls a sidecar alone in the inbox stray after that long
  instead of a minute (a test cannot age a file's ctime).
- `MONDRIAN_TEST_SHARE_SETTLE_SECONDS=<s>`: another node's mark in the shared outbox counts as missing after
  that long instead of a minute (pipeline/share.py).
- `MONDRIAN_TEST_TOKEN_SECONDS=<s>`: every forward pass of a generation takes at least that long, so a test of
  the per-photo time limit does not depend on how fast the machine is.
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import signal
import threading
import time

OBSERVER_FAULT_TRIGGER = ".mondrian-test-observer-fault"

_crash_hits: dict[str, int] = {}
_observer_fault_fired = threading.Event()


@functools.cache
def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def crashpoint(name: str) -> None:
    """A named point of the job's way (claimed, reading, staged, reserved, renamed, moved, analysing, ...)."""
    crash_at, stop_at = _env("MONDRIAN_TEST_CRASH_AT"), _env("MONDRIAN_TEST_STOP_AT")
    if not (crash_at or stop_at):
        return
    _crash_hits[name] = _crash_hits.get(name, 0) + 1
    point, _, nth = crash_at.partition(":")
    if point == name and _crash_hits[name] >= int(nth or 1):
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
    point, _, nth = stop_at.partition(":")
    if point == name and _crash_hits[name] == int(nth or 1):
        for handler in logging.getLogger().handlers:
            handler.flush()
        # A process-wide SIGSTOP takes effect when every thread reaches the kernel, not necessarily before this
        # thread runs on: aimed at this thread and followed by a pause, nothing past this point runs before the stop.
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
        time.sleep(0.5)


def poison_point(file_name: str) -> None:
    """Where a native crash on a poisonous photo would happen: just before its analysis."""
    poison = _env("MONDRIAN_TEST_POISON")
    if poison and file_name == poison:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file from a deliberate crash
        logging.shutdown()
        os.kill(os.getpid(), signal.Signals[f"SIG{_env('MONDRIAN_TEST_POISON_SIGNAL', 'ABRT')}"])


def observer_fault(file_name: str) -> None:
    """Called by the inbox watcher's event handler for every event."""
    fault = _env("MONDRIAN_TEST_OBSERVER_FAULT")
    if not fault or _observer_fault_fired.is_set() or file_name != OBSERVER_FAULT_TRIGGER:
        return
    _observer_fault_fired.set()
    if fault == "die":
        raise RuntimeError("MONDRIAN_TEST_OBSERVER_FAULT=die: the observer's dispatch thread dies here")
    if fault == "stall":
        threading.Event().wait()  # never returns: the thread stays alive and delivers nothing more


def slow_token() -> None:
    """Called before every forward pass of a generation (with the stop and deadline checks)."""
    seconds = _env("MONDRIAN_TEST_TOKEN_SECONDS")
    if seconds:
        time.sleep(float(seconds))


__all__ = ["crashpoint", "poison_point", "observer_fault", "slow_token", "OBSERVER_FAULT_TRIGGER"]


def upload_idle_seconds(default: float) -> float:
    return float(_env("MONDRIAN_TEST_UPLOAD_IDLE_SECONDS") or default)


def stray_sidecar_seconds(default: float) -> float:
    return float(_env("MONDRIAN_TEST_STRAY_SECONDS") or default)


def share_settle_seconds(default: float) -> float:
    """How long another node's mark may take to show on a share before its absence counts (see pipeline/share.py)."""
    return float(_env("MONDRIAN_TEST_SHARE_SETTLE_SECONDS") or default)
