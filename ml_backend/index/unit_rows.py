"""Unit-length copies of a stored matrix's rows, read once and kept for repeated scoring.

Pure NumPy: no Django, no settings. The label page shows, for every scan, the labeled scans
most like it: the same few thousand rows of a memory-mapped embedding file (100,000 scans
× 1,536 numbers = 600 MB) scored against a new query on every answer. Reading those rows
again each time costs O(labels) (13 ms for 1,400 labels at 100,000 scans, growing with
every label: docs/benchmarks.md, "The label page at 100,000 scans: what grew with the
labels"). ``UnitRows`` reads a row the first time it is asked for, normalises it, and keeps
it in one contiguous matrix; later calls read only the rows added since and score every kept
row with one matrix-vector product.

Example::

    rows = UnitRows(np.load("embeddings.npy", mmap_mode="r"), max_bytes=64 * 2**20)
    scores = rows.scores(np.array([3, 17, 42]), query)     # cosine of each row with query
"""

from __future__ import annotations

import threading

import numpy as np


class UnitRows:
    """Thread-safe; holds at most ``max_bytes`` of float32 rows (when a request would need
    more, ``scores`` returns None and the caller reads the rows itself)."""

    def __init__(self, vectors: np.ndarray, *, max_bytes: int):
        if vectors.ndim != 2:
            raise ValueError(f"expected a 2-D matrix, got shape {vectors.shape}")
        self.vectors = vectors
        self.max_rows = max(0, int(max_bytes) // (4 * max(vectors.shape[1], 1)))
        self._lock = threading.Lock()
        self._matrix = np.empty((0, vectors.shape[1]), np.float32)
        self._position: dict[int, int] = {}       # row of ``vectors`` -> row of ``_matrix``
        self._kept = 0

    def __len__(self) -> int:
        return self._kept

    def scores(self, rows: np.ndarray, query: np.ndarray) -> np.ndarray | None:
        """Cosine similarity of ``query`` with each of ``rows`` (rows of ``vectors``), in
        their order; None when the kept rows and the new ones would exceed the budget."""
        rows = np.asarray(rows, np.int64).ravel()
        q = np.asarray(query, np.float32).ravel()
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        with self._lock:
            new = sorted({int(r) for r in rows.tolist()} - self._position.keys())
            if self._kept + len(new) > self.max_rows:
                wanted = len(set(rows.tolist()))
                if wanted > self.max_rows:
                    return None
                # start again with only these rows: the ones no longer asked for go
                self._matrix = np.empty((0, self._matrix.shape[1]), np.float32)
                self._position, self._kept = {}, 0
                new = sorted(set(rows.tolist()))
            if new:
                self._append(new)
            positions = np.fromiter((self._position[int(r)] for r in rows.tolist()),
                                    np.int64, len(rows))
            every = self._matrix[:self._kept] @ q
        return every[positions]

    def _append(self, new: list[int]) -> None:
        block = np.asarray(self.vectors[new], np.float32)
        block = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
        needed = self._kept + len(new)
        if needed > len(self._matrix):           # grow by doubling, within the budget
            capacity = min(max(needed, 2 * len(self._matrix), 64), self.max_rows)
            grown = np.empty((capacity, self._matrix.shape[1]), np.float32)
            grown[:self._kept] = self._matrix[:self._kept]
            self._matrix = grown
        self._matrix[self._kept:needed] = block
        for offset, row in enumerate(new):
            self._position[row] = self._kept + offset
        self._kept = needed
