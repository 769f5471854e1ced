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


def test_few_labels_skip_calibration_and_one_class_is_refused():
    x, labels = data(n=6)
    head, info = fit_head(x, labels)
    assert info["calibrated_on"] == 0 and head.temperature == 1.0
    with pytest.raises(ValueError, match="at least 2 classes"):
        fit_head(x[:3], np.array([1, 1, 1]))
