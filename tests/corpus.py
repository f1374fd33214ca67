"""The hostile and odd corpus of issue 3, generated as data at test time (no binary blobs in the repository).

`build(folder)` writes well over 300 files into `folder` and returns one `Item` per file with the outcome the
daemon must reach: "done" (analysed, a report), "duplicate" (same bytes as another item: pointed at its
report), "failed" (refused at once with a reason), "ignored" (a hidden or temporary name: left alone) or
"terminal" (any of done/failed: odd files whose decoders may or may not cope, e.g. a JPEG with flipped bytes).
Files are small: the pixel-count bombs are headers that *claim* billions of pixels.
"""

from __future__ import annotations

import io
import random
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

try:
    import pillow_heif
except ImportError:  # pragma: no cover - a declared dependency
    pillow_heif = None


@dataclass
class Item:
    name: str  # path relative to the inbox
    data: bytes
    expect: str  # done | duplicate | failed | ignored | terminal
    kind: str  # what it is, for the printed table
    checks: dict[str, Any] = field(default_factory=dict)  # e.g. {"width": 90, "height": 160, "format": "HEIF"}


# ------------------------------------------------------------------------------------------------ images

def picture(seed: int, size: tuple[int, int] = (96, 72), mode: str = "RGB") -> Image.Image:
    """A small image with structure, distinct per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w, 1), y * 255 / max(h, 1), np.full_like(x, rng.integers(0, 255))], -1)
    base = (base + rng.normal(0, 25, base.shape)).clip(0, 255).astype("uint8")
    img = Image.fromarray(base, "RGB")
    d = ImageDraw.Draw(img)
    d.rectangle((w // 5, h // 4, w // 2, h * 3 // 4), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img if mode == "RGB" else img.convert(mode)


def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg(seed: int, size: tuple[int, int] = (96, 72), **kw: Any) -> bytes:
    return encode(picture(seed, size), "JPEG", quality=85, **kw)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_raw(width: int, height: int, bit_depth: int, color_type: int, rows: bytes | None,
            extra_chunks: list[bytes] = ()) -> bytes:
    """A PNG written by hand (16-bit RGB, or a header claiming any size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(rows if rows is not None else b"\0", 9)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + b"".join(extra_chunks) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def png48(seed: int, w: int = 64, h: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((h, w, 3)) * 65535).astype(">u2")
    arr[:, : w // 2, 0] = 60000  # structure beyond noise
    rows = b"".join(b"\0" + arr[y].tobytes() for y in range(h))
    return png_raw(w, h, 16, 2, rows)


def tiff_raw(width: int, height: int, samples: int, bits: int, pixels: bytes, photometric: int = 2) -> bytes:
    """A baseline little-endian TIFF, one strip, uncompressed (48-bit RGB, or a header claiming any size)."""
    entries: list[tuple[int, int, int, Any]] = []  # tag, type, count, value (int or bytes for out-of-line)
    bps = struct.pack("<" + "H" * samples, *([bits] * samples))
    n_tags = 10
    ifd_offset = 8
    ifd_size = 2 + n_tags * 12 + 4
    extra_offset = ifd_offset + ifd_size
    bps_offset = extra_offset
    data_offset = bps_offset + (len(bps) if samples > 2 else 0)
    entries = [
        (256, 4, 1, width), (257, 4, 1, height),
        (258, 3, samples, bps_offset if samples > 2 else bits),
        (259, 3, 1, 1), (262, 3, 1, photometric), (273, 4, 1, data_offset), (277, 3, 1, samples),
        (278, 4, 1, height), (279, 4, 1, len(pixels)), (284, 3, 1, 1),
    ]
    out = bytearray(b"II*\0" + struct.pack("<I", ifd_offset))
    out += struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        if typ == 3 and count == 1:
            out += struct.pack("<HHIHH", tag, typ, count, value, 0)
        else:
            out += struct.pack("<HHII", tag, typ, count, value)
    out += struct.pack("<I", 0)
    if samples > 2:
        out += bps
    out += pixels
    return bytes(out)


def tiff48(seed: int, w: int = 64, h: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((h, w, 3)) * 65535).astype("<u2")
    return tiff_raw(w, h, 3, 16, arr.tobytes())


def exif_rotated(seed: int, orientation: int) -> bytes:
    img = picture(seed, (120, 80))  # stored landscape; orientations 5-8 mean it is upright portrait
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=85, exif=exif.tobytes())


def animated(seed: int, fmt: str) -> bytes:
    frames = [picture(seed + i, (64, 48)) for i in range(3)]
    if fmt == "GIF":
        frames = [f.convert("P") for f in frames]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def dng(scene: np.ndarray, *, orientation: int = 1, preview: np.ndarray | None = None) -> bytes:
    """A camera raw file (DNG) as cameras write them: IFD0 a preview (by default a 1/4-size thumbnail, as a NEF's
    or DNG's 160x120 one), its SubIFD the sensor's RGGB Bayer data, 12 bits, of `scene` (linear RGB, 0..1, H x W x 3,
    both sides even). `orientation` is the EXIF code the camera recorded."""
    import tifffile

    h, w, _ = scene.shape
    cfa = np.empty((h, w))
    cfa[0::2, 0::2], cfa[0::2, 1::2] = scene[0::2, 0::2, 0], scene[0::2, 1::2, 1]
    cfa[1::2, 0::2], cfa[1::2, 1::2] = scene[1::2, 0::2, 1], scene[1::2, 1::2, 2]
    if preview is None:
        preview = scene[::4, ::4]
    shown = (np.clip(preview, 0, 1) ** (1 / 2.2) * 255 + 0.5).astype("uint8")
    identity = [v for x in (1, 0, 0, 0, 1, 0, 0, 0, 1) for v in (x * 10000, 10000)]
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tif:
        tif.write(shown, photometric="rgb", subfiletype=1, subifds=1, extratags=[
            (271, "s", 0, "Mondrian", True), (272, "s", 0, "Test camera", True), (274, "H", 1, orientation, True),
            (50706, "B", 4, (1, 4, 0, 0), True), (50707, "B", 4, (1, 1, 0, 0), True),
            (50708, "s", 0, "Mondrian Test camera", True), (50721, "i", 18, identity, True),
            (50778, "H", 1, 21, True)])
        tif.write((np.clip(cfa, 0, 1) * 4000).astype("uint16"), photometric=32803, subfiletype=0, extratags=[
            (33421, "H", 2, (2, 2), True), (33422, "B", 4, (0, 1, 1, 2), True),
            (50714, "H", 1, 0, True), (50717, "H", 1, 4000, True)])
    return buf.getvalue()


def raw_scene(seed: int, size: tuple[int, int] = (160, 120)) -> np.ndarray:
    """A linear-light scene for `dng`: the structured picture of `seed`, undone from sRGB-ish gamma."""
    return (np.asarray(picture(seed, size), dtype=np.float64) / 255.0) ** 2.2


def heic(seed: int) -> bytes | None:
    if pillow_heif is None:
        return None
    buf = io.BytesIO()
    pillow_heif.from_pillow(picture(seed, (96, 64))).save(buf, format="HEIF", quality=80)
    return buf.getvalue()


def jpeg_with_dims(seed: int, width: int, height: int) -> bytes:
    """A small real JPEG whose SOF header is patched to claim width x height."""
    data = bytearray(jpeg(seed, (32, 32)))
    i = 2
    while i < len(data) - 9:
        if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC2):
            struct.pack_into(">HH", data, i + 5, height, width)
            return bytes(data)
        seg_len = struct.unpack(">H", data[i + 2:i + 4])[0]
        i += 2 + seg_len
    raise AssertionError("no SOF marker")


def gif_claiming(width: int, height: int) -> bytes:
    img = encode(Image.new("P", (4, 4)), "GIF")
    return img[:6] + struct.pack("<HH", width, height) + img[10:]


def webp_claiming(width: int, height: int) -> bytes:
    vp8l = encode(Image.new("RGB", (4, 4), (10, 20, 30)), "WEBP", lossless=True)[12:]  # the VP8L chunk
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0" + (width - 1).to_bytes(3, "little") \
        + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + vp8l
    return b"RIFF" + struct.pack("<I", len(body)) + body


def png_text_bomb(kind: str, seed: int) -> bytes:
    rows = b"".join(b"\0" + bytes([seed % 256] * 3 * 8) for _ in range(8))
    if kind == "zTXt":
        chunk = _chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"A" * (64 << 20), 9))
        return png_raw(8, 8, 8, 2, rows, [chunk])
    if kind == "iTXt":
        chunk = _chunk(b"iTXt", b"Comment\0\1\0\0\0" + zlib.compress(b"B" * (64 << 20), 9))
        return png_raw(8, 8, 8, 2, rows, [chunk])
    # many chunks, each under the per-chunk limit, together over the total text limit
    one = _chunk(b"zTXt", b"Note\0\0" + zlib.compress(b"C" * ((1 << 20) - 64), 9))
    return png_raw(8, 8, 8, 2, rows, [one] * 80)


def not_images() -> list[tuple[str, bytes]]:
    return [
        ("shopping list.jpg", b"eggs\nmilk\nbread\n"),
        ("page.jpg", b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>"),
        ("document.jpg", b"%PDF-1.7\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"),
        ("archive.jpg", b"PK\x03\x04" + bytes(60)),
        ("program.jpg", b"\x7fELF\x02\x01\x01" + bytes(57)),
        ("data.jpg", b'{"not": "a photo"}'),
        ("vector.jpg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><script>alert(1)'
                       b'</script></svg>'),
        ("one byte.jpg", b"\xff"),
        ("jpeg magic only.jpg", b"\xff\xd8\xff"),
        ("png magic only.png", b"\x89PNG\r\n\x1a\n"),
        ("gif magic only.gif", b"GIF89a"),
        ("random.jpg", random.Random(7).randbytes(4096)),
        ("random.png", random.Random(8).randbytes(2048)),
        ("random.heic", random.Random(9).randbytes(2048)),
        ("catalog.db", bytes(512)),  # not Thumbs.db: Windows caches are left alone, not failed
        ("notes.txt", b"not a photo either"),
        ("mp4 named jpg.jpg", b"\0\0\0\x18ftypmp42" + bytes(32)),
        ("heic header only.heic", b"\0\0\0\x18ftypheic" + bytes(16)),
        ("tiff header only.tif", b"II*\0\x08\0\0\0"),
        ("bmp header only.bmp", b"BM" + bytes(12)),
        ("webp header only.webp", b"RIFF\x10\0\0\0WEBPVP8 "),
        ("utf16.jpg", "a photo? no".encode("utf-16")),
        ("nulls.jpg", bytes(1000)),
        ("script.sh.jpg", b"#!/bin/sh\nrm -rf ~\n"),
        ("ico.jpg", b"\0\0\1\0\1\0"),
    ]


# ------------------------------------------------------------------------------------------------- build

ODD_NAMES = [
    "holiday photo.jpg", "  leading spaces.jpg", "trailing space .jpg", "caf\u00e9 NFC.jpg",
    "cafe\u0301 NFD.jpg", "\u5199\u771f.jpg", "\U0001f4f7 camera.jpg", "line\nbreak.jpg", "tab\there.jpg",
    "carriage\rreturn.jpg", "$(touch pwned).jpg", "`id`.jpg", "semi;colon.jpg", "amp&ersand.jpg",
    "pipe|name.jpg", "quote'single.jpg", 'quote"double.jpg', "star*.jpg", "question?.jpg",
    "<b>bold<\\b>.jpg", "-rf.jpg", "%20encoded%2F.jpg", "hash#tag.jpg", "rtl\u202egpj.exe.jpg",
    "back\\slash.jpg", "colon:name.jpg", "x" * 200 + ".jpg", "UPPER.JPG", "mixed.JpEg", "no extension",
    "dots...jpg", "sub folder/deep/er/nested.jpg", "Album \u00e9t\u00e9 2026/beach.jpg",
]


def build(folder: Path) -> list[Item]:
    items: list[Item] = []

    def add(name: str, data: bytes | None, expect: str, kind: str, **checks: Any) -> None:
        if data is not None:
            items.append(Item(name, data, expect, kind, checks))

    # -- analysed: odd but valid photos (each unique) ---------------------------------------------------
    s = 1000
    add("baseline.jpg", jpeg(s + 1), "done", "jpeg")
    add("progressive.jpg", jpeg(s + 2, progressive=True), "done", "jpeg progressive")
    add("cmyk.jpg", encode(picture(s + 3).convert("CMYK"), "JPEG", quality=85), "done", "cmyk jpeg",
        format="JPEG")
    add("cmyk.tif", encode(picture(s + 4).convert("CMYK"), "TIFF"), "done", "cmyk tiff")
    add("grey16.tif", encode(Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 21).astype("uint16")),
                             "TIFF"), "done", "16-bit grey tiff", format="TIFF")  # LibRaw opens it too
    add("grey16.png", encode(Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 17).astype("uint16")),
                             "PNG"), "done", "16-bit grey png")
    add("rgb48.png", png48(s + 5), "done", "48-bit rgb png")
    add("rgb48.tif", tiff48(s + 6), "done", "48-bit rgb tiff")
    add("float.tif", encode(Image.fromarray(np.linspace(0, 1, 64 * 48, dtype="float32").reshape(48, 64), "F"),
                            "TIFF"), "done", "float tiff")
    add("lzw.tif", encode(picture(s + 7), "TIFF", compression="tiff_lzw"), "done", "lzw tiff")
    add("animated.gif", animated(s + 8, "GIF"), "done", "animated gif", frames=3)
    add("animated.webp", animated(s + 9, "WEBP"), "done", "animated webp", frames=3)
    add("animated.png", animated(s + 10, "PNG"), "done", "apng", frames=3)
    add("stereo.mpo", animated(s + 11, "MPO"), "done", "mpo", frames=3, format="MPO")
    for o in (2, 3, 5, 6, 8):  # mirrored, upside down, transposed, and the two quarter turns
        upright = (80, 120) if o in (5, 6, 7, 8) else (120, 80)
        add(f"exif orientation {o}.jpg", exif_rotated(s + 20 + o, o), "done", "exif rotated",
            width=upright[0], height=upright[1])
    add("iphone.heic", heic(s + 30), "done", "heic", format="HEIF")
    add("iphone2.HEIC", heic(s + 31), "done", "heic", format="HEIF")
    # Camera raw: Pillow alone would read these as their 40x30 thumbnails (format TIFF).
    add("camera.dng", dng(raw_scene(s + 34)), "done", "camera raw", width=160, height=120, format="RAW")
    add("portrait raw.NEF", dng(raw_scene(s + 35), orientation=6), "done", "camera raw, turned",
        width=120, height=160, format="RAW")
    add("truncated raw.dng", dng(raw_scene(s + 36))[:9000], "failed", "truncated camera raw")
    add("rgba.png", encode(picture(s + 32, mode="RGBA"), "PNG"), "done", "rgba png")
    pal = picture(s + 33).convert("P")
    add("palette transparent.png", encode(pal, "PNG", transparency=0), "done", "palette+transparency")
    add("grey alpha.png", encode(picture(s + 34, mode="LA"), "PNG"), "done", "LA png")
    add("bilevel.bmp", encode(picture(s + 35, mode="1"), "BMP"), "done", "1-bit bmp")
    add("plain.bmp", encode(picture(s + 36), "BMP"), "done", "bmp")
    add("lossless.webp", encode(picture(s + 37), "WEBP", lossless=True), "done", "webp")
    add("grey.jpg", encode(picture(s + 38, mode="L"), "JPEG"), "done", "greyscale jpeg")
    add("one pixel.png", encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "done", "1x1",
        width=1, height=1)
    add("panorama.png", encode(picture(s + 39, (20000, 6)), "PNG"), "done", "20000x6 panorama",
        width=20000, height=6)
    add("tower.png", encode(picture(s + 40, (6, 12000)), "PNG"), "done", "6x12000", width=6, height=12000)
    add("big but simple.jpg", encode(Image.new("RGB", (6000, 4000), (90, 120, 150)), "JPEG", quality=50),
        "done", "24 MP jpeg (draft decode)", width=6000, height=4000)
    bad_exif = bytearray(jpeg(s + 41))
    bad_exif[2:2] = b"\xff\xe1\x00\x20Exif\0\0MM\0*\0\0\0\x08\xff\xff" + bytes(14)  # an IFD that lies
    add("broken exif.jpg", bytes(bad_exif), "done", "malformed exif")
    add("png named.jpg", encode(picture(s + 42), "PNG"), "done", "wrong extension", format="PNG")
    add("jpeg named.png", jpeg(s + 43), "done", "wrong extension", format="JPEG")
    add("jpeg named.heic", jpeg(s + 44), "done", "wrong extension", format="JPEG")
    add("jpeg named.tiff", jpeg(s + 45), "done", "wrong extension", format="JPEG")
    add("jp2 image.jp2", encode(picture(s + 46), "JPEG2000"), "done", "jpeg 2000")
    good = [it for it in items if it.expect == "done"]
    for i, name in enumerate(ODD_NAMES):
        if i % 3 == 0:  # a third with their own bytes (a report folder named after them) ...
            add(name, jpeg(s + 100 + i), "done", "odd name")
        else:  # ... the rest the same bytes as another photo (a record in duplicates/ named after them)
            add(name, good[i % len(good)].data, "duplicate", "odd name")

    # -- the same bytes again under other names: pointed at the first report ---------------------------------
    originals = [it for it in items if it.expect == "done"]
    dup_names = ["copy of " + Path(o.name).name for o in originals]
    dup_names += [f"second copy {i}{Path(o.name).suffix}" for i, o in enumerate(originals)]
    for name, orig in zip(dup_names, originals + originals):
        add(f"dups/{name}", orig.data, "duplicate", "duplicate bytes")

    # -- refused at once, each with a reason --------------------------------------------------------------
    for i in range(60):
        whole = jpeg(2000 + i, (64 + i, 48 + i))
        cut = max(4, int(len(whole) * (0.05 + 0.9 * (i / 60))))
        add(f"truncated/jpeg {i:02d}.jpg", whole[:cut], "failed", "truncated jpeg")
    for i, fmt in enumerate(["PNG", "TIFF", "GIF", "WEBP", "BMP"] * 3):
        whole = encode(picture(3000 + i, (64, 48)), fmt)
        add(f"truncated/{fmt.lower()} {i:02d}.{fmt.lower()}", whole[: len(whole) * (i + 3) // 20],
            "failed", f"truncated {fmt.lower()}")
    h = heic(3100)
    if h:
        for i, frac in enumerate((0.3, 0.6, 0.9)):
            add(f"truncated/heic {i}.heic", h[: int(len(h) * frac)], "failed", "truncated heic")
    for i in range(6):
        add(f"empty/zero {i}.jpg", b"", "failed", "zero bytes")
    for name, data in not_images():
        add(f"not images/{name}", data, "failed", "not an image")
    add("bombs/png 100k x 100k.png", png_raw(100_000, 100_000, 8, 2, None), "failed", "pixel bomb")
    add("bombs/png 20k x 20k.png", png_raw(20_000, 20_000, 8, 2, None), "failed", "pixel bomb")
    add("bombs/gif 65535 square.gif", gif_claiming(65535, 65535), "failed", "pixel bomb")
    add("bombs/jpeg 60000 square.jpg", jpeg_with_dims(1, 60000, 60000), "failed", "pixel bomb")
    add("bombs/jpeg 65535x4000.jpg", jpeg_with_dims(2, 65535, 4000), "failed", "pixel bomb")
    add("bombs/tiff 1M x 1M.tif", tiff_raw(1_000_000, 1_000_000, 3, 8, bytes(64)), "failed", "pixel bomb")
    add("bombs/webp 16k square.webp", webp_claiming(16384, 16384), "failed", "pixel bomb")
    add("bombs/rgb48 claims 30k.png", png_raw(30_000, 30_000, 16, 2, None), "failed", "pixel bomb")
    for kind in ("zTXt", "iTXt", "many"):
        for i in range(2):
            add(f"bombs/text {kind} {i}.png", png_text_bomb(kind, i), "failed", "text chunk bomb")
    for i in range(4):  # valid headers, flipped bytes in the middle: decoders may cope or refuse; never hang
        data = bytearray(jpeg(4000 + i, (80, 60)))
        rng = random.Random(i)
        for _ in range(20):
            data[rng.randrange(200, len(data) - 2)] = rng.randrange(256)
        add(f"corrupt/flipped {i}.jpg", bytes(data), "terminal", "corrupt middle")

    # -- hidden and temporary names: left alone ------------------------------------------------------------
    hidden = jpeg(5000)
    for name in (".hidden.jpg", "._IMG_1.jpg", "~$lock.jpg", "IMG_2.jpg.part", "IMG_3.jpg.crdownload",
                 "IMG_4.jpg.download/IMG_4.jpg", ".secret folder/IMG_5.jpg", "IMG_6.jpg.tmp",
                 "IMG_7.jpg.partial", "IMG_8.jpg.opdownload", "orphan.mode", ".DS_Store",
                 "IMG_9.jpg_original",  # exiftool's backup of a photo it edited
                 # sync and transfer tools' files in progress, and macOS's safe save: renamed once complete
                 "IMG_10.jpg.filepart", "IMG_11.jpg.!sync", "IMG_12.jpg.!qB", "IMG_13.jpg.sb-1a2b3c4d-QwErTy"):
        add(name, hidden, "ignored", "hidden/temporary")
    add("Wedding_original/IMG_1.jpg", jpeg(5003), "done", "an album whose name ends like exiftool's backups")
    if sys.platform.startswith("linux"):  # bytes that are not UTF-8 in a name (APFS forbids them): left alone
        add("not utf8 \udcff\udcfe.jpg", jpeg(5001), "ignored", "non-UTF-8 name")

    for it in items:
        path = folder / it.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(it.data)
    return items
