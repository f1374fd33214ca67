"""Camera raw files are analysed from their full image, upright, through LibRaw (daemon/intake/raw.py).

Real DNGs built at test time (tests/corpus.py `dng`): IFD0 a preview, the SubIFD 12-bit Bayer sensor data, as
cameras write them. Which picture was analysed is told by its content: the scene has a red block, a preview drawn
for the test a blue one in another corner.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from corpus import dng, encode
from daemon.intake.images import PhotoTruncated, decode_photo
from daemon.intake.raw import looks_raw

W, H = 640, 480
MAX_PIXELS = 448 * 448  # analysed at 504 x 364 (landscape)


def scene(block: str = "red") -> np.ndarray:
    """Linear light: a grey field, a saturated block in the top-left (red) or bottom-right (blue) corner."""
    img = np.full((H, W, 3), 0.18)
    if block == "red":
        img[40:200, 40:260] = (0.8, 0.05, 0.05)
    else:
        img[280:440, 380:600] = (0.05, 0.05, 0.8)
    return img


def closest(image: Image.Image, candidates: dict[str, np.ndarray]) -> str:
    """The candidate picture (linear RGB) that `image` looks most like, each compared channel-normalised at its size."""
    got = np.asarray(image.convert("RGB"), dtype=np.float64)

    def norm(a: np.ndarray) -> np.ndarray:
        return (a - a.mean((0, 1))) / (a.std((0, 1)) + 1e-6)

    errors = {}
    for name, linear in candidates.items():
        shown = Image.fromarray((np.clip(linear, 0, 1) ** (1 / 2.2) * 255).astype("uint8"))
        if shown.size != image.size:
            errors[name] = float("inf")
            continue
        errors[name] = float(np.mean((norm(got) - norm(np.asarray(shown, dtype=np.float64))) ** 2))
    return min(errors, key=errors.get)


def upright(a: np.ndarray, orientation: int, size: tuple[int, int]) -> np.ndarray:
    """`a` turned the way EXIF `orientation` says, resized to `size`."""
    turned = {1: a, 3: np.rot90(a, 2), 6: np.rot90(a, -1), 8: np.rot90(a, 1)}[orientation]
    img = Image.fromarray((turned * 255).astype("uint8")).resize(size, Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float64) / 255


def candidates(size: tuple[int, int]) -> dict[str, np.ndarray]:
    return {f"{what} o{o}": upright(scene(block), o, size) for what, block in (("raw", "red"), ("preview", "blue"))
            for o in (1, 3, 6, 8)}


def test_pillow_alone_would_read_the_thumbnail() -> None:
    data = dng(scene())
    assert Image.open(io.BytesIO(data)).size == (W // 4, H // 4)  # the premise: a TIFF reader sees the thumbnail


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_a_raw_with_a_small_preview_is_developed_from_its_sensor_data_upright(orientation: int) -> None:
    photo = decode_photo(dng(scene(), orientation=orientation), MAX_PIXELS)
    sideways = orientation in (6, 8)
    assert photo.format == "RAW"
    assert (photo.width, photo.height) == ((H, W) if sideways else (W, H))
    assert photo.image.size == ((364, 504) if sideways else (504, 364))
    assert closest(photo.image, candidates(photo.image.size)) == f"raw o{orientation}"


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_a_full_size_camera_preview_is_what_is_analysed_upright(orientation: int) -> None:
    photo = decode_photo(dng(scene(), orientation=orientation, preview=scene("blue")), MAX_PIXELS)
    sideways = orientation in (6, 8)
    assert (photo.width, photo.height) == ((H, W) if sideways else (W, H))
    assert closest(photo.image, candidates(photo.image.size)) == f"preview o{orientation}"


def test_a_preview_smaller_than_the_analysed_size_or_of_another_shape_is_not_used() -> None:
    small = scene("blue")[::2, ::2]  # 320 x 240: less than the 504 x 364 analysed
    photo = decode_photo(dng(scene(), preview=small), MAX_PIXELS)
    assert closest(photo.image, candidates(photo.image.size)) == "raw o1"
    # the same small preview is enough for a smaller analysed size (224 x 168)
    photo = decode_photo(dng(scene(), preview=small), 224 * 168)
    assert closest(photo.image, candidates(photo.image.size)) == "preview o1"
    # but not one large enough that shows another frame: the camera cropped it to 16:9
    letterboxed = scene("blue")[60:420]
    photo = decode_photo(dng(scene(), preview=letterboxed), 224 * 168)
    assert closest(photo.image, candidates(photo.image.size)) == "raw o1"


def test_a_truncated_raw_fails_with_what_to_do() -> None:
    data = dng(scene())
    with pytest.raises(PhotoTruncated, match="damaged or truncated.*copy it again"):  # maybe a copy still under way
        decode_photo(data[: len(data) // 2], MAX_PIXELS)


def test_greyscale_16_bit_tiffs_stay_pillows_and_only_raw_files_look_raw(tmp_path) -> None:
    grey = encode(Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 21).astype("uint16")), "TIFF")
    photo = decode_photo(grey, MAX_PIXELS)
    assert photo.format == "TIFF"  # LibRaw opens it as a monochrome "raw": Pillow scales its real range instead
    assert np.asarray(photo.image).max() > 200
    files = {"a.dng": dng(scene()), "b.tif": grey, "c.jpg": encode(Image.new("RGB", (64, 48)), "JPEG"),
             "d.bin": b"\0" * 4096}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    assert {name: looks_raw(str(tmp_path / name)) for name in files} == {
        "a.dng": True, "b.tif": False, "c.jpg": False, "d.bin": False}


def test_a_raw_reference_gets_a_thumbnail_of_its_whole_picture(tmp_path) -> None:
    from daemon.config import load_config
    from daemon.references.thumbnails import THUMB_PX, thumbnail

    cfg = load_config(tmp_path, env={})
    path = tmp_path / "ref.NEF"
    path.write_bytes(dng(scene(), orientation=6, preview=scene("blue")[::4, ::4]))
    thumb = thumbnail(cfg, "0" * 64, path)
    assert thumb is not None
    with Image.open(thumb) as img:
        assert img.size == (THUMB_PX * 3 // 4, THUMB_PX)  # upright, and not the 160 x 120 preview enlarged
        assert closest(img, candidates(img.size)) == "raw o6"


def test_raw_references_are_listed_with_the_other_photos(tmp_path) -> None:
    from daemon.references.indexer import reference_files

    for name in ("a.jpg", "b.NEF", "c.cr3", "d.dng", "e.txt", "f.xmp"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in reference_files(tmp_path)] == ["a.jpg", "b.NEF", "c.cr3", "d.dng"]
