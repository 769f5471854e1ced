"""Embedding-space answers: similar scans, class candidates, novelty (how unlike a scan is
of the project's scans of its label set). Vectors and indexes come from ``inference.cache``;
search goes through ``ml_backend.index``."""

from __future__ import annotations

import logging
import threading

import numpy as np
from django.conf import settings

from annotator.models import Annotation, FindingAnswer, LabelClass, Project, Scan
from annotator.storage import media_path
from ml_backend.errors import TrainingError
from ml_backend.models import ModelVersion, TrainingRun
from ml_backend.services.artifacts import embeddings_paths
from ml_backend.services.inference import (
    cache,
    embed_images,
    embedding_table,
    vector_index,
    vectors_for,
)
from ml_backend.services.runs import training_run_create, training_run_execute

logger = logging.getLogger(__name__)

NOVELTY_K = 5
NOVELTY_REFERENCE_MAX = 5000


def _novelty_reference(encoder: ModelVersion, label_set_id: int, *,
                       exclude_ids=()) -> dict | None:
    """The scans a novelty score is read against: the label set's embedded scans (a seeded
    sample of at most NOVELTY_REFERENCE_MAX), their vectors and their leave-one-out mean
    cosine distances to their k nearest within that reference. Distances of new scans are
    measured against the same reference, so both sides of the comparison match. Kept in
    the inference cache per encoder, embeddings file and set membership; ``exclude_ids``
    (e.g. the scans of the import being checked) gives an uncached reference without them."""
    from ml_backend.index.novelty import ReferenceIndex, knn_distances

    paths = embeddings_paths(encoder)
    if not paths["ids"].exists():
        return None
    members = Scan.objects.filter(project_id=encoder.project_id, label_set_id=label_set_id)
    if exclude_ids:
        members = members.exclude(pk__in=list(exclude_ids))

    def build(_path) -> dict | None:
        member_ids = set(members.values_list("pk", flat=True))
        table = embedding_table(encoder)
        rows = np.flatnonzero([int(i) in member_ids for i in table.ids])
        if len(rows) < 2:
            return None
        if len(rows) > NOVELTY_REFERENCE_MAX:
            rows = np.sort(np.random.default_rng(0).choice(rows, NOVELTY_REFERENCE_MAX,
                                                           replace=False))
        vectors = np.asarray(table.vectors[rows], np.float32)
        # "index": the rows normalised and indexed once (a label page scores one scan per
        # answer against it); "distances": their own leave-one-out distances
        return {"index": ReferenceIndex(vectors, table.ids[rows]),
                "distances": np.sort(knn_distances(vectors, NOVELTY_K))}

    if exclude_ids:
        return build(None)
    # rebuilt when the embeddings change (every embed of new scans) or a newer scan joins
    # the set: its newest member is one index lookup, where its size or its ids would read
    # every one of 100,000s of rows on each label page (issue 21)
    last = members.order_by("-pk").values_list("pk", flat=True).first()
    stamp = (paths["ids"].stat().st_mtime_ns, last or 0)
    return cache.get(encoder, f"novelty:{label_set_id}", build, stamp=stamp)


def _novelty_verdict(distance: float, reference: np.ndarray, percentile_limit: float,
                     set_name: str) -> dict:
    from ml_backend.index.novelty import NoveltyModel

    model = NoveltyModel(reference_distances=np.sort(reference), k=NOVELTY_K)
    percentile = float(model.percentile(np.array([distance]))[0])
    # at or beyond the limit (inclusive: with a few hundred reference scans the limit's own
    # quantile is one of the reference's outliers), and not a trivially small distance
    ood = bool(percentile >= percentile_limit and distance > model.floor)
    words = (f"Unlike the project's {set_name} scans: farther from its nearest scans than "
             f"{percentile:.0f}% of them are from theirs. The model has not seen scans like "
             "this; do not trust its suggestion." if ood else
             f"Typical of the project's {set_name} scans ({percentile:.0f}th percentile of "
             "distance to the nearest scans).")
    return {"distance": round(float(distance), 4), "percentile": round(percentile, 1),
            "ood": ood, "message": words, "reference_size": int(len(reference))}


def novelty_of_vectors(encoder: ModelVersion, vectors: np.ndarray, *, label_set,
                       project: Project, exclude_ids=()) -> list[dict | None]:
    """How unlike the project's scans of ``label_set`` each vector is: its mean cosine
    distance to the k nearest of them, as a percentile of those scans' own leave-one-out
    distances (ml_backend/index/novelty.py)."""
    reference = _novelty_reference(encoder, label_set.pk, exclude_ids=exclude_ids)
    if reference is None:
        return [None] * len(vectors)
    distances = reference["index"].distances(np.asarray(vectors, np.float32), NOVELTY_K)
    return [_novelty_verdict(float(d), reference["distances"], project.novelty_percentile,
                             label_set.name) for d in distances]


def import_novelty_check(job) -> dict | None:
    """After an import into a project that has an encoder: embed the new scans and count
    those unlike the scans their label set held before this import (so a whole site of
    mislabeled scans cannot vouch for itself). Returns a summary (None when there is
    nothing to check); the import report shows it."""
    encoder = Project.objects.get(pk=job.project_id).active_encoder
    if encoder is None or not embeddings_paths(encoder)["index"].exists():
        return None
    scans = list(job.scans.select_related("label_set", "project").exclude(label_set=None))
    if not scans:
        return None
    run = training_run_create(project=job.project, kind=TrainingRun.Kind.EMBED,
                              params={"import_job": job.pk})
    training_run_execute(run.pk)
    run.refresh_from_db()
    if run.status != TrainingRun.Status.SUCCEEDED:
        return {"error": f"the new scans could not be embedded: {run.last_error[:300]}"}
    new_ids = [s.pk for s in scans]
    unlike, checked = [], 0
    for label_set in {s.label_set for s in scans}:
        mine = [s for s in scans if s.label_set_id == label_set.pk]
        verdicts = novelty_of_vectors(encoder, vectors_for(encoder, mine), label_set=label_set,
                                      project=job.project, exclude_ids=new_ids)
        checked += sum(v is not None for v in verdicts)
        unlike += [s.pk for s, v in zip(mine, verdicts) if v and v["ood"]]
    return {"checked": checked, "unlike": len(unlike), "scan_ids": sorted(unlike)[:50],
            "percentile": job.project.novelty_percentile}


def scan_novelty(scan: Scan) -> dict | None:
    """The novelty verdict of an embedded scan among the other scans of its label set (None
    when the project has no encoder or the scan is not embedded yet)."""
    encoder = scan.project.active_encoder
    if encoder is None or scan.label_set_id is None:
        return None
    try:
        reference = _novelty_reference(encoder, scan.label_set_id)
        if reference is None:
            return None
        vector = vectors_for(encoder, [scan])
    except (TrainingError, OSError):
        return None
    # the scan's own row is left out of the reference (searched once per answer, not rebuilt)
    distance = float(reference["index"].distances(np.asarray(vector, np.float32), NOVELTY_K,
                                                   exclude_ids=[scan.pk])[0])
    if not np.isfinite(distance):
        return None
    return _novelty_verdict(distance, reference["distances"], scan.project.novelty_percentile,
                            scan.label_set.name)


def similar_scans(*, scan: Scan, k: int = 8, labeled_only: bool = False,
                  same_label_set: bool = False) -> list[tuple[Scan, float]]:
    """The ``k`` scans most similar to ``scan`` (cosine on SimCLRv2 embeddings), best first.

    With ``labeled_only`` only scans that have a label are returned. Raises TrainingError
    when the project has no embeddings yet.
    """
    encoder = scan.project.active_encoder
    if encoder is None:
        raise TrainingError("no active encoder for this project yet")
    index = vector_index(encoder)
    table = embedding_table(encoder)
    if scan.pk in table.row:
        query = table.of([scan.pk])
    else:  # a scan imported after the last embed: embed it on the fly
        query = embed_images(encoder, [media_path(scan.preview.name)])
    allowed = None
    if labeled_only:
        allowed = labeled_scans.of(scan.project_id,
                                   scan.label_set_id if same_label_set else ANY_SET)
        if not allowed:
            return []
    elif same_label_set:
        allowed = list(Scan.objects.filter(project=scan.project, label_set_id=scan.label_set_id)
                       .values_list("pk", flat=True))
    if allowed is not None and len(allowed) <= SMALL_ALLOWED:
        hits = _search_among(table, query[0], allowed, k, exclude=scan.pk)
    else:
        hits = index.search(query, k, allowed_ids=allowed, exclude_ids=[scan.pk])[0]
    by_id = Scan.objects.in_bulk([scan_id for scan_id, _ in hits])
    return [(by_id[scan_id], float(score)) for scan_id, score in hits if scan_id in by_id
            and (not same_label_set or by_id[scan_id].label_set_id == scan.label_set_id)]


ANY_SET = object()


class LabeledScans:
    """The scans of a project that carry a label, by label set, kept in the process and
    brought up to date on every call from the label annotations added since (the label
    page's "similar scans" asks on every answer; reading them all each time grew with the
    labels: docs/benchmarks.md, "The label page at 100,000 scans: what grew with the
    labels"). Each call reads the annotations past the highest primary key seen and counts
    the project's label annotations; when the count is not the kept one plus the new rows
    (an answer taken back, a label changed to "unsure", a transaction that committed late)
    the whole list is read again. A display aid only: the hits are checked against their
    own rows (``similar_scans``)."""

    def __init__(self):
        self._lock = threading.Lock()
        # project id -> (highest annotation pk, label annotations, {label set id: scan ids})
        self._kept: dict[int, tuple[int, int, dict[int | None, set[int]]]] = {}

    def of(self, project_id: int, label_set_id) -> list[int]:
        """Labeled scans of the label set (``ANY_SET``: of every set)."""
        labels = Annotation.objects.filter(project_id=project_id,
                                           outcome=Annotation.Outcome.LABEL).order_by()
        with self._lock:
            kept = self._kept.get(project_id)
        if kept is not None:
            top, count, by_set = kept
            new = list(labels.filter(pk__gt=top)
                       .values_list("pk", "scan_id", "scan__label_set_id"))
            if labels.count() == count + len(new):
                by_set = {k: set(v) for k, v in by_set.items()} if new else by_set
                for pk, scan_id, set_id in new:
                    by_set.setdefault(set_id, set()).add(scan_id)
                kept = (max([top, *(pk for pk, _, _ in new)]), count + len(new), by_set)
            else:
                kept = None
        if kept is None:
            rows = list(labels.values_list("pk", "scan_id"))
            sets = dict(Scan.objects.filter(pk__in={scan_id for _, scan_id in rows})
                        .values_list("pk", "label_set_id"))
            by_set: dict[int | None, set[int]] = {}
            for _, scan_id in rows:
                if scan_id in sets:
                    by_set.setdefault(sets[scan_id], set()).add(scan_id)
            kept = (max((pk for pk, _ in rows), default=0), len(rows), by_set)
        with self._lock:
            self._kept[project_id] = kept
        by_set = kept[2]
        if label_set_id is ANY_SET:
            return sorted(set().union(*by_set.values())) if by_set else []
        return sorted(by_set.get(label_set_id, ()))


labeled_scans = LabeledScans()


# Up to this many allowed scans (e.g. the labeled ones) a search reads their vectors
# directly instead of filtering the whole index (which visits every vector of the pool).
SMALL_ALLOWED = 20000


def _search_among(table, query: np.ndarray, allowed: list[int], k: int, *,
                  exclude: int) -> list[tuple[int, float]]:
    """The ``k`` allowed scans most similar to ``query`` (cosine), best first."""
    ids = np.array([i for i in set(allowed) if i in table.row and i != exclude], np.int64)
    if not len(ids):
        return []
    q = np.asarray(query, np.float32)
    # the same labeled scans every answer: their unit vectors are kept in the process
    scores = (table.unit.scores(np.array([table.row[i] for i in ids.tolist()], np.int64), q)
              if table.unit is not None else None)
    if scores is None:                      # more rows than the cache may hold: read them
        vectors = np.asarray(table.of(ids.tolist()), np.float32)
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        scores = vectors @ (q / max(float(np.linalg.norm(q)), 1e-12))
    top = np.argsort(-scores, kind="stable")[:k]
    return [(int(ids[i]), float(scores[i])) for i in top]


def class_candidates(*, label_class: LabelClass, k: int = 20) -> dict[str, list[dict]]:
    """Scans to show a clinician for a class (e.g. one just added): unlabeled pool scans of
    the class's label set only, as FAISS neighbours of its labeled examples, as the scans
    label propagation over the k-NN graph gives the class (once the set has labels of two
    classes), and novelty candidates (the set's scans farthest from every labeled scan).
    Candidates, never labels: a clinician confirms each."""
    project = label_class.project
    encoder = project.active_encoder
    if encoder is None:
        raise TrainingError("no active encoder for this project yet")
    index = vector_index(encoder)
    table = embedding_table(encoder)
    ids, vectors, row = table.ids, table.vectors, table.row
    labeled = set(Annotation.objects.filter(project=project,
                                            outcome__in=Annotation.LABELLING)
                  .values_list("scan_id", flat=True))
    in_set = set(Scan.objects.filter(project=project, label_set_id=label_class.label_set_id,
                                     quarantined=False, split="pool")
                 .values_list("pk", flat=True))
    unlabeled = [int(i) for i in ids if int(i) in in_set and int(i) not in labeled]
    result = {"neighbours": [], "novel": [], "propagated": []}
    if not unlabeled:
        return result
    finding = label_class.label_set.is_multi
    # a class: one propagation over the set's classes; a finding: present against absent
    result["propagated"] = _propagated_candidates(label_class, in_set, labeled, table, k)
    examples = [s for s in (
        FindingAnswer.objects.filter(finding=label_class, state=FindingAnswer.State.PRESENT)
        .values_list("annotation__scan_id", flat=True).distinct() if finding else
        Annotation.objects.filter(label_class=label_class, outcome=Annotation.Outcome.LABEL)
        .values_list("scan_id", flat=True).distinct()) if s in row]
    if examples:
        queries = np.asarray(vectors[[row[s] for s in examples]], np.float32)
        best: dict[int, tuple[float, int]] = {}
        for example, hits in zip(examples, index.search(queries, k, allowed_ids=unlabeled)):
            for scan_id, score in hits:
                if scan_id not in best or score > best[scan_id][0]:
                    best[scan_id] = (float(score), example)
        for scan_id, (score, like) in sorted(best.items(), key=lambda kv: -kv[1][0])[:k]:
            result["neighbours"].append({"scan": int(scan_id), "similarity": round(score, 4),
                                         "like": int(like)})
    labeled_in_set = [s for s in Scan.objects.filter(
        pk__in=labeled, label_set_id=label_class.label_set_id).values_list("pk", flat=True)
        if s in row]
    if labeled_in_set:
        from ml_backend.index.novelty import knn_distances

        distance = knn_distances(np.asarray(vectors[[row[s] for s in unlabeled]], np.float32),
                                 1, reference=np.asarray(vectors[[row[s] for s in labeled_in_set]],
                                                         np.float32), exclude_self=False)
        for position in np.argsort(-distance)[:k]:
            result["novel"].append({"scan": unlabeled[position],
                                    "nearest_labeled_similarity":
                                        round(1.0 - float(distance[position]), 4)})
    return result


PROPAGATION_MAX_POINTS = 20000


def _propagation_seeds(label_class: LabelClass, table) -> tuple[dict[int, int], int, str]:
    """What seeds the graph: ``{scan id: class}``, the class to rank by, and the cache key.
    A single-label set: every resolved label of the set (each scan's class). A finding: each
    scan read for it, present (1) or absent (0); uncertain and unread scans stay unlabeled."""
    from annotator.selectors import findings_targets, training_labels

    seeds: dict[int, int] = {}
    if label_class.label_set.is_multi:
        for split in ("pool", "eval"):
            scans, findings, targets = findings_targets(label_class.label_set, split=split)
            column = next((i for i, f in enumerate(findings) if f.pk == label_class.pk), None)
            if column is None:
                continue
            for scan, value in zip(scans, targets[:, column]):
                if value in (0.0, 1.0) and scan.pk in table.row:
                    seeds[scan.pk] = int(value)
        return seeds, 1, f"propagation:finding:{label_class.pk}"
    for split in ("pool", "eval"):          # every resolved label of the set seeds the graph
        scans, class_ids = training_labels(label_class.project, split=split)
        seeds.update({s.pk: c for s, c in zip(scans, class_ids)
                      if s.label_set_id == label_class.label_set_id and s.pk in table.row})
    return seeds, label_class.pk, f"propagation:{label_class.label_set_id}"


def _propagated_candidates(label_class: LabelClass, in_set: set[int], labeled: set[int],
                           table, k: int) -> list[dict]:
    """Unlabeled pool scans of the class's set ranked by label propagation over the k-NN
    graph of the set's embeddings (``ml_backend.active.propagation``), seeded by every
    labeled scan of the set; each with its propagated probability of the class (of the
    finding being present, for a finding). Empty until the set has labels of two classes
    (a finding: scans read with it present and with it absent)."""
    from ml_backend.active.propagation import UNLABELED, propagate

    seeds, target, cache_key = _propagation_seeds(label_class, table)
    if target not in seeds.values() or len(set(seeds.values())) < 2:
        return []
    nodes = [int(i) for i in table.ids if int(i) in in_set or int(i) in seeds]
    if len(nodes) > PROPAGATION_MAX_POINTS:
        rng = np.random.default_rng(0)
        others = [n for n in nodes if n not in seeds]
        nodes = list(seeds) + rng.choice(others, PROPAGATION_MAX_POINTS - len(seeds),
                                         replace=False).tolist()
    classes = sorted(set(seeds.values()))

    def build(_path):
        labels = np.array([classes.index(seeds[n]) if n in seeds else UNLABELED
                           for n in nodes])
        try:
            return propagate(table.of(nodes), labels, k=min(10, len(nodes) - 1))
        except ValueError:
            return None

    # one propagation serves every class of the set until the embeddings or labels change
    encoder = label_class.project.active_encoder
    stamp = (embeddings_paths(encoder)["ids"].stat().st_mtime_ns,
             hash(tuple(sorted(seeds.items()))), len(nodes))
    proba = cache.get(encoder, cache_key, build, stamp=stamp)
    if proba is None:
        return []
    column = classes.index(target)
    order = np.argsort(-proba[:, column])
    found = []
    for position in order:
        scan_id = nodes[position]
        if scan_id in seeds or scan_id in labeled or scan_id not in in_set:
            continue
        found.append({"scan": scan_id, "probability": round(float(proba[position, column]), 4)})
        if len(found) == k:
            break
    return found


CLUSTER_MAX_POINTS = 20000
CLUSTER_TYPICAL = 6


def scan_clusters(*, project: Project, k: int = 8, label_set_id: int | None = None) -> dict:
    """The label-free view: the project's embedded scans (optionally one label set's) in
    ``k`` clusters (cosine k-means on the active encoder's embeddings and the scans'
    thumbnails, ``cluster_vectors``), each with its size,
    its ``CLUSTER_TYPICAL`` most typical scans (nearest its centroid), how its scans are
    labeled so far, the datasets they come from, and every scan's cluster (for the map).
    Kept in the inference cache per embeddings file, k and set. Raises TrainingError with no
    encoder or embeddings."""
    from ml_backend.index.faiss_index import kmeans

    encoder = project.active_encoder
    if encoder is None:
        raise TrainingError("no encoder yet: run `manage.py pretrain` (or --epochs 0 for the "
                            "starter encoder) to see the scans' clusters")
    table = embedding_table(encoder)
    scans = Scan.objects.filter(project=project, quarantined=False)
    if label_set_id is not None:
        scans = scans.filter(label_set_id=label_set_id)
    members = set(scans.values_list("pk", flat=True))

    def build(_path) -> dict:
        rows = np.flatnonzero([int(i) in members for i in table.ids])
        if len(rows) > CLUSTER_MAX_POINTS:
            rows = np.sort(np.random.default_rng(0).choice(rows, CLUSTER_MAX_POINTS,
                                                           replace=False))
        if len(rows) < max(k, 2):
            raise TrainingError(f"{len(rows)} embedded scans: too few for {k} clusters")
        ids = np.asarray(table.ids[rows], np.int64)
        vectors, inputs = cluster_vectors(table, ids.tolist())
        centroids, assignment, distance = kmeans(vectors, k, seed=0, nredo=3)
        return {"ids": ids, "assignment": assignment, "distance": distance, "k": k,
                "inputs": inputs}

    stamp = (embeddings_paths(encoder)["ids"].stat().st_mtime_ns, len(members),
             max(members, default=0))
    found = cache.get(encoder, f"clusters:{k}:{label_set_id}:{settings.CLUSTER_PIXEL_WEIGHT:g}",
                      build, stamp=stamp)
    ids, assignment, distance = found["ids"], found["assignment"], found["distance"]
    labels = dict(Annotation.objects.filter(scan_id__in=ids.tolist(),
                                            outcome=Annotation.Outcome.LABEL,
                                            label_class__isnull=False)
                  .order_by("created_at").values_list("scan_id", "label_class__name"))
    datasets = dict(Scan.objects.filter(pk__in=ids.tolist())
                    .values_list("pk", "dataset__name"))
    clusters = []
    for c in range(k):
        rows = np.flatnonzero(assignment == c)
        if not len(rows):
            continue
        typical = rows[np.argsort(distance[rows])[:CLUSTER_TYPICAL]]
        counts: dict[str, int] = {}
        sources: dict[str, int] = {}
        for scan_id in ids[rows].tolist():
            if scan_id in labels:
                counts[labels[scan_id]] = counts.get(labels[scan_id], 0) + 1
            source = datasets.get(scan_id, "?")
            sources[source] = sources.get(source, 0) + 1
        labeled = sum(counts.values())
        top = max(counts.items(), key=lambda kv: kv[1]) if counts else None
        clusters.append({
            "cluster": c + 1, "size": int(len(rows)),
            "typical": [int(ids[r]) for r in typical],
            "labels": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
            "labeled": labeled,
            "purity": round(top[1] / labeled, 3) if top else None,
            "majority": top[0] if top else None,
            "datasets": dict(sorted(sources.items(), key=lambda kv: -kv[1])),
        })
    clusters.sort(key=lambda c: -c["size"])
    return {"encoder": encoder.version, "k": k, "scans": int(len(ids)), "clusters": clusters,
            "inputs": found.get("inputs", "embeddings"),
            "assignment": {int(i): int(a) + 1 for i, a in zip(ids, assignment)}}


def cluster_vectors(table, scan_ids: list[int]) -> tuple[np.ndarray, str]:
    """What the cluster view clusters and maps for ``scan_ids`` (rows of the encoder's
    ``EmbeddingTable``): the embedding and the scan's thumbnail side by side, standardised
    over these scans, the thumbnail at ``settings.CLUSTER_PIXEL_WEIGHT``
    (``features.cluster_inputs``); the embedding alone where the table has no thumbnails
    yet or the weight is 0. Returns the vectors and a short description for the page."""
    from ml_backend.active.features import cluster_inputs

    weight = float(settings.CLUSTER_PIXEL_WEIGHT)
    vectors = table.of(scan_ids)
    if table.thumbs is None or weight == 0:
        return cluster_inputs(vectors, None), "embeddings"
    return (cluster_inputs(vectors, table.thumbs_of(scan_ids), weight),
            "embeddings and thumbnails")
