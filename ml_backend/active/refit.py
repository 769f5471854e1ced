"""The fast refit: a class-weighted linear head on frozen SimCLRv2 embeddings, calibrated by
temperature scaling (Guo et al., 2017). Seconds on a CPU for thousands of scans.

Pure: numpy + sklearn. A head is saved as an ``.npz`` of plain arrays (no pickle).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from ml_backend.active.threads import one_blas_thread
from ml_backend.metrics.reports import (
    fit_balanced_bias,
    negative_log_likelihood,
    posterior_temperature,
)


# The standardising scale of a feature a head ignores (``_pad``): anything / 1e12 is ~0.
IGNORED_SCALE = 1e12
# Cosine logits of the prototype component: kappa * cos(scan, class mean).
PROTOTYPE_KAPPA = 10.0
# The refit's n0 (``fit_head(prototype_n0=...)``): chosen with bench.new_class, see
# docs/benchmarks.md "A new anomaly type from a few labels".
PRODUCT_PROTOTYPE_N0 = 0.0
# The refit's balance correction (``fit_head(balance=...)``): the share of the class-balanced
# logit offsets fit on out-of-fold logits that the head applies. Chosen with bench.new_class
# (docs/benchmarks.md, "A new anomaly type from a few labels"): 0.5 doubles a new class's
# recall at 20 labels with the old classes within 2 points; 1.0 raises it further at the
# cost of the old classes.
PRODUCT_BALANCE = 0.5
# The range of the held-out temperature, and its log-uniform prior
# (``metrics.reports.posterior_temperature``: the posterior mean of log T given the held-out
# labels). It may soften a head (T > 1), never sharpen it: a head fit on a handful of labels
# that it all predicts right out of fold would otherwise get T -> 0.05 and show 0.99-1.00 on
# scans it gets wrong. With no label to hold out the head gets the prior's centre,
# sqrt(20) = 4.5; with 100-1,200 labels T was 1.5-2.4 on chest films and brain MRI, where the
# posterior is sharp and equals the maximum-likelihood fit (docs/benchmarks.md, "Suggestions
# on a few labels").
TEMPERATURE_BOUNDS = (1.0, 20.0)
# Below this many held-out labels the few-label softening (``_few_label_temperature``) holds
# each out on its own (one fit per label); above it, stratified folds.
FEW_LABELS_LEAVE_ONE_OUT = 12


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


@dataclass
class LinearHead:
    """``proba = softmax(blend(z) / temperature)`` with ``z = ((x - mean) / scale) @ coef.T +
    intercept``.

    With ``prototypes`` (unit class means of the standardised, unit-length embeddings) the
    head blends, per class, its linear log-probabilities with those of a nearest-class-mean
    classifier: ``(1 - w_c) log p_linear + w_c log p_prototype``, ``w_c = n0 / (n0 + n_c)``
    (``blend``). A class with a few labels leans on its prototype, which generalises from
    20 examples where a linear boundary hugs them; a class with hundreds keeps its linear
    boundary.

    ``bias`` (see ``fit_head(balance=...)``) is added to the raw logits, so the argmax, the
    calibrated and the uncalibrated probabilities all include it."""

    coef: np.ndarray          # (C, D)
    intercept: np.ndarray     # (C,)
    mean: np.ndarray          # (D,)
    scale: np.ndarray         # (D,)
    temperature: float
    class_ids: np.ndarray     # (C,) LabelClass ids (or any labels), in column order
    prototypes: np.ndarray | None = None    # (C, D) unit vectors
    blend: np.ndarray | None = None         # (C,) weight of the prototype per class
    bias: np.ndarray | None = None          # (C,) balance offsets, in raw-logit units

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The linear part's logits (what explanations attribute)."""
        return ((x - self.mean) / self.scale) @ self.coef.T + self.intercept

    def raw_logits(self, x: np.ndarray) -> np.ndarray:
        """Logits before temperature scaling (blended when the head has prototypes)."""
        x = np.asarray(x, dtype=np.float64)
        z = self.logits(x)
        if self.prototypes is not None:
            cosine = _unit((x - self.mean) / self.scale) @ self.prototypes.T
            w = self.blend[None, :]
            z = (1 - w) * _log_softmax(z) + w * _log_softmax(PROTOTYPE_KAPPA * cosine)
        if self.bias is not None:
            z = z + self.bias[None, :]
        return z

    def predict_proba(self, x: np.ndarray, *, calibrated: bool = True) -> np.ndarray:
        z = self.raw_logits(x)
        if calibrated:
            z = z / self.temperature
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(f".tmp-{path.name}")
        extra = {} if self.prototypes is None else {"prototypes": self.prototypes,
                                                     "blend": self.blend}
        if self.bias is not None:
            extra["bias"] = self.bias
        with open(tmp, "wb") as handle:
            np.savez(handle, coef=self.coef, intercept=self.intercept, mean=self.mean,
                     scale=self.scale, temperature=np.array(self.temperature),
                     class_ids=self.class_ids, **extra)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> LinearHead:
        with np.load(path, allow_pickle=False) as data:
            has = "prototypes" in data.files
            return cls(coef=data["coef"], intercept=data["intercept"], mean=data["mean"],
                       scale=data["scale"], temperature=float(data["temperature"]),
                       class_ids=data["class_ids"],
                       prototypes=data["prototypes"] if has else None,
                       blend=data["blend"] if has else None,
                       bias=data["bias"] if "bias" in data.files else None)


@one_blas_thread
def fit_head(x: np.ndarray, labels: np.ndarray, *, c: float = 1.0, seed: int = 0,
             folds: int = 4, min_calibration: int = 8,
             prototype_n0: float = 0.0, balance: float = 0.0,
             feature_weights: np.ndarray | None = None,
             pool_x: np.ndarray | None = None) -> tuple[LinearHead, dict]:
    """Fit on embeddings ``x (N, D)`` and labels ``(N,)`` (any hashable ids, ≥ 2 distinct).

    With enough labels the temperature is fit on out-of-fold logits (``folds``-fold,
    stratified: every label calibrates once, from a head that did not see it; the posterior
    mean over ``TEMPERATURE_BOUNDS``: it softens, never sharpens), then the head is refit on
    all labels. ``prototype_n0 > 0`` adds the nearest-class-mean component (see
    ``LinearHead``) with ``w_c = n0 / (n0 + n_c)``. ``balance > 0`` adds ``balance`` times
    the class-balanced offsets fit on the same out-of-fold logits
    (``metrics.reports.fit_balanced_bias``): a class with 20 labels beside classes with
    hundreds is predicted as often as its held-out scans say it should be, not only where
    its few examples lie (0 = off, 1 = the full balanced-error correction; it needs the
    out-of-fold step, so nothing changes below ``min_calibration`` labels or with
    ``folds < 2``). ``feature_weights (D,)`` (> 0) multiply the standardised features
    before the fit (they are folded into the head's ``scale``): a block of features weighted
    up is regularised less (``features.block_weights``: the embedding and a pixel thumbnail
    side by side). ``pool_x (M, D)``: the project's unlabeled scans; with ``balance > 0``
    and the out-of-fold step, the offsets are then fit for the project's class shares
    (``project_shares``, EM over the pool from the head with the class-balanced offsets;
    ``info["shares"]``) instead of equal shares, so a class is predicted as often as the
    project holds it (a rare finding stays rare, a new class whose unlabeled scans are many
    is predicted often). Below ``min_calibration`` labels, or while a class has one label,
    the head is still softened by the labels it can hold out (``_few_label_temperature``:
    ``info["softened_on"]``) but counts as not calibrated. Returns the head and fit details.
    """
    if not 0.0 <= balance <= 1.0:
        raise ValueError("balance must be within [0, 1]")
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    class_ids, y = np.unique(labels, return_inverse=True)
    if len(class_ids) < 2:
        raise ValueError("a head needs labels of at least 2 classes")
    if len(x) != len(y):
        raise ValueError("one label per embedding")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-8] = 1.0
    if feature_weights is not None:
        feature_weights = np.asarray(feature_weights, dtype=np.float64)
        if feature_weights.shape != scale.shape or not (feature_weights > 0).all():
            raise ValueError(f"feature_weights: {scale.shape[0]} positive weights needed")
        scale = scale / feature_weights

    def build(rows: np.ndarray) -> LinearHead:
        standardised = (x[rows] - mean) / scale
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000,
                                   random_state=seed).fit(standardised, y[rows])
        coef, intercept = model.coef_, model.intercept_
        if coef.shape[0] == 1:  # binary: expand to two symmetric logits
            coef = np.concatenate([-coef / 2, coef / 2])
            intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
        head = LinearHead(coef=coef, intercept=intercept, mean=mean, scale=scale,
                          temperature=1.0, class_ids=class_ids)
        if prototype_n0 > 0:
            unit = _unit(standardised)
            counts = np.bincount(y[rows], minlength=len(class_ids)).astype(np.float64)
            sums = np.zeros((len(class_ids), x.shape[1]))
            np.add.at(sums, y[rows], unit)
            head.prototypes = _unit(sums)
            head.blend = prototype_n0 / (prototype_n0 + counts)
        return head

    counts = np.bincount(y)
    temperature, calibrated_on, bias, oof_nll, shares = 1.0, 0, None, None, None
    full = None                      # the head on every label, once it is fit
    softened_on = 0
    k = min(folds, int(counts.min()))
    if len(y) >= min_calibration and k >= 2:
        out_of_fold = np.zeros((len(y), len(class_ids)))
        for fit_rows, cal_rows in StratifiedKFold(k, shuffle=True, random_state=seed).split(x, y):
            out_of_fold[cal_rows] = build(fit_rows).raw_logits(x[cal_rows])
        if balance > 0:
            # offsets in raw-logit units; the temperature below is fit on the corrected logits
            bias = fit_balanced_bias(out_of_fold, y)
            if pool_x is not None:
                # the project's class shares (EM over the pool, from the head with the
                # equal-shares offsets), then offsets fit for those shares
                full = build(np.arange(len(y)))
                equal = replace(full, bias=bias, temperature=posterior_temperature(
                    out_of_fold + bias[None, :], y, bounds=TEMPERATURE_BOUNDS))
                shares, _ = project_shares(equal, y, pool_x)
                bias = fit_balanced_bias(out_of_fold, y, shares=shares)
            bias = balance * bias
            out_of_fold = out_of_fold + bias[None, :]
        temperature = posterior_temperature(out_of_fold, y, bounds=TEMPERATURE_BOUNDS)
        calibrated_on = len(y)
        oof_nll = negative_log_likelihood(out_of_fold, y, temperature)
    elif folds >= 2:
        temperature, softened_on = _few_label_temperature(build, x, y, folds=folds, seed=seed)
    head = full if full is not None else build(np.arange(len(y)))
    head.temperature = float(temperature)
    head.bias = bias
    return head, {"num_labels": int(len(y)), "temperature": float(temperature),
                  "calibrated_on": calibrated_on, "softened_on": softened_on,
                  "classes": class_ids.tolist(),
                  "prototype_n0": float(prototype_n0), "balance": float(balance),
                  "bias": None if bias is None else [float(b) for b in bias],
                  "shares": None if shares is None else [float(v) for v in shares],
                  "out_of_fold_nll": oof_nll}


def project_shares(head: LinearHead, y: np.ndarray, pool_x: np.ndarray, *,
                   max_iter: int = 200, tol: float = 1e-6, floor: float = 1e-3
                   ) -> tuple[np.ndarray, dict]:
    """The project's class shares ``(C,)``: the labeled scans' counts (``y``: column indices
    of ``head``) plus the unlabeled ``pool_x`` scans' expected ones, the pool's own shares
    found by EM (Saerens, Latinne & Decaestecker, Neural Computation 2002) over the pool
    alone (the labeled scans were chosen, not drawn).

    ``head`` must be calibrated for equal class shares (``fit_head(balance=1)``: offsets and
    temperature fit on out-of-fold logits under the class-balanced NLL — bias-corrected
    temperature scaling, which Alexandari et al., ICML 2020, found EM needs). Each pool
    scan's posterior under shares ``q`` is ``p(c | x) * q_c`` renormalised, and ``q`` is
    their mean, iterated to a fixed point. A class with 20 labels whose unlabeled scans are
    a quarter of the project gets about a quarter, not the 1 % its labels say. Floored at
    ``floor`` and renormalised; with no pool, the labels' shares. Returns the shares and
    ``{"shares", "iterations", "pool"}``."""
    c = len(head.class_ids)
    y = np.asarray(y, dtype=np.int64).reshape(-1)
    labeled = np.bincount(y, minlength=c).astype(np.float64)
    pool_x = np.asarray(pool_x, dtype=np.float64)
    if pool_x.size == 0:
        pool_x = pool_x.reshape(0, head.mean.shape[0])
    if pool_x.ndim != 2 or pool_x.shape[1] != head.mean.shape[0]:
        raise ValueError(f"pool_x must be (M, {head.mean.shape[0]}), not {pool_x.shape}")
    total = len(y) + len(pool_x)
    if total == 0:
        raise ValueError("no scans to estimate the class shares from")
    pool_shares, iterations = np.full(c, 1.0 / c), 0
    if len(pool_x):
        base = head.predict_proba(pool_x, calibrated=True).astype(np.float64)
        for iterations in range(1, max_iter + 1):
            weighted = base * pool_shares[None, :]
            weighted /= np.maximum(weighted.sum(axis=1, keepdims=True), 1e-300)
            new = weighted.mean(axis=0)
            done = np.abs(new - pool_shares).max() < tol
            pool_shares = new
            if done:
                break
    shares = (labeled + len(pool_x) * pool_shares) / total
    shares = np.maximum(shares, floor)
    shares /= shares.sum()
    return shares, {"shares": [float(v) for v in shares], "iterations": int(iterations),
                    "pool": int(len(pool_x))}


def _few_label_temperature(build, x: np.ndarray, y: np.ndarray, *, folds: int, seed: int
                           ) -> tuple[float, int]:
    """The softening a head on too few labels for the out-of-fold calibration still gets:
    below ``min_calibration`` labels, or while a class has a single label.

    The labels of every class with at least two are held out in turn — one at a time below
    ``FEW_LABELS_LEAVE_ONE_OUT`` of them, else in stratified folds — from a head fit on all
    the others (a class with one label stays in every fit, so each fit knows every class);
    the posterior mean temperature given their held-out logits (``posterior_temperature``
    over ``TEMPERATURE_BOUNDS``) softens the head: a few labels rule out little, so it
    softens even when they are all right. A singleton class cannot be held out, and a
    handful of labels calibrate little: the head still counts as not calibrated
    (``calibrated_on = 0``) and gets no balance offsets or out-of-fold log-loss. Returns
    ``(temperature, labels held out)``; with no class of two labels, the prior's centre."""
    counts = np.bincount(y)
    eligible = np.flatnonzero(counts[y] >= 2)
    if len(eligible) < 2:       # nothing to hold out: the prior's centre
        return posterior_temperature(np.zeros((0, len(counts))), [],
                                     bounds=TEMPERATURE_BOUNDS), 0
    if len(eligible) <= FEW_LABELS_LEAVE_ONE_OUT:
        splits = [eligible[[i]] for i in range(len(eligible))]
    else:
        k = max(2, min(folds, int(counts[counts >= 2].min())))
        splitter = StratifiedKFold(k, shuffle=True, random_state=seed)
        splits = [eligible[held] for _, held in splitter.split(x[eligible], y[eligible])]
    out_of_fold = np.zeros((len(eligible), len(counts)))
    position = {int(r): i for i, r in enumerate(eligible)}
    for held in splits:
        rows = np.setdiff1d(np.arange(len(y)), held)
        out_of_fold[[position[int(r)] for r in held]] = build(rows).raw_logits(x[held])
    temperature = posterior_temperature(out_of_fold, y[eligible], bounds=TEMPERATURE_BOUNDS)
    return temperature, int(len(eligible))


def _pad(head: LinearHead, extra: int) -> LinearHead:
    """``head`` reading ``extra`` more features it ignores (zero weights, standardised to
    ~0), so heads with and without a pixel block read the same inputs."""
    if not extra:
        return head
    head.coef = np.concatenate([head.coef, np.zeros((head.coef.shape[0], extra))], axis=1)
    head.mean = np.concatenate([head.mean, np.zeros(extra)])
    head.scale = np.concatenate([head.scale, np.full(extra, IGNORED_SCALE)])
    if head.prototypes is not None:
        head.prototypes = np.concatenate(
            [head.prototypes, np.zeros((head.prototypes.shape[0], extra))], axis=1)
    return head


@one_blas_thread
def fit_head_choosing_block(x: np.ndarray, labels: np.ndarray, *, embedding_dim: int,
                            feature_weights: np.ndarray, always: bool = False, **options
                            ) -> tuple[LinearHead, dict]:
    """``fit_head`` twice — on the embedding (``x[:, :embedding_dim]``) alone and on all of
    ``x`` with ``feature_weights`` (the embedding and a pixel block) — and keep the one whose
    out-of-fold predictions of these labels have the lower negative log-likelihood at their
    fitted temperature. The embedding alone is kept while there are too few labels to
    calibrate out of fold (nothing says the pixels help yet). The head returned always
    reads all of ``x`` (without the block, it ignores it). ``info["pixels"]`` says which
    was kept, ``info["out_of_fold_nll_alone"]`` / ``["out_of_fold_nll_pixels"]`` why.
    ``always``: no choice, the block is kept (one fit)."""
    x = np.asarray(x, dtype=np.float64)
    pool_x = options.pop("pool_x", None)
    if always:
        head, info = fit_head(x, labels, feature_weights=feature_weights, pool_x=pool_x,
                              **options)
        return head, {**info, "pixels": True, "out_of_fold_nll_alone": None,
                      "out_of_fold_nll_pixels": info["out_of_fold_nll"]}
    alone, info = fit_head(x[:, :embedding_dim], labels, **options,
                           pool_x=None if pool_x is None else np.asarray(pool_x)[:, :embedding_dim])
    both, both_info = fit_head(x, labels, feature_weights=feature_weights, pool_x=pool_x,
                               **options)
    nll_alone, nll_both = info["out_of_fold_nll"], both_info["out_of_fold_nll"]
    use = nll_alone is not None and nll_both is not None and nll_both < nll_alone - 1e-6
    head, chosen = (both, both_info) if use else (_pad(alone, x.shape[1] - embedding_dim), info)
    return head, {**chosen, "pixels": bool(use), "out_of_fold_nll_alone": nll_alone,
                  "out_of_fold_nll_pixels": nll_both}


@dataclass
class SetHeads:
    """One head per label set on the same embeddings: each scan is scored by the head of its
    own set, so a chest film is never given a brain class. ``predict_proba`` returns an
    ``(N, len(class_ids))`` matrix whose row holds probabilities over the scan's set's
    classes and zeros elsewhere (all zeros when its set has no head yet)."""

    heads: dict[int, LinearHead]   # label set id → head
    class_ids: list[int]           # column order of the full matrix

    def predict_proba(self, x: np.ndarray, set_ids, *, calibrated: bool = True) -> np.ndarray:
        set_ids = np.asarray(set_ids)
        out = np.zeros((len(set_ids), len(self.class_ids)), dtype=np.float32)
        column = {c: i for i, c in enumerate(self.class_ids)}
        for set_id, head in self.heads.items():
            rows = np.flatnonzero(set_ids == set_id)
            if not len(rows):
                continue
            cols = [column[int(c)] for c in head.class_ids]
            out[np.ix_(rows, cols)] = head.predict_proba(np.asarray(x)[rows],
                                                         calibrated=calibrated)
        return out


def restrict_to_sets(proba: np.ndarray, class_ids: list[int], allowed: list[set[int]]) -> np.ndarray:
    """Zero every column whose class is not allowed for that row and renormalise (a joint
    softmax network scoring scans of several label sets). Rows with no allowed column are 0."""
    proba = np.asarray(proba, dtype=np.float32)
    mask = np.array([[c in row for c in class_ids] for row in allowed], dtype=np.float32)
    out = proba * mask
    total = out.sum(axis=1, keepdims=True)
    return np.divide(out, total, out=np.zeros_like(out), where=total > 0)
