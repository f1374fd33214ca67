"""A studio's own advisor definitions (`<home>/advisors/<id>/advisor.toml`) as people really write them: saved in
Latin-1 by an old editor, an id that is not the folder's name, a missing prompt, or something that is not a file at
all. One bad definition must say what is wrong with it, and never stop (or hang) the rest of Mondrian."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.harness import Daemon, ledger_jobs, make_home, mondrian, photo, wait_for

FAST = dict(max_pixels=56 * 56, comment_max_chars=8, max_tokens=400, quiet_seconds=0.2, rescan_seconds=1,
            retry_base_seconds=0.2, api_port=0)
GOOD = 'id = "monet"\nname = "Claude Monet"\nprompt = "You are Claude Monet; judge the light."\n'

BROKEN = {  # what advisors/monet/advisor.toml holds: what `--advisor monet` must say about it
    "latin-1": ('id = "monet"\nname = "Claude Mon\xe9t"\nprompt = "x"\n'.encode("latin-1"), "is not UTF-8 text"),
    "another id": (b'id = "claude"\nname = "Claude Monet"\nprompt = "x"\n',
                   "its id 'claude' is not its folder's name 'monet'"),
    "no prompt": (b'id = "monet"\nname = "Claude Monet"\n', "has no prompt"),
    "empty prompt": (b'id = "monet"\nname = "Claude Monet"\nprompt = "  "\n', "its prompt is empty"),
    "unclosed string": (b'id = "monet"\nname = "Claude Monet"\nprompt = """\nYou are Monet.\n', "is not valid TOML"),
    "a named pipe": (None, "named pipe (FIFO)"),
    "flip as text": (b'id = "monet"\nname = "Claude Monet"\nprompt = "x"\nflip_augmentation = "no"\n',
                     "flip_augmentation must be true or false"),
}


def _write_definition(home: Path, content: bytes | None) -> Path:
    toml = home / "advisors" / "monet" / "advisor.toml"
    toml.parent.mkdir(parents=True, exist_ok=True)
    if content is None:
        os.mkfifo(toml)  # nothing ever writes to it: reading it would wait for ever
    else:
        toml.write_bytes(content)
    return toml


@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_broken_advisor_definition_says_why_and_the_rest_of_mondrian_goes_on(tmp_path, smoke_model_path, kind):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    content, why = BROKEN[kind]
    _write_definition(home, content)
    try:
        listed = mondrian(home, smoke_model_path, "status", "--json", timeout=30)
        asked = mondrian(home, smoke_model_path, "references", "list", "--advisor", "monet", timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{kind}: a command hung on advisors/monet/advisor.toml")
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    assert asked.returncode == 2 and "Traceback" not in asked.stderr, asked.stderr
    assert "advisors/monet/advisor.toml" in asked.stderr and why in asked.stderr, asked.stderr
    assert "Add one as" not in asked.stderr  # it is there: asking for it again is not the advice
    # The built-in advisors are untouched by it.
    assert mondrian(home, smoke_model_path, "references", "list", "--advisor", "cartier").returncode == 0


def test_a_settings_file_that_is_a_named_pipe_is_one_line_not_a_hang(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    (home / "mondrian.toml").unlink()
    os.mkfifo(home / "mondrian.toml")
    try:
        out = mondrian(home, smoke_model_path, "status", timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("`mondrian status` hung on a mondrian.toml that is a named pipe")
    assert out.returncode == 78 and "Traceback" not in out.stderr, out.stderr
    assert "named pipe (FIFO)" in out.stderr and "mondrian.toml" in out.stderr, out.stderr


def test_photos_for_an_advisor_whose_definition_is_broken_fail_saying_so_and_work_once_it_is_fixed(
        tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    toml = _write_definition(home, BROKEN["latin-1"][0])
    with Daemon(home, smoke_model_path) as d:
        photo(home / "inbox" / "monet" / "waterlilies.jpg", seed=1, size=(64, 48))
        jobs = wait_for(lambda: (lambda j: j if j.get("monet/waterlilies.jpg") and
                                 j["monet/waterlilies.jpg"].state == "failed" else None)(ledger_jobs(home)), 60,
                        what="the photo for the broken advisor failed")
        failed = jobs["monet/waterlilies.jpg"]
        # Not critiqued by the default advisor in monet's place: failed, naming the file and what is wrong.
        assert failed.advisor == "monet" and "not UTF-8" in failed.error, (failed.advisor, failed.error)
        assert str(home) not in failed.error  # the reason reaches the failure page, which shows no absolute path
        record = json.loads((home / "outbox" / "failed" / "waterlilies.jpg.error.json").read_text())
        assert "advisors/monet/advisor.toml" in json.dumps(record)
        # The studio fixes the file while Mondrian runs: the next photo for monet is monet's, with no restart.
        toml.write_text(GOOD, encoding="utf-8")
        photo(home / "inbox" / "monet" / "haystacks.jpg", seed=2, size=(64, 48))
        done = wait_for(lambda: (lambda j: j.get("monet/haystacks.jpg") if j.get("monet/haystacks.jpg") and
                                 j["monet/haystacks.jpg"].state == "done" else None)(ledger_jobs(home)), 60,
                        what="the photo for the fixed advisor was critiqued")
        assert d.stop() == 0
    report = json.loads(Path(done.report_json).read_text())
    assert report["advisor"]["id"] == "monet" and report["advisor"]["name"] == "Claude Monet", report["advisor"]


def test_a_broken_override_of_a_built_in_advisor_is_refused_not_replaced_by_the_built_in(tmp_path,
                                                                                        smoke_model_path):
    """A studio that replaces a built-in advisor's prompt (advisors/cartier/advisor.toml) and breaks the file gets
    the file named, as for an advisor of its own: never the built-in prompt it meant to replace, silently."""
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    toml = home / "advisors" / "cartier" / "advisor.toml"
    toml.parent.mkdir(parents=True)
    toml.write_text('id = "cartier"\nname = "Our Cartier"\nprompt = """\nYou are our Cartier.\n', encoding="utf-8")
    asked = mondrian(home, smoke_model_path, "references", "list", "--advisor", "cartier", timeout=30)
    assert asked.returncode == 2 and "advisors/cartier/advisor.toml" in asked.stderr, asked.stderr
    assert "is not valid TOML" in asked.stderr, asked.stderr
    # The other built-in advisors go on.
    assert mondrian(home, smoke_model_path, "references", "list", "--advisor", "ansel").returncode == 0


def test_an_advisor_folder_named_as_a_person_names_it_fails_with_advice_that_works(tmp_path, smoke_model_path):
    """`advisors/Degas/` (id "degas") and `advisors/Claude Monet/` (id "Claude Monet"), as people name folders on a
    Mac: their inbox folders' photos were critiqued by the default advisor in silence; "make them the same" led to an
    id refused in turn; `--advisor Degas` said "add advisors/degas/advisor.toml", the very file there on a Mac; and
    after the fix, `retry --failed` skipped the photos as "nothing has changed". Now each photo fails naming its
    definition, the advice's command works as pasted, and retry finishes them as the advisor meant."""
    import re
    import shlex

    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    degas = home / "advisors" / "Degas" / "advisor.toml"
    degas.parent.mkdir(parents=True)
    degas.write_text('id = "degas"\nname = "Edgar Degas"\nprompt = "You are Degas; judge the movement."\n')
    monet = home / "advisors" / "Claude Monet" / "advisor.toml"
    monet.parent.mkdir(parents=True)
    monet.write_text('id = "Claude Monet"\nname = "Claude Monet"\nprompt = "You are Monet; judge the light."\n')
    # An id that is fine but not the folder's name: the inbox's folder is named after the person, as the
    # definition's folder was; renaming the definition's folder (the advice) used to leave the photo's folder naming
    # no advisor (`Henri Matisse` is no id), so retry failed it again. The display name selects the advisor.
    matisse = home / "advisors" / "Henri Matisse" / "advisor.toml"
    matisse.parent.mkdir(parents=True)
    matisse.write_text('id = "matisse"\nname = "Henri Matisse"\nprompt = "You are Matisse; judge the colour."\n')
    photo(home / "inbox" / "Degas" / "dancers.jpg", seed=3, size=(64, 48))
    photo(home / "inbox" / "Claude Monet" / "lilies.jpg", seed=4, size=(64, 48))
    photo(home / "inbox" / "Henri Matisse" / "dance.jpg", seed=5, size=(64, 48))

    out = mondrian(home, smoke_model_path, "run", "--once", timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = ledger_jobs(home)
    dancers, lilies, dance = jobs["Degas/dancers.jpg"], jobs["Claude Monet/lilies.jpg"], jobs["Henri Matisse/dance.jpg"]
    assert dancers.state == lilies.state == dance.state == "failed", \
        (dancers.state, dancers.advisor, lilies.state, lilies.advisor, dance.state, dance.advisor)
    assert "rename its folder to matisse" in dance.error, dance.error
    assert "rename its folder to degas" in dancers.error, dancers.error
    assert 'write id = "claude-monet"' in lilies.error and "rename its folder to claude-monet" in lilies.error, \
        lilies.error
    record = json.loads((home / "outbox" / "failed" / "dancers.jpg.error.json").read_text())
    assert "definition" in json.dumps(record) and "re-export" not in json.dumps(record), record

    asked = mondrian(home, smoke_model_path, "references", "list", "--advisor", "Degas", timeout=30)
    assert asked.returncode == 2 and "rename its folder to degas" in asked.stderr, asked.stderr
    assert "Add one as" not in asked.stderr, asked.stderr

    for error in (dancers.error, lilies.error, dance.error):  # what the reason says, pasted into a shell in the home
        command = re.search(r"`(mv [^`]+)`", error).group(1)
        done = subprocess.run(["bash", "-c", command], cwd=home, capture_output=True, text=True)
        assert done.returncode == 0, (command, done.stderr)
    fixed = home / "advisors" / "claude-monet" / "advisor.toml"
    fixed.write_text(fixed.read_text().replace('id = "Claude Monet"', 'id = "claude-monet"'))

    again = mondrian(home, smoke_model_path, "retry", "--failed", timeout=60)
    assert again.returncode == 0 and "skipped" not in again.stdout + again.stderr, again.stdout + again.stderr
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    critiqued = {p: j for p, j in ledger_jobs(home).items() if j.state == "done"}
    assert len(critiqued) == 3, {p: (j.state, j.advisor, j.error) for p, j in ledger_jobs(home).items()}
    by = {p: json.loads(Path(j.report_json).read_text())["advisor"]["id"] for p, j in critiqued.items()}
    assert by == {"Degas/dancers.jpg": "degas", "Claude Monet/lilies.jpg": "claude-monet",
                  "Henri Matisse/dance.jpg": "matisse"}, by
    # A photo dropped later into the folder named after the person goes to that advisor too, not the default.
    photo(home / "inbox" / "Henri Matisse" / "later.jpg", seed=6, size=(64, 48))
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=180)
    later = ledger_jobs(home)["Henri Matisse/later.jpg"]
    assert later.state == "done" and later.advisor == "matisse", (later.state, later.advisor, later.error)
    assert shlex  # (imported for the advice's quoting, checked by running it)


def test_an_advisor_prompt_too_long_for_the_model_is_refused_not_a_crash(tmp_path, smoke_model_path):
    """A ~105 KB prompt was accepted and its prefill asked for 51 GB: the daemon died (SIGSEGV) on every photo for
    that advisor, and again after each restart. A prompt past 32,000 characters is refused as a definition; one
    within that but past 8,192 tokens (emoji: several tokens each) fails its photo before the prefill, saying
    what to shorten, and the daemon goes on with the next photo."""
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    for advisor, prompt in (("essay", "Light matters. " * 2200), ("emoji", "\U0001f4f7\u2728" * 2500)):
        toml = home / "advisors" / advisor / "advisor.toml"
        toml.parent.mkdir(parents=True)
        toml.write_text(f'id = "{advisor}"\nname = "{advisor.title()}"\nprompt = "{prompt}"\n', encoding="utf-8")
        photo(home / "inbox" / advisor / f"{advisor}.jpg", seed=5, size=(64, 48))
    photo(home / "inbox" / "after.jpg", seed=6, size=(64, 48))
    asked = mondrian(home, smoke_model_path, "references", "list", "--advisor", "essay", timeout=30)
    assert asked.returncode == 2 and "32,999 characters" in asked.stderr and "shorten it" in asked.stderr, \
        asked.stderr

    out = mondrian(home, smoke_model_path, "run", "--once", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = ledger_jobs(home)
    assert jobs["after.jpg"].state == "done", jobs["after.jpg"].error
    essay, emoji = jobs["essay/essay.jpg"], jobs["emoji/emoji.jpg"]
    assert essay.state == "failed" and "shorten it" in essay.error, essay.error
    assert emoji.state == "failed" and "more than the 8,192 Mondrian gives a critique" in emoji.error, emoji.error
    assert emoji.error_kind == "permanent" and "advisors/<id>/advisor.toml" in emoji.error, emoji.error


def test_settings_and_advisor_files_saved_with_a_bom_are_read(tmp_path, smoke_model_path):
    """Notepad's or TextEdit's "UTF-8 with BOM": mondrian.toml and advisor.toml were refused as "Invalid statement
    (at line 1, column 1)", an error no one can see in the file. Their settings are read as written; a default advisor
    written as a name is (`Monet`), as in the inbox's folders and the API."""
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    settings = home / "mondrian.toml"
    settings.write_bytes(b"\xef\xbb\xbf" + settings.read_bytes() + b'default_advisor = "Monet"\n')  # as it is written
    _write_definition(home, b"\xef\xbb\xbf" + GOOD.encode())
    out = mondrian(home, smoke_model_path, "status", "--json", timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["default_advisor"] == "monet"
    assert mondrian(home, smoke_model_path, "references", "list", "--advisor", "monet").returncode == 0


@pytest.mark.parametrize("seed", ["1", "2", "3"])
def test_a_studio_override_in_a_folder_of_another_case_never_falls_back_to_the_built_in(tmp_path, smoke_model_path,
                                                                                       seed):
    """`advisors/Cartier/advisor.toml` (id "cartier"), a studio's override of the built-in cartier, refused for its
    folder's case: photos in `inbox/cartier/` were critiqued by the built-in cartier or failed, by the hash seed of
    the run. They always fail naming the studio's file, with a fix that works on a Mac's disk too (two steps)."""
    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    toml = home / "advisors" / "Cartier" / "advisor.toml"
    toml.parent.mkdir(parents=True)
    toml.write_text('id = "cartier"\nname = "Our Cartier"\nprompt = "You are our Cartier."\n')
    photo(home / "inbox" / "cartier" / "street.jpg", seed=1, size=(64, 48))
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=180, PYTHONHASHSEED=seed)
    assert out.returncode == 0, out.stderr[-3000:]
    job = ledger_jobs(home)["cartier/street.jpg"]
    assert job.state == "failed" and "advisors/Cartier/advisor.toml" in job.error, (job.state, job.error)
    assert ".renaming && mv " in job.error, job.error


def test_a_folder_named_as_a_person_goes_to_the_advisor_of_that_id_before_one_of_that_display_name(tmp_path,
                                                                                                   smoke_model_path):
    """`inbox/Ansel Adams/` is the built-in `ansel` (named "Ansel Adams"); but where a studio has its own advisor
    `ansel-adams`, the folder named as a person names it was that one's, and a display name must not take it over."""
    from daemon.analysis.advisors import advisor_folders
    from daemon.config import load_config
    from daemon.intake.inbox import classify

    home = make_home(tmp_path / "home", smoke_model_path, **FAST)
    cfg = load_config(home, env={})
    inbox = cfg.inbox
    assert classify(inbox / "Ansel Adams" / "a.jpg", inbox, advisor_folders(cfg), "cartier").advisor == "ansel"
    own = home / "advisors" / "ansel-adams" / "advisor.toml"
    own.parent.mkdir(parents=True)
    own.write_text('id = "ansel-adams"\nname = "Our Ansel"\nprompt = "You are our Ansel."\n')
    assert classify(inbox / "Ansel Adams" / "a.jpg", inbox, advisor_folders(cfg), "cartier").advisor == "ansel-adams"
    assert classify(inbox / "Our Ansel" / "a.jpg", inbox, advisor_folders(cfg), "cartier").advisor == "ansel-adams"
    assert classify(inbox / "album" / "a.jpg", inbox, advisor_folders(cfg), "cartier").advisor == "cartier"
