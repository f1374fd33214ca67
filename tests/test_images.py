"""Issue 11, item 9: a photo is decoded at a reduced scale (JPEG draft, or a whole-factor reduction) before the
LANCZOS resize, for speed; the image the model sees keeps the size it always had and stays within a fraction of a
grey level of a full-resolution decode resized the fair way."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from daemon.intake.images import decode_photo, fit_size
from daemon.resources import samples_dir

MAX_PIXELS = 448 * 448  # the default max_pixels


def _photo_bytes(size: tuple[int, int], fmt: str = "JPEG", orientation: int | None = None) -> bytes:
    """A bundled sample at `size`, with fine lines drawn at full resolution (the detail a draft could lose)."""
    img = ImageOps.fit(Image.open(sorted(samples_dir().glob("*.jpg"))[0]).convert("RGB"), size)
    draw = ImageDraw.Draw(img)
    for x in range(0, size[0], 37):
        draw.line((x, 0, x + size[1] // 3, size[1]), fill=(250, 250, 250), width=2)
    buf = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(buf, fmt, quality=92, exif=exif.tobytes())
    else:
        img.save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _fair(data: bytes) -> Image.Image:
    """Every pixel decoded, turned upright, then one LANCZOS resize: the reference the fast path is held to."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    return img.resize(fit_size(img.width, img.height, MAX_PIXELS), Image.Resampling.LANCZOS)


def _psnr(a: Image.Image, b: Image.Image) -> float:
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return 10 * np.log10(255.0**2 / max(float((diff**2).mean()), 1e-12))


@pytest.mark.parametrize("size,fmt,orientation", [
    ((1600, 1200), "JPEG", None),  # decoded at 800x600
    ((4032, 3024), "JPEG", None),  # a phone's: decoded at 1008x756
    ((4032, 3024), "JPEG", 6),  # held sideways: upright 3024x4032
    ((3000, 2000), "PNG", None),  # no draft: reduced 2x by a box filter first
])
def test_a_photo_is_analysed_at_its_usual_size_and_close_to_a_full_decode(size, fmt, orientation) -> None:
    data = _photo_bytes(size, fmt, orientation)
    loaded = decode_photo(data, MAX_PIXELS)
    fair = _fair(data)
    upright = (size[1], size[0]) if orientation == 6 else size
    assert (loaded.width, loaded.height) == upright
    assert loaded.image.size == fair.size == fit_size(*upright, MAX_PIXELS)
    assert loaded.image.mode == "RGB"
    psnr = _psnr(loaded.image, fair)
    mean_diff = float(np.abs(np.asarray(loaded.image, dtype=np.float64) - np.asarray(fair, dtype=np.float64)).mean())
    # The lines are a hard case: Pillow's own thumbnail default (a gap of 2) gives the sideways phone photo 43.6 dB and
    # 0.9 levels; 1600x1200 decoded at 800x600 gets 41.5 dB and 1.0 level (natural content alone: 53 dB, 0.3).
    # Decoding at the analysed size (a gap of 1: 1/8 for the phone photo) would give 35 dB and 2.9 levels.
    assert psnr > 40.0 and mean_diff < 1.5, f"{size} {fmt}: {psnr:.1f} dB, mean difference {mean_diff:.2f} levels"


FORMATS = ["JPEG", "PNG", "WEBP", "GIF", "HEIF", "JPEG2000"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_copy_made_at_full_size_first_is_unfinished_while_zero_padding_after_a_whole_photo_is_not(fmt) -> None:
    """A copy made at its full size (zeros) and filled in later, caught part way, is "still arriving"
    (PhotoTruncated: the worker looks again), never an image: JPEG's decoder reads the zeros as grey rows without a
    word. A whole photo followed by zeros (some cameras pad their files) is still a photo."""
    from daemon.intake.images import PhotoTruncated

    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    Image.fromarray((rng.random((300, 400, 3)) * 255).astype("uint8")).save(buf, fmt)
    whole = buf.getvalue()
    assert decode_photo(whole + bytes(5000), MAX_PIXELS).format == decode_photo(whole, MAX_PIXELS).format
    for part in (0.4, 0.9):
        cut = int(len(whole) * part)
        with pytest.raises(PhotoTruncated, match="zero bytes where the rest of its data should be|truncated"):
            decode_photo(whole[:cut] + bytes(len(whole) - cut), MAX_PIXELS)
    for empty in (b"", bytes(len(whole))):
        with pytest.raises(PhotoTruncated):
            decode_photo(empty, MAX_PIXELS)


def test_a_file_that_may_end_in_black_and_cannot_be_read_is_refused_for_what_it_is() -> None:
    """A 16-bit PSD or a planar TIFF (which Pillow cannot read) with black bottom rows was called "a copy that has not
    finished; copy it again", held a minute and failed with advice that could never help. Only compressed formats,
    whose data never ends in a long run of zeros, are taken for unfinished copies."""
    from daemon.intake.images import ImageRejected, PhotoTruncated

    import struct

    h, w = 120, 80  # the last plane ends in 40 black rows: 6,400 zero bytes
    planes = np.zeros((3, h, w), dtype=">u2")
    planes[:, : h * 2 // 3] = np.random.default_rng(4).integers(1, 65535, (3, h * 2 // 3, w))  # black below
    psd16 = (b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, h, w, 16, 3) + struct.pack(">III", 0, 0, 0)
             + struct.pack(">H", 0) + planes.tobytes())
    for data in (psd16,):
        with pytest.raises(ImageRejected) as refused:
            decode_photo(data, MAX_PIXELS)
        assert not isinstance(refused.value, PhotoTruncated), refused.value


def test_a_motion_photo_whose_video_ends_in_zeros_is_a_photo_and_a_copy_cut_after_its_thumbnail_is_not() -> None:
    """A phone's motion photo is a JPEG with its video after the end marker; an MP4 may end in zeros (a `free` box).
    Such a photo was taken for an unfinished copy (its bytes before the zeros did not end in the JPEG's end marker),
    held, then failed. The JPEG is now walked to its own end. A copy filled only up to its EXIF thumbnail, whose
    own end marker lies inside the header, is still unfinished."""
    from daemon.intake.images import PhotoTruncated

    rng = np.random.default_rng(5)
    img = Image.fromarray((rng.random((300, 400, 3)) * 255).astype("uint8"))
    for progressive in (False, True):
        buf = io.BytesIO()
        img.save(buf, "JPEG", progressive=progressive)
        still = buf.getvalue()
        video = (b"\0\0\0\x18ftypmp42\0\0\0\0mp42isom" + (16 + 3000).to_bytes(4, "big") + b"mdat"
                 + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes() + (8 + 512).to_bytes(4, "big") + b"free"
                 + bytes(512))
        assert decode_photo(still + video, MAX_PIXELS).format == "JPEG"
        with pytest.raises(PhotoTruncated):  # the same copy caught before the still was whole
            decode_photo(still[:len(still) // 2] + bytes(len(still) - len(still) // 2 + len(video)), MAX_PIXELS)
    # An EXIF thumbnail (a whole JPEG, end marker included) in APP1, the rest not yet written.
    thumb = io.BytesIO()
    img.resize((160, 120)).save(thumb, "JPEG")
    # Pillow writes no thumbnail: a TIFF header whose IFD0 points at one (JPEGInterchangeFormat and its length)
    tiff = (b"II*\0\x08\0\0\0" + (2).to_bytes(2, "little")
            + (0x0201).to_bytes(2, "little") + (4).to_bytes(2, "little") + (1).to_bytes(4, "little")
            + (38).to_bytes(4, "little")
            + (0x0202).to_bytes(2, "little") + (4).to_bytes(2, "little") + (1).to_bytes(4, "little")
            + len(thumb.getvalue()).to_bytes(4, "little") + bytes(4))
    app1 = b"Exif\0\0" + tiff + thumb.getvalue()
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    plain = buf.getvalue()
    with_thumb = plain[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + plain[2:]
    assert decode_photo(with_thumb, MAX_PIXELS).format == "JPEG"
    header_end = 2 + 4 + len(app1)
    cut = header_end + (len(with_thumb) - header_end) * 3 // 5  # the thumbnail's end marker is in, the scan not
    with pytest.raises(PhotoTruncated, match="zero bytes where the rest of its data should be"):
        decode_photo(with_thumb[:cut] + bytes(len(with_thumb) - cut), MAX_PIXELS)


def test_a_jpeg_with_bytes_between_its_segments_padded_with_zeros_is_still_a_photo() -> None:
    """Some cameras leave stray bytes between header segments, where walking the JPEG's segments stops short; one
    that ends in its end marker right before a zero padding is whole all the same (as it was before the walk)."""
    rng = np.random.default_rng(6)
    buf = io.BytesIO()
    Image.fromarray((rng.random((120, 160, 3)) * 255).astype("uint8")).save(buf, "JPEG")
    plain = buf.getvalue()
    second = 4 + int.from_bytes(plain[4:6], "big")  # after the first segment (APP0)
    gapped = plain[:second] + b"\x00\x00" + plain[second:]
    assert decode_photo(gapped + bytes(4096), MAX_PIXELS).format == "JPEG"
