"""FAISS nearest-neighbour index over scan embeddings, keyed by Scan primary keys.

Pure NumPy + FAISS: no Django, no settings. Every FAISS id is a Scan id (``int64``, >= 0;
``-1`` is FAISS's "no result" padding, so negative ids are rejected).

Similarity is the inner product; with ``normalize=True`` (the default) stored vectors and
queries are L2-normalised first, so scores are cosine similarities in ``[-1, 1]``.

Index kinds (``VectorIndex.kind``):

- ``"flat"``: exact search, ``IndexFlatIP`` inside ``IndexIDMap2``;
- ``"ivf"``: approximate, ``IndexIVFFlat`` (``METRIC_INNER_PRODUCT``) trained on the vectors
  given to :func:`build_index`; it stores the Scan ids itself (``add_with_ids``);
- ``"hnsw"``: approximate graph search, ``IndexHNSWFlat`` inside ``IndexIDMap2``; it cannot
  remove vectors, so ids cannot be replaced once added;
- ``"auto"`` (only as an argument): ``"flat"`` if ``N <= exact_limit`` else ``"ivf"``.

Filtered search (``allowed_ids`` / ``exclude_ids``) uses FAISS ID selectors, applied during
the search. With ``"ivf"`` and ``"hnsw"`` a very selective filter (few allowed ids) can
return fewer than ``k`` results or miss true neighbours: only the probed lists / visited graph
nodes are checked. Use ``"flat"`` when exact filtered results matter.

Example::

    index = build_index(embeddings, scan_ids)          # (N, D) float32, (N,) int64
    index.add(new_embeddings, new_scan_ids)            # replaces ids already present
    hits = index.search(query, 10, exclude_ids=[scan_id])   # [[(scan_id, score), ...]]
    index.save(path)                                   # path + path.json sidecar
    index = VectorIndex.load(path)
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

KINDS = ("flat", "ivf", "hnsw")
SIDECAR_SUFFIX = ".json"
SIDECAR_FORMAT = 1
DEFAULT_NPROBE = 16
DEFAULT_EF_SEARCH = 64

__all__ = ["KINDS", "VectorIndex", "build_index", "kmeans", "sidecar_path"]


# --------------------------------------------------------------------------- validation


def _check_int(value: object, *, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_vectors(vectors: object, *, name: str = "vectors", dim: int | None = None) -> np.ndarray:
    """A C-contiguous float32 ``(N, D)`` view/copy of ``vectors``; ``ValueError`` otherwise."""
    if not isinstance(vectors, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(vectors).__name__}")
    if vectors.dtype != np.float32:
        raise ValueError(f"{name} must have dtype float32, got {vectors.dtype} "
                         f"(convert with .astype(np.float32))")
    if vectors.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {vectors.shape}")
    if vectors.shape[1] < 1:
        raise ValueError(f"{name} must have at least one dimension, got shape {vectors.shape}")
    if dim is not None and vectors.shape[1] != dim:
        raise ValueError(f"{name} have dimension {vectors.shape[1]}, the index has {dim}")
    if not np.isfinite(vectors).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return np.ascontiguousarray(vectors)


def _check_ids(ids: object, *, name: str = "ids", count: int | None = None,
               unique: bool = True) -> np.ndarray:
    """A 1-D int64 copy of ``ids`` (integers >= 0); ``ValueError`` otherwise."""
    array = np.asarray(ids)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        return np.empty(0, dtype=np.int64)
    if array.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers (int64 Scan ids), got dtype {array.dtype}")
    if array.dtype.kind == "u" and array.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} do not fit in int64")
    array = array.astype(np.int64, copy=True)
    if array.min() < 0:
        raise ValueError(f"{name} must be >= 0 (-1 is FAISS's padding), got {int(array.min())}")
    if count is not None and array.shape[0] != count:
        raise ValueError(f"{name} has {array.shape[0]} entries but there are {count} vectors")
    if unique:
        values, counts = np.unique(array, return_counts=True)
        if (counts > 1).any():
            dupes = values[counts > 1][:5].tolist()
            raise ValueError(f"{name} must be unique; duplicated: {dupes}")
    return array


def _normalized(vectors: np.ndarray) -> np.ndarray:
    """L2-normalised float32 copy, shape unchanged; zero rows stay zero."""
    out = np.array(vectors, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(out)
    return out


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar written next to an index file: ``<path>.json``."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temp file in ``path``'s directory, fsync, ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# --------------------------------------------------------------------------- the index


@dataclass(eq=False)
class VectorIndex:
    """A FAISS index whose ids are Scan ids, plus what is needed to use it correctly.

    ``index``: the FAISS index (``IndexIDMap2`` for ``"flat"``/``"hnsw"``, ``IndexIVFFlat``
    for ``"ivf"``); ``kind``: one of :data:`KINDS`; ``dim``: embedding dimension ``D``;
    ``normalize``: whether vectors and queries are L2-normalised before use.

    The set of stored ids is read from ``index`` on construction and kept in sync by
    :meth:`add` / :meth:`remove`; do not add to ``index`` directly.
    """

    index: faiss.Index
    kind: str
    dim: int
    normalize: bool = True
    _ids: np.ndarray = field(init=False, repr=False)
    _owner: faiss.Index = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        self.dim = _check_int(self.dim, name="dim", minimum=1)
        if self.index.d != self.dim:
            raise ValueError(f"index has dimension {self.index.d}, expected {self.dim}")
        if self.index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError("index must use METRIC_INNER_PRODUCT")
        # downcast_index returns a second, non-owning SWIG proxy: keep the owning one alive.
        self._owner = self.index
        self.index = faiss.downcast_index(self.index)
        expected = {"flat": faiss.IndexFlat, "hnsw": faiss.IndexHNSW}
        if self.kind == "ivf":
            if not isinstance(self.index, faiss.IndexIVF):
                raise ValueError(f"kind 'ivf' needs an IndexIVF, got {type(self.index).__name__}")
        else:
            if not isinstance(self.index, faiss.IndexIDMap2):
                raise ValueError(f"kind {self.kind!r} needs an IndexIDMap2, "
                                 f"got {type(self.index).__name__}")
            inner = faiss.downcast_index(self.index.index)
            if not isinstance(inner, expected[self.kind]):
                raise ValueError(f"kind {self.kind!r} needs {expected[self.kind].__name__} inside "
                                 f"the IndexIDMap2, got {type(inner).__name__}")
        self._ids = np.sort(self._stored_ids())

    def _stored_ids(self) -> np.ndarray:
        """All ids held by the FAISS index, ``(ntotal,)`` int64, unsorted."""
        if self.kind == "ivf":
            invlists = self.index.invlists
            parts = []
            for list_no in range(self.index.nlist):
                size = invlists.list_size(list_no)
                if size:
                    pointer = invlists.get_ids(list_no)
                    parts.append(faiss.rev_swig_ptr(pointer, size).copy())
                    invlists.release_ids(list_no, pointer)
            ids = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        else:
            ids = faiss.vector_to_array(self.index.id_map)
        return ids.astype(np.int64, copy=False)

    # -- contents ----------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._ids.shape[0])

    def __contains__(self, scan_id: object) -> bool:
        if isinstance(scan_id, bool) or not isinstance(scan_id, numbers.Integral):
            return False
        return self.contains(scan_id)

    def contains(self, scan_id: int) -> bool:
        """Whether ``scan_id`` is in the index."""
        scan_id = _check_int(scan_id, name="scan_id", minimum=-2**63)
        position = np.searchsorted(self._ids, scan_id)
        return bool(position < self._ids.shape[0] and self._ids[position] == scan_id)

    @property
    def ids(self) -> np.ndarray:
        """Sorted copy of the stored Scan ids, shape ``(len(self),)``, int64."""
        return self._ids.copy()

    def _prepare(self, vectors: np.ndarray) -> np.ndarray:
        return _normalized(vectors) if self.normalize else vectors

    def add(self, vectors: np.ndarray, ids: object) -> int:
        """Add ``vectors`` ``(N, D)`` float32 under Scan ``ids`` ``(N,)``; no rebuild.

        Ids already in the index are replaced (removed, then added) for ``"flat"`` and
        ``"ivf"``; ``"hnsw"`` cannot remove, so an id already present raises ``ValueError``
        (rebuild with :func:`build_index` instead). Returns how many ids were replaced.
        """
        vectors = _check_vectors(vectors, dim=self.dim)
        ids = _check_ids(ids, count=vectors.shape[0])
        if ids.size == 0:
            return 0
        present = ids[np.isin(ids, self._ids)]
        if present.size and self.kind == "hnsw":
            raise ValueError(f"an 'hnsw' index cannot replace vectors; ids already present: "
                             f"{present[:5].tolist()} (rebuild the index instead)")
        if present.size:
            self.index.remove_ids(faiss.IDSelectorBatch(present))
        self.index.add_with_ids(self._prepare(vectors), ids)
        self._ids = np.union1d(self._ids, ids)
        return int(present.size)

    def remove(self, ids: object) -> int:
        """Remove Scan ``ids`` ``(M,)`` (absent ids are ignored); returns how many were removed.

        Not supported by ``"hnsw"`` (``ValueError``).
        """
        if self.kind == "hnsw":
            raise ValueError("an 'hnsw' index cannot remove vectors; rebuild it instead")
        ids = _check_ids(ids, name="ids", unique=False)
        present = np.intersect1d(ids, self._ids)
        if present.size:
            self.index.remove_ids(faiss.IDSelectorBatch(present))
            self._ids = np.setdiff1d(self._ids, present, assume_unique=True)
        return int(present.size)

    # -- search ------------------------------------------------------------------------

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Set ``nprobe`` (``"ivf"``: lists visited) or ``ef_search`` (``"hnsw"``: beam width).

        Both trade speed for recall; they are saved with the index.
        """
        if nprobe is not None:
            if self.kind != "ivf":
                raise ValueError(f"nprobe applies to 'ivf' indexes, this one is {self.kind!r}")
            self.index.nprobe = min(_check_int(nprobe, name="nprobe", minimum=1), self.index.nlist)
        if ef_search is not None:
            if self.kind != "hnsw":
                raise ValueError(f"ef_search applies to 'hnsw' indexes, this one is {self.kind!r}")
            self._hnsw().hnsw.efSearch = _check_int(ef_search, name="ef_search", minimum=1)

    def _hnsw(self) -> faiss.IndexHNSW:
        return faiss.downcast_index(self.index.index)

    def search(self, queries: np.ndarray, k: int, *, allowed_ids: object | None = None,
               exclude_ids: object | None = None) -> list[list[tuple[int, float]]]:
        """The ``k`` most similar stored vectors for each query.

        ``queries``: ``(Q, D)`` float32 (normalised like the stored vectors);
        ``allowed_ids``: if given, only these Scan ids may be returned (e.g. labeled scans);
        ``exclude_ids``: Scan ids never returned (e.g. the query scan itself). Both take any
        1-D integer sequence; ids not in the index are ignored.

        Returns one list per query, best first, of ``(scan_id, score)`` with ``score`` the
        inner product (cosine similarity when ``normalize``). A row is shorter than ``k`` when
        fewer vectors match (FAISS's ``-1`` padding is dropped).
        """
        queries = _check_vectors(queries, name="queries", dim=self.dim)
        k = _check_int(k, name="k", minimum=1)
        allowed = None if allowed_ids is None else _check_ids(allowed_ids, name="allowed_ids",
                                                              unique=False)
        exclude = None if exclude_ids is None else _check_ids(exclude_ids, name="exclude_ids",
                                                              unique=False)
        empty: list[list[tuple[int, float]]] = [[] for _ in range(queries.shape[0])]

        selector = None
        candidates = len(self)
        if allowed is not None:
            allowed = np.intersect1d(allowed, self._ids)
            if exclude is not None:
                allowed = np.setdiff1d(allowed, exclude, assume_unique=False)
            selector = faiss.IDSelectorBatch(allowed)
            candidates = int(allowed.size)
        elif exclude is not None and exclude.size:
            selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.unique(exclude)))
        if candidates == 0 or queries.shape[0] == 0:
            return empty
        k = min(k, len(self))

        params = None
        if self.kind == "ivf":
            # SearchParametersIVF defaults to nprobe=1, not the index's nprobe: pass it on.
            if selector is not None:
                params = faiss.SearchParametersIVF(sel=selector, nprobe=self.index.nprobe)
        elif self.kind == "hnsw":
            ef_search = max(self._hnsw().hnsw.efSearch, k)
            params = faiss.SearchParametersHNSW(efSearch=ef_search)
            if selector is not None:
                params.sel = selector
        elif selector is not None:
            params = faiss.SearchParameters(sel=selector)

        scores, labels = self.index.search(self._prepare(queries), k, params=params)
        return [[(int(label), float(score)) for label, score in zip(row_labels, row_scores)
                 if label != -1]
                for row_labels, row_scores in zip(labels, scores)]

    # -- persistence -------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to ``path`` and a JSON sidecar to ``<path>.json``, each atomically.

        The sidecar holds ``kind``, ``dim``, ``normalize`` and ``count``; the index file is
        replaced first, so a crash in between leaves a sidecar whose ``count``/``dim`` no
        longer match, which :meth:`load` reports.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": SIDECAR_FORMAT, "kind": self.kind, "dim": self.dim,
                "normalize": self.normalize, "count": len(self),
                "metric": "inner_product", "faiss_version": faiss.__version__}
        _atomic_write(path, lambda tmp: faiss.write_index(self.index, tmp))

        def write_sidecar(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as handle:
                json.dump(meta, handle, indent=2, sort_keys=True)
                handle.write("\n")

        _atomic_write(sidecar_path(path), write_sidecar)

    @classmethod
    def load(cls, path: str | os.PathLike) -> VectorIndex:
        """Read an index written by :meth:`save` (needs both ``path`` and ``<path>.json``)."""
        path = Path(path)
        with open(sidecar_path(path), encoding="utf-8") as handle:
            try:
                meta = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"{sidecar_path(path)} is not valid JSON: {error}") from error
        missing = {"kind", "dim", "normalize", "count"} - set(meta)
        if missing:
            raise ValueError(f"{sidecar_path(path)} lacks {', '.join(sorted(missing))}")
        index = faiss.read_index(str(path))
        loaded = cls(index=index, kind=meta["kind"], dim=meta["dim"],
                     normalize=bool(meta["normalize"]))
        if len(loaded) != meta["count"] or index.ntotal != meta["count"]:
            raise ValueError(f"{path} holds {index.ntotal} vectors but its sidecar says "
                             f"{meta['count']} (interrupted save?)")
        return loaded


# --------------------------------------------------------------------------- builders


def build_index(vectors: np.ndarray, ids: object, *, kind: str = "auto",
                exact_limit: int = 1_000_000, nlist: int | None = None,
                nprobe: int | None = None, hnsw_m: int = 32,
                ef_search: int = DEFAULT_EF_SEARCH, normalize: bool = True) -> VectorIndex:
    """Build a :class:`VectorIndex` over ``vectors`` ``(N, D)`` float32 with Scan ``ids`` ``(N,)``.

    ``kind``: ``"flat"``, ``"ivf"``, ``"hnsw"`` or ``"auto"`` (``"flat"`` if
    ``N <= exact_limit`` else ``"ivf"``); the choice is in the result's ``kind``.
    ``"ivf"`` is trained on ``vectors`` (``N >= 1``): ``nlist`` defaults to
    ``clamp(int(4 * sqrt(N)), 1, N)`` and ``nprobe`` to ``min(nlist, 16)``.
    ``"hnsw"`` uses ``hnsw_m`` neighbours per node and ``ef_search`` as search beam width.
    ``ids`` must be unique non-negative integers (stored as int64).
    """
    vectors = _check_vectors(vectors)
    ids = _check_ids(ids, count=vectors.shape[0])
    count, dim = vectors.shape
    exact_limit = _check_int(exact_limit, name="exact_limit", minimum=0)
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize must be True or False, got {normalize!r}")
    if kind == "auto":
        kind = "flat" if count <= exact_limit else "ivf"
    if kind not in KINDS:
        raise ValueError(f"kind must be 'auto' or one of {', '.join(KINDS)}, got {kind!r}")
    if kind != "ivf" and (nlist is not None or nprobe is not None):
        raise ValueError(f"nlist/nprobe apply to 'ivf' indexes, not {kind!r}")

    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    elif kind == "hnsw":
        hnsw_m = _check_int(hnsw_m, name="hnsw_m", minimum=2)
        inner = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efSearch = _check_int(ef_search, name="ef_search", minimum=1)
        index = faiss.IndexIDMap2(inner)
    else:
        if count < 1:
            raise ValueError("an 'ivf' index must be trained: give at least one vector")
        if nlist is None:
            nlist = min(max(int(4 * math.sqrt(count)), 1), count)
        nlist = _check_int(nlist, name="nlist", minimum=1)
        if nlist > count:
            raise ValueError(f"nlist ({nlist}) cannot exceed the number of vectors ({count})")
        nprobe = DEFAULT_NPROBE if nprobe is None else _check_int(nprobe, name="nprobe", minimum=1)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        # The 4*sqrt(N) heuristic is below FAISS's 39 points per centroid for N < ~24k;
        # that only prints a warning to stderr, so lower the threshold to keep logs clean.
        index.cp.min_points_per_centroid = 1
        index.train(_normalized(vectors) if normalize else vectors)
        index.nprobe = min(nprobe, nlist)

    result = VectorIndex(index=index, kind=kind, dim=dim, normalize=normalize)
    result.add(vectors, ids)
    return result


def kmeans(vectors: np.ndarray, k: int, *, seed: int = 0, niter: int = 25,
           spherical: bool = True, nredo: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cluster ``vectors`` ``(N, D)`` float32 into ``k`` clusters with ``faiss.Kmeans``.

    With ``spherical=True`` the vectors are L2-normalised first and centroids are kept on
    the unit sphere (cosine k-means). Returns ``(centroids, assignments, distances)``:
    ``(k, D)`` float32, ``(N,)`` int64 cluster index in ``[0, k)``, ``(N,)`` float32 squared
    L2 distance from each (normalised, if spherical) vector to its centroid.
    FAISS initialises with ``k`` random points (not k-means++), so a run can settle in a
    local minimum (two centroids in one blob); ``nredo`` runs it that many times from
    different seeds and keeps the lowest-objective result. ``ValueError`` unless ``1 <= k <= N``.
    """
    vectors = _check_vectors(vectors)
    count, dim = vectors.shape
    k = _check_int(k, name="k", minimum=1)
    if k > count:
        raise ValueError(f"k ({k}) cannot exceed the number of vectors ({count})")
    seed = _check_int(seed, name="seed", minimum=0)
    niter = _check_int(niter, name="niter", minimum=1)
    nredo = _check_int(nredo, name="nredo", minimum=1)
    if not isinstance(spherical, bool):
        raise ValueError(f"spherical must be True or False, got {spherical!r}")
    points = _normalized(vectors) if spherical else vectors
    model = faiss.Kmeans(dim, k, niter=niter, seed=seed, spherical=spherical, nredo=nredo,
                         verbose=False, min_points_per_centroid=1)
    model.train(points)
    # Kmeans.index is IndexFlatIP when spherical (scores = similarities), else IndexFlatL2.
    scores, labels = model.index.search(points, 1)
    if spherical:
        distances = np.maximum(2.0 - 2.0 * scores[:, 0], 0.0)
    else:
        distances = np.maximum(scores[:, 0], 0.0)
    return (np.ascontiguousarray(model.centroids, dtype=np.float32),
            labels[:, 0].astype(np.int64), distances.astype(np.float32))
