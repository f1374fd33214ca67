"""Issue 9, item 4: crash recovery blames the right thing. Real daemon processes, real signals, real files.

- A photo in hand when the daemon is SIGKILLed again and again (a user restarting the service, the OOM killer, a
  forced shutdown) still gets its report: it is set aside only when analysing it alone, in a child process, crashes
  too; a daemon killed during that check is one more crash, not a verdict.
- A truly poisonous photo (`MONDRIAN_TEST_POISON` makes its analysis abort the process) is set aside with a reason
  that says so, and the daemon serves the others.
- A job left running by a dead process is recovered even when its pid now belongs to a live process (this test, or
  the new daemon itself); a live `mondrian analyze` is never taken over.
- A photo rewritten in place while it is analysed, keeping inode, size and mtime, gets a report of its final bytes.

The daemon holds itself at a named point of the analysis with the test-only `MONDRIAN_TEST_STOP_AT=analysing`
(SIGSTOP, see daemon/testhooks.py), so every kill and every overwrite lands while the photo is in hand, however fast the
machine is.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.ledger import Ledger
from tests.harness import REPO, Daemon, env_for, ledger_jobs, make_home, photo, reports, wait_for

FAST = dict(max_pixels=56 * 56, comment_max_chars=8, max_tokens=400, quiet_seconds=0.2, rescan_seconds=1,
            retry_base_seconds=0.2)


def _state(pid: int) -> str | None:
    """The process's state letter (R, S, T for stopped, Z for a zombie), or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2]


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")


def _wait_stopped(pid: int, what: str, proc: subprocess.Popen | None = None, log: str = "") -> None:
    def stopped() -> bool:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what} exited ({proc.returncode}) instead of holding at the test point:\n{log}")
        return _state(pid) == "T"

    wait_for(stopped, 90, interval=0.05, what=f"{what} to hold mid-analysis")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _report_of(home: Path, name: str) -> dict:
    job = ledger_jobs(home)[name]
    assert job.state == "done", f"{name}: {job.state} ({job.error})"
    return json.loads(Path(job.report_json).read_text())


# -- a photo in hand when the daemon dies is not to blame ------------------------------------------------------

def test_an_ordinary_photo_in_hand_at_more_than_max_attempts_kills_still_gets_its_report(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST, max_attempts=3)
    data = photo(home / "inbox" / "ordinary.jpg", seed=7, size=(64, 48)).read_bytes()

    # max_attempts SIGKILLs from outside, each while the photo is being analysed.
    for attempt in range(1, 4):
        with Daemon(home, smoke_model_path, MONDRIAN_TEST_STOP_AT="analysing") as d:
            _wait_stopped(d.proc.pid, "the daemon", d.proc, d.output())
            d.proc.send_signal(signal.SIGKILL)
            d.wait()
        job = ledger_jobs(home)["ordinary.jpg"]
        assert (job.state, job.attempts) == ("running", attempt), (job.state, job.attempts, job.error)

    # One more kill, during the check that analyses the photo alone in a child process: another crash of the
    # daemon, not a verdict on the photo; and the child does not outlive the daemon.
    with Daemon(home, smoke_model_path, MONDRIAN_TEST_STOP_AT="analysing") as d:
        def child_holding() -> int | None:
            job = ledger_jobs(home)["ordinary.jpg"]
            assert job.state != "failed", f"the photo was set aside: {job.error}"
            m = re.search(r"separate process \(pid (\d+)\)", d.output())
            return int(m.group(1)) if m and _state(int(m.group(1))) == "T" else None

        child = wait_for(child_holding, 90, interval=0.05, what="the isolation check's child mid-analysis")
        d.proc.send_signal(signal.SIGKILL)
        d.wait()
    os.kill(child, signal.SIGCONT)
    wait_for(lambda: not _alive(child), 30, what=f"the isolation child {child} to exit after the daemon died")
    job = ledger_jobs(home)["ordinary.jpg"]
    assert (job.state, job.attempts) == ("running", 3), (job.state, job.attempts, job.error)

    # A graceful stop (SIGTERM) during the check: no verdict either, the child is ended, the daemon exits 0 at once.
    with Daemon(home, smoke_model_path, MONDRIAN_TEST_STOP_AT="analysing") as d:
        m = wait_for(lambda: re.search(r"separate process \(pid (\d+)\)", d.output()), 90, interval=0.05,
                     what="the isolation check to start")
        child = int(m.group(1))
        wait_for(lambda: _state(child) == "T", 90, interval=0.05, what="the isolation child mid-analysis")
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0, d.output()
    wait_for(lambda: not _alive(child), 30, what=f"the isolation child {child} to be ended by the stop")
    job = ledger_jobs(home)["ordinary.jpg"]
    assert (job.state, job.attempts) == ("running", 3), (job.state, job.attempts, job.error)

    # Then the check's child itself is SIGKILLed (a person, or memory pressure from elsewhere): one SIGKILL is not
    # a verdict either. The check runs once more, clears the photo, and it gets its report.
    with Daemon(home, smoke_model_path, "--once", MONDRIAN_TEST_STOP_AT="analysing") as d:
        def pids() -> list[int]:
            return [int(p) for p in re.findall(r"separate process \(pid (\d+)\)", d.output())]

        first = wait_for(lambda: pids() and _state(pids()[0]) == "T" and pids()[0], 90, interval=0.05,
                         what="the isolation child mid-analysis")
        os.kill(first, signal.SIGKILL)
        second = wait_for(lambda: len(pids()) > 1 and _state(pids()[1]) == "T" and pids()[1], 90, interval=0.05,
                          what="a second isolation check")
        os.kill(second, signal.SIGCONT)
        _wait_stopped(d.proc.pid, "the daemon", d.proc, d.output())  # the photo back in the daemon's hands
        d.signal(signal.SIGCONT)
        assert d.wait(180) == 0, d.output()
        log = d.output()
    assert "not the cause" in log, log
    assert ledger_jobs(home)["ordinary.jpg"].attempts == 1  # cleared: the crashes no longer count against it
    assert _report_of(home, "ordinary.jpg")["photo"]["sha256"] == _sha(data)
    assert not list((home / "outbox" / "failed").iterdir())
    print("kills=4 (3 while analysing, 1 during the isolation check), 1 SIGTERM during the check, 1 SIGKILL of the "
          "check's child -> report")


# A native crash; the OOM killer; a crash that takes the photos of its batch down too (batch_size, issue 11): the
# next start runs the photos it had in hand one by one, so the same story follows.
@pytest.mark.parametrize("how,batch_size", [("ABRT", 1), ("KILL", 1), ("ABRT", 4)])
def test_a_photo_that_crashes_its_analysis_alone_is_set_aside_and_the_others_are_served(tmp_path, smoke_model_path,
                                                                                        how, batch_size):
    sig = signal.Signals[f"SIG{how}"]
    home = make_home(tmp_path / "home", smoke_model_path, **FAST, max_attempts=2, batch_size=batch_size)
    photo(home / "inbox" / "poison.jpg", seed=1, size=(64, 48))
    fine = photo(home / "inbox" / "fine.jpg", seed=2, size=(64, 48)).read_bytes()

    exits: list[int] = []
    log = ""
    for _ in range(6):  # a service manager restarting the daemon after each crash
        with Daemon(home, smoke_model_path, "--once", MONDRIAN_TEST_POISON="poison.jpg",
                    MONDRIAN_TEST_POISON_SIGNAL=how) as d:
            exits.append(d.wait(180))
            log += d.output()
        if exits[-1] == 0:
            break
        if len(exits) == 1:  # queued behind the photo in hand, served after the verdict by the same daemon
            later = photo(home / "inbox" / "later.jpg", seed=3, size=(64, 48)).read_bytes()
    assert exits == [-sig, -sig, 0], (exits, log[-4000:])

    job = ledger_jobs(home)["poison.jpg"]
    assert job.state == "failed" and job.error_kind == "permanent", (job.state, job.error)
    assert "alone" in job.error, job.error
    # One SIGKILL may come from outside the photo (a person, memory pressure from elsewhere): two checks must agree.
    assert ("SIGABRT" in job.error) if how == "ABRT" else ("SIGKILL) twice" in job.error), job.error
    assert log.count("separate process (pid") == (1 if how == "ABRT" else 2), log
    record = json.loads((home / "outbox" / "failed" / "poison.jpg.error.json").read_text())
    assert record["reason"] == job.error and record["cause"] == "crash"
    assert (home / "outbox" / "failed" / "poison.jpg.error.html").exists()
    assert (home / "outbox" / "failed" / "poison.jpg").exists()
    assert _report_of(home, "fine.jpg")["photo"]["sha256"] == _sha(fine)
    assert _report_of(home, "later.jpg")["photo"]["sha256"] == _sha(later)
    print(f"poison.jpg set aside after {len(exits) - 1} crashes and a crash alone: {job.error}")


def test_a_crashing_photo_is_still_checked_when_the_restart_is_slower_than_its_lease(tmp_path, smoke_model_path):
    """Attack: the daemon restarted more slowly than a lease lasts (a Mac rebooting after the crash): at the start
    the heartbeat found the crashed job's lease over and queued it again before the crash check could see it, so
    the photo was taken and crashed the daemon at every start, for ever. The check sees it now."""
    home = make_home(tmp_path / "home", smoke_model_path, **FAST, max_attempts=2, lease_seconds=1)
    photo(home / "inbox" / "poison.jpg", seed=1, size=(64, 48))
    exits: list[int] = []
    log = ""
    for _ in range(5):
        with Daemon(home, smoke_model_path, "--once", MONDRIAN_TEST_POISON="poison.jpg") as d:
            exits.append(d.wait(180))
            log += d.output()
        if exits[-1] == 0:
            break
        time.sleep(2.5)  # longer than the lease: it has ended when the daemon starts again
    assert exits == [-signal.SIGABRT, -signal.SIGABRT, 0], (exits, log[-4000:])
    job = ledger_jobs(home)["poison.jpg"]
    assert job.state == "failed" and "alone" in job.error, (job.state, job.error)


def test_a_photo_whose_analysis_hangs_even_alone_is_set_aside(tmp_path, smoke_model_path):
    # In the daemon a hang in native code (a decoder, a prefill) is not stopped by job_timeout_seconds, which is
    # checked between tokens; a user restarting the hung service again and again is what counts the crashes here.
    home = make_home(tmp_path / "home", smoke_model_path, **FAST, max_attempts=1, job_timeout_seconds=1)
    photo(home / "inbox" / "stuck.jpg", seed=4, size=(64, 48))
    with Daemon(home, smoke_model_path, MONDRIAN_TEST_STOP_AT="analysing") as d:
        _wait_stopped(d.proc.pid, "the daemon", d.proc, d.output())
        d.proc.send_signal(signal.SIGKILL)
        d.wait()
    # The check's child holds itself mid-analysis too: from outside, exactly a hang.
    with Daemon(home, smoke_model_path, "--once", MONDRIAN_TEST_STOP_AT="analysing") as d:
        assert d.wait(120) == 0, d.output()
        log = d.output()
    job = ledger_jobs(home)["stuck.jpg"]
    assert job.state == "failed" and "hung" in job.error, (job.state, job.error)
    assert not _alive(int(re.search(r"separate process \(pid (\d+)\)", log).group(1)))
    assert (home / "outbox" / "failed" / "stuck.jpg").exists()


# -- a job whose pid was reused is still recovered ------------------------------------------------------------

_LAUNCHER = """
import os, socket, sys
from daemon.ledger import Ledger
ledger = Ledger(sys.argv[1])
ledger.claim(worker=f"{socket.gethostname()}:{os.getpid()}")  # as if a dead daemon had this very pid
ledger.close()
os.execv(sys.executable, [sys.executable, "-m", "daemon", "run", "--once"])  # the daemon keeps the pid
"""


_HOLDER = """
import sys, time
from daemon.ledger import Ledger
ledger = Ledger(sys.argv[1])
print(ledger.claim().worker, flush=True)
time.sleep(600)
"""


def test_a_job_is_live_exactly_while_the_process_that_signed_it_runs(tmp_path):
    db = tmp_path / "ledger.db"
    ledger = Ledger(db)
    job = ledger.enqueue(tmp_path / "a.jpg", "a.jpg", "ansel", "default", 1, 1.0)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(db)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        signed = holder.stdout.readline().strip()
        host, pid, token = signed.split(":")
        assert (host, int(pid)) == (socket.gethostname(), holder.pid) and re.fullmatch(r"[0-9a-f]{16}", token)
        assert ledger.orphaned_running() == [] and ledger.sweep_run_locks() == 0
    finally:
        holder.kill()
        holder.wait()
    assert [j.id for j in ledger.orphaned_running()] == [job.id]
    assert ledger.sweep_run_locks() == 1 and not list(ledger.runs_dir.iterdir())
    assert [j.id for j in ledger.orphaned_running()] == [job.id]  # its lock file gone: still not live


def test_a_job_left_running_under_a_pid_that_is_alive_again_is_recovered(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    db = home / "var" / "ledger.db"
    data = {}
    ledger = Ledger(db)
    for i, name in enumerate(["test pid.jpg", "token of no one.jpg", "daemon pid.jpg"]):
        path = photo(home / "inbox" / name, seed=20 + i, size=(64, 48))
        data[name] = path.read_bytes()
        st = path.stat()
        ledger.enqueue(path, name, "ansel", "default", st.st_size, st.st_mtime)
    host = socket.gethostname()
    ledger.claim(worker=f"{host}:{os.getpid()}")  # the pid now belongs to this test process
    ledger.claim(worker=f"{host}:{os.getpid()}:0123456789abcdef")  # a run token nobody holds
    ledger.close()

    log = home / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(db)], env=env_for(home, smoke_model_path),
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            states = {n: (j.state, j.worker) for n, j in ledger_jobs(home).items()}
            raise AssertionError(f"the daemon never finished: jobs {states}\n{log.read_text()[-3000:]}")
    assert rc == 0, log.read_text()
    assert "recovered 3 photo(s)" in log.read_text(), log.read_text()
    for name, content in data.items():
        assert _report_of(home, name)["photo"]["sha256"] == _sha(content)


def test_a_live_analyze_is_not_taken_over_by_a_daemon_starting_meanwhile(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    outside = photo(tmp_path / "elsewhere" / "mine.jpg", seed=5, size=(64, 48))
    an = subprocess.Popen([sys.executable, "-m", "daemon", "analyze", str(outside), "--json"],
                          env=env_for(home, smoke_model_path, MONDRIAN_TEST_STOP_AT="analysing"), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_stopped(an.pid, "mondrian analyze", an)
        (job,) = ledger_jobs(home).values()
        assert job.state == "running"
        with Daemon(home, smoke_model_path, "--once") as d:
            wait_for(lambda: "model ready" in d.output(), 90, what="the daemon past its start-up recovery")
            again = ledger_jobs(home)["mine.jpg"]
            assert (again.state, again.worker, again.attempts) == ("running", job.worker, 1), again.error
            an.send_signal(signal.SIGCONT)
            out, err = an.communicate(timeout=120)
            assert an.returncode == 0, err
            assert d.wait(120) == 0, d.output()
            assert "recovered" not in d.output(), d.output()
    finally:
        if an.poll() is None:
            an.kill()
            an.communicate()
    done = ledger_jobs(home)["mine.jpg"]
    assert done.state == "done" and done.attempts == 1
    assert json.loads(out)["state"] == "done"
    assert outside.exists()


# -- a photo rewritten in place while it is analysed ----------------------------------------------------------

def test_a_photo_rewritten_in_place_during_analysis_is_reported_from_its_final_bytes(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    src = photo(home / "inbox" / "same.tif", seed=1, size=(64, 48), fmt="TIFF")
    new = photo(tmp_path / "new.tif", seed=2, size=(64, 48), fmt="TIFF").read_bytes()
    assert len(new) == src.stat().st_size and new != src.read_bytes()

    with Daemon(home, smoke_model_path, "--once", MONDRIAN_TEST_STOP_AT="analysing") as d:
        _wait_stopped(d.proc.pid, "the daemon", d.proc, d.output())
        before = os.stat(src)
        with open(src, "r+b") as f:  # the same inode, the same size...
            f.write(new)
        os.utime(src, ns=(before.st_atime_ns, before.st_mtime_ns))  # ...and the old mtime put back
        after = os.stat(src)
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size,
                                                                    before.st_mtime_ns)
        d.signal(signal.SIGCONT)
        assert d.wait(120) == 0, d.output()
        log = d.output()
    report = _report_of(home, "same.tif")
    assert report["photo"]["sha256"] == _sha(new), "the report describes bytes that are no longer there"
    kept = Path(ledger_jobs(home)["same.tif"].output_dir) / "same.tif"
    assert kept.read_bytes() == new
    assert log.count("analysing same.tif") == 2, log

    # A change of metadata only (permissions here; Spotlight's extended attributes on a Mac) moves ctime too,
    # but the bytes are those analysed: one analysis, no second one.
    meta = photo(home / "inbox" / "meta.jpg", seed=3, size=(64, 48)).read_bytes()
    with Daemon(home, smoke_model_path, "--once", MONDRIAN_TEST_STOP_AT="analysing") as d:
        _wait_stopped(d.proc.pid, "the daemon", d.proc, d.output())
        os.chmod(home / "inbox" / "meta.jpg", 0o600)
        d.signal(signal.SIGCONT)
        assert d.wait(120) == 0, d.output()
        log = d.output()
    assert _report_of(home, "meta.jpg")["photo"]["sha256"] == _sha(meta)
    assert log.count("analysing meta.jpg") == 1, log
    assert len(reports(home / "outbox")) == 2


def _report_in(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


@pytest.mark.parametrize("point", ["moved", "fail_moved"])
def test_a_file_dropped_under_the_name_of_one_filed_before_a_kill_is_a_photo_of_its_own(tmp_path, smoke_model_path,
                                                                                       point):
    """Killed just after the original was moved into its report folder (or into failed/); another photo is dropped
    under the same name before the next start. It was moved in beside the old one as `a-2.jpg` (or deleted as "the
    same bytes", or filed in failed/ with the old reason), never analysed. It is now critiqued as itself."""
    from tests.harness import mondrian

    home = make_home(tmp_path / "home", smoke_model_path)
    inbox = home / "inbox"
    first = inbox / "a.jpg"
    if point == "moved":
        photo(first, seed=80)
    else:
        first.write_bytes(b"\xff\xd8\xff\xe0 not a photo at all" * 50)
    first_bytes = first.read_bytes()
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=300, MONDRIAN_TEST_CRASH_AT=point)
    assert out.returncode == -9, (out.returncode, out.stderr[-2000:])
    assert not first.exists()
    second = photo(inbox / "a.jpg", seed=81).read_bytes()
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = {j.id: j for j in Ledger(home / "var" / "ledger.db").jobs()}
    done = [j for j in jobs.values() if j.state == "done" and j.duplicate_of is None]
    if point == "moved":
        old = home / "outbox" / "a"
        assert (old / "a.jpg").read_bytes() == first_bytes and not list(old.glob("a-*.jpg")), sorted(old.iterdir())
        assert _report_in(old)["photo"]["sha256"] == _sha(first_bytes)
        assert len(done) == 2, jobs
    else:
        assert (home / "outbox" / "failed" / "a.jpg").read_bytes() == first_bytes
        assert not list((home / "outbox" / "failed").glob("a-*.jpg"))
        assert len(done) == 1, jobs
    new = [r.parent for r in reports(home / "outbox") if _report_in(r.parent)["photo"]["sha256"] == _sha(second)]
    assert len(new) == 1 and (new[0] / "a.jpg").read_bytes() == second, [r.parent.name for r in reports(home / "outbox")]
    assert not inbox.joinpath("a.jpg").exists()


def test_a_move_across_disks_killed_before_its_unlink_is_finished_not_critiqued_again(tmp_path, smoke_model_path):
    """Killed between the copy of a move to another disk and its unlink: the same bytes are in the report folder
    and still in the inbox. That is the move to finish (the inbox copy removed), not another photo to critique:
    nothing goes to duplicates/."""
    import subprocess

    from tests.harness import mondrian

    home = make_home(tmp_path / "home", smoke_model_path)
    # The inbox on a disk of its own (a memory filesystem), so the move into the outbox is a copy and an unlink.
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "none", str(home / "inbox")],
                                           capture_output=True).returncode:
        pytest.skip("needs root to mount an inbox on another filesystem")
    try:
        first = photo(home / "inbox" / "a.jpg", seed=84)
        data = first.read_bytes()
        out = mondrian(home, smoke_model_path, "run", "--once", timeout=300, MONDRIAN_TEST_CRASH_AT="moved")
        assert out.returncode == -9, (out.returncode, out.stderr[-2000:])
        first.write_bytes(data)  # what the killed copy-then-unlink leaves in the inbox
        out = mondrian(home, smoke_model_path, "run", "--once", timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert not first.exists() and (home / "outbox" / "a" / "a.jpg").read_bytes() == data
    finally:
        subprocess.run(["umount", "-l", str(home / "inbox")], capture_output=True)
    assert [r.parent.name for r in reports(home / "outbox")] == ["a"]
    assert not (home / "outbox" / "duplicates").exists() or not list((home / "outbox" / "duplicates").iterdir())
    assert len(Ledger(home / "var" / "ledger.db").jobs()) == 1


@pytest.mark.parametrize("change", ["replaced", "renamed"])
def test_a_photo_replaced_or_renamed_while_its_report_is_written_is_not_filed_under_it(tmp_path, smoke_model_path,
                                                                                      change):
    """Between the last look at the photo and the move of the original into its report folder (25-130 ms), an export
    overwrote it, or it was renamed: the report of the old bytes got the new photo as its original, or lost its
    original while the renamed file went to duplicates/. The report is withdrawn and the file taken as it is now."""
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox = home / "inbox"
    photo(inbox / "a.jpg", seed=82)
    other = photo(tmp_path / "other.jpg", seed=83, size=(80, 60)).read_bytes()
    d = Daemon(home, smoke_model_path, MONDRIAN_TEST_STOP_AT="staged")
    with d:
        _wait_stopped(d.proc.pid, "the daemon", d.proc, d.output())
        if change == "replaced":
            tmp = inbox / ".a.jpg.tmp"
            tmp.write_bytes(other)
            os.replace(tmp, inbox / "a.jpg")
        else:
            (inbox / "a.jpg").rename(inbox / "renamed.jpg")
        os.kill(d.proc.pid, signal.SIGCONT)
        name = "a.jpg" if change == "replaced" else "renamed.jpg"
        want = _sha(other) if change == "replaced" else None

        def settled():
            assert d.proc.poll() is None, d.output()
            folders = [r.parent for r in reports(home / "outbox")]
            return folders if folders and not (inbox / name).exists() and \
                all((f / _report_in(f)["photo"]["file"]).is_file() for f in folders) else None

        folders = wait_for(settled, 120, what="the file taken as it is now")
        assert d.stop() == 0
    assert len(folders) == 1, [f.name for f in folders]
    report = _report_in(folders[0])
    original = folders[0] / report["photo"]["file"]
    assert report["photo"]["sha256"] == _sha(original.read_bytes()), "the report describes its original"
    if want:
        assert report["photo"]["sha256"] == want
    else:
        assert report["photo"]["file"] == "renamed.jpg"
    assert not (home / "outbox" / "duplicates").exists() or not list((home / "outbox" / "duplicates").iterdir())
