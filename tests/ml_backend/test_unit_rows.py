"""UnitRows: the label page's similar-scan search keeps the labeled scans' unit vectors and
reads only the rows added since the last answer (ml_backend/index/unit_rows.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ml_backend.index.unit_rows import UnitRows


class CountingRows(np.ndarray):
    """A matrix that records which rows were read from it (as a memory map would be)."""

    read: list

    def __getitem__(self, key):
        if isinstance(key, list):
            self.read.extend(key)
        return np.asarray(self).__getitem__(key)


def matrix(n=50, d=16, seed=0) -> CountingRows:
    m = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32).view(CountingRows)
    m.read = []
    return m


def cosine(m, rows, q):
    v = np.asarray(m)[rows]
    return (v / np.linalg.norm(v, axis=1, keepdims=True)) @ (q / np.linalg.norm(q))


def test_scores_are_the_cosines_and_later_calls_read_only_new_rows():
    m = matrix()
    q = np.random.default_rng(1).normal(size=16).astype(np.float32)
    cache = UnitRows(m, max_bytes=2 ** 20)
    first = np.array([4, 9, 2, 9])
    assert np.allclose(cache.scores(first, q), cosine(m, first, q), atol=1e-6)
    assert sorted(m.read) == [2, 4, 9] and len(cache) == 3
    m.read.clear()
    second = np.array([9, 30, 2, 4, 31])          # one more answer: two new labeled scans
    assert np.allclose(cache.scores(second, q), cosine(m, second, q), atol=1e-6)
    assert sorted(m.read) == [30, 31] and len(cache) == 5
    m.read.clear()
    assert np.allclose(cache.scores(np.array([31, 4]), -q), cosine(m, [31, 4], -q), atol=1e-6)
    assert m.read == [], "rows already kept are not read again"


def test_over_its_budget_it_starts_again_or_declines():
    m = matrix()
    q = np.ones(16, np.float32)
    cache = UnitRows(m, max_bytes=4 * 16 * 4)           # room for 4 rows
    cache.scores(np.array([0, 1, 2]), q)
    rows = np.array([5, 6, 7, 8])                       # 3 kept + 4 new > 4: start again
    assert np.allclose(cache.scores(rows, q), cosine(m, rows, q), atol=1e-6)
    assert len(cache) == 4
    assert cache.scores(np.arange(10), q) is None       # 10 rows never fit: the caller reads
    assert UnitRows(m, max_bytes=0).scores(np.array([1]), q) is None


def test_the_similar_scans_search_gives_the_same_answer_with_and_without_it(
        encoded_project, users):
    from annotator import services
    from annotator.models import LabelClass
    from ml_backend.services import embeddings, inference

    project = encoded_project
    klass = LabelClass.objects.filter(project=project).first()
    scans = list(project.scans.filter(split="pool").order_by("pk")[:12])
    for scan in scans:
        services.annotation_create(scan=scan, reader=users["alice"], label_class=klass)
    table = inference.embedding_table(project.active_encoder)
    plain = dataclasses.replace(table, unit=None)
    query = project.scans.filter(split="pool").order_by("-pk").first()
    vector = table.of([query.pk])[0]
    labeled = [s.pk for s in scans]
    for k in (3, 8):
        kept = embeddings._search_among(table, vector, labeled, k, exclude=query.pk)
        read = embeddings._search_among(plain, vector, labeled, k, exclude=query.pk)
        assert [i for i, _ in kept] == [i for i, _ in read]
        assert [s for _, s in kept] == pytest.approx([s for _, s in read], abs=1e-5)
    assert len(table.unit) == len(labeled)


def test_the_labeled_scans_are_kept_and_brought_up_to_date_from_the_new_answers(
        encoded_project, users, django_assert_max_num_queries):
    from annotator import services
    from annotator.models import Annotation, LabelClass, LabelSet
    from ml_backend.services import embeddings

    project = encoded_project
    klass = LabelClass.objects.filter(project=project).first()
    set_id = klass.label_set_id
    tracker = embeddings.LabeledScans()
    before = set(Annotation.objects.filter(project=project, outcome="label")
                 .values_list("scan_id", flat=True))
    assert set(tracker.of(project.pk, set_id)) == before
    pool = list(project.scans.filter(split="pool").exclude(pk__in=before).order_by("pk")[:4])
    for scan in pool[:2]:
        services.annotation_create(scan=scan, reader=users["alice"], label_class=klass)
    with django_assert_max_num_queries(2):        # the new rows and the count, nothing more
        assert set(tracker.of(project.pk, set_id)) == before | {pool[0].pk, pool[1].pk}
    assert set(tracker.of(project.pk, embeddings.ANY_SET)) >= {pool[0].pk, pool[1].pk}
    assert tracker.of(project.pk, -1) == []                   # a set with no labels

    # an answer taken back, a label changed to "unsure": the count disagrees, read again
    Annotation.objects.filter(scan=pool[0]).delete()
    assert pool[0].pk not in tracker.of(project.pk, set_id)
    Annotation.objects.filter(scan=pool[1]).update(outcome="unsure", label_class=None)
    services.annotation_create(scan=pool[2], reader=users["alice"], label_class=klass)
    assert set(tracker.of(project.pk, set_id)) == before | {pool[2].pk}

    # a labeled scan moved to another label set after it was kept: the search checks each
    # hit's own row, so it never shows a scan of another set as similar
    assert pool[2].pk in embeddings.labeled_scans.of(project.pk, set_id)
    other = LabelSet.objects.create(project=project, name="elsewhere")
    project.scans.filter(pk=pool[2].pk).update(label_set=other)
    assert pool[2].pk in embeddings.labeled_scans.of(project.pk, set_id), "kept as it was"
    query = project.scans.filter(split="pool", label_set_id=set_id).exclude(
        pk__in=before | {pool[2].pk}).first()
    hits = embeddings.similar_scans(scan=query, k=50, labeled_only=True, same_label_set=True)
    assert hits and all(s.label_set_id == set_id for s, _ in hits)
    assert pool[2].pk not in [s.pk for s, _ in hits]
