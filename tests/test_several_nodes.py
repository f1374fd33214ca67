"""Issue 15: several Mondrian daemons (nodes) on one shared inbox and outbox, through one shared PostgreSQL ledger
(a real server, tests/pgserver.py), with random SIGKILLs (each node restarted) and one node SIGSTOPped while it
holds a photo, past its lease, then SIGCONTed: every photo ends with exactly one report, nothing is published
twice, and the stopped node's late work is refused by the ledger (its log says so, and the ledger records it).

The same run on SQLite, one node (a home as today), must pass too: nothing changes for one machine.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from daemon.ledger import DONE, Ledger
from tests.harness import Daemon, make_home, mondrian, photo, reports, wait_for

PHOTOS = 60
LEASE = 3.0
KILLS = 4
FAST = dict(max_pixels=56 * 56, comment_max_chars=8, max_tokens=400, quiet_seconds=0.2, rescan_seconds=1,
            retry_base_seconds=0.2, max_attempts=12, lease_seconds=LEASE)


def _homes(tmp_path: Path, url: str | None, nodes: int, model: Path) -> tuple[list[Path], Path, Path]:
    inbox, outbox = tmp_path / "share" / "inbox", tmp_path / "share" / "outbox"
    inbox.mkdir(parents=True)
    extra = {"ledger_url": url} if url else {}
    return ([make_home(tmp_path / f"node{i}", model, inbox=str(inbox), outbox=str(outbox), **FAST, **extra)
             for i in range(nodes)], inbox, outbox)


def _stopped(node: Daemon) -> bool:
    out = subprocess.run(["ps", "-o", "stat=", "-p", str(node.proc.pid)], capture_output=True, text=True)
    return out.stdout.strip().startswith("T")


def _stall(node: Daemon, ledger: Ledger, others: bool) -> int:
    """`node` stopped itself (MONDRIAN_TEST_STOP_AT) with a photo in hand: once another node has taken the photo
    over and published it (past the stopped one's lease), wake it. Returns the photo's job."""
    wait_for(lambda: _stopped(node), timeout=300, what="the node to stop itself with a photo in hand")
    name = re.findall(r"analysing (.+?) as ", node.output())[-1]
    job = next(j for j in ledger.jobs() if j.rel_path == name)
    if others:
        wait_for(lambda: (j := ledger.get(job.id)).state == DONE and j.worker.split(":")[1] != str(node.proc.pid),
                 timeout=120, what="another node to take over and finish the stalled photo")
    else:
        time.sleep(LEASE * 1.5)  # alone, nobody takes its photo: it carries on when it wakes
    node.signal(signal.SIGCONT)
    return job.id


@pytest.mark.parametrize("engine,count", [("postgres", 3), ("sqlite", 1)])
def test_nodes_on_one_queue_publish_each_photo_exactly_once(tmp_path: Path, smoke_model_path: Path,
                                                            request: pytest.FixtureRequest, engine: str,
                                                            count: int) -> None:
    url = request.getfixturevalue("pg_server").new_database() if engine == "postgres" else None
    homes, inbox, outbox = _homes(tmp_path, url, count, smoke_model_path)
    rng = random.Random(15)
    names = [f"shot {i:02d}.jpg" for i in range(PHOTOS)]
    staged = tmp_path / "camera"
    for i, name in enumerate(names):
        photo(staged / name, seed=1500 + i, size=(64, 48))
    # Node 0 stalls after staging its third report, before its check of the claim (the reservation), so that what
    # it made would be published late.
    stalls = {0: "staged:3"}
    nodes = [Daemon(home, smoke_model_path, **({"MONDRIAN_TEST_STOP_AT": stalls[i]} if i in stalls else {}))
             for i, home in enumerate(homes)]
    ledger = Ledger(homes[0] / "var" / "ledger.db", url=url)
    try:
        wait_for(lambda: len(ledger.workers()) == count, timeout=120, what="every node's heartbeat")
        for name in names:  # a card copied in: each file appears whole (a rename within the share)
            (staged / name).rename(inbox / name)
        done = lambda: sum(j.state == DONE for j in ledger.jobs())  # noqa: E731
        for i in sorted(stalls):
            job_id = _stall(nodes[i], ledger, others=count > 1)
            if count > 1:
                # Woken, it finds the photo another node's: the ledger refuses what it would write, and it discards
                # its work: refused at its check before the rename (its publish).
                wait_for(lambda: "refused:" in nodes[i].output(), timeout=120, what="the late work refused")
                refusals = [v for k, (v, _) in ledger.events().items() if k.startswith(f"refused:{job_id}:")]
                assert [r["what"] for r in refusals] == ["publish"], refusals
                assert "this worker's publish is discarded" in nodes[i].output()

        # Random kills, each node restarted at once, while the inbox drains.
        for _ in range(KILLS):
            if done() >= PHOTOS:
                break
            time.sleep(rng.uniform(0.5, 2.5))
            i = rng.randrange(count)
            nodes[i].kill()
            nodes[i] = Daemon(homes[i], smoke_model_path)
        wait_for(lambda: done() == PHOTOS, timeout=600, interval=0.5, what=f"all {PHOTOS} photos done")
    finally:
        for node in nodes:
            if node.proc.poll() is None:
                node.signal(signal.SIGCONT)
                node.stop()
    logs = "\n".join(node.output() for node in nodes)

    jobs = ledger.jobs()
    assert sorted(j.rel_path for j in jobs if j.state == DONE) == sorted(names), logs[-3000:]
    assert all(j.duplicate_of is None for j in jobs)
    found = reports(outbox)
    assert len(found) == PHOTOS, [p.parent.name for p in found]
    originals = sorted(p.name for r in found for p in r.parent.iterdir() if p.suffix == ".jpg" and
                       not p.name.startswith(("preview", "thumb")))
    assert originals == sorted(names)  # each photo in exactly one report folder, none lost
    by_job = [json.loads(r.read_text())["job_id"] for r in found]
    assert sorted(by_job) == sorted(j.id for j in jobs if j.state == DONE)
    assert list(inbox.iterdir()) == []
    assert not (outbox / "duplicates").exists() or list((outbox / "duplicates").iterdir()) == []
    assert not (outbox / "failed").exists() or [p for p in (outbox / "failed").iterdir()
                                                if not p.name.startswith(".")] == []
    assert [p for p in (outbox / ".staging").iterdir()] == []
    assert mondrian(homes[0], smoke_model_path, "status").returncode == 0


def test_workers_lists_every_node_and_a_stopped_one_as_lost(tmp_path: Path, smoke_model_path: Path,
                                                            pg_server) -> None:  # type: ignore[no-untyped-def]
    url = pg_server.new_database()
    homes, inbox, _ = _homes(tmp_path, url, 2, smoke_model_path)
    nodes = [Daemon(home, smoke_model_path) for home in homes]
    pids = {str(n.proc.pid) for n in nodes}

    def workers(home: Path) -> list[dict]:
        out = mondrian(home, smoke_model_path, "workers", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["workers"]

    try:
        rows = wait_for(lambda: len(w := workers(homes[1])) == 2 and w, timeout=120, what="both nodes listed")
        assert {str(r["pid"]) for r in rows} == pids and not any(r["lost"] for r in rows)
        nodes[0].signal(signal.SIGSTOP)
        rows = wait_for(lambda: [r for r in workers(homes[1]) if r["lost"]], timeout=60, what="the stopped one lost")
        assert [r["pid"] for r in rows] == [nodes[0].proc.pid]
        text = mondrian(homes[1], smoke_model_path, "status")
        assert text.returncode == 0, text.stderr
        assert "Ledger:  shared" in text.stdout and f"pid {nodes[0].proc.pid}: LOST" in text.stdout, text.stdout
        assert f"pid {nodes[1].proc.pid}: idle" in text.stdout
        listing = mondrian(homes[0], smoke_model_path, "workers").stdout
        assert "1 alive, 1 lost" in listing, listing
        nodes[0].signal(signal.SIGCONT)
        wait_for(lambda: not any(r["lost"] for r in workers(homes[0])), timeout=60, what="it beats again")
        # Its count and rate come from the photos it finished.
        photo(inbox / "one.jpg", seed=1)
        seen = wait_for(lambda: [r for r in workers(homes[0]) if r["done"]], timeout=120, what="a photo done")
        assert seen[0]["photos_per_hour"] > 0
    finally:
        for node in nodes:
            node.signal(signal.SIGCONT)
            node.stop()
    assert workers(homes[0]) == []  # a clean stop leaves the table


def test_every_node_serves_a_newly_promoted_adapter_without_a_restart(tmp_path: Path, smoke_model_path: Path,
                                                                     pg_server) -> None:  # type: ignore[no-untyped-def]
    """Adapters live in one shared folder; the lora strategy reads the advisor's current version per photo."""
    import mlx_vlm

    from daemon.config import load_config
    from tests.lora_helpers import install_version, random_adapter

    url = pg_server.new_database()
    inbox, outbox, adapters = (tmp_path / "share" / n for n in ("inbox", "outbox", "adapters"))
    inbox.mkdir(parents=True)
    homes = [make_home(tmp_path / f"node{i}", smoke_model_path, inbox=str(inbox), outbox=str(outbox),
                       adapters_dir=str(adapters), ledger_url=url, default_mode="lora", embeddings_enabled=False,
                       **{k: v for k, v in FAST.items() if k != "default_mode"}) for i in range(2)]
    cfg = load_config(homes[0], env={}, model=str(smoke_model_path))
    model, _ = mlx_vlm.load(str(smoke_model_path))
    install_version(cfg, "ansel", random_adapter(tmp_path / "a1", model, seed=1), model_path=smoke_model_path)
    nodes = [Daemon(home, smoke_model_path) for home in homes]
    ledger = Ledger(homes[0] / "var" / "ledger.db", url=url)
    seeds = iter(range(3000, 4000))

    def drop(n: int) -> None:
        nonlocal dropped
        dropped += n
        for _ in range(n):
            seed = next(seeds)
            photo(tmp_path / "camera" / f"p{seed}.jpg", seed=seed, size=(64, 48)).rename(inbox / f"p{seed}.jpg")

    dropped = 0

    def settled() -> list:
        jobs = ledger.jobs()
        return jobs if len(jobs) == dropped and all(j.state == DONE for j in jobs) else []

    try:
        wait_for(lambda: len(ledger.workers()) == 2, timeout=120, what="both nodes")
        drop(2)
        before = wait_for(settled, timeout=180, what="the first photos")
        assert {j.adapter for j in before} == {"ansel/v0001"}
        install_version(cfg, "ansel", random_adapter(tmp_path / "a2", model, seed=2), model_path=smoke_model_path)
        pids = {str(n.proc.pid) for n in nodes}
        after: list = []
        for _ in range(10):  # until both nodes have analysed photos since the promotion
            drop(4)
            after = [j for j in wait_for(settled, timeout=180, what="the next photos") if j.id > max(
                b.id for b in before)]
            if {j.worker.split(":")[1] for j in after if j.worker} >= pids:
                break
        assert {j.worker.split(":")[1] for j in after} >= pids, "one node never got a photo"
        assert {j.adapter for j in after} == {"ansel/v0002"}
    finally:
        for node in nodes:
            node.stop()


def test_a_killed_daemons_row_is_forgotten_once_the_next_one_beats(tmp_path: Path, smoke_model_path: Path) -> None:
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)

    def workers() -> list[dict]:
        out = mondrian(home, smoke_model_path, "workers", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["workers"]

    killed = Daemon(home, smoke_model_path)
    try:
        wait_for(lambda: [r for r in workers() if r["pid"] == killed.proc.pid], timeout=120, what="its row")
    finally:
        killed.kill()  # SIGKILL: no clean stop retires its row
    with Daemon(home, smoke_model_path) as again:
        rows = wait_for(lambda: (w := workers()) and any(r["pid"] == again.proc.pid for r in w) and w, timeout=120,
                        what="the new daemon's row")
        # The killed one is gone for good (its pid no longer exists, it held no photo): not LOST for ever.
        assert [r["pid"] for r in rows] == [again.proc.pid], rows
        assert again.stop() == 0


def test_the_same_photo_taken_by_two_nodes_at_once_gets_one_report(tmp_path: Path, smoke_model_path: Path,
                                                                   pg_server) -> None:
    """Two copies of one photo, each taken by another node: each node looked for an earlier report only before its
    analysis, so both published one. The node that finishes later now finds the other's and files a duplicate."""
    url = pg_server.new_database()
    inbox, outbox = tmp_path / "share" / "inbox", tmp_path / "share" / "outbox"
    inbox.mkdir(parents=True)
    settings = {**FAST, "lease_seconds": 120.0}  # the held node keeps its photo: no takeover here
    homes = [make_home(tmp_path / f"node{i}", smoke_model_path, inbox=str(inbox), outbox=str(outbox),
                       ledger_url=url, **settings) for i in range(2)]
    ledger = Ledger(homes[0] / "var" / "ledger.db", url=url)
    first = Daemon(homes[0], smoke_model_path, MONDRIAN_TEST_STOP_AT="analysing")
    second = None
    try:
        photo(inbox / "card-a.jpg", seed=77, size=(64, 48))
        wait_for(lambda: _stopped(first), timeout=300, what="the first node to hold card-a.jpg mid-analysis")
        second = Daemon(homes[1], smoke_model_path)
        (inbox / "card-b.jpg").write_bytes((inbox / "card-a.jpg").read_bytes())
        by_name = lambda: {j.rel_path: j for j in ledger.jobs()}  # noqa: E731
        wait_for(lambda: by_name().get("card-b.jpg") is not None and by_name()["card-b.jpg"].state == DONE,
                 timeout=120, what="the second node's report of the same bytes")
        first.signal(signal.SIGCONT)
        wait_for(lambda: by_name()["card-a.jpg"].state == DONE, timeout=120, what="the first node to finish")
    finally:
        for node in (first, second):
            if node is not None and node.proc.poll() is None:
                node.signal(signal.SIGCONT)
                node.stop()
    jobs = by_name()
    assert jobs["card-a.jpg"].duplicate_of == jobs["card-b.jpg"].id, {n: j.duplicate_of for n, j in jobs.items()}
    assert [r.parent.name for r in reports(outbox)] == ["card-b"]
    assert sorted(p.name for p in (outbox / "duplicates").iterdir()) == ["card-a.jpg", "card-a.jpg.duplicate.json"]


def test_a_ledger_server_restarted_mid_photo_strands_nothing(tmp_path: Path, smoke_model_path: Path,
                                                            pg_server) -> None:
    """The PostgreSQL server restarted (an update, the NAS rebooted) while a node analyses: a read of the ledger
    failed mid-photo, recording that failed too, and the node kept renewing the lease of a photo nothing worked
    on: it stayed "in progress" for ever. Every photo ends with one report once the server is back."""
    url = pg_server.new_database()
    homes, inbox, outbox = _homes(tmp_path, url, 1, smoke_model_path)
    ledger = Ledger(homes[0] / "var" / "ledger.db", url=url)
    node = Daemon(homes[0], smoke_model_path, MONDRIAN_TEST_TOKEN_SECONDS="0.03")
    names = [f"shot{i}.jpg" for i in range(6)]
    try:
        wait_for(lambda: len(ledger.workers()) == 1, timeout=120, what="the node's heartbeat")
        for i, name in enumerate(names):
            photo(inbox / name, seed=40 + i, size=(64, 48))
        wait_for(lambda: "analysing " in node.output(), timeout=120, what="a photo in hand")
        ledger.close()
        pg_server.bounce(down_s=1.0)
        wait_for(lambda: sum(j.state == DONE for j in ledger.jobs()) == len(names), timeout=240, interval=0.5,
                 what="every photo done after the restart")
        assert node.proc.poll() is None, node.output()[-3000:]
    finally:
        node.stop()
    assert sorted(p.parent.name for p in reports(outbox)) == sorted(Path(n).stem for n in names)
    assert list(inbox.iterdir()) == []


def test_a_node_whose_clock_runs_ahead_takes_over_no_healthy_photo(tmp_path: Path, smoke_model_path: Path,
                                                                  pg_server) -> None:
    """Two Macs whose clocks differ by a minute and a half (one never set by the network): each compared the
    other's lease with its own clock, so the one ahead saw every lease of the other as ended, took its photos
    over and the other's work was refused. Leases are on the server's clock now."""
    import glob

    faketime = (glob.glob("/usr/lib/*/faketime/libfaketime.so.1") or [None])[0]
    if faketime is None:
        pytest.skip("libfaketime is not installed (`bash tests/system_deps.sh` installs it)")
    url = pg_server.new_database()
    homes, inbox, outbox = _homes(tmp_path, url, 2, smoke_model_path)
    ledger = Ledger(homes[0] / "var" / "ledger.db", url=url)
    slow = {"MONDRIAN_TEST_TOKEN_SECONDS": "0.02"}
    nodes = [Daemon(homes[0], smoke_model_path, **slow),
             # (no slowed tokens here: time.sleep fails under libfaketime)
             Daemon(homes[1], smoke_model_path, LD_PRELOAD=faketime, FAKETIME="+90s", DONT_FAKE_MONOTONIC="1")]
    names = [f"shot{i}.jpg" for i in range(8)]
    try:
        wait_for(lambda: len(ledger.workers()) == 2, timeout=120, what="both nodes' heartbeats")
        out = mondrian(homes[0], smoke_model_path, "workers")
        assert out.returncode == 0 and "LOST" not in out.stdout, out.stdout  # neither looks dead to the other
        for i, name in enumerate(names):
            photo(inbox / name, seed=60 + i, size=(64, 48))
        wait_for(lambda: sum(j.state == DONE for j in ledger.jobs()) == len(names), timeout=300, interval=0.5,
                 what="every photo done")
    finally:
        for node in nodes:
            node.stop()
    logs = "\n".join(node.output() for node in nodes)
    assert "lease ended" not in logs and "refused:" not in logs, logs[-3000:]
    assert all(j.attempts == 1 for j in ledger.jobs()), [(j.rel_path, j.attempts, j.error) for j in ledger.jobs()]
    assert sorted(p.parent.name for p in reports(outbox)) == sorted(Path(n).stem for n in names)


def test_a_node_that_mounts_the_share_elsewhere_leaves_the_others_photos_alone(tmp_path: Path,
                                                                               smoke_model_path: Path,
                                                                               pg_server) -> None:
    """One Mac mounts the studio's share as `/Volumes/Studio-1` (macOS does, when the name is taken): its inbox path
    differs from the others'. It claimed their photos, found them "no longer the inbox" and failed them for good.
    It now claims only photos under its own inbox (and its own API spool)."""
    url = pg_server.new_database()
    homes, inbox, outbox = _homes(tmp_path, url, 1, smoke_model_path)
    elsewhere = tmp_path / "Studio-1"
    (elsewhere / "inbox").mkdir(parents=True)
    homes.append(make_home(tmp_path / "node1", smoke_model_path, inbox=str(elsewhere / "inbox"),
                           outbox=str(elsewhere / "outbox"), ledger_url=url, **FAST))
    ledger = Ledger(homes[0] / "var" / "ledger.db", url=url)
    nodes = [Daemon(home, smoke_model_path) for home in homes]
    names = [f"shot{i}.jpg" for i in range(6)]
    try:
        wait_for(lambda: len(ledger.workers()) == 2, timeout=120, what="both nodes' heartbeats")
        for i, name in enumerate(names):
            photo(inbox / name, seed=80 + i, size=(64, 48))
        photo(elsewhere / "inbox" / "theirs.jpg", seed=90, size=(64, 48))
        wait_for(lambda: sum(j.state == DONE for j in ledger.jobs()) == len(names) + 1, timeout=300, interval=0.5,
                 what="every photo done")
    finally:
        for node in nodes:
            node.stop()
    jobs = ledger.jobs()
    assert all(j.state == DONE for j in jobs), [(j.rel_path, j.state, j.error) for j in jobs]
    assert sorted(p.parent.name for p in reports(outbox)) == sorted(Path(n).stem for n in names)
    assert [p.parent.name for p in reports(elsewhere / "outbox")] == ["theirs"]


def test_two_copies_published_by_two_nodes_at_the_same_moment_get_one_report(tmp_path: Path,
                                                                             smoke_model_path: Path,
                                                                             pg_server) -> None:
    """A photo and its copy, each analysed by another Mac, both about to publish at the same moment: each had looked
    for the other's report before and found none, so both published. The second reservation of the same photo and
    context now finds the first: one report, the other a duplicate of it."""
    url = pg_server.new_database()
    homes, inbox, outbox = _homes(tmp_path, url, 2, smoke_model_path)
    ledger = Ledger(homes[0] / "var" / "ledger.db", url=url)
    nodes = [Daemon(home, smoke_model_path, MONDRIAN_TEST_STOP_AT="staged") for home in homes]
    try:
        wait_for(lambda: len(ledger.workers()) == 2, timeout=120, what="both nodes' heartbeats")
        photo(inbox / "card-a.jpg", seed=77, size=(64, 48))
        wait_for(lambda: sum(_stopped(n) for n in nodes) == 1, timeout=300, what="one node holding card-a staged")
        (inbox / "card-b.jpg").write_bytes((inbox / "card-a.jpg").read_bytes())
        wait_for(lambda: all(_stopped(n) for n in nodes), timeout=300, what="the other holding card-b staged")
        for node in nodes:
            node.signal(signal.SIGCONT)
        by_name = lambda: {j.rel_path: j for j in ledger.jobs()}  # noqa: E731
        wait_for(lambda: {j.state for j in by_name().values()} == {DONE}, timeout=120, interval=0.3,
                 what="both copies settled")
    finally:
        for node in nodes:
            if node.proc.poll() is None:
                node.signal(signal.SIGCONT)
                node.stop()
    jobs = by_name()
    assert sorted(j.duplicate_of is None for j in jobs.values()) == [False, True], \
        {n: (j.duplicate_of, j.output_dir) for n, j in jobs.items()}
    first = next(j for j in jobs.values() if j.duplicate_of is None)
    assert [r.parent.name for r in reports(outbox)] == [Path(first.rel_path).stem]


def _signed_by(job, node: Daemon) -> bool:
    return bool(job.worker) and job.worker.split(":")[1] == str(node.proc.pid)


def test_a_node_that_reaches_the_share_by_another_path_refuses_to_start(tmp_path: Path, smoke_model_path: Path,
                                                                        pg_server) -> None:
    """The same share mounted as `/Volumes/Studio-1` on one Mac (a bind mount here: the same folder under another
    path). It queued every photo again under its own path, and each copy the others took first ended on it as
    "removed before analysis". It now refuses to start, naming both paths and what to do."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount the share a second time (a bind mount)")
    url = pg_server.new_database()
    homes, inbox, outbox = _homes(tmp_path, url, 1, smoke_model_path)
    studio1 = tmp_path / "Studio-1"
    studio1.mkdir()
    if subprocess.run(["mount", "--bind", str(tmp_path / "share"), str(studio1)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here")
    try:
        other = make_home(tmp_path / "node1", smoke_model_path, inbox=str(studio1 / "inbox"),
                          outbox=str(studio1 / "outbox"), ledger_url=url, **FAST)
        ledger = Ledger(homes[0] / "var" / "ledger.db", url=url)
        with Daemon(homes[0], smoke_model_path) as first:
            wait_for(lambda: len(ledger.workers()) == 1 and (outbox / ".nodes").is_dir(), timeout=120,
                     what="the first node's heartbeat and mark")
            photo(inbox / "shot.jpg", seed=5, size=(64, 48))
            second = Daemon(other, smoke_model_path)
            assert second.wait(120) == 78, second.output()
            said = second.output()
            assert "reaches the studio's outbox as" in said, said
            assert str(outbox) in said and str(studio1 / "outbox") in said, said
            assert "Traceback" not in said
            wait_for(lambda: [j.state for j in ledger.jobs()] == [DONE], timeout=300, what="the photo done")
            assert first.proc.poll() is None, "the node on the right path carries on"
            assert not any(_signed_by(j, second) for j in ledger.jobs())
            assert len(ledger.jobs()) == 1, "queued once, under the first node's path"
            first.stop()
    finally:
        subprocess.run(["umount", "-l", str(studio1)], capture_output=True)


def _unshared(folder: Path) -> list[str]:
    """A command prefix: the daemon in a mount namespace of its own, where `folder` is an empty local folder (the
    share not mounted on that Mac, a folder of the same name in its place)."""
    return ["unshare", "-m", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs none "$0" && mkdir "$0/inbox" && exec "$@"', str(folder)]


def test_a_node_whose_share_is_not_mounted_refuses_to_start(tmp_path: Path, smoke_model_path: Path,
                                                           pg_server) -> None:
    """The share not mounted on one Mac, a local folder at its path: that Mac took the others' photos, found them
    missing, and recorded them as removed. Its outbox lacks the live nodes' marks, so it now refuses to start."""
    if os.geteuid() != 0 or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("needs root and unshare(1) for a mount namespace")
    url = pg_server.new_database()
    homes, inbox, outbox = _homes(tmp_path, url, 2, smoke_model_path)
    ledger = Ledger(homes[0] / "var" / "ledger.db", url=url)
    quick = dict(MONDRIAN_TEST_SHARE_SETTLE_SECONDS="1")
    with Daemon(homes[0], smoke_model_path, **quick) as first:
        wait_for(lambda: len(ledger.workers()) == 1, timeout=120, what="the first node's heartbeat")
        time.sleep(1.5)  # its mark is older than a share's listing may lag behind
        second = Daemon(homes[1], smoke_model_path, wrap=_unshared(tmp_path / "share"), **quick)
        assert second.wait(120) == 78, second.output()
        said = second.output()
        assert f"{outbox} on this Mac is not the outbox that" in said and "not mounted" in said, said
        assert first.proc.poll() is None
        first.stop()


def test_a_mark_deleted_from_outside_stops_no_node(tmp_path: Path, smoke_model_path: Path, pg_server) -> None:
    """Someone empties the outbox's hidden folders while two nodes run: each puts its mark back within a beat, and
    the other, which looks twice before it concludes, carries on."""
    url = pg_server.new_database()
    homes, inbox, outbox = _homes(tmp_path, url, 2, smoke_model_path)
    ledger = Ledger(homes[0] / "var" / "ledger.db", url=url)
    quick = dict(MONDRIAN_TEST_SHARE_SETTLE_SECONDS="1")
    nodes = [Daemon(home, smoke_model_path, **quick) for home in homes]
    try:
        wait_for(lambda: len(ledger.workers()) == 2 and len(list((outbox / ".nodes").glob("*"))) == 2, timeout=120,
                 what="both nodes' heartbeats and marks")
        for _ in range(3):
            shutil.rmtree(outbox / ".nodes")
            time.sleep(8)
        wait_for(lambda: len(list((outbox / ".nodes").glob("*"))) == 2, timeout=30, what="both marks put back")
        photo(inbox / "after.jpg", seed=9, size=(64, 48))
        wait_for(lambda: [j.state for j in ledger.jobs()] == [DONE], timeout=300, what="the photo done")
        assert all(n.proc.poll() is None for n in nodes), [n.output()[-2000:] for n in nodes]
    finally:
        for node in nodes:
            node.stop()
    assert list((outbox / ".nodes").iterdir()) == [], "a node that stops takes its mark away"


def test_a_photo_whose_twin_was_published_in_another_macs_own_outbox_gets_its_own_report(tmp_path: Path,
                                                                                          smoke_model_path: Path,
                                                                                          pg_server) -> None:
    """Two Macs on one ledger, each with an inbox and outbox of its own (the README allows it): the same photo
    dropped on the second was filed as a duplicate pointing at the first Mac's private outbox, a page on another
    computer, so its photographer got no critique. A twin's report stands only where this Mac publishes."""
    url = pg_server.new_database()
    homes = [make_home(tmp_path / f"mac{i}", smoke_model_path, ledger_url=url, **FAST) for i in range(2)]
    for i, home in enumerate(homes):
        photo(home / "inbox" / f"shot-{i}.jpg", seed=5, size=(64, 48))  # the same bytes on both Macs
        with Daemon(home, smoke_model_path, "--once") as node:
            assert node.wait(180) == 0, node.output()
    for i, home in enumerate(homes):
        assert [p.parent.name for p in reports(home / "outbox")] == [f"shot-{i}"], i
        assert not (home / "outbox" / "duplicates").exists(), list((home / "outbox" / "duplicates").iterdir())
    # On one Mac, a copy of the photo is still its duplicate there.
    photo(homes[1] / "inbox" / "copy.jpg", seed=5, size=(64, 48))
    with Daemon(homes[1], smoke_model_path, "--once") as node:
        assert node.wait(180) == 0, node.output()
    record = json.loads((homes[1] / "outbox" / "duplicates" / "copy.jpg.duplicate.json").read_text())
    assert record["report"] == "../shot-1/report.html", record  # beside it in this outbox


def test_retry_on_one_mac_names_the_other_macs_outbox_for_its_failures(tmp_path: Path, smoke_model_path: Path,
                                                                      pg_server) -> None:
    """A failure kept in another Mac's own outbox was called "a folder on its way back into the inbox is a link to
    somewhere else". It is that Mac's to retry, and the line says so."""
    url = pg_server.new_database()
    homes = [make_home(tmp_path / f"mac{i}", smoke_model_path, ledger_url=url, **FAST) for i in range(2)]
    (homes[0] / "inbox" / "bad.jpg").write_bytes(b"not a photo at all")
    with Daemon(homes[0], smoke_model_path, "--once") as node:
        assert node.wait(180) == 0, node.output()
    kept = homes[0] / "outbox" / "failed" / "bad.jpg"
    assert kept.exists()
    out = mondrian(homes[1], smoke_model_path, "retry", "--failed", "--all")
    said = out.stdout + out.stderr
    assert f"bad.jpg waits in {kept.parent.resolve()}, not in this outbox's failed/" in said, said
    assert "link" not in said and kept.exists()
    out = mondrian(homes[0], smoke_model_path, "retry", "--failed", "--all")
    assert out.returncode == 0 and (homes[0] / "inbox" / "bad.jpg").exists(), out.stdout + out.stderr


def test_photos_dropped_while_the_ledger_server_is_down_are_queued_once_it_is_back_without_a_traceback(
        tmp_path: Path, smoke_model_path: Path, pg_server) -> None:
    """Each photo the watcher saw settle while the server was restarting logged "could not queue" with a traceback
    (psycopg's AdminShutdown); it is one line now, and the next rescan queues it."""
    import threading

    url = pg_server.new_database()
    homes, inbox, outbox = _homes(tmp_path, url, 1, smoke_model_path)
    ledger = Ledger(homes[0] / "var" / "ledger.db", url=url)
    node = Daemon(homes[0], smoke_model_path)
    names = [f"down{i}.jpg" for i in range(3)]

    def drop_meanwhile() -> None:
        for i, name in enumerate(names):
            time.sleep(0.4)  # the server is stopping or stopped now: each settles while it is down
            photo(inbox / name, seed=20 + i, size=(64, 48))

    try:
        wait_for(lambda: "model ready" in node.output(), timeout=120, what="the model")
        wait_for(lambda: len(ledger.workers()) == 1, timeout=120, what="the node's heartbeat")
        ledger.close()
        dropper = threading.Thread(target=drop_meanwhile)
        dropper.start()
        pg_server.bounce(down_s=4.0)
        dropper.join()
        wait_for(lambda: sum(j.state == DONE for j in ledger.jobs()) == len(names), timeout=240, interval=0.5,
                 what="every photo done after the restart")
    finally:
        node.stop()
    log = node.output()
    assert "Traceback" not in log, log[log.find("Traceback") - 1500:log.find("Traceback") + 2500]
    assert sorted(p.parent.name for p in reports(outbox)) == sorted(Path(n).stem for n in names)


def test_a_photo_over_2_gib_is_queued_on_a_shared_ledger_and_fails_saying_why(tmp_path: Path, smoke_model_path: Path,
                                                                                pg_server) -> None:
    """Attack: PostgreSQL's INTEGER stops at 2 GiB, so a 3 GiB panorama could not be queued on a shared ledger: no
    report, no failure, and every rescan tried again. It is queued, and fails for its size like on one Mac."""
    url = pg_server.new_database()
    home = make_home(tmp_path / "mac", smoke_model_path, ledger_url=url, **FAST)
    with open(home / "inbox" / "pano.tif", "wb") as f:
        f.truncate(3 << 30)  # sparse: no disk spent
    photo(home / "inbox" / "small.jpg", seed=1, size=(64, 48))
    with Daemon(home, smoke_model_path, "--once") as node:
        assert node.wait(180) == 0, node.output()
    assert [p.parent.name for p in reports(home / "outbox")] == ["small"]
    failure = json.loads((home / "outbox" / "failed" / "pano.tif.error.json").read_text())
    assert failure["cause"] == "too_large" and "max_file_mb" in failure["reason"], failure
    [job] = [j for j in Ledger(home / "var" / "ledger.db", url=url).jobs() if j.rel_path == "pano.tif"]
    assert job.size == 3 << 30


def test_an_upload_is_claimed_only_by_the_mac_whose_spool_holds_it_even_where_homes_share_a_path(
        tmp_path: Path, smoke_model_path: Path, pg_server) -> None:
    """Attack: two Macs whose homes have the same path (one studio account, `~/Pictures/Mondrian` on each) share a
    ledger. An upload to one Mac waits in that Mac's spool, yet the other claimed it by its path, found nothing
    there, and the photo was recorded as gone while it still lay on the first Mac. Each Mac's uploads are named
    after its own var/ now, and only it claims them. (The second Mac: a mount namespace of its own where var/ is
    another folder at the same path.)"""
    if os.geteuid() != 0 or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("needs root and unshare(1) for a mount namespace")
    from tests.test_api import curl, free_port

    url = pg_server.new_database()
    port = free_port()
    home = make_home(tmp_path / "home", smoke_model_path, ledger_url=url, api_port=port, **FAST)
    other_var = tmp_path / "other-mac-var"
    other_var.mkdir()
    own_var = ["unshare", "-m", "--propagation", "private", "sh", "-c",
               'mount --bind "$0" "$1" && shift && exec "$@"', str(other_var), str(home / "var")]
    ledger = Ledger(home / "var" / "ledger.db", url=url)
    photo(home / "inbox" / "slow.jpg", seed=1, size=(64, 48))
    with Daemon(home, smoke_model_path, MONDRIAN_TEST_TOKEN_SECONDS="0.1") as first:
        wait_for(lambda: any(j.state == "running" for j in ledger.jobs()), 120, what="the first Mac busy")
        second = Daemon(home, smoke_model_path, wrap=own_var, MONDRIAN_API_PORT="0")
        with second:
            wait_for(lambda: len(ledger.workers()) == 2 or second.proc.poll() is not None, 120,
                     what="the second Mac's heartbeat")
            assert second.proc.poll() is None, second.output()
            code, _, body = curl(f"http://127.0.0.1:{port}/analyze", "-F",
                                 f"image=@{photo(tmp_path / 'sent.jpg', seed=2, size=(64, 48))}")
            assert code in (200, 202), body
            job_id = json.loads(body)["job_id"]
            wait_for(lambda: ledger.get(job_id).state in ("done", "failed", "gone"), 300, what="the upload finished")
            job = ledger.get(job_id)
            assert job.state == "done", (job.state, job.error, second.output()[-2000:])
            assert _signed_by(job, first) and not _signed_by(job, second), job.worker
            second.stop()
        first.stop()
    assert (home / "outbox" / "sent" / "report.json").exists()


def test_health_tells_this_macs_model_not_the_last_one_another_mac_loaded(tmp_path: Path, smoke_model_path: Path,
                                                                         pg_server) -> None:
    """Attack: /health read the model from the shared ledger, where the last Mac to load one writes it: a Mac whose
    model was ready answered `loaded: false` with another Mac's load error (and the other way round)."""
    from tests.test_api import curl, free_port, wait_until_serving

    url = pg_server.new_database()
    port = free_port()
    serving = make_home(tmp_path / "mac0", smoke_model_path, ledger_url=url, api_port=port, **FAST)
    broken = make_home(tmp_path / "mac1", smoke_model_path, ledger_url=url, api_port=0, **FAST)
    damaged = tmp_path / "damaged-model"
    shutil.copytree(smoke_model_path, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with Daemon(serving, smoke_model_path) as first:
        wait_until_serving(first, port)
        with Daemon(broken, damaged) as second:
            wait_for(lambda: "could not load the model" in second.output(), 120, what="the other Mac's failed load")
            # the shared ledger's last word on the model is now the other Mac's failure
            shared = Ledger(serving / "var" / "ledger.db", url=url)
            wait_for(lambda: shared.events()["model"][0].get("loaded") is False, 30, what="the other Mac's model event")
            shared.close()
            code, _, body = curl(f"http://127.0.0.1:{port}/health")
            model = json.loads(body)["model"]
            assert code == 200 and model["loaded"] is True and "error" not in model, model
            assert model["id"] == str(smoke_model_path) or model["configured"] == str(smoke_model_path), model
            second.stop()
        first.stop()


def test_an_upload_queued_before_spool_folders_were_tagged_is_still_taken(tmp_path: Path, smoke_model_path: Path,
                                                                          pg_server) -> None:
    """An upload queued on a shared ledger by an earlier Mondrian waits in a folder named without this Mac's tag:
    after the upgrade no Mac matched it, and it stayed queued for ever. This Mac takes its own such folders."""
    url = pg_server.new_database()
    home = make_home(tmp_path / "home", smoke_model_path, ledger_url=url, **FAST)
    slot = home / "var" / "spool" / "0123456789abcdef"
    shot = photo(slot / "sent.jpg", seed=4, size=(64, 48))
    ledger = Ledger(home / "var" / "ledger.db", url=url)
    st = shot.stat()
    ledger.enqueue_upload(shot, "api/sent.jpg", "ansel", "default", "baseline", st.st_size, st.st_mtime)
    with Daemon(home, smoke_model_path, "--once") as node:
        assert node.wait(180) == 0, node.output()
    assert [j.state for j in ledger.jobs()] == [DONE], [(j.state, j.error) for j in ledger.jobs()]
    assert (home / "var" / "spool-tag").read_text().strip() != "01234567"
