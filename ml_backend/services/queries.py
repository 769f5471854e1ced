"""What to label next: query rounds (a strategy run per label set) and the label-quality
check (likely label errors, queued for re-review)."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
from django.conf import settings
from django.db import transaction
from django.db.models import Count

from annotator.models import Annotation, LabelClass, Project, Scan
from annotator.selectors import class_label_sets, training_labels
from ml_backend.errors import ModelUnavailable, TrainingError
from ml_backend.models import Prediction, QueryItem, QueryRound
from ml_backend.services.artifacts import embeddings_paths
from ml_backend.services.inference import (
    classifier_classes,
    embedding_table,
    scan_refs,
    vector_index,
    vectors_for,
)

logger = logging.getLogger(__name__)


# What each strategy needs to rank scans (the CLI lists it; ``_lacks`` reads it): the
# typical picks and coreset cluster the embeddings; hybrid takes a model's uncertainty, or
# typical picks before there is a model; the uncertainty strategies need a model.
STRATEGY_NEEDS = {"random": "nothing", "cold_start": "embeddings", "diversity": "embeddings",
                  "coreset": "embeddings", "hybrid": "embeddings or a model",
                  "least_confident": "a model", "margin": "a model", "entropy": "a model"}


def strategy_needs_words() -> str:
    """``STRATEGY_NEEDS`` in one line: "random: nothing; cold_start, diversity, coreset:
    embeddings; …"."""
    by_need: dict[str, list[str]] = {}
    for name, need in STRATEGY_NEEDS.items():
        by_need.setdefault(need, []).append(name)
    return "; ".join(f"{', '.join(names)}: {need}" for need, names in by_need.items())


def _lacks(strategy: str, context) -> bool:
    """Whether ``strategy`` cannot rank these candidates for want of embeddings (what a
    project without an encoder, or not embedded yet, lacks). A missing model is not this:
    an uncertainty strategy asked for before any model is refused, in words."""
    if context.embeddings is not None or STRATEGY_NEEDS.get(strategy) not in (
            "embeddings", "embeddings or a model"):
        return False
    return strategy != "hybrid" or context.proba is None


def _pool_candidates(project: Project) -> tuple[list, set[int]]:
    """The scans a round may choose from (unlabeled pool scans, not quarantined, in a label
    set with classes, or any set while the project has no class), as ``scan_refs``, and the
    ids of the scans labeled so far."""
    labeled_ids = set(Annotation.objects.filter(
        project=project, outcome__in=[Annotation.Outcome.LABEL,
                                            Annotation.Outcome.FINDINGS])
        .order_by().values_list("scan_id", flat=True))
    # the pool can hold 100,000s of scans: only the columns a strategy reads, no models
    candidates = [ref for ref in scan_refs(Scan.objects.filter(
        project=project, split="pool", quarantined=False).order_by("pk"))
        if ref.pk not in labeled_ids]
    # a scan can only be labeled with its label set's classes: none, nothing to ask
    sets_with_classes = set(LabelClass.objects.filter(project=project)
                            .values_list("label_set_id", flat=True))
    candidates = [s for s in candidates if s.label_set_id is not None and (
        s.label_set_id in sets_with_classes or not sets_with_classes)]
    return candidates, labeled_ids


def _nothing_to_query(project: Project, labeled_ids: set[int]) -> str:
    """Why a project has no scan a round could choose (``_pool_candidates`` found none), in
    words with what to do."""
    pool = Scan.objects.filter(project=project, split="pool", quarantined=False)
    total = pool.count()
    if not total:
        others = Scan.objects.filter(project=project).exclude(split="pool").count()
        return ("the project has no pool scans to choose from"
                + (f" (its {others} other scan{'s' if others != 1 else ''} are eval scans, "
                   "which measure the models and are never queried)" if others else "")
                + ": import pool scans first (`manage.py import_scans … --split pool`)")
    unlabeled = pool.exclude(pk__in=labeled_ids)
    left = unlabeled.count()
    if not left:
        return f"every pool scan ({total}) is labeled: import more scans to go on"
    no_set = unlabeled.filter(label_set__isnull=True).count()
    parts = []
    if no_set:
        parts.append(f"{no_set} {'have' if no_set != 1 else 'has'} no label set")
    if left - no_set:
        parts.append(f"{left - no_set} {'are' if left - no_set != 1 else 'is'} in a label set "
                     "with no classes: add its classes first")
    return (f"the {left} unlabeled pool scan{'s' if left != 1 else ''} cannot be labeled yet ("
            + "; ".join(parts) + ")")


def query_refusal(project: Project) -> str | None:
    """Why no round of scans to label can be made for ``project`` now — no scan to choose
    (none in the pool, all labeled, none with classes to be labeled with), or the active
    model's files cannot be read — or None. Asked before a round is stored where an empty
    round would only mislead (``query_round_create(refuse_empty=True)``), and by the label
    page to say why it has nothing to serve."""
    candidates, labeled_ids = _pool_candidates(project)
    if not candidates:
        return _nothing_to_query(project, labeled_ids)
    model = Project.objects.select_related("active_model").get(pk=project.pk).active_model
    if model is not None:
        try:
            classifier_classes(model)
        except ModelUnavailable as exc:
            return str(exc)
    return None


def query_round_create(*, project: Project, n: int | None = None, strategy: str | None = None,
                       created_by=None, neighbours: int = 3,
                       refuse_empty: bool = False) -> QueryRound:
    """Choose the next scans to label: unlabeled pool scans only (never eval), ranked by the
    strategy, each with its score and reason (uncertainty, cluster, nearest labeled scans).

    With the project's own strategy (``strategy`` None), scans the strategy cannot rank for
    want of embeddings (no encoder yet, its files missing, not embedded yet) are picked at
    random, as the worklist promises, and each such pick's reason says so (the round's
    ``strategy`` is then ``random``). A strategy named by the caller is refused instead
    (TrainingError). With ``refuse_empty`` a round with no scan to choose is refused with
    ``query_refusal``'s words instead of stored empty."""
    from ml_backend.active.strategies import QueryContext

    project = Project.objects.select_related("active_model", "active_encoder").get(pk=project.pk)
    fallback_allowed = strategy is None
    strategy = strategy or project.query_strategy
    if n is None:
        n = project.query_batch_size
    elif n < 1:                      # 0 is not "the default": a caller asked for nothing
        raise ValueError(f"a query round takes at least one scan (asked for {n})")
    candidates, labeled_ids = _pool_candidates(project)
    if refuse_empty and not candidates:
        raise TrainingError(_nothing_to_query(project, labeled_ids))
    model, encoder = project.active_model, project.active_encoder
    proba, class_names = None, []
    if model is not None:
        entries = classifier_classes(model)    # ModelUnavailable, in words, if unusable
        classes = [c["id"] for c in entries]
        class_names = [str(c.get("name", c["id"])) for c in entries]
        if candidates:
            proba = _candidate_proba(model, classes, candidates)
    embeddings = labeled = labeled_sets = thumbs = labeled_thumbs = None
    if encoder is not None and embeddings_paths(encoder)["ids"].exists():
        try:
            embeddings = vectors_for(encoder, candidates)
            # what the heads learn from: labeled pool scans (eval labels only measure them)
            labeled_scans = list(Scan.objects.filter(pk__in=labeled_ids, split="pool")
                                 .order_by("pk"))
            labeled = vectors_for(encoder, labeled_scans) if labeled_scans else None
            labeled_sets = np.array([s.label_set_id or 0 for s in labeled_scans])
            thumbs, labeled_thumbs = _typical_thumbs(encoder, strategy, candidates,
                                                     labeled_scans)
        except TrainingError:
            embeddings = labeled = labeled_sets = None  # not embedded yet: uncertainty only
            thumbs = labeled_thumbs = None
    context = QueryContext(proba=proba, embeddings=embeddings, labeled_embeddings=labeled,
                           groups=np.array([s.patient_key for s in candidates]),
                           class_names=class_names,
                           typical_below=settings.QUERY_TYPICAL_BELOW,
                           thumbs=thumbs, labeled_thumbs=labeled_thumbs,
                           typical_pixel_weight=float(settings.CLUSTER_PIXEL_WEIGHT),
                           # a new draw each round (reproducible): a fixed seed would draw
                           # the same sample of a headless set round after round
                           seed=len(labeled_ids))
    findings = _findings_contexts(model, candidates)
    no_embeddings = _no_embeddings_words(project, encoder) if embeddings is None else None
    fallback = (f"picked at random: {no_embeddings[0]}, so its {strategy!r} strategy cannot "
                f"rank the scans ({no_embeddings[1]})"
                if fallback_allowed and no_embeddings else None)
    try:
        selection = (_query_per_label_set(strategy, context, n, candidates, findings,
                                          labeled_sets=labeled_sets, fallback=fallback)
                     if candidates else None)
    except ValueError as exc:        # e.g. a strategy that needs embeddings, and none yet
        needs = (f"{no_embeddings[2]}, or use the 'random' strategy until then"
                 if no_embeddings and STRATEGY_NEEDS.get(strategy, "").startswith("embeddings")
                 else "label scans of two classes first so a model exists, or choose a "
                 "strategy that needs none" if proba is None else "choose another strategy")
        raise TrainingError(f"the {strategy!r} strategy cannot choose scans here ({exc}): "
                            f"{needs}") from None
    used = strategy
    if selection is not None and len(selection.indices) and all(
            "fallback_from" in reason for reason in selection.reasons):
        used = "random"             # what chose them; each reason names what was asked
    with transaction.atomic():
        query_round = QueryRound.objects.create(
            project=project, model_version=model, strategy=used, created_by=created_by,
            size=0 if selection is None else len(selection.indices))
        items = []
        if selection is not None:
            chosen = [candidates[int(index)] for index in selection.indices]
            near = (_labeled_neighbours(encoder, chosen, labeled_ids, neighbours)
                    if labeled_ids and encoder is not None and neighbours else {})
            for rank, (scan, score, reason) in enumerate(
                    zip(chosen, selection.scores, selection.reasons), start=1):
                reason = dict(reason)
                if scan.pk in near:
                    reason["neighbours"] = near[scan.pk]
                items.append(QueryItem(query_round=query_round, scan_id=scan.pk, rank=rank,
                                       score=float(score), reason=reason))
        QueryItem.objects.bulk_create(items)
        if query_round.size:
            from ml_backend import signals

            transaction.on_commit(lambda: signals.round_created.send(
                sender=QueryRound, query_round=query_round, project_id=project.pk))
    return query_round


def _no_embeddings_words(project: Project, encoder) -> tuple[str, str, str]:
    """Why the candidates have no embeddings, as ``(cause, what to do in a pick's reason,
    what to do in a refusal)``: no encoder, its files missing, or not embedded yet."""
    from ml_backend.services.runs import encoder_files_refusal

    if encoder is None:
        return ("this project has no encoder yet", "pretrain one for better picks",
                "pretrain an encoder first (`manage.py pretrain`, or the demo's first model)")
    missing = encoder_files_refusal(project)
    if missing:
        return ("the active encoder's files are missing", "restore them from a backup, or "
                "pretrain a new encoder", missing)
    return ("the scans are not embedded yet", "run manage.py embed for better picks",
            "embed the scans first (`manage.py embed`)")


def _candidate_proba(model, classes: list[int], candidates) -> np.ndarray | None:
    """The stored pool probabilities of ``candidates`` over ``classes``, or None when the
    version stored none. A scan the model cannot score yet (its set has no head) is
    maximally uncertain (uniform); a class of the scan's set keeps a non-zero column even
    when its probability rounded to 0 (the strategies count a row's classes by them)."""
    from ml_backend.services.inference import cache
    from ml_backend.services.versions import POOL_PREDICTIONS

    if not classes:                 # a findings-only version: no class probabilities
        return None
    ids = np.array([c.pk for c in candidates], np.int64)
    uniform = np.full(len(classes), 1.0 / len(classes))
    try:      # the array file (written with the rows since issue 21): no JSON to decode
        table = cache.get(model, POOL_PREDICTIONS, lambda path: dict(np.load(path)))
    except ModelUnavailable:
        table = None
    if table is not None and table["proba"].shape[1] == len(classes):
        if not len(table["ids"]):
            return None
        at = np.clip(np.searchsorted(table["ids"], ids), 0, len(table["ids"]) - 1)
        found = table["ids"][at] == ids
        return np.where(found[:, None], table["proba"][at].astype(np.float64), uniform)
    stored = dict(Prediction.objects.filter(model_version=model).order_by()
                  .values_list("scan_id", "probabilities"))
    if not stored:
        return None
    return np.array([[max(stored[s.pk][str(c)], 1e-9) if str(c) in stored[s.pk] else 0.0
                      for c in classes] if s.pk in stored else uniform for s in candidates])


def _findings_contexts(model, candidates: list[Scan]) -> dict[int, dict]:
    """For each findings set among the candidates whose active version has a findings head:
    the per-finding probabilities of its candidates, the finding names and thresholds."""
    from annotator.models import LabelSet
    from ml_backend.services.findings import findings_scorer

    if model is None:
        return {}
    set_ids = np.array([s.label_set_id for s in candidates])
    out = {}
    for label_set in LabelSet.objects.filter(pk__in=set(set_ids.tolist()),
                                             kind=LabelSet.Kind.MULTI):
        scorer = findings_scorer(model, label_set.pk)
        if scorer is None:
            continue
        entry = next(e for e in model.config["findings_sets"] if e["id"] == label_set.pk)
        names = {f["id"]: f["name"] for f in entry["findings"]}
        rows = np.flatnonzero(set_ids == label_set.pk)
        out[label_set.pk] = {"proba": scorer.predict([candidates[i] for i in rows]),
                             "names": [names.get(int(i), str(i)) for i in scorer.finding_ids],
                             "thresholds": scorer.thresholds,
                             # the labelled scans' mean number of findings (None: an older
                             # version; the candidates' predicted mean stands in)
                             "mean_cardinality": getattr(scorer, "mean_cardinality", None)}
    return out


def _query_set(strategy: str, context, n: int, findings: dict | None):
    """One set's pick: a findings set with a head scores its scans over all findings (for the
    uncertainty strategies); everything else runs the strategy as is."""
    from ml_backend.active.findings import FINDINGS_STRATEGY_FOR, query_findings
    from ml_backend.active.strategies import Selection, query

    if findings is not None and strategy in FINDINGS_STRATEGY_FOR:
        indices, scores, reasons = query_findings(
            strategy, findings["proba"], findings["names"], min(n, len(findings["proba"])),
            thresholds=findings["thresholds"], groups=context.groups,
            max_per_group=context.max_per_group,
            mean_cardinality=findings.get("mean_cardinality"))
        return Selection(indices=indices, scores=scores, reasons=reasons)
    return query(strategy, context, n)


def _query_set_or_random(strategy: str, context, n: int, findings: dict | None,
                         fallback: str | None):
    """``_query_set``; or — when the strategy lacks the embeddings it needs (and no findings
    head scores the set instead) and ``fallback`` (the reason's words) is given — a random
    pick, each reason saying why and naming the strategy asked for (``fallback_from``)."""
    from ml_backend.active.findings import FINDINGS_STRATEGY_FOR
    from ml_backend.active.strategies import Selection, query

    scored = findings is not None and strategy in FINDINGS_STRATEGY_FOR
    if fallback is None or scored or not _lacks(strategy, context):
        return _query_set(strategy, context, n, findings)
    picked = query("random", context, n)
    return Selection(indices=picked.indices, scores=picked.scores,
                     reasons=[{**reason, "why": fallback, "fallback_from": strategy}
                              for reason in picked.reasons])


# the strategies that take typical picks (cold_start), and so may read the thumbnails
TYPICAL_STRATEGIES = {"hybrid", "cold_start", "diversity"}


def _typical_thumbs(encoder, strategy: str, candidates: list[Scan], labeled_scans: list[Scan]):
    """The thumbnails the typical picks cluster beside the embeddings, as the cluster view
    does (``settings.CLUSTER_PIXEL_WEIGHT`` > 0, a strategy that takes typical picks, and a
    thumbnail stored for every scan): ``(candidates', labeled scans')``, else ``(None, None)``."""
    if strategy not in TYPICAL_STRATEGIES or not settings.CLUSTER_PIXEL_WEIGHT:
        return None, None
    table = embedding_table(encoder)
    if table.thumbs is None:
        return None, None
    return (table.thumbs_of([s.pk for s in candidates]),
            table.thumbs_of([s.pk for s in labeled_scans]) if labeled_scans else None)


def _query_per_label_set(strategy: str, context, n: int, candidates: list[Scan],
                         findings: dict[int, dict] | None = None, *,
                         labeled_sets: np.ndarray | None = None, fallback: str | None = None):
    """One strategy run per label set, each given a share of the round in proportion to its
    number of classes (at least one pick each), interleaved by rank: with several label sets
    how many labels each anatomy gets is a decision, not a side effect of the score (an easy
    2-class set would otherwise take the round from a hard 4-class one, or the reverse).
    With one set this is exactly ``query(strategy, context, n)``."""
    from dataclasses import replace

    from ml_backend.active.strategies import Selection

    findings = findings or {}
    set_ids = np.array([s.label_set_id for s in candidates])
    present = sorted(set(set_ids.tolist()))

    def own_labeled(set_id, rows=None):
        """The labeled scans of this set only: how many a set has, and which modes they
        cover, is the set's own (another anatomy's labels teach this one's head nothing)."""
        rows = context.labeled_embeddings if rows is None else rows
        if context.labeled_embeddings is None or labeled_sets is None:
            return rows
        mine = rows[labeled_sets == set_id]
        return mine if len(mine) else None

    def own_thumbs(set_id):
        return (None if context.labeled_thumbs is None
                else own_labeled(set_id, context.labeled_thumbs))

    def first_batch(set_id) -> bool:
        """Whether the set has no label yet: its typical picks may read the thumbnails
        (``settings.QUERY_TYPICAL_PIXELS_FIRST_ONLY``; otherwise always)."""
        return (not settings.QUERY_TYPICAL_PIXELS_FIRST_ONLY
                or context.labeled_embeddings is None or own_labeled(set_id) is None)

    if len(present) < 2:
        if present:
            joined = first_batch(present[0])
            context = replace(context, labeled_embeddings=own_labeled(present[0]),
                              labeled_thumbs=own_thumbs(present[0]) if joined else None,
                              thumbs=context.thumbs if joined else None)
        return _query_set_or_random(strategy, context, n,
                                    findings.get(present[0]) if present else None, fallback)
    weight = dict(LabelClass.objects.filter(label_set_id__in=present).values("label_set_id")
                  .annotate(k=Count("pk")).values_list("label_set_id", "k"))
    weights = np.array([max(weight.get(i, 0), 1) for i in present], dtype=float)
    available = np.array([(set_ids == i).sum() for i in present])
    shares = np.minimum(np.maximum(1, np.floor(n * weights / weights.sum())).astype(int),
                        available)
    while shares.sum() < min(n, available.sum()):        # hand out what rounding left
        room = np.flatnonzero(shares < available)
        shares[room[np.argmax(weights[room] / (shares[room] + 1))]] += 1
    picks = []
    for set_id, share in zip(present, shares):
        rows = np.flatnonzero(set_ids == set_id)
        joined = first_batch(set_id)
        sub = replace(context,
                      proba=None if context.proba is None else context.proba[rows],
                      embeddings=None if context.embeddings is None else context.embeddings[rows],
                      groups=None if context.groups is None else context.groups[rows],
                      thumbs=None if context.thumbs is None or not joined
                      else context.thumbs[rows],
                      labeled_embeddings=own_labeled(set_id),
                      labeled_thumbs=own_thumbs(set_id) if joined else None)
        chosen = _query_set_or_random(strategy, sub, int(share), findings.get(set_id),
                                      fallback)
        picks.append([(int(rows[i]), float(score), reason) for i, score, reason in
                      zip(chosen.indices, chosen.scores, chosen.reasons)])
    merged = [pick for position in range(max(map(len, picks)))
              for per_set in picks if position < len(per_set) for pick in [per_set[position]]]
    return Selection(indices=np.array([p[0] for p in merged], dtype=np.int64),
                     scores=np.array([p[1] for p in merged]), reasons=[p[2] for p in merged])


def _labeled_neighbours(encoder, scans: list[Scan], labeled_ids: set[int],
                        k: int) -> dict[int, list[dict]]:
    """For each chosen scan, its ``k`` most similar labeled scans and their labels: one
    search for the whole round and one query for the labels (not one each per scan)."""
    try:
        table = embedding_table(encoder)
        index = vector_index(encoder)
    except TrainingError:
        return {}
    embedded = [s for s in scans if s.pk in table.row]
    labeled = np.array(sorted(i for i in labeled_ids if i in table.row), np.int64)
    if not embedded or not len(labeled):
        return {}
    hits = index.search(table.of([s.pk for s in embedded]), k, allowed_ids=labeled)
    labels: dict[int, str] = {}
    for scan_id, name in (Annotation.objects.filter(
            scan_id__in={i for row in hits for i, _ in row}, outcome=Annotation.Outcome.LABEL)
            .order_by("-created_at").values_list("scan_id", "label_class__name")):
        labels.setdefault(scan_id, name)
    return {scan.pk: [{"scan": i, "label": labels.get(i), "similarity": round(score, 4)}
                      for i, score in row] for scan, row in zip(embedded, hits)}


def label_quality_check(*, project: Project, created_by=None) -> QueryRound:
    """Flag likely label errors among pool labels and queue them for re-review as a round.

    Run per label set, on the classes with at least two labels (a class with fewer cannot be
    cross-validated); ``round.skipped`` lists what was left out and why."""
    from ml_backend.active.quality import find_label_issues, out_of_fold_proba

    encoder = project.active_encoder
    if encoder is None:
        raise TrainingError("no active encoder for this project yet")
    scans, class_ids = training_labels(project, split="pool")
    class_set = class_label_sets(project)
    names = dict(LabelClass.objects.filter(project=project).values_list("pk", "name"))
    counts = Counter(class_ids)
    skipped = [f"{names[c]} ({n} label)" for c, n in sorted(counts.items()) if n < 2]
    found, checked_sets = [], 0
    for set_id in sorted(set(class_set.values())):
        rows = [i for i, c in enumerate(class_ids) if class_set[c] == set_id and counts[c] >= 2]
        if len({class_ids[i] for i in rows}) < 2:
            continue
        labels = np.array([class_ids[i] for i in rows])
        try:
            proba, classes = out_of_fold_proba(vectors_for(encoder, [scans[i] for i in rows]),
                                               labels)
        except ValueError as exc:
            raise TrainingError(str(exc)) from None
        checked_sets += 1
        for issue in find_label_issues(proba, np.searchsorted(classes, labels)):
            found.append((scans[rows[issue["index"]]], issue,
                          names[int(classes[issue["given"]])],
                          names[int(classes[issue["suggested"]])]))
    if not checked_sets:
        raise TrainingError("a label-quality check needs at least 2 labels in each of 2 classes "
                            "of one label set" + (f" (too few: {', '.join(skipped)})"
                                                  if skipped else ""))
    found.sort(key=lambda row: row[1]["self_confidence"])
    with transaction.atomic():
        review = QueryRound.objects.create(project=project, model_version=project.active_model,
                                           strategy="label_review", size=len(found),
                                           created_by=created_by)
        QueryItem.objects.bulk_create([
            QueryItem(query_round=review, scan=scan, rank=rank,
                      score=1.0 - issue["self_confidence"],
                      reason={"why": "likely label error", "given": given,
                              "suggested": suggested,
                              "self_confidence": round(issue["self_confidence"], 4),
                              "suggested_confidence": round(issue["suggested_confidence"], 4)})
            for rank, (scan, issue, given, suggested) in enumerate(found, start=1)])
    review.skipped = skipped
    return review
