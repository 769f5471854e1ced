"""Active-learning query strategies: plain functions in a name → function registry.

Each strategy takes a ``QueryContext`` (class probabilities and/or SSL embeddings of the
candidate scans) and ``n``, and returns a ``Selection``: candidate indices in rank order, a
score each, and a reason each (what a clinician is told about *why this scan*).

- ``least_confident`` / ``margin`` / ``entropy``: modAL's uncertainty sampling
  (Settles, 2009), called on the stored probabilities through a tiny estimator adapter.
- ``diversity``: k-means over embeddings, the most typical scan of each cluster.
- ``coreset``: greedy k-centre over embeddings, away from what is labeled (Sener & Savarese 2018).
- ``cold_start``: for zero labels; typical picks per cluster, so the first batch covers the
  data's modes (Hacohen et al., 2022, "TypiClust").
- ``hybrid`` (default): uncertainty within diversity — the most uncertain candidates (by
  margin: 1 − (p1 − p2)) are clustered and the most uncertain scan of each cluster is taken;
  once classes are known the batch is balanced across predicted classes.
- ``random``: the baseline.

Scans of one patient are not crowded into a batch: ``select`` skips a candidate whose
``groups`` value (the pseudonymous patient key) already has ``max_per_group`` picks.
Pure numpy / modAL / faiss: no Django.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from itertools import zip_longest

import numpy as np
from modAL.uncertainty import (
    classifier_entropy,
    classifier_margin,
    classifier_uncertainty,
    entropy_sampling,
    margin_sampling,
    uncertainty_sampling,
)

from ml_backend.active.features import cluster_inputs
from ml_backend.index.faiss_index import kmeans


@dataclass
class QueryContext:
    """What a strategy may look at, for ``N`` candidate scans.

    proba: ``(N, C)`` predicted class probabilities (None before any model exists);
    embeddings: ``(N, D)`` float32 SSL embeddings; labeled_embeddings: ``(L, D)`` of labeled
    scans (coreset); groups: ``(N,)`` patient keys ("" = unknown); class_names: ``C`` names.
    thumbs / labeled_thumbs: ``(N, P)`` / ``(L, P)`` pixel thumbnails of the candidates and
    the labeled scans; with ``typical_pixel_weight`` > 0 the typical picks (``cold_start``)
    cluster them beside the embeddings, as the cluster view does (``features.cluster_inputs``).
    """

    proba: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    labeled_embeddings: np.ndarray | None = None
    groups: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)
    seed: int = 0
    max_per_group: int = 1
    # hybrid: typical picks (TypiClust) while fewer than this many labeled scans per class
    # are known; uncertainty after (0: uncertainty as soon as a model exists)
    typical_below: int = 0
    thumbs: np.ndarray | None = None
    labeled_thumbs: np.ndarray | None = None
    typical_pixel_weight: float = 0.0

    def __post_init__(self):
        sizes = {len(a) for a in (self.proba, self.embeddings, self.groups, self.thumbs)
                 if a is not None}
        if len(sizes) > 1:
            raise ValueError("proba, embeddings, groups and thumbs must describe the same "
                             "candidates")
        if (self.labeled_embeddings is not None and self.labeled_thumbs is not None
                and len(self.labeled_thumbs) != len(self.labeled_embeddings)):
            raise ValueError("labeled_thumbs must describe the labeled scans")

    @property
    def size(self) -> int:
        for array in (self.proba, self.embeddings, self.groups):
            if array is not None:
                return len(array)
        return 0


@dataclass
class Selection:
    indices: np.ndarray
    scores: np.ndarray
    reasons: list[dict]


# The product's hybrid: typical picks while a label set has fewer labeled scans than this per
# class (settings.QUERY_TYPICAL_BELOW; measured in docs/benchmarks.md, "A label set's first labels").
PRODUCT_TYPICAL_BELOW = 10

Strategy = Callable[[QueryContext, int], Selection]
STRATEGIES: dict[str, Strategy] = {}


def register(name: str):
    def wrap(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        return fn
    return wrap


def query(name: str, context: QueryContext, n: int) -> Selection:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(sorted(STRATEGIES))}")
    if n < 1:
        raise ValueError("n must be at least 1")
    if context.size == 0:
        return Selection(np.zeros(0, np.int64), np.zeros(0), [])
    return STRATEGIES[name](context, min(n, context.size))


# --- helpers ---------------------------------------------------------------------------


class _Probabilities:
    """A stand-in estimator for modAL: ``X`` holds candidate indices into stored proba."""

    def __init__(self, proba: np.ndarray):
        self.proba = proba

    def predict_proba(self, X, **kwargs):
        return self.proba[np.asarray(X, dtype=np.int64).ravel()]


def _need(context: QueryContext, what: str) -> np.ndarray:
    value = getattr(context, what)
    if value is None:
        raise ValueError(f"this strategy needs {what}")
    return value


def uncertainty_details(proba: np.ndarray) -> dict[str, np.ndarray]:
    """Per-candidate least-confidence, margin and entropy (modAL's definitions).

    Entropy is divided by the log of the number of classes the row spreads over (its
    non-zero columns): in a project with label sets a 4-class brain MRI and a 2-class chest
    film are then equally uncertain at 1.0, and neither anatomy crowds the other out of the
    worklist. With one label set this is a constant factor and changes no ranking."""
    estimator, X = _Probabilities(proba), np.arange(len(proba))[:, None]
    classes = np.maximum((np.asarray(proba) > 0).sum(axis=1), 2)
    return {"uncertainty": classifier_uncertainty(estimator, X),
            "margin": classifier_margin(estimator, X),
            "entropy": classifier_entropy(estimator, X) / np.log(classes)}


def select(order: np.ndarray, scores: np.ndarray, reasons, context: QueryContext,
           n: int) -> Selection:
    """Take candidates in ``order`` until ``n``, at most ``max_per_group`` per patient.
    ``reasons``: a list, or a function of a candidate's index (only the chosen few are asked:
    a pool holds 100,000s of candidates)."""
    taken, per_group = [], {}
    groups = context.groups
    for index in order:
        index = int(index)
        if groups is not None and groups[index]:
            count = per_group.get(groups[index], 0)
            if count >= context.max_per_group:
                continue
            per_group[groups[index]] = count + 1
        taken.append(index)
        if len(taken) == n:
            break
    if len(taken) < n:  # not enough distinct patients: fill in rank order
        done = set(taken)
        rest = [int(i) for i in order if int(i) not in done]
        taken += rest[: n - len(taken)]
    chosen = np.array(taken, dtype=np.int64)
    why = reasons if callable(reasons) else reasons.__getitem__
    return Selection(chosen, np.asarray(scores)[chosen], [why(int(i)) for i in chosen])


def _prediction_reason(proba: np.ndarray, index: int, details: dict, names: list[str]) -> dict:
    # one stable order, so a tie (0.5 / 0.5) names two different classes, not one twice
    order = np.argsort(-np.asarray(proba[index]), kind="stable")
    best = int(order[0])
    reason = {key: round(float(values[index]), 4) for key, values in details.items()}
    reason["confidence"] = round(float(proba[index, best]), 4)
    reason["predicted"] = names[best] if best < len(names) else best
    if proba.shape[1] > 1:            # the class it hesitates with, for plain words
        second = int(order[1])
        reason["runner_up"] = names[second] if second < len(names) else second
        reason["runner_up_p"] = round(float(proba[index, second]), 4)
    return reason


# --- uncertainty (modAL) ---------------------------------------------------------------


_WHY = {"uncertainty": "least confident prediction", "margin": "smallest margin between the "
        "top two classes", "entropy": "highest entropy over classes"}


def _modal(sampler, measure: str):
    def strategy(context: QueryContext, n: int) -> Selection:
        proba = _need(context, "proba")
        details = uncertainty_details(proba)
        X = np.arange(len(proba))[:, None]
        # modAL ranks; we ask for more than n so the patient rule can skip some.
        wanted = min(len(proba), n * 4 if context.groups is not None else n)
        ranked = np.asarray(sampler(_Probabilities(proba), X, n_instances=wanted)).ravel()
        scores = details[measure] if measure != "margin" else -details["margin"]
        first = set(ranked.tolist())
        order = list(ranked) + [i for i in np.argsort(-scores, kind="stable") if i not in first]
        return select(np.array(order), scores, lambda i: dict(
            _prediction_reason(proba, i, details, context.class_names), why=_WHY[measure]),
            context, n)
    return strategy


register("least_confident")(_modal(uncertainty_sampling, "uncertainty"))
register("margin")(_modal(margin_sampling, "margin"))
register("entropy")(_modal(entropy_sampling, "entropy"))


@register("random")
def random_strategy(context: QueryContext, n: int) -> Selection:
    order = np.random.default_rng(context.seed).permutation(context.size)
    return select(order, np.zeros(context.size), lambda i: {"why": "random"}, context, n)


# --- diversity -------------------------------------------------------------------------


def _typical_per_cluster(embeddings: np.ndarray, k: int, seed: int):
    """k-means; per cluster the member nearest its centroid, biggest clusters first."""
    centroids, assignments, distances = kmeans(embeddings.astype(np.float32), k, seed=seed, nredo=5)
    sizes = np.bincount(assignments, minlength=k)
    winners = []
    for cluster in np.argsort(-sizes, kind="stable"):
        members = np.flatnonzero(assignments == cluster)
        if len(members):
            winners.extend(members[np.argsort(distances[members], kind="stable")].tolist())
    return assignments, distances, sizes, winners


def _covered_clusters(embeddings: np.ndarray, assignments: np.ndarray,
                      labeled: np.ndarray | None, k: int) -> tuple[np.ndarray, int]:
    """Per cluster, whether a labeled scan lies inside it (no farther from its centroid than
    its own farthest member), and how many labeled scans lie inside one. Labeled scans of
    another anatomy lie far outside every cluster of these candidates and cover none."""
    covered = np.zeros(k, dtype=bool)
    if labeled is None or not len(labeled):
        return covered, 0
    x = embeddings.astype(np.float64)
    centroids = np.stack([x[assignments == c].mean(axis=0) if (assignments == c).any()
                          else np.full(x.shape[1], np.inf) for c in range(k)])
    radius = np.array([((x[assignments == c] - centroids[c]) ** 2).sum(axis=1).max()
                       if (assignments == c).any() else -1.0 for c in range(k)])
    present = np.isfinite(centroids).all(axis=1)
    centroids = np.where(present[:, None], centroids, 0.0)
    lab = np.asarray(labeled, dtype=np.float64)
    d2 = ((lab ** 2).sum(axis=1)[:, None] - 2.0 * lab @ centroids.T
          + (centroids ** 2).sum(axis=1)[None, :])
    d2[:, ~present] = np.inf
    nearest = d2.argmin(axis=1)
    inside = d2[np.arange(len(lab)), nearest] <= radius[nearest] + 1e-9
    covered[nearest[inside]] = True
    return covered, int(inside.sum())


def _typical_inputs(context: QueryContext) -> tuple[np.ndarray, np.ndarray | None]:
    """What the typical picks cluster, for the candidates and the labeled scans: the
    embeddings, or (``typical_pixel_weight`` > 0 and thumbnails for every row) the embedding
    and the thumbnail side by side, standardised over the candidates and labeled scans
    together (``features.cluster_inputs``, what the cluster view clusters). On brain MRI the
    first 10-30 labels picked so teach the head more (docs/benchmarks.md, "Typical picks on
    the embedding and the pixels")."""
    embeddings, labeled = _need(context, "embeddings"), context.labeled_embeddings
    weight = float(context.typical_pixel_weight or 0.0)
    if (weight <= 0 or context.thumbs is None
            or (labeled is not None and context.labeled_thumbs is None)):
        return embeddings, labeled
    rows = embeddings if labeled is None else np.concatenate([embeddings, labeled])
    thumbs = (context.thumbs if labeled is None
              else np.concatenate([context.thumbs, context.labeled_thumbs]))
    joined = cluster_inputs(rows, thumbs, weight)
    return joined[:len(embeddings)], (None if labeled is None else joined[len(embeddings):])


@register("diversity")
@register("cold_start")
def cold_start(context: QueryContext, n: int) -> Selection:
    """Typical scans of ``n`` clusters (TypiClust-style), so a first batch covers every mode.

    Clusters that already hold a labeled scan come last (TypiClust picks from the clusters
    the labeled set does not cover): before a label set has a model, e.g. when its first
    labels were all one class, the next picks go to the modes nobody has labeled yet,
    where the other classes are, instead of again to the mode already seen."""
    embeddings, labeled = _typical_inputs(context)
    k = min(n, len(embeddings))
    assignments, distances, sizes, _ = _typical_per_cluster(embeddings, k, context.seed)
    covered, inside = _covered_clusters(embeddings, assignments, labeled, k)
    if inside and k < len(embeddings):
        # as TypiClust: n + |labeled| clusters, so the labeled modes do not swallow the
        # budget's (only the labeled scans among these candidates count)
        k = min(n + inside, len(embeddings))
        assignments, distances, sizes, _ = _typical_per_cluster(embeddings, k, context.seed)
        covered, _ = _covered_clusters(embeddings, assignments, labeled, k)
    typicality = 1.0 / (1.0 + distances)
    # Round-robin over clusters (uncovered first, largest first): each cluster's most
    # typical member first.
    ranked = sorted(range(k), key=lambda c: (bool(covered[c]), -int(sizes[c]), c))
    by_cluster = [list(np.flatnonzero(assignments == c)[np.argsort(distances[assignments == c])])
                  for c in ranked]
    order = [i for rank in zip_longest(*by_cluster) for i in rank if i is not None]
    return select(np.array(order), typicality, lambda i: {
        "why": "typical of its cluster", "cluster": int(assignments[i]),
        "cluster_size": int(sizes[assignments[i]]),
        "labeled_in_cluster": bool(covered[assignments[i]]),
        "typicality": round(float(typicality[i]), 4)}, context, n)


def _no_model_here(proba: np.ndarray | None) -> bool:
    """No probabilities, or the same for every class on every row: the scans' label set has
    no head yet (``services.queries`` gives such scans a uniform row)."""
    return proba is None or not len(proba) or bool(np.all(np.ptp(proba, axis=1) < 1e-9))


@register("coreset")
def coreset(context: QueryContext, n: int) -> Selection:
    """Greedy k-centre: repeatedly the candidate farthest from everything labeled or chosen."""
    embeddings = _unit(_need(context, "embeddings"))
    labeled = context.labeled_embeddings
    if labeled is not None and len(labeled):
        nearest = (1.0 - _unit(labeled) @ embeddings.T).min(axis=0)
    else:
        nearest = np.full(len(embeddings), np.inf)
        nearest[0] = -1.0  # start anywhere deterministic
    order, distance_at_pick = [], np.zeros(len(embeddings))
    available = np.ones(len(embeddings), dtype=bool)
    for _ in range(min(len(embeddings), n * 4 if context.groups is not None else n)):
        masked = np.where(available, nearest, -np.inf)
        pick = int(np.argmax(masked)) if np.isfinite(masked).any() else int(np.flatnonzero(available)[0])
        order.append(pick)
        distance_at_pick[pick] = 0.0 if not np.isfinite(nearest[pick]) else nearest[pick]
        available[pick] = False
        nearest = np.minimum(nearest, 1.0 - embeddings @ embeddings[pick])
    order += [i for i in range(len(embeddings)) if available[i]]
    return select(np.array(order), distance_at_pick, lambda i: {
        "why": "far from labeled scans",
        "distance_to_labeled": round(float(distance_at_pick[i]), 4)}, context, n)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# --- hybrid ----------------------------------------------------------------------------


@register("hybrid")
def hybrid(context: QueryContext, n: int, *, pool_factor: int = 10) -> Selection:
    """Uncertainty within diversity, class-balanced once a model exists; cold start before.

    Uncertainty is the margin's, ``1 - (p1 - p2)``, not the entropy: with more than two
    classes entropy favours scans spread thinly over every class (often unlike anything the
    head could learn from), margin the scans between the two classes the head confuses. On
    brain MRI (4 classes, starter embeddings, ``bench.al_sim``, 3 seeds) that took hybrid from
    0.725 to 0.763 macro-F1 at 200 labels (random 0.713, plain margin 0.752); with two
    classes both rank scans alike. Margin lies in [0, 1] whatever the number of classes, so
    label sets of different sizes compete fairly in one worklist.

    While fewer than ``context.typical_below`` scans per class are labeled (10 in the
    product), it picks typical scans of the clusters no labeled scan covers instead
    (``cold_start``): on the starter's embeddings (``bench.al_sim``, 6 seeds) that ends
    above uncertainty alone at 200 labels on chest X-ray (macro-F1 0.953 against 0.946) and
    brain MRI (0.798 against 0.789), and is never more than 0.005 below it on the way;
    docs/benchmarks.md, "A label set's first labels"."""
    if context.proba is None:
        return cold_start(context, n)
    headless = _no_model_here(context.proba)   # uniform rows: this set has no head yet
    if context.typical_below and context.embeddings is not None and not headless:
        # with a handful of labels per class a head's uncertainty is mostly noise, and typical
        # scans teach more (Hacohen et al., ICML 2022: TypiClust in the low-budget regime)
        labeled = 0 if context.labeled_embeddings is None else len(context.labeled_embeddings)
        classes = int(max(2, (np.asarray(context.proba) > 0).sum(axis=1).max()))
        if labeled < context.typical_below * classes:
            return cold_start(context, n)
    if context.embeddings is None:
        return STRATEGIES["margin"](context, n)
    proba, embeddings = context.proba, context.embeddings
    details = uncertainty_details(proba)
    unsure = 1.0 - details["margin"]
    if headless:
        # every row alike: a seeded random sample to diversify, never the candidates' first
        # rows (import order can be class order). A cold start on the clusters no labeled
        # scan covers did worse here on chest films (docs/benchmarks.md, "A label set's first labels")
        order = np.random.default_rng(context.seed).permutation(len(proba))
    else:
        order = np.argsort(-unsure, kind="stable")
    candidates = order[: min(len(proba), pool_factor * n)]
    k = min(n, len(candidates))
    centroids, assignments, _ = kmeans(embeddings[candidates].astype(np.float32), k, nredo=5,
                                       seed=context.seed)
    winners = []
    for cluster in range(k):
        members = candidates[assignments == cluster]
        if len(members):
            winners.append(int(members[np.argmax(unsure[members])]))
    winners.sort(key=lambda i: -unsure[i])
    if not headless:
        winners = _balance_classes(winners, candidates, proba, unsure)
    cluster_of = {int(c): int(a) for c, a in zip(candidates, assignments)}
    picked = set(winners)
    rest = [int(i) for i in order if int(i) not in picked]

    def reason(i: int) -> dict:
        if headless:
            return {"why": "no model for its label set yet: unlike the other picks",
                    **({"cluster": cluster_of[i]} if i in cluster_of else {})}
        out = _prediction_reason(proba, i, details, context.class_names)
        out["why"] = "uncertain, and unlike the other picks"
        if i in cluster_of:
            out["cluster"] = cluster_of[i]
        return out

    return select(np.array(winners + rest), unsure, reason, context, n)


def _balance_classes(winners: list[int], candidates: np.ndarray, proba: np.ndarray,
                     unsure: np.ndarray) -> list[int]:
    """Give every predicted class among the candidates at least one pick when possible."""
    predicted = proba.argmax(axis=1)
    present = set(predicted[winners].tolist())
    for cls in sorted(set(predicted[candidates].tolist()) - present):
        counts = np.bincount(predicted[winners], minlength=proba.shape[1])
        donors = [w for w in winners if counts[predicted[w]] > 1]
        if not donors:
            break
        weakest = min(donors, key=lambda w: unsure[w])
        options = [int(c) for c in candidates if predicted[c] == cls and int(c) not in winners]
        if options:
            winners[winners.index(weakest)] = max(options, key=lambda c: unsure[c])
    return sorted(winners, key=lambda i: -unsure[i])
