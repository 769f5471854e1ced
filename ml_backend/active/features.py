"""What a head reads: the encoder's embedding, and beside it a small thumbnail of the scan's
own pixels (pure: numpy + PIL).

Why the pixels: a linear head on a frozen self-supervised embedding and a linear model on raw
pixels make different mistakes. On 47 labeled chest films the raw-pixel floor beats every
encoder we have trained (docs/benchmarks.md, "A head on the embedding and the pixels"); on
brain MRI the embedding beats pixels by far, yet on a folder from other sites pixels held up
better. One logistic regression on both blocks, each standardised and weighted so that
neither swamps the other by its number of dimensions alone, beats both inputs on every set
we measured — a late ensemble in one convex fit, with the calibration, balance and
prototypes of ``refit.fit_head`` unchanged.

The thumbnail is the scan at the encoder's input size, area-averaged to ``side`` x ``side``
(16: 256 values per channel, in [0, 1]), stored beside the embedding as float32 — not
rounded to 8 bits, so an exported network that averages the same pixels gives the same
probabilities to 1e-4.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# The refit's pixel block (chosen with bench.ssl_eval --evaluations hybrid_probe and
# --hybrid-pixels, and bench.new_class --heads NAME+px: docs/benchmarks.md, "A head on the
# embedding and the pixels"). medsite/settings.py's MEDLABEL_REFIT_PIXEL_WEIGHT defaults to
# PIXEL_WEIGHT.
PIXEL_SIDE = 16
# The pixel block's weight against the embedding's once both are standardised and scaled to
# the same total variance (1: equal shares; 0: no pixel block, the embedding alone).
PIXEL_WEIGHT = 1.0


def thumbnails(images: np.ndarray, side: int = PIXEL_SIDE) -> np.ndarray:
    """``uint8 (N, S, S)`` or ``(N, S, S, C)`` images → ``float32 (N, side * side * C)`` in
    [0, 1], each image area-averaged to ``side`` x ``side`` (row-major, channels last; a
    size ``side`` does not divide is resized with PIL's box filter instead)."""
    images = np.asarray(images)
    if images.ndim not in (3, 4) or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 (N, S, S[, C]) images, got {images.dtype} "
                         f"{images.shape}")
    if side < 1:
        raise ValueError("side must be at least 1")
    n, height, width = images.shape[:3]
    channels = images.shape[3] if images.ndim == 4 else 1
    if n == 0:
        return np.zeros((0, side * side * channels), np.float32)
    if height % side == 0 and width % side == 0:
        fh, fw = height // side, width // side
        blocks = images.reshape(n, side, fh, side, fw, channels).astype(np.float32)
        return (blocks.mean(axis=(2, 4)) / 255.0).reshape(n, -1).astype(np.float32)
    out = np.empty((n, side, side, channels), np.float32)
    for i, image in enumerate(images):
        resized = Image.fromarray(image).resize((side, side), Image.BOX)
        out[i] = np.asarray(resized, np.float32).reshape(side, side, channels) / 255.0
    return out.reshape(n, -1)


def head_inputs(vectors: np.ndarray, thumbs: np.ndarray | None) -> np.ndarray:
    """The head's input: the embedding, and the thumbnail beside it (when given)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if thumbs is None:
        return vectors
    thumbs = np.asarray(thumbs)
    if len(thumbs) != len(vectors):
        raise ValueError("one thumbnail per embedding")
    return np.hstack([vectors, thumbs.astype(np.float64)])


def block_weights(embedding_dim: int, pixel_dim: int,
                  pixel_weight: float = PIXEL_WEIGHT) -> np.ndarray:
    """Per-feature weights on standardised features (``fit_head(feature_weights=...)``):
    1 for the embedding; for the pixels ``pixel_weight * sqrt(embedding_dim / pixel_dim)``,
    so both blocks carry the same total variance at ``pixel_weight == 1`` and the
    embedding's own regularisation is what a head on the embedding alone gets."""
    if embedding_dim < 1 or pixel_dim < 0 or (pixel_dim and pixel_weight <= 0):
        raise ValueError("the dimensions must be positive and a pixel block's weight too "
                         "(no pixel block: pixel_dim 0)")
    pixel = pixel_weight * np.sqrt(embedding_dim / pixel_dim) if pixel_dim else 0.0
    return np.concatenate([np.ones(embedding_dim), np.full(pixel_dim, pixel)])


def cluster_inputs(vectors: np.ndarray, thumbs: np.ndarray | None,
                   pixel_weight: float = PIXEL_WEIGHT) -> np.ndarray:
    """What the label-free view clusters: the embedding and the thumbnail side by side, each
    feature standardised over the given rows, the thumbnail weighted by ``block_weights`` (at
    ``pixel_weight`` 1 both blocks carry the same total variance), as float32 ``(N, D + P)``
    for cosine k-means. Without thumbnails or at ``pixel_weight`` 0: the embedding as it is.

    Why: at the cluster view's k = 8 this sorts scans by class better than either block alone
    on chest films, brain MRI and blood smears — the embedding separates what the pixels
    blur, the pixels keep the brightness and contrast the self-supervised augmentations taught
    the embedding to ignore (docs/benchmarks.md, "Label-free: the embedding and the pixels
    together")."""
    vectors = np.asarray(vectors)
    if thumbs is None or pixel_weight == 0:
        return np.ascontiguousarray(vectors, dtype=np.float32)
    if pixel_weight < 0:
        raise ValueError("pixel_weight must be at least 0")
    thumbs = np.asarray(thumbs)
    if len(thumbs) != len(vectors):
        raise ValueError("one thumbnail per embedding")
    # float32 and in place: the view clusters up to 20,000 scans inside a web process
    both = np.hstack([vectors.astype(np.float32, copy=False),
                      thumbs.astype(np.float32, copy=False)])
    mean = both.mean(axis=0, dtype=np.float64)
    spread = both.std(axis=0, dtype=np.float64)
    spread[spread < 1e-6] = 1.0             # a constant feature stays 0, not inf
    scale = block_weights(vectors.shape[1], both.shape[1] - vectors.shape[1],
                          pixel_weight) / spread
    both -= mean.astype(np.float32)
    both *= scale.astype(np.float32)
    return both
