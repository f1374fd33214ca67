"""What each job costs the daemon around the model, for `python -m bench overhead` (issue 11, item 9).

Off unless the environment variable MONDRIAN_COSTS_FILE names a file; then the worker appends one JSON line per job:
the wall time, this thread's CPU time and the whole process's CPU time of the job (from the end of the job before,
when the worker went straight on to this one), and the same three for the model's part alone. The benchmark
subtracts the second from the first: on a machine shared with other work, CPU time is the figure that holds, and
the model's own time is measured where it is spent instead of guessed from outside.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Iterator

ENV = "MONDRIAN_COSTS_FILE"


def _now() -> tuple[float, float, float]:
    return time.perf_counter(), time.thread_time(), time.process_time()


class JobCosts:
    """Called by the one worker thread only: `starting` before each claim, `idle` when nothing was claimed,
    `model()` around the analysis, `finished` when the job's outcome is recorded."""

    def __init__(self, path: str | None = None):
        self.path = path if path is not None else os.environ.get(ENV) or None
        self._start: tuple[float, float, float] | None = None
        self._model = [0.0, 0.0, 0.0]

    def starting(self) -> None:
        if self.path and self._start is None:  # straight on from the last job: the time between counts too
            self._start = _now()

    def idle(self) -> None:
        self._start = None  # waiting for work is not a job's cost

    @contextlib.contextmanager
    def model(self) -> Iterator[None]:
        if not self.path:
            yield
            return
        before = _now()
        try:
            yield
        finally:
            for i, (a, b) in enumerate(zip(before, _now())):
                self._model[i] += b - a

    def finished(self, job_id: int) -> None:
        if not self.path or self._start is None:
            return
        end = _now()
        total = [b - a for a, b in zip(self._start, end)]
        names = ("wall_ms", "thread_cpu_ms", "process_cpu_ms")
        line = {"job": job_id, **{k: round(v * 1e3, 3) for k, v in zip(names, total)},
                **{f"model_{k}": round(v * 1e3, 3) for k, v in zip(names, self._model)}}
        self._start, self._model = end, [0.0, 0.0, 0.0]
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(line) + "\n")
        except OSError:  # a benchmark's record; never a job's problem
            self.path = None


__all__ = ["JobCosts", "ENV"]
