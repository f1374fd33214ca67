"""A report as XMP, the metadata photo managers read (Lightroom, Capture One, Bridge, digiKam, darktable): the grade
as stars, the advisor and mode as a label, the summary as the caption, keywords to filter by.

Every photo gets a sidecar `<stem>.xmp` beside its original in the report folder (the name Lightroom, Camera Raw,
Bridge and Capture One use). With `xmp_embed`, JPEG and TIFF originals in the outbox also carry it inside: Lightroom
reads sidecars only for raw files, and the XMP inside a JPEG or TIFF otherwise.

exiv2 (the `exiv2` package) builds and serialises the XMP, in memory only: given a path it would follow a symbolic
link and write into a hard-linked file in place, changing a photo outside the outbox. Mondrian writes the bytes
itself, as a new file renamed over the old name.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import exiv2

from ..fsutil import atomic_write_bytes, read_regular_file
from ..intake.inbox import xmp_sidecar_name as sidecar_name

log = logging.getLogger("mondrian.worker")

# Decoded formats (Pillow's names) whose files get the XMP inside. Not MPO: its second image sits at an offset that
# a larger metadata segment in front of it would break.
EMBED_FORMATS = ("JPEG", "TIFF")
KEYWORD_PREFIX = "mondrian:"
# The scaffolding an empty packet has (x:xmpmeta, rdf:RDF, rdf:Description with its about and namespaces): a packet
# holding anything else (a property as an element or an attribute, prefixed or not, or text) that reads back empty
# did not parse.
_MARKUP = re.compile(r"<\?.*?\?>|<!--.*?-->", re.S)
_TAG = re.compile(r"<\s*/?\s*([^\s/>]+)([^>]*)>")
_WRAPPERS = {"x:xmpmeta", "x:xapmeta", "rdf:rdf", "rdf:description"}
_ATTRIBUTE = re.compile(r"([^\s=/]+)\s*=")
_QUOTED = re.compile(r"\"[^\"]*\"|'[^']*'")
_SCAFFOLD_ATTRIBUTES = re.compile(r"xmlns(:.*)?|rdf:about|about|x:xmptk", re.I)


def _holds_something(packet: str) -> bool:
    """Whether `packet` holds more than the scaffolding of an empty one."""
    rest = _MARKUP.sub("", packet).replace("\ufeff", "")  # (a byte-order mark outside the packet's header)
    for tag in _TAG.finditer(rest):
        if tag.group(1).lower() not in _WRAPPERS:
            return True
        attributes = _QUOTED.sub('""', tag.group(2))  # a namespace URI may hold `=` (`?a=b`)
        if any(not _SCAFFOLD_ATTRIBUTES.fullmatch(a) for a in _ATTRIBUTE.findall(attributes)):
            return True
    return bool(_TAG.sub("", rest).strip())
# XML 1.0 cannot carry these at all (not even escaped): a model's summary may hold them.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
# exiv2 knows no `xmpNote` prefix until a packet using it has been parsed: naming its key before then raises, which
# once refused every embed in a fresh process.
exiv2.XmpProperties.registerNs("http://ns.adobe.com/xmp/note/", "xmpNote")
_EXTENDED_XMP = exiv2.XmpKey("Xmp.xmpNote.HasExtendedXMP")
# Which of the photo's fields a Mondrian wrote (its rating and label, its caption), kept with them.
exiv2.XmpProperties.registerNs("https://github.com/mondrian-photo/xmp/1.0/", "mondrian")
_WROTE = exiv2.XmpKey("Xmp.mondrian.wrote")


def stars(grade: float) -> int:
    """The 0-10 grade as 1-5 stars: half the grade, rounded half up, and at least one star (Lightroom reads 0 as
    "not rated", and a critiqued photo is rated): 0-2 → 1, 3-4 → 2, 5-6 → 3, 7-8 → 4, 9-10 → 5."""
    return max(1, min(5, math.floor(grade / 2 + 0.5)))


def _text(value: object) -> str:
    return _NOT_XML.sub("", str(value))


def label(report: dict[str, Any]) -> str:
    return _text(f"{report['advisor']['name']} ({report['mode']['effective']})")


def keywords(report: dict[str, Any]) -> list[str]:
    words = [f"advisor={report['advisor']['id']}", f"mode={report['mode']['effective']}",
             f"grade={report['overall_grade']:g}"]
    if report["model"].get("adapter"):
        words.append(f"adapter={report['model']['adapter']}")
    if report["model"].get("smoke"):
        words.append("model=smoke")  # the demo's random ratings can be found and ignored
    return [_text(KEYWORD_PREFIX + w) for w in words]


def _fill(xmp: exiv2.XmpData, report: dict[str, Any], *, inside_original: bool = False) -> None:
    """Set Mondrian's fields in `xmp`; what else it holds stays, keywords of its own included.

    The photographer's own caption is never replaced: the summary goes where there is none, or where the caption is
    still one a Mondrian wrote. Inside the original (`inside_original`, xmp_embed), where no copy of what was there
    is kept, their own rating and label stay too: the sidecar beside it carries Mondrian's. What a Mondrian wrote is
    recorded with it (`mondrian:wrote`: the rating and label, a digest of the caption), so a field the photographer
    changed since (5 stars in Lightroom, a caption of their own) is theirs at the next critique."""
    subject = xmp.findKey(exiv2.XmpKey("Xmp.dc.subject"))
    words = list(subject.getValue()) if subject != xmp.end() else []
    found = xmp.findKey(_WROTE)
    captions: dict[str, str] = {}
    old = xmp.findKey(exiv2.XmpKey("Xmp.dc.description"))
    if old != xmp.end():
        captions = dict(old.getValue())  # other languages are the photographer's
    rated = (_value(xmp, "Xmp.xmp.Rating"), _value(xmp, "Xmp.xmp.Label"))
    if found != xmp.end():
        record = set(found.getValue())
        ours_rated = f"rating={rated[0]}" in record and f"label={rated[1]}" in record
        ours_caption = f"caption={_digest(captions.get('x-default', ''))}" in record
    else:  # a Mondrian before this record wrote all three wherever it left its keywords
        ours_rated = ours_caption = any(k.lower().startswith(KEYWORD_PREFIX) for k in words)
    wrote: list[str] = []
    theirs_rated = not ours_rated and (rated[0] not in ("", "0") or rated[1] != "")
    if not (inside_original and theirs_rated):
        xmp["Xmp.xmp.Rating"] = str(stars(report["overall_grade"]))
        xmp["Xmp.xmp.Label"] = label(report)
        wrote += [f"rating={stars(report['overall_grade'])}", f"label={label(report)}"]
    if ours_caption or not captions.get("x-default", "").strip():
        captions["x-default"] = _text(report.get("summary", ""))
        wrote.append(f"caption={_digest(captions['x-default'])}")
    xmp["Xmp.dc.description"] = exiv2.LangAltValue(captions)
    if subject != xmp.end():
        xmp.erase(xmp.findKey(exiv2.XmpKey("Xmp.dc.subject")))
    kept = [k for k in words if not k.lower().startswith(KEYWORD_PREFIX)]
    xmp["Xmp.dc.subject"] = exiv2.XmpArrayValue(kept + keywords(report), exiv2.TypeId.xmpBag)
    if found != xmp.end():
        xmp.erase(xmp.findKey(_WROTE))
    xmp["Xmp.mondrian.wrote"] = exiv2.XmpArrayValue(wrote or ["keywords"], exiv2.TypeId.xmpBag)


def _value(xmp: exiv2.XmpData, key: str) -> str:
    found = xmp.findKey(exiv2.XmpKey(key))
    return str(found.getValue()).strip() if found != xmp.end() else ""


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def sidecar_bytes(report: dict[str, Any], theirs: bytes | None = None) -> bytes:
    """The sidecar's content: an XMP packet, as exiv2 writes its own sidecars, holding Mondrian's fields on top of
    `theirs` (the photographer's own sidecar that came with the photo: develop settings, keywords, captions in other
    languages stay). An XMP of theirs that exiv2 cannot read is left out here (the file itself is kept beside it)."""
    image = None
    if theirs:
        try:
            # exiv2 does not recognise a packet after blank lines (some tools begin their file with one)
            image = exiv2.ImageFactory.open(theirs.lstrip(b" \t\r\n"))
            if image.imageType() != exiv2.ImageType.xmp:  # a photo named `.xmp` is not a sidecar to build on
                raise ValueError(f"it holds {image.mimeType()}, not XMP")
            image.readMetadata()
            if image.xmpData().empty() and _holds_something(image.xmpPacket()):
                # exiv2 does not raise for XML it cannot parse (a tag left open, a DOCTYPE): it only prints "XMP
                # Toolkit error" on stderr, naming no photo, and hands back nothing to merge.
                raise ValueError("it is not well-formed XMP")
        except Exception as exc:  # exiv2 raises its own kinds
            log.warning("%s: the XMP that came with it could not be read (%s); Mondrian's sidecar holds its own "
                        "fields only", report["photo"]["file"], exc)
            image = None
    if image is None:
        image = exiv2.ImageFactory.create(exiv2.ImageType.xmp)  # in memory
    _fill(image.xmpData(), report)
    image.writeMetadata()
    return _bytes(image)


def _bytes(image: exiv2.Image) -> bytes:
    with image.io().mmap() as view:
        return bytes(view)


def write_sidecar(folder: Path, report: dict[str, Any], *, theirs: bytes | None = None,
                  durable: bool = True) -> Path | None:
    """Write `<stem>.xmp` into the (staging) report folder. The XMP is a copy of what report.json says, so if exiv2
    cannot build it the report goes on without it (logged); a failed write (a full disk) raises OSError like any
    other file of the report, which is then retried whole. `durable=False`: the caller fsyncs the folder's files."""
    try:
        data = sidecar_bytes(report, theirs)
    except Exception as exc:  # exiv2 raises its own kinds; a report must never be lost to its copy in XMP
        log.warning("%s: no XMP sidecar (%s: %s); report.json has the same facts", report["photo"]["file"],
                    type(exc).__name__, exc)
        return None
    path = Path(folder) / sidecar_name(report["photo"]["file"])
    atomic_write_bytes(path, data, durable=durable)
    return path


def embed(original: Path, report: dict[str, Any]) -> str | None:
    """Put the report's XMP inside the JPEG/TIFF `original` in the outbox. The file is read, changed in memory and
    written as a new file renamed over the old name: a hard link's other names, a symbolic link's target and the
    inbox keep their bytes untouched. Returns the SHA-256 of the bytes written, None when nothing was embedded;
    never raises (the report stands, and the sidecar carries the same fields)."""
    if report["photo"].get("format") not in EMBED_FORMATS:
        return None
    try:
        before = os.stat(original)
        data = read_regular_file(original)
        image = exiv2.ImageFactory.open(data)
        image.readMetadata()
        if image.xmpData().findKey(_EXTENDED_XMP) != image.xmpData().end():
            # XMP over 64 KB continues in further JPEG segments that exiv2 neither reads nor rewrites; readers
            # merge them over the first, so a keyword list living there would hide Mondrian's.
            raise ValueError("its XMP is larger than one JPEG segment holds (extended XMP), which cannot be "
                             "rewritten safely")
        if image.xmpData().empty() and _holds_something(image.xmpPacket()):
            # A packet exiv2 cannot parse (an `&` left unescaped, a Latin-1 byte) reads as no XMP at all: writing
            # ours would replace it, and the photographer's title, keywords and rating with it, in the only copy.
            raise ValueError("its own XMP is not well-formed, and writing Mondrian's would replace it")
        _fill(image.xmpData(), report, inside_original=True)
        image.writeMetadata()
        written = _bytes(image)
        atomic_write_bytes(original, written)
        os.utime(original, ns=(before.st_atime_ns, before.st_mtime_ns))  # file browsers sort by it
    except Exception as exc:
        log.warning("%s: the XMP could not be embedded (%s: %s); the original is unchanged and %s beside it "
                    "has the rating", original.name, type(exc).__name__, exc, sidecar_name(original.name))
        return None
    return hashlib.sha256(written).hexdigest()
