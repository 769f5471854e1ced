"""Scan images as fixed-size arrays for training and embedding. Pure: no Django.

Training reads each scan's display preview (the windowed 8-bit PNG made at import), so a
DICOM is windowed exactly as the clinician sees it. Non-square images are padded to a
square (black borders, centred) before resizing, so anatomy keeps its aspect ratio.

``channels`` decides the array layout: 1 gives greyscale ``(N, S, S)`` (a colour preview
becomes Rec. 601 luma), 3 gives RGB ``(N, S, S, 3)`` (a greyscale preview is replicated to
three equal channels). A colour project's models take 3 channels, a greyscale one's 1.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

CHANNEL_MODES = {1: "L", 3: "RGB"}


def _mode(channels: int) -> str:
    if channels not in CHANNEL_MODES:
        raise ValueError("channels must be 1 (greyscale) or 3 (RGB)")
    return CHANNEL_MODES[channels]


def to_square(image: Image.Image, size: int, channels: int = 1) -> Image.Image:
    mode = _mode(channels)
    image = image.convert(mode)
    side = max(image.size)
    if image.size != (side, side):
        canvas = Image.new(mode, (side, side), 0)
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    if side != size:
        image = image.resize((size, size), Image.Resampling.BILINEAR if side > size
                             else Image.Resampling.BICUBIC)
    return image


def load_images(sources: Iterable[str | Path | bytes], size: int,
                channels: int = 1) -> np.ndarray:
    """Read images (paths or encoded bytes) into a ``uint8`` array ``(N, size, size)``
    (``channels=1``) or ``(N, size, size, 3)`` (``channels=3``)."""
    if size < 8:
        raise ValueError("size must be at least 8")
    _mode(channels)
    arrays = []
    for source in sources:
        handle = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(handle) as image:
            arrays.append(np.asarray(to_square(image, size, channels), dtype=np.uint8))
    if not arrays:
        shape = (0, size, size) if channels == 1 else (0, size, size, 3)
        return np.zeros(shape, dtype=np.uint8)
    return np.stack(arrays)


def image_channels(images: np.ndarray) -> int:
    """1 for a ``(N, H, W)`` stack, 3 for ``(N, H, W, 3)``."""
    if images.ndim == 3:
        return 1
    if images.ndim == 4 and images.shape[-1] == 3:
        return 3
    raise ValueError(f"images must be (N, H, W) or (N, H, W, 3), got {images.shape}")


def as_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """A uint8 stack in the layout a model takes: grey replicated to RGB, or RGB to luma."""
    have = image_channels(images)
    if have == channels:
        return images
    if channels == 3:
        return np.repeat(images[..., None], 3, axis=-1)
    _mode(channels)
    luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(luma.round(), 0, 255).astype(np.uint8)


def resize_stack(images: np.ndarray, size: int) -> np.ndarray:
    """Resize a ``uint8 (N, H, W)`` or ``(N, H, W, 3)`` stack to ``size`` x ``size``."""
    if images.shape[1:3] == (size, size):
        return images
    channels = image_channels(images)
    return np.stack([np.asarray(to_square(Image.fromarray(im), size, channels))
                     for im in images])
