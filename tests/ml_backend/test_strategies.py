"""Query strategies on small synthetic pools with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from ml_backend.active.strategies import STRATEGIES, QueryContext, query


def blobs(per=30, centres=4, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    directions = np.eye(dim)[:centres] * 5
    x = np.concatenate([d + rng.normal(0, 0.3, (per, dim)) for d in directions])
    return x.astype(np.float32), np.repeat(np.arange(centres), per)


def test_registry_has_every_strategy():
    assert {"least_confident", "margin", "entropy", "diversity", "coreset", "cold_start",
            "hybrid", "random"} <= set(STRATEGIES)
    with pytest.raises(ValueError, match="unknown strategy"):
        query("nope", QueryContext(proba=np.ones((2, 2)) / 2), 1)


def test_uncertainty_strategies_match_their_definitions():
    rng = np.random.default_rng(1)
    proba = rng.dirichlet([1, 1, 1], 100)
    ctx = QueryContext(proba=proba)
    top = np.sort(proba, axis=1)
    least = query("least_confident", ctx, 5).indices
    assert set(least) == set(np.argsort(proba.max(1))[:5])
    margin = query("margin", ctx, 5).indices
    assert set(margin) == set(np.argsort(top[:, -1] - top[:, -2])[:5])
    entropy = query("entropy", ctx, 5)
    h = -(proba * np.log(proba)).sum(1)
    assert set(entropy.indices) == set(np.argsort(-h)[:5])
    assert entropy.reasons[0]["why"] == "highest entropy over classes"
    assert 0 <= entropy.reasons[0]["confidence"] <= 1


def test_cold_start_covers_every_cluster():
    x, cluster = blobs()
    picks = query("cold_start", QueryContext(embeddings=x), 4)
    assert sorted(cluster[picks.indices]) == [0, 1, 2, 3]
    assert all(r["why"] == "typical of its cluster" for r in picks.reasons)


def test_cold_start_goes_first_to_the_modes_no_labeled_scan_covers():
    """Before a set has a model (its first labels were all one class): the next picks come
    from the clusters nobody labeled, not again from the labeled one; labeled scans of
    another anatomy, far from every candidate, cover nothing."""
    x, cluster = blobs(per=40, centres=4, dim=16)
    labeled = x[cluster == 0][:3]                       # three labels, all from mode 0
    elsewhere = np.full((5, 16), -40.0, np.float32)     # another label set's scans
    picks = query("cold_start", QueryContext(
        embeddings=x, labeled_embeddings=np.concatenate([labeled, elsewhere])), 3)
    assert sorted(cluster[picks.indices]) == [1, 2, 3]
    assert all(r["why"] == "typical of its cluster" for r in picks.reasons)
    assert not any(r["labeled_in_cluster"] for r in picks.reasons)
    every = query("cold_start", QueryContext(embeddings=x, labeled_embeddings=labeled), len(x))
    assert any(r["labeled_in_cluster"] for i, r in zip(every.indices, every.reasons)
               if cluster[i] == 0)
    only_elsewhere = query("cold_start", QueryContext(embeddings=x, labeled_embeddings=elsewhere), 4)
    assert sorted(cluster[only_elsewhere.indices]) == [0, 1, 2, 3]


def test_cold_start_clusters_the_thumbnails_beside_the_embeddings():
    """With ``typical_pixel_weight`` the typical picks cluster the embedding and the thumbnail
    side by side (the cluster view's input): modes only the thumbnails hold are each covered,
    a labeled scan covers its mode in that space too, and weight 0 (or no thumbnails) is the
    embedding alone."""
    thumbs, cluster = blobs(per=30, centres=4, dim=16)
    flat = np.random.default_rng(3).normal(0, 0.01, thumbs.shape).astype(np.float32)
    picks = query("cold_start", QueryContext(embeddings=flat, thumbs=thumbs,
                                             typical_pixel_weight=1.0), 4)
    assert sorted(cluster[picks.indices]) == [0, 1, 2, 3]
    labeled = np.flatnonzero(cluster == 2)[:2]
    covered = query("cold_start", QueryContext(
        embeddings=flat, labeled_embeddings=flat[labeled], thumbs=thumbs,
        labeled_thumbs=thumbs[labeled], typical_pixel_weight=1.0), 3)
    assert sorted(cluster[covered.indices]) == [0, 1, 3]
    alone = [sorted(cluster[query("cold_start", QueryContext(
        embeddings=flat, thumbs=thumbs, typical_pixel_weight=0.0, seed=seed), 4).indices])
        for seed in range(5)]
    assert any(a != [0, 1, 2, 3] for a in alone)      # the embedding alone sees no modes
    with pytest.raises(ValueError, match="same candidates"):
        QueryContext(embeddings=flat, thumbs=thumbs[:10])
    with pytest.raises(ValueError, match="labeled scans"):
        QueryContext(embeddings=flat, labeled_embeddings=flat[:2], thumbs=thumbs,
                     labeled_thumbs=thumbs[:3])


def test_hybrid_on_a_set_without_a_head_is_diverse_not_the_first_scans():
    """A set with no head gets uniform rows (services.queries): margin cannot rank them, so
    hybrid must not fall back on the candidates' order (an import made class by class puts
    one class first); it spreads a seeded random sample over clusters instead."""
    x, cluster = blobs(per=40, centres=4, dim=16)
    order = np.argsort(cluster, kind="stable")[::-1].copy()   # mode 3 first in pk order
    x, cluster = x[order], cluster[order]
    uniform = np.full((len(x), 6), 1 / 6)
    for seed in range(5):
        picks = query("hybrid", QueryContext(proba=uniform, embeddings=x, seed=seed,
                                             labeled_embeddings=x[cluster == 3][:3],
                                             typical_below=10), 4)
        assert len(set(cluster[picks.indices])) >= 3, cluster[picks.indices]
        assert {r["why"] for r in picks.reasons} == {
            "no model for its label set yet: unlike the other picks"}


def test_random_first_batch_often_misses_a_cluster_cold_start_never():
    x, cluster = blobs(per=60)
    misses = sum(len(set(cluster[query("random", QueryContext(embeddings=x, seed=s), 4).indices])) < 4
                 for s in range(20))
    assert misses > 0


def test_scans_of_one_patient_are_not_crowded():
    proba = np.tile([[0.5, 0.5]], (10, 1))
    proba[:4] = [0.51, 0.49]              # the four most uncertain belong to one patient
    proba[4:] = [0.7, 0.3]
    groups = np.array(["pat-a"] * 4 + [f"pat-{i}" for i in range(6)])
    picks = query("least_confident", QueryContext(proba=proba, groups=groups), 3)
    assert list(groups[picks.indices]).count("pat-a") == 1


def test_hybrid_ranks_by_margin_with_more_than_two_classes():
    """Four classes: scans torn between two classes (0.49 / 0.47) are what the head needs,
    not scans spread thinly over all four (0.30 / 0.25 / 0.25 / 0.20), which have the higher
    entropy. Hybrid takes the first kind from every cluster; the entropy strategy would not."""
    x, cluster = blobs(per=10)
    torn = np.array([0.49, 0.47, 0.02, 0.02])
    spread = np.array([0.30, 0.25, 0.25, 0.20])
    proba = np.tile(spread, (len(x), 1))
    torn_rows = np.array([np.flatnonzero(cluster == c)[3] for c in range(4)])
    proba[torn_rows] = torn
    picks = query("hybrid", QueryContext(proba=proba, embeddings=x, class_names=list("abcd")), 4)
    assert sorted(picks.indices.tolist()) == sorted(torn_rows.tolist())
    assert picks.reasons[0]["why"] == "uncertain, and unlike the other picks"
    assert not set(query("entropy", QueryContext(proba=proba), 4).indices) & set(torn_rows)


def test_coreset_picks_far_from_labeled():
    x, cluster = blobs()
    labeled = np.concatenate([x[cluster == c][:5] for c in range(3)])
    picks = query("coreset", QueryContext(embeddings=x, labeled_embeddings=labeled), 1)
    assert cluster[picks.indices[0]] == 3


def test_hybrid_is_uncertain_diverse_and_class_balanced():
    x, cluster = blobs(per=40)
    rng = np.random.default_rng(3)
    proba = np.full((len(x), 2), 0.5)
    proba[:, 0] = np.clip(rng.uniform(0.05, 0.95, len(x)), 0, 1)
    proba[:, 1] = 1 - proba[:, 0]
    picks = query("hybrid", QueryContext(proba=proba, embeddings=x, class_names=["a", "b"]), 4)
    assert len(set(cluster[picks.indices])) >= 3            # spread over the data
    assert set(proba[picks.indices].argmax(1)) == {0, 1}    # both predicted classes
    h = -(proba * np.log(proba)).sum(1)
    assert h[picks.indices].mean() > np.median(h)           # and uncertain
    assert query("hybrid", QueryContext(embeddings=x), 4).reasons[0]["why"] == "typical of its cluster"


def test_a_tie_names_two_different_classes():
    """A head torn 50 / 50 (early, on few labels) must say which two classes, not one twice."""
    proba = np.zeros((6, 6))
    proba[:, 2] = proba[:, 4] = 0.5
    for name in ("margin", "entropy", "least_confident"):
        for reason in query(name, QueryContext(proba=proba, class_names=list("abcdef")), 6).reasons:
            assert {reason["predicted"], reason["runner_up"]} == {"c", "e"}, reason


def test_the_products_typical_threshold_is_the_benchmarked_one():
    """settings.QUERY_TYPICAL_BELOW defaults to what bench.al_sim runs as the product."""
    from django.conf import settings

    from ml_backend.active.strategies import PRODUCT_TYPICAL_BELOW

    assert settings.QUERY_TYPICAL_BELOW == PRODUCT_TYPICAL_BELOW == 10


def test_hybrid_picks_typical_scans_below_its_threshold_per_class():
    x, cluster = blobs(per=40, centres=4, dim=16)
    proba = np.tile([[0.6, 0.4, 0.0]], (len(x), 1))       # a 2-class set's rows
    proba[::7] = [0.5, 0.5, 0.0]
    few = QueryContext(proba=proba, embeddings=x, labeled_embeddings=x[:19], typical_below=10)
    assert query("hybrid", few, 4).reasons[0]["why"].startswith("typical of its cluster")
    enough = QueryContext(proba=proba, embeddings=x, labeled_embeddings=x[:20], typical_below=10)
    assert query("hybrid", enough, 4).reasons[0]["why"] == "uncertain, and unlike the other picks"
    off = QueryContext(proba=proba, embeddings=x, labeled_embeddings=x[:19], typical_below=0)
    assert query("hybrid", off, 4).reasons[0]["why"] == "uncertain, and unlike the other picks"
