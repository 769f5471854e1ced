from __future__ import annotations

import numpy as np
import pytest

from ml_backend.active.refit import LinearHead, fit_head


def data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(0, 1, (n, 8)) + np.eye(8)[y] * 2.5
    return x.astype(np.float32), np.array([101, 205, 307])[y]


def test_head_learns_and_keeps_class_ids(tmp_path):
    x, labels = data()
    head, info = fit_head(x[:200], labels[:200])
    proba = head.predict_proba(x[200:])
    assert proba.shape == (100, 3) and np.allclose(proba.sum(1), 1, atol=1e-5)
    accuracy = (head.class_ids[proba.argmax(1)] == labels[200:]).mean()
    assert accuracy > 0.85
    assert list(head.class_ids) == [101, 205, 307] and info["calibrated_on"] == 200
    head.save(tmp_path / "head.npz")
    again = LinearHead.load(tmp_path / "head.npz")
    np.testing.assert_allclose(again.predict_proba(x[200:]), proba, atol=1e-6)


def test_binary_head_and_temperature_scaling_improves_calibration():
    from ml_backend.metrics.reports import negative_log_likelihood

    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 600)
    x = (rng.normal(0, 1, (600, 50)) + y[:, None] * 0.4).astype(np.float32)   # noisy, overfits
    head, info = fit_head(x[:300], y[:300], c=100.0)
    assert head.coef.shape == (2, 50)
    raw = head.predict_proba(x[300:], calibrated=False)
    calibrated = head.predict_proba(x[300:])
    assert info["temperature"] > 1.0   # the overfit head was overconfident
    nll = lambda p: negative_log_likelihood(np.log(np.clip(p, 1e-12, 1)), y[300:], 1.0)
    assert nll(calibrated) < nll(raw)


def test_a_few_labels_all_right_out_of_fold_never_sharpen_the_head():
    from ml_backend.active import refit
    from ml_backend.metrics.reports import fit_temperature

    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], 6)
    x = rng.normal(0, 1, (12, 40)) + y[:, None] * 3.0     # 12 labels, all separable
    head, info = fit_head(x, y, seed=0)
    # 12 right answers rule out the softest temperatures, not a little softening
    assert info["calibrated_on"] == 12 and 1.0 <= info["temperature"] < 2.0
    assert refit.TEMPERATURE_BOUNDS[0] == 1.0
    # unbounded, the same out-of-fold logits would have sharpened it
    out_of_fold = np.zeros((12, 2))
    from sklearn.model_selection import StratifiedKFold
    for fit_rows, cal_rows in StratifiedKFold(4, shuffle=True, random_state=0).split(x, y):
        part, _ = fit_head(x[fit_rows], y[fit_rows], folds=0)
        out_of_fold[cal_rows] = part.raw_logits(x[cal_rows])
    assert fit_temperature(out_of_fold, y) < 0.5


def test_few_labels_skip_calibration_and_one_class_is_refused():
    x, labels = data(n=6)
    head, info = fit_head(x, labels)
    assert info["calibrated_on"] == 0 and head.temperature >= 1.0
    assert info["bias"] is None and info["out_of_fold_nll"] is None
    with pytest.raises(ValueError, match="at least 2 classes"):
        fit_head(x[:3], np.array([1, 1, 1]))
    # folds=0 turns every held-out step off
    head, info = fit_head(x, labels, folds=0)
    assert head.temperature == 1.0 and info["softened_on"] == 0


def test_a_handful_of_labels_that_mislead_are_softened_not_called_calibrated():
    """Six labels, two of a class that sits in two places: held out one at a time, each
    label is predicted confidently wrong, so the head is softened (T > 1), but it still
    counts as not calibrated."""
    rng = np.random.default_rng(1)
    centre = rng.normal(0, 1, (3, 30)) * 4
    # class 0 at centres 0 and 1, class 1 at centre 2 and near centre 1, class 2 at 2
    x = np.stack([centre[0], centre[1], centre[2], centre[1] + 0.3, centre[2] + 0.3,
                  centre[0] + 0.3]) + rng.normal(0, 0.2, (6, 30))
    y = np.array([0, 0, 1, 1, 2, 2])
    head, info = fit_head(x, y)
    assert info["calibrated_on"] == 0 and info["softened_on"] == 6
    assert head.temperature > 1.5
    unsoftened = head.predict_proba(x, calibrated=False).max(axis=1)
    assert (head.predict_proba(x).max(axis=1) < unsoftened).all()


def test_a_class_with_one_label_stays_in_every_fit_while_the_others_soften_the_head():
    x, labels = data(n=300, seed=3)
    keep = np.concatenate([np.flatnonzero(labels != 307), np.flatnonzero(labels == 307)[:1]])
    x, labels = x[keep], labels[keep]
    head, info = fit_head(x, labels)
    assert list(head.class_ids) == [101, 205, 307]
    assert info["calibrated_on"] == 0 and info["softened_on"] == len(labels) - 1
    assert info["temperature"] >= 1.0 and info["bias"] is None
    # a singleton class's scan is still predicted as that class by the final head
    assert head.class_ids[head.predict_proba(x[-1:]).argmax()] == 307


def test_no_class_with_two_labels_leaves_the_head_as_it_is():
    x, labels = data(n=300, seed=4)
    rows = [int(np.flatnonzero(labels == c)[0]) for c in (101, 205, 307)]
    head, info = fit_head(x[rows], labels[rows])
    # nothing to hold out: the centre of the prior over TEMPERATURE_BOUNDS, sqrt(1 * 20)
    assert head.temperature == pytest.approx(20 ** 0.5, rel=1e-6)
    assert info["softened_on"] == 0 and info["calibrated_on"] == 0


def test_the_posterior_temperature_is_the_fitted_one_on_many_labels_and_softer_on_few():
    from ml_backend.metrics.reports import fit_temperature, posterior_temperature

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 2000)
    z = rng.normal(0, 1, (2000, 3)) + np.eye(3)[y] * 2.0
    z_sharp = z * 4                                   # overconfident: T about 4 fits
    fitted = fit_temperature(z_sharp, y, bounds=(1.0, 20.0))
    assert posterior_temperature(z_sharp, y, bounds=(1.0, 20.0)) == pytest.approx(fitted,
                                                                                  rel=0.03)
    # three right answers: a point estimate says 1, the posterior still softens
    right = np.flatnonzero(z_sharp.argmax(1) == y)[:3]
    assert fit_temperature(z_sharp[right], y[right], bounds=(1.0, 20.0)) < 1.01
    few = posterior_temperature(z_sharp[right], y[right], bounds=(1.0, 20.0))
    many = posterior_temperature(z_sharp[np.flatnonzero(z_sharp.argmax(1) == y)[:300]],
                                 y[z_sharp.argmax(1) == y][:300], bounds=(1.0, 20.0))
    assert many < few < 20 ** 0.5
    assert posterior_temperature(np.zeros((0, 3)), [], bounds=(1.0, 20.0)) == \
        pytest.approx(20 ** 0.5)


def test_prototypes_let_a_class_with_few_labels_be_predicted(tmp_path):
    """A class with 8 labels beside two with 400: the linear head hugs its 8 examples, the
    nearest-class-mean component generalises to the rest of its cluster; a head with
    prototypes round-trips through its .npz and an old head without them still loads."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 64)) * 0.5
    def sample(c, n):
        return centres[c] + rng.normal(size=(n, 64))
    x = np.concatenate([sample(0, 400), sample(1, 400), sample(2, 8)])
    y = np.array([0] * 400 + [1] * 400 + [2] * 8)
    test_x, test_y = np.concatenate([sample(2, 200), sample(0, 200)]), np.array([2] * 200 + [0] * 200)
    recall = {}
    for n0 in (0.0, 50.0):
        head, info = fit_head(x, y, prototype_n0=n0)
        pred = head.class_ids[head.predict_proba(test_x).argmax(1)]
        recall[n0] = float((pred[test_y == 2] == 2).mean())
        assert float((pred[test_y == 0] == 0).mean()) > 0.9       # the big class keeps its scans
        assert info["prototype_n0"] == n0
    assert recall[50.0] > recall[0.0] + 0.05, recall
    head.save(tmp_path / "head.npz")
    again = LinearHead.load(tmp_path / "head.npz")
    assert np.allclose(again.predict_proba(test_x), head.predict_proba(test_x))
    plain, _ = fit_head(x, y)
    plain.save(tmp_path / "plain.npz")
    assert LinearHead.load(tmp_path / "plain.npz").prototypes is None


def rare_class_data(seed: int, dim: int, spread: float, big: int):
    """Two classes of ``big`` labels and one of 12, Gaussian around random centres: the
    sampler (class, count) and the labeled ``x, y``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dim)) * spread

    def sample(c, n):
        return centres[c] + rng.normal(size=(n, dim))

    x = np.concatenate([sample(0, big), sample(1, big), sample(2, 12)])
    return sample, x, np.array([0] * big + [1] * big + [2] * 12)


def found_and_kept(head, test_x, test_y) -> tuple[float, float]:
    """Recall of class 2, and the share of the other classes' scans kept in their class."""
    pred = head.class_ids[head.predict_proba(test_x).argmax(1)]
    return (float((pred[test_y == 2] == 2).mean()),
            float((pred[test_y != 2] == test_y[test_y != 2]).mean()))


def test_balance_lets_a_rare_class_be_predicted_and_leaves_balanced_data_alone(tmp_path):
    """A class with 12 labels beside two with 400, in 64 dimensions: the linear head hugs
    its 12 examples (separable), so it rarely predicts the class on new scans. The
    class-balanced offsets fit on out-of-fold logits raise its recall; the big classes keep
    their scans; the offsets round-trip through the head's .npz; on balanced data the
    offsets stay near zero."""
    sample, x, y = rare_class_data(1, 64, 0.35, 400)
    test_x = np.concatenate([sample(2, 300), sample(0, 300), sample(1, 300)])
    test_y = np.array([2] * 300 + [0] * 300 + [1] * 300)
    recall, kept = {}, {}
    for balance in (0.0, 1.0):
        head, info = fit_head(x, y, balance=balance)
        recall[balance], kept[balance] = found_and_kept(head, test_x, test_y)
        assert info["balance"] == balance
    assert info["bias"][2] > info["bias"][0] + 0.5 and info["bias"][0] == 0.0, info["bias"]
    assert recall[1.0] > recall[0.0] + 0.15, recall
    assert kept[1.0] > 0.8, kept
    head.save(tmp_path / "head.npz")
    again = LinearHead.load(tmp_path / "head.npz")
    np.testing.assert_allclose(again.bias, head.bias)
    np.testing.assert_allclose(again.predict_proba(test_x), head.predict_proba(test_x), atol=1e-6)
    # balanced classes: nothing to correct
    xb, labels = data(n=600)
    _, info = fit_head(xb, labels, balance=1.0)
    assert max(abs(b) for b in info["bias"]) < 0.5, info["bias"]
    # too few labels for out-of-fold logits: no offsets, as no temperature
    head, info = fit_head(*data(n=6), balance=1.0)
    assert head.bias is None and info["bias"] is None
    with pytest.raises(ValueError, match="balance"):
        fit_head(xb, labels, balance=1.5)


def test_offsets_for_the_project_shares_follow_the_pool_not_the_labels(tmp_path):
    """A class with 12 labels whose unlabeled scans are a third of the project: EM over the
    pool finds its share near a third, and the head fit for the project's shares predicts it
    far more often than one fit for the labels' shares (2 %, no pool). Where the pool is
    mostly the big classes, its share stays small and the big classes keep more of their
    scans than under equal shares. A pool of the wrong width is refused."""
    from ml_backend.active.refit import project_shares

    sample, x, y = rare_class_data(2, 32, 0.45, 300)
    test_x = np.concatenate([sample(0, 300), sample(1, 300), sample(2, 300)])
    test_y = np.repeat([0, 1, 2], 300)

    def scores(head):
        return found_and_kept(head, test_x, test_y)

    equal, _ = fit_head(x, y, balance=1.0)
    common, info = fit_head(x, y, balance=1.0, pool_x=sample(2, 300))
    assert 0.22 < info["shares"][2] < 0.42, info["shares"]      # 312 of 912: 0.34
    labels_only, info = fit_head(x, y, balance=1.0, pool_x=np.zeros((0, 32)))
    np.testing.assert_allclose(info["shares"], np.bincount(y) / len(y), atol=1e-9)
    assert scores(common)[0] > scores(labels_only)[0] + 0.2, (scores(common),
                                                              scores(labels_only))
    rare, info = fit_head(x, y, balance=1.0,
                          pool_x=np.concatenate([sample(0, 300), sample(1, 300)]))
    assert info["shares"][2] < 0.05, info["shares"]
    assert scores(rare)[1] > scores(equal)[1] and scores(rare)[0] < scores(common)[0]
    assert fit_head(x, y, balance=1.0)[1]["shares"] is None
    common.save(tmp_path / "head.npz")
    np.testing.assert_allclose(LinearHead.load(tmp_path / "head.npz").predict_proba(test_x),
                               common.predict_proba(test_x), atol=1e-6)
    shares, info = project_shares(equal, np.array([0, 1, 1]), np.zeros((0, 32)))
    np.testing.assert_allclose(shares, [1 / 3, 2 / 3, 0.0], atol=2e-3)   # floored, renormalised
    assert info == {"shares": list(shares), "iterations": 0, "pool": 0}
    with pytest.raises(ValueError, match="pool_x must be"):
        fit_head(x, y, balance=1.0, pool_x=np.zeros((5, 31)))


def test_balanced_bias_matches_the_known_shift():
    """Logits of a calibrated model under a 9:1 prior, held out: the class-balanced offsets
    undo the prior (about log 9 for the rare class, relative to the common one)."""
    from ml_backend.metrics.reports import fit_balanced_bias

    rng = np.random.default_rng(0)
    y = np.array([0] * 9000 + [1] * 1000)
    score = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)      # N(±1, 1): LLR = 2 s
    logits = np.stack([np.zeros_like(score), 2 * score + np.log(1 / 9)], axis=1)
    bias = fit_balanced_bias(logits, y)
    assert bias[0] == 0.0 and abs(bias[1] - np.log(9)) < 0.25, bias
    # for the population's own shares there is nothing to undo; for 1:1 the full log 9
    assert abs(fit_balanced_bias(logits, y, shares=np.array([0.9, 0.1]))[1]) < 0.25
    np.testing.assert_allclose(fit_balanced_bias(logits, y, shares=np.array([1.0, 1.0])), bias)
    with pytest.raises(ValueError, match="shares"):
        fit_balanced_bias(logits, y, shares=np.array([1.0, -1.0]))
    with pytest.raises(ValueError):
        fit_balanced_bias(logits[:, :1].ravel(), y)
    assert not fit_balanced_bias(logits, np.zeros(len(y), dtype=int)).any()


def test_thumbnails_average_blocks_and_fall_back_to_a_box_filter():
    from ml_backend.active.features import thumbnails

    images = np.zeros((2, 64, 64), np.uint8)
    images[0, :32, :32] = 255                         # the top-left quarter white
    images[1] = np.arange(64, dtype=np.uint8)[None, :] * 4
    small = thumbnails(images, 16)
    assert small.shape == (2, 256) and small.dtype == np.float32
    grid = small[0].reshape(16, 16)
    assert grid[:8, :8].min() == 1.0 and grid[8:].max() == 0.0 and grid[:, 8:].max() == 0.0
    # a block's mean, unrounded: columns 0..3 of the ramp are 0, 4, 8, 12 → 6 / 255
    assert small[1].reshape(16, 16)[0, 0] == pytest.approx(6 / 255, abs=1e-7)
    colour = np.zeros((1, 60, 60, 3), np.uint8)       # 60 is not a multiple of 16
    colour[..., 2] = 255
    rgb = thumbnails(colour, 16).reshape(16, 16, 3)
    assert rgb[..., 2].min() == 1.0 and rgb[..., :2].max() == 0.0
    assert thumbnails(np.zeros((0, 64, 64), np.uint8)).shape == (0, 256)
    with pytest.raises(ValueError, match="uint8"):
        thumbnails(np.zeros((1, 64, 64), np.float32))


def test_block_weights_and_a_head_on_the_embedding_and_the_pixels(tmp_path):
    """A pixel block weighted up is regularised less; the weights live in the head's
    ``scale``, so a saved head predicts the same; a block that alone carries the class
    lets the hybrid head beat the embedding-only one."""
    from ml_backend.active.features import block_weights, head_inputs

    weights = block_weights(512, 128, 1.0)
    assert weights.shape == (640,) and weights[:512].tolist() == [1.0] * 512
    assert weights[512] == pytest.approx(2.0)                       # sqrt(512 / 128)
    assert block_weights(512, 0).shape == (512,)
    with pytest.raises(ValueError):
        block_weights(512, 128, 0.0)
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    embedding = rng.normal(0, 1, (400, 32)) + y[:, None] * 0.15     # a weak signal
    pixels = np.clip(rng.normal(0.5, 0.1, (400, 16)) + y[:, None] * 0.08, 0, 1)   # a strong one
    x = head_inputs(embedding, pixels.astype(np.float32))
    assert x.shape == (400, 48)
    w = block_weights(32, 16, 1.0)
    hybrid, _ = fit_head(x[:200], y[:200], feature_weights=w)
    alone, _ = fit_head(embedding[:200], y[:200])
    accuracy = lambda head, v: (head.class_ids[head.predict_proba(v).argmax(1)] == y[200:]).mean()
    assert accuracy(hybrid, x[200:]) > accuracy(alone, embedding[200:]) + 0.1
    plain, _ = fit_head(x[:200], y[:200])
    assert not np.allclose(plain.scale, hybrid.scale)
    np.testing.assert_allclose(hybrid.scale[32:] * w[32:], plain.scale[32:])
    hybrid.save(tmp_path / "hybrid.npz")
    np.testing.assert_allclose(LinearHead.load(tmp_path / "hybrid.npz").predict_proba(x[200:]),
                               hybrid.predict_proba(x[200:]), atol=1e-6)
    with pytest.raises(ValueError, match="positive"):
        fit_head(x[:200], y[:200], feature_weights=np.ones(47))


def test_the_refit_keeps_the_pixel_block_only_where_it_helps_out_of_fold(tmp_path):
    from ml_backend.active.features import block_weights, head_inputs
    from ml_backend.active.refit import fit_head_choosing_block

    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 300)
    w = block_weights(32, 16, 1.0)
    weak = rng.normal(0, 1, (300, 32)) + y[:, None] * 0.15
    strong_pixels = np.clip(rng.normal(0.5, 0.1, (300, 16)) + y[:, None] * 0.08, 0, 1)
    x = head_inputs(weak, strong_pixels)
    head, info = fit_head_choosing_block(x[:200], y[:200], embedding_dim=32, feature_weights=w,
                                         balance=0.5)
    assert info["pixels"] and info["out_of_fold_nll_pixels"] < info["out_of_fold_nll_alone"]
    assert np.abs(head.coef[:, 32:]).sum() > 0

    rng = np.random.default_rng(0)         # an embedding that carries the class, noise pixels
    y = rng.integers(0, 2, 300)
    strong = rng.normal(0, 1, (300, 32)) + y[:, None] * 0.5
    noise = rng.uniform(0, 1, (300, 64))
    x = head_inputs(strong, noise)
    w = block_weights(32, 64, 1.0)
    head, info = fit_head_choosing_block(x[:200], y[:200], embedding_dim=32, feature_weights=w,
                                         balance=0.5)
    assert not info["pixels"]
    assert head.coef.shape == (2, 96) and not head.coef[:, 32:].any()   # reads x, ignores it
    alone, _ = fit_head(strong[:200], y[:200], balance=0.5)
    np.testing.assert_allclose(head.predict_proba(x[200:]), alone.predict_proba(strong[200:]),
                               atol=1e-6)
    head.save(tmp_path / "padded.npz")
    np.testing.assert_allclose(LinearHead.load(tmp_path / "padded.npz").predict_proba(x[200:]),
                               alone.predict_proba(strong[200:]), atol=1e-6)
    # too few labels to judge out of fold: the embedding alone
    few = np.array([0, 1, 0, 1, 0, 1])
    head, info = fit_head_choosing_block(x[:6], few, embedding_dim=32, feature_weights=w)
    assert not info["pixels"] and info["out_of_fold_nll_pixels"] is None


def test_always_keeps_the_pixel_block_without_a_choice():
    from ml_backend.active.features import block_weights, head_inputs
    from ml_backend.active.refit import fit_head_choosing_block

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    x = head_inputs(rng.normal(0, 1, (120, 8)) + y[:, None], rng.uniform(0, 1, (120, 4)))
    head, info = fit_head_choosing_block(x, y, embedding_dim=8, always=True,
                                         feature_weights=block_weights(8, 4))
    assert info["pixels"] and info["out_of_fold_nll_alone"] is None
    assert np.abs(head.coef[:, 8:]).sum() > 0


def _blas_threads() -> set[int]:
    from threadpoolctl import threadpool_info

    return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


@pytest.mark.parametrize("fit", ["head", "choosing_block", "findings"])
def test_the_refit_fits_on_one_blas_thread_and_gives_the_rest_back(monkeypatch, fit):
    """The heads' logistic regressions are small; OpenBLAS's threads made a 200-label head
    8x slower on 2 cores (ml_backend/active/threads.py). Each fit runs on one thread, and
    the process's BLAS threads are what they were afterwards."""
    from threadpoolctl import threadpool_limits

    from ml_backend.active import findings, refit
    from ml_backend.active.features import block_weights, head_inputs

    seen = []
    real = refit.LogisticRegression.fit

    def spy(self, *args, **kwargs):
        seen.append(_blas_threads())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(refit.LogisticRegression, "fit", spy)
    x, labels = data(120)
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        if fit == "head":
            refit.fit_head(x, labels, balance=0.5)
        elif fit == "choosing_block":
            rng = np.random.default_rng(1)
            refit.fit_head_choosing_block(head_inputs(x, rng.uniform(0, 1, (120, 4))), labels,
                                          embedding_dim=8, feature_weights=block_weights(8, 4))
        else:
            targets = (np.array([101, 205, 307])[:, None] == labels[None, :]).T[:, :2]
            findings.fit_findings_head(x, targets.astype(np.float32), np.array([1, 2]))
        after = _blas_threads()
    assert len(seen) >= 5 and all(threads == {1} for threads in seen)
    assert after == before == {2}


def test_cluster_inputs_stand_both_blocks_side_by_side_and_find_what_only_pixels_show():
    from ml_backend.active.features import block_weights, cluster_inputs
    from ml_backend.index.faiss_index import kmeans

    rng = np.random.default_rng(0)
    n = 400
    site = rng.integers(0, 2, n)              # what the embedding sees: two sites, far apart
    finding = rng.integers(0, 2, n)           # what only the pixels show: a brighter scan
    vectors = rng.normal(0, 0.3, (n, 32))
    vectors[:, :30] += 1.5 * site[:, None]
    vectors[:, 30] += 4.0                     # a large offset standardising removes
    thumbs = rng.normal(0.4, 0.02, (n, 16)) + 0.2 * finding[:, None]
    thumbs[:, 3] = 0.5                        # a constant pixel: stays finite
    # no thumbnails (or weight 0): the embedding as it is, as float32
    alone = cluster_inputs(vectors, None)
    assert alone.dtype == np.float32 and np.allclose(alone, vectors, atol=1e-6)
    assert np.allclose(cluster_inputs(vectors, thumbs, 0.0), vectors, atol=1e-6)
    both = cluster_inputs(vectors, thumbs)
    assert both.shape == (n, 48) and both.dtype == np.float32 and np.isfinite(both).all()
    assert np.allclose(both.mean(axis=0), 0, atol=1e-5)
    # at weight 1 the blocks carry the same total variance (the constant pixel carries none)
    assert np.isclose(both[:, :32].var(axis=0).sum(), 32, rtol=1e-4)
    pixel_share = block_weights(32, 16, 1.0)[-1] ** 2
    assert np.isclose(both[:, 32:].var(axis=0).sum(), 15 * pixel_share, rtol=1e-4)
    with pytest.raises(ValueError):
        cluster_inputs(vectors, thumbs, -1.0)
    with pytest.raises(ValueError):
        cluster_inputs(vectors, thumbs[:10])

    def purity(x, truth):
        _, assignment, _ = kmeans(np.ascontiguousarray(x, np.float32), 4, seed=0, nredo=3)
        table = np.zeros((4, 4))
        np.add.at(table, (assignment, truth), 1)
        return table.max(axis=1).sum() / n

    truth = 2 * site + finding                # four kinds of scan
    assert purity(both, truth) > 0.95
    assert purity(vectors, truth) < 0.75      # the embedding alone mixes the finding
