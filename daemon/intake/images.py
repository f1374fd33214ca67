"""Turn a file from the inbox into a safe, upright, model-sized RGB image, or say in plain words why not.

Everything here treats the file as hostile: pixel-count bombs, compressed-text bombs, truncated data,
odd modes (CMYK, 16-bit, palette with alpha), animations and non-images named `.jpg`. Camera raw files go
through LibRaw (daemon/intake/raw.py): Pillow would read a NEF or DNG as its 160x120 thumbnail.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..fsutil import NotReadable, read_regular_file, too_large
from .raw import RAW_SUFFIXES, RawCutShort, RawPhoto, RawRejected, decode_raw, looks_raw

# The names a photo file goes by. A browser opens these as pictures, never as a page that runs script: the reports
# link an original only under one of them (a photo renamed `x.html` or `x.svg` opens as an active page).
# Every format the inbox and the API take in (_PHOTO_FORMATS below) by its usual names: a report's link to its
# original and `analyze FOLDER` go by these.
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".jpe", ".jif", ".png", ".tif", ".tiff", ".webp", ".heic", ".heif", ".avif", ".gif", ".bmp",
                  ".jp2", ".j2k", ".jpf", ".psd") + RAW_SUFFIXES

# What Pillow may open: photo formats only. Pillow also opens EPS (through Ghostscript, which runs the file's
# PostScript), ICO, SPIDER, FITS and some thirty more; a file named IMG_1.jpg holding one is no photo of ours.
# (An MPO opens as JPEG: that opener makes it.)
_PHOTO_FORMATS = ("JPEG", "PNG", "TIFF", "WEBP", "HEIF", "AVIF", "GIF", "BMP", "JPEG2000", "PSD")

try:  # iPhone photos: HEIC/HEIF are analysed, not failed.
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - pillow-heif is a declared dependency
    pillow_heif = None
Image.init()
# Those this Pillow has an opener for: Image.open raises KeyError for a name it does not know (AVIF before 11.2).
PILLOW_FORMATS = tuple(f for f in _PHOTO_FORMATS if f in Image.OPEN)

# Large enough for medium-format backs (150 MP), small enough that a 40000x40000 bomb is refused.
MAX_PIXELS_ON_DISK = 200_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS_ON_DISK
ImageFile.LOAD_TRUNCATED_IMAGES = False
PATCH = 28  # Qwen2-VL: 14 px patches merged 2x2
# Qwen2-VL's processor refuses images whose long side is more than 200 times the short one (a ValueError deep in
# the model's preprocessing, which no retry can cure). Photos are analysed at a size within that limit; a long
# panorama is already squeezed to whole patches, and the report states the size that was analysed.
MAX_ASPECT_RATIO = 200
DRAFT_GAP = 1.5  # JPEG: decode at no less than this many times the analysed size (see decode_photo)
RESIZE_GAP = 2.0  # other formats: reduce by a whole factor to no less than this many times, then LANCZOS


class ImageRejected(ValueError):
    """The file cannot be analysed; `str()` is a sentence a photographer understands."""


class PhotoTruncated(ImageRejected):
    """The file ends early: damaged, or a copy still under way that paused (the worker tells them apart)."""


@dataclass
class LoadedImage:
    image: Image.Image  # RGB, upright, resized to fit max_pixels
    width: int  # upright size of the original
    height: int
    format: str | None
    sha256: str
    frames: int


def image_format(path: Path) -> str | None:
    """The image format Pillow recognises in the regular file `path` (its header only), "RAW" for a camera raw file,
    or None if it is no image at all: what a name does not say (an upload, `x.jpg_large` as Twitter saves it)."""
    try:
        with Image.open(path, formats=PILLOW_FORMATS) as im:
            return im.format or "image"
    except UnidentifiedImageError:
        return "RAW" if looks_raw(str(path)) else None  # CR3, RAF, ORF: raw formats Pillow does not know
    except Exception:  # an image Pillow recognises but finds faulty, or unreadable: the worker fails it with the reason
        return "image"


def fit_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """Largest size with both sides multiples of 28 and area <= max_pixels, keeping the aspect ratio."""
    scale = min(1.0, math.sqrt(max_pixels / float(width * height)))
    w = max(PATCH, int(width * scale) // PATCH * PATCH)
    h = max(PATCH, int(height * scale) // PATCH * PATCH)
    while w * h > max_pixels and (w > PATCH or h > PATCH):
        if w >= h:
            w -= PATCH
        else:
            h -= PATCH
    # Rounding the short side up to one patch can stretch a long thin photo (60000 x 1) past what the model
    # accepts: shorten the long side until it fits.
    while max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        if w > h:
            w -= PATCH
        else:
            h -= PATCH
    return w, h


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit greyscale: its own tones in 8 bits (value / 257), as Pillow does for 16-bit colour; stretching the
        # range instead made a white frame black and a night scene mid-grey, and the model judged the lighting
        # of another picture. 32-bit and float greyscale carry no scale of their own: 0-1 is taken for a float's
        # range, 0-65535 for an integer's, and only values beyond those are scaled to fit.
        import numpy as np

        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode == "F" and lo >= 0 and hi <= 1:
            arr = arr * 255.0
        elif lo >= 0 and hi <= 65535:
            arr = arr / 257.0
        else:
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else arr * 0
        return Image.fromarray(np.rint(arr).clip(0, 255).astype("uint8"), "L").convert("RGB")
    return img.convert("RGB")


def load_photo(path: Path, max_pixels: int, timeout_s: float | None = None,
               max_bytes: int | None = None) -> LoadedImage:
    """Read (only a regular file, of at most `max_bytes`, within `timeout_s`) and decode one photo."""
    why = too_large(path, max_bytes)
    if why:
        raise ImageRejected(why)
    try:
        data = read_regular_file(path, max_bytes=max_bytes, timeout_s=timeout_s)
    except NotReadable as exc:
        raise ImageRejected(str(exc)) from exc
    except OSError as exc:
        raise ImageRejected(f"the file could not be read ({exc.strerror or exc})") from exc
    except MemoryError as exc:  # no retry finds more memory for the same file
        raise ImageRejected("the file needs more memory to read than is available; export it at a smaller "
                            "size, or lower max_file_mb so such files are refused before they are read") from exc
    return decode_photo(data, max_pixels)


# Bumped when decoding changes the pixels a photo is analysed in (2: colour profiles converted to sRGB, 16-bit
# greyscale keeping its tones), so a report made from the old pixels is not reused for the photo dropped again.
DECODING = 2

# How a complete file of these formats ends, before any zero padding: JPEG's end-of-image marker, PNG's IEND chunk.
END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
UNFINISHED_ZEROS = 64  # zero bytes at the end of a JPEG or PNG that lacks its end: a copy not yet filled in
UNREADABLE_ZEROS = 4096  # at the end of a file no decoder can read: the rest of it has not arrived yet
# Compressed formats never end in a long run of zero bytes; TIFF, BMP and PSD may (uncompressed black rows).
COMPRESSED = frozenset({"WEBP", "HEIF", "AVIF", "GIF", "JPEG2000"})


def decode_photo(data: bytes, max_pixels: int) -> LoadedImage:
    # Empty, or ending in zeros: a copy that made the file first, or at its full size (Windows over SMB, rsync
    # --preallocate, BitTorrent, Resilio) and fills it in later. JPEG's decoder reads a zero tail as a grey image
    # without complaint, so a paused copy was critiqued half grey. Either may still be arriving: the worker looks
    # again for a while (PhotoTruncated) before it fails.
    if not data:
        raise PhotoTruncated("the file is empty (0 bytes); copy the photo again")
    zeros = _zeros_at_end(data)
    if zeros == len(data):
        raise PhotoTruncated(f"the file holds only zero bytes ({len(data)}), no photo yet; copy the photo again")
    digest = hashlib.sha256(data).hexdigest()
    try:
        raw = _raw_photo(data, max_pixels)
        if raw is not None:
            rgb, width, height, fmt, frames = raw.image, raw.width, raw.height, "RAW", 1
        else:
            rgb, width, height, fmt, frames, icc = _pillow_photo(data, max_pixels)
    except ImageRejected as exc:
        if zeros >= UNFINISHED_ZEROS and (isinstance(exc, PhotoTruncated)
                                          or (zeros >= UNREADABLE_ZEROS and _compressed(data))):
            raise PhotoTruncated(_unfinished(zeros)) from exc
        if data[:4] == b"RIFF" and int.from_bytes(data[4:8], "little") + 8 > len(data):  # WebP: its size is said
            raise PhotoTruncated("the photo is truncated (the file ends early); copy it again") from exc
        raise
    end = END_MARKERS.get(fmt or "")
    if fmt in ("JPEG", "MPO") and zeros >= UNFINISHED_ZEROS:
        # Walked to its own end marker: a motion photo carries its video after it (whose last bytes may be zeros);
        # an unfinished copy's zeros begin before the end marker is reached.
        # (Ending in its end marker right before the zeros is whole too, whatever bytes a camera left between
        # its segments, where the walk stops.)
        jpeg_end = _jpeg_end(data)
        unfinished = (jpeg_end is None or jpeg_end > len(data) - zeros) \
            and not data[:len(data) - zeros].endswith(END_MARKERS["JPEG"])
    elif end is not None:
        unfinished = zeros >= UNFINISHED_ZEROS and not data[:len(data) - zeros].endswith(end)
    else:
        # (A format's own last bytes may be zeros: a little slack.)
        unfinished = (fmt in COMPRESSED and zeros >= UNREADABLE_ZEROS
                      and _said_length(data) > len(data) - zeros + UNFINISHED_ZEROS)
    if unfinished:
        raise PhotoTruncated(_unfinished(zeros))
    fw, fh = fit_size(rgb.width, rgb.height, max_pixels)
    if (fw, fh) != rgb.size:
        # reducing_gap: a large PNG, TIFF or HEIC is first shrunk by a whole factor (box filter), as JPEGs are by the
        # draft, leaving LANCZOS at least RESIZE_GAP times the final size (Pillow's default for thumbnails).
        rgb = rgb.resize((fw, fh), Image.Resampling.LANCZOS, reducing_gap=RESIZE_GAP)
    if raw is None:
        rgb = in_srgb(rgb, icc)  # at the analysed size: a fraction of the time at the full one
    return LoadedImage(image=rgb, width=width, height=height, format=fmt, sha256=digest, frames=frames)


def _unfinished(zeros: int) -> str:
    return (f"the photo ends in {zeros:,} zero bytes where the rest of its data should be: a copy that has not "
            f"finished (made at its full size first, then filled in) or a damaged file; copy it again")


def _said_length(data: bytes) -> int:
    """How long the file says it is, where its format says so: WebP's RIFF size; HEIF, AVIF and JPEG 2000's boxes,
    walked to the last one; GIF's trailer. A complete photo padded with zeros says less than its length; a copy made
    at its full size and not yet filled says all of it (its zeros lie inside the image data)."""
    if data[:4] == b"RIFF":
        return int.from_bytes(data[4:8], "little") + 8
    if data[:4] == b"GIF8":
        return len(data.rstrip(b"\0"))  # the trailer `;` ends it: zeros after it are padding
    pos = 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos:pos + 4], "big")
        if size == 1 and pos + 16 <= len(data):
            size = int.from_bytes(data[pos + 8:pos + 16], "big")
        if size < 8:  # 0: "to the end of the file", as zero padding reads; anything else is not a box
            break
        pos += size
    return pos


def _jpeg_end(data: bytes) -> int | None:
    """The offset just past a JPEG's end-of-image marker, found by walking its segments (an EXIF thumbnail's own end
    marker lies inside its APP1 segment and is stepped over), or None when the data stops first."""
    if not data.startswith(b"\xff\xd8"):
        return None
    pos, n = 2, len(data)
    while pos + 2 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:
            return pos + 2
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length
            pos += 2
            continue
        if pos + 4 > n:
            return None
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2:
            return None
        pos += 2 + length
        if marker == 0xDA:  # a scan's coded data: to the next marker that is neither a stuffed 0xFF00 nor a restart
            while True:
                i = data.find(b"\xff", pos)
                if i < 0 or i + 1 >= n:
                    return None
                if data[i + 1] == 0 or 0xD0 <= data[i + 1] <= 0xD7 or data[i + 1] == 0xFF:
                    pos = i + 1
                    continue
                pos = i
                break
    return None


def _compressed(data: bytes) -> bool:
    """Whether the file begins as a compressed format does (JPEG, PNG, WebP, GIF, HEIF/AVIF, JPEG 2000), whose data
    never ends in a long run of zero bytes. TIFF, most camera raws, PSD and BMP may: uncompressed black rows (and a
    16-bit PSD or a planar TIFF that Pillow cannot read is refused for that, not for an unfinished copy)."""
    if data[4:8] == b"ftyp":
        return data[8:11] != b"crx"  # Canon's CR3 is ISO media too: raw
    return data.startswith((b"\xff\xd8", b"\x89PNG", b"GIF8", b"\x00\x00\x00\x0cjP", b"\xff\x4f\xff\x51")) \
        or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _zeros_at_end(data: bytes) -> int:
    """How many zero bytes `data` ends with, reading back a block at a time (no copy of a whole large file)."""
    end = len(data)
    while end > 0:
        start = max(0, end - 65536)
        kept = len(data[start:end].rstrip(b"\0"))
        if kept:
            return len(data) - start - kept
        end = start
    return len(data)


def _raw_photo(data: bytes, max_pixels: int) -> RawPhoto | None:
    """A camera raw file through LibRaw (daemon/intake/raw.py), or None for everything Pillow decodes."""
    try:
        return decode_raw(data, lambda w, h: fit_size(w, h, max_pixels), MAX_PIXELS_ON_DISK)
    except RawRejected as exc:
        raise (PhotoTruncated if isinstance(exc, RawCutShort) else ImageRejected)(str(exc)) from exc
    except MemoryError as exc:
        raise ImageRejected("the photo needs more memory than is available; export it at a smaller size") from exc


def _pillow_photo(data: bytes, max_pixels: int) -> tuple[Image.Image, int, int, str | None, int, bytes | None]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
            fmt = img.format
            frames = int(getattr(img, "n_frames", 1) or 1)
            if frames > 1:
                img.seek(0)  # animations and MPO pairs: the first frame is the photo
            w0, h0 = img.size
            if w0 * h0 > MAX_PIXELS_ON_DISK:
                raise Image.DecompressionBombError("too many pixels")
            if fmt == "JPEG":
                # Decode at a reduced scale (libjpeg scales in the DCT domain, a low-pass filter of its own) to the
                # smallest of 1/2, 1/4, 1/8 at least DRAFT_GAP times the analysed size in each direction, then resize
                # with LANCZOS. Pillow's thumbnail() uses a gap of 2; at 1.5 a 1600x1200 photo decodes at 800x600
                # instead of full size, 3x faster, within a third of a grey level on average of a full decode.
                tw, th = fit_size(w0, h0, max_pixels)
                img.draft("RGB", (math.ceil(tw * DRAFT_GAP), math.ceil(th * DRAFT_GAP)))
            img.load()
            icc = img.info.get("icc_profile")
            # The size on disk, turned as the photo analysed is: by exif_transpose where it makes a quarter turn,
            # which is where the tag, read after loading, says 5-8 as a number. Pillow's TIFF reader turns the photo
            # itself (its size is upright and the tag gone once loaded), and a tag written as text ("6") turns
            # nothing. (Not from the shapes: a draft rounds a near-square photo to a square.)
            try:
                quarter = img.getexif().get(0x0112) in (5, 6, 7, 8)
                img = ImageOps.exif_transpose(img) or img
            except Exception:  # a malformed EXIF block must not sink an otherwise good photo
                quarter = False
            width, height = (h0, w0) if quarter else (w0, h0)
            rgb = to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(
            f"the image is too large to open safely (more than {MAX_PIXELS_ON_DISK // 1_000_000} megapixels "
            "or a compressed bomb); export it at a smaller size") from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected("this file is not a photo Mondrian can read (JPEG, PNG, TIFF, HEIC, WebP, GIF, camera raw)") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct_error()) as exc:
        msg = str(exc).lower()
        if "truncated" in msg or "premature" in msg or isinstance(exc, EOFError):
            raise PhotoTruncated("the photo is truncated (the file ends early); copy it again") from exc
        if "too large" in msg or "decompressed data" in msg or "text chunk" in msg:
            raise ImageRejected("the file hides an oversized compressed chunk (a decompression bomb); "
                                "it was not opened") from exc
        raise ImageRejected(f"the photo is damaged and cannot be decoded ({exc})") from exc
    except MemoryError as exc:
        raise ImageRejected("the photo needs more memory than is available; export it at a smaller size") from exc
    except Exception as exc:  # decoders of odd formats raise anything; one file must never stop the queue
        raise ImageRejected(f"the photo could not be decoded ({type(exc).__name__}: {exc})") from exc
    return rgb, width, height, fmt, frames, icc


def in_srgb(rgb: Image.Image, icc: bytes | None) -> Image.Image:
    """The photo's colours in sRGB, as the model, the preview and the thumbnail take them: an iPhone's Display P3
    (or Adobe RGB) numbers read as sRGB look washed out. A profile that is not RGB, or cannot be read, is left
    alone."""
    if not icc:
        return rgb
    try:
        from PIL import ImageCms

        theirs = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if theirs.profile.xcolor_space.strip() != "RGB":
            return rgb
        # Every RGB profile is converted, sRGB's own too (a few milliseconds at the analysed size): a profile's
        # name says little ("sRGB linear" is not sRGB's encoding).
        return ImageCms.profileToProfile(rgb, theirs, ImageCms.createProfile("sRGB"), outputMode="RGB") or rgb
    except Exception:  # noqa: BLE001 - a damaged profile: the numbers as they are, as before
        return rgb


def struct_error() -> type[Exception]:
    import struct

    return struct.error
