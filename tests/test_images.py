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


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_a_16_bit_greyscale_photo_keeps_its_own_tones(fmt) -> None:
    """Attack: 16-bit greyscale was stretched to its own range: a white frame came out black, a night scene (values
    up to 4,000 of 65,535) mid-grey, a bright sky (60,000-61,000) from black to white. The model judged the lighting
    of another picture. Each keeps its tones now (value / 257), as 16-bit colour always did."""
    def analysed(arr: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(arr.astype(np.uint16)).save(buf, fmt)
        return np.asarray(decode_photo(buf.getvalue(), MAX_PIXELS).image.convert("L"), dtype=np.float64)

    assert analysed(np.full((80, 120), 65535)).min() == 255
    dark = analysed(np.linspace(0, 4000, 9600).reshape(80, 120))
    assert dark.max() <= 16 and dark.min() == 0, (dark.min(), dark.max())
    sky = analysed(np.linspace(60000, 61000, 9600).reshape(80, 120))
    assert 232 <= sky.min() and sky.max() <= 238, (sky.min(), sky.max())


def test_a_tiff_turned_by_its_orientation_reports_the_size_it_was_analysed_at() -> None:
    """Attack: a TIFF with orientation 6 (Pillow's TIFF reader turns it itself) was analysed as the 120x80
    landscape it is, but its report said 80x120; a JPEG whose orientation is written as text ("6", which Pillow does
    not turn) the other way round. The size reported is the one the analysed photo has, turned."""
    upright = Image.new("RGB", (120, 80), (20, 90, 200))
    for fmt, orientation in (("TIFF", 6), ("TIFF", 8), ("JPEG", 6)):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        upright.transpose(Image.Transpose.ROTATE_90).save(buf, fmt, exif=exif.tobytes())
        photo = decode_photo(buf.getvalue(), MAX_PIXELS)
        assert (photo.width, photo.height) == (120, 80), (fmt, orientation, photo.width, photo.height)
        assert photo.image.width > photo.image.height, (fmt, orientation, photo.image.size)  # analysed upright
    for size, orientation in (((1599, 1600), None), ((1600, 1599), 6)):  # a draft rounds these to a square
        buf = io.BytesIO()
        exif = Image.Exif()
        if orientation:
            exif[0x0112] = orientation
        Image.new("RGB", size, (20, 90, 200)).save(buf, "JPEG", exif=exif.tobytes())
        photo = decode_photo(buf.getvalue(), MAX_PIXELS)
        assert (photo.width, photo.height) == (size[::-1] if orientation else size), (size, orientation, photo.width)
    text = Image.new("RGB", (80, 120), (20, 90, 200))
    buf = io.BytesIO()
    text.save(buf, "JPEG", exif=_ascii_orientation(text, "6"))
    photo = decode_photo(buf.getvalue(), MAX_PIXELS)
    assert (photo.width > photo.height) == (photo.image.width > photo.image.height), (photo.width, photo.image.size)


def _ascii_orientation(img: Image.Image, value: str) -> bytes:
    """An EXIF block whose Orientation (0x0112) is written as ASCII, as some odd tools write it."""
    import struct

    entry = struct.pack("<HHI", 0x0112, 2, 2) + value.encode()[:1] + b"\0\0\0"
    return b"Exif\0\0" + b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", 1) + entry + struct.pack("<I", 0)


def _rgb_profile(primaries: tuple[tuple[float, float, float], ...], gamma: float = 2.2,
                 title: str = "Wide gamut (test)") -> bytes:
    """A minimal ICC v2 RGB display profile: three primaries (D50 XYZ), a white point and one gamma."""
    import struct

    def s15(x: float) -> bytes:
        return struct.pack(">i", round(x * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + b"\0" * 4 + s15(x) + s15(y) + s15(z)

    curve = b"curv" + b"\0" * 4 + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"
    name = title.encode() + b"\0"
    desc = b"desc" + b"\0" * 4 + struct.pack(">I", len(name)) + name + b"\0" * 8 + b"\0" * 70
    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(*primaries[0])),
            (b"gXYZ", xyz(*primaries[1])), (b"bXYZ", xyz(*primaries[2])),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset, table, body = 128 + 4 + 12 * len(tags), struct.pack(">I", len(tags)), b""
    for sig, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = (struct.pack(">I", offset + len(body)) + b"\0" * 4 + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ "
              + b"\0" * 12 + b"acsp" + b"\0" * 24 + b"\0" * 4 + s15(0.9642) + s15(1.0) + s15(0.8249) + b"\0" * 48)
    return header + table + body


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_photo_in_a_wide_gamut_profile_is_analysed_in_srgb(fmt) -> None:
    """Attack: an iPhone's photo is in Display P3; its numbers were taken as sRGB, so the model, the preview and the
    thumbnail saw it washed out. It is converted to sRGB; a photo without a profile, or with a damaged one, keeps
    its numbers."""
    p3 = _rgb_profile(((0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841)))
    green = Image.new("RGB", (160, 120), (40, 170, 60))

    def analysed(**extra) -> tuple[int, ...]:
        buf = io.BytesIO()
        green.save(buf, fmt, quality=98, **extra)
        return decode_photo(buf.getvalue(), MAX_PIXELS).image.getpixel((10, 10))

    plain = analysed()
    assert all(abs(a - b) <= 2 for a, b in zip(plain, (40, 170, 60))), plain
    converted = analysed(icc_profile=p3)
    assert converted[0] < 15 and converted[1] > 170, converted  # P3's green is more saturated than sRGB's can be
    assert analysed(icc_profile=b"not a profile at all") == plain
    # Linear values under a name that says sRGB are converted all the same: the name is not the encoding.
    linear = _rgb_profile(((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)), gamma=1.0,
                          title="sRGB linear (test)")
    assert analysed(icc_profile=linear)[0] > 90, analysed(icc_profile=linear)


def test_a_reference_thumbnail_shows_the_colours_the_reference_is_analysed_in(tmp_path) -> None:
    """A rag report shows its references as thumbnails: made from the numbers as stored, a Display P3 reference
    looked washed out beside the photo, which is now converted."""
    from daemon.config import load_config
    from daemon.references.thumbnails import thumbnail
    from tests.harness import make_home

    cfg = load_config(make_home(tmp_path / "home"), env={})
    p3 = _rgb_profile(((0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841)))
    ref = tmp_path / "ref.jpg"
    Image.new("RGB", (160, 120), (40, 170, 60)).save(ref, "JPEG", quality=98, icc_profile=p3)
    made = thumbnail(cfg, "0" * 64, ref)
    assert made is not None
    analysed = decode_photo(ref.read_bytes(), MAX_PIXELS).image.getpixel((10, 10))
    shown = Image.open(made).convert("RGB").getpixel((10, 10))
    assert shown[0] < 20 and all(abs(a - b) <= 6 for a, b in zip(shown, analysed)), (shown, analysed)
