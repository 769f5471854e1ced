"""ml_backend.index.novelty: leave-one-out kNN distances calibrated into percentiles."""

from __future__ import annotations

import numpy as np
import pytest

from ml_backend.index.novelty import NoveltyModel, fit_novelty, knn_distances

DIM = 128


def cluster(center: np.ndarray, count: int, *, seed: int, spread: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (center + spread * rng.standard_normal((count, len(center)))).astype(np.float32)


def centers() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, DIM))
    return 1.5 * a, 1.5 * b          # within-cluster cosine ~0.7, across ~0


def brute_force(vectors: np.ndarray, k: int, reference: np.ndarray | None = None) -> np.ndarray:
    """Mean cosine distance to the k nearest, by numpy (self index excluded when no reference)."""
    q = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    base = q if reference is None else reference / np.linalg.norm(reference, axis=1, keepdims=True)
    dist = 1.0 - q.astype(np.float64) @ base.T.astype(np.float64)
    if reference is None:
        np.fill_diagonal(dist, np.inf)
        k = min(k, len(vectors) - 1)
    else:
        k = min(k, len(base))
    return np.clip(np.sort(dist, axis=1)[:, :k], 0, 2).mean(axis=1)


def test_in_distribution_uniform_and_other_cluster_ood():
    ca, cb = centers()
    train = cluster(ca, 600, seed=1)
    held_out = cluster(ca, 300, seed=2)
    other = cluster(cb, 100, seed=3)
    model, own = fit_novelty(train, k=5)
    assert model.k == 5 and own.shape == (600,)
    np.testing.assert_allclose(np.sort(own), model.reference_distances)

    pct_a = model.percentile(knn_distances(held_out, model.k, reference=train))
    assert 40 <= np.median(pct_a) <= 60
    assert pct_a.min() >= 0 and pct_a.max() <= 100
    assert np.mean(model.is_ood(knn_distances(held_out, model.k, reference=train))) < 0.05

    d_b = knn_distances(other, model.k, reference=train)
    assert np.all(model.percentile(d_b) == 100.0)
    assert np.all(model.is_ood(d_b))
    assert d_b.min() > model.threshold(99.0) > model.floor


def test_matches_brute_force_loo_and_reference():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((300, 32)).astype(np.float32)
    ref = rng.standard_normal((50, 32)).astype(np.float32)
    np.testing.assert_allclose(knn_distances(x, 7, batch=64), brute_force(x, 7), atol=1e-5)
    np.testing.assert_allclose(knn_distances(x, 3, reference=ref), brute_force(x, 3, ref),
                               atol=1e-5)
    with_self = knn_distances(x, 1, exclude_self=False)
    np.testing.assert_allclose(with_self, 0.0, atol=1e-5)   # own vector is its nearest


def test_exact_duplicates_exclude_only_self():
    rng = np.random.default_rng(5)
    base = rng.standard_normal((40, 16)).astype(np.float32)
    copies = np.repeat(base[:1], 12, axis=0)                 # 12 identical vectors
    x = np.vstack([base[1:], copies, base[1:5]])            # plus 4 duplicated pairs
    distances = knn_distances(x, 3, batch=7)
    np.testing.assert_allclose(distances, brute_force(x, 3), atol=1e-5)
    # Unique points keep a positive distance: the self index was removed, not a neighbour.
    unique = np.arange(4, 39)
    assert np.all(distances[unique] > 0.1)
    # A copy among 12 has 11 others at distance 0 (identical vectors are real neighbours).
    np.testing.assert_allclose(distances[39:51], 0.0, atol=1e-5)
    # A duplicated pair: one neighbour at 0, the others not -> mean strictly between.
    assert np.all((distances[:3] > 0) & (distances[:3] < distances[4:39].max()))
    # k=1 on pure duplicates: 0, but a lone vector's LOO distance is never its own 0.
    assert knn_distances(np.vstack([base[:1], base[:1]]), 1).tolist() == pytest.approx([0, 0], abs=1e-5)
    assert knn_distances(base[:2], 1).min() > 0.1


def test_k_larger_than_n():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    np.testing.assert_allclose(knn_distances(x, 10), brute_force(x, 3), atol=1e-5)
    np.testing.assert_allclose(knn_distances(x, 10, reference=x[:2]),
                               brute_force(x, 2, x[:2]), atol=1e-5)
    assert np.all(np.isinf(knn_distances(x[:1], 5)))             # no other vector
    model, own = fit_novelty(x, k=10)
    assert model.k == 3 and own.shape == (4,)
    single, own_single = fit_novelty(x[:1], k=5)
    assert single.k == 1 and np.isinf(own_single[0])
    assert not single.is_ood(np.array([1.5]))[0]


def test_percentile_and_threshold():
    model = NoveltyModel(reference_distances=np.array([0.4, 0.1, 0.3, 0.2]), k=5)
    np.testing.assert_array_equal(model.reference_distances, [0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(model.percentile(np.array([0.05, 0.1, 0.25, 0.4, 0.9])),
                               [0, 0, 50, 75, 100])
    assert model.threshold(100) == 0.4 and model.threshold(50) == 0.3
    tiny = NoveltyModel(reference_distances=np.array([0.001, 0.002]), k=5)
    assert not tiny.is_ood(np.array([0.01]))[0]                # below the absolute floor
    assert tiny.is_ood(np.array([0.5]))[0]


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    model, _ = fit_novelty(rng.standard_normal((50, 16)).astype(np.float32), k=4)
    path = tmp_path / "sub" / "novelty.npz"
    model.save(path)
    model.save(path)                                           # overwrite in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["novelty.npz"]
    loaded = NoveltyModel.load(path)
    np.testing.assert_array_equal(loaded.reference_distances, model.reference_distances)
    assert loaded.k == model.k == 4 and loaded.floor == model.floor
    probe = np.linspace(0, 1.5, 20)
    np.testing.assert_array_equal(loaded.percentile(probe), model.percentile(probe))


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        knn_distances(np.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError):
        knn_distances(np.ones((3, 4)), 0)
    with pytest.raises(ValueError):
        knn_distances(np.ones((3, 4)), 2, reference=np.ones((3, 5)))
    with pytest.raises(ValueError):
        fit_novelty(np.zeros((0, 4)))


def test_reference_index_matches_knn_distances_with_the_excluded_rows_taken_out():
    """The label page scores one scan per answer against an index built once; it must give
    what rebuilding the reference without the scan gives, duplicates included."""
    from ml_backend.index.novelty import ReferenceIndex

    a, b = centers()
    vectors = np.concatenate([cluster(a, 300, seed=1), cluster(b, 200, seed=2)])
    vectors[10] = vectors[11]                        # an exact duplicate pair
    ids = np.arange(1000, 1500)
    reference = ReferenceIndex(vectors, ids)
    assert len(reference) == 500
    for row in (0, 10, 11, 350, 499):
        others = vectors[ids != ids[row]]
        expected = knn_distances(vectors[[row]], 5, reference=others, exclude_self=False)
        got = reference.distances(vectors[[row]], 5, exclude_ids=[ids[row]])
        np.testing.assert_allclose(got, expected, atol=1e-6)
        np.testing.assert_allclose(got, brute_force(vectors[[row]], 5, reference=others),
                                   atol=1e-5)
    assert reference.distances(vectors[[10]], 1, exclude_ids=[1010])[0] < 1e-6  # its twin
    outsider = cluster(-a, 3, seed=3)
    np.testing.assert_allclose(reference.distances(outsider, 5),
                               knn_distances(outsider, 5, reference=vectors, exclude_self=False),
                               atol=1e-6)
    one = ReferenceIndex(vectors[:1], ids[:1])
    assert np.isinf(one.distances(vectors[:1], 5, exclude_ids=[1000])).all()
    assert one.distances(vectors[1:2], 5)[0] == pytest.approx(
        float(brute_force(vectors[1:2], 1, reference=vectors[:1])[0]), abs=1e-5)
    with pytest.raises(ValueError, match="dimension"):
        reference.distances(np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match="ids"):
        ReferenceIndex(vectors, ids[:5])
