"""`mondrian references index` right after copying references (issue 13): it waits for files still being written,
by the inbox's rules, and says so, instead of reporting "0 indexed". A real writer keeps appending to the file
while the real command runs."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.harness import REPO, env_for, make_home, photo, wait_for


def _index_in_background(home: Path, model: Path) -> tuple[subprocess.Popen, list[str], threading.Thread]:
    """`mondrian references index --advisor ansel` running, with its stderr lines collected as they come."""
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "references", "index", "--advisor", "ansel"],
                            env=env_for(home, model), cwd=REPO, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    return proc, err, reader


def test_references_index_waits_for_a_reference_still_being_written(tmp_path, smoke_model_path):
    from daemon.ledger import Ledger

    home = make_home(tmp_path / "home", smoke_model_path, quiet_seconds=1.0)
    refs = home / "advisors" / "ansel" / "references"
    refs.mkdir(parents=True)
    jpeg = photo(tmp_path / "source.jpg", seed=21, size=(64, 48)).read_bytes()
    target = refs / "fresh.jpg"
    target.write_bytes(jpeg)  # a decodable photo at every moment: only the waiting is under test
    stop = threading.Event()

    def keep_writing() -> None:  # a slow copy: the file grows every 0.1 s
        with open(target, "ab") as fh:
            while not stop.is_set():
                fh.write(b"\0" * 64)
                fh.flush()
                time.sleep(0.1)

    writer = threading.Thread(target=keep_writing, daemon=True)
    writer.start()
    proc, err, reader = _index_in_background(home, smoke_model_path)
    try:
        wait_for(lambda: any("reference(s) still being written" in line for line in err) or proc.poll() is not None,
                 90, what="the command to say it waits")
        assert proc.poll() is None, "".join(err)  # still waiting while the copy goes on
        time.sleep(4.0)  # longer than the old fixed three quiet times
        assert proc.poll() is None, "".join(err)
    finally:
        stop.set()
        writer.join()
    rc = proc.wait(timeout=120)
    reader.join(timeout=10)
    text = "".join(err)
    assert rc == 0, text
    assert "1 indexed" in text and "0 still being written" in text, text
    ledger = Ledger(home / "var" / "ledger.db")
    try:
        (row,) = ledger.references("ansel")
        assert row.sha256 == hashlib.sha256(target.read_bytes()).hexdigest(), "indexed before the copy was complete"
    finally:
        ledger.close()
    print("\n" + text)


def test_an_empty_reference_waits_longer_as_a_copy_that_has_not_started(tmp_path, smoke_model_path):
    """As in the inbox: a zero-byte file is a copy that has not started, not a broken photo, for a while."""
    home = make_home(tmp_path / "home", smoke_model_path, quiet_seconds=1.0)
    refs = home / "advisors" / "ansel" / "references"
    refs.mkdir(parents=True)
    target = refs / "empty-yet.jpg"
    target.write_bytes(b"")
    proc, err, reader = _index_in_background(home, smoke_model_path)
    try:
        wait_for(lambda: any("still being written" in line for line in err) or proc.poll() is not None,
                 90, what="the command to say it waits")
        time.sleep(3.0)  # three quiet times: an empty file must still be waited for
        assert proc.poll() is None, "".join(err)
        photo(tmp_path / "copy.jpg", seed=22, size=(64, 48)).replace(target)  # the copy arrives
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    text = "".join(err)
    assert rc == 0 and "1 indexed" in text and "0 skipped" in text, text
