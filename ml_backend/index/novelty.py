"""Calibrated novelty (out-of-distribution) score for scan embeddings. Pure: numpy + FAISS.

A scan is novel when it lies far from everything the project has already embedded. The raw
score is the mean cosine distance (``1 - cosine similarity`` of L2-normalised float32
vectors) to its ``k`` nearest embedded scans (:func:`knn_distances`, exact ``IndexFlatIP``
search in batches, so it scales to ~100k vectors).

Raw distances mean different things in different embedding spaces, so they are calibrated
against the project itself: :func:`fit_novelty` computes every project scan's leave-one-out
kNN distance (its neighbours are the *other* scans; only the scan's own index is excluded,
so an exact duplicate still counts as a neighbour at distance 0) and keeps them sorted in a
:class:`NoveltyModel`. A new scan's distance to the project's scans
(``knn_distances(new, k=model.k, reference=project_vectors)``) is then turned into a
percentile: the share of project scans whose own LOO distance is strictly smaller, x100. A
scan from the same distribution gets a roughly uniform percentile; one far outside it gets
100. :meth:`NoveltyModel.is_ood` flags distances above a reference percentile (99 by default)
that also exceed a small absolute floor, so a project of near-identical scans does not flag
every slightly different one.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

DEFAULT_FLOOR = 0.02   # cosine distance below which nothing is called novel
FORMAT = 1

__all__ = ["DEFAULT_FLOOR", "NoveltyModel", "ReferenceIndex", "fit_novelty", "knn_distances"]


def _normalise(vectors: np.ndarray, *, name: str) -> np.ndarray:
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds NaN or inf")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return np.ascontiguousarray(array / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def knn_distances(vectors: np.ndarray, k: int = 5, *, reference: np.ndarray | None = None,
                  exclude_self: bool = True, batch: int = 4096) -> np.ndarray:
    """Mean cosine distance of each row of ``vectors`` to its ``k`` nearest neighbours.

    With ``reference=None`` the neighbours are the other rows of ``vectors`` (with
    ``exclude_self``, only the row's own index is excluded, never an identical copy); with a
    ``reference`` they are its rows, nothing excluded. ``k`` is clipped to the neighbours
    available; with none the distance is ``+inf``. Returns ``(N,)`` float64 in ``[0, 2]``.
    """
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if int(batch) < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    queries = _normalise(vectors, name="vectors")
    loo = reference is None and exclude_self
    base = queries if reference is None else _normalise(reference, name="reference")
    if base.shape[1] != queries.shape[1]:
        raise ValueError(f"dimension mismatch: {queries.shape[1]} vs {base.shape[1]}")
    n = len(queries)
    available = len(base) - 1 if loo else len(base)
    k = min(int(k), available)
    if k < 1 or n == 0:
        return np.full(n, np.inf)
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    search_k = k + 1 if loo else k
    out = np.empty(n, dtype=np.float64)
    for start in range(0, n, int(batch)):
        stop = min(start + int(batch), n)
        sims, ids = index.search(queries[start:stop], search_k)
        if loo:
            keep = ids != np.arange(start, stop)[:, None]
            # Self may be crowded out of the top k+1 by exact duplicates: drop the last hit.
            keep[keep.all(axis=1), -1] = False
            sims = sims[keep].reshape(stop - start, k)
        distances = np.clip(1.0 - sims.astype(np.float64), 0.0, 2.0)
        out[start:stop] = distances.mean(axis=1)
    return out


class ReferenceIndex:
    """Reference rows normalised and indexed once, for scoring one scan at a time.

    ``knn_distances(vector, k, reference=...)`` normalises and indexes its reference on
    every call. That is right for an import's batch, and too slow for the label page,
    which scores one scan per answer against up to 5,000 vectors of 1,536 numbers (about
    100 MB of copies per answer). ``distances`` returns what ``knn_distances`` gives with
    the rows whose ids are in ``exclude_ids`` taken out of the reference."""

    def __init__(self, vectors: np.ndarray, ids) -> None:
        base = _normalise(vectors, name="reference")
        self.ids = np.asarray(ids).reshape(-1)
        if len(self.ids) != len(base):
            raise ValueError(f"{len(self.ids)} ids for {len(base)} reference rows")
        self.index = faiss.IndexFlatIP(base.shape[1])
        self.index.add(base)

    def __len__(self) -> int:
        return len(self.ids)

    def distances(self, vectors: np.ndarray, k: int = 5, *, exclude_ids=()) -> np.ndarray:
        """Mean cosine distance of each row of ``vectors`` to its ``k`` nearest reference
        rows, leaving out the rows whose ids are in ``exclude_ids`` (e.g. the scan itself).
        ``k`` is clipped to the rows left; with none the distance is ``+inf``."""
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = _normalise(vectors, name="vectors")
        if queries.shape[1] != self.index.d:
            raise ValueError(f"dimension mismatch: {queries.shape[1]} vs {self.index.d}")
        excluded = np.isin(self.ids, np.asarray(list(exclude_ids)))
        k = min(int(k), len(self.ids) - int(excluded.sum()))
        if k < 1 or len(queries) == 0:
            return np.full(len(queries), np.inf)
        sims, rows = self.index.search(queries, k + int(excluded.sum()))
        out = np.empty(len(queries), dtype=np.float64)
        for i in range(len(queries)):
            keep = [s for s, r in zip(sims[i], rows[i]) if r >= 0 and not excluded[r]][:k]
            out[i] = np.clip(1.0 - np.asarray(keep, np.float64), 0.0, 2.0).mean()
        return out


@dataclass
class NoveltyModel:
    """Sorted leave-one-out kNN distances of the project's scans, and how to read them."""

    reference_distances: np.ndarray
    k: int
    floor: float = DEFAULT_FLOOR

    def __post_init__(self) -> None:
        ref = np.sort(np.asarray(self.reference_distances, dtype=np.float64).ravel())
        if ref.size == 0:
            raise ValueError("a NoveltyModel needs at least one reference distance")
        if np.isnan(ref).any():
            raise ValueError("reference_distances hold NaN")
        self.reference_distances = ref
        self.k = int(self.k)
        self.floor = float(self.floor)

    def percentile(self, distances: np.ndarray) -> np.ndarray:
        """0..100: share of reference distances strictly below each distance, x100."""
        d = np.asarray(distances, dtype=np.float64)
        below = np.searchsorted(self.reference_distances, d, side="left")
        return 100.0 * below / self.reference_distances.size

    def threshold(self, percentile: float = 99.0) -> float:
        """The reference distance at ``percentile`` (an observed value, no interpolation)."""
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {percentile}")
        return float(np.quantile(self.reference_distances, percentile / 100.0, method="higher"))

    def is_ood(self, distances: np.ndarray, percentile: float = 99.0) -> np.ndarray:
        """Distance above the reference ``percentile`` and above the absolute ``floor``."""
        d = np.asarray(distances, dtype=np.float64)
        return (d > self.threshold(percentile)) & (d > self.floor)

    def save(self, path: str | os.PathLike) -> None:
        """Write a ``.npz`` atomically (temporary file in the same folder, then replace)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, reference_distances=self.reference_distances,
                         k=np.int64(self.k), floor=np.float64(self.floor),
                         format=np.int64(FORMAT))
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> NoveltyModel:
        with np.load(path, allow_pickle=False) as data:
            version = int(data["format"]) if "format" in data.files else FORMAT
            if version != FORMAT:
                raise ValueError(f"unsupported novelty model format {version}")
            return cls(reference_distances=data["reference_distances"], k=int(data["k"]),
                       floor=float(data["floor"]) if "floor" in data.files else DEFAULT_FLOOR)


def fit_novelty(vectors: np.ndarray, k: int = 5) -> tuple[NoveltyModel, np.ndarray]:
    """Fit on the project's embeddings; return the model and each input's own LOO distance.

    ``model.k`` is ``k`` clipped to ``N - 1`` (at least 1), so later scoring against the
    project's vectors uses the same neighbourhood size as the calibration.
    """
    array = np.asarray(vectors)
    if array.ndim != 2 or len(array) == 0:
        raise ValueError(f"vectors must be a non-empty (N, D) array, got shape {array.shape}")
    k_eff = max(1, min(int(k), len(array) - 1))
    distances = knn_distances(array, k_eff)
    return NoveltyModel(reference_distances=distances, k=k_eff), distances
