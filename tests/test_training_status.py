"""`mondrian status` while an advisor's adapter is being trained: a second training of the same advisor, refused
because the first holds the advisor's lock, leaves the running one's record alone (it once wrote "ansel failed"
over it), and the evaluation after the last step shows no time left of the steps. Real ledger, real lock, real
`mondrian train` and `mondrian status` processes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from daemon.config import load_config
from tests.harness import REPO, env_for, make_home, mondrian, status

NIGHTLY = """import sys
from daemon.config import load_config
from daemon.ledger import Ledger
from jobs.nightly import train_and_record
cfg = load_config(sys.argv[1], env={}, model=sys.argv[2])
print(train_and_record(cfg, Ledger(cfg.db_path), "ansel").reason)
"""


def test_a_refused_second_training_leaves_the_running_ones_record_alone(tmp_path: Path,
                                                                         smoke_model_path: Path) -> None:
    from daemon.ledger import Ledger
    from daemon.model.adapter_store import AdapterStore
    from jobs.nightly import ProgressRecorder

    home = make_home(tmp_path / "home", smoke_model_path)
    cfg = load_config(home, env={}, model=str(smoke_model_path))
    cfg.ensure_dirs()
    ledger = Ledger(cfg.db_path)
    try:
        # This process is the trainer: it holds ansel's lock, as `run_training` does for the whole run, and records
        # its progress the way `mondrian train` and the nightly job do.
        with AdapterStore(cfg.adapters_dir).lock("ansel"):
            trainer = ProgressRecorder(ledger, "ansel")
            trainer({"event": "progress", "phase": "training", "step": 3, "steps": 10, "loss": 0.5, "eta_s": 42.0})

            second = mondrian(home, smoke_model_path, "train", "--advisor", "ansel", timeout=120)
            assert second.returncode == 1, (second.returncode, second.stderr[-2000:])
            assert "being trained or promoted by another process" in second.stderr, second.stderr[-2000:]
            assert "status` shows its progress); try again when it has finished" in second.stderr  # a next step
            # The daemon's nightly check, in a process of its own, refused the same way: the record stays too.
            nightly = subprocess.run([sys.executable, "-c", NIGHTLY, str(home), str(smoke_model_path)], cwd=REPO,
                                     env=env_for(home, smoke_model_path), capture_output=True, text=True, timeout=120)
            assert nightly.returncode == 0 and "being trained" in nightly.stdout, (nightly.stdout, nightly.stderr)

            info = status(home, smoke_model_path)["training"]
            assert info["state"] == "running" and info["step"] == 3 and "reason" not in info, info
            text = mondrian(home, smoke_model_path, "status").stdout
            assert "Training: ansel (training) step 3/10 loss 0.500, about 0 min 42 s left" in text, text
            assert "ansel failed" not in text, text

            # Evaluating after the last step: the steps' time left (0 s by then) is not the evaluation's.
            trainer({"event": "progress", "phase": "training", "step": 10, "steps": 10, "loss": 0.4, "eta_s": 0.0})
            trainer({"event": "phase", "phase": "evaluating", "held_out": 4})
            trainer({"event": "progress", "phase": "evaluating", "label": "candidate", "step": 1, "steps": 4})
            text = mondrian(home, smoke_model_path, "status").stdout
            line = next(line for line in text.splitlines() if line.startswith("Training:"))
            assert line.startswith("Training: ansel (evaluating)") and " left" not in line, text
            assert "step 10/10" not in line, text  # the steps are over; the photos scored are counted instead
            time.sleep(1.1)  # the recorder writes progress at most once a second
            trainer({"event": "progress", "phase": "evaluating", "label": "candidate", "step": 2, "steps": 4})
            text = mondrian(home, smoke_model_path, "status").stdout
            assert "Training: ansel (evaluating) photo 2/4 loss 0.400\n" in text, text
    finally:
        ledger.close()


def test_a_training_refused_for_a_bad_lora_setting_is_not_shown_as_a_stopped_run(tmp_path: Path,
                                                                                  smoke_model_path: Path) -> None:
    """Attack: `[lora] alpha = inf`, then `mondrian train`: it was refused, yet status said "Training: ansel stopped
    (the process that ran it is gone before it finished)" and advised running the same refused command again."""
    home = make_home(tmp_path / "home", smoke_model_path)
    with (home / "mondrian.toml").open("a") as f:
        f.write("\n[lora]\nalpha = inf\n")
    out = mondrian(home, smoke_model_path, "train", "--advisor", "ansel")
    assert out.returncode == 78 and "it must be a finite number" in out.stderr, out.stderr[-2000:]
    text = (home / "mondrian.toml").read_text()
    (home / "mondrian.toml").write_text(text.replace("\n[lora]\nalpha = inf\n", "\n"))
    assert "training" not in status(home, smoke_model_path)


KILLED_WHILE_PROMOTING = """import os, sys
from daemon.config import load_config
from daemon.ledger import Ledger
from jobs.nightly import ProgressRecorder
from tests.lora_helpers import install_version
cfg = load_config(sys.argv[1], env={}, model=sys.argv[2])
recorder = ProgressRecorder(Ledger(cfg.db_path), "ansel")
recorder({"event": "phase", "phase": "promoting", "reason": "better on the test photos"})
install_version(cfg, "ansel", promoted=True, fingerprint=sys.argv[3])  # MONDRIAN_TEST_CRASH_AT may kill it here
os.kill(os.getpid(), 9)  # else killed after the switch, before its outcome was recorded
"""


def test_a_training_killed_while_promoting_says_what_became_of_its_version(tmp_path: Path,
                                                                          smoke_model_path: Path) -> None:
    """Attack: a training SIGKILLed while it promoted its version: status said "nothing was promoted" while
    `adapters` listed the new version as promoted (and, once finished, current)."""
    from tests.lora_helpers import install_version

    home = make_home(tmp_path / "home", smoke_model_path)
    cfg = load_config(home, env={}, model=str(smoke_model_path))
    cfg.ensure_dirs()
    install_version(cfg, "ansel", promoted=True, fingerprint="f1")

    def killed(fingerprint: str, **env: str) -> str:
        run = subprocess.run([sys.executable, "-c", KILLED_WHILE_PROMOTING, str(home), str(smoke_model_path),
                              fingerprint], cwd=REPO, env=env_for(home, smoke_model_path, **env), timeout=120)
        assert run.returncode == -9
        text = mondrian(home, smoke_model_path, "status").stdout
        return next(line for line in text.splitlines() if line.startswith("Training:"))

    # Killed between the version's rename and the switch of `current`.
    line = killed("f2", MONDRIAN_TEST_CRASH_AT="promoting")
    assert "nothing was promoted" not in line and "v0002 was promoted but not yet made current" in line, line
    assert mondrian(home, smoke_model_path, "adapters").returncode == 0  # as the line advises: it finishes it
    assert status(home, smoke_model_path)["training"]["reason"].endswith("v0002 was promoted and is current")
    # Killed after the switch, before its outcome was recorded.
    line = killed("f3")
    assert "v0003 was promoted and is current" in line, line
    # Rolled back since: no promotion is waiting to be finished (`adapters` would do nothing), so none is advised.
    from daemon.model.adapter_store import AdapterStore

    assert AdapterStore(cfg.adapters_dir).rollback("ansel") == ("v0003", "v0002")
    reason = status(home, smoke_model_path)["training"]["reason"]
    assert reason.endswith("v0003 was promoted, and v0002 has been made current since"), reason
