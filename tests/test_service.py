"""`mondrian service`: the launchd plist, the systemd unit, --dry-run, log rotation, and the daemon
started exactly as the service manager starts it (SIGTERM -> exit 0, bad config -> exit 78)."""

from __future__ import annotations

import io
import os
import plistlib
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from daemon.service import install as service
from daemon.config import PROJECT_ROOT
from daemon.service.logrotate import StdStreamRotator, rotate_if_needed

PY = Path(sys.executable).absolute()
HAS_DAEMON = (PROJECT_ROOT / "daemon" / "cli" / "main.py").exists() and \
    "run" in (PROJECT_ROOT / "daemon" / "cli" / "main.py").read_text(encoding="utf-8")
needs_daemon = pytest.mark.skipif(not HAS_DAEMON, reason="daemon/cli.py with `run` not written yet")
WEIRD = "Mondrian & co <studio> 50% $HOME"  # every character the plist or the unit must escape


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    user_home = tmp_path / "user"
    home = tmp_path / WEIRD / "home"
    user_home.mkdir()
    home.mkdir(parents=True)
    return {"user": user_home, "home": home, "tmp": tmp_path}


def spec_for(dirs: dict[str, Path], platform: str = "macos", **kw) -> service.ServiceSpec:
    kw.setdefault("model", "smoke")
    return service.build_spec(platform=platform, home=dirs["home"], user_home=dirs["user"], env={}, **kw)


def tree(root: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime)
            for p in root.rglob("*") if not p.is_symlink()}


# -- the plist ------------------------------------------------------------------------------------


def test_plist_keys_types_and_paths(dirs):
    spec = spec_for(dirs)
    text = service.render_plist(spec)
    pl = plistlib.loads(text.encode())

    assert isinstance(pl["Label"], str) and pl["Label"] == "com.mondrian.daemon"
    assert service._LABEL_RE.match(pl["Label"])  # reverse DNS

    args = pl["ProgramArguments"]
    assert isinstance(args, list) and all(isinstance(a, str) for a in args)
    python = Path(args[0])
    assert python.is_absolute() and python.is_file() and os.access(python, os.X_OK)
    assert python == PY  # this venv's python, not the interpreter it links to
    assert args[1:] == ["-m", "daemon", "run"]  # foreground, never daemonizes

    assert pl["RunAtLoad"] is True
    assert pl["KeepAlive"] == {"SuccessfulExit": False}
    assert pl["KeepAlive"]["SuccessfulExit"] is False
    assert type(pl["ThrottleInterval"]) is int and pl["ThrottleInterval"] >= 10
    assert pl["ProcessType"] in ("Interactive", "Standard")
    assert type(pl["ExitTimeOut"]) is int and pl["ExitTimeOut"] >= 30

    assert pl["WorkingDirectory"] == "/"  # never the home: it may be on a drive not connected at login

    env = pl["EnvironmentVariables"]
    assert isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    assert env["MONDRIAN_HOME"] == str(dirs["home"].resolve())  # the daemon's home, given explicitly
    assert WEIRD in env["MONDRIAN_HOME"]  # & < > % $ and spaces survive the XML round trip
    assert env["MONDRIAN_MODEL"] == "smoke"
    assert env["HF_HUB_OFFLINE"] == "1"  # the smoke model is local
    assert str(PY.parent) == env["PATH"].split(":")[0]
    assert all(Path(p).is_absolute() for p in env["PATH"].split(":"))
    assert env["PYTHONPATH"] == str(PROJECT_ROOT)
    assert env["MONDRIAN_LOG_ROTATE"] == "1" and int(env["MONDRIAN_LOG_MAX_BYTES"]) > 0
    assert StdStreamRotator.from_env(env) is not None  # the daemon understands what the plist says

    for key in ("StandardOutPath", "StandardErrorPath"):
        path = Path(pl[key])
        assert path.is_absolute()
        assert path.parent == dirs["user"] / "Library" / "Logs" / "Mondrian"
    assert pl["StandardOutPath"] != pl["StandardErrorPath"]
    assert pl == spec.plist_dict()


def test_plist_hub_model_stays_online_and_local_path_is_absolute(dirs, monkeypatch):
    hub = spec_for(dirs, model="mlx-community/Qwen2-VL-2B-Instruct-4bit")
    assert "HF_HUB_OFFLINE" not in hub.environment  # its first start may need the download
    model_dir = dirs["tmp"] / "my model"
    model_dir.mkdir()
    monkeypatch.chdir(dirs["tmp"])
    local = spec_for(dirs, model="my model")
    assert local.environment["MONDRIAN_MODEL"] == str(model_dir.resolve())
    assert local.environment["HF_HUB_OFFLINE"] == "1"
    # A folder of the home, named as mondrian.toml names one: absolute too, since the service runs in `/`.
    (dirs["home"] / "models" / "mine").mkdir(parents=True)
    in_home = spec_for(dirs, model="models/mine")
    assert in_home.environment["MONDRIAN_MODEL"] == str((dirs["home"] / "models" / "mine").resolve())


def test_the_service_looks_for_models_where_the_installing_shell_does(dirs):
    """A model kept in a custom Hugging Face cache (HF_HOME) ran from the shell, while the service looked in the
    default cache: downloaded again, or failed at every start offline, and install said nothing."""
    spec = service.build_spec(platform="linux", home=dirs["home"], user_home=dirs["user"], model="smoke",
                              env={"HF_HOME": "/Volumes/Models/hf", "HF_HUB_CACHE": "/Volumes/Models/hf/hub"})
    assert spec.environment["HF_HOME"] == "/Volumes/Models/hf"
    assert spec.environment["HF_HUB_CACHE"] == "/Volumes/Models/hf/hub"
    assert "HF_HOME" not in spec_for(dirs, model="smoke").environment  # the default cache: nothing to carry


def test_plist_process_type_and_label_are_checked(dirs):
    assert plistlib.loads(service.render_plist(spec_for(dirs, process_type="Standard")).encode())[
        "ProcessType"] == "Standard"
    with pytest.raises(service.ServiceError):
        spec_for(dirs, process_type="Background")
    with pytest.raises(service.ServiceError):
        spec_for(dirs, label="mondrian")  # not reverse DNS
    test_label = spec_for(dirs, label="com.mondrian.test")
    assert test_label.stdout_path.name == "com.mondrian.test.out.log"  # never shares the real agent's log


def test_control_characters_are_refused_not_written(dirs):
    bad = dirs["tmp"] / "bad\x01home"
    bad.mkdir()
    spec = service.build_spec(platform="macos", home=bad, user_home=dirs["user"], model="smoke", env={})
    with pytest.raises(service.ServiceError, match="control character"):
        service.render_plist(spec)
    with pytest.raises(service.ServiceError, match="control character"):
        service.render_unit(spec)
    # A name in another system's encoding (Linux allows it): a traceback from the file's write, once
    latin1 = dirs["tmp"] / os.fsdecode(b"Cl\xe9ment")
    latin1.mkdir()
    spec = service.build_spec(platform="linux", home=latin1, user_home=dirs["user"], model="smoke", env={})
    for render in (service.render_plist, service.render_unit):
        with pytest.raises(service.ServiceError, match=r"not valid UTF-8.*rename it"):
            render(spec)


def test_bad_config_fails_install_with_ex_config(dirs):
    (dirs["home"] / "mondrian.toml").write_text("model = = nope\n")
    err = io.StringIO()
    rc = service.service_action("install", platform="macos", dry_run=True, home=dirs["home"],
                                user_home=dirs["user"], out=io.StringIO(), err=err)
    assert rc == service.EX_CONFIG
    assert "mondrian.toml" in err.getvalue()


# -- the systemd unit ------------------------------------------------------------------------------


def _verify_unit(unit_dir: Path, text: str, name: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    unit = unit_dir / name
    unit.write_text(text)
    runtime = tmp / "xdg-runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    # --user needs a runtime dir, not a running user manager; verify loads the unit in a test manager.
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    return subprocess.run(["systemd-analyze", "--user", "verify", str(unit)], capture_output=True,
                          text=True, env=env, timeout=60)


def test_unit_renders_with_same_semantics(dirs, monkeypatch):
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)  # the unit file below goes into the test's user home
    spec = spec_for(dirs, platform="linux")
    text = service.render_unit(spec)
    lines = text.splitlines()
    assert 'ExecStart="%s" "-m" "daemon" "run"' % PY in lines
    assert "Restart=on-failure" in lines and "KillSignal=SIGTERM" in lines
    assert f"TimeoutStopSec={spec.exit_timeout}" in lines and spec.exit_timeout >= 30
    assert f"RestartSec={spec.throttle_interval}" in lines
    assert "WantedBy=default.target" in lines
    # WorkingDirectory/Environment: `%` doubled (specifiers), `$` kept (no expansion there).
    weird_home = str(dirs["home"].resolve())
    assert "WorkingDirectory=/" in lines  # never the home: it may be on a drive not connected at login
    assert 'Environment="MONDRIAN_HOME=%s"' % weird_home.replace("%", "%%") in lines
    assert 'Environment="MONDRIAN_MODEL=smoke"' in lines
    assert not any(l.startswith("Environment=\"MONDRIAN_LOG_ROTATE") for l in lines)  # journald rotates
    assert spec.unit_path.is_relative_to(dirs["user"])
    spec.unit_path.parent.mkdir(parents=True, exist_ok=True)
    spec.unit_path.write_text(text)
    assert service.installed_home(spec) == dirs["home"].resolve()  # read back through the quoting


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_unit_passes_systemd_analyze_verify(dirs):
    # A python path full of characters systemd would otherwise interpret: verify checks that the
    # ExecStart binary exists, so it passes only if the quoting hands systemd exactly this path.
    weird_bin = dirs["tmp"] / "bin 50% $HOME & co"
    weird_bin.mkdir()
    (weird_bin / "python").symlink_to(PY)
    spec = spec_for(dirs, platform="linux", python=weird_bin / "python")
    unit_dir = dirs["tmp"] / "units"
    unit_dir.mkdir()
    proc = _verify_unit(unit_dir, service.render_unit(spec), spec.unit_name, dirs["tmp"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr  # warnings like "Unknown key ... ignoring" count too

    # ...and the check is not vacuous: an unquoted path with a space fails it.
    broken = service.render_unit(spec).replace(service.systemd_quote(str(weird_bin / "python")),
                                               str(weird_bin / "python"))
    proc = _verify_unit(unit_dir, broken, spec.unit_name, dirs["tmp"])
    assert proc.returncode != 0 or proc.stderr.strip()


def test_unit_refuses_python_path_systemd_cannot_run(dirs):
    quoted_bin = dirs["tmp"] / 'venv "new"'
    quoted_bin.mkdir()
    (quoted_bin / "python").symlink_to(PY)
    spec = spec_for(dirs, platform="linux", python=quoted_bin / "python")
    with pytest.raises(service.ServiceError, match="quote or backslash"):
        service.render_unit(spec)
    service.render_plist(spec_for(dirs, platform="macos", python=quoted_bin / "python"))  # fine for launchd


# -- the CLI: --dry-run, and failing cleanly where the service manager is missing -------------------


def _entry_points() -> list[list[str]]:
    points = [[str(PY), "-m", "daemon.service"]]
    if (PROJECT_ROOT / "daemon" / "__main__.py").exists():
        probe = subprocess.run([str(PY), "-m", "daemon", "service", "--help"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=120)
        if probe.returncode == 0:
            points.append([str(PY), "-m", "daemon"])  # `mondrian service ...` as the lead wired it
    return points


@pytest.mark.parametrize("platform", ["macos", "linux"])
def test_dry_run_install_prints_everything_and_writes_nothing(dirs, platform):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONDRIAN_", "XDG_"))}
    env.update(HOME=str(dirs["user"]), MONDRIAN_HOME=str(dirs["home"]), MONDRIAN_MODEL="smoke",
               ANALYSIS_MODE="baseline")
    real_home = Path.home()
    real_paths = [real_home / "Library" / "LaunchAgents" / "com.mondrian.daemon.plist",
                  real_home / ".config" / "systemd" / "user" / "mondrian.service"]
    before_real = [p.exists() for p in real_paths]
    before = tree(dirs["tmp"])
    for entry in _entry_points():
        proc = subprocess.run([*entry, "service", "install", "--dry-run", "--platform", platform],
                              cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        body = out.split(":\n", 1)[1].split("\n# end of ", 1)[0]  # the file between the markers
        if platform == "macos":
            target = dirs["user"] / "Library" / "LaunchAgents" / "com.mondrian.daemon.plist"
            assert f"# would write {target}:" in out
            pl = plistlib.loads(body.encode())
            assert pl["EnvironmentVariables"]["MONDRIAN_HOME"] == str(dirs["home"].resolve())
            uid = os.getuid()
            assert f"launchctl bootout gui/{uid}/com.mondrian.daemon" in out
            assert f"launchctl bootstrap gui/{uid} " in out
        else:
            target = dirs["user"] / ".config" / "systemd" / "user" / "mondrian.service"
            assert f"# would write {target}:" in out
            assert "[Service]" in body and "ExecStart=" in body
            for cmd in ("systemctl --user daemon-reload", "systemctl --user enable mondrian.service",
                        "systemctl --user restart mondrian.service"):
                assert cmd in out
        # What the service would be pinned to by this shell is said before anything is installed.
        assert "Model: smoke, pinned by MONDRIAN_MODEL, set in this shell" in out, out[-2000:]
        assert "Settings from this shell, written into the service: ANALYSIS_MODE (default_mode)" in out, out[-2000:]
    assert tree(dirs["tmp"]) == before, "dry run wrote files"
    assert [p.exists() for p in real_paths] == before_real


@pytest.mark.parametrize("action", ["uninstall", "start", "stop", "restart", "status"])
def test_dry_run_other_actions(dirs, action):
    for platform, needle in (("macos", "launchctl "), ("linux", "systemctl --user ")):
        out = io.StringIO()
        rc = service.service_action(action, platform=platform, dry_run=True, home=dirs["home"],
                                    user_home=dirs["user"], out=out, err=io.StringIO())
        assert rc == 0 and needle in out.getvalue()
    out = io.StringIO()
    service.service_action("restart", platform="macos", dry_run=True, home=dirs["home"],
                           user_home=dirs["user"], out=out, err=io.StringIO())
    assert "kickstart -k gui/" in out.getvalue()


def _systemd_user_usable() -> bool:
    return bool(shutil.which("systemctl")) and subprocess.run(
        ["systemctl", "--user", "show-environment"], capture_output=True, timeout=15).returncode == 0


@pytest.mark.skipif(sys.platform != "linux", reason="Linux only")
def test_install_without_user_bus_fails_clearly(dirs):
    if _systemd_user_usable():
        pytest.skip("this machine has a systemd user session; a real install would change it")
    out, err = io.StringIO(), io.StringIO()
    before = tree(dirs["tmp"])
    rc = service.service_action("install", platform="linux", home=dirs["home"], user_home=dirs["user"],
                                out=out, err=err)
    assert rc == service.EX_UNAVAILABLE
    assert "systemctl --user" in err.getvalue() and "--dry-run" in err.getvalue()
    assert "Traceback" not in err.getvalue()
    assert tree(dirs["tmp"]) == before


@pytest.mark.skipif(sys.platform == "darwin", reason="launchctl exists on macOS")
def test_macos_install_without_launchctl_fails_clearly(dirs):
    err = io.StringIO()
    rc = service.service_action("install", platform="macos", home=dirs["home"], user_home=dirs["user"],
                                out=io.StringIO(), err=err)
    assert rc == service.EX_UNAVAILABLE and "launchctl" in err.getvalue()
    assert not (dirs["user"] / "Library").exists()


FAKE_LAUNCHCTL = r"""#!/bin/sh
# Records its arguments; keeps "loaded" state in a file, like launchd keeps the job.
echo "$*" >> "$FAKE_LAUNCHD/calls"
case "$1" in
  print) [ -f "$FAKE_LAUNCHD/loaded" ] || { echo "Could not find service" >&2; exit 113; }
         if [ -f "$FAKE_LAUNCHD/stopped" ]; then
           printf '\tstate = not running\n\tlast exit code = %s\n' "$(cat "$FAKE_LAUNCHD/exit" 2>/dev/null || echo 0)"
         else printf '\tstate = running\n\tpid = 42\n'; fi ;;
  bootstrap|kickstart) touch "$FAKE_LAUNCHD/loaded"; rm -f "$FAKE_LAUNCHD/stopped" ;;
  kill) touch "$FAKE_LAUNCHD/stopped" ;;
  bootout) rm -f "$FAKE_LAUNCHD/loaded" "$FAKE_LAUNCHD/stopped" ;;
esac
exit 0
"""


@pytest.mark.skipif(sys.platform == "darwin", reason="the real launchctl test below runs on macOS")
def test_macos_install_sequence_with_recording_launchctl(dirs, monkeypatch):
    """Files and the order of launchctl verbs, against a recorder standing in for launchctl."""
    fake = dirs["tmp"] / "fakebin"
    fake.mkdir()
    (fake / "launchctl").write_text(FAKE_LAUNCHCTL)
    (fake / "launchctl").chmod(0o755)
    state = dirs["tmp"] / "launchd"
    state.mkdir()
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LAUNCHD", str(state))
    kw = dict(platform="macos", home=dirs["home"], user_home=dirs["user"], model="smoke",
              out=io.StringIO(), err=io.StringIO())

    assert service.service_action("install", **kw) == 0
    spec = spec_for(dirs)
    assert spec.log_dir.is_dir()
    assert stat.S_IMODE(spec.plist_path.stat().st_mode) == 0o644  # launchd refuses group/world-writable
    assert plistlib.loads(spec.plist_path.read_bytes()) == spec.plist_dict()
    uid = os.getuid()
    target = f"gui/{uid}/com.mondrian.daemon"
    calls = (state / "calls").read_text().splitlines()
    assert calls[-2:] == [f"enable {target}", f"bootstrap gui/{uid} {spec.plist_path}"]
    assert f"bootout {target}" not in calls  # nothing was loaded

    (state / "calls").unlink()
    assert service.service_action("install", **kw) == 0  # twice: the old agent is booted out first
    calls = (state / "calls").read_text().splitlines()
    verbs = [c.split()[0] for c in calls if not c.startswith("print")]
    assert verbs == ["bootout", "enable", "bootstrap"]

    # Another home's `service start|stop|restart` (a hint from that home names its --home) must not act on this one.
    other_home = dirs["tmp"] / "other home"
    other_home.mkdir()
    assert service.installed_home(spec) == spec.home
    for action in ("start", "stop", "restart"):
        err = io.StringIO()
        assert service.service_action(action, **{**kw, "home": other_home, "err": err}) == 78, err.getvalue()
        assert f"serves {spec.home}, not {other_home.resolve()}" in err.getvalue(), err.getvalue()
    assert not any(c.startswith(("kickstart", "kill")) for c in (state / "calls").read_text().splitlines())

    assert service.service_action("restart", **kw) == 0
    assert service.service_action("stop", **kw) == 0
    calls = (state / "calls").read_text().splitlines()
    assert f"kickstart -k {target}" in calls and f"kill SIGTERM {target}" in calls
    assert service.service_action("stop", **kw) == 0  # stopping a stopped agent is fine...
    assert (state / "calls").read_text().count("kill ") == 1  # ...and sends no second signal
    assert service.service_action("start", **kw) == 0
    assert (state / "calls").read_text().splitlines()[-1] == f"kickstart {target}"

    # An agent that cannot start (exit 78), between two of launchd's tries: "not running" left KeepAlive to start it
    # again 30 s later, for ever. `stop` unloads it until the next login or `service start`.
    (state / "stopped").touch()
    (state / "exit").write_text("78")
    out = io.StringIO()
    assert service.service_action("stop", **{**kw, "out": out}) == 0
    assert (state / "calls").read_text().splitlines()[-2:] == [f"bootout {target}", f"print {target}"]
    assert not (state / "loaded").exists() and "last exited with 78" in out.getvalue(), out.getvalue()
    (state / "exit").unlink()
    assert service.service_action("start", **kw) == 0 and (state / "loaded").exists()

    assert service.service_action("uninstall", **kw) == 0
    assert not spec.plist_path.exists() and not (state / "loaded").exists()


# -- log rotation --------------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from daemon.service.logrotate import rotate_if_needed
    n, max_bytes, backups = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rotations = 0
    for i in range(n):
        print(f"out {{i:05d}} " + "x" * 80)
        if i % 10 == 9:
            print(f"err {{i:05d}}", file=sys.stderr)
        rotations += rotate_if_needed(max_bytes, backups)
    print(f"rotations {{rotations}}", file=sys.stderr)
    print("last line")
""").format(root=str(PROJECT_ROOT))
LINE = len("out 00000 " + "x" * 80 + "\n")


def _run_writer(tmp: Path, out_path: Path, err_path: Path | None, n: int, max_bytes: int, backups: int,
                buffered: bool = False) -> subprocess.CompletedProcess:
    script = tmp / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ}
    env.pop("PYTHONUNBUFFERED", None)
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"  # what the plist sets
    # Open the files the way launchd opens StandardOutPath/StandardErrorPath: append mode.
    with open(out_path, "ab") as out:
        err = open(err_path, "ab") if err_path else subprocess.STDOUT
        try:
            return subprocess.run([str(PY), str(script), str(n), str(max_bytes), str(backups)],
                                  stdout=out, stderr=err, env=env, timeout=120)
        finally:
            if err_path:
                err.close()


def _lines(paths: list[Path]) -> list[str]:
    return [l for p in paths if p.exists() for l in p.read_text().splitlines()]


def test_rotation_of_a_real_file_backed_stdout(tmp_path):
    out, err = tmp_path / "mondrian.out.log", tmp_path / "mondrian.err.log"
    out.write_text("")
    out.chmod(0o640)
    n, max_bytes, backups = 300, 2000, 2
    proc = _run_writer(tmp_path, out, err, n, max_bytes, backups)
    assert proc.returncode == 0

    assert out.with_name("mondrian.out.log.1").exists() and out.with_name("mondrian.out.log.2").exists()
    assert not out.with_name("mondrian.out.log.3").exists()  # only `backups` kept
    for b in (1, 2):
        size = out.with_name(f"mondrian.out.log.{b}").stat().st_size
        assert max_bytes < size <= max_bytes + LINE  # rotated at the threshold
    assert stat.S_IMODE(out.stat().st_mode) == 0o640  # the fresh file keeps the old mode

    # Oldest backup -> newest file: one unbroken run of lines ending with the last line written.
    lines = _lines([out.with_name("mondrian.out.log.2"), out.with_name("mondrian.out.log.1"), out])
    assert lines[-1] == "last line"
    numbers = [int(l.split()[1]) for l in lines[:-1]]
    assert numbers == list(range(numbers[0], n)), "lines lost or reordered across rotations"
    assert numbers[0] > 0  # older files really were dropped

    # stderr is its own (small) file: not rotated, nothing lost, and still the same fd.
    err_lines = err.read_text().splitlines()
    assert err_lines[:-1] == [f"err {i:05d}" for i in range(9, n, 10)]
    lines_per_file = max_bytes // LINE + 1  # checked after every line: rotate once size > max_bytes
    assert int(err_lines[-1].split()[1]) == n // lines_per_file
    assert not err.with_name("mondrian.err.log.1").exists()


def test_rotation_when_stdout_and_stderr_share_one_file(tmp_path):
    log = tmp_path / "both.log"
    proc = _run_writer(tmp_path, log, None, 200, 3000, 1)
    assert proc.returncode == 0
    assert log.with_name("both.log.1").exists() and not log.with_name("both.log.2").exists()
    current = log.read_text().splitlines()
    # Both fds moved to the fresh file: the final stderr line and the final stdout line are both here.
    assert current[-1] == "last line" and current[-2].startswith("rotations ")


def test_rotation_loses_nothing_with_block_buffered_stdout(tmp_path):
    out, err = tmp_path / "o.log", tmp_path / "e.log"
    proc = _run_writer(tmp_path, out, err, 400, 4000, 50, buffered=True)
    assert proc.returncode == 0
    backups = sorted(tmp_path.glob("o.log.*"), key=lambda p: -int(p.suffix[1:]))
    assert backups
    lines = _lines([*backups, out])
    assert lines[-1] == "last line"
    assert [int(l.split()[1]) for l in lines[:-1]] == list(range(400))


def test_rotation_ignores_pipes_and_small_files(tmp_path):
    code = ("import sys; sys.path.insert(0, %r); from daemon.service.logrotate import rotate_if_needed;"
            "print('x' * 100, flush=True); print(rotate_if_needed(10, 2), file=sys.stderr)") % str(PROJECT_ROOT)
    proc = subprocess.run([str(PY), "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stderr.strip() == "False"  # a pipe (systemd journal, a terminal) is never rotated
    small = tmp_path / "small.log"
    small.write_text("tiny\n")
    with open(small, "a") as fh:
        assert rotate_if_needed(1000, 2, fds=(fh.fileno(),)) is False
    assert rotate_if_needed(0, 2) is False


def test_rotator_from_env_and_interval():
    assert StdStreamRotator.from_env({}) is None
    assert StdStreamRotator.from_env({"MONDRIAN_LOG_ROTATE": "0"}) is None
    r = StdStreamRotator.from_env({"MONDRIAN_LOG_ROTATE": "1", "MONDRIAN_LOG_MAX_BYTES": "123",
                                   "MONDRIAN_LOG_BACKUPS": "5"}, interval=60)
    assert (r.max_bytes, r.backups) == (123, 5)
    r.fds = ()  # nothing to rotate; we only test the pacing
    r.maybe_rotate(now=1000.0)
    assert r._next == 1060.0
    r.maybe_rotate(now=1030.0)
    assert r._next == 1060.0  # not checked again before the interval


# -- the real daemon, started exactly as the plist starts it ----------------------------------------


def _launchd_env(spec: service.ServiceSpec, **extra: str) -> dict[str, str]:
    """launchd's bare environment plus the plist's EnvironmentVariables: nothing from this shell."""
    env = {"HOME": str(spec.user_home), "USER": os.environ.get("USER", "mondrian"),
           "LOGNAME": os.environ.get("USER", "mondrian"), "SHELL": "/bin/sh",
           "TMPDIR": os.environ.get("TMPDIR", "/tmp")}
    env.update(spec.environment)
    env.update(extra)
    return env


class Agent:
    """The daemon as launchd runs it: ProgramArguments, WorkingDirectory, EnvironmentVariables,
    stdout/stderr appended to StandardOutPath/StandardErrorPath."""

    def __init__(self, spec: service.ServiceSpec, args: list[str] | None = None, **extra_env: str):
        pl = spec.plist_dict()
        spec.log_dir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = Path(pl["StandardOutPath"]), Path(pl["StandardErrorPath"])
        with open(self.out_path, "ab") as out, open(self.err_path, "ab") as err:
            self.proc = subprocess.Popen(pl["ProgramArguments"] + (args or []), cwd=pl["WorkingDirectory"],
                                         env=_launchd_env(spec, **extra_env), stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL)

    def logs(self) -> str:
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.logs():
                return True
            if self.proc.poll() is not None:
                return needle in self.logs()
            time.sleep(0.1)
        return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _photo(path: Path) -> None:
    from PIL import Image

    img = Image.new("RGB", (900, 600))
    img.putdata([((x * 7) % 256, (y * 5) % 256, ((x + y) * 3) % 256) for y in range(600) for x in range(900)])
    img.save(path, quality=90)


@needs_daemon
def test_daemon_exits_0_on_sigterm_within_exit_timeout_and_loses_no_photo(dirs):
    spec = spec_for(dirs)
    inbox = dirs["home"] / "inbox"
    inbox.mkdir()
    _photo(inbox / "IMG_1.jpg")
    agent = Agent(spec)
    try:
        # SIGTERM once the photo is in the ledger and the model is loading/analysing: mid-job is
        # the interesting case; any moment must end in exit 0 and the photo finished once later.
        assert agent.wait_for_log("IMG_1", 120), agent.logs()
        agent.wait_for_log("analysing IMG_1", 60)  # the worker's log line; if it changes we only lose aim
        t0 = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        rc = agent.proc.wait(timeout=spec.exit_timeout)
        took = time.monotonic() - t0
    finally:
        agent.kill()
    assert rc == 0, agent.logs()
    assert took < spec.exit_timeout

    # No photo lost: the same home, run to completion, holds exactly one report for it.
    again = Agent(spec, ["--once"])
    try:
        assert again.proc.wait(timeout=300) == 0, again.logs()
    finally:
        again.kill()
    reports = list((dirs["home"] / "outbox").glob("IMG_1*/report.json"))
    assert len(reports) == 1, agent.logs() + again.logs()
    assert not list((dirs["home"] / "outbox" / "failed").glob("IMG_1*"))
    assert not (inbox / "IMG_1.jpg").exists()


@needs_daemon
@pytest.mark.parametrize("case", ["bad_toml", "bad_mode", "missing_model"])
def test_daemon_fatal_startup_error_exits_78_and_says_what_to_fix(dirs, case):
    spec = spec_for(dirs)
    extra: dict[str, str] = {}
    if case == "bad_toml":
        (dirs["home"] / "mondrian.toml").write_text("model = = nope\n")
        needles = ["mondrian.toml", "fix"]
    elif case == "bad_mode":
        extra["ANALYSIS_MODE"] = "bogus"
        needles = ["bogus", "baseline"]
    else:
        missing = dirs["tmp"] / "no such model"
        extra.update(MONDRIAN_MODEL=str(missing), HF_HUB_OFFLINE="1")
        needles = [str(missing)]
    agent = Agent(spec, **extra)
    try:
        rc = agent.proc.wait(timeout=120)
    finally:
        agent.kill()
    assert rc == 78, agent.logs()  # non-zero: KeepAlive{SuccessfulExit=false} / Restart=on-failure retry
    logs = agent.logs()
    for needle in needles:
        assert needle in logs, logs
    assert "Traceback" not in logs


@needs_daemon
def test_the_service_runs_outside_its_home_and_says_so_when_the_drive_is_not_connected(dirs):
    """The home on a drive that is not connected at login: as the service's working directory it would stop
    launchd (and systemd: status 200/CHDIR) from starting the process at all, and the daemon could never say why.
    Started as the service starts it, from `/`, it says so and exits 78 (tried again every ThrottleInterval); with
    the drive back, the same service definition serves the home."""
    from tests.harness import make_home, photo

    drive = dirs["tmp"] / "drive"
    home = make_home(drive / "Mondrian")
    spec = service.build_spec(platform="macos", home=home, user_home=dirs["user"], model="smoke", env={})
    unit = service.render_unit(service.build_spec(platform="linux", home=home, user_home=dirs["user"],
                                                  model="smoke", env={}))
    assert plistlib.loads(service.render_plist(spec).encode())["WorkingDirectory"] == "/"
    assert "WorkingDirectory=/" in unit.splitlines() and str(home.resolve()) in unit
    assert spec.environment["MONDRIAN_HOME"] == str(home.resolve())

    unplugged = drive.rename(dirs["tmp"] / "unplugged")
    agent = Agent(spec)
    try:
        rc = agent.proc.wait(timeout=120)
    finally:
        agent.kill()
    logs = agent.logs()
    assert rc == 78, logs
    assert f"{drive} does not exist" in logs and "not connected" in logs and "Traceback" not in logs, logs
    assert not drive.exists()  # nothing made where the drive mounts

    unplugged.rename(drive)
    photo(home / "inbox" / "IMG_2.jpg", seed=2)
    again = Agent(spec, ["--once"])
    try:
        assert again.proc.wait(timeout=300) == 0, again.logs()
    finally:
        again.kill()
    assert len(list((home / "outbox").glob("IMG_2*/report.json"))) == 1, again.logs()


# -- macOS: the real launchd ------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "darwin", reason="launchd exists only on macOS")
@needs_daemon
def test_launchd_bootstrap_run_stop_bootout(dirs):
    label = f"com.mondrian.test.p{os.getpid()}"
    kw = dict(platform="macos", label=label, home=dirs["home"], user_home=dirs["user"], model="smoke",
              out=io.StringIO(), err=io.StringIO())
    spec = service.build_spec(platform="macos", label=label, home=dirs["home"], user_home=dirs["user"],
                              model="smoke", env={})
    agent = service.Launchd(spec, service.Shell(False, io.StringIO(), io.StringIO()))
    try:
        assert service.service_action("install", **kw) == 0, kw["err"].getvalue()
        assert service._wait(agent.running, 60), agent.info()
        pid = int(agent.info()["pid"])
        assert service.service_action("status", **kw) == 0
        assert service.service_action("stop", **kw) == 0, kw["err"].getvalue()
        assert not agent.running()
        time.sleep(spec.throttle_interval / 10)
        assert not agent.running(), "KeepAlive restarted a clean stop"
        info = agent.info()
        assert info is not None and info.get("last exit code", "").startswith("0")
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert service.service_action("uninstall", **kw) == 0
        assert agent.info() is None and not spec.plist_path.exists()
    finally:
        subprocess.run(["launchctl", "bootout", f"gui/{os.getuid()}/{label}"], capture_output=True)


# -- a broken or foreign configuration, the model from mondrian.toml, folders on a missing drive ---------------------

FAKE_SYSTEMCTL = r"""#!/bin/sh
# Records its arguments and succeeds, standing in for `systemctl --user` (no user session is needed).
echo "$*" >> "$FAKE_SYSTEMD_CALLS"
exit 0
"""


@pytest.fixture
def systemd(dirs, monkeypatch):
    """`service` actions on the linux platform against a recording systemctl; returns a reader of its calls."""
    fake = dirs["tmp"] / "fakebin"
    fake.mkdir()
    (fake / "systemctl").write_text(FAKE_SYSTEMCTL)
    (fake / "systemctl").chmod(0o755)
    calls = dirs["tmp"] / "systemctl.calls"
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SYSTEMD_CALLS", str(calls))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)  # the unit goes into the test's user home
    monkeypatch.delenv("MONDRIAN_MODEL", raising=False)
    return lambda: calls.read_text().splitlines() if calls.exists() else []


def _act(action: str, dirs, **kw) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    kw.setdefault("home", dirs["home"])
    rc = service.service_action(action, platform="linux", user_home=dirs["user"], out=out, err=err, **kw)
    return rc, out.getvalue(), err.getvalue()


def test_stop_uninstall_status_work_when_the_config_is_broken(dirs, systemd):
    (dirs["home"] / "mondrian.toml").write_text('model = "smoke"\n')
    rc, _, err = _act("install", dirs)
    assert rc == 0, err
    unit = spec_for(dirs, platform="linux").unit_path
    assert unit.exists()
    # A typo added after install: the daemon now exits 78 every 30 s, and the service must still be stoppable.
    (dirs["home"] / "mondrian.toml").write_text('model = "smoke"\nmodle = 1\n')

    rc, _, err = _act("stop", dirs)
    assert rc == 0, err
    assert systemd()[-1] == "--user stop mondrian.service"
    assert "modle" in err  # ...and it says what is broken

    rc, out, err = _act("status", dirs)
    assert rc == 0, err
    assert "--user status mondrian.service --no-pager --lines=10" in systemd()
    assert "configuration problem" in err and "modle" in err, err

    rc, _, err = _act("restart", dirs)  # would only start the crash loop again
    assert rc == service.EX_CONFIG and "modle" in err
    assert "--user restart mondrian.service" not in systemd()[-1:]

    rc, _, err = _act("uninstall", dirs)
    assert rc == 0, err
    assert "--user disable --now mondrian.service" in systemd()
    assert not unit.exists()


def test_model_from_mondrian_toml_is_read_at_each_start_not_pinned(dirs, systemd):
    (dirs["home"] / "mondrian.toml").write_text('model = "smoke"\n')
    spec = service.build_spec(platform="linux", home=dirs["home"], user_home=dirs["user"], env={})
    assert spec.model == "smoke"
    assert "MONDRIAN_MODEL" not in spec.environment
    assert "MONDRIAN_MODEL=" not in service.render_unit(spec)
    # Asked for, it is pinned: on the command line, or from the installing shell.
    assert spec_for(dirs, platform="linux", model="smoke").environment["MONDRIAN_MODEL"] == "smoke"
    assert service.build_spec(platform="linux", home=dirs["home"], user_home=dirs["user"],
                              env={"MONDRIAN_MODEL": "smoke"}).environment["MONDRIAN_MODEL"] == "smoke"

    # The README's advice: edit `model`, `service restart`. The daemon started with the installed environment (a
    # real process, the service's python and variables) now sees the edited model.
    assert service.startup_problem(spec) is None
    missing = dirs["tmp"] / "edited model"
    (dirs["home"] / "mondrian.toml").write_text(f'model = "{missing}"\n')
    problem = service.startup_problem(spec)
    assert problem and str(missing) in problem, problem


@pytest.mark.parametrize("case", ["advisor", "model", "lora"])
def test_install_refuses_a_config_the_daemon_would_refuse_at_start(dirs, systemd, case):
    toml, kw = 'model = "smoke"\n', {}
    if case == "advisor":
        toml += 'default_advisor = "nobody"\n'
        needle = "nobody"
    elif case == "model":
        kw["model"] = str(dirs["tmp"] / "nonexistent" / "m")
        needle = kw["model"]
    else:
        toml += "[lora]\nrank = -3\n"
        needle = "rank"
    (dirs["home"] / "mondrian.toml").write_text(toml)
    rc, out, err = _act("install", dirs, **kw)
    assert rc == service.EX_CONFIG, out + err
    assert needle in err and "Nothing was installed" in err, err
    assert not spec_for(dirs, platform="linux").unit_path.exists()
    assert systemd() == ["--user show-environment"]  # usable() only: nothing enabled or restarted
    rc, _, err = _act("install", dirs, dry_run=True, **kw)  # a dry run says so too
    assert rc == service.EX_CONFIG and needle in err, err


def test_another_homes_uninstall_refuses_and_status_says_whose_service_it_is(dirs, systemd, monkeypatch):
    (dirs["home"] / "mondrian.toml").write_text('model = "smoke"\n')
    assert _act("install", dirs)[0] == 0
    unit = spec_for(dirs, platform="linux").unit_path
    other = dirs["tmp"] / "other home"
    other.mkdir()
    (other / "mondrian.toml").write_text('model = "smoke"\n')
    before = systemd()

    rc, _, err = _act("uninstall", dirs, home=other)
    assert rc == service.EX_CONFIG, err
    assert f"serves {dirs['home'].resolve()}, not {other.resolve()}" in err, err
    assert "service uninstall" in err and shell_word_of(dirs["home"].resolve()) in err, err
    assert unit.exists()
    assert systemd()[len(before):] == ["--user show-environment"]  # usable() only: nothing disabled or removed

    rc, out, err = _act("status", dirs, home=other)
    assert f"serves {dirs['home'].resolve()}, not {other.resolve()}" in out, out + err

    # `export MONDRIAN_HOME=…` (as `init` advises) names a home as --home does: it stopped and removed the other's.
    monkeypatch.setenv("MONDRIAN_HOME", str(other))
    for action in ("stop", "uninstall"):
        rc, _, err = _act(action, dirs, home=None)
        assert rc == service.EX_CONFIG and f"not {other.resolve()}" in err, (action, err)
    assert unit.exists()
    monkeypatch.delenv("MONDRIAN_HOME")

    assert _act("uninstall", dirs)[0] == 0  # its own home removes it
    assert not unit.exists()


def shell_word_of(path: Path) -> str:
    from daemon.hints import shell_word

    return shell_word(path)


def test_install_does_not_make_a_home_where_a_drive_should_be_mounted(dirs, systemd, monkeypatch):
    monkeypatch.setenv("HOME", str(dirs["user"]))  # the drive below is outside the user's home
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    drive = dirs["tmp"] / "drive"
    rc, out, err = _act("install", dirs, home=drive / "Mondrian", model="smoke")
    assert rc == service.EX_CONFIG, out + err
    assert f"{drive} does not exist" in err and "not connected" in err, err
    assert not drive.exists()
    assert not spec_for(dirs, platform="linux").unit_path.exists()


def test_retry_does_not_make_an_inbox_where_a_drive_should_be_mounted(dirs):
    from daemon.config import load_config
    from daemon.ledger import Ledger

    drive = dirs["tmp"] / "drive"
    home = dirs["tmp"] / "studio"
    (home / "outbox" / "failed").mkdir(parents=True)
    (home / "var").mkdir()
    (home / "mondrian.toml").write_text(f'model = "smoke"\ninbox = "{drive / "inbox"}"\n')
    kept = home / "outbox" / "failed" / "IMG_1.jpg"
    _photo(kept)
    ledger = Ledger.for_config(load_config(home, env={}))
    try:
        job = ledger.enqueue(drive / "inbox" / "IMG_1.jpg", "IMG_1.jpg", "ansel", "default", kept.stat().st_size,
                             kept.stat().st_mtime)
        assert ledger.claim().id == job.id
        ledger.fail(job.id, "the photo could not be decoded", kept)
    finally:
        ledger.close()

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONDRIAN_", "XDG_"))}
    env.update(HOME=str(dirs["user"]), HF_HUB_OFFLINE="1")  # the drive is outside the user's home
    proc = subprocess.run([str(PY), "-m", "daemon", "--home", str(home), "retry", "--failed", "--all"],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not drive.exists(), "retry made folders where the drive mounts"
    assert kept.exists()  # still where the failure left it
    assert f"{drive} does not exist" in proc.stderr and "0 photo(s) queued again" in proc.stderr, proc.stderr


def test_status_advises_service_start_only_where_a_service_is_installed(dirs, systemd):
    (dirs["home"] / "mondrian.toml").write_text('model = "smoke"\napi_port = 0\n')
    env = {**os.environ, "HOME": str(dirs["user"]), "MONDRIAN_HOME": str(dirs["home"]), "HF_HUB_OFFLINE": "1"}

    def daemon_line() -> str:
        out = subprocess.run([sys.executable, "-m", "daemon", "status"], env=env, cwd=dirs["tmp"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return next(line for line in out.stdout.splitlines() if line.startswith("Daemon:"))

    line = daemon_line()  # nothing installed: `service start` would only answer "not installed"
    assert "service install" in line and "service start" not in line, line
    rc, _, err = _act("install", dirs)
    assert rc == 0, err
    line = daemon_line()
    assert "service start" in line, line


def test_status_without_the_service_manager_still_says_whether_the_service_is_installed(dirs):
    """Attack: on a machine where `systemctl --user` cannot reach a user session, `service status` said only that,
    so a person could not tell an installed service from none."""
    if _systemd_user_usable():
        pytest.skip("this machine has a systemd user session")
    rc, out, err = _act("status", dirs)
    assert rc == service.EX_UNAVAILABLE and "systemctl --user" in err, err
    unit = spec_for(dirs, platform="linux").unit_path
    assert f"mondrian: not installed ({unit})" in out.replace(f"{service.DEFAULT_LABEL}:", "mondrian:"), out
    unit.parent.mkdir(parents=True)
    unit.write_text(service.render(spec_for(dirs, platform="linux"))[1])
    rc, out, err = _act("status", dirs)
    assert f"mondrian: installed ({unit})" in out.replace(f"{service.DEFAULT_LABEL}:", "mondrian:"), out


def test_install_says_where_the_model_comes_from_and_a_pin_from_the_shell_is_not_silent(dirs, systemd, monkeypatch):
    """MONDRIAN_MODEL left exported in the installing shell pinned the service's model without a word: editing
    mondrian.toml then seemed to do nothing."""
    (dirs["home"] / "mondrian.toml").write_text('model = "smoke"\n')
    rc, out, err = _act("install", dirs)
    assert rc == 0, err
    assert "Model: smoke, read from mondrian.toml at each start" in out, out
    monkeypatch.setenv("MONDRIAN_MODEL", "smoke")
    rc, out, err = _act("install", dirs)
    assert rc == 0, err
    assert "pinned by MONDRIAN_MODEL, set in this shell: editing mondrian.toml will not change it" in out, out
    assert "unset MONDRIAN_MODEL" in out, out
    assert 'Environment="MONDRIAN_MODEL=smoke"' in spec_for(dirs, platform="linux").unit_path.read_text()
    rc, out, err = _act("install", dirs, model="smoke")
    assert rc == 0 and "pinned by --model" in out and "this shell" not in out, out


def test_settings_from_the_installing_shell_reach_the_service_and_are_said(dirs, systemd, monkeypatch):
    """`export MONDRIAN_LEDGER_URL=postgresql://…` (the README's alternative to ledger_url) then `service install`:
    `run` from that shell used the studio's shared queue, but the service was written without it and kept a private
    ledger beside the shared inbox and outbox. Every setting the shell's environment gives now reaches the service,
    and install says so; hints in the service's log name the command that installed it."""
    url = "postgresql://mondrian@studio-nas.local/mondrian"
    spec = service.build_spec(platform="linux", home=dirs["home"], user_home=dirs["user"], model="smoke",
                              env={"MONDRIAN_LEDGER_URL": url, "ANALYSIS_MODE": "baseline", "MONDRIAN_HOME": "x"})
    unit = service.render_unit(spec)
    assert f'Environment="MONDRIAN_LEDGER_URL={url}"' in unit and 'Environment="ANALYSIS_MODE=baseline"' in unit
    assert "MONDRIAN_LEDGER_URL (ledger_url)" in spec.settings_line and "ANALYSIS_MODE" in spec.settings_line
    assert spec.environment["MONDRIAN_PROGRAM"]
    # What the service's own python reads in the service's own environment: the shared ledger, the mode.
    probe = subprocess.run([str(PY), "-c", "from daemon.config import load_config; c = load_config(); "
                            "print(c.ledger_url, c.default_mode)"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                           env={"HOME": str(dirs["user"]), "PATH": os.environ["PATH"], **spec.environment},
                           timeout=120)
    assert probe.stdout.split() == [url, "baseline"], probe.stderr
    plain = service.build_spec(platform="linux", home=dirs["home"], user_home=dirs["user"], model="smoke", env={})
    assert plain.settings_line is None and "MONDRIAN_LEDGER_URL" not in service.render_unit(plain)

    # Installed for real: the unit holds the URL (a password, often): readable by this user only.
    monkeypatch.setenv("MONDRIAN_LEDGER_URL", url.replace("mondrian@", "mondrian:secret@"))
    (dirs["home"] / "mondrian.toml").write_text('model = "smoke"\n')
    rc, _, err = _act("install", dirs)
    assert rc == 0, err
    assert stat.S_IMODE(spec.unit_path.stat().st_mode) == 0o600
    # A stale setting in a later shell is not the installed service's: it does not block stopping it.
    monkeypatch.delenv("MONDRIAN_LEDGER_URL")
    monkeypatch.setenv("ANALYSIS_MODE", "bogus")
    rc, _, err = _act("stop", dirs)
    assert rc == 0 and "bogus" not in err, err


def test_a_service_that_cannot_start_does_not_grow_its_log_for_ever(dirs):
    """A typo in mondrian.toml: the service exits 78 and is started again every 30 s, each start adding its lines to
    the log; only a running daemon rotated it (~1.3 MB a day, without end). Each start now rotates it first."""
    (dirs["home"] / "mondrian.toml").write_text('max_pixels = "lots"\n')
    log = dirs["tmp"] / "mondrian.err.log"
    log.write_text("x" * 5000 + "\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MONDRIAN_")},
           "MONDRIAN_HOME": str(dirs["home"]), "MONDRIAN_LOG_ROTATE": "1", "MONDRIAN_LOG_MAX_BYTES": "2000",
           "MONDRIAN_LOG_BACKUPS": "1", "HOME": str(dirs["user"])}
    for _ in range(3):
        with open(log, "a") as fh:
            proc = subprocess.run([str(PY), "-m", "daemon", "run"], cwd=PROJECT_ROOT, env=env, stdout=fh,
                                  stderr=fh, timeout=120)
        assert proc.returncode == 78
    assert log.stat().st_size < 2000 + 1000, log.stat().st_size  # this start's lines only
    assert log.with_name("mondrian.err.log.1").exists() and not log.with_name("mondrian.err.log.2").exists()
    assert "max_pixels" in log.read_text()


@needs_daemon
def test_install_and_start_refuse_while_a_daemon_run_by_hand_serves_the_home(dirs, systemd, monkeypatch):
    """Attack: `mondrian run` left in a terminal, then `service install`: the service found the home taken and
    exited 78 every 30 s, silently, for as long as the terminal's daemon ran. Install, start and restart now refuse
    and name the daemon to stop; once it is stopped, install goes through."""
    (dirs["home"] / "mondrian.toml").write_text('model = "smoke"\napi_port = 0\n')
    monkeypatch.delenv("MONDRIAN_HOME", raising=False)
    rc, _, err = _act("install", dirs)  # installed while nothing else runs: the service serves this home
    assert rc == 0, err
    spec_for(dirs, platform="linux").unit_path.unlink()  # as if never installed, for the refusals below
    (dirs["tmp"] / "systemctl.calls").unlink()
    by_hand = subprocess.Popen([sys.executable, "-m", "daemon", "--home", str(dirs["home"]), "run"],
                               env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=dirs["tmp"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = dirs["home"] / "var" / "daemon.lock"
        deadline = time.monotonic() + 120
        while service.lock_holder(lock) is None and time.monotonic() < deadline and by_hand.poll() is None:
            time.sleep(0.2)
        assert service.lock_holder(lock) == by_hand.pid
        for action in ("install", "start", "restart"):
            rc, _, err = _act(action, dirs)
            assert rc != 0 and f"pid {by_hand.pid}" in err and "started by hand" in err, (action, err)
        acted = [c for c in systemd() if c.split()[1] in ("daemon-reload", "enable", "start", "restart")]
        assert acted == [] and not spec_for(dirs, platform="linux").unit_path.exists(), systemd()
        # A plain `service restart` (no home named) is about the home the installed service serves, not the default.
        unit = spec_for(dirs, platform="linux").unit_path
        unit.write_text(service.render(spec_for(dirs, platform="linux"))[1])
        rc, _, err = _act("restart", dirs, home=None)
        assert rc != 0 and f"pid {by_hand.pid}" in err, err
        unit.unlink()
        # The service's own daemon (an upgrade's install, a restart) holds the same lock: that one is let through.
        fake = dirs["tmp"] / "fakebin" / "systemctl"
        fake.write_text(FAKE_SYSTEMCTL.replace("exit 0", f'case "$*" in *MainPID*) echo {by_hand.pid};; esac\nexit 0'))
        for action in ("install", "restart"):
            rc, _, err = _act(action, dirs)
            assert rc == 0, (action, err)
    finally:
        by_hand.terminate()
        by_hand.wait(timeout=60)
    rc, _, err = _act("install", dirs)
    assert rc == 0, err
    assert "--user restart mondrian.service" in systemd()
