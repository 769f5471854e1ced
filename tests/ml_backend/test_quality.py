from __future__ import annotations

import numpy as np

from ml_backend.active.quality import find_label_issues, out_of_fold_proba


def test_flipped_labels_are_found():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = (rng.normal(0, 1, (300, 10)) + np.eye(10)[y] * 3).astype(np.float32)
    noisy = y.copy()
    flipped = rng.choice(300, 15, replace=False)
    noisy[flipped] = (y[flipped] + 1) % 3
    labels = np.array([11, 22, 33])[noisy]
    proba, classes = out_of_fold_proba(x, labels)
    assert list(classes) == [11, 22, 33] and proba.shape == (300, 3)
    issues = find_label_issues(proba, np.searchsorted(classes, labels))
    found = {issue["index"] for issue in issues}
    assert len(found & set(flipped)) >= 12          # most flips caught
    assert len(found - set(flipped)) <= 8           # few false alarms
    assert all(issue["suggested"] != issue["given"] for issue in issues)
    confidences = [issue["self_confidence"] for issue in issues]
    assert confidences == sorted(confidences)
