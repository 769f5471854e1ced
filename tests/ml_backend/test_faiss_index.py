"""ml_backend.index.faiss_index: search keyed by Scan ids, filters, save/load, k-means."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ml_backend.index.faiss_index import KINDS, VectorIndex, build_index, kmeans, sidecar_path


def make_data(count: int = 200, dim: int = 16, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    ids = (1000 + 7 * np.arange(count)).astype(np.int64)  # non-contiguous Scan ids
    return vectors, ids


def brute_force(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int,
                mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-k by numpy: ``(Q, k)`` ids and scores, best first."""
    base = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    query = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = query.astype(np.float64) @ base.T.astype(np.float64)
    if mask is not None:
        sims[:, ~mask] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(sims, order, axis=1)


def hit_ids(hits: list[list[tuple[int, float]]]) -> list[list[int]]:
    return [[scan_id for scan_id, _ in row] for row in hits]


def test_flat_matches_brute_force_cosine():
    vectors, ids = make_data()
    queries = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    index = build_index(vectors, ids, kind="flat")
    hits = index.search(queries, 10)
    expected_ids, expected_scores = brute_force(vectors, ids, queries, 10)
    assert hit_ids(hits) == expected_ids.tolist()
    scores = np.array([[score for _, score in row] for row in hits])
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    assert index.kind == "flat" and index.dim == 16 and index.normalize
    assert len(index) == 200


def test_returned_ids_are_scan_ids():
    vectors, ids = make_data(50)
    index = build_index(vectors, ids, kind="flat")
    hits = index.search(vectors[:3], 1)
    assert [row[0][0] for row in hits] == ids[:3].tolist()  # each vector finds itself
    assert all(isinstance(scan_id, int) for row in index.search(vectors, 5) for scan_id, _ in row)
    assert set(hit_ids(index.search(vectors, 50))[0]) == set(ids.tolist())
    assert index.contains(1007) and 1007 in index and not index.contains(1001)
    np.testing.assert_array_equal(index.ids, ids)


def test_k_larger_than_index_drops_padding():
    vectors, ids = make_data(5)
    index = build_index(vectors, ids, kind="flat")
    hits = index.search(vectors[:2], 10)
    assert [len(row) for row in hits] == [5, 5]
    assert all(scan_id != -1 for row in hits for scan_id, _ in row)


def test_incremental_add_and_replace_flat():
    vectors, ids = make_data(100)
    index = build_index(vectors[:80], ids[:80], kind="flat")
    assert not index.contains(int(ids[90]))
    assert index.add(vectors[80:], ids[80:]) == 0
    assert len(index) == 100 and index.contains(int(ids[90]))
    assert index.search(vectors[90:91], 1)[0][0][0] == ids[90]

    # Re-adding id ids[3] with another vector replaces it: the old vector is gone.
    new_vector = -vectors[50:51].copy()
    assert index.add(new_vector, ids[3:4]) == 1
    assert len(index) == 100
    assert index.search(new_vector, 1)[0][0][0] == ids[3]
    best_for_old = index.search(vectors[3:4], 1)[0][0]
    assert best_for_old[0] != ids[3] or best_for_old[1] < 0.999


def test_replace_ivf_and_remove():
    vectors, ids = make_data(300)
    index = build_index(vectors, ids, kind="ivf", nlist=8, nprobe=8)
    assert index.add(vectors[10:11], ids[20:21]) == 1  # id 20 now holds vector 10
    assert len(index) == 300
    top = hit_ids(index.search(vectors[10:11], 2))[0]
    assert set(top) == {ids[10], ids[20]}
    assert index.remove([ids[10], 999_999]) == 1
    assert len(index) == 299 and not index.contains(int(ids[10]))
    assert hit_ids(index.search(vectors[10:11], 1))[0] == [ids[20]]


def test_hnsw_cannot_replace_or_remove():
    vectors, ids = make_data(60)
    index = build_index(vectors[:50], ids[:50], kind="hnsw", hnsw_m=8)
    index.add(vectors[50:], ids[50:])
    assert len(index) == 60 and index.search(vectors[55:56], 1)[0][0][0] == ids[55]
    with pytest.raises(ValueError, match="cannot replace"):
        index.add(vectors[:1], ids[:1])
    with pytest.raises(ValueError, match="cannot remove"):
        index.remove(ids[:1])
    assert len(index) == 60


@pytest.mark.parametrize("kind", KINDS)
def test_allowed_and_exclude_filters(kind):
    vectors, ids = make_data(300)
    options = {"nlist": 4, "nprobe": 4} if kind == "ivf" else {}
    index = build_index(vectors, ids, kind=kind, **options)
    queries = vectors[:4]
    allowed = ids[::3]  # e.g. the labeled scans
    hits = index.search(queries, 5, allowed_ids=allowed)
    assert all(len(row) == 5 for row in hits)
    assert all(scan_id in set(allowed.tolist()) for row in hit_ids(hits) for scan_id in row)
    mask = np.isin(ids, allowed)
    expected, _ = brute_force(vectors, ids, queries, 5, mask=mask)
    if kind == "flat":
        assert hit_ids(hits) == expected.tolist()
    assert hit_ids(hits)[0][0] == ids[0]  # id 0 is allowed and is its own best match

    # exclude the query scan itself
    hits = index.search(queries, 5, exclude_ids=ids[:4])
    for row_number, row in enumerate(hit_ids(hits)):
        assert len(row) == 5 and ids[row_number] not in row
        assert not set(row) & set(ids[:4].tolist())
    if kind == "flat":
        expected, _ = brute_force(vectors, ids, queries, 5, mask=~np.isin(ids, ids[:4]))
        assert hit_ids(hits) == expected.tolist()

    # both: allowed minus excluded
    hits = index.search(queries, 5, allowed_ids=allowed, exclude_ids=[ids[0]])
    assert all(scan_id in set(allowed.tolist()) and scan_id != ids[0]
               for row in hit_ids(hits) for scan_id in row)

    # filters that leave nothing
    assert index.search(queries, 5, allowed_ids=[]) == [[], [], [], []]
    assert index.search(queries, 5, allowed_ids=ids[:2], exclude_ids=ids[:2]) == [[]] * 4
    assert hit_ids(index.search(queries[:1], 5, allowed_ids=[ids[7], 5]))[0] == [ids[7]]


def test_auto_kind():
    vectors, ids = make_data(100)
    assert build_index(vectors, ids).kind == "flat"
    assert build_index(vectors, ids, kind="auto", exact_limit=100).kind == "flat"
    index = build_index(vectors, ids, kind="auto", exact_limit=99)
    assert index.kind == "ivf"
    assert index.index.nlist == 40  # clamp(int(4 * sqrt(100)), 1, 100)
    assert index.index.nprobe == 16


def test_ivf_defaults_clamped():
    vectors, ids = make_data(3)
    index = build_index(vectors, ids, kind="ivf")
    assert index.index.nlist == 3 and index.index.nprobe == 3  # clamp(int(4*sqrt 3)=6, 1, 3)


def test_ivf_recall_at_10():
    vectors, ids = make_data(2000, 32, seed=3)
    queries = np.random.default_rng(4).standard_normal((50, 32)).astype(np.float32)
    index = build_index(vectors, ids, kind="ivf")
    assert index.index.nlist == 178 and index.index.nprobe == 16
    index.set_search_params(nprobe=48)
    expected, _ = brute_force(vectors, ids, queries, 10)
    found = hit_ids(index.search(queries, 10))
    recall = np.mean([len(set(row) & set(truth)) / 10
                      for row, truth in zip(found, expected.tolist())])
    assert recall >= 0.9, recall
    # a filtered search must use the same nprobe (SearchParametersIVF defaults to 1)
    filtered = hit_ids(index.search(queries, 10, exclude_ids=[123]))
    assert filtered == found


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(tmp_path, kind):
    vectors, ids = make_data(120)
    index = build_index(vectors, ids, kind=kind, normalize=kind != "hnsw")
    path = tmp_path / "sub" / "scans.faiss"
    index.save(path)
    meta = json.loads(sidecar_path(path).read_text())
    assert {key: meta[key] for key in ("kind", "dim", "normalize", "count")} == {
        "kind": kind, "dim": 16, "normalize": kind != "hnsw", "count": 120}
    assert sorted(p.name for p in path.parent.iterdir()) == ["scans.faiss", "scans.faiss.json"]

    loaded = VectorIndex.load(path)
    assert (loaded.kind, loaded.dim, loaded.normalize, len(loaded)) == (
        kind, 16, kind != "hnsw", 120)
    np.testing.assert_array_equal(loaded.ids, index.ids)
    queries = vectors[:6] + 0.1
    assert loaded.search(queries, 7) == index.search(queries, 7)
    assert (loaded.search(queries, 7, allowed_ids=ids[::2])
            == index.search(queries, 7, allowed_ids=ids[::2]))
    if kind == "ivf":
        assert loaded.index.nprobe == index.index.nprobe


def test_load_detects_mismatched_sidecar(tmp_path):
    vectors, ids = make_data(10)
    path = tmp_path / "scans.faiss"
    build_index(vectors, ids).save(path)
    meta = json.loads(sidecar_path(path).read_text())
    sidecar_path(path).write_text(json.dumps({**meta, "count": 9}))
    with pytest.raises(ValueError, match="sidecar"):
        VectorIndex.load(path)
    sidecar_path(path).write_text(json.dumps({**meta, "dim": 8}))
    with pytest.raises(ValueError, match="dimension"):
        VectorIndex.load(path)


def test_kmeans_recovers_blobs():
    rng = np.random.default_rng(5)
    centres = np.eye(3, 8, dtype=np.float32) * 10
    truth = np.repeat(np.arange(3), 40)
    vectors = (centres[truth] + rng.standard_normal((120, 8)).astype(np.float32) * 0.3)
    vectors = vectors.astype(np.float32)
    # Plain k-means with FAISS's random-point init can put two centroids in one blob
    # (it does for seed=0 here); nredo keeps the best of several runs.
    for spherical, nredo in ((True, 1), (False, 5)):
        centroids, assignments, distances = kmeans(vectors, 3, seed=0, spherical=spherical,
                                                   nredo=nredo)
        assert centroids.shape == (3, 8) and centroids.dtype == np.float32
        assert assignments.shape == (120,) and assignments.dtype == np.int64
        assert distances.shape == (120,) and (distances >= 0).all()
        purity = sum(np.bincount(assignments[truth == c], minlength=3).max()
                     for c in range(3)) / 120
        assert purity == 1.0
        assert len(set(assignments.tolist())) == 3
        if spherical:
            np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    again = kmeans(vectors, 3, seed=0)
    np.testing.assert_array_equal(again[1], kmeans(vectors, 3, seed=0)[1])


def test_kmeans_bad_arguments():
    vectors, _ = make_data(10)
    for k in (0, -1, 11):
        with pytest.raises(ValueError, match="k"):
            kmeans(vectors, k)
    with pytest.raises(ValueError, match="float32"):
        kmeans(vectors.astype(np.float64), 2)
    with pytest.raises(ValueError, match="niter"):
        kmeans(vectors, 2, niter=0)
    with pytest.raises(ValueError, match="nredo"):
        kmeans(vectors, 2, nredo=0)


def test_bad_arguments_raise_value_error():
    vectors, ids = make_data(20)
    bad_builds = [
        ((vectors, ids[:19]), {}, "entries"),                          # mismatched lengths
        ((vectors, np.r_[ids[:19], ids[0]]), {}, "unique"),            # duplicate ids
        ((vectors.astype(np.float64), ids), {}, "float32"),            # wrong dtype
        ((vectors[0], ids[:1]), {}, "2-D"),                            # wrong shape
        ((vectors, ids.astype(np.float64)), {}, "integers"),          # float ids
        ((vectors, ids.reshape(4, 5)), {}, "1-D"),
        ((vectors, np.r_[ids[:19], -1]), {}, ">= 0"),                  # negative id
        ((vectors, ids), {"kind": "lsh"}, "kind"),
        ((vectors, ids), {"kind": "ivf", "nlist": 21}, "nlist"),
        ((vectors, ids), {"kind": "flat", "nlist": 4}, "nlist"),
        ((vectors, ids), {"kind": "hnsw", "hnsw_m": 0}, "hnsw_m"),
        ((vectors[:0], ids[:0]), {"kind": "ivf"}, "at least one"),
        ((vectors.tolist(), ids), {}, "numpy"),
    ]
    for args, kwargs, message in bad_builds:
        with pytest.raises(ValueError, match=message):
            build_index(*args, **kwargs)

    index = build_index(vectors, ids)
    with pytest.raises(ValueError, match="k must be"):
        index.search(vectors[:1], 0)
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.zeros((1, 8), dtype=np.float32), 3)
    with pytest.raises(ValueError, match="2-D"):
        index.search(vectors[0], 3)
    with pytest.raises(ValueError, match="float32"):
        index.search(vectors[:1].astype(np.float64), 3)
    with pytest.raises(ValueError, match="allowed_ids"):
        index.search(vectors[:1], 3, allowed_ids=[1.5])
    with pytest.raises(ValueError, match="unique"):
        index.add(vectors[:2], [5, 5])
    with pytest.raises(ValueError, match="entries"):
        index.add(vectors[:2], [5])
    with pytest.raises(ValueError, match="NaN"):
        index.add(np.full((1, 16), np.nan, dtype=np.float32), [5])
    with pytest.raises(ValueError, match="nprobe"):
        index.set_search_params(nprobe=4)
    assert len(index) == 20  # failed calls changed nothing


def test_empty_flat_index_then_add():
    vectors, ids = make_data(5)
    index = build_index(vectors[:0], ids[:0], kind="flat")
    assert len(index) == 0 and index.search(vectors[:2], 3) == [[], []]
    index.add(vectors, ids)
    assert hit_ids(index.search(vectors[:1], 1)) == [[ids[0]]]
