"""Camera raw files (NEF, CR2, CR3, ARW, DNG, RAF, ORF, RW2, PEF, ...), decoded with LibRaw through rawpy.

Why not Pillow: most raw formats are TIFF underneath, and Pillow opens them as TIFFs and returns their first image,
which for a NEF or a DNG is the camera's 160x120 thumbnail. A critique of that thumbnail reads like a critique of the
photo. Formats that are not TIFF-based (CR3, RAF, ORF) Pillow refuses outright.

What is analysed: the camera's own full-size JPEG preview when the file carries one at least as large as the size
Mondrian analyses (it is what the photographer saw on the camera and in a viewer, and decodes in milliseconds);
otherwise LibRaw develops the raw data (camera white balance, half size when that is still large enough). Either way
the photo is turned upright the way the camera recorded it.

LibRaw also opens ordinary 16-bit greyscale TIFFs, as if they were Bayer data; those stay Pillow's, which scales
their real range. So a TIFF is a raw file only when LibRaw opens it and it is marked as one (a DNG version, Canon's
CR2 signature) or its first image is smaller than LibRaw's (a thumbnail in front of the sensor data: NEF, ARW, PEF).
Files that are not TIFFs (CR3, RAF, ORF, RW2) are raw whenever LibRaw opens them.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, BinaryIO

from PIL import Image, ImageOps

# Camera raw files by name, where a name has to decide (reference folders list photos by suffix).
RAW_SUFFIXES = (".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".raf", ".orf", ".rw2",
                ".rwl", ".pef", ".srw", ".x3f", ".3fr", ".fff", ".iiq", ".erf", ".kdc", ".dcr", ".mos", ".mrw", ".mef")
# Formats Pillow decodes well that LibRaw has no business looking at; checked first so that an ordinary JPEG never
# pays for a LibRaw parse. ISO-BMFF files are HEIC/AVIF, except Canon's CR3 (brand "crx ").
_NOT_RAW_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF87a", b"GIF89a", b"BM")
_HEIF_BRANDS_NOT_RAW = b"crx "
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
_DNG_VERSION = 50706
# LibRaw orientation codes -> Pillow transposes that turn the sensor-oriented picture upright (EXIF 3, 8, 6).
_FLIP = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.ROTATE_90, 6: Image.Transpose.ROTATE_270}


@dataclass
class RawPhoto:
    image: Image.Image  # RGB, upright, at least the analysed size (not yet resized to it)
    width: int  # upright size of the raw image
    height: int


class RawRejected(ValueError):
    """A raw file LibRaw recognised but cannot turn into a picture; `str()` says what to do."""


class RawCutShort(RawRejected):
    """LibRaw could not develop the sensor data: damaged, or a copy that has not finished."""


def might_be_raw(data: bytes) -> bool:
    if data.startswith(_NOT_RAW_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return False
    if data[4:8] == b"ftyp":
        return data[8:12] == _HEIF_BRANDS_NOT_RAW
    return True


def _raw_not_plain_tiff(fp: BinaryIO, pixels: int) -> bool:
    head = fp.read(10)
    fp.seek(0)
    if not head.startswith(_TIFF_MAGIC):
        return True
    if head[8:10] == b"CR":  # Canon CR2: its first image is a full-size preview, so the size test cannot tell
        return True
    try:
        with Image.open(fp, formats=["TIFF"]) as first:  # the header only: nothing is decoded
            return _DNG_VERSION in first.tag_v2 or first.width * first.height < pixels
    except Exception:  # a TIFF Pillow cannot even open, which LibRaw can: LibRaw's
        return True


def looks_raw(path: str) -> bool:
    """Whether the file at `path` is a camera raw file LibRaw opens (headers only: nothing is read whole or developed)."""
    try:
        import rawpy

        with open(path, "rb") as fp:
            if not might_be_raw(fp.read(16)):
                return False
            fp.seek(0)
            with rawpy.imread(path) as raw:
                if raw.num_colors < 3:
                    return False
                pixels = raw.sizes.width * raw.sizes.height
            return _raw_not_plain_tiff(fp, pixels)
    except Exception:  # not a raw file, or one LibRaw cannot parse: the worker gives the reason
        return False


def decode_raw(data: bytes, target: Any, max_pixels_on_disk: int) -> RawPhoto | None:
    """The raw photo in `data`, or None when it is not a raw file (Pillow's to decode).

    `target(width, height)` gives the size the photo will be analysed at, so that the cheapest source at least that
    large is used."""
    if not might_be_raw(data):
        return None
    try:
        import rawpy
    except ImportError:  # pragma: no cover - rawpy is a declared dependency
        return None
    try:
        raw = rawpy.imread(io.BytesIO(data))
    except Exception:  # LibRaw does not know it (or chokes on its header): Pillow decides, and gives the reason
        return None
    with raw:
        try:
            sizes = raw.sizes
            if raw.num_colors < 3 or not _raw_not_plain_tiff(io.BytesIO(data), sizes.width * sizes.height):
                return None
        except rawpy.LibRawError:
            return None
        sideways = sizes.flip in (5, 6)
        width, height = (sizes.height, sizes.width) if sideways else (sizes.width, sizes.height)
        if width <= 0 or height <= 0:
            raise RawRejected("the raw file has no image in it; copy it again, or export a JPEG from your raw "
                              "converter")
        if max(width * height, sizes.raw_width * sizes.raw_height) > max_pixels_on_disk:
            raise RawRejected(f"the raw image is too large to open safely (more than "
                              f"{max_pixels_on_disk // 1_000_000} megapixels); export a JPEG at a smaller size")
        tw, th = target(width, height)
        preview = _camera_preview(raw, rawpy, (width, height), (tw, th), sizes.flip, max_pixels_on_disk)
        if preview is not None:
            return RawPhoto(preview, width, height)
        try:
            half = sizes.width // 2 >= (th if sideways else tw) and sizes.height // 2 >= (tw if sideways else th)
            rgb = raw.postprocess(half_size=half, use_camera_wb=True, output_bps=8)
        except MemoryError as exc:
            raise RawRejected("the raw file needs more memory to develop than is available; export a JPEG from "
                              "your raw converter") from exc
        except rawpy.LibRawError as exc:
            raise RawCutShort(f"the raw file is damaged or truncated and LibRaw cannot develop it "
                              f"({type(exc).__name__}); copy it again, or export a JPEG from your raw converter") from exc
    return RawPhoto(Image.fromarray(rgb, "RGB"), width, height)


def _camera_preview(raw: Any, rawpy: Any, size: tuple[int, int], target: tuple[int, int], flip: int,
                    max_pixels_on_disk: int) -> Image.Image | None:
    """The embedded preview, upright, if it shows the whole frame at least at the analysed size; else None."""
    try:
        thumb = raw.extract_thumb()
    except rawpy.LibRawError:  # no preview, one LibRaw cannot read, or a damaged one: develop the raw instead
        return None
    try:
        if thumb.format == rawpy.ThumbFormat.JPEG:
            img = Image.open(io.BytesIO(thumb.data), formats=["JPEG"])
            if img.width * img.height > max_pixels_on_disk:
                return None
            img.draft("RGB", (target[0] * 2, target[1] * 2))
            has_orientation = int(img.getexif().get(0x0112, 1)) != 1
            img.load()
            img = (ImageOps.exif_transpose(img) or img) if has_orientation else _upright(img, flip)
        elif thumb.format == rawpy.ThumbFormat.BITMAP:
            img = _upright(Image.fromarray(thumb.data).convert("RGB"), flip)
        else:
            return None
    except Exception:  # a preview Pillow cannot decode is no reason to fail the photo: the raw data is still there
        return None
    img = img.convert("RGB")
    w, h = size
    # A preview that is smaller than what is analysed, or has another shape (some cameras letterbox or crop it),
    # is not the photo.
    if img.width < min(target[0], w) or img.height < min(target[1], h):
        return None
    if abs(math.log((img.width / img.height) / (w / h))) > 0.03:
        return None
    return img


def _upright(img: Image.Image, flip: int) -> Image.Image:
    op = _FLIP.get(flip)
    return img.transpose(op) if op is not None else img


__all__ = ["RAW_SUFFIXES", "RawPhoto", "RawRejected", "decode_raw", "looks_raw", "might_be_raw"]
