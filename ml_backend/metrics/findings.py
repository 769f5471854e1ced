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
maximises F1, or the highest that keeps sensitivity at a target; a finding whose scores
cannot rank the scans (a constant head) gets ``NEVER``, above any probability.

``compare_findings`` is the findings gate: a paired bootstrap over the eval scans of the
macro AUC and of each finding with enough positives, against the project's tolerance; a
finding the active version knew nothing of is new, never a bar.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from ml_backend.metrics.reports import _clean, _mean_defined

__all__ = ["NEVER", "UNCERTAIN", "binary_reliability", "check_findings", "choose_thresholds",
           "compare_findings", "findings_report", "preselection_evidence",
           "uncertain_policy"]

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


# threshold that no probability reaches: a finding the page must never preselect
NEVER = 1.001


def _constant(column: np.ndarray) -> bool:
    """True when a score column cannot rank scans: every value the same (a head that never
    saw the finding present, or never absent, gives one probability to every scan)."""
    column = np.asarray(column, np.float64)
    return not len(column) or float(np.ptp(column)) <= 1e-12


def choose_thresholds(y_true, proba, *, method: str = "f1", target_sensitivity: float = 0.9,
                      default: float = 0.5, never: float = NEVER) -> np.ndarray:
    """One threshold per finding, from an evaluation split. ``f1``: the probability that
    maximises F1 (ties: the higher threshold); ``sensitivity``: the highest threshold whose
    sensitivity is at least ``target_sensitivity``. A finding without a known positive keeps
    ``default``. A finding whose scores are the same on every scan (a constant head: it
    never saw the finding present, or never absent) gets ``never``, above any probability:
    its only candidate threshold marks every scan present, which F1 favours whenever the
    split has a positive (2P / (2P + N) > 0), yet it tells no scan from another — a
    preselection on every scan is not a decision the eval split supports."""
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
        if _constant(p[:, f]):
            out[f] = float(never)
            continue
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


def _wilson_low(hits: int, n: int, z: float) -> float:
    """The lower end of the Wilson score interval of a proportion ``hits / n``."""
    if n <= 0:
        return 0.0
    p = hits / n
    centre = p + z * z / (2 * n)
    spread = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float(max(0.0, (centre - spread) / (1 + z * z / n)))


def preselection_evidence(y_true, proba, thresholds, *, z: float = 1.645) -> list[dict | None]:
    """Whether each finding's threshold picks scans richer in the finding than the split
    itself: the preselected scans' PPV, its one-sided 95% Wilson lower bound (``z``), and
    the finding's prevalence among the scans whose answer is known. ``enriched`` is True when
    the bound is above the prevalence: at an F1-best threshold that marks nearly every scan
    present (a weakly learned head on a small eval split), the PPV is about the prevalence,
    and a preselection would be a guess the reader must undo. None for a finding without a
    known answer."""
    y, p = check_findings(y_true, proba)
    thresholds = np.asarray(thresholds, np.float64)
    out: list[dict | None] = []
    for f in range(y.shape[1]):
        known = ~np.isnan(y[:, f])
        if not known.any():
            out.append(None)
            continue
        positive = y[known, f] == 1
        flagged = p[known, f] >= thresholds[f]
        hits, n = int((flagged & positive).sum()), int(flagged.sum())
        prevalence = float(positive.mean())
        low = _wilson_low(hits, n, z)
        out.append({"flagged": n, "right": hits, "ppv": hits / n if n else None,
                    "ppv_low": low, "prevalence": prevalence,
                    "enriched": bool(n and low > prevalence)})
    return out


def _weighted_auc(positive: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC of one finding under each row of bootstrap ``weights`` ``(B, n)`` (how often each
    scan was drawn): the weighted share of (positive, negative) pairs ranked right, ties
    half. NaN for a resample without a positive or a negative."""
    pos, neg = score[positive], score[~positive]
    kernel = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    w_pos, w_neg = weights[:, positive], weights[:, ~positive]
    pairs = w_pos.sum(axis=1) * w_neg.sum(axis=1)
    right = ((w_pos @ kernel) * w_neg).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, right / np.where(pairs > 0, pairs, 1.0), np.nan)


def compare_findings(y_true, proba_candidate, proba_active, finding_names: list[str], *,
                     tolerance: float = 0.02, min_positives: int = 5, n_boot: int = 1000,
                     alpha: float = 0.05, seed: int = 0) -> dict:
    """The findings gate: both versions scored on the SAME evaluation scans, judged as the
    class gate judges (``ml_backend.metrics.gate``): a drop counts only when a paired
    bootstrap says it is beyond ``tolerance`` (the project's gate tolerance), not noise.

    - A finding the active version has no information on — a NaN column (it lacks the
      finding), or one probability for every scan (a constant head: never seen present, or
      never absent; its AUC is 0.5 by ties, not by skill) — is *new*: reported with the
      candidate's AUC, never a bar.
    - *Compared* findings: those whose AUC both versions have (a known positive and
      negative). ``n_boot`` resamples of the scans (the same for both versions,
      ``default_rng(seed)``) give the macro AUC delta (mean over the compared findings
      defined in the resample); it regresses when its ``1 - alpha`` quantile is below
      ``-tolerance``.
    - *Judged* findings: compared ones with at least ``min_positives`` known positives and
      as many negatives; each regresses when the ``1 - alpha / K`` quantile of its delta
      (Bonferroni over the K judged) is below ``-tolerance``. Findings with fewer are
      reported, not judged (their AUC is noise).

    ``promote`` is False on a macro or a per-finding regression."""
    y, p = check_findings(y_true, proba_candidate)
    q = np.asarray(proba_active, dtype=np.float64)
    if q.shape != p.shape:
        raise ValueError("both versions must score the same scans and findings")
    rows, compared, judged = {}, [], []
    for f, name in enumerate(finding_names):
        known = ~np.isnan(y[:, f])
        positive = y[known, f] == 1
        uninformed = (bool(np.isnan(q[:, f]).any()) or not known.any()
                      or _constant(q[known, f]))
        candidate = _auc(positive, p[known, f])
        active = None if uninformed else _auc(positive, q[known, f])
        delta = None if candidate is None or active is None else candidate - active
        enough = (int(positive.sum()) >= min_positives
                  and int((~positive).sum()) >= min_positives)
        if uninformed:
            status = "new"
            why = ("the active version lacks it" if np.isnan(q[:, f]).any() else
                   "the active version's head is constant (never seen present, or never "
                   "absent): no bar to regress against")
        elif delta is None:
            status, why = "not judged", "no known positive and negative on the eval scans"
        else:
            compared.append(f)
            status, why = ("judged", "") if enough else (
                "not judged", f"fewer than {min_positives} eval positives or negatives")
            if enough:
                judged.append(f)
        rows[name] = {"positives": int(positive.sum()), "negatives": int((~positive).sum()),
                      "candidate_auc": candidate, "active_auc": active, "delta": delta,
                      "status": status, **({"why": why} if why else {})}
    macro = {"findings": len(compared), "delta": None, "lower": None, "upper": None,
             "regression": False}
    regressions = []
    if compared:
        rng = np.random.default_rng(seed)
        n = len(y)
        draws = rng.integers(0, n, size=(n_boot, n)) + (np.arange(n_boot) * n)[:, None]
        weights = np.bincount(draws.ravel(), minlength=n_boot * n).reshape(n_boot, n)
        weights = weights.astype(np.float64)
        deltas = np.full((n_boot, len(compared)), np.nan)
        for j, f in enumerate(compared):
            known = ~np.isnan(y[:, f])
            positive = y[known, f] == 1
            deltas[:, j] = (_weighted_auc(positive, p[known, f], weights[:, known])
                            - _weighted_auc(positive, q[known, f], weights[:, known]))
        point = [rows[finding_names[f]]["delta"] for f in compared]
        with np.errstate(invalid="ignore"):
            macro_boot = np.nanmean(np.where(np.isnan(deltas).all(axis=1, keepdims=True), 0.0,
                                             deltas), axis=1)
        macro.update(delta=float(np.mean(point)),
                     lower=float(np.quantile(macro_boot, alpha)),
                     upper=float(np.quantile(macro_boot, 1.0 - alpha)))
        macro["regression"] = macro["upper"] < -tolerance
        level = 1.0 - alpha / max(len(judged), 1)
        for j, f in enumerate(compared):
            row = rows[finding_names[f]]
            column = deltas[:, j][~np.isnan(deltas[:, j])]
            row["upper"] = float(np.quantile(column, level)) if len(column) else None
            if f in judged:
                regressed = row["upper"] is not None and row["upper"] < -tolerance
                row["status"] = "regressed" if regressed else "kept"
                if regressed:
                    regressions.append(finding_names[f])
    return _clean({"promote": not regressions and not macro["regression"],
                   "regressed": regressions, "macro_auc": macro,
                   "tolerance": tolerance, "min_positives": min_positives, "n_boot": n_boot,
                   "alpha": alpha, "per_finding": rows})
