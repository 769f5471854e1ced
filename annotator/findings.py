"""Findings label sets (several findings per scan): answers, the targets models train on, and
reader agreement per finding. Services and selectors; views, commands and imports call these.

A findings answer is one ``Annotation`` (``outcome="findings"``) holding one ``FindingAnswer``
per finding the reader answered: present, absent or uncertain. "No finding" is stated
explicitly: every finding of the set absent. It carries the audit fields every annotation
has (reader, time, duration, model version and the per-finding scores shown).
"""

from __future__ import annotations

import math
import numbers

from django.db import transaction

from annotator.models import Annotation, FindingAnswer, LabelSet, Scan
from annotator.selectors import latest_findings_per_reader, findings_for_set, findings_targets
from annotator.services import AnnotationError, label_saved

__all__ = ["findings_agreement", "findings_agreement_all", "findings_answer_create",
           "findings_answer_replace", "findings_for_set", "findings_states",
           "findings_states_from_names", "findings_targets"]


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
    shown_preselected: bool | None = None,
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
        # as a class's shown_confidence: a probability from 0 to 1, else refused; a score of
        # a finding the set does not have is dropped
        for k, v in shown_scores.items():
            if (isinstance(v, bool) or not isinstance(v, numbers.Real)
                    or not math.isfinite(v) or not 0 <= v <= 1):
                raise AnnotationError(f"the probability shown for finding {k} is out of range "
                                      f"(a number from 0 to 1, not {str(v)[:40]!r})")
        given = bool(shown_scores)
        shown_scores = {str(int(k)): float(v) for k, v in shown_scores.items()
                        if int(k) in findings}
        if given and not shown_scores and shown_preselected:
            shown_preselected = False   # none of the scores was this set's: nothing preselected
    if len(external_id or "") > 64:
        raise AnnotationError("an external id is at most 64 characters")
    with transaction.atomic():
        annotation = Annotation.objects.create(
            scan=scan, reader=reader, outcome=Annotation.Outcome.FINDINGS, source=source,
            duration_ms=duration_ms, shown_model_version=shown_model_version,
            shown_scores=shown_scores, shown_acquisition_score=shown_acquisition_score,
            query_round=query_round, external_id=external_id, note=note,
            import_job=import_job, shown_preselected=shown_preselected)
        FindingAnswer.objects.bulk_create(
            [FindingAnswer(annotation=annotation, finding_id=k, state=v)
             for k, v in sorted(states.items())])
    if source != Annotation.Source.IMPORT:     # imports queue no refit (as class imports)
        label_saved(annotation)
    return annotation


def findings_states_from_names(label_set: LabelSet, present: list[str], uncertain: list[str],
                               *, no_finding: bool = False) -> dict[int, str]:
    """A whole findings answer from finding names (an external tool's choices): the named
    present and uncertain findings, every other finding of the set absent. A finding named
    as both present and uncertain is uncertain; "no finding" with a present or uncertain
    finding, or a name the set does not have, is refused (AnnotationError)."""
    findings = {f.name: f for f in findings_for_set(label_set)}
    unknown = sorted((set(present) | set(uncertain)) - set(findings))
    if unknown:
        raise AnnotationError(f"{', '.join(map(repr, unknown[:5]))} "
                              f"{'is not a finding' if len(unknown) == 1 else 'are not findings'}"
                              f" of the label set {label_set.name!r}")
    if no_finding and (present or uncertain):
        raise AnnotationError(f"'no finding' together with {', '.join(sorted(set(present) | set(uncertain)))}")
    if not (no_finding or present or uncertain):
        raise AnnotationError("mark at least one finding, or state 'no finding'")
    states = {f.pk: FindingAnswer.State.ABSENT for f in findings.values()}
    states.update({findings[n].pk: FindingAnswer.State.PRESENT for n in present})
    states.update({findings[n].pk: FindingAnswer.State.UNCERTAIN for n in uncertain})
    return states


def findings_states(annotation: Annotation) -> dict[int, str]:
    """A findings answer's states by finding id."""
    return dict(annotation.findings.values_list("finding_id", "state"))


def findings_answer_replace(annotation: Annotation, states: dict[int, str], *,
                            note: str = "") -> Annotation:
    """Replace a findings answer's findings (a reader changed it in an external tool):
    atomic, the answer keeps its id, reader and audit fields; ``note`` is appended."""
    if annotation.outcome != Annotation.Outcome.FINDINGS:
        raise AnnotationError(f"annotation {annotation.pk} is not a findings answer")
    findings = {c.pk for c in findings_for_set(annotation.scan.label_set)}
    if set(states) - findings or any(v not in FindingAnswer.State.values
                                     for v in states.values()):
        raise AnnotationError("the new findings do not fit the scan's findings set")
    with transaction.atomic():
        annotation._audit_findings_before = {
            f.finding.name: f.state for f in annotation.findings.select_related("finding")}
        annotation.findings.all().delete()
        FindingAnswer.objects.bulk_create(
            [FindingAnswer(annotation=annotation, finding_id=k, state=v)
             for k, v in sorted(states.items())])
        if note:
            annotation.note = (annotation.note + "\n" if annotation.note else "") + note
        annotation.save(update_fields=["note"])
    label_saved(annotation)
    return annotation


def findings_agreement(label_set: LabelSet, reader_a, reader_b) -> dict:
    """Cohen's kappa per finding between two readers, over the scans both answered for that
    finding (their latest answers; present / absent / uncertain as three categories)."""
    from sklearn.metrics import cohen_kappa_score

    latest = latest_findings_per_reader(label_set, None)
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
    latest = latest_findings_per_reader(label_set, None)
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
