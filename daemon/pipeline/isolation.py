"""Is the photo to blame? Analyse it once more, alone, in a child process.

A photo whose analysis crashes the process (a decoder or the model dying on it) would crash every restart of the
daemon, so after `max_attempts` crashes with a photo in hand the photo used to be set aside. But the daemon also
dies for reasons that have nothing to do with that photo: a user restarting the service, the OOM killer, a forced
shutdown. So the photo is convicted only by evidence: it is decoded and analysed once more in a child process of
its own (`python -m daemon.pipeline.isolation`), which publishes nothing and writes nothing to the ledger. Only a child
that dies of a crash signal while it analyses the photo (SIGKILL: in two checks in a row), or hangs there, sets the
photo aside. A child that finishes (whatever it concluded) clears the photo, and its crash count starts again. Anything else (the daemon stopping, the child dying before it touched the photo or of
a signal someone sent on purpose) is no verdict. If the daemon itself dies during the check, the child notices
(its stdin reaches EOF) and exits, and the job stays as the crash left it: the next start checks it again.

The check runs on the worker thread before the daemon loads its own model, so the child never competes with the
daemon for memory, and MLX is never touched outside the worker thread.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..config import PROJECT_ROOT, Config
from ..hints import child_env

log = logging.getLogger("mondrian.isolation")

# Deaths that mean the process crashed. SIGKILL is there because it is how the OOM killer (and macOS's jetsam)
# ends a process that needed too much memory for this photo; but a person (or memory pressure from elsewhere) may
# send it too, so it convicts only when two checks in a row end with it. The daemon sends it only when it ends the
# check itself, which it knows. SIGTERM, SIGINT and SIGHUP are someone stopping things (a shutdown): no verdict.
CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE,
                           signal.SIGSYS, signal.SIGTRAP, signal.SIGKILL})
LOAD_LIMIT_S = 600.0  # the child's model load; past it the check is abandoned, without a verdict
# The analysis stops itself at job_timeout_seconds, checked between tokens; twice that and 10 s more and it is not
# stopping at all (a decoder or a prefill stuck in native code): in the daemon it would hang the worker for good.
HANG_GRACE_S = 10.0
DEATH_GRACE_S = 1.0  # a daemon being killed with its child (a shutdown) dies within this, before any verdict


@dataclass(frozen=True)
class Verdict:
    crashed: bool | None  # True: set the photo aside; False: the photo is not the cause; None: no verdict
    detail: str
    killed: bool = False  # the crash was a SIGKILL


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def check_alone(cfg: Config, job_id: int, stop: threading.Event) -> Verdict:
    """Analyse job `job_id`'s photo in a child process and judge whether the photo crashes the analysis."""
    verdict = _check_once(cfg, job_id, stop)
    if verdict.crashed and verdict.killed:
        log.warning("%s; checking once more, as a SIGKILL may have come from outside", verdict.detail)
        verdict = _check_once(cfg, job_id, stop)
        if verdict.crashed and verdict.killed:
            return Verdict(True, "the separate process was killed (SIGKILL) twice in a row, perhaps out of memory",
                           killed=True)
    return verdict


def child_process_env() -> dict[str, str]:
    """The check's environment: the daemon's own working directory (a relative model path means the same folder),
    this very package, and the command its hints name."""
    return child_env({**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT),
                                                                               os.environ.get("PYTHONPATH")]))})


def _check_once(cfg: Config, job_id: int, stop: threading.Event) -> Verdict:
    cmd = [sys.executable, "-m", "daemon.pipeline.isolation", "--home", str(cfg.home), "--model", cfg.model,
           str(job_id)]
    # A new session: a Ctrl-C meant for the daemon must not look like a crash of the check.
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_process_env(),
                            start_new_session=True)
    log.warning("analysing it alone in a separate process (pid %d)", proc.pid)
    lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
    threading.Thread(target=_read_events, args=(proc, lines), daemon=True, name="isolation-events").start()
    touched_photo = finished = False
    deadline = time.monotonic() + LOAD_LIMIT_S
    try:
        while True:
            if stop.is_set():
                return Verdict(None, "Mondrian was stopped during the check")
            if time.monotonic() > deadline:
                if touched_photo:
                    return Verdict(True, f"it hung: the separate process had not finished after "
                                         f"{2 * cfg.job_timeout_seconds + HANG_GRACE_S:g} s")
                return Verdict(None, f"the separate process did not load the model within {LOAD_LIMIT_S:g} s")
            try:
                event = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if event is None:
                break
            if event.get("event") == "photo":
                touched_photo = True
                deadline = time.monotonic() + 2 * cfg.job_timeout_seconds + HANG_GRACE_S
            elif event.get("event") == "done":
                finished = True
                outcome = str(event.get("outcome", ""))
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if finished:
        return Verdict(False, "analysed alone in a separate process, it did not crash"
                              + ("" if outcome == "analysed" else f" ({outcome})"))
    if rc < 0 and -rc in CRASH_SIGNALS and touched_photo:
        if stop.wait(DEATH_GRACE_S):
            return Verdict(None, "Mondrian was stopped during the check")
        return Verdict(True, f"the separate process died of {_signal_name(rc)}", killed=-rc == signal.SIGKILL)
    why = f"killed by {_signal_name(rc)}" if rc < 0 else f"exit status {rc}"
    where = "while analysing it" if touched_photo else "before it opened the photo"
    return Verdict(None, f"the separate process ended {where} ({why}); see the log")


def _read_events(proc: subprocess.Popen, lines: queue.Queue) -> None:
    assert proc.stdout is not None
    for raw in proc.stdout:
        try:
            lines.put(json.loads(raw))
        except ValueError:
            continue
    lines.put(None)


# -- the child -----------------------------------------------------------------------------------------------

def _say(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _exit_with_parent() -> None:
    """The daemon holds our stdin open and never writes: EOF means it died, and the check has no one to tell.
    A raw read: a thread blocked in sys.stdin's buffer would abort the interpreter's shutdown (SIGABRT)."""
    try:
        while os.read(0, 4096):
            pass
    finally:
        os._exit(70)


def child_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m daemon.pipeline.isolation", description="internal: used by the daemon")
    p.add_argument("--home", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("job_id", type=int)
    args = p.parse_args(argv)
    threading.Thread(target=_exit_with_parent, daemon=True, name="parent-watch").start()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, datefmt="%H:%M:%S",
                        format=f"%(asctime)s %(levelname)-7s isolation[{os.getpid()}] %(name)s: %(message)s")
    for noisy in ("peewee", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from ..config import load_config
    from ..hints import serve
    from ..ledger import Ledger
    from .supervisor import default_runtime_factory
    from .worker import Worker

    cfg = load_config(args.home, model=args.model)
    serve(cfg.home)  # its failure reasons name commands for this home
    ledger = Ledger.for_config(cfg)  # read only: the rag strategy reads the reference index
    worker = Worker(cfg, ledger, default_runtime_factory(cfg))
    job = ledger.get(args.job_id)
    worker.load_runtime()  # before the photo: a crash while loading the model is not the photo's
    _say({"event": "photo"})
    _say({"event": "done", "outcome": worker.analyse_alone(job)})
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
