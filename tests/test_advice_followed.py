"""Mondrian's own advice, followed literally: each command a message tells a person to run is pasted exactly as
printed into a real shell (`bash -c`), from another folder, and must do what the message says. The entry point is
the one a person has: a checkout's `.venv/bin/mondrian` (not on PATH), or `mondrian` on PATH."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.harness import REPO, Daemon, ledger_jobs, make_home, photo, wait_for

ENTRY = REPO / ".venv" / "bin" / "mondrian"  # the checkout's entry point, as README.md has people run it


def _env(smoke_model_path: Path, path: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONDRIAN_") and k != "ANALYSIS_MODE"}
    env.update(MONDRIAN_MODEL=str(smoke_model_path), HF_HUB_OFFLINE="1", PATH=path, **extra)
    return env


def _bare_path() -> str:
    """A PATH with a shell's tools but no `mondrian` on it (a checkout whose venv is not activated)."""
    dirs = [d for d in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
            if d and not (Path(d) / "mondrian").exists()]
    return os.pathsep.join(dirs or ["/usr/bin", "/bin"])


def _path_with_mondrian(tmp_path: Path) -> str:
    """A PATH on which `mondrian` is this checkout's entry point (an installed or activated Mondrian)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "mondrian").symlink_to(ENTRY)
    return os.pathsep.join([str(bin_dir), _bare_path()])


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=180)


def _paste(line: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """The advised line, pasted into a shell as printed."""
    return _run(["bash", "-c", line], env, cwd)


def _commands(text: str, verb: str) -> list[str]:
    """The `...` spans of a message that run Mondrian's `verb`."""
    return [c for c in re.findall(r"`([^`]+)`", text) if re.search(rf"mondrian'?( --home .+)? {verb}( |$)", c)]


def test_a_checkouts_entry_point_off_path_names_itself_so_pasting_works(tmp_path, smoke_model_path):
    """`.venv/bin/mondrian status` in a checkout whose venv is not activated: the next step it prints must not be
    a bare `mondrian …` (bash: mondrian: command not found)."""
    home = make_home(tmp_path / "studio home", smoke_model_path)
    photo(home / "inbox" / "fixme.jpg", seed=3, size=(64, 48))
    (home / "inbox" / "fixme.mode").write_text("portrait\n")  # not a mode: the sidecar is what failed
    env = _env(smoke_model_path, _bare_path())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ran = _run([str(ENTRY), "--home", str(home), "run", "--once"], env, elsewhere)
    assert ran.returncode == 0, ran.stderr
    shown = _run([str(ENTRY), "--home", str(home), "status", "--json"], env, elsewhere)
    [failure] = json.loads(shown.stdout)["recent_failures"]
    [retry] = _commands(failure["next_step"], "retry")
    (home / "outbox" / "failed" / "fixme.mode").write_text("baseline\n")  # fixed, as the advice says
    pasted = _paste(retry, env, elsewhere)
    assert pasted.returncode == 0 and "fixme.jpg" in pasted.stdout, (retry, pasted.stdout, pasted.stderr)
    assert ledger_jobs(home)["fixme.jpg"].state == "queued"
    # The daemon line of the text status too: the command it names starts the daemon on this home.
    text = _run([str(ENTRY), "--home", str(home), "status"], env, elsewhere).stdout
    [run_cmd] = [c for c in _commands(text, "run")]
    pasted = _paste(run_cmd + " --once", env, elsewhere)
    assert pasted.returncode == 0, (run_cmd, pasted.stderr)
    assert ledger_jobs(home)["fixme.jpg"].state == "done"
    # With `mondrian` on PATH (installed, or the venv activated) the hint is the plain name.
    on_path = _env(smoke_model_path, _path_with_mondrian(tmp_path))
    plain = _run(["bash", "-c", f"mondrian --home '{home}' status"], on_path, elsewhere).stdout
    assert "`mondrian --home " in plain and str(ENTRY) not in plain, plain


def test_a_failed_analyze_says_which_photo_to_analyze_again(tmp_path, smoke_model_path):
    """A `mondrian analyze` photo that failed: `status` and `retry` say to analyse it again. A bare
    `mondrian analyze` is a usage error; the command must name the photo (and the --advisor it was given)."""
    home = make_home(tmp_path / "my home", smoke_model_path)
    pics = tmp_path / "shoot 'day 1'"
    photo(pics / "b.jpg", seed=8, size=(64, 48))
    (pics / "b.mode").write_text("portrait\n")
    env = _env(smoke_model_path, _path_with_mondrian(tmp_path))
    first = _paste(f"mondrian --home '{home}' analyze --advisor cartier b.jpg", env, pics)  # a relative path
    assert first.returncode != 0 and "portrait" in first.stderr + first.stdout, first
    shown = _paste(f"mondrian --home '{home}' status --json", env, tmp_path)
    [failure] = json.loads(shown.stdout)["recent_failures"]
    [again] = _commands(failure["next_step"], "analyze")
    assert "--advisor cartier" in again, again
    retried = _paste(f"mondrian --home '{home}' retry --failed {failure['job_id']}", env, tmp_path)
    assert _commands(retried.stdout + retried.stderr, "analyze")[-1] == again, retried
    # The failure record in the outbox (its page too) names no absolute path, but the photo and its --advisor.
    [failed] = [j for j in ledger_jobs(home).values() if j.state == "failed"]
    record = json.loads(Path(f"{failed.output_dir}.error.json").read_text())
    assert "run `mondrian analyze --advisor cartier b.jpg` again in the folder that holds it" in record[
        "next_step"], record

    (pics / "b.mode").write_text("baseline\n")  # fixed, as the advice says
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pasted = _paste(again, env, elsewhere)
    assert pasted.returncode == 0, (again, pasted.stdout, pasted.stderr)
    [done] = [j for j in ledger_jobs(home).values() if j.state == "done"]
    assert done.advisor == "cartier" and Path(done.source_path) == pics / "b.jpg", done


def test_a_file_given_as_the_home_gets_an_init_command_that_makes_a_usable_home(tmp_path, smoke_model_path):
    """MONDRIAN_HOME naming a file: the advice's `mondrian init …` names a real folder (a placeholder such as
    FOLDER, pasted, made a home called FOLDER wherever the shell was), and the home it makes works."""
    a_file = tmp_path / "notes é.txt"
    a_file.write_text("not a home\n")
    env = _env(smoke_model_path, _path_with_mondrian(tmp_path), MONDRIAN_HOME=str(a_file))
    refused = _paste("mondrian status", env, tmp_path)
    assert refused.returncode == 78, refused
    [init] = _commands(refused.stderr, "init")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    made = _paste(init, env, elsewhere)
    assert made.returncode == 0, (init, made.stdout, made.stderr)
    assert not list(elsewhere.iterdir()), f"{init!r} made {list(elsewhere.iterdir())} where the shell was"
    [use] = [line.strip().split("  #")[0] for line in made.stdout.splitlines() if line.strip().endswith(
        "start it at login instead")]
    status = _paste(use.replace("service install", "status"), env, elsewhere)
    assert status.returncode == 0 and "Mondrian home:" in status.stdout, (use, status.stdout, status.stderr)


def test_a_timed_out_photo_gets_the_time_limits_advice_in_status_and_it_works(tmp_path, smoke_model_path):
    """A photo that ran past `job_timeout_seconds`: status's next step said "fix the cause (disk, permissions), then
    retry", which, followed, only timed out again. It names the setting; raised, the pasted retry finishes it."""
    home = make_home(tmp_path / "home é", smoke_model_path, job_timeout_seconds=2)
    photo(home / "inbox" / "slow.jpg", seed=6, size=(64, 48))
    env = _env(smoke_model_path, _path_with_mondrian(tmp_path))
    ran = _run(["mondrian", "--home", str(home), "run", "--once"], {**env, "MONDRIAN_TEST_TOKEN_SECONDS": "0.5"},
               tmp_path)
    assert ran.returncode == 0, ran.stderr
    [failure] = json.loads(_paste(f"mondrian --home '{home}' status --json", env, tmp_path).stdout)["recent_failures"]
    assert "job_timeout_seconds" in failure["next_step"], failure
    # a running daemon reads its settings when it starts: the advice says to restart it, or the retry times out again
    assert "restart the daemon so it reads the new value" in failure["next_step"], failure
    assert f"`mondrian --home {shlex.quote(str(home))} service restart`" in failure["next_step"], failure
    settings = home / "mondrian.toml"
    settings.write_text(settings.read_text().replace("job_timeout_seconds = 2", "job_timeout_seconds = 600"))
    [retry] = _commands(failure["next_step"], "retry")
    pasted = _paste(retry, env, tmp_path)
    assert pasted.returncode == 0 and "slow.jpg" in pasted.stdout, (retry, pasted.stdout, pasted.stderr)
    assert _run(["mondrian", "--home", str(home), "run", "--once"], env, tmp_path).returncode == 0
    assert ledger_jobs(home)["slow.jpg"].state == "done"


def test_a_setting_given_by_the_environment_is_named_where_advice_says_to_change_it(tmp_path, smoke_model_path):
    """`MONDRIAN_JOB_TIMEOUT=1` (or `MONDRIAN_API_PORT`, baked into a service's unit) overrides mondrian.toml: advice
    to raise the value in mondrian.toml changed nothing. The advice names the variable that set it."""
    import socket

    home = make_home(tmp_path / "home", smoke_model_path)
    photo(home / "inbox" / "slow.jpg", seed=6, size=(64, 48))
    env = {**_env(smoke_model_path, _path_with_mondrian(tmp_path)), "MONDRIAN_JOB_TIMEOUT": "1"}
    ran = _run(["mondrian", "--home", str(home), "run", "--once"], {**env, "MONDRIAN_TEST_TOKEN_SECONDS": "0.5"},
               tmp_path)
    assert ran.returncode == 0, ran.stderr
    record = json.loads((home / "outbox" / "failed" / "slow.jpg.error.json").read_text())
    assert record["cause"] == "timeout", record
    assert "in the environment variable MONDRIAN_JOB_TIMEOUT, which overrides mondrian.toml" in record["next_step"]
    assert str(tmp_path) not in json.dumps(record), record  # the outbox's pages name no absolute path
    [failure] = json.loads(_paste(f"mondrian --home '{home}' status --json", env, tmp_path).stdout)["recent_failures"]
    assert "MONDRIAN_JOB_TIMEOUT" in failure["next_step"], failure
    # without the variable, the file is the place
    [failure] = json.loads(_paste(f"mondrian --home '{home}' status --json",
                                  {k: v for k, v in env.items() if k != "MONDRIAN_JOB_TIMEOUT"},
                                  tmp_path).stdout)["recent_failures"]
    assert f"`job_timeout_seconds` in {home / 'mondrian.toml'}" in failure["next_step"], failure

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        refused = _run(["mondrian", "--home", str(home), "run"], {**env, "MONDRIAN_API_PORT": str(port)}, tmp_path)
    assert refused.returncode == 78, refused.stderr
    assert "set api_port in the environment variable MONDRIAN_API_PORT, which overrides" in refused.stderr, \
        refused.stderr


def test_status_lists_the_known_advisors_for_an_unknown_advisor_folder(tmp_path, smoke_model_path):
    """A photo queued for an advisor whose definition went away: status's next step lists the advisors there are
    (it said "Known advisors: none")."""
    from daemon.ledger import Ledger

    home = make_home(tmp_path / "home", smoke_model_path)
    src = photo(home / "inbox" / "gone" / "p.jpg", seed=5, size=(64, 48))
    ledger = Ledger(home / "var" / "ledger.db")
    try:
        ledger.enqueue(src, "gone/p.jpg", "gone", "folder", src.stat().st_size, src.stat().st_mtime)
    finally:
        ledger.close()
    env = _env(smoke_model_path, _path_with_mondrian(tmp_path))
    ran = _paste(f"mondrian --home '{home}' run --once", env, tmp_path)
    assert ran.returncode == 0, ran.stderr
    [failure] = json.loads(_paste(f"mondrian --home '{home}' status --json", env, tmp_path).stdout)["recent_failures"]
    assert "Known advisors: ansel, cartier, leibovitz." in failure["next_step"], failure
    record = json.loads((home / "outbox" / "failed" / "p.jpg.error.json").read_text())
    assert "ansel, cartier, leibovitz" in record["what_to_do"], record



def test_status_of_a_home_on_a_drive_not_connected_says_connect_it_not_init_it(tmp_path, smoke_model_path):
    """`status` with a home on an external drive that is unplugged: the advice was "run `mondrian init <home>`",
    which, pasted, makes a plain folder where the drive mounts (macOS then mounts the drive as `Photos 1`). It says
    the drive is not connected, as `run` does; once it is, the same command works."""
    home = tmp_path / "Volumes" / "Photos" / "Mondrian"
    env = _env(smoke_model_path, _path_with_mondrian(tmp_path), HOME=str(tmp_path / "user"),
               XDG_DATA_HOME=str(tmp_path / "user" / "data"))
    command = f"mondrian --home '{home}' status"
    refused = _paste(command, env, tmp_path)
    assert refused.returncode == 78 and "not connected" in refused.stderr, refused.stderr
    assert "Connect it and run the command again" in refused.stderr, refused.stderr
    assert not (tmp_path / "Volumes").exists()
    assert "once it is connected" in refused.stderr, refused.stderr
    make_home(home, smoke_model_path)  # the drive, connected
    again = _paste(command, env, tmp_path)
    assert again.returncode == 0 and "Mondrian home:" in again.stdout, again.stderr


def test_init_on_a_drive_not_connected_makes_no_folder_where_it_mounts(tmp_path, smoke_model_path):
    """`mondrian init /Volumes/Photos/Mondrian` with the drive unplugged (the home `status` names, pasted before the
    drive is back) made /Volumes/Photos on the startup disk, where macOS then mounts the drive as `Photos 1`. Refused
    with what to do; nothing is made. (/mnt here, where Linux mounts drives.)"""
    import uuid

    drive = Path("/mnt") / f"mondrian-test-{uuid.uuid4().hex[:8]}"
    assert not drive.exists()
    env = _env(smoke_model_path, _path_with_mondrian(tmp_path))
    out = _paste(f"mondrian init '{drive}/Mondrian'", env, tmp_path)
    assert out.returncode == 78 and "not connected" in out.stderr and f"mkdir -p {drive}" in out.stderr, out.stderr
    assert not drive.exists()


def test_a_pattern_the_shell_did_not_expand_gets_a_command_the_shell_expands(tmp_path, smoke_model_path):
    """`mondrian analyze 'shoot x/*.jpg'` (quoted, so never expanded): the advice was `mondrian analyze FOLDER`, which
    pasted looks for a folder called FOLDER. It gives the pattern unquoted after its quoted folder; pasted, the shell
    expands it and its photos are analysed."""
    home = make_home(tmp_path / "home", smoke_model_path)
    shoot = tmp_path / "shoot x"
    for i in (1, 2):
        photo(shoot / f"p{i}.jpg", seed=20 + i, size=(64, 48))
    env = _env(smoke_model_path, _path_with_mondrian(tmp_path))
    refused = _paste(f"mondrian --home '{home}' analyze 'shoot x/*.jpg'", env, tmp_path)
    assert refused.returncode == 2 and "pattern" in refused.stderr, refused.stderr
    [again] = _commands(refused.stderr, "analyze")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pasted = _paste(again, env, elsewhere)
    assert pasted.returncode == 0, (again, pasted.stdout, pasted.stderr)
    assert sorted(Path(j.source_path).name for j in ledger_jobs(home).values() if j.state == "done") == \
        ["p1.jpg", "p2.jpg"]


def test_the_isolation_checks_child_names_the_command_that_started_the_daemon(tmp_path):
    """The isolation check's child runs as `python -m daemon.pipeline.isolation`: its own argv names no entry point,
    so its failure reasons said a bare `mondrian`, which a checkout's unactivated venv does not have on PATH."""
    from daemon import hints
    from daemon.pipeline.isolation import child_process_env

    probe = "from daemon import hints; hints.serve(__import__('sys').argv[1]); print(hints.mondrian())"
    hints._program = hints.shell_word(ENTRY)  # as the daemon started from an unactivated checkout finds itself
    try:
        env = child_process_env()
    finally:
        hints._program = ""
    env["PATH"] = _bare_path()
    said = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert said.stdout.strip() == f"{hints.shell_word(ENTRY)} --home {hints.shell_word(tmp_path.resolve())}", said


def test_an_analyze_command_for_a_file_named_like_an_option_names_a_file(tmp_path):
    """A failure record names the photo by its file name alone; `-x.jpg` there read as an option of `analyze`."""
    from daemon.cli.main import build_parser
    from daemon.pipeline.failures import analyze_command

    line = analyze_command("-x.jpg", advisor="cartier")
    words = subprocess.run(["bash", "-c", f"printf '%s\\n' {line.split(' ', 1)[1]}"], capture_output=True,
                           text=True, timeout=30).stdout.splitlines()
    args = build_parser().parse_args(words)
    assert [Path(p) for p in args.photo] == [Path("-x.jpg")] and args.advisor == "cartier", (line, words)


def test_a_photo_the_model_failed_on_gets_advice_that_works_when_followed(tmp_path, smoke_model_path):
    """"The photo is probably fine: the model failed on it. Run `… retry --failed`": pasted as it was, retry
    skipped it (nothing had changed, and the model decodes greedily: it would fail the same way), and its reason
    named "the schema's maxLength", which is no setting. The advice now names what to change, then the retry."""
    home = make_home(tmp_path / "home", smoke_model_path, max_tokens=3)
    photo(home / "inbox" / "fine.jpg", seed=7, size=(64, 48))
    env = _env(smoke_model_path, _path_with_mondrian(tmp_path))
    assert _run(["mondrian", "--home", str(home), "run", "--once"], env, tmp_path).returncode == 0
    [failure] = json.loads(_paste(f"mondrian --home '{home}' status --json", env, tmp_path).stdout)["recent_failures"]
    assert "the model failed on it" in failure["next_step"] and "Change what the reason names" in failure["next_step"]
    assert "raise max_tokens" in failure["reason"] and "schema" not in failure["reason"], failure
    settings = home / "mondrian.toml"
    settings.write_text(settings.read_text().replace("max_tokens = 3", "max_tokens = 400"))
    [retry] = _commands(failure["next_step"], "retry")
    pasted = _paste(retry, env, tmp_path)
    assert pasted.returncode == 0 and "fine.jpg" in pasted.stdout and "skipped" not in pasted.stdout, \
        (retry, pasted.stdout, pasted.stderr)
    assert _run(["mondrian", "--home", str(home), "run", "--once"], env, tmp_path).returncode == 0
    assert ledger_jobs(home)["fine.jpg"].state == "done"


def test_a_photo_the_model_failed_on_in_analyze_is_not_called_stopped_and_its_advice_works(tmp_path,
                                                                                          smoke_model_path):
    """`mondrian analyze` of a photo the model failed on (max_tokens too low) recorded "`mondrian analyze` stopped:
    GenerationError …", which the record's cause read as an interrupted run ("nothing is wrong, it was stopped"),
    with no failure record, while the command went on to the next photo. It is now the model's failure, recorded as
    the daemon records it, and its next step, followed once the setting is fixed, analyses the photo."""
    home = make_home(tmp_path / "home", smoke_model_path, max_tokens=3)
    photo(tmp_path / "shoot" / "fine.jpg", seed=7, size=(64, 48))
    env = _env(smoke_model_path, _path_with_mondrian(tmp_path))
    ran = _run(["mondrian", "--home", str(home), "analyze", str(tmp_path / "shoot" / "fine.jpg")], env, tmp_path)
    assert ran.returncode == 1 and "stopped" not in ran.stderr and "raise max_tokens" in ran.stderr, ran.stderr
    record = json.loads((home / "outbox" / "failed" / "fine.jpg.error.json").read_text())
    assert record["kind"] == "permanent" and "the model failed on it" in record["next_step"], record
    [failure] = json.loads(_paste(f"mondrian --home '{home}' status --json", env, tmp_path).stdout)["recent_failures"]
    assert "the model failed on it" in failure["next_step"], failure
    settings = home / "mondrian.toml"
    settings.write_text(settings.read_text().replace("max_tokens = 3", "max_tokens = 400"))
    [again] = _commands(failure["next_step"], "analyze")
    pasted = _paste(again, env, tmp_path)
    assert pasted.returncode == 0 and "fine.jpg" in pasted.stdout, (again, pasted.stdout, pasted.stderr)


def test_the_model_download_command_off_path_is_named_by_its_path(tmp_path, smoke_model_path):
    """No model yet, in a checkout whose venv is not activated: "To get a model: `hf download …`" said `hf`, which
    that shell does not have. The command printed must be one the shell finds (run here with `--help`: offline)."""
    home = make_home(tmp_path / "home", smoke_model_path)
    photo(tmp_path / "x.jpg", seed=8, size=(64, 48))
    env = _env(smoke_model_path, _bare_path())
    ran = _run([str(ENTRY), "--home", str(home), "analyze", "--model", str(tmp_path / "no-model"),
                str(tmp_path / "x.jpg")], env, tmp_path)
    assert ran.returncode != 0 and "To get a model" in ran.stderr, ran.stderr
    [download] = [c for c in re.findall(r"`([^`]+)`", ran.stderr) if c.split()[-2:-1] == ["download"]][:1]
    pasted = _paste(download.rsplit(" ", 1)[0] + " --help", env, tmp_path)
    assert pasted.returncode == 0, (download, pasted.stderr)
    # The service (and install's start-up check) run with the venv first on their PATH: the hint they log is for a
    # person's shell all the same, so it still names the command by its path.
    as_service = _env(smoke_model_path, f"{ENTRY.parent}{os.pathsep}{_bare_path()}")
    ran = _run([str(ENTRY), "--home", str(home), "analyze", "--model", str(tmp_path / "no-model"),
                str(tmp_path / "x.jpg")], as_service, tmp_path)
    assert f"`{ENTRY.parent / 'hf'} download" in ran.stderr, ran.stderr


def test_the_demos_own_hints_name_a_command_the_shell_finds(tmp_path, smoke_model_path):
    """With a daemon running on the home, `demo` says to run it in another home: `MONDRIAN_HOME=… mondrian demo`
    named a bare `mondrian`, not on PATH in a checkout whose venv is not activated."""
    home = make_home(tmp_path / "home", smoke_model_path)
    env = _env(smoke_model_path, _bare_path())
    with Daemon(home, smoke_model_path):
        wait_for(lambda: (home / "var" / "daemon.lock").exists() and _run(
            [str(ENTRY), "--home", str(home), "status"], env, tmp_path).stdout.count("running") > 0, 120,
            what="the daemon")
        said = _run([str(ENTRY), "--home", str(home), "demo", "--model", str(smoke_model_path)], env, tmp_path)
    [hint] = re.findall(r"\(MONDRIAN_HOME=(\S+) (.+? demo)\)", said.stderr)
    assert hint[1].split()[0] == str(ENTRY), said.stderr
