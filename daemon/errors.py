"""How a piece of work can end without a result, said one way each for the whole project.

- `Permanent`: the input itself is the problem (the photo, its sidecar, a link): retrying cannot help, the job
  fails with the message, which says what to do.
- `Transient`: something outside the input failed (model load, disk, a mount): retry later with backoff.
- `Cancelled`: the daemon is stopping; the job goes back to the queue, nothing is recorded against it.
- `TimedOut`: the per-photo time limit passed; the job fails so the queue moves on.

`Cancelled` and `TimedOut` are both `Interrupted`: raised by `daemon.limits.check` between decoded tokens.
Kept free of MLX and of every other module of the project, so anything may import it.
"""

from __future__ import annotations

# Exit codes (sysexits.h), so that launchd's KeepAlive and systemd's Restart=on-failure tell a setup problem that a
# restart cannot fix (EX_CONFIG) from a crash, and a "start me again" (EX_TEMPFAIL) from both.
EX_USAGE = 2  # the command line is wrong (argparse's own code)
EX_UNAVAILABLE = 69  # the service manager cannot be used here
EX_IOERR = 74  # a file or folder could not be read or written (permissions, a full disk, a drive gone)
EX_TEMPFAIL = 75  # stopped on purpose; starting again fixes it (the ledger was restored)
EX_CONFIG = 78  # the configuration (a path, the model, the ledger's place) must be fixed first


class Permanent(Exception):
    """The photo itself is the problem: retrying cannot help."""


class Transient(Exception):
    """Something outside the photo failed (model load, disk): retry later with backoff."""


class Interrupted(Exception):
    """The analysis was ended early; nothing was produced."""


class Cancelled(Interrupted):
    """The daemon is stopping: the photo goes back to the queue."""


class TimedOut(Interrupted):
    """The per-photo time limit passed: the photo is failed so the queue moves on."""


def is_permanent(exc: BaseException) -> bool:
    """Whether `exc` says the input is at fault (the model runtime's GenerationError and PhotoRefused are
    `Permanent` too)."""
    return isinstance(exc, Permanent)


__all__ = ["EX_USAGE", "EX_UNAVAILABLE", "EX_TEMPFAIL", "EX_CONFIG", "Permanent", "Transient", "Interrupted",
           "Cancelled", "TimedOut", "is_permanent"]
