"""Scan images as fixed-size arrays for training and embedding. Pure: no Django.

Training reads each scan's display preview (the windowed 8-bit PNG made at import), so a
DICOM is windowed exactly as the clinician sees it. Non-square images are padded to a
square (black borders, centred) before resizing, so anatomy keeps its aspect ratio.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image


def to_square(image: Image.Image, size: int) -> Image.Image:
    image = image.convert("L")
    side = max(image.size)
    if image.size != (side, side):
        canvas = Image.new("L", (side, side), 0)
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    if side != size:
        image = image.resize((size, size), Image.Resampling.BILINEAR if side > size
                             else Image.Resampling.BICUBIC)
    return image


def load_images(sources: Iterable[str | Path | bytes], size: int) -> np.ndarray:
    """Read images (paths or encoded bytes) into a ``uint8`` array ``(N, size, size)``."""
    if size < 8:
        raise ValueError("size must be at least 8")
    arrays = []
    for source in sources:
        handle = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(handle) as image:
            arrays.append(np.asarray(to_square(image, size), dtype=np.uint8))
    if not arrays:
        return np.zeros((0, size, size), dtype=np.uint8)
    return np.stack(arrays)


def resize_stack(images: np.ndarray, size: int) -> np.ndarray:
    """Resize a ``uint8 (N, H, W)`` stack to ``(N, size, size)``."""
    if images.shape[1:] == (size, size):
        return images
    return np.stack([np.asarray(to_square(Image.fromarray(im), size)) for im in images])
