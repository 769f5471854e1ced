"""Findings label sets (several findings per scan): answers, the targets models train on, and
reader agreement per finding. Services and selectors; views, commands and imports call these.

A findings answer is one ``Annotation`` (``outcome="findings"``) holding one ``FindingAnswer``
per finding the reader answered: present, absent or uncertain. "No finding" is stated
explicitly: every finding of the set absent. It carries the audit fields every annotation
has (reader, time, duration, model version and the per-finding scores shown).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from django.db import transaction

from annotator.models import Annotation, FindingAnswer, LabelClass, LabelSet, Scan
from annotator.services import AnnotationError, label_saved

__all__ = ["STATE_VALUE", "findings_agreement", "findings_answer_create", "findings_for_set",
           "findings_targets"]

# How a state enters a target matrix (ml_backend.metrics.findings: 1, 0, -1 uncertain).
STATE_VALUE = {FindingAnswer.State.PRESENT: 1.0, FindingAnswer.State.ABSENT: 0.0,
               FindingAnswer.State.UNCERTAIN: -1.0}


def findings_for_set(label_set: LabelSet) -> list[LabelClass]:
    """The set's findings in display order."""
    return list(label_set.classes.order_by("order", "name"))


def findings_answer_create(
    *,
    scan: Scan,
    reader,
    states: dict[int, str] | None = None,
    no_finding: bool = False,
    source: str = Annotation.Source.WEB,
    duration_ms: int | None = None,
    shown_model_version=None,
    shown_scores: dict | None = None,
    shown_acquisition_score: float | None = None,
    query_round=None,
    external_id: str = "",
    note: str = "",
    import_job=None,
) -> Annotation:
    """Record one reader's findings for ``scan``: ``states`` maps finding (LabelClass) ids to
    ``present`` / ``absent`` / ``uncertain``; findings left out are unanswered, except with
    ``no_finding``, which marks every finding of the set absent (and refuses a present or
    uncertain one). Atomic: the answer and its findings are stored together or not at all."""
    states = {int(k): str(v) for k, v in (states or {}).items()}
    label_set = scan.label_set
    if label_set is None or not label_set.is_multi:
        raise AnnotationError("this scan's label set takes one class per scan, not findings")
    if scan.quarantined:
        raise AnnotationError(f"scan {scan.pk} is quarantined (it may show burned-in patient "
                              "details): an admin must check and release it before it is read")
    bad_states = sorted({v for v in states.values() if v not in FindingAnswer.State.values})
    if bad_states:
        raise AnnotationError(f"a finding is present, absent or uncertain, not "
                              f"{', '.join(bad_states)}")
    findings = {c.pk: c for c in findings_for_set(label_set)}
    foreign = [k for k in states if k not in findings]
    if foreign:
        raise AnnotationError(f"finding(s) {foreign} are not findings of the label set "
                              f"{label_set.name!r}")
    if no_finding:
        contradicting = [findings[k].name for k, v in states.items()
                         if v != FindingAnswer.State.ABSENT]
        if contradicting:
            raise AnnotationError(f"'no finding' together with {', '.join(contradicting)}")
        states = {k: FindingAnswer.State.ABSENT for k in findings}
    if not states:
        raise AnnotationError("mark at least one finding, or state 'no finding'")
    if duration_ms is not None and not 0 <= duration_ms <= 6 * 3600 * 1000:
        duration_ms = None
    if shown_scores is not None:
        shown_scores = {str(int(k)): float(v) for k, v in shown_scores.items()
                        if int(k) in findings and 0 <= float(v) <= 1}
    if len(external_id or "") > 64:
        raise AnnotationError("an external id is at most 64 characters")
    with transaction.atomic():
        annotation = Annotation.objects.create(
            scan=scan, reader=reader, outcome=Annotation.Outcome.FINDINGS, source=source,
            duration_ms=duration_ms, shown_model_version=shown_model_version,
            shown_scores=shown_scores, shown_acquisition_score=shown_acquisition_score,
            query_round=query_round, external_id=external_id, note=note,
            import_job=import_job)
        FindingAnswer.objects.bulk_create(
            [FindingAnswer(annotation=annotation, finding_id=k, state=v)
             for k, v in sorted(states.items())])
    if source != Annotation.Source.IMPORT:     # imports queue no refit (as class imports)
        label_saved(annotation)
    return annotation


def _latest_per_reader(label_set: LabelSet, split: str | None):
    """``{scan id: {reader key: (source, {finding id: state})}}`` from each reader's latest
    findings answer (imports count as one reader; adjudications as their own key)."""
    answers = (FindingAnswer.objects
               .filter(annotation__scan__label_set=label_set,
                       annotation__outcome=Annotation.Outcome.FINDINGS)
               .order_by("annotation__created_at", "annotation_id"))
    if split is not None:
        answers = answers.filter(annotation__scan__split=split)
    latest: dict[int, dict[str, tuple[int, str, dict]]] = defaultdict(dict)
    # one row per (annotation, finding), oldest answer first
    for scan_id, annotation_id, reader_id, source, finding_id, state in answers.values_list(
            "annotation__scan_id", "annotation_id", "annotation__reader_id",
            "annotation__source", "finding_id", "state"):
        key = "adjudication" if source == Annotation.Source.ADJUDICATION else (
            "import" if source == Annotation.Source.IMPORT else f"reader-{reader_id}")
        held = latest[scan_id].get(key)
        if held is None or held[0] != annotation_id:    # rows come oldest first: a newer
            held = (annotation_id, source, {})          # answer replaces the older one
            latest[scan_id][key] = held
        held[2][finding_id] = state
    return latest


def findings_targets(label_set: LabelSet, *, split: str = "pool"
                     ) -> tuple[list[Scan], list[LabelClass], np.ndarray]:
    """What the models train and are evaluated on: per scan and finding, the adjudicated
    state if that finding was adjudicated, else the majority of the readers' latest answers (a tie between present and
    absent counts as uncertain). Returns the scans (by id), the findings and ``(N, F)``
    targets: 1 present, 0 absent, -1 uncertain (before the set's policy), NaN unanswered."""
    findings = findings_for_set(label_set)
    column = {f.pk: i for i, f in enumerate(findings)}
    latest = _latest_per_reader(label_set, split)
    scan_ids = sorted(latest)
    targets = np.full((len(scan_ids), len(findings)), np.nan)
    for row, scan_id in enumerate(scan_ids):
        readers = latest[scan_id]
        adjudicated = readers.get("adjudication", (None, None, {}))[2]
        votes = defaultdict(list)
        for key, (_, _, answered) in readers.items():
            if key != "adjudication":
                for fid, state in answered.items():
                    votes[fid].append(state)
        for fid, state in adjudicated.items():      # per finding: the adjudication decides
            votes[fid] = [state]
        for fid, states in votes.items():
            if fid not in column:
                continue
            present = states.count(FindingAnswer.State.PRESENT)
            absent = states.count(FindingAnswer.State.ABSENT)
            uncertain = states.count(FindingAnswer.State.UNCERTAIN)
            if present > max(absent, uncertain):
                value = 1.0
            elif absent > max(present, uncertain):
                value = 0.0
            else:
                value = -1.0
            targets[row, column[fid]] = value
    scans = Scan.objects.in_bulk(scan_ids)
    return [scans[i] for i in scan_ids], findings, targets


def findings_agreement(label_set: LabelSet, reader_a, reader_b) -> dict:
    """Cohen's kappa per finding between two readers, over the scans both answered for that
    finding (their latest answers; present / absent / uncertain as three categories)."""
    from sklearn.metrics import cohen_kappa_score

    latest = _latest_per_reader(label_set, None)
    key_a, key_b = f"reader-{reader_a.pk}", f"reader-{reader_b.pk}"
    out = {}
    for finding in findings_for_set(label_set):
        pairs = [(r[key_a][2][finding.pk], r[key_b][2][finding.pk]) for r in latest.values()
                 if key_a in r and key_b in r
                 and finding.pk in r[key_a][2] and finding.pk in r[key_b][2]]
        a = [p[0] for p in pairs]
        b = [p[1] for p in pairs]
        kappa = None
        if pairs and len(set(a) | set(b)) > 1:
            kappa = float(cohen_kappa_score(a, b))
        elif pairs:
            kappa = 1.0                  # both readers gave one and the same state everywhere
        out[finding.name] = {"scans": len(pairs),
                             "agreement": (sum(x == y for x, y in pairs) / len(pairs)
                                           if pairs else None),
                             "kappa": kappa}
    return out


def findings_agreement_all(label_set: LabelSet, *, min_pairs: int | None = None) -> dict:
    """Cohen's kappa per finding over every pair of distinct readers on every scan read by
    two or more (each reader's latest findings answer; imports count as a reader,
    adjudications do not), as the review page reports classes. Per finding: ``pairs``,
    ``agreement`` (share of pairs giving the same state), ``kappa`` (present / absent /
    uncertain as three categories) and ``reason`` when kappa is not reported."""
    from itertools import combinations

    from sklearn.metrics import cohen_kappa_score

    from annotator.review import MIN_PAIRS

    min_pairs = MIN_PAIRS if min_pairs is None else min_pairs
    latest = _latest_per_reader(label_set, None)
    findings = findings_for_set(label_set)
    pairs: dict[int, list[tuple[str, str]]] = {f.pk: [] for f in findings}
    scans = 0
    for readers in latest.values():
        keys = sorted(k for k in readers if k != "adjudication")
        if len(keys) < 2:
            continue
        scans += 1
        for a, b in combinations(keys, 2):
            for fid in pairs:
                if fid in readers[a][2] and fid in readers[b][2]:
                    pairs[fid].append((readers[a][2][fid], readers[b][2][fid]))
    out = {"scans": scans, "per_finding": []}
    for finding in findings:
        rows = pairs[finding.pk]
        kappa, reason = None, ""
        if len(rows) < min_pairs:
            reason = f"{len(rows)} reader pair{'s' if len(rows) != 1 else ''}: at least " \
                     f"{min_pairs} are needed"
        elif len({x for row in rows for x in row}) < 2:
            reason = "every paired answer gives the same state: kappa is undefined"
        else:
            kappa = float(cohen_kappa_score([r[0] for r in rows], [r[1] for r in rows]))
        out["per_finding"].append({
            "finding": finding, "pairs": len(rows), "kappa": kappa, "reason": reason,
            "agreement": (sum(x == y for x, y in rows) / len(rows)) if rows else None})
    return out
