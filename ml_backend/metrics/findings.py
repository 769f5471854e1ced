"""Multi-label ("findings") reports and thresholds. Pure: numpy, sklearn.

A findings target is a float matrix ``(N, F)``: 1 present, 0 absent, NaN unknown (not
read, or uncertain and left out by the project's policy). Every metric of a finding uses
only the scans whose answer for that finding is known; "no finding" is a row of zeros.

``findings_report`` gives, per finding: prevalence, positives / negatives, AUC, AP, and at
its threshold sensitivity, specificity, PPV, NPV, F1 and the binary ECE with its reliability
bins; then macro averages (over findings whose metric is defined), micro averages (all
known (scan, finding) pairs pooled) and the "any finding" AUC (max probability against
"at least one finding present", on the scans fully known). Undefined values are ``None``.

``choose_thresholds`` picks one threshold per finding on an evaluation split: the one that
maximises F1, or the highest that keeps sensitivity at a target.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from ml_backend.metrics.reports import _clean, _mean_defined

__all__ = ["UNCERTAIN", "binary_reliability", "check_findings", "choose_thresholds",
           "compare_findings",
           "findings_report", "uncertain_policy"]

UNCERTAIN = -1.0               # the value an uncertain answer carries before a policy applies
POLICIES = ("ignore", "zeros", "ones")


def check_findings(y_true, proba) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(proba, dtype=np.float64)
    if y.ndim != 2 or p.shape != y.shape:
        raise ValueError(f"targets and probabilities must both be (N, F); got {y.shape} "
                         f"and {p.shape}")
    known = ~np.isnan(y)
    if not np.isin(y[known], (0.0, 1.0)).all():
        raise ValueError("findings targets hold 1 (present), 0 (absent) or NaN (unknown); "
                         "apply an uncertain-label policy first")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("probabilities must lie in [0, 1]")
    return y, p


def uncertain_policy(targets, policy: str = "ignore") -> np.ndarray:
    """Map uncertain answers (``UNCERTAIN``, -1) by the project's policy: ``ignore`` →
    unknown (NaN, left out of the loss and the metrics), ``zeros`` → absent (U-Zeros),
    ``ones`` → present (U-Ones; Irvin et al., CheXpert 2019)."""
    if policy not in POLICIES:
        raise ValueError(f"uncertain-label policy must be one of {', '.join(POLICIES)}")
    y = np.array(targets, dtype=np.float64, copy=True)
    uncertain = y == UNCERTAIN
    y[uncertain] = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}[policy]
    return y


def _auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, score))


def _ap(positive: np.ndarray, score: np.ndarray) -> float | None:
    if not positive.any():
        return None
    return float(average_precision_score(positive, score))


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def binary_log_loss(positive: np.ndarray, score: np.ndarray) -> float | None:
    """Mean binary log-loss (nats) of one finding's probabilities, clipped to [1e-7, 1 - 1e-7]
    so a confident wrong 0 or 1 costs about 16, not infinity."""
    if not len(score):
        return None
    p = np.clip(np.asarray(score, np.float64), 1e-7, 1 - 1e-7)
    positive = np.asarray(positive, bool)
    return float(-np.where(positive, np.log(p), np.log1p(-p)).mean())


def binary_reliability(positive: np.ndarray, score: np.ndarray, n_bins: int = 10
                       ) -> tuple[float, list[dict]]:
    """ECE of one finding's probability (equal-width bins of the probability itself,
    against the observed frequency of the finding) and its bins."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, score, side="left") - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        members = index == b
        count = int(members.sum())
        confidence = float(score[members].mean()) if count else None
        frequency = float(positive[members].mean()) if count else None
        if count:
            ece += count / max(len(score), 1) * abs(frequency - confidence)
        bins.append({"lower": float(edges[b]), "upper": float(edges[b + 1]),
                     "confidence": confidence, "frequency": frequency, "count": count})
    return float(ece), bins


def _at_threshold(positive: np.ndarray, score: np.ndarray, threshold: float) -> dict:
    predicted = score >= threshold
    tp = int((predicted & positive).sum())
    fp = int((predicted & ~positive).sum())
    fn = int((~predicted & positive).sum())
    tn = int((~predicted & ~positive).sum())
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "sensitivity": recall,
            "specificity": _ratio(tn, tn + fp), "ppv": precision, "npv": _ratio(tn, tn + fn),
            "f1": f1}


def findings_report(y_true, proba, finding_names: list[str], *,
                    thresholds=None, n_bins: int = 10) -> dict:
    """The per-finding report (module docstring). ``thresholds``: one per finding (default
    0.5 each)."""
    y, p = check_findings(y_true, proba)
    if len(finding_names) != y.shape[1]:
        raise ValueError(f"{y.shape[1]} findings but {len(finding_names)} names")
    t = (np.full(y.shape[1], 0.5) if thresholds is None
         else np.asarray(thresholds, dtype=np.float64).reshape(-1))
    if len(t) != y.shape[1]:
        raise ValueError(f"{y.shape[1]} findings but {len(t)} thresholds")
    per_finding = {}
    pooled_pos, pooled_score, pooled_pred = [], [], []
    for f, name in enumerate(finding_names):
        known = ~np.isnan(y[:, f])
        positive = y[known, f] == 1
        score = p[known, f]
        ece, bins = binary_reliability(positive, score, n_bins)
        per_finding[name] = {
            "known": int(known.sum()), "positives": int(positive.sum()),
            "negatives": int((~positive).sum()),
            "prevalence": _ratio(positive.sum(), len(positive)),
            "auc": _auc(positive, score), "ap": _ap(positive, score),
            "threshold": float(t[f]), **_at_threshold(positive, score, t[f]),
            "ece": ece if len(score) else None,
            "log_loss": binary_log_loss(positive, score), "reliability": bins,
        }
        pooled_pos.append(positive)
        pooled_score.append(score)
        pooled_pred.append(score >= t[f])
    rows = list(per_finding.values())
    pos = np.concatenate(pooled_pos) if pooled_pos else np.zeros(0, bool)
    score = np.concatenate(pooled_score) if pooled_score else np.zeros(0)
    micro = {}
    if len(pos):   # micro: every known (scan, finding) pair at its finding's threshold
        predicted = np.concatenate(pooled_pred)
        tp = int((predicted & pos).sum())
        fp = int((predicted & ~pos).sum())
        fn = int((~predicted & pos).sum())
        micro = {"f1": _ratio(2 * tp, 2 * tp + fp + fn), "ppv": _ratio(tp, tp + fp),
                 "sensitivity": _ratio(tp, tp + fn)}
    complete = ~np.isnan(y).any(axis=1)
    any_positive = (y[complete] == 1).any(axis=1)
    report = {
        "num_scans": int(len(y)), "findings": list(finding_names),
        "per_finding": per_finding,
        "macro_auc": _mean_defined(r["auc"] for r in rows),
        "macro_ap": _mean_defined(r["ap"] for r in rows),
        "macro_f1": _mean_defined(r["f1"] for r in rows if r["positives"]),
        "macro_sensitivity": _mean_defined(r["sensitivity"] for r in rows),
        "macro_specificity": _mean_defined(r["specificity"] for r in rows),
        "macro_ece": _mean_defined(r["ece"] for r in rows),
        "macro_log_loss": _mean_defined(r["log_loss"] for r in rows),
        "micro_auc": _auc(pos, score) if len(pos) else None,
        "micro_ap": _ap(pos, score) if len(pos) else None,
        "micro_f1": micro.get("f1"), "micro_ppv": micro.get("ppv"),
        "micro_sensitivity": micro.get("sensitivity"),
        "any_finding_auc": _auc(any_positive, p[complete].max(axis=1)) if complete.any()
        else None,
        "findings_with_auc": int(sum(r["auc"] is not None for r in rows)),
    }
    return _clean(report)


def choose_thresholds(y_true, proba, *, method: str = "f1", target_sensitivity: float = 0.9,
                      default: float = 0.5) -> np.ndarray:
    """One threshold per finding, from an evaluation split. ``f1``: the probability that
    maximises F1 (ties: the higher threshold); ``sensitivity``: the highest threshold whose
    sensitivity is at least ``target_sensitivity``. A finding without a known positive keeps
    ``default``."""
    if method not in ("f1", "sensitivity"):
        raise ValueError("method must be f1 or sensitivity")
    if not 0 < target_sensitivity <= 1:
        raise ValueError("target_sensitivity must be in (0, 1]")
    y, p = check_findings(y_true, proba)
    out = np.full(y.shape[1], float(default))
    for f in range(y.shape[1]):
        known = ~np.isnan(y[:, f])
        positive = y[known, f] == 1
        score = p[known, f]
        if not positive.any():
            continue
        candidates = np.unique(score)[::-1]              # high → low
        predicted = score[None, :] >= candidates[:, None]
        tp = (predicted & positive).sum(axis=1)
        fp = (predicted & ~positive).sum(axis=1)
        fn = positive.sum() - tp
        if method == "f1":
            f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
            out[f] = float(candidates[int(np.argmax(f1))])   # first max = highest threshold
        else:
            sensitivity = tp / positive.sum()
            out[f] = float(candidates[int(np.argmax(sensitivity >= target_sensitivity))])
    return out


def compare_findings(y_true, proba_candidate, proba_active, finding_names: list[str], *,
                     tolerance: float = 0.05, min_positives: int = 5) -> dict:
    """The findings gate: both versions scored on the SAME evaluation scans. A finding with
    at least ``min_positives`` known positives and as many negatives regresses when the
    candidate's AUC is lower than the active version's by more than ``tolerance``; findings
    with fewer are reported, not judged (their AUC is noise). ``promote`` is False on any
    regression. ``proba_active`` may have NaN columns: findings the active version lacks
    (reported as newly learned)."""
    y, p = check_findings(y_true, proba_candidate)
    q = np.asarray(proba_active, dtype=np.float64)
    if q.shape != p.shape:
        raise ValueError("both versions must score the same scans and findings")
    rows, regressions = {}, []
    for f, name in enumerate(finding_names):
        known = ~np.isnan(y[:, f])
        positive = y[known, f] == 1
        judged = int(positive.sum()) >= min_positives and int((~positive).sum()) >= min_positives
        new = bool(np.isnan(q[known, f]).any()) or not known.any()
        candidate = _auc(positive, p[known, f])
        active = None if new else _auc(positive, q[known, f])
        delta = None if candidate is None or active is None else candidate - active
        status = ("new" if new and candidate is not None else
                  "not judged" if not judged or delta is None else
                  "regressed" if delta < -tolerance else "kept")
        if status == "regressed":
            regressions.append(name)
        rows[name] = {"positives": int(positive.sum()), "candidate_auc": candidate,
                      "active_auc": active, "delta": delta, "status": status}
    return _clean({"promote": not regressions, "regressed": regressions,
                   "tolerance": tolerance, "min_positives": min_positives, "per_finding": rows})
