"""Promotion gate: is a candidate classifier worse than the active one? Pure: numpy, scipy.

Both models are compared on the SAME evaluation scans, and a drop counts only when it is
statistically clear and larger than the tolerance, so classes with a handful of eval scans
(where one scan moves F1 by more than 0.05) do not block promotion on noise.

Method (:func:`compare_models`):

- *shared* classes are known by both models, *new* classes by the candidate only, *dropped*
  classes by the active model only. The comparison uses only the scans whose true class is
  shared; on them per-class F1 (as ``sklearn.metrics.f1_score(labels=shared,
  zero_division=0)``) and macro-F1 are computed for each model, and ``delta = cand - active``.
  Macro-F1 averages the shared classes that have eval support (a class without eval scans
  has F1 0 for both models whatever they predict, so it would only dilute the average).
- Paired bootstrap: ``n_boot`` resamples of those scans (with replacement, the same indices
  for both models, ``numpy.random.default_rng(seed)``). Per resample the per-class TP /
  support / predicted counts come from one matrix product of the resample counts with
  per-scan indicator columns, so F1 = 2 TP / (support + predicted) is fully vectorised.
  The one-sided upper confidence bound of delta is the ``1 - alpha`` quantile for macro-F1
  and the ``1 - alpha / K`` quantile per class (Bonferroni over the K shared classes with
  support). A *regression* is declared when ``upper < -tolerance``: we are confident the
  candidate is worse by more than the tolerance. ``lower`` (macro) is the ``alpha`` quantile.
- An exact McNemar test (binomial test on the discordant scans) of per-scan correctness on
  the shared scans is reported as information only, with the accuracies on those scans.
- ``detectable_drop`` = tolerance + the half-width of the macro-F1 delta's bootstrap
  interval: roughly the smallest fall the split can tell from noise. Above ``WEAK_GATE``
  :func:`describe` says so and asks for more eval scans (20 eval scans cannot guard against
  a 0.05 fall; ``docs/benchmarks.md``, PneumoniaMNIST).
- New classes report the candidate's recall, precision (over all scans predicted as the
  class) and F1; they never count as a regression. A dropped class with eval support does.

:func:`describe` turns the result into a sentence for clinicians ("promoted: ..." or
"held back: ...").
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binomtest

__all__ = ["compare_models", "describe"]


def _f(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _labels(values, *, name: str, num_classes: int) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise ValueError(f"{name} must hold integer class indices")
    array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        raise ValueError(f"{name} holds indices outside 0..{num_classes - 1}")
    return array


def _f1(tp, support, predicted):
    """F1 = 2 TP / (support + predicted); 0 where the denominator is 0 (zero_division=0)."""
    denominator = support + predicted
    return np.divide(2.0 * tp, denominator, out=np.zeros(np.shape(tp), dtype=np.float64),
                     where=denominator > 0)


def compare_models(y_true, pred_candidate, pred_active, *, class_names: list[str],
                   candidate_classes: set[int] | list[int], active_classes: set[int] | list[int],
                   tolerance: float = 0.02, n_boot: int = 1000, alpha: float = 0.05,
                   seed: int = 0) -> dict:
    """Compare candidate and active predictions on the same eval scans (see module docstring)."""
    names = [str(name) for name in class_names]
    num_classes = len(names)
    y = _labels(y_true, name="y_true", num_classes=num_classes)
    pc = _labels(pred_candidate, name="pred_candidate", num_classes=num_classes)
    pa = _labels(pred_active, name="pred_active", num_classes=num_classes)
    if not (len(y) == len(pc) == len(pa)):
        raise ValueError("y_true, pred_candidate and pred_active must have the same length")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    n_boot = int(n_boot)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    cand = {int(c) for c in candidate_classes}
    act = {int(c) for c in active_classes}
    for c in cand | act:
        if not 0 <= c < num_classes:
            raise ValueError(f"class index {c} outside 0..{num_classes - 1}")
    shared, new, dropped = sorted(cand & act), sorted(cand - act), sorted(act - cand)
    n = len(y)
    support_all = np.bincount(y, minlength=num_classes)

    # ---- new classes: candidate only, over all N scans
    new_report = []
    for c in new:
        tp = int(np.sum((y == c) & (pc == c)))
        support, predicted = int(support_all[c]), int(np.sum(pc == c))
        new_report.append({
            "name": names[c],
            "recall": tp / support if support else None,
            "precision": tp / predicted if predicted else None,
            "f1": 2.0 * tp / (support + predicted) if support + predicted else None,
            "support": support,
        })
    regressions = [names[c] for c in dropped if support_all[c] > 0]

    # ---- shared classes on the shared scans: local labels 0..S-1, S = "something else"
    S = len(shared)
    local = np.full(num_classes, S, dtype=np.int64)
    local[shared] = np.arange(S)
    mask = local[y] < S
    ys, cs, as_ = local[y[mask]], local[pc[mask]], local[pa[mask]]
    m = int(mask.sum())
    support = np.bincount(ys, minlength=S + 1)[:S]
    tested = support > 0
    num_tested = int(tested.sum())

    onehot = np.eye(S + 1, dtype=np.float64)
    y_hot, c_hot, a_hot = onehot[ys][:, :S], onehot[cs][:, :S], onehot[as_][:, :S]
    # columns: support | cand predicted | cand TP | active predicted | active TP
    columns = np.hstack([y_hot, c_hot, y_hot * c_hot, a_hot, y_hot * a_hot])

    def f1_from_counts(counts):
        sup, cp, ctp, ap, atp = (counts[..., i * S:(i + 1) * S] for i in range(5))
        return _f1(ctp, sup, cp), _f1(atp, sup, ap)

    f1_c, f1_a = f1_from_counts(columns.sum(axis=0))
    macro_c = float(f1_c[tested].mean()) if num_tested else None
    macro_a = float(f1_a[tested].mean()) if num_tested else None

    upper_class = np.full(S, np.nan)
    macro_upper = macro_lower = None
    if m and num_tested:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, m, size=(n_boot, m))
        offsets = (np.arange(n_boot, dtype=np.int64) * m)[:, None]
        weights = np.bincount((idx + offsets).ravel(), minlength=n_boot * m)
        weights = weights.reshape(n_boot, m).astype(np.float64)
        boot_c, boot_a = f1_from_counts(weights @ columns)      # (n_boot, S) each
        delta = boot_c - boot_a
        macro_delta = delta[:, tested].mean(axis=1)
        macro_upper = float(np.quantile(macro_delta, 1.0 - alpha))
        macro_lower = float(np.quantile(macro_delta, alpha))
        upper_class[tested] = np.quantile(delta[:, tested], 1.0 - alpha / num_tested, axis=0)

    per_class = []
    for j, c in enumerate(shared):
        upper = _f(upper_class[j])
        regressed = upper is not None and upper < -tolerance
        if regressed:
            regressions.append(names[c])
        per_class.append({
            "name": names[c], "support": int(support[j]),
            "candidate_f1": float(f1_c[j]), "active_f1": float(f1_a[j]),
            "delta": float(f1_c[j] - f1_a[j]), "upper": upper, "regression": bool(regressed),
        })
    if macro_upper is not None and macro_upper < -tolerance:
        regressions.append("macro-F1")

    mcnemar_p = None
    accuracy = {"candidate": None, "active": None}
    if m:
        right_c, right_a = ys == cs, ys == as_
        b = int(np.sum(right_c & ~right_a))
        d = int(np.sum(~right_c & right_a))
        mcnemar_p = float(binomtest(b, b + d, 0.5).pvalue) if b + d else 1.0
        accuracy = {"candidate": float(right_c.mean()), "active": float(right_a.mean())}

    return {
        "num_scans": int(n),
        "num_shared_scans": m,
        "shared_classes": [names[c] for c in shared],
        "new_classes": new_report,
        "dropped_classes": [names[c] for c in dropped],
        "macro_f1": {
            "candidate": macro_c, "active": macro_a,
            "delta": None if macro_c is None else macro_c - macro_a,
            "upper": macro_upper, "lower": macro_lower,
        },
        "per_class": per_class,
        "mcnemar_p": mcnemar_p,
        "accuracy": accuracy,
        "regression": bool(regressions),
        "regressions": regressions,
        "tolerance": float(tolerance),
        # the smallest fall in macro-F1 this eval split can tell from noise: the tolerance
        # plus the bootstrap interval's half-width (wide on a few dozen scans)
        "detectable_drop": (None if macro_upper is None else
                            float(tolerance + (macro_upper - macro_lower) / 2)),
        "alpha": float(alpha),
        "n_boot": n_boot,
    }


# A gate that cannot see a macro-F1 drop smaller than this says so in its reason.
WEAK_GATE = 0.10


def _signed(value: float) -> str:
    return f"{value:+.2f}".replace("-", "\u2212")


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def describe(result: dict, *, candidate: str, active: str) -> str:
    """One or two plain-English sentences: "promoted: ..." or "held back: ..."."""
    level = f"{100 * (1 - result['alpha']):g}%"
    tolerance = f"{result['tolerance']:.2f}"
    macro = result["macro_f1"]
    parts = []
    if result["regression"]:
        for row in result["per_class"]:
            if row["regression"]:
                parts.append(
                    f"{row['name']} F1 fell from {row['active_f1']:.2f} to {row['candidate_f1']:.2f} "
                    f"on {row['support']} scans ({level} bound {_signed(row['upper'])}, "
                    f"beyond the {tolerance} tolerance)")
        if "macro-F1" in result["regressions"]:
            parts.append(
                f"macro-F1 fell from {macro['active']:.2f} to {macro['candidate']:.2f} on "
                f"{result['num_shared_scans']} shared scans ({level} bound "
                f"{_signed(macro['upper'])}, beyond the {tolerance} tolerance)")
        for name in result["dropped_classes"]:
            if name in result["regressions"]:
                parts.append(f"{candidate} no longer recognises {name}, which {active} knew")
        text = f"held back: {candidate} against {active}: " + "; ".join(parts)
    elif result["num_shared_scans"] == 0:
        text = f"promoted: no shared eval scans to compare {candidate} against {active}"
    else:
        text = (f"promoted: {candidate} shows no significant drop against {active} on "
                f"{result['num_shared_scans']} shared eval scans "
                f"(macro-F1 {_num(macro['active'])} \u2192 {_num(macro['candidate'])})")
    if result["new_classes"]:
        learned = ", ".join(
            f"{row['name']} (recall {_num(row['recall'])}, precision {_num(row['precision'])}, "
            f"{row['support']} scans)" if row["support"] else
            f"{row['name']} (no labeled eval scans yet to measure it)"
            for row in result["new_classes"])
        text += f"; newly learned: {learned}"
    detectable = result.get("detectable_drop")
    if detectable is not None and detectable > WEAK_GATE:
        text += (f". Note: on {result['num_shared_scans']} shared eval scans only a macro-F1 "
                 f"drop larger than {detectable:.2f} can be told from noise; label more eval "
                 "scans to make this check stronger")
    return text
