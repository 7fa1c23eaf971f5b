"""Item images: decode and fully verify raw JPEGs, re-encode when needed, grey placeholder.

Every image is decoded to the last pixel before it is trusted, so a truncated or garbage file
is caught here rather than inside an encoder's data loader hours later.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from functools import lru_cache
from pathlib import Path

from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)

PLACEHOLDER_SIZE = 224  # side of the placeholder when images keep their original size
PLACEHOLDER_GREY = (128, 128, 128)


class ImageStatus(str, Enum):
    """What became of one item's image file."""

    OK = "ok"
    MISSING = "missing"
    CORRUPT = "corrupt"


@lru_cache(maxsize=8)
def placeholder_jpeg(image_size: int = 0, jpeg_quality: int = 90) -> bytes:
    """A neutral mid-grey RGB JPEG, the same bytes for every item that lacks a usable image."""
    side = image_size or PLACEHOLDER_SIZE
    buf = io.BytesIO()
    Image.new("RGB", (side, side), PLACEHOLDER_GREY).save(buf, "JPEG", quality=jpeg_quality)
    return buf.getvalue()


def _square(img: Image.Image, side: int) -> Image.Image:
    """Resize the shorter side to ``side`` and centre-crop, as CLIP-style transforms do."""
    w, h = img.size
    scale = side / min(w, h)
    nw, nh = max(side, round(w * scale)), max(side, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - side) // 2, (nh - side) // 2
    return img.crop((left, top, left + side, top + side))


def load_image(
    path: Path | None, image_size: int = 0, jpeg_quality: int = 90
) -> tuple[bytes, ImageStatus]:
    """Read ``path`` and return RGB JPEG bytes and a status; the placeholder unless OK.

    ``path`` None (no usable file name) counts as missing.
    ``image_size`` 0 keeps the original (its own bytes when it already is an RGB JPEG);
    otherwise the image is resized and centre-cropped to a square of that side.
    """
    if path is None:
        return placeholder_jpeg(image_size, jpeg_quality), ImageStatus.MISSING
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return placeholder_jpeg(image_size, jpeg_quality), ImageStatus.MISSING
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decodes everything: truncated or garbage data raises here
            fmt, mode = img.format, img.mode
            rgb = img.convert("RGB")
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ...) on bad data
        log.debug("corrupt image %s: %s", path, exc)
        return placeholder_jpeg(image_size, jpeg_quality), ImageStatus.CORRUPT
    if image_size == 0 and fmt == "JPEG" and mode == "RGB":
        return data, ImageStatus.OK
    if image_size:
        rgb = _square(rgb, image_size)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=jpeg_quality)
    return buf.getvalue(), ImageStatus.OK


def load_images(
    paths: Sequence[Path | None], image_size: int = 0, jpeg_quality: int = 90, workers: int = 8
) -> list[tuple[bytes, ImageStatus]]:
    """``load_image`` over many files with a thread pool (PIL decodes without the GIL)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda p: load_image(p, image_size, jpeg_quality), paths)
        return list(tqdm(results, total=len(paths), desc="images", unit="img", disable=None))
