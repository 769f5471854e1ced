"""Likely label errors among existing labels, confident-learning style (Northcutt et al., 2021).

Out-of-fold probabilities come from heads that never saw the example. Class ``j``'s threshold
``t_j`` is the mean out-of-fold probability of ``j`` over examples labeled ``j``. An example
labeled ``y`` is flagged when some other class ``j`` has ``p_j >= t_j`` and ``p_j > p_y``: the
model is as confident it is ``j`` as it typically is about true ``j`` examples. Pure.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedKFold

from ml_backend.active.refit import fit_head


def out_of_fold_proba(x: np.ndarray, labels: np.ndarray, *, folds: int = 5, seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``(proba (N, C), class_ids (C,))`` where row i comes from a head not trained on i."""
    class_ids, y = np.unique(labels, return_inverse=True)
    counts = np.bincount(y)
    k = min(folds, int(counts.min()))
    if k < 2:
        raise ValueError("every class needs at least 2 labels for out-of-fold probabilities")
    proba = np.zeros((len(y), len(class_ids)))
    for fit_rows, held in StratifiedKFold(k, shuffle=True, random_state=seed).split(x, y):
        head, _ = fit_head(x[fit_rows], labels[fit_rows], seed=seed, folds=0)
        columns = np.searchsorted(class_ids, head.class_ids)
        proba[np.ix_(held, columns)] = head.predict_proba(x[held])
    return proba, class_ids


def find_label_issues(proba: np.ndarray, y: np.ndarray) -> list[dict]:
    """Indices of likely mislabeled examples, worst (lowest self-confidence) first."""
    thresholds = np.array([proba[y == j, j].mean() if (y == j).any() else 1.0
                           for j in range(proba.shape[1])])
    issues = []
    for i, (row, given) in enumerate(zip(proba, y)):
        others = [j for j in range(len(row)) if j != given and row[j] >= thresholds[j]
                  and row[j] > row[given]]
        if others:
            suggested = max(others, key=lambda j: row[j])
            issues.append({"index": i, "given": int(given), "suggested": int(suggested),
                           "self_confidence": float(row[given]),
                           "suggested_confidence": float(row[suggested])})
    return sorted(issues, key=lambda issue: issue["self_confidence"])
