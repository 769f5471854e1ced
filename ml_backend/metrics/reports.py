"""Classification reports, calibration and temperature scaling. Pure: numpy, scipy, sklearn.

``classification_report`` turns true labels and predicted probabilities into one
JSON-serialisable dict (plain ``float`` / ``int`` / ``list``; undefined values are ``None``,
never NaN): accuracy, macro / weighted F1, Cohen's kappa, one-vs-rest AUC and average
precision, per-class precision / recall / F1 / support / AUC / AP, the confusion matrix,
expected calibration error with its reliability bins, and optional per-group metrics
(e.g. per site or per data set).

Classes that never occur in ``y_true`` do not raise: their AUC / AP are ``None`` and they are
left out of the macro AUC / AP. ``macro_f1`` and ``weighted_f1`` average over the classes
present in ``y_true`` or in the predictions, so a class that is neither true nor predicted
anywhere does not count as a zero.

**No prediction.** A row of ``proba`` with no probability anywhere (all zeros: the model has
no head for the scan's label set yet, or none of its classes applies to the scan) is *no
prediction*, never a guess of class 0 (``predicted_classes``). Such a scan counts as a miss
everywhere a score counts scans: it is wrong for accuracy and kappa, lowers the recall (and
so the F1) of its true class, and lowers no other class's precision, overall and in
``per_group`` alike. The confusion matrix keeps its ``C x C`` shape over the predicted
classes; the scans with no prediction are counted per true class in ``no_prediction``
(``num_no_prediction`` in all), so a row of the matrix plus its ``no_prediction`` is the
class's support. Calibration (ECE, the reliability bins, NLL) measures the probabilities a
model gave: it is over the scans with a prediction only (``None`` when there are none).
AUC / AP rank every scan; a scan with no prediction scores 0 for every class.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

__all__ = [
    "classification_report",
    "predicted_classes",
    "expected_calibration_error",
    "reliability_bins",
    "fit_temperature",
    "negative_log_likelihood",
]


# --- helpers ---------------------------------------------------------------------------


def _clean(value):
    """Numpy scalars → Python numbers; NaN / inf → None; recurse into dicts and lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def _check(y_true, proba) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).reshape(-1)
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"proba must have shape (N, C), got {p.shape}")
    if len(y) != len(p):
        raise ValueError(f"{len(y)} labels but {len(p)} rows of probabilities")
    if len(y) and not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("y_true must hold integer class indices")
    y = y.astype(np.int64)
    if len(y) and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"y_true must hold class indices in 0..{p.shape[1] - 1}")
    return y, p


def _binary_auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, score))


def _binary_ap(positive: np.ndarray, score: np.ndarray) -> float | None:
    if not positive.any():
        return None
    return float(average_precision_score(positive, score))


def _mean_defined(values) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def predicted_classes(proba) -> np.ndarray:
    """The predicted class index per row of ``proba (N, C)``, or ``-1`` where the row holds
    no probability at all (no prediction: the model has no head for that scan's label set),
    never the ``argmax`` of a row of zeros, which would be class 0."""
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"proba must have shape (N, C), got {p.shape}")
    if not len(p):
        return np.zeros(0, dtype=np.int64)
    return np.where(p.max(axis=1) > 0, p.argmax(axis=1), -1).astype(np.int64)


def _f1(y: np.ndarray, pred: np.ndarray, average: str) -> float:
    """F1 averaged over the classes true or predicted; a scan with no prediction (-1) is a
    miss for its class, not a class of its own."""
    used = sorted(set(y.tolist()) | set(pred[pred >= 0].tolist()))
    return float(f1_score(y, pred, labels=used, average=average, zero_division=0))


# --- calibration -----------------------------------------------------------------------


def reliability_bins(y_true, proba, n_bins: int = 15) -> list[dict]:
    """Equal-width bins over the max probability, each ``(lower, upper]`` (the first also
    holds 0). Per bin: ``lower``, ``upper``, mean ``confidence``, ``accuracy`` (None when
    empty) and ``count``. Rows with no prediction (no probability at all) have no confidence
    to calibrate and are in no bin."""
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    y, p = _check(y_true, proba)
    answered = predicted_classes(p) >= 0
    y, p = y[answered], p[answered]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    confidence = p.max(axis=1) if len(p) else np.zeros(0)
    correct = (p.argmax(axis=1) == y) if len(p) else np.zeros(0, dtype=bool)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        members = index == b
        count = int(members.sum())
        bins.append({
            "lower": float(edges[b]), "upper": float(edges[b + 1]),
            "confidence": float(confidence[members].mean()) if count else None,
            "accuracy": float(correct[members].mean()) if count else None,
            "count": count,
        })
    return bins


def expected_calibration_error(y_true, proba, n_bins: int = 15) -> float:
    """ECE (Guo et al., 2017): ``sum_b |B_b|/N * |acc(B_b) - conf(B_b)|`` over ``n_bins``
    equal-width bins of the max probability, over the rows with a prediction. 0.0 for no
    samples."""
    bins = reliability_bins(y_true, proba, n_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        return 0.0
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"])
                     for b in bins if b["count"]))


def negative_log_likelihood(logits, y_true, temperature: float = 1.0) -> float:
    """Mean NLL of ``softmax(logits / temperature)``; log-probabilities work as logits."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true).reshape(-1).astype(np.int64)
    if z.ndim != 2 or len(z) != len(y) or len(y) == 0:
        raise ValueError("logits must be (N, C) with N = len(y_true) > 0")
    log_p = log_softmax(z / temperature, axis=1)
    return float(-log_p[np.arange(len(y)), y].mean())


def retemper(proba: np.ndarray, temperature) -> np.ndarray:
    """Re-temper probabilities: softmax(log p / T) over each row's non-zero classes."""
    proba = np.asarray(proba, dtype=np.float64)
    temps = np.broadcast_to(np.asarray(temperature, dtype=np.float64), (len(proba),))[:, None]
    with np.errstate(divide="ignore"):
        z = np.where(proba > 0, np.log(np.clip(proba, 1e-300, 1.0)) / temps, -np.inf)
    z -= np.where(np.isfinite(z.max(axis=1, keepdims=True)), z.max(axis=1, keepdims=True), 0)
    e = np.where(np.isfinite(z), np.exp(z), 0.0)
    total = e.sum(axis=1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0).astype(np.float32)


def _held_out(logits_or_log_proba, y_true) -> tuple[np.ndarray, np.ndarray]:
    """Held-out logits ``(N, C)`` and labels ``(N,)`` checked for a temperature fit, with
    -inf log-probabilities (p = 0, which would make every T give inf) clipped."""
    z = np.asarray(logits_or_log_proba, dtype=np.float64)
    y = np.asarray(y_true).reshape(-1).astype(np.int64)
    if len(y) == 0:
        return z, y
    if z.ndim != 2 or len(z) != len(y):
        raise ValueError("logits must be (N, C) with N = len(y_true)")
    finite = np.isfinite(z)
    if not finite.any():
        raise ValueError("logits hold no finite values")
    return np.where(finite, z, z[finite].min() - 50.0), y


def fit_temperature(logits_or_log_proba, y_true, *, bounds: tuple[float, float] = (0.05, 20.0)
                    ) -> float:
    """Temperature scaling (Guo et al., 2017): the ``T`` minimising the NLL of
    ``softmax(z / T)`` on held-out data, searched over ``log T`` within ``bounds``.

    ``z`` may be logits or log-probabilities (softmax ignores a per-row shift). Returns 1.0
    when there is nothing to fit (no samples).
    """
    z, y = _held_out(logits_or_log_proba, y_true)
    if len(y) == 0:
        return 1.0
    low, high = math.log(bounds[0]), math.log(bounds[1])
    result = minimize_scalar(lambda log_t: negative_log_likelihood(z, y, math.exp(log_t)),
                             bounds=(low, high), method="bounded",
                             options={"xatol": 1e-4})
    return float(math.exp(result.x))


def posterior_temperature(logits_or_log_proba, y_true, *, bounds: tuple[float, float],
                          grid: int = 121) -> float:
    """The temperature a handful of held-out labels support: ``exp`` of the posterior mean
    of ``log T`` under a log-uniform prior over ``bounds`` and the held-out likelihood of
    ``softmax(z / T)``.

    With hundreds of held-out labels the likelihood is sharp and this is the maximum-likelihood
    ``fit_temperature``; with a few it is not, and a point estimate swings between the ends
    of the range (2 of 2 right: no softening; 1 of 2 wrong: the most): the posterior mean
    weighs every temperature the labels do not rule out. With no held-out label at all it is
    the prior's centre, the geometric mean of ``bounds``."""
    low, high = math.log(bounds[0]), math.log(bounds[1])
    log_t = np.linspace(low, high, grid)
    z, y = _held_out(logits_or_log_proba, y_true)
    if len(y) == 0:
        return float(math.exp((low + high) / 2))
    log_lik = np.array([-negative_log_likelihood(z, y, math.exp(t)) * len(y) for t in log_t])
    weight = np.exp(log_lik - log_lik.max())
    return float(math.exp((weight * log_t).sum() / weight.sum()))


def fit_balanced_bias(logits, y_true, *, max_abs: float = 10.0,
                      shares: np.ndarray | None = None) -> np.ndarray:
    """Per-class logit offsets minimising the *class-balanced* NLL of held-out logits: each
    class weighs the same whatever its count.

    A head fit on 20 scans of one class beside 1,700 of the others hugs those 20 (the data
    are separable in 512 dimensions, so class weights cannot move its boundary): its
    held-out scans of the rare class get low logits. Fitting offsets on *out-of-fold* logits
    measures that shortfall and corrects it, as logit adjustment does for a known label
    shift (Menon et al., ICLR 2021), but estimated from the data. The balanced NLL of
    ``softmax(z / t + b)`` is minimised over ``t`` and ``b`` (``b`` = 0 for the first class
    present, and for classes with no held-out scan); returns ``t * b``, the offsets in the
    units of ``z``, ``(C,)``. ``shares (C,)``: weigh each class by its share of a target
    population instead of equally (the NLL expected on scans drawn with those shares; equal
    shares are the class-balanced NLL)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true).reshape(-1).astype(np.int64)
    if z.ndim != 2 or len(z) != len(y):
        raise ValueError("logits must be (N, C) with N = len(y_true)")
    c = z.shape[1]
    counts = np.bincount(y, minlength=c).astype(np.float64)
    present = np.flatnonzero(counts > 0)
    if len(present) < 2:
        return np.zeros(c)
    if shares is None:
        weight = 1.0 / counts[y]
    else:
        shares = np.asarray(shares, dtype=np.float64).reshape(-1)
        if shares.shape != (c,) or (shares < 0).any() or shares.sum() <= 0:
            raise ValueError(f"shares must be {c} non-negative numbers, not all 0")
        weight = shares[y] / counts[y]
    weight /= weight.sum()
    free = present[1:]                      # the first present class is the reference
    rows = np.arange(len(y))
    onehot = np.zeros_like(z)
    onehot[rows, y] = 1.0

    def loss_and_grad(params):
        t = math.exp(params[0])
        b = np.zeros(c)
        b[free] = params[1:]
        s = z / t + b
        s -= s.max(axis=1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=1, keepdims=True)
        loss = -(weight * np.log(np.maximum(p[rows, y], 1e-300))).sum()
        residual = weight[:, None] * (p - onehot)
        grad_log_t = float((residual * (-z / t)).sum())
        return loss, np.concatenate([[grad_log_t], residual.sum(axis=0)[free]])

    bounds = [(math.log(0.05), math.log(20.0))] + [(-max_abs, max_abs)] * len(free)
    result = minimize(loss_and_grad, np.zeros(1 + len(free)), jac=True, method="L-BFGS-B",
                      bounds=bounds)
    bias = np.zeros(c)
    bias[free] = result.x[1:] * math.exp(result.x[0])
    return bias


# --- the report ------------------------------------------------------------------------


def _class_aucs(y: np.ndarray, p: np.ndarray, applies: np.ndarray | None, score=None
                ) -> list[float | None]:
    """Each class's one-vs-rest AUC (or ``score``, e.g. AP) over the scans it applies to
    (``applies[:, c]``; all scans when None): a scan of another label set, which can never
    be that class and scores 0 on it, is not an easy negative that lifts the figure."""
    score = score or _binary_auc
    out = []
    for c in range(p.shape[1]):
        rows = slice(None) if applies is None else applies[:, c]
        out.append(score(y[rows] == c, p[rows, c]))
    return out


def _core(y: np.ndarray, pred: np.ndarray, p: np.ndarray,
          applies: np.ndarray | None = None) -> dict:
    """accuracy, macro_f1, macro_auc for one (sub)set; ``pred`` is ``predicted_classes``
    (-1: no prediction, a miss); ``applies`` as in ``classification_report``."""
    num_classes = p.shape[1]
    if num_classes == 2 and applies is None:
        macro_auc = _binary_auc(y == 1, p[:, 1])
    else:
        macro_auc = _mean_defined(_class_aucs(y, p, applies))
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": _f1(y, pred, "macro"),
        "macro_auc": macro_auc,
        "n": int(len(y)),
        "no_prediction": int((pred < 0).sum()),
    }


def classification_report(y_true, proba, class_names: list[str], *,
                          groups=None, n_bins: int = 15, applies=None) -> dict:
    """Every metric of one evaluation as a JSON-serialisable dict (see module docstring).

    ``y_true``: int ``(N,)`` class indices; ``proba``: ``(N, C)`` probabilities with
    ``C == len(class_names)``; ``groups``: optional ``(N,)`` group names (data set, site)
    for ``per_group``; ``applies``: optional boolean ``(N, C)``, whether class ``c`` applies
    to scan ``i`` (its label set): each class's AUC and AP are over those scans only.
    """
    y, p = _check(y_true, proba)
    if applies is not None:
        applies = np.asarray(applies, dtype=bool)
        if applies.shape != p.shape:
            raise ValueError(f"applies is {applies.shape}, the probabilities {p.shape}")
    num_classes = p.shape[1]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} probability columns")
    if len(set(names)) != len(names):
        raise ValueError("class names must be unique")
    labels = list(range(num_classes))
    n = len(y)
    if n == 0:
        return _clean({
            "accuracy": None, "macro_f1": None, "weighted_f1": None, "cohen_kappa": None,
            "macro_auc": None, "macro_ap": None, "nll": None,
            "per_class": {name: {"precision": None, "recall": None, "f1": None, "support": 0,
                                 "auc": None, "ap": None, "no_prediction": 0}
                          for name in names},
            "confusion_matrix": [[0] * num_classes for _ in labels],
            "no_prediction": [0] * num_classes, "num_no_prediction": 0,
            "ece": None, "reliability": reliability_bins(y, p, n_bins),
            "num_samples": 0, "class_names": names,
            **({"per_group": {}} if groups is not None else {}),
        })

    pred = predicted_classes(p)
    answered = pred >= 0
    # "no prediction" is one more column for the confusion matrix and kappa (a disagreement
    # with every class), and a miss for recall; it is no class for precision or the F1 mean.
    none = num_classes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kappa on a single class: NaN → None below
        kappa = cohen_kappa_score(y, np.where(answered, pred, none), labels=labels + [none])
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=labels, zero_division=0)
    aucs = _class_aucs(y, p, applies)
    aps = _class_aucs(y, p, applies, score=_binary_ap)
    core = _core(y, pred, p, applies)
    matrix = confusion_matrix(y, np.where(answered, pred, none),
                              labels=labels + [none])[:none]     # no true "no prediction"
    clipped = np.clip(p[np.arange(n), y][answered], 1e-12, 1.0)

    report = {
        "accuracy": core["accuracy"],
        "macro_f1": core["macro_f1"],
        "weighted_f1": _f1(y, pred, "weighted"),
        "cohen_kappa": kappa,
        "macro_auc": core["macro_auc"],
        "macro_ap": _mean_defined(aps),
        "nll": float(-np.log(clipped).mean()) if len(clipped) else None,
        "per_class": {
            name: {"precision": precision[c], "recall": recall[c], "f1": f1[c],
                   "support": int(support[c]), "auc": aucs[c], "ap": aps[c],
                   "no_prediction": int(matrix[c, none])}
            for c, name in enumerate(names)
        },
        "confusion_matrix": matrix[:, :none].tolist(),
        "no_prediction": matrix[:, none].tolist(),
        "num_no_prediction": int((~answered).sum()),
        "ece": expected_calibration_error(y, p, n_bins) if answered.any() else None,
        "reliability": reliability_bins(y, p, n_bins),
        "num_samples": n,
        "class_names": names,
    }
    if groups is not None:
        g = np.asarray(groups).reshape(-1)
        if len(g) != n:
            raise ValueError(f"{len(g)} group names for {n} samples")
        report["per_group"] = {
            str(value): _core(y[g == value], pred[g == value], p[g == value],
                              None if applies is None else applies[g == value])
            for value in sorted(set(g.tolist()), key=str)
        }
    return _clean(report)
