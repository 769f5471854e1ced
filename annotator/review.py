"""The reviewer's work: scans whose readers disagree, scans flagged as likely label errors,
per-class reader agreement (Cohen's kappa), and adjudication.

Reads (``disagreements``, ``agreement_by_class``, ``flagged``) and the one write
(``adjudicate``) live together because they share one notion of a *reader*:

* a reader is whoever gave a LABEL answer from the web UI or Label Studio, keyed by user
  (``user:<id>``; an answer with no user is keyed by its source, e.g. ``label_studio``);
* import labels count as one more reader called ``import`` (whoever ran the import): a
  clinician who contradicts the label a data set arrived with is a disagreement a reviewer
  should settle, and training would otherwise silently break the tie by recency;
* adjudications are not readers: they settle disagreements and are never counted in the
  agreement statistics;
* only each reader's *latest* LABEL answer on a scan counts (a reader who changes their
  mind does not disagree with themselves); skips and "unsure" answers are not answers here.

An adjudication is an ``Annotation`` with ``source=adjudication``;
``annotator.selectors.training_labels`` prefers the latest one over the readers' votes, so
the reviewer's answer is the label training uses.

An adjudication is a decision on what the reviewer was shown: each review row carries a
``seen`` token (the ids of the readers' latest answers and of the latest adjudication it
showed) and ``adjudicate(seen=...)`` refuses (``AdjudicationConflict``, a 409 on the page)
when the scan's answers or adjudication changed since, under a lock on the scan row: two
reviewers deciding the same scan at once, or a reader changing their answer while the page
was open, never store a decision made on what is no longer there.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from itertools import combinations

from django.db import transaction

from annotator.models import Annotation, LabelClass, Membership, Project, Scan
from annotator.services import annotation_create
from medsite.when import in_words

#: Fewer reader pairs than this and a kappa is not reported (it would mostly be noise).
MIN_PAIRS = 5

IMPORT_READER = "import"
_READER_SOURCES = (Annotation.Source.WEB, Annotation.Source.LABEL_STUDIO, Annotation.Source.IMPORT)
REVIEW_ROLES = (Membership.Role.REVIEWER, Membership.Role.ADMIN)


class ReviewError(Exception):
    """An adjudication cannot be recorded as asked (class of another project, wrong role)."""


class AdjudicationConflict(ReviewError):
    """The scan's answers or adjudication changed since the reviewer's page showed them:
    nothing was stored. ``changes`` says what changed, one phrase each (who, what, when)."""

    def __init__(self, changes: list[str]):
        self.changes = changes
        super().__init__("the answers on this scan changed since you opened this page: "
                         f"{'; '.join(changes)}; reload to see them")


# --- rows shown on the review page -------------------------------------------------------


@dataclass
class ReaderAnswer:
    """One reader's latest label on a scan and what they were shown when answering."""

    reader_key: str
    reader: str                   # display name: the username, or "import"
    annotation: Annotation

    @property
    def label_class(self) -> LabelClass:
        return self.annotation.label_class

    @property
    def created_at(self) -> datetime:
        return self.annotation.created_at


@dataclass
class ReviewRow:
    """A scan to adjudicate: the readers' answers, the current training label and the
    active model's prediction (None when it has none for this scan)."""

    scan: Scan
    answers: list[ReaderAnswer]
    training_label: LabelClass | None = None
    prediction: object | None = None          # ml_backend.models.Prediction
    last_adjudication: Annotation | None = None
    reason: dict = field(default_factory=dict)   # flagged rows: the label_review item's reason
    query_item: object | None = None             # flagged rows: the ml_backend QueryItem

    @property
    def seen(self) -> str:
        """What this row shows, as the adjudication form sends it back (``Seen.token``)."""
        return Seen.of([a.annotation for a in self.answers], self.last_adjudication).token


@dataclass
class ClassAgreement:
    label_class: LabelClass
    kappa: float | None
    reason: str                   # why kappa is None; empty otherwise
    answers: int                  # paired answers (two per pair) that chose this class


@dataclass
class Agreement:
    """Reader agreement over scans read by at least two distinct readers."""

    scans: int
    pairs: int
    kappa: float | None           # multi-class Cohen's kappa over all pairs
    reason: str
    per_class: list[ClassAgreement]


# --- shared reads ------------------------------------------------------------------------


def _reader_key(annotation: Annotation) -> str:
    if annotation.source == Annotation.Source.IMPORT:
        return IMPORT_READER
    if annotation.reader_id is not None:
        return f"user:{annotation.reader_id}"
    return annotation.source


def _reader_order(key: str) -> tuple:
    """Users by id first, then readers without a user (Label Studio), ``import`` last."""
    if key.startswith("user:"):
        return (0, int(key[5:]), "")
    return (1 if key != IMPORT_READER else 2, 0, key)


def _stamp(annotation: Annotation) -> tuple:
    return (annotation.created_at, annotation.pk)


def _latest_answers(project: Project, scan_ids=None
                    ) -> tuple[dict[int, dict[str, Annotation]], dict[int, Annotation]]:
    """Per scan: {reader key: latest LABEL answer}, and the latest adjudication."""
    rows = (Annotation.objects
            .filter(scan__project=project, outcome=Annotation.Outcome.LABEL)
            .select_related("label_class", "reader", "shown_suggestion")
            .order_by("created_at", "pk"))
    if scan_ids is not None:
        rows = rows.filter(scan_id__in=list(scan_ids))
    answers: dict[int, dict[str, Annotation]] = {}
    adjudications: dict[int, Annotation] = {}
    for annotation in rows:
        if annotation.source == Annotation.Source.ADJUDICATION:
            adjudications[annotation.scan_id] = annotation
        elif annotation.source in _READER_SOURCES:
            answers.setdefault(annotation.scan_id, {})[_reader_key(annotation)] = annotation
    return answers, adjudications


def _answer_rows(by_reader: dict[str, Annotation]) -> list[ReaderAnswer]:
    out = []
    for key, annotation in by_reader.items():
        name = (IMPORT_READER if key == IMPORT_READER
                else annotation.reader.get_username() if annotation.reader_id else key)
        out.append(ReaderAnswer(reader_key=key, reader=name, annotation=annotation))
    return sorted(out, key=lambda a: _stamp(a.annotation))


def _training_labels(project: Project, scan_ids: set[int]) -> dict[int, LabelClass]:
    """The label training uses for each scan (the same function training calls)."""
    from annotator.selectors import training_labels

    splits = set(Scan.objects.filter(pk__in=scan_ids).values_list("split", flat=True))
    chosen: dict[int, int] = {}
    for split in splits:
        scans, class_ids = training_labels(project, split=split)
        chosen.update({s.pk: c for s, c in zip(scans, class_ids) if s.pk in scan_ids})
    classes = LabelClass.objects.in_bulk(set(chosen.values()))
    return {scan_id: classes[class_id] for scan_id, class_id in chosen.items()}


def _predictions(project: Project, scan_ids: set[int]) -> dict[int, object]:
    from ml_backend.models import Prediction

    if project.active_model_id is None or not scan_ids:
        return {}
    rows = (Prediction.objects.filter(model_version_id=project.active_model_id,
                                      scan_id__in=scan_ids)
            .select_related("predicted_class"))
    return {p.scan_id: p for p in rows}


def _decorate(project: Project, rows: list[ReviewRow]) -> list[ReviewRow]:
    ids = {row.scan.pk for row in rows}
    labels, predictions = _training_labels(project, ids), _predictions(project, ids)
    for row in rows:
        row.training_label = labels.get(row.scan.pk)
        row.prediction = predictions.get(row.scan.pk)
    return rows


# --- selectors ---------------------------------------------------------------------------


def disagreements(project: Project) -> list[ReviewRow]:
    """Scans (any split) whose readers' latest labels name different classes, unless an
    adjudication is newer than the latest of those labels. Ordered by scan id.

    Each row carries every reader's latest answer (who, class, when, what they were shown),
    the label training currently uses for the scan and the active model's prediction.
    """
    answers, adjudications = _latest_answers(project)
    open_ids = []
    for scan_id, by_reader in answers.items():
        if len(by_reader) < 2 or len({a.label_class_id for a in by_reader.values()}) < 2:
            continue
        latest = max(_stamp(a) for a in by_reader.values())
        adjudication = adjudications.get(scan_id)
        if adjudication is not None and _stamp(adjudication) > latest:
            continue
        open_ids.append(scan_id)
    scans = Scan.objects.select_related("dataset").in_bulk(open_ids)
    rows = [ReviewRow(scan=scans[scan_id], answers=_answer_rows(answers[scan_id]),
                      last_adjudication=adjudications.get(scan_id))
            for scan_id in sorted(open_ids)]
    return _decorate(project, rows)


def flagged(project: Project) -> list[ReviewRow]:
    """The items of the project's latest ``label_review`` round (likely label errors from
    ``ml_backend.services.label_quality_check``) whose scan has had no adjudication since the
    round was created, in the round's rank order (worst first)."""
    round_ = latest_quality_round(project)
    if round_ is None:
        return []
    items = list(round_.items.select_related("scan", "scan__dataset").order_by("rank"))
    ids = {item.scan_id for item in items}
    answers, adjudications = _latest_answers(project, ids)
    rows = []
    for item in items:
        adjudication = adjudications.get(item.scan_id)
        if adjudication is not None and adjudication.created_at > round_.created_at:
            continue
        rows.append(ReviewRow(scan=item.scan, answers=_answer_rows(answers.get(item.scan_id, {})),
                              last_adjudication=adjudication, reason=item.reason or {},
                              query_item=item))
    return _decorate(project, rows)


def latest_quality_round(project: Project):
    """The project's most recent label-quality round, or None."""
    from ml_backend.models import QueryRound

    return (QueryRound.objects.filter(project=project, strategy="label_review")
            .order_by("-created_at", "-pk").first())


def _kappa(a: list, b: list, labels: list) -> float | None:
    from sklearn.metrics import cohen_kappa_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # undefined (one label everywhere) → NaN → None
        value = float(cohen_kappa_score(a, b, labels=labels))
    return value if math.isfinite(value) else None


def agreement_by_class(project: Project) -> Agreement:
    """Cohen's kappa between readers, per class (one-vs-rest) and overall (multi-class).

    Based on every scan (any split) read by at least two distinct readers: for each such
    scan, every pair of distinct readers' latest answers is one paired observation. Within a
    pair the rater order is fixed (users by id, then readers without a user, ``import``
    last), so the result does not depend on query order. Kappa is None, with the reason,
    when there are fewer than ``MIN_PAIRS`` pairs or it is undefined (a class chosen in no
    paired answer, or in all of them).
    """
    answers, _ = _latest_answers(project)
    first: list[int] = []
    second: list[int] = []
    scans = 0
    for by_reader in answers.values():
        if len(by_reader) < 2:
            continue
        scans += 1
        keys = sorted(by_reader, key=_reader_order)
        for a, b in combinations(keys, 2):
            first.append(by_reader[a].label_class_id)
            second.append(by_reader[b].label_class_id)
    pairs = len(first)
    classes = list(project.label_classes.exclude(label_set__kind="multi"))   # findings: apart
    if pairs < MIN_PAIRS:
        reason = (f"{pairs} reader pair{'s' if pairs != 1 else ''} on {scans} "
                  f"scan{'s' if scans != 1 else ''}: at least {MIN_PAIRS} are needed "
                  "(scans read by two or more readers)")
        return Agreement(scans=scans, pairs=pairs, kappa=None, reason=reason, per_class=[
            ClassAgreement(label_class=c, kappa=None, reason="too few reader pairs",
                           answers=first.count(c.pk) + second.count(c.pk)) for c in classes])

    per_class = []
    for label_class in classes:
        a = [c == label_class.pk for c in first]
        b = [c == label_class.pk for c in second]
        chosen = sum(a) + sum(b)
        kappa, reason = None, ""
        if chosen == 0:
            reason = "no reader chose this class on a scan read twice"
        elif chosen == 2 * pairs:
            reason = "every paired answer is this class: kappa is undefined"
        else:
            kappa = _kappa(a, b, [False, True])
            reason = "" if kappa is not None else "kappa is undefined for these answers"
        per_class.append(ClassAgreement(label_class=label_class, kappa=kappa, reason=reason,
                                        answers=chosen))
    used = sorted(set(first) | set(second))
    overall = _kappa(first, second, used) if len(used) > 1 else None
    reason = "" if overall is not None else "every paired answer names the same class"
    return Agreement(scans=scans, pairs=pairs, kappa=overall, reason=reason, per_class=per_class)


# --- the write ---------------------------------------------------------------------------

#: A ``seen`` token longer than this is not one a review page wrote.
SEEN_MAX_CHARS = 4000


@dataclass(frozen=True)
class Seen:
    """What a review row showed: the ids of the readers' latest LABEL answers and of the
    latest adjudication. Its token, ``"12,15;20"`` (answers ``;`` adjudication, which may
    be empty), travels in the adjudication form."""

    answer_ids: frozenset[int]
    adjudication_id: int | None

    @classmethod
    def of(cls, answers, adjudication: Annotation | None) -> Seen:
        return cls(frozenset(a.pk for a in answers),
                   adjudication.pk if adjudication is not None else None)

    @property
    def token(self) -> str:
        adjudication = "" if self.adjudication_id is None else str(self.adjudication_id)
        return f"{','.join(map(str, sorted(self.answer_ids)))};{adjudication}"

    @classmethod
    def parse(cls, token: str) -> Seen:
        def an_id(text: str) -> bool:          # a row id (a bigint), not any number
            return text.isascii() and text.isdigit() and len(text) <= 18

        answers, sep, adjudication = (token or "").strip().partition(";")
        ids = answers.split(",") if answers else []
        if (not sep or len(token) > SEEN_MAX_CHARS or not all(an_id(i) for i in ids)
                or not (adjudication == "" or an_id(adjudication))):
            raise ReviewError("the form did not say which answers it was decided on (its "
                              "'seen' field is not one the review page writes); reload the "
                              "page and decide again")
        return cls(frozenset(int(i) for i in ids), int(adjudication) if adjudication else None)


@dataclass
class Adjudicated:
    """A stored adjudication and the earlier one it replaces as the training label (None
    when the scan had none)."""

    annotation: Annotation
    replaced: Annotation | None

    @property
    def replaced_in_words(self) -> str:
        """E.g. "bob's adjudication as glioma of 2026-12-07 14:03:12"; empty if none."""
        if self.replaced is None:
            return ""
        return (f"{_who(self.replaced)}'s adjudication as {_class_name(self.replaced)} of "
                f"{_when(self.replaced)}")


def _when(annotation: Annotation) -> str:
    return in_words(annotation.created_at, seconds=True)


def _who(annotation: Annotation) -> str:
    if annotation.source == Annotation.Source.IMPORT:
        return IMPORT_READER
    return (annotation.reader.get_username() if annotation.reader_id
            else annotation.get_source_display())


def _class_name(annotation: Annotation) -> str:
    return annotation.label_class.name if annotation.label_class_id else "?"


def _changes(scan: Scan, seen: Seen, by_reader: dict[str, Annotation],
             adjudication: Annotation | None) -> list[str]:
    """What differs between what the page showed (``seen``) and the scan now, in words."""
    ids = set(seen.answer_ids) | ({seen.adjudication_id} - {None})
    shown = {a.pk: a for a in Annotation.objects.filter(scan=scan, pk__in=ids)
             .select_related("label_class", "reader")}
    shown_by_reader = {_reader_key(shown[i]): shown[i] for i in sorted(seen.answer_ids)
                       if i in shown}
    gone = [i for i in seen.answer_ids if i not in shown]
    changes = []
    for key, now in sorted(by_reader.items(), key=lambda kv: _stamp(kv[1])):
        before = shown_by_reader.get(key)
        if before is not None and before.pk == now.pk:
            continue
        if before is None:
            verb = "'s latest answer is now" if gone else " answered"
            changes.append(f"{_who(now)}{verb} {_class_name(now)} ({_when(now)})")
        elif before.label_class_id == now.label_class_id:
            changes.append(f"{_who(now)} answered {_class_name(now)} again ({_when(now)})")
        else:
            changes.append(f"{_who(now)} now answers {_class_name(now)} (was "
                           f"{_class_name(before)}; {_when(now)})")
    for key, before in shown_by_reader.items():
        if key not in by_reader:
            changes.append(f"{_who(before)}'s answer {_class_name(before)} was taken back")
    if gone:
        changes.append(f"{len(gone)} answer{'s' if len(gone) != 1 else ''} you saw "
                       f"{'were' if len(gone) != 1 else 'was'} taken back or deleted")
    current_id = adjudication.pk if adjudication is not None else None
    if current_id != seen.adjudication_id:
        if adjudication is not None:
            changes.append(f"{_who(adjudication)} adjudicated it as {_class_name(adjudication)} "
                           f"({_when(adjudication)})")
        else:
            earlier = shown.get(seen.adjudication_id)
            changes.append("the adjudication you saw" + (
                f" ({_who(earlier)}: {_class_name(earlier)})" if earlier else "")
                + " was removed")
    return changes or ["its answers are not the ones this page showed"]


def adjudicate(*, scan: Scan, reviewer, label_class: LabelClass, note: str = "",
               seen: str | Seen | None = None) -> Adjudicated:
    """Record the reviewer's decision as an adjudication: the label training uses from now
    on (until a reader labels the scan again and a newer disagreement opens).

    ``seen`` is what the reviewer decided on (a ``Seen`` or its token, from the review
    row). Under a lock on the scan row (``SELECT ... FOR UPDATE`` on PostgreSQL; on SQLite
    the write transaction, begun IMMEDIATE, is the lock), the scan's latest answers and
    adjudication are compared with it: any difference raises ``AdjudicationConflict``
    naming it, and nothing is stored. Of two reviewers deciding on the same page at once,
    one is stored and the other is told who decided what. Without ``seen`` (a caller from
    before the token) the adjudication is stored, serialized under the same lock, and the
    result names the adjudication it replaces.
    """
    if label_class.project_id != scan.project_id:
        raise ReviewError(f"class {label_class.name!r} is not a class of this project")
    if scan.project.role_of(reviewer) not in REVIEW_ROLES:
        raise ReviewError("only reviewers and project admins may adjudicate")
    if isinstance(seen, str):
        seen = Seen.parse(seen)
    with transaction.atomic():
        locked = Scan.objects.select_for_update().filter(pk=scan.pk).first()
        if locked is None:
            raise ReviewError(f"scan {scan.pk} was deleted meanwhile")
        answers, adjudications = _latest_answers(scan.project, [scan.pk])
        by_reader, current = answers.get(scan.pk, {}), adjudications.get(scan.pk)
        if seen is not None and seen != Seen.of(by_reader.values(), current):
            raise AdjudicationConflict(_changes(scan, seen, by_reader, current))
        annotation = annotation_create(scan=locked, reader=reviewer, label_class=label_class,
                                       source=Annotation.Source.ADJUDICATION,
                                       note=note.strip())
    return Adjudicated(annotation=annotation, replaced=current)


# --- readers dashboard (project admins) ---------------------------------------------------


@dataclass
class ReaderStats:
    reader: str
    answers: int = 0
    labels: int = 0
    skips: int = 0
    unsure: int = 0
    median_seconds: float | None = None
    per_hour: float | None = None
    adjudicated: int = 0
    agree_adjudication: float | None = None
    shown_suggestion: int = 0
    took_suggestion: float | None = None
    last: datetime | None = None


IDLE_CAP_MEDIANS = 10


def reader_stats(project: Project) -> list[ReaderStats]:
    """Per reader (web and Label Studio answers): how much, how fast, and how often their
    latest label agrees with the reviewer's adjudication of the same scan. ``per_hour`` is
    answers per hour of reading time (the time each answer took on screen, summed), not per
    hour on the clock; ``took_suggestion`` is the share of labels given with a model
    suggestion on screen that matched it (a high share with low adjudication agreement is a
    sign of anchoring)."""
    rows = list(Annotation.objects.filter(scan__project=project,
                                          source__in=(Annotation.Source.WEB,
                                                      Annotation.Source.LABEL_STUDIO))
                .select_related("reader").order_by("created_at", "pk"))
    adjudicated = {}
    for a in Annotation.objects.filter(scan__project=project,
                                       source=Annotation.Source.ADJUDICATION).order_by(
            "created_at", "pk"):
        adjudicated[a.scan_id] = a.label_class_id
    by_reader: dict[str, list[Annotation]] = {}
    for a in rows:
        name = a.reader.get_username() if a.reader_id else a.get_source_display()
        by_reader.setdefault(name, []).append(a)
    out = []
    for name, answers in sorted(by_reader.items()):
        stats = ReaderStats(reader=name, answers=len(answers), last=answers[-1].created_at)
        stats.labels = sum(a.outcome in Annotation.LABELLING for a in answers)
        stats.skips = sum(a.outcome == Annotation.Outcome.SKIP for a in answers)
        stats.unsure = sum(a.outcome == Annotation.Outcome.UNSURE for a in answers)
        durations = sorted(a.duration_ms for a in answers if a.duration_ms)
        if durations:
            median = durations[len(durations) // 2]
            stats.median_seconds = median / 1000
            # an answer on screen for more than ten times the reader's median counts as ten
            # medians: a tab left open over lunch is not reading (the label page counts only
            # active, visible time since the tenth probe; Label Studio's lead times do not)
            reading = sum(min(d, IDLE_CAP_MEDIANS * median) for d in durations)
            stats.per_hour = len(durations) / (reading / 3_600_000)
        latest = {a.scan_id: a for a in answers if a.outcome == Annotation.Outcome.LABEL}
        judged = [a for scan_id, a in latest.items() if scan_id in adjudicated]
        stats.adjudicated = len(judged)
        if judged:
            stats.agree_adjudication = sum(a.label_class_id == adjudicated[a.scan_id]
                                           for a in judged) / len(judged)
        shown = [a for a in answers if a.outcome == Annotation.Outcome.LABEL
                 and a.shown_suggestion_id]
        stats.shown_suggestion = len(shown)
        if shown:
            stats.took_suggestion = sum(a.label_class_id == a.shown_suggestion_id
                                        for a in shown) / len(shown)
        out.append(stats)
    return out
