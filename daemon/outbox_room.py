"""Whether the outbox can take a report now: there, writable, and with room on its disk. Checked before a photo is
analysed (daemon/pipeline/worker.py) and before an upload is taken (daemon/api/app.py), and shown by `status`: a report
that cannot be written would only be analysed again and again."""

from __future__ import annotations

import os
import shlex
import stat
import sys
from pathlib import Path


class OutboxGone(OSError):
    """The outbox and the folder it lives in are both gone (an unplugged drive, a share not mounted)."""


class OutboxBlocked(OutboxGone):
    """The outbox is there but cannot take a report now: its disk is full or read-only, or Mondrian may not write in
    it. Photos wait, as for an outbox that is gone: analysed now, each would be analysed again at every retry and
    then failed, and a bulk inbox would need `retry` once the disk had room again."""

    def __init__(self, reason: str, fix: str, *, whole: bool = True):
        super().__init__(f"{reason}; {fix}, and the photos go on by themselves")
        self.reason, self.fix = reason, fix
        self.whole = whole  # no photo can go (False: this one's own copy does not fit; smaller ones may)

    def for_command(self) -> str:
        """The words for `mondrian analyze`, whose photo fails now instead of waiting."""
        return f"{self.reason}; {self.fix}, then analyse the photo again"


# A report folder: its JSON, page, preview and thumbnail (a photo copied from another disk needs its own size too).
REPORT_ROOM_BYTES = 1 << 20


def outbox_room(outbox: Path, photo_bytes: int = 0) -> int:
    """The bytes a report needs in `outbox` (with `photo_bytes` of the photo's own copied in, and of photos
    reserved before it); OutboxBlocked unless its folders can be written and its disk has that room now. A need
    larger than the whole disk is not waited for: no amount of clearing up makes room, and the write fails with
    its reason."""
    for folder in (outbox, outbox / ".staging"):
        try:
            read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
        except OSError:
            continue  # not made yet: made in the outbox when needed
        if read_only:
            raise OutboxBlocked(f"the outbox {outbox} is on a disk mounted read-only", "mount it read-write")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutboxBlocked(f"Mondrian may not write in {folder}", _write_fix(folder))
    disk = os.statvfs(outbox)
    need = REPORT_ROOM_BYTES + photo_bytes
    free = disk.f_bavail * disk.f_frsize
    if free < need <= disk.f_blocks * disk.f_frsize:
        raise OutboxBlocked(f"the disk that holds the outbox {outbox} is full ({_room_words(free)} free, "
                            f"{_room_words(need)} needed)", "free some space", whole=free < REPORT_ROOM_BYTES)
    return need


def _write_fix(folder: Path) -> str:
    """How the user that runs Mondrian gets write access to `folder`: an owner's change, a mode, or a flag."""
    import pwd

    quoted = shlex.quote(str(folder))
    try:
        me = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        me = str(os.geteuid())
    try:
        st = os.stat(folder)
    except OSError:
        return f"a folder on its path may not be entered by this user ({me}): `ls -ld` each folder above it shows which"
    if os.geteuid() != 0 and st.st_uid != os.geteuid():
        return f"it belongs to another user: `sudo chown {shlex.quote(me)} {quoted}` makes it this user's ({me})"
    if os.geteuid() != 0 and not st.st_mode & stat.S_IWUSR:
        return f"`chmod u+rwx {quoted}` makes it writable"
    # Its owner may write it, yet cannot: a flag that locks it (Finder's "Locked", `chflags uchg`, `chattr +i`).
    unlock = f"chflags nouchg {quoted}" if sys.platform == "darwin" else f"sudo chattr -i {quoted}"
    return f"it is locked against changes: `{unlock}` unlocks it"


def _room_words(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n // 1024} kB"
