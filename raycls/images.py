"""Image files to uint8 RGB arrays, with Pillow and NumPy only.

Outside `raycls.data` on purpose: importing that package imports torch, and Ray Data's decode tasks
(`data.loader: stream`, raycls.train.ray_data) import this module in every Ray worker process they start;
without torch a worker starts in a fraction of a second and holds a fraction of the memory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from raycls.errors import DataError
from raycls.registry import Registry

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

# `data.resize`: how an image file of any shape becomes size x size (the decoded arrays are square).
RESIZES: Registry[Callable[[PILImage, int], PILImage]] = Registry("resize")


@RESIZES.register("squash")
def squash(image: PILImage, size: int) -> PILImage:
    """The whole image, its aspect ratio changed to square (a 2:1 photo's objects come out half as wide)."""
    from PIL import Image

    return image.resize((size, size), Image.Resampling.BILINEAR)


@RESIZES.register("crop")
def centre_crop(image: PILImage, size: int) -> PILImage:
    """timm's evaluation transform at crop_pct 1: the shorter side resized to `size`, then the centre square.
    Aspect ratio kept; the ends of the longer side are cut off."""
    from PIL import Image

    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # Cropped before resizing (timm resizes first): the same square, and no pixel from outside it blends
    # into its edges through the resampling filter.
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)


def decode_image(file: Path, size: int, *, resize: str = "squash", where: str = "") -> np.ndarray:
    """One image file as RGB uint8 [size, size, 3], made square by the RESIZES entry `resize`; a DataError
    naming the file (and `where`) otherwise."""
    from PIL import Image, UnidentifiedImageError

    make_square = RESIZES.get(resize)
    try:
        with Image.open(file) as image:
            return np.asarray(make_square(image.convert("RGB"), size), dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{where}image {file} does not exist") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{where}unreadable image {file}: {err}") from None


def decode_rows(rows: dict[str, np.ndarray], *, size: int, resize: str = "squash") -> dict[str, np.ndarray]:
    """A batch of rows {path, label, where} -> {image: uint8 [B, size, size, 3], label}: Ray Data's decode step
    (each row's `where` prefixes its file's error, e.g. a CSV's line)."""
    images = [
        decode_image(Path(str(path)), size, resize=resize, where=str(where))
        for path, where in zip(rows["path"], rows["where"])
    ]
    return {"image": np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8), "label": rows["label"]}
