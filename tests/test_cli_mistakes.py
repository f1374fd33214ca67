"""Mistakes people make setting Mondrian up, each caught before it does harm: a home inside its own inbox, the ledger
named as a folder, an empty value from an unset shell variable, a model folder named relative to the home, an API
host left empty. Each is one line on the terminal and an exit code a service manager reads right."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO, env_for, make_home, mondrian, photo

FAST = dict(max_pixels=56 * 56, comment_max_chars=8, max_tokens=400, quiet_seconds=0.2, rescan_seconds=1,
            api_port=0)


def _one_line(out: subprocess.CompletedProcess) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip() and " INFO " not in line]  # e.g. BLAS loaded
    assert "Traceback" not in out.stderr and len(lines) == 1, out.stderr
    return lines[0]


def _add(home: Path, line: str) -> None:
    with (home / "mondrian.toml").open("a", encoding="utf-8") as f:
        f.write(line + "\n")


def test_a_home_inside_its_own_inbox_is_refused_before_its_settings_are_moved_out(tmp_path, smoke_model_path):
    shared = tmp_path / "Dropbox"  # the studio points the inbox at a synced folder that holds the home
    home = make_home(shared / "mondrian", smoke_model_path, **FAST)
    elsewhere = tmp_path / "elsewhere"
    for key in ("outbox", "var_dir", "adapters_dir", "advisors_dir"):
        _add(home, f'{key} = "{elsewhere / key}"')
    _add(home, f'inbox = "{shared}"')
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=60)
    assert out.returncode == 78, out.stderr
    assert "is inside the inbox" in _one_line(out) and "mondrian.toml" in out.stderr
    assert (home / "mondrian.toml").is_file()  # not taken for a photo and moved to failed/
    assert not (elsewhere / "outbox" / "failed").exists()


def test_the_ledger_named_as_one_of_mondrians_folders_is_refused(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    _add(home, 'db_path = "var"')
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=60)
    assert out.returncode == 78, out.stderr
    line = _one_line(out)
    assert "db_path is the ledger's file" in line and str(home / "var" / "ledger.db") in line, line
    assert "mv " not in line  # the advice to move var/ away would only bring the same error back


def test_a_settings_file_linked_to_somewhere_not_there_is_refused_not_taken_for_no_settings(tmp_path,
                                                                                              smoke_model_path):
    """mondrian.toml as a link into a synced folder or a drive that is not mounted: every command ran on the
    defaults (another inbox, a local ledger instead of the studio's `ledger_url`) without a word."""
    home = make_home(tmp_path / "home", smoke_model_path, max_pixels=56 * 56)
    settings = home / "mondrian.toml"
    settings.rename(tmp_path / "kept.toml")
    settings.symlink_to(tmp_path / "Volumes" / "Studio" / "mondrian.toml")
    for command in (["status"], ["run", "--once"], ["init", str(home)]):
        out = mondrian(home, smoke_model_path, *command, timeout=60)
        assert out.returncode == 78, (command, out.stdout, out.stderr)
        assert "mondrian.toml is a link to" in out.stderr and "which is not there" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    settings.unlink()
    (tmp_path / "kept.toml").rename(settings)
    assert mondrian(home, smoke_model_path, "status", timeout=60).returncode == 0


def test_a_folder_setting_naming_a_file_is_refused_not_called_a_missing_drive(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, max_pixels=56 * 56)
    _add(home, 'inbox = "mondrian.toml"')
    out = mondrian(home, smoke_model_path, "status", timeout=60)
    assert out.returncode == 78 and "is a file, not a folder; name a folder for inbox" in _one_line(out), out.stderr


def test_an_empty_api_host_is_refused_rather_than_serving_every_network(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, max_pixels=56 * 56)
    _add(home, 'api_host = ""')
    out = mondrian(home, smoke_model_path, "status", timeout=60)
    assert out.returncode == 78 and "api_host is empty" in _one_line(out), out.stderr


def test_a_model_folder_named_in_mondrian_toml_is_the_homes_wherever_the_command_runs(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", None, **FAST)
    shutil.copytree(smoke_model_path, home / "models" / "smoke")
    _add(home, 'model = "models/smoke"')
    shot = photo(tmp_path / "shot.jpg", seed=3, size=(64, 48))
    env = env_for(home, smoke_model_path)
    env.pop("MONDRIAN_MODEL")
    out = subprocess.run([sys.executable, "-m", "daemon", "analyze", str(shot), "--json"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)  # not the home
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.splitlines()[-1])
    assert report["state"] == "done", report


def test_an_empty_value_is_a_mistake_not_the_default(tmp_path, smoke_model_path):
    cwd = tmp_path / "somewhere"
    cwd.mkdir()
    env = env_for(tmp_path / "home", smoke_model_path)
    env.pop("MONDRIAN_HOME")  # the default home would then be the checkout Mondrian runs from
    before = (REPO / "mondrian.toml").exists()  # `make demo` makes the checkout a home: it may be one already
    for args, said in ((["init", ""], "the path is empty"), (["--home", "", "status"], "--home is empty"),
                       (["analyze", "--advisor", "", "x.jpg"], "--advisor is empty"),
                       (["analyze", "--mode", " ", "x.jpg"], "--mode is empty")):
        out = subprocess.run([sys.executable, "-m", "daemon", *args], env=env, cwd=cwd, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 2 and said in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
    assert not list(cwd.iterdir()) and (REPO / "mondrian.toml").exists() == before  # no home was made anywhere


def test_model_smoke_builds_inside_a_folder_that_holds_other_things_and_says_so_for_a_file(tmp_path,
                                                                                          smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    models = tmp_path / "models"
    models.mkdir()
    (models / "notes.txt").write_text("mine")
    out = mondrian(home, smoke_model_path, "model", "smoke", "--dest", str(models), timeout=300)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == models / "smoke-qwen2-vl" and (models / "smoke-qwen2-vl" / "config.json").is_file()
    assert (models / "notes.txt").read_text() == "mine"
    out = mondrian(home, smoke_model_path, "model", "smoke", "--dest", str(models / "notes.txt"), timeout=60)
    assert out.returncode == 2 and "is a file" in out.stderr and "Traceback" not in out.stderr, out.stderr
    # A folder Mondrian cannot make (under a file, as under a read-only or unplugged drive): one line, exit 74.
    out = mondrian(home, smoke_model_path, "model", "smoke", "--dest", str(models / "notes.txt" / "m" / "x"),
                   timeout=60)
    assert out.returncode == 74 and "NotADirectoryError" in _one_line(out), out.stderr
    assert os.path.isfile(models / "notes.txt")


def test_init_names_a_home_whose_name_is_not_utf8_so_pasting_it_works(tmp_path, smoke_model_path):
    home = tmp_path / os.fsdecode(b"caf\xe9 home")  # Latin-1 bytes: a name Linux allows (a copy from an old disk)
    env = env_for(home, smoke_model_path)
    env.pop("MONDRIAN_HOME")
    out = subprocess.run([sys.executable, "-m", "daemon", "init", str(home)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.strip().startswith("mondrian --home"))
    word = re.match(r"mondrian --home (\$'[^']*'|'[^']*'|\S+) ", line.strip()).group(1)
    pasted = subprocess.run(["bash", "-c", f"{sys.executable} -m daemon --home {word} status"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert pasted.returncode == 0 and "no Mondrian home" not in pasted.stderr, (word, pasted.stderr)


def test_init_inside_another_homes_inbox_is_refused_and_the_suggested_place_works(tmp_path, smoke_model_path):
    """`mondrian init ~/Mondrian/inbox/studio2` made a home whose mondrian.toml the first home's daemon took for a
    photo and failed, its empty folders left in that inbox."""
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    # Inside advisors/ (an advisor's references folder), its inbox photos were indexed as that advisor's references.
    for inside in ("inbox", "outbox", "var", "advisors", "adapters"):
        target = home / inside / "studio2"
        out = mondrian(home, smoke_model_path, "init", str(target))
        assert out.returncode == 78 and "Traceback" not in out.stderr, out.stderr
        assert f"is inside the {inside} of the Mondrian home {home}" in _one_line(out), out.stderr
        assert not target.exists()
    [suggested] = re.findall(r"`mondrian init ([^`]+)`", _one_line(out))
    pasted = subprocess.run(["bash", "-c", f"{sys.executable} -m daemon init {suggested}"], cwd=REPO,
                            env=env_for(home, smoke_model_path), capture_output=True, text=True, timeout=60)
    assert pasted.returncode == 0 and (tmp_path / "studio2" / "mondrian.toml").is_file(), pasted.stderr
    assert sorted(p.name for p in (home / "inbox").iterdir()) == []
    # A home `run` or `demo` made has no mondrian.toml, only its ledger: still a home to stay out of.
    (home / "mondrian.toml").unlink()
    assert mondrian(home, smoke_model_path, "status").returncode == 0  # makes var/ledger.db, as `run` would
    out = mondrian(home, smoke_model_path, "init", str(home / "inbox" / "studio3"))
    assert out.returncode == 78 and "is inside the inbox of the Mondrian home" in out.stderr, out.stderr


def test_an_advisor_typed_with_a_capital_is_the_advisor_as_in_the_api_and_the_inbox(tmp_path, smoke_model_path):
    """`--advisor Cartier` (a name is written with a capital) names cartier on every command, as `advisor=Cartier`
    does in the API and `inbox/Cartier/` does in the inbox; it was refused as "not an advisor id"."""
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    for argv in (("references", "list", "--advisor", "Cartier"), ("references", "list", "--advisor", "ANSEL"),
                 ("adapters", "--advisor", "Cartier")):
        out = mondrian(home, smoke_model_path, *argv, timeout=60)
        assert out.returncode == 0 and "not an advisor id" not in out.stderr, (argv, out.stderr)


def test_init_given_both_home_and_path_says_which_it_made(tmp_path, smoke_model_path):
    """`mondrian --home A init B` made B in silence; one of the two is likely a slip."""
    a, b = tmp_path / "a", tmp_path / "b"
    out = subprocess.run([sys.executable, "-m", "daemon", "--home", str(a), "init", str(b)], cwd=REPO,
                         env=env_for(a, smoke_model_path), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and (b / "mondrian.toml").is_file() and not a.exists(), out.stderr
    assert f"the home made is the PATH given to init: {b}" in out.stderr, out.stderr


def test_the_smoke_model_on_a_full_disk_says_where_and_what_to_do(tmp_path, smoke_model_path):
    """Building the smoke model on a full disk ended in MLX's traceback ("[write] Unable to write 75841 bytes to
    file."); in `run` every photo then spent its tries on it. One line naming the folder, exit 78."""
    from tests.test_faults import _mount, _umount
    from tests.test_resilience import _fill

    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    full = tmp_path / "full"
    full.mkdir()
    if _mount("-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(full)).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        # var/ (where the smoke model is built) on the full disk, the ledger beside the home
        home = make_home(tmp_path / "home", smoke_model_path, max_pixels=56 * 56, var_dir=str(full / "var"),
                         db_path=str(tmp_path / "ledger.db"))
        photo(home / "inbox" / "a.jpg", seed=1, size=(64, 48))
        _fill(full)
        out = mondrian(home, smoke_model_path, "model", "smoke", "--dest", str(full / "m"), timeout=120)
        assert out.returncode == 78 and "Traceback" not in out.stderr, out.stderr
        assert f"could not build the smoke model in {full}" in out.stderr and "df -h" in out.stderr, out.stderr
        # `run` on that home stops at once (its var/ is full), saying to free space, before any photo is touched
        out = mondrian(home, smoke_model_path, "run", "--once", timeout=120, MONDRIAN_MODEL="smoke")
        assert out.returncode == 78 and "Traceback" not in out.stderr, out.stderr
        assert "No space left on device" in out.stderr and "Free some space" in out.stderr, out.stderr
        assert (home / "inbox" / "a.jpg").exists()
    finally:
        _umount(full)


def test_ctrl_c_while_a_command_starts_is_no_traceback(tmp_path) -> None:
    """Ctrl-C in the first half second of a command (while it reads its command line and imports what it runs)
    printed a Python traceback; the README says Ctrl-C stops it cleanly."""
    import subprocess
    import sys

    script = ("import importlib, os, signal, sys\n"
              "m = importlib.import_module('daemon.cli.main')\n"
              # as a terminal leaves it: a suite started in the background runs with SIGINT ignored, inherited
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
              "signal.signal(signal.SIGALRM, lambda *a: os.kill(os.getpid(), signal.SIGINT))\n"
              "signal.setitimer(signal.ITIMER_REAL, 0.002)\n"
              f"sys.exit(m.main(['--home', {str(tmp_path / 'home')!r}, 'status']))\n")
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                             cwd=Path(__file__).resolve().parents[1])
        assert out.returncode == 130 and "Traceback" not in out.stderr, (out.returncode, out.stderr[-2000:])


def test_a_homes_inbox_given_as_the_home_names_the_home_not_init(tmp_path, smoke_model_path) -> None:
    """`--home ~/Mondrian/inbox`: status advised `init ~/Mondrian/inbox`, which `init` itself refuses (it lies in
    that home's inbox). It names the home the folder belongs to."""
    from tests.harness import make_home, mondrian

    home = make_home(tmp_path / "home", smoke_model_path)
    out = mondrian(home / "inbox", smoke_model_path, "status")
    assert out.returncode == 78 and f"--home {home}" in out.stderr and " init " not in out.stderr, out.stderr
    assert not (home / "inbox" / "inbox").exists()


def test_an_advisor_id_that_is_not_one_is_quoted_whole(tmp_path, smoke_model_path) -> None:
    """`references list --advisor 'Bad Id'` said `bad id' is not an advisor id`: its opening quote was stripped."""
    from tests.harness import make_home, mondrian

    home = make_home(tmp_path / "home", smoke_model_path)
    for command in (["references", "list"], ["references", "index"]):
        out = mondrian(home, smoke_model_path, *command, "--advisor", "Bad Id")
        assert out.returncode == 2 and "'bad id' is not an advisor id" in out.stderr, (command, out.stderr)


def test_a_bad_value_on_trains_command_line_is_blamed_on_the_command_line(tmp_path, smoke_model_path) -> None:
    """`train --iters -5` said "[lora] iters = -5 in …/mondrian.toml", a file that has no such line."""
    from tests.harness import make_home, mondrian

    home = make_home(tmp_path / "home", smoke_model_path)
    out = mondrian(home, smoke_model_path, "train", "--advisor", "ansel", "--iters", "-5")
    assert out.returncode == 78 and "--iters -5 on the command line" in out.stderr, out.stderr
    assert "mondrian.toml" not in out.stderr, out.stderr


def test_analyze_with_a_home_that_is_not_there_makes_none(tmp_path, smoke_model_path) -> None:
    """`mondrian --home ~/Mondrain analyze shot.jpg` made a whole new home at the typo and filed the report there,
    while every other command refused a home that is not there. It refuses too, naming `init`, and makes nothing."""
    from tests.harness import make_home, mondrian, photo

    home = make_home(tmp_path / "home", smoke_model_path)
    shot = photo(tmp_path / "shot.jpg", seed=4)
    typo = tmp_path / "hmoe"
    for how in ({"MONDRIAN_HOME": str(typo)}, {"--home": str(typo)}):
        args = ["--home", str(typo)] if "--home" in how else []
        out = mondrian(typo if not args else home, smoke_model_path, *args, "analyze", str(shot))
        assert out.returncode == 78 and f"no Mondrian home at {typo}" in out.stderr and " init " in out.stderr, \
            (how, out.stderr)
        assert not typo.exists() and shot.exists(), how
    # The home that is there takes it as before.
    out = mondrian(home, smoke_model_path, "analyze", str(shot), timeout=180)
    assert out.returncode == 0 and (home / "outbox" / "shot" / "report.json").is_file(), out.stderr[-2000:]


def test_init_of_a_home_a_daemon_serves_does_not_advise_running_another(tmp_path, smoke_model_path):
    """`mondrian init` run again on a live home listed `mondrian run` as the next step, which is then refused (the
    home is served already). It says a daemon serves it, and how to see what it does."""
    from tests.harness import Daemon, wait_for

    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    with Daemon(home, smoke_model_path) as d:
        wait_for(lambda: "model ready" in d.output(), 120, what="the daemon to start")
        out = mondrian(home, smoke_model_path, "init", str(home))
        assert out.returncode == 0, out.stderr
        assert f"A Mondrian daemon (pid {d.proc.pid}) already serves this home" in out.stdout, out.stdout
        assert " run " not in out.stdout and "status` shows what it is doing" in out.stdout, out.stdout
        assert d.stop() == 0
    assert " run " in mondrian(home, smoke_model_path, "init", str(home)).stdout  # not served: `run` is the step
