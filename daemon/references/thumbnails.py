"""Small JPEGs of reference photos, shown in rag reports; cached under var/cache by content hash."""

from __future__ import annotations

import io
import logging
from pathlib import Path

from ..config import Config
from ..fsutil import read_regular_file

log = logging.getLogger("mondrian.references")

THUMB_PX = 240


def thumbnail(cfg: Config, sha256: str, source: Path | str) -> Path | None:
    """A small JPEG of a reference (cached under var/cache by content hash), or None if it cannot be read."""
    from PIL import Image, ImageOps

    from ..fsutil import atomic_write_bytes
    from ..intake.images import MAX_PIXELS_ON_DISK, PILLOW_FORMATS, in_srgb, to_rgb
    from ..intake.raw import decode_raw

    dest = cfg.var_dir / "cache" / "reference-thumbs" / f"{sha256}.jpg"
    if dest.exists():
        return dest
    try:
        data = read_regular_file(Path(source), max_bytes=cfg.max_file_bytes, timeout_s=cfg.job_timeout_seconds)  # never blocks on a pipe
        raw = decode_raw(data, lambda w, h: (min(w, THUMB_PX), min(h, THUMB_PX)), MAX_PIXELS_ON_DISK)
        icc = None
        if raw is not None:  # a camera raw reference: its full picture, not the TIFF thumbnail Pillow would find
            img = raw.image
        else:
            with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as opened:
                opened.draft("RGB", (THUMB_PX * 2, THUMB_PX * 2))
                icc = opened.info.get("icc_profile")
                img = ImageOps.exif_transpose(opened) or opened
                img = to_rgb(img)  # the tones and colours the photo is analysed in (images.py)
        img.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
        img = in_srgb(img, icc)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85, optimize=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(dest, buf.getvalue())
        return dest
    except Exception as exc:  # a reference that vanished or cannot be decoded simply has no thumbnail
        log.debug("no thumbnail for %s: %s", source, exc)
        return None


__all__ = ["thumbnail", "THUMB_PX"]
