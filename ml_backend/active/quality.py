"""Likely label errors among existing labels: confident learning (Northcutt et al., 2021) via cleanlab.

Out-of-fold probabilities come from heads that never saw the example. cleanlab's confident joint
then flags an example labeled ``y`` when another class ``j`` is at least as probable as the mean
out-of-fold probability of ``j`` over examples labeled ``j`` (and the model does not still
favour ``y``). Pure.
"""

from __future__ import annotations

import numpy as np
from cleanlab.filter import find_label_issues as _cleanlab_label_issues
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
    """Likely mislabeled examples, worst (lowest self-confidence) first; ``suggested`` is the
    most probable other class."""
    y = np.asarray(y)
    # "confident_learning": off-diagonals of the confident joint (per-class mean thresholds);
    # n_jobs=1: no process pool forked from a web or worker thread.
    ranked = _cleanlab_label_issues(y, proba, filter_by="confident_learning",
                                    return_indices_ranked_by="self_confidence", n_jobs=1)
    issues = []
    for i in ranked:
        given = int(y[i])
        others = proba[i].copy()
        others[given] = -np.inf
        suggested = int(np.argmax(others))
        issues.append({"index": int(i), "given": given, "suggested": suggested,
                       "self_confidence": float(proba[i, given]),
                       "suggested_confidence": float(proba[i, suggested])})
    return issues
