"""A report folder is durable before it appears: every file Mondrian writes into it, and the staging folder itself,
is fsynced before the one rename that puts the folder in the outbox (issue 11, item 9 syncs them in one pass instead
of two fsyncs a file). Read off the real daemon's system calls with strace, on Linux."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from tests.harness import REPO, env_for, make_home, photo

pytestmark = pytest.mark.skipif(shutil.which("strace") is None,
                                reason="needs strace (Linux: apt-get install strace)")

SYNC = re.compile(r'^\d+\s+f(?:data)?sync\(\d+<(?P<path>[^>]+)>\)')
RENAME = re.compile(r'^\d+\s+rename(?:at2?)?\((?:AT_FDCWD, )?"(?P<src>[^"]+)", (?:AT_FDCWD, )?"(?P<dst>[^"]+)"')


def test_every_file_of_a_report_folder_is_synced_before_the_folder_enters_the_outbox(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    photo(home / "inbox" / "p.jpg", seed=1)
    trace = tmp_path / "trace"
    out = subprocess.run(["strace", "-f", "-y", "-qq", "-o", str(trace), "-e",
                          "trace=fsync,fdatasync,rename,renameat,renameat2",
                          sys.executable, "-m", "daemon", "run", "--once"],
                         env=env_for(home, smoke_model_path), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    folder = home / "outbox" / "p"
    synced: set[str] = set()
    published_from = None
    for line in trace.read_text().splitlines():
        if m := SYNC.match(line):
            synced.add(m["path"])
        elif (m := RENAME.match(line)) and m["dst"] == str(folder):
            published_from = m["src"]
            break
    assert published_from is not None and "/.staging/" in published_from, "the folder did not appear by one rename"
    assert published_from in synced, "the staging folder's entries were not synced before it was renamed"
    own = sorted(p.name for p in folder.iterdir() if p.name != "p.jpg")  # the original moves in afterwards
    assert own == ["p.xmp", "preview.jpg", "report.html", "report.json", "thumb.jpg"]
    for name in own:
        # Synced under its name, or (written and synced as one) under its temporary name `.<name>.PID.HEX.tmp`.
        assert any(p == f"{published_from}/{name}" or p.startswith(f"{published_from}/.{name}.") for p in synced), \
            f"{name} was not synced before its folder entered the outbox"
