"""Label propagation over the k-nearest-neighbour graph of the embeddings (semi-supervised:
Zhou et al., 2004, "Learning with local and global consistency", as
``sklearn.semi_supervised.LabelSpreading(kernel="knn")``). Pure: numpy + sklearn.

A few labels spread along the graph of similar scans; every unlabeled scan gets a
distribution over the classes with a confidence. The product shows the result as
*candidates* for a clinician to confirm, never as labels.
"""

from __future__ import annotations

import numpy as np
from sklearn.semi_supervised import LabelSpreading

UNLABELED = -1


def propagate(vectors: np.ndarray, labels: np.ndarray, *, k: int = 10, alpha: float = 0.2,
              max_iter: int = 100) -> np.ndarray:
    """``vectors (N, D)``, ``labels (N,)`` with class indices ``0..C-1`` or ``UNLABELED``.

    Returns ``(N, C)`` class distributions (rows sum to 1; labeled rows stay near their
    label with ``alpha`` small). Vectors are L2-normalised, so the graph is cosine k-NN, as
    the FAISS index searches. ``ValueError`` without at least one labeled scan of two classes
    or with fewer than ``k + 1`` scans."""
    vectors = np.asarray(vectors, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if vectors.ndim != 2 or len(vectors) != len(labels):
        raise ValueError("one label (or UNLABELED) per vector")
    known = np.unique(labels[labels != UNLABELED])
    if len(known) < 2:
        raise ValueError("label propagation needs labeled scans of at least 2 classes")
    if len(vectors) <= k:
        raise ValueError(f"{len(vectors)} scans: too few for a {k}-nearest-neighbour graph")
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    model = LabelSpreading(kernel="knn", n_neighbors=k, alpha=alpha, max_iter=max_iter)
    model.fit(unit, labels)
    proba = np.zeros((len(vectors), int(labels.max()) + 1))
    proba[:, model.classes_] = np.nan_to_num(model.label_distributions_, nan=0.0)
    sums = proba.sum(axis=1, keepdims=True)
    return np.divide(proba, sums, out=np.full_like(proba, 1.0 / proba.shape[1]),
                     where=sums > 0)
