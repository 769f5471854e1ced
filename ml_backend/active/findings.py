"""Multi-label findings on frozen embeddings: one calibrated binary head per finding, and the
active-learning scores that look at every finding of a scan. Pure: numpy + sklearn.

Targets are ``(N, F)`` floats: 1 present, 0 absent, NaN unknown (not read, or uncertain and
ignored by the policy, see ``ml_backend.metrics.findings.uncertain_policy``). Each finding's
head learns from the scans whose answer for it is known, with class-balanced weights (a
finding seen 9 times in 700 scans still gets a boundary), then is calibrated per finding by
Platt scaling on out-of-fold logits — which also undoes the prior shift the balanced weights
cause, so a probability of 0.3 means 30 % of such scans show the finding.

A finding with only one kind of known answer (never seen present, or never absent) gets a
constant probability: its smoothed frequency among the known answers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from ml_backend.active.threads import one_blas_thread

__all__ = ["FindingsHead", "FINDINGS_STRATEGIES", "fit_findings_head", "findings_scores",
           "unsure_findings"]

FINDINGS_STRATEGIES = ("mean_entropy", "max_entropy", "cardinality")
# The Platt slope's range and log-uniform prior (``_platt``): a finding's out-of-fold logits
# may be softened (down to a slope of 0.01: nearly its prior everywhere, the ranking kept),
# never sharpened or reversed. The classes' heads treat their temperature the same way
# (``refit.TEMPERATURE_BOUNDS``). ``PLATT_GRID`` slopes are weighed.
PLATT_SLOPE_BOUNDS = (0.01, 1.0)
PLATT_GRID = 41


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


@dataclass
class FindingsHead:
    """``p_f = sigmoid(a_f * z_f + b_f)``, ``z = ((x - mean) / scale) @ coef.T + intercept``."""

    coef: np.ndarray          # (F, D)
    intercept: np.ndarray     # (F,)
    mean: np.ndarray          # (D,)
    scale: np.ndarray         # (D,)
    platt_a: np.ndarray       # (F,) calibration slope per finding
    platt_b: np.ndarray       # (F,) calibration offset per finding
    finding_ids: np.ndarray   # (F,) LabelClass ids (or names), in column order
    thresholds: np.ndarray    # (F,) decision threshold per finding (0.5 until chosen)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float64) - self.mean) / self.scale) @ self.coef.T \
            + self.intercept

    def predict_proba(self, x: np.ndarray, *, calibrated: bool = True) -> np.ndarray:
        z = self.logits(x)
        if calibrated:
            z = self.platt_a * z + self.platt_b
        return _sigmoid(z).astype(np.float32)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """``bool (N, F)``: findings at or above their thresholds."""
        return self.predict_proba(x) >= self.thresholds

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(f".tmp-{path.name}")
        with open(tmp, "wb") as handle:
            np.savez(handle, coef=self.coef, intercept=self.intercept, mean=self.mean,
                     scale=self.scale, platt_a=self.platt_a, platt_b=self.platt_b,
                     finding_ids=self.finding_ids, thresholds=self.thresholds,
                     kind=np.array("findings"))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> FindingsHead:
        with np.load(path, allow_pickle=False) as data:
            if "kind" not in data.files or str(data["kind"]) != "findings":
                raise ValueError(f"{path} is not a findings head")
            return cls(**{name: data[name] for name in (
                "coef", "intercept", "mean", "scale", "platt_a", "platt_b", "finding_ids",
                "thresholds")})


def _fit_one(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> tuple[np.ndarray, float]:
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed)
    model.fit(x, y)
    return model.coef_[0], float(model.intercept_[0])


def _offset(u: np.ndarray, y: np.ndarray, start: float) -> tuple[float, float]:
    """The offset ``b`` maximising the likelihood of ``y`` under ``sigmoid(u + b)`` (Newton's
    method: the problem is convex in one number) and that log-likelihood."""
    b = start
    for _ in range(30):
        p = _sigmoid(u + b)
        hessian = float((p * (1 - p)).sum())
        step = float((p - y).sum()) / max(hessian, 1e-12)
        b -= float(np.clip(step, -5.0, 5.0))
        if abs(step) < 1e-7:
            break
    margin = (2.0 * y - 1.0) * (u + b)
    return b, float(-np.logaddexp(0.0, -margin).sum())


def _platt(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Slope and offset of the Platt calibration of ``y`` on the out-of-fold logit ``z``.

    The slope stays within ``PLATT_SLOPE_BOUNDS``: it may soften a finding's logits, never
    sharpen them (a few positives ranked right out of fold would otherwise get a slope of 10
    or more and say 0.99 on scans it gets wrong), nor turn them round (a negative slope, fit
    on noise, ranks the scans with the finding last: 19 of 84 fits on the NIH subset). As
    for the classes' temperature (``metrics.reports.posterior_temperature``) it is the
    posterior mean of ``log a`` under a log-uniform prior over the bounds, each slope weighed
    by its likelihood with its best offset: on two or three positives that is a softening
    the labels do not rule out, not the end of the range they happen to favour. The offset
    is then the best one for that slope."""
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    start = _logit(float(np.clip(y.mean(), 1e-3, 1 - 1e-3)))
    log_a = np.linspace(np.log(PLATT_SLOPE_BOUNDS[0]), np.log(PLATT_SLOPE_BOUNDS[1]),
                        PLATT_GRID)
    profile = np.array([_offset(np.exp(la) * z, y, start)[1] for la in log_a])
    weight = np.exp(profile - profile.max())
    a = float(np.exp((weight * log_a).sum() / weight.sum()))
    return a, _offset(a * z, y, start)[0]


@one_blas_thread
def fit_findings_head(x: np.ndarray, targets: np.ndarray, finding_ids, *, c: float = 0.5,
                      seed: int = 0, folds: int = 4, min_calibration: int = 2
                      ) -> tuple[FindingsHead, dict]:
    """Fit one binary head per finding (module docstring). ``targets``: ``(N, F)`` with 1, 0,
    NaN. Platt calibration needs ``min_calibration`` known positives and negatives of a
    finding (out-of-fold, ``folds``-fold stratified; two are enough for the bounded
    posterior slope of ``_platt`` to soften the head); below that the finding keeps its raw
    probability with the balanced prior undone (offset = log-odds of its frequency).
    """
    x = np.asarray(x, dtype=np.float64)
    y_all = np.asarray(targets, dtype=np.float64)
    finding_ids = np.asarray(finding_ids)
    if y_all.ndim != 2 or len(y_all) != len(x) or y_all.shape[1] != len(finding_ids):
        raise ValueError("targets must be (N, F): one row per embedding, one column per finding")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-8] = 1.0
    xs = (x - mean) / scale
    n_findings = y_all.shape[1]
    coef = np.zeros((n_findings, x.shape[1]))
    intercept = np.zeros(n_findings)
    platt_a, platt_b = np.ones(n_findings), np.zeros(n_findings)
    details = []
    for f in range(n_findings):
        known = ~np.isnan(y_all[:, f])
        y = y_all[known, f].astype(int)
        pos, neg = int(y.sum()), int(len(y) - y.sum())
        row = {"finding": finding_ids[f].item(), "known": int(known.sum()), "positives": pos,
               "negatives": neg, "calibration": "none"}
        if pos == 0 or neg == 0:
            prevalence = (pos + 0.5) / (len(y) + 1.0)           # smoothed frequency
            intercept[f] = _logit(prevalence)
            row["calibration"] = "constant"
            details.append(row)
            continue
        coef[f], intercept[f] = _fit_one(xs[known], y, c, seed)
        k = min(folds, pos, neg)
        if min(pos, neg) >= min_calibration and k >= 2:
            out_of_fold = np.zeros(len(y))
            rows = np.flatnonzero(known)
            for fit_rows, cal_rows in StratifiedKFold(k, shuffle=True, random_state=seed
                                                      ).split(rows, y):
                w, b = _fit_one(xs[rows[fit_rows]], y[fit_rows], c, seed)
                out_of_fold[cal_rows] = xs[rows[cal_rows]] @ w + b
            platt_a[f], platt_b[f] = _platt(out_of_fold, y)
            row["calibration"] = "platt"
        else:   # balanced weights set the prior to 1:1; put the finding's own prior back
            platt_b[f] = _logit(pos / len(y))
            row["calibration"] = "prior"
        details.append(row)
    head = FindingsHead(coef=coef, intercept=intercept, mean=mean, scale=scale,
                        platt_a=platt_a, platt_b=platt_b, finding_ids=finding_ids,
                        thresholds=np.full(n_findings, 0.5))
    return head, {"num_scans": int(len(x)), "findings": details}


def _entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def findings_scores(proba: np.ndarray, strategy: str = "mean_entropy", *,
                    mean_cardinality: float | None = None) -> np.ndarray:
    """Informativeness of each scan over all its findings (higher: ask first).

    ``mean_entropy``: the mean binary entropy over findings; ``max_entropy``: the entropy of
    the finding the model is least sure of; ``cardinality``: the mean entropy scaled up when
    the expected number of findings ``sum_f p_f`` departs from the labelled scans' mean
    number of findings (label-cardinality inconsistency, Li & Guo 2013), so scans the model
    thinks unusually busy or empty come first. Pass that mean as ``mean_cardinality`` (a
    refit records it: ``config["findings_sets"][i]["mean_cardinality"]``, the scorer's
    ``mean_cardinality``); without it the candidates' own mean expected count stands in,
    which measures how unusual a scan is among the candidates, not against the labels.
    """
    p = np.asarray(proba, np.float64)
    if p.ndim != 2:
        raise ValueError("proba must be (N, F)")
    h = _entropy(p)
    if strategy == "mean_entropy":
        return h.mean(axis=1)
    if strategy == "max_entropy":
        return h.max(axis=1)
    if strategy == "cardinality":
        c = float(mean_cardinality) if mean_cardinality is not None else float(p.sum(1).mean())
        return h.mean(axis=1) * (1.0 + np.abs(p.sum(axis=1) - c) / max(c, 1.0))
    raise ValueError(f"strategy must be one of {', '.join(FINDINGS_STRATEGIES)}")


def unsure_findings(row: np.ndarray, names: list[str], *, thresholds=None, limit: int = 3
                    ) -> list[dict]:
    """The findings the model is least sure of on one scan, most unsure first: those whose
    probability is nearest their threshold (``{name, probability, threshold}``), for the
    "why this scan" line."""
    p = np.asarray(row, np.float64)
    t = np.full(len(p), 0.5) if thresholds is None else np.asarray(thresholds, np.float64)
    distance = np.abs(np.log(np.clip(p, 1e-7, 1)) - np.log(np.clip(t, 1e-7, 1))) \
        + np.abs(np.log(np.clip(1 - p, 1e-7, 1)) - np.log(np.clip(1 - t, 1e-7, 1)))
    order = np.argsort(distance, kind="stable")[:limit]
    return [{"name": names[i], "probability": float(p[i]), "threshold": float(t[i])}
            for i in order]


# What a project's query strategy means on a findings set: the uncertainty strategies score
# a scan over all its findings; the diversity and cold-start strategies need no change.
FINDINGS_STRATEGY_FOR = {"entropy": "mean_entropy", "least_confident": "max_entropy",
                         "margin": "max_entropy", "hybrid": "cardinality"}
_FINDINGS_WHY = {"mean_entropy": "most unsure over its findings (mean binary entropy)",
                 "max_entropy": "most unsure about one finding (max binary entropy)",
                 "cardinality": "unsure, and an unusual number of findings expected "
                                "(label-cardinality inconsistency)"}


def query_findings(strategy: str, proba: np.ndarray, names: list[str], n: int, *,
                   thresholds=None, mean_cardinality: float | None = None,
                   groups: np.ndarray | None = None, max_per_group: int = 1):
    """Rank candidate scans of a findings set by ``FINDINGS_STRATEGY_FOR[strategy]`` (or a
    findings score named directly). Returns ``(indices, scores, reasons)``; each reason names
    the findings the model is least sure of. At most ``max_per_group`` scans per patient
    first, then the rest in rank order."""
    measure = FINDINGS_STRATEGY_FOR.get(strategy, strategy)
    scores = findings_scores(proba, measure, mean_cardinality=mean_cardinality)
    order = np.argsort(-scores, kind="stable")
    taken, per_group = [], {}
    for i in order:
        key = None if groups is None else groups[i]
        if key:
            if per_group.get(key, 0) >= max_per_group:
                continue
            per_group[key] = per_group.get(key, 0) + 1
        taken.append(int(i))
        if len(taken) == n:
            break
    if len(taken) < n:
        rest = [int(i) for i in order if int(i) not in set(taken)]
        taken += rest[: n - len(taken)]
    reasons = [{"why": _FINDINGS_WHY[measure], "findings_score": round(float(scores[i]), 4),
                "unsure": [{**u, "probability": round(u["probability"], 4)}
                           for u in unsure_findings(proba[i], names, thresholds=thresholds)]}
               for i in taken]
    return np.array(taken, dtype=np.int64), scores[taken], reasons
