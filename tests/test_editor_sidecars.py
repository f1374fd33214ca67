"""Editors' sidecars dropped with their photos (Lightroom's `IMG_1.xmp`, darktable's `IMG_1.NEF.xmp`, an iPhone's
`IMG_1.AAE`) are never photos: they ride along with their photo, and the photographer's XMP is merged into
Mondrian's, read back with exiftool (a reader independent of exiv2, which wrote it)."""

from __future__ import annotations

import json
from pathlib import Path

from corpus import dng, raw_scene
from tests.harness import Daemon, ledger_jobs, make_home, mondrian, photo
from tests.test_xmp import exiftool

THEIRS = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
          b'<rdf:Description rdf:about="" xmlns:crs="http://ns.adobe.com/camera-raw-settings/1.0/" '
          b'xmlns:dc="http://purl.org/dc/elements/1.1/" crs:Exposure2012="+0.50">'
          b'<dc:subject><rdf:Bag><rdf:li>family</rdf:li></rdf:Bag></dc:subject>'
          b'</rdf:Description></rdf:RDF></x:xmpmeta>')


def drop(inbox: Path) -> dict[str, bytes]:
    files = {"IMG_8.NEF": dng(raw_scene(8)), "IMG_8.xmp": THEIRS, "IMG_8.NEF.xmp": b"<darktable/>",
             "IMG_8.AAE": b"<plist/>", "lonely.xmp": THEIRS, "broken.jpg": b"\xff\xd8\xff not a photo",
             "broken.XMP": THEIRS}
    for name, data in files.items():
        (inbox / name).write_bytes(data)
    return files


def test_editor_sidecars_are_never_photos_and_ride_along_with_theirs(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    files = drop(inbox)
    private = tmp_path / "someone else" / "private.xmp"  # a link's target is not read into the report
    private.parent.mkdir()
    private.write_bytes(THEIRS)
    photo(inbox / "IMG_9.jpg", seed=9)
    (inbox / "IMG_9.xmp").symlink_to(private)
    with Daemon(home, smoke_model_path, "--once") as d:
        assert d.wait(300) == 0, d.output()

    linked = outbox / "IMG_9" / "IMG_9.xmp"
    assert "family" not in (exiftool(linked)[str(linked)].get("Subject") or [])
    assert (outbox / "IMG_9" / "IMG_9.original.xmp").is_symlink() and private.read_bytes() == THEIRS
    jobs = ledger_jobs(home)
    assert sorted(jobs) == ["IMG_8.NEF", "IMG_9.jpg", "broken.jpg"]  # no sidecar became a job, so none failed as "not a photo"
    assert jobs["IMG_8.NEF"].state == "done" and jobs["broken.jpg"].state == "failed"
    folder = outbox / "IMG_8"
    assert sorted(p.name for p in folder.iterdir()) == [
        "IMG_8.AAE", "IMG_8.NEF", "IMG_8.NEF.xmp", "IMG_8.original.xmp", "IMG_8.xmp", "preview.jpg", "report.html",
        "report.json", "thumb.jpg"]
    for name in ("IMG_8.AAE", "IMG_8.NEF", "IMG_8.NEF.xmp"):
        assert (folder / name).read_bytes() == files[name], name
    assert (folder / "IMG_8.original.xmp").read_bytes() == THEIRS  # theirs, byte for byte
    merged = exiftool(folder / "IMG_8.xmp", tags=("-XMP-crs:Exposure2012",))[str(folder / "IMG_8.xmp")]
    report = json.loads((folder / "report.json").read_text())
    assert merged["Exposure2012"] in ("+0.50", 0.5)  # their develop setting, for Lightroom
    assert merged["Subject"][0] == "family" and f"mondrian:grade={report['overall_grade']}" in merged["Subject"]
    assert merged["Label"] == f"{report['advisor']['name']} ({report['mode']['effective']})"
    # A failed photo keeps its sidecar beside it in failed/; a sidecar without a photo stays where it was.
    assert (outbox / "failed" / "broken.XMP").read_bytes() == THEIRS
    assert sorted(p.name for p in inbox.iterdir()) == ["lonely.xmp"]


def test_with_keep_originals_their_sidecars_stay_and_mondrians_xmp_still_merges_theirs(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, keep_originals=True)
    inbox, outbox = home / "inbox", home / "outbox"
    photo(inbox / "IMG_1.jpg", seed=1)
    (inbox / "IMG_1.xmp").write_bytes(THEIRS)
    before = {p.name: p.read_bytes() for p in inbox.iterdir()}
    with Daemon(home, smoke_model_path, "--once") as d:
        assert d.wait(300) == 0, d.output()
    assert sorted(ledger_jobs(home)) == ["IMG_1.jpg"]
    assert {p.name: p.read_bytes() for p in inbox.iterdir()} == before  # the photographer's files are untouched
    sidecar = outbox / "IMG_1" / "IMG_1.xmp"
    merged = exiftool(sidecar, tags=("-XMP-crs:Exposure2012",))[str(sidecar)]
    assert merged["Exposure2012"] in ("+0.50", 0.5) and "family" in merged["Subject"]
    assert not (outbox / "IMG_1" / "IMG_1.original.xmp").exists()  # nothing of theirs was moved


def test_retry_failed_brings_their_sidecar_back_with_the_photo(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox, failed = home / "inbox", home / "outbox" / "failed"
    (inbox / "broken.jpg").write_bytes(b"\xff\xd8\xff not a photo")
    (inbox / "broken.xmp").write_bytes(THEIRS)
    with Daemon(home, smoke_model_path, "--once") as d:
        assert d.wait(300) == 0, d.output()
    assert (failed / "broken.xmp").read_bytes() == THEIRS
    photo(failed / "broken.jpg", seed=3)  # the photographer puts the good file in its place, as the record says
    out = mondrian(home, smoke_model_path, "retry", "--failed")
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(p.name for p in inbox.iterdir()) == ["broken.jpg", "broken.xmp"]
    with Daemon(home, smoke_model_path, "--once") as d:
        assert d.wait(300) == 0, d.output()
    sidecar = home / "outbox" / "broken" / "broken.xmp"
    assert "family" in exiftool(sidecar)[str(sidecar)]["Subject"]
    assert (home / "outbox" / "broken" / "broken.original.xmp").read_bytes() == THEIRS


def test_an_unreadable_or_non_xmp_sidecar_leaves_mondrians_xmp_its_own():
    import io

    from PIL import Image

    from daemon.pipeline.xmp import sidecar_bytes

    report = {"photo": {"file": "x.jpg"}, "overall_grade": 7, "summary": "s", "advisor": {"id": "a", "name": "A"},
              "mode": {"effective": "baseline"}, "model": {"adapter": None, "smoke": False}}
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, "JPEG")
    own = sidecar_bytes(report)
    assert b"family" in sidecar_bytes(report, THEIRS) and b"mondrian:grade=7" in sidecar_bytes(report, THEIRS)
    for theirs in (jpeg.getvalue(), b"\0garbage", b""):
        assert sidecar_bytes(report, theirs) == own  # never a JPEG, never a crash: Mondrian's fields alone


def test_their_xmp_is_paired_as_a_mode_sidecar_is_and_fits_beside_a_long_name(tmp_path, smoke_model_path):
    """`IMG_7.JPG` with `img_7.xmp`, `Zoë.jpg` (composed) with `Zoë.xmp` (decomposed, as a Mac may write it), and a
    photo whose name is near the 255-byte limit: the `.mode` beside each was taken, the XMP was not (left in the
    inbox, later called stray), and the long name's `.original.xmp` did not fit."""
    import unicodedata

    home = make_home(tmp_path / "home", smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    zoe = unicodedata.normalize("NFC", "Zoë")
    long = "e" * 245
    photo(inbox / "IMG_7.JPG", seed=7)
    (inbox / "img_7.xmp").write_bytes(THEIRS)
    photo(inbox / f"{zoe}.jpg", seed=8)
    (inbox / f"{unicodedata.normalize('NFD', zoe)}.xmp").write_bytes(THEIRS)
    photo(inbox / f"{long}.jpg", seed=9)
    (inbox / f"{long}.xmp").write_bytes(THEIRS)
    # ...and a sidecar whose exact stem is another photo's stays that photo's, as for `.mode`.
    photo(inbox / "Pair.jpg", seed=10)
    photo(inbox / "pair.png", seed=11)
    (inbox / "pair.xmp").write_bytes(THEIRS)
    with Daemon(home, smoke_model_path, "--once") as d:
        assert d.wait(300) == 0, d.output()
    assert "could not be moved" not in d.output(), d.output()
    assert list(inbox.iterdir()) == [], list(inbox.iterdir())
    for folder in outbox.iterdir():
        if folder.name in ("failed", "duplicates", "index.html") or folder.name.startswith("."):
            continue
        originals = [p for p in folder.iterdir() if ".original." in p.name]
        merged = next(p for p in folder.iterdir() if p.suffix == ".xmp" and ".original." not in p.name)
        subjects = exiftool(merged)[str(merged)].get("Subject") or []
        if (folder / "Pair.jpg").exists():
            assert originals == [] and "family" not in subjects, folder.name
        else:
            assert [p.read_bytes() for p in originals] == [THEIRS], folder.name
            assert "family" in subjects, (folder.name, subjects)


def test_photos_whose_names_differ_only_in_unicode_form_keep_their_own_sidecars(tmp_path, smoke_model_path):
    """`Café.jpg` spelled composed (NFC) and decomposed (NFD): two photos on a Linux disk or a share, each with its
    own `.mode` and XMP. Each took the other's (names were paired in one Unicode form before the exact owner was
    asked): the wrong photo analysed in the wrong mode, the keywords swapped. A whole-name sidecar in another case
    or form (`A.JPG.MODE`) was not found at all, and one beside a stem sidecar lost to it."""
    home = make_home(tmp_path / "home", smoke_model_path, default_mode="rag")
    inbox, outbox = home / "inbox", home / "outbox"
    nfc, nfd = "Caf\u00e9", "Cafe\u0301"
    photo(inbox / f"{nfc}.jpg", seed=31)
    photo(inbox / f"{nfd}.jpg", seed=32)
    (inbox / f"{nfd}.mode").write_text("baseline\n")
    (inbox / f"{nfc}.xmp").write_bytes(THEIRS.replace(b"family", b"alpha"))
    (inbox / f"{nfd}.xmp").write_bytes(THEIRS.replace(b"family", b"omega"))
    photo(inbox / "A.JPG", seed=33)
    (inbox / "A.JPG.MODE").write_text("baseline\n")
    photo(inbox / "solo.jpg", seed=34)
    (inbox / "solo.mode").write_text("rag\n")
    (inbox / "solo.jpg.mode").write_text("baseline\n")
    with Daemon(home, smoke_model_path, "--once") as d:
        assert d.wait(300) == 0, d.output()
    jobs = ledger_jobs(home)
    modes = {name: (j.requested_mode, j.mode_source) for name, j in jobs.items()}
    assert modes[f"{nfd}.jpg"] == ("baseline", "sidecar"), modes
    assert modes[f"{nfc}.jpg"] == ("rag", "default"), modes
    assert modes["A.JPG"] == ("baseline", "sidecar") and modes["solo.jpg"] == ("baseline", "sidecar"), modes
    for name, mine, other in ((nfc, b"alpha", b"omega"), (nfd, b"omega", b"alpha")):
        folder = Path(jobs[f"{name}.jpg"].output_dir)
        (theirs,) = [p for p in folder.iterdir() if p.name.endswith(".original.xmp")]
        assert mine in theirs.read_bytes() and other not in theirs.read_bytes(), (name, theirs.read_bytes())
    assert not (inbox / "A.JPG.MODE").exists()


def test_a_photo_whose_name_fills_the_limit_gets_its_report(tmp_path, smoke_model_path):
    """A 253-byte name with a two-letter suffix (or a 255-byte name with none) left no room for `.xmp`: every
    attempt failed with "File name too long", blamed on the disk, and `retry --failed` went round again."""
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox = home / "inbox"
    names = ["A" * 253 + ".j", "B" * 255]
    for i, name in enumerate(names):
        photo(tmp_path / "p.jpg", seed=40 + i)
        (tmp_path / "p.jpg").rename(inbox / name)
    with Daemon(home, smoke_model_path, "--once") as d:
        assert d.wait(300) == 0, d.output()
    jobs = ledger_jobs(home)
    assert {n: jobs[n].state for n in names} == {n: "done" for n in names}, {n: jobs[n].error for n in names}
    for n in names:
        assert (Path(jobs[n].output_dir) / n).is_file()


def test_a_live_photos_video_rides_along_with_its_still_and_a_lone_video_is_named_in_status(tmp_path,
                                                                                          smoke_model_path):
    """An iPhone's Live Photo comes as IMG_0042.HEIC + IMG_0042.MOV (+ its edits' .AAE): the video failed as "not a
    photo: export it again as JPEG" and the .AAE went twice. The video is the still's companion now; a video alone
    stays in the inbox, and status says why."""
    home = make_home(tmp_path / "home", smoke_model_path)
    inbox, outbox = home / "inbox", home / "outbox"
    video = b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00qt  " + bytes(4096)
    photo(inbox / "IMG_0042.JPG", seed=42)
    (inbox / "IMG_0042.MOV").write_bytes(video)
    (inbox / "IMG_0042.AAE").write_bytes(b"<plist/>")
    (inbox / "clip.mov").write_bytes(video)
    with Daemon(home, smoke_model_path, "--once") as d:
        assert d.wait(300) == 0, d.output()
    assert sorted(ledger_jobs(home)) == ["IMG_0042.JPG"]  # neither video became a job, so none failed
    folder = outbox / "IMG_0042"
    assert (folder / "IMG_0042.MOV").read_bytes() == video and (folder / "IMG_0042.AAE").exists()
    assert not (outbox / "failed").exists() or not any((outbox / "failed").iterdir())
    assert sorted(p.name for p in inbox.iterdir()) == ["clip.mov"]
    said = mondrian(home, smoke_model_path, "status", MONDRIAN_TEST_STRAY_SECONDS="0").stdout
    assert "Video:   inbox/clip.mov has no photo beside it: Mondrian critiques photos" in said, said


def test_a_video_that_failed_as_a_photo_before_is_cleared_by_retry_not_failed_again(tmp_path, smoke_model_path):
    """A Live Photo's `.mov` that an earlier Mondrian failed as "not a photo" sits in failed/: `retry --failed` moved
    it into the inbox as its own sidecar, said it could not, and the next retry queued it to fail again. It stays in
    failed/ now, its failure cleared, and the line says why."""
    from daemon.ledger import Ledger

    home = make_home(tmp_path / "home", smoke_model_path)
    failed = home / "outbox" / "failed"
    failed.mkdir(parents=True)
    video = failed / "clip.mov"
    video.write_bytes(b"\x00\x00\x00\x14ftypqt  " + bytes(64))
    (failed / "clip.mov.error.json").write_text("{}")
    ledger = Ledger(home / "var" / "ledger.db")
    job = ledger.enqueue(home / "inbox" / "clip.mov", "clip.mov", "ansel", "default", 80, 1.0)
    assert job is not None and ledger.claim() is not None
    ledger.fail(job.id, "this file is not a photo Mondrian can read", video)
    ledger.close()
    from daemon.intake.inbox import editor_sidecars

    assert editor_sidecars(video) == []  # never its own sidecar (it moved itself away before its own move)
    out = mondrian(home, smoke_model_path, "retry", "--failed", "--all")
    said = out.stdout + out.stderr
    assert "clip.mov is not a photo (a Live Photo's video, say)" in said and "0 photo(s) queued again" in said, said
    assert video.exists() and not (failed / "clip.mov.error.json").exists()
    assert not (home / "inbox" / "clip.mov").exists()
    assert ledger_jobs(home)["clip.mov"].state == "gone"
    info = json.loads(mondrian(home, smoke_model_path, "status", "--json").stdout)
    assert info["recent_failures"] == [], info["recent_failures"]
