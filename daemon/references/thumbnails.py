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

    dest = cfg.var_dir / "cache" / "reference-thumbs" / f"{sha256}.jpg"
    if dest.exists():
        return dest
    try:
        data = read_regular_file(Path(source), max_bytes=cfg.max_file_bytes, timeout_s=cfg.job_timeout_seconds)  # never blocks on a pipe
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (THUMB_PX * 2, THUMB_PX * 2))
            img = ImageOps.exif_transpose(img) or img
            img = img.convert("RGB")
            img.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85, optimize=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(dest, buf.getvalue())
        return dest
    except Exception as exc:  # a reference that vanished or cannot be decoded simply has no thumbnail
        log.debug("no thumbnail for %s: %s", source, exc)
        return None


__all__ = ["thumbnail", "THUMB_PX"]
