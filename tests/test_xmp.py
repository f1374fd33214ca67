"""XMP that photo managers read, checked with exiftool (a reader independent of exiv2, which wrote it): the stars,
label, caption and keywords from every report's sidecar and, with `xmp_embed`, from the JPEG/TIFF original in the
outbox; never a byte changed in a file outside the outbox (a hard link included)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image

from daemon.pipeline.xmp import embed, write_sidecar
from tests.harness import Daemon, ledger_jobs, make_home, mondrian, photo

# The README's table, written out: the test fails if the code's mapping drifts from what the README promises.
STARS = {0: 1, 1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 6: 3, 7: 4, 8: 4, 9: 5, 10: 5}


def exiftool(*paths: Path, tags: tuple[str, ...] = ()) -> dict[str, dict]:
    exe = shutil.which("exiftool")
    if not exe:
        reason = "exiftool is not installed (Debian: libimage-exiftool-perl; macOS: brew install exiftool)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; under CI the XMP tests must run")
        pytest.skip(reason)
    out = subprocess.run([exe, "-json", "-charset", "utf8", "-XMP-xmp:Rating", "-XMP-xmp:Label",
                          "-XMP-dc:Description", "-XMP-dc:Subject", *tags, *map(str, paths)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode in (0, 1), out.stderr  # 1: a file without any of these tags
    return {r["SourceFile"]: r for r in json.loads(out.stdout or "[]")}


def read_back(record: dict) -> tuple:
    subject = record.get("Subject")
    return (record.get("Rating"), record.get("Label"), record.get("Description"),
            subject if isinstance(subject, list) or subject is None else [subject])


def expected(report: dict) -> tuple:
    words = [f"mondrian:advisor={report['advisor']['id']}", f"mondrian:mode={report['mode']['effective']}",
             f"mondrian:grade={report['overall_grade']}"]
    if report["model"]["smoke"]:
        words.append("mondrian:model=smoke")
    return (STARS[report["overall_grade"]], f"{report['advisor']['name']} ({report['mode']['effective']})",
            report["summary"], words)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_exiftool_reads_the_sidecar_and_the_embedded_copy_through_a_daemon_run(tmp_path, smoke_model_path):
    home = make_home(tmp_path / "home", smoke_model_path, xmp_embed=True)
    inbox, outbox = home / "inbox", home / "outbox"
    photo(inbox / "IMG_1.jpg", seed=1)
    photo(inbox / "cartier" / "street.tif", seed=2, fmt="TIFF")
    photo(inbox / "beach.png", seed=3, fmt="PNG")
    # A photo that is also a hard link to a file outside the home (a Lightroom folder): it must keep its bytes.
    outside = photo(tmp_path / "Lightroom" / "linked.jpg", seed=4)
    os.link(outside, inbox / "linked.jpg")
    outside_before = outside.read_bytes()
    before = {p.name: p.read_bytes() for p in inbox.rglob("*.*") if p.suffix != ".mode"}
    (inbox / "rag.mode").write_text("rag")
    photo(inbox / "rag.jpg", seed=5)

    with Daemon(home, smoke_model_path, "--once") as d:
        assert d.wait(300) == 0, d.output()

    folders = {"IMG_1": "IMG_1.jpg", "street": "street.tif", "beach": "beach.png", "linked": "linked.jpg",
               "rag": "rag.jpg"}
    reports = {name: json.loads((outbox / name / "report.json").read_text()) for name in folders}
    sidecars = {name: outbox / name / (Path(file).stem + ".xmp") for name, file in folders.items()}
    originals = {name: outbox / name / file for name, file in folders.items()}
    got = exiftool(*sidecars.values(), *originals.values())
    for name in folders:
        want = expected(reports[name])
        assert read_back(got[str(sidecars[name])]) == want, name
        if name == "beach":
            # PNG gets the sidecar only: its original is the very file that was analysed.
            assert read_back(got[str(originals[name])]) == (None, None, None, None)
            assert sha(originals[name]) == reports[name]["photo"]["sha256"]
        else:
            assert read_back(got[str(originals[name])]) == want, name
    assert reports["street"]["advisor"]["id"] == "cartier" and reports["street"]["photo"]["format"] == "TIFF"
    assert reports["rag"]["mode"]["requested"] == "rag"
    # The pixels are the ones analysed; only the metadata changed.
    for name in ("IMG_1", "street", "linked"):
        with Image.open(originals[name]) as im, Image.open(io.BytesIO(before[folders[name]])) as was:
            assert im.tobytes() == was.tobytes() and originals[name].read_bytes() != before[folders[name]], name
    # Nothing outside the outbox changed: the hard link's other name keeps its bytes, and the outbox copy is a file
    # of its own.
    assert outside.read_bytes() == outside_before
    assert os.stat(originals["linked"]).st_nlink == 1 and os.stat(outside).st_nlink == 1
    assert not [p for p in outbox.rglob(".*") if p.is_file()], "no temporary file is left behind"
    # Each report page links its full-resolution original, which is there once the job is done.
    for name in folders:
        href = re.search(r'id="original" href="([^"]+)"', (outbox / name / "report.html").read_text()).group(1)
        assert (outbox / name / unquote(href)) == originals[name] and originals[name].is_file()


def test_the_outbox_copy_with_its_xmp_inside_is_the_photo_analysed(tmp_path, smoke_model_path):
    """With `xmp_embed` the original in the report folder is new bytes (the XMP inside). Dropped in again from there,
    for the same advisor, it is a duplicate of its report, as the same photo; for another advisor its page links the
    earlier critique. A copy whose pixels were edited since is a photo of its own."""
    home = make_home(tmp_path / "home", smoke_model_path, xmp_embed=True)
    inbox, outbox = home / "inbox", home / "outbox"
    photo(inbox / "IMG_1.jpg", seed=11)
    with Daemon(home, smoke_model_path, "--once") as d:
        assert d.wait(300) == 0, d.output()
    first = json.loads((outbox / "IMG_1" / "report.json").read_text())
    embedded = outbox / "IMG_1" / "IMG_1.jpg"
    assert sha(embedded) != first["photo"]["sha256"]  # the XMP is inside

    shutil.copy2(embedded, inbox / "again.jpg")
    (inbox / "cartier").mkdir(exist_ok=True)
    shutil.copy2(embedded, inbox / "cartier" / "again.jpg")
    edited = inbox / "edited.jpg"
    with Image.open(embedded) as im:
        im.rotate(90).save(edited, "JPEG")
    with Daemon(home, smoke_model_path, "--once") as d:
        assert d.wait(300) == 0, d.output()
    jobs = ledger_jobs(home)
    assert jobs["again.jpg"].duplicate_of == jobs["IMG_1.jpg"].id, jobs["again.jpg"].error
    assert (outbox / "duplicates" / "again.jpg").is_file()
    cartier = json.loads(Path(jobs["cartier/again.jpg"].report_json).read_text())
    assert cartier["advisor"]["id"] == "cartier" and jobs["cartier/again.jpg"].duplicate_of is None
    assert [e["job_id"] for e in cartier.get("earlier_reports", [])] == [first["job_id"]]
    assert jobs["edited.jpg"].duplicate_of is None
    assert "earlier_reports" not in json.loads(Path(jobs["edited.jpg"].report_json).read_text())


def report_for(grade: int, **over) -> dict:
    report = {"photo": {"file": "IMG_7.jpg", "format": "JPEG"}, "advisor": {"id": "ansel", "name": "Ansel Adams"},
              "mode": {"requested": "rag", "effective": "rag"}, "model": {"adapter": None, "smoke": False},
              "overall_grade": grade, "summary": f"Grade {grade} of 10."}
    report.update(over)
    return report


def test_every_grade_gets_the_stars_the_readme_promises(tmp_path):
    """Sidecar and embedded XMP for each grade 0-10, read back by exiftool against the README's table."""
    files = {}
    for grade in range(11):
        folder = tmp_path / f"g{grade}"
        folder.mkdir()
        report = report_for(grade)
        files[grade] = write_sidecar(folder, report)
        Image.new("RGB", (32, 24), (grade * 20, 80, 120)).save(folder / "IMG_7.jpg", "JPEG")
        assert embed(folder / "IMG_7.jpg", report)
    got = exiftool(*files.values(), *(f.with_suffix(".jpg") for f in files.values()))
    for grade, sidecar in files.items():
        assert got[str(sidecar)]["Rating"] == STARS[grade], f"grade {grade} in the sidecar"
        assert got[str(sidecar.with_suffix(".jpg"))]["Rating"] == STARS[grade], f"grade {grade} embedded"


def test_odd_text_survives_and_the_photographers_own_xmp_is_kept(tmp_path):
    """A model's summary with markup, quotes, control characters and a `lang=` prefix (exiv2's own syntax for
    captions) reads back as text; a JPEG's own keywords and other-language captions stay, earlier Mondrian keywords
    are replaced, and a name like the sidecar's own gets a sidecar of its own."""
    import exiv2

    summary = 'lang="de" <b>Bold</b> & "quoted" \x01\x1b[31m red\nsecond line — 光と影 🎞'
    readable = 'lang="de" <b>Bold</b> & "quoted" [31m red\nsecond line — 光と影 🎞'
    report = report_for(9, summary=summary, advisor={"id": "x&y", "name": 'A <b>"&"</b> name'},
                        photo={"file": "odd.XMP", "format": "JPEG"})
    jpg = tmp_path / "odd.XMP"
    Image.new("RGB", (32, 24)).save(jpg, "JPEG")
    image = exiv2.ImageFactory.open(str(jpg))
    image.readMetadata()
    image.xmpData()["Xmp.dc.subject"] = exiv2.XmpArrayValue(["family", "mondrian:grade=2"], exiv2.TypeId.xmpBag)
    image.xmpData()["Xmp.dc.description"] = exiv2.LangAltValue({"x-default": "old caption", "de": "Bildunterschrift"})
    image.writeMetadata()
    del image

    sidecar = write_sidecar(tmp_path, report)
    assert sidecar.name == "odd.XMP.xmp" and jpg.exists()
    assert embed(jpg, report)
    got = exiftool(sidecar, jpg, tags=("-XMP-dc:Description-de",))
    words = ["mondrian:advisor=x&y", "mondrian:mode=rag", "mondrian:grade=9"]
    assert read_back(got[str(sidecar)]) == (5, 'A <b>"&"</b> name (rag)', readable, words)
    assert read_back(got[str(jpg)]) == (5, 'A <b>"&"</b> name (rag)', readable, ["family", *words])
    assert got[str(jpg)]["Description-de"] == "Bildunterschrift"


def test_a_failed_embedding_keeps_the_report_the_sidecar_and_the_original(tmp_path, smoke_model_path):
    """The report folder cannot take a new file just when the XMP would be embedded (made immutable while the
    daemon holds right after moving the original in): the job is done all the same, with its report, its sidecar
    and the original byte for byte as analysed, and the log says the sidecar has the rating."""
    from tests.test_recovery import _wait_stopped

    home = make_home(tmp_path / "home", smoke_model_path, xmp_embed=True)
    original = photo(home / "inbox" / "held.jpg", seed=7)
    data = original.read_bytes()
    folder = home / "outbox" / "held"
    with Daemon(home, smoke_model_path, "--once", MONDRIAN_TEST_STOP_AT="moved") as d:
        _wait_stopped(d.proc.pid, "the daemon", d.proc, d.output())
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not allowed here")
        try:
            d.signal(signal.SIGCONT)
            assert d.wait(120) == 0, d.output()
        finally:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    report = json.loads((folder / "report.json").read_text())
    assert (folder / "held.jpg").read_bytes() == data and sha(folder / "held.jpg") == report["photo"]["sha256"]
    assert read_back(exiftool(folder / "held.xmp")[str(folder / "held.xmp")]) == expected(report)
    assert ledger_jobs(home)["held.jpg"].state == "done"
    assert "held.jpg: the XMP could not be embedded" in d.output() and "held.xmp beside it has the rating" in d.output()


def test_an_embedding_killed_before_its_rename_leaves_no_temporary_file_after_the_next_start(tmp_path,
                                                                                          smoke_model_path):
    """Embedding rewrites the original inside a published report folder; a kill between writing the new file and
    renaming it leaves `.<name>.PID.HEX.tmp` there. The next start removes it (its writer is dead), and leaves one
    whose writer is alive."""
    home = make_home(tmp_path / "home")
    photo(home / "inbox" / "IMG_1.jpg", seed=5)
    assert mondrian(home, smoke_model_path, "run", "--once").returncode == 0
    folder = home / "outbox" / "IMG_1"
    assert (folder / "report.json").is_file()
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that was just released: no process has it now
    orphan = folder / f".IMG_1.jpg.{dead.pid}.0123abcd.tmp"
    live = folder / f".IMG_1.jpg.{os.getpid()}.4567cdef.tmp"
    orphan.write_bytes(b"half an embedding")
    live.write_bytes(b"another writer's file")
    assert mondrian(home, smoke_model_path, "run", "--once").returncode == 0
    assert not orphan.exists() and live.exists()


THEIR_XMP = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
             '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:subject><rdf:Bag>'
             '<rdf:li>harbour-at-dawn</rdf:li></rdf:Bag></dc:subject></rdf:Description></rdf:RDF></x:xmpmeta>')


def test_one_xmp_beside_two_photos_of_one_stem_goes_to_both_reports(tmp_path, smoke_model_path):
    """IMG_1.jpg and IMG_1.png (a camera's JPEG and an export) with the photographer's IMG_1.xmp: it describes both,
    so both reports carry its keywords, and nothing of it is left behind in the inbox."""
    home = make_home(tmp_path / "home", smoke_model_path, max_pixels=56 * 56, comment_max_chars=8, max_tokens=400,
                     api_port=0)
    photo(home / "inbox" / "IMG_1.jpg", seed=1, size=(64, 48))
    photo(home / "inbox" / "IMG_1.png", seed=2, size=(64, 48), fmt="PNG")
    (home / "inbox" / "IMG_1.xmp").write_text(THEIR_XMP, encoding="utf-8")
    assert mondrian(home, smoke_model_path, "run", "--once", timeout=300).returncode == 0
    folders = sorted(Path(j.report_json).parent for j in ledger_jobs(home).values())
    assert len(folders) == 2, folders
    got = exiftool(*(folder / "IMG_1.xmp" for folder in folders))
    for folder in folders:
        assert "harbour-at-dawn" in read_back(got[str(folder / "IMG_1.xmp")])[3], folder
    assert sorted(p.name for p in (home / "inbox").iterdir() if not p.name.startswith(".")) == []


def test_a_jpeg_with_extended_xmp_is_left_unchanged_and_its_sidecar_has_the_rating(tmp_path, caplog):
    """A JPEG whose XMP is over 64 KB (5,000 keywords: Lightroom writes such lists) keeps the rest in "extended XMP"
    segments that exiv2 does not rewrite; embedding put Mondrian's keywords in the first segment only, and readers,
    which merge the extended part over it, showed the photographer's list without them."""
    jpg = tmp_path / "big.jpg"
    Image.new("RGB", (32, 24), (10, 20, 30)).save(jpg, "JPEG")
    exiftool(jpg)  # skips (or fails under CI) when exiftool is missing
    keywords = [f"kw{i:05d}" for i in range(5000)]
    subprocess.run(["exiftool", "-m", "-overwrite_original", "-sep", ",", "-XMP-dc:Subject=" + ",".join(keywords),
                    str(jpg)], check=True, capture_output=True, timeout=60)
    assert subprocess.run(["exiftool", "-s3", "-XMP-xmpNote:HasExtendedXMP", str(jpg)], capture_output=True,
                          text=True, timeout=60).stdout.strip(), "exiftool did not write extended XMP"
    before = jpg.read_bytes()
    report = report_for(7, photo={"file": "big.jpg", "format": "JPEG"})
    sidecar = write_sidecar(tmp_path, report)
    assert not embed(jpg, report)
    assert jpg.read_bytes() == before
    assert "big.jpg: the XMP could not be embedded" in caplog.text and "big.xmp beside it has the rating" in caplog.text
    assert "(extended XMP)" in caplog.text, caplog.text  # refused for this reason, not another
    assert read_back(exiftool(sidecar)[str(sidecar)]) == expected(report)


def test_the_photographers_own_caption_rating_and_label_are_not_lost(tmp_path):
    """A JPEG carrying its photographer's caption ("Grandma's 90th birthday, Lisbon"), 5 stars and a Red label came out
    of `xmp_embed` with the model's summary, its stars and "Ansel Adams (baseline)": inside the only copy of the
    photo, with nothing kept. Their caption now stays in the sidecar and inside the photo, their rating and label
    stay inside the photo (the sidecar carries Mondrian's), also when it is critiqued again; a photo without its
    own gets Mondrian's, replaced by the next critique's."""
    import exiv2

    def jpeg(path: Path, **fields: object) -> Path:
        Image.new("RGB", (32, 24)).save(path, "JPEG")
        image = exiv2.ImageFactory.open(str(path))
        image.readMetadata()
        for key, value in fields.items():
            image.xmpData()[key] = value
        image.writeMetadata()
        return path

    theirs = jpeg(tmp_path / "grandma.jpg", **{
        "Xmp.dc.description": exiv2.LangAltValue({"x-default": "Grandma's 90th birthday, Lisbon"}),
        "Xmp.xmp.Rating": "5", "Xmp.xmp.Label": "Red",
        "Xmp.dc.subject": exiv2.XmpArrayValue(["family"], exiv2.TypeId.xmpBag)})
    plain = jpeg(tmp_path / "plain.jpg")
    first = report_for(3, summary="and the frame", photo={"file": "grandma.jpg", "format": "JPEG"})
    packet = exiv2.ImageFactory.open(str(theirs))
    packet.readMetadata()  # the same fields as Lightroom's own sidecar of a raw file would hold them
    sidecar = write_sidecar(tmp_path, first, theirs=packet.xmpPacket().encode())
    assert embed(theirs, first) and embed(plain, report_for(3, summary="flat light"))
    got = exiftool(sidecar, theirs, plain)
    words = ["mondrian:advisor=ansel", "mondrian:mode=rag", "mondrian:grade=3"]
    assert read_back(got[str(sidecar)]) == (2, "Ansel Adams (rag)", "Grandma's 90th birthday, Lisbon",
                                            ["family", *words])
    assert read_back(got[str(theirs)]) == (5, "Red", "Grandma's 90th birthday, Lisbon", ["family", *words])
    assert read_back(got[str(plain)]) == (2, "Ansel Adams (rag)", "flat light", words)

    again = report_for(9, summary="a better frame", photo={"file": "grandma.jpg", "format": "JPEG"})
    assert embed(theirs, again) and embed(plain, report_for(9, summary="light at last"))
    got = exiftool(theirs, plain)
    words = ["mondrian:advisor=ansel", "mondrian:mode=rag", "mondrian:grade=9"]
    assert read_back(got[str(theirs)]) == (5, "Red", "Grandma's 90th birthday, Lisbon", ["family", *words])
    assert read_back(got[str(plain)]) == (5, "Ansel Adams (rag)", "light at last", words)

    # The photographer rates and captions the photo Mondrian had rated (in Lightroom, say): theirs from then on.
    image = exiv2.ImageFactory.open(str(plain))
    image.readMetadata()
    image.xmpData()["Xmp.xmp.Rating"] = "3"
    image.xmpData()["Xmp.dc.description"] = exiv2.LangAltValue({"x-default": "Lake at dawn"})
    image.writeMetadata()
    del image
    assert embed(plain, report_for(1, summary="dull"))
    got = exiftool(plain)
    assert read_back(got[str(plain)])[:3] == (3, "Ansel Adams (rag)", "Lake at dawn"), got[str(plain)]


PREFIXED = ('<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/" '
            'xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:Rating="5">\n<dc:title><rdf:Alt><rdf:li xml:lang="x-default">'
            'Tom & Jerry at the beach</rdf:li></rdf:Alt></dc:title>\n<dc:subject><rdf:Bag><rdf:li>family</rdf:li>'
            '</rdf:Bag></dc:subject>\n</rdf:Description>')
# The same title with Dublin Core as the default namespace: no property carries a prefix.
UNPREFIXED = ('<rdf:Description rdf:about="">\n<title xmlns="http://purl.org/dc/elements/1.1/"><rdf:Alt><rdf:li '
              'xml:lang="x-default">Tom & Jerry at the beach</rdf:li></rdf:Alt></title>\n</rdf:Description>')


@pytest.mark.parametrize("description", [PREFIXED, UNPREFIXED], ids=["prefixed", "unprefixed"])
def test_a_photo_whose_own_xmp_exiv2_cannot_parse_is_left_as_it_is(tmp_path, description):
    """Attack: `xmp_embed = true` and a JPEG whose XMP holds an unescaped `&` (tools that write such packets exist;
    exiftool reads it): exiv2 read it as no XMP at all, and writing Mondrian's replaced the photographer's title,
    keywords and 5 stars in the only copy of the photo. It is now left byte for byte as it came, whether its
    properties carry a prefix or not."""
    packet = tmp_path / "theirs.xmp"
    packet.write_text(
        '<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?>\n<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n' + description + '</rdf:RDF>'
        '</x:xmpmeta>\n<?xpacket end="w"?>\n')
    jpg = tmp_path / "family.jpg"
    Image.new("RGB", (32, 24), (90, 80, 120)).save(jpg, "JPEG")
    subprocess.run(["exiftool", "-q", "-m", "-overwrite_original", f"-XMP<={packet}", str(jpg)], check=True)
    before = jpg.read_bytes()
    assert exiftool(jpg, tags=("-XMP:Title",))[str(jpg)]["Title"] == "Tom & Jerry at the beach"
    report = report_for(9, photo={"file": "family.jpg", "format": "JPEG"})
    assert embed(jpg, report) is None
    assert jpg.read_bytes() == before


def test_an_empty_packet_with_an_odd_namespace_or_a_byte_order_mark_is_not_taken_for_an_unparsable_one(tmp_path):
    """The unparsable-packet rule must not refuse an empty one: a namespace URI holding `=` (`?a=b`) or a byte-order
    mark before the packet is still nothing of the photographer's, so the rating may be embedded."""
    from daemon.pipeline.xmp import _holds_something

    packet = ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n<x:xmpmeta xmlns:x="adobe:ns:meta/">'
              '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n<rdf:Description rdf:about="" '
              'xmlns:foo="http://example.com/ns?a=b"/>\n</rdf:RDF></x:xmpmeta>\n<?xpacket end="w"?>')
    assert not _holds_something(packet) and not _holds_something("\ufeff" + packet)
    assert _holds_something(packet.replace('rdf:about=""', 'rdf:about="" xmp:Rating="5"'))
