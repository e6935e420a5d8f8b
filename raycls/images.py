"""Image files to uint8 RGB arrays, with Pillow and NumPy only.

Outside `raycls.data` on purpose: importing that package imports torch, and Ray Data's decode tasks
(`data.loader: stream`, raycls.train.ray_data) import this module in every Ray worker process they start;
without torch a worker starts in a fraction of a second and holds a fraction of the memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raycls.errors import DataError


def decode_image(file: Path, size: int, *, where: str = "") -> np.ndarray:
    """One image file as RGB uint8 [size, size, 3]; a DataError naming the file (and `where`) otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{where}image {file} does not exist") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{where}unreadable image {file}: {err}") from None


def decode_rows(rows: dict[str, np.ndarray], *, size: int) -> dict[str, np.ndarray]:
    """A batch of rows {path, label, where} -> {image: uint8 [B, size, size, 3], label}: Ray Data's decode step
    (each row's `where` prefixes its file's error, e.g. a CSV's line)."""
    images = [decode_image(Path(str(path)), size, where=str(where)) for path, where in zip(rows["path"], rows["where"])]
    return {"image": np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8), "label": rows["label"]}
