"""Reads: what a user may see, and lists for pages."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
from django.db.models import Count, Exists, OuterRef, Prefetch, Q, QuerySet
from django.http import Http404

from annotator.models import (
    Annotation,
    FindingAnswer,
    ImportJob,
    LabelClass,
    LabelSet,
    Membership,
    Project,
    Scan,
)


def project_list_for_user(user) -> QuerySet[Project]:
    projects = Project.objects.all() if user.is_superuser else Project.objects.filter(members=user)
    return projects.annotate(
        scan_count=Count("scans", distinct=True),
    ).order_by("name")


def project_get_for_user(user, project_id: int, *, roles: tuple[str, ...] | None = None) -> Project:
    """The project if ``user`` is a member (with one of ``roles``), else 404.

    Outsiders get 404, not 403, so project ids do not leak.
    """
    project = Project.objects.filter(pk=project_id).first()
    if project is None:
        raise Http404("No such project.")
    role = project.role_of(user)
    if role is None:
        raise Http404("No such project.")
    if roles is not None and role not in roles and role != Membership.Role.ADMIN:
        raise Http404("No such project.")
    return project


def scan_get_for_user(user, scan_id: int) -> Scan:
    """The scan if ``user`` may see it, else 404. Quarantined scans: project admins only."""
    scan = Scan.objects.select_related("project", "dataset").filter(pk=scan_id).first()
    role = None if scan is None else scan.project.role_of(user)
    if role is None or (scan.quarantined and role != Membership.Role.ADMIN):
        raise Http404("No such scan.")
    return scan


def import_job_get_for_user(user, job_id: int) -> ImportJob:
    job = ImportJob.objects.select_related("project").filter(pk=job_id).first()
    if job is None or job.project.role_of(user) is None:
        raise Http404("No such import.")
    return job


def latest_of_each_reader(answers: QuerySet[Annotation]) -> QuerySet[Annotation]:
    """``answers`` less those that a newer answer with the same outcome by the same reader on
    the same scan replaces: each reader's latest vote, as training counts them (an
    adjudication apart from the readings; an answer with no reader, an import, counts alone)."""
    newer = (Annotation.objects.filter(scan=OuterRef("scan"), reader=OuterRef("reader"),
                                       outcome=OuterRef("outcome"))
             .filter(Q(created_at__gt=OuterRef("created_at"))
                     | Q(created_at=OuterRef("created_at"), pk__gt=OuterRef("pk"))))
    adjudication = Annotation.Source.ADJUDICATION
    return answers.filter(
        (Q(source=adjudication) & ~Q(Exists(newer.filter(source=adjudication))))
        | (~Q(source=adjudication) & ~Q(Exists(newer.exclude(source=adjudication)))))


def label_class_counts(project: Project) -> QuerySet[LabelClass]:
    """The project's classes with ``labels`` (and, for findings, ``present``): each reader's
    latest answer on a scan counted once, so a double submit or a changed mind is not
    counted twice."""
    labels = latest_of_each_reader(Annotation.objects.filter(
        project=project, outcome=Annotation.Outcome.LABEL))
    findings = latest_of_each_reader(Annotation.objects.filter(
        project=project, outcome=Annotation.Outcome.FINDINGS))
    return project.label_classes.annotate(
        labels=Count("annotations", filter=Q(annotations__in=labels.values("pk")),
                     distinct=True),
        present=Count("answers", filter=Q(answers__state="present",
                                          answers__annotation__in=findings.values("pk")),
                      distinct=True),
    )


def class_examples(project: Project, label_class: LabelClass, user) -> QuerySet[Scan]:
    """The scans read as ``label_class`` (a finding: read with it present) in answers
    ``user`` may see (``answers_visible``), newest scan first: the class page's examples."""
    if label_class.label_set.is_multi:
        answers = Annotation.objects.filter(findings__finding=label_class,
                                            findings__state=FindingAnswer.State.PRESENT)
    else:
        answers = Annotation.objects.filter(label_class=label_class,
                                            outcome=Annotation.Outcome.LABEL)
    answers = answers_visible(project, user, answers.filter(project=project))
    return Scan.objects.filter(pk__in=answers.values("scan_id")).order_by("-pk")


BLIND_DOWNLOAD = ("Blind reading: this project hides other readers' answers from its readers, "
                  "so the labels download (every reader's answer) is for its reviewers and "
                  "admins.")


def reads_blind(project: Project, user) -> bool:
    """Whether ``user`` reads ``project`` blind everywhere, not only on the label page: a
    reader in a project with blind second readers. Admins run the project and reviewers
    adjudicate (their review page shows the readers' answers), so both see everything."""
    return bool(project.blind_second_readers) and project.role_of(user) == Membership.Role.CLINICIAN


def answers_visible(project: Project, user, answers: QuerySet[Annotation]) -> QuerySet[Annotation]:
    """``answers`` as ``user`` may see them: for a blind reader, other readers' answers on a
    scan only once they have answered it themselves. Imported labels stay visible (no
    reader gave them, and a scan imported with a label is read first, not second)."""
    if not reads_blind(project, user):
        return answers
    answered = Annotation.objects.filter(scan=OuterRef("scan"), reader=user)
    return answers.filter(Q(reader=user) | Q(source=Annotation.Source.IMPORT)
                          | Q(Exists(answered)))


def visible_label_names(project: Project, user, scan_ids) -> dict[int, list[str]]:
    """``{scan id: [class name, ...]}``: each scan's labels, newest first and each once, from
    the answers ``user`` may see (``answers_visible``; ``user`` None: every answer)."""
    answers = Annotation.objects.filter(scan_id__in=list(scan_ids),
                                        outcome=Annotation.Outcome.LABEL)
    if user is not None:
        answers = answers_visible(project, user, answers)
    names: dict[int, list[str]] = {}
    for scan_id, name in answers.order_by("-created_at", "-pk").values_list(
            "scan_id", "label_class__name"):
        shown = names.setdefault(scan_id, [])
        if name not in shown:
            shown.append(name)
    return names


def hidden_answers_count(project: Project, user, scan: Scan) -> int:
    """How many of ``scan``'s answers blind reading hides from ``user`` (0 for most)."""
    if not reads_blind(project, user):
        return 0
    everything = Annotation.objects.filter(scan=scan)
    return everything.count() - answers_visible(project, user, everything).count()


EVAL_ROLES = (Membership.Role.REVIEWER, Membership.Role.ADMIN)
EVAL_ANSWER_REFUSED = ("Scan {scan} is in the evaluation split: its labels are the fixed test "
                       "set every model is scored on (labeled once, never queried), so only "
                       "the project's reviewers and admins may read it here. Nothing was "
                       "saved.")
EVAL_UPLOAD_REFUSED = ("Only the project's reviewers and admins add scans to the evaluation "
                       "split (eval or an automatic split): its labels are the fixed test set "
                       "every model is scored on. Upload into the pool instead.")


def may_change_eval(project: Project, user) -> bool:
    """Whether ``user`` may label eval scans or add scans to eval: the project's reviewers
    and admins (eval is labeled once, at import or by them; readers' answers would move the
    scores every model is compared on)."""
    return project.role_of(user) in EVAL_ROLES


def eval_answer_refusal(project: Project, scan: Scan, user) -> str | None:
    """Why ``user`` may not read or answer ``scan`` on the label page (an eval scan and not a
    reviewer or admin), or None."""
    if scan.split == "eval" and not may_change_eval(project, user):
        return EVAL_ANSWER_REFUSED.format(scan=scan.pk)
    return None


def eval_upload_refusal(project: Project, user, split: str) -> str | None:
    """Why ``user`` may not upload into ``split`` (eval, or ``auto:F``, which sends some
    patients to eval), or None."""
    if split != "pool" and not may_change_eval(project, user):
        return EVAL_UPLOAD_REFUSED
    return None


def _unread_second_reading(user, scan=OuterRef("scan")) -> Q:
    """Scans another reader has read (imports aside) and ``user`` has not answered yet: what a
    blind reader reads second, so sees no model for (as on the label page)."""
    read_by_others = (Annotation.objects.filter(scan=scan, outcome__in=Annotation.LABELLING)
                      .exclude(reader=user).exclude(source=Annotation.Source.IMPORT))
    answered = Annotation.objects.filter(scan=scan, reader=user)
    return Q(Exists(read_by_others)) & ~Q(Exists(answered))


def read_blind_scan_ids(project: Project, user, scan_ids) -> set[int]:
    """Among ``scan_ids``, the scans whose model view is hidden from ``user`` (a blind reader
    who would read them second)."""
    if not reads_blind(project, user):
        return set()
    return set(Scan.objects.filter(pk__in=list(scan_ids))
               .filter(_unread_second_reading(user, OuterRef("pk")))
               .values_list("pk", flat=True))


def predictions_visible(project: Project, user, predictions: QuerySet) -> QuerySet:
    """``predictions`` (any model's, one row per scan) less, for a blind reader, those of
    scans they would read second."""
    if not reads_blind(project, user):
        return predictions
    return predictions.exclude(_unread_second_reading(user))


def scan_list_for_project(project: Project, *, split: str | None = None,
                          include_quarantined: bool = False, user=None) -> QuerySet[Scan]:
    """The project's scans with their answers (those ``user`` may see, when given)."""
    answers = Annotation.objects.select_related("label_class").prefetch_related(
        "findings__finding")
    if user is not None:
        answers = answers_visible(project, user, answers)
    scans = project.scans.select_related("dataset").prefetch_related(
        Prefetch("annotations", queryset=answers))
    if not include_quarantined:
        scans = scans.filter(quarantined=False)
    if split:
        scans = scans.filter(split=split)
    return scans.order_by("id")


def eval_labeled_count(project: Project) -> int:
    """Eval-split scans with at least one label or findings answer: what a first classifier
    (or findings model) is scored on."""
    return (Annotation.objects.filter(project=project, scan__split="eval",
                                      outcome__in=Annotation.LABELLING)
            .order_by().values("scan_id").distinct().count())


def project_stats(project: Project) -> dict:
    """The project page's numbers: one pass over the scans (one aggregate, not a count
    each) and the labeled scans from the answers' side (issue 21)."""
    counts = Scan.objects.filter(project=project).aggregate(
        scans=Count("pk"), pool=Count("pk", filter=Q(split="pool")),
        eval=Count("pk", filter=Q(split="eval")),
        visible=Count("pk", filter=Q(quarantined=False)),
        visible_pool=Count("pk", filter=Q(quarantined=False, split="pool")),
        visible_eval=Count("pk", filter=Q(quarantined=False, split="eval")))
    answers = Annotation.objects.filter(project=project).order_by()
    return {
        **counts,
        "labeled": answers.filter(outcome__in=Annotation.LABELLING).values("scan_id")
        .distinct().count(),
        "annotations": answers.count(),
    }


def training_runs_for_project(project: Project, *, limit: int = 8):
    """The project's running and queued ML runs first, then the latest finished ones."""
    from ml_backend.models import TrainingRun

    runs = TrainingRun.objects.filter(project=project).select_related("model_version")
    active = list(runs.filter(status__in=["queued", "running"]).order_by("created_at"))
    done = list(runs.exclude(status__in=["queued", "running"]).order_by("-created_at")[:limit])
    return active + done[: max(0, limit - len(active))]


def reader_key(reader_id: int | None, source: str, annotation_id: int) -> str:
    """Who gave an answer, for counting readings and votes: the user, or, for an answer with
    no user (an import, an unmatched Label Studio annotator), that answer alone."""
    return f"reader-{reader_id}" if reader_id else f"{source}-{annotation_id}"


def training_labels(project: Project, *, split: str) -> tuple[list[Scan], list[int]]:
    """The label each labeled scan of ``split`` adds up to, as the models train and are
    evaluated on it: an adjudication if any; else each reader's latest label is one vote and
    the project's ``disagreement_rule`` decides — ``majority``: the most common label, a tie
    held out; ``hold_out``: readers who disagree hold the scan out until it is adjudicated.
    Returns the scans and their LabelClass ids, by scan id."""
    annotations = (Annotation.objects
                   .filter(scan__project=project, scan__split=split,
                           outcome=Annotation.Outcome.LABEL)
                   .order_by("created_at", "pk")
                   .values_list("scan_id", "label_class_id", "source", "reader_id", "pk"))
    rule = (project.disagreement_rule if isinstance(project, Project)
            else Project.objects.values_list("disagreement_rule", flat=True).get(pk=project))
    votes: dict[int, dict[str, int]] = {}
    adjudicated: dict[int, int] = {}
    for scan_id, class_id, source, reader_id, pk in annotations:
        if source == Annotation.Source.ADJUDICATION:
            adjudicated[scan_id] = class_id
            continue
        # one vote per reader (their latest); an import or a reader-less answer votes alone
        votes.setdefault(scan_id, {})[reader_key(reader_id, source, pk)] = class_id
    chosen = dict(adjudicated)
    for scan_id, by_reader in votes.items():
        if scan_id in chosen:
            continue
        counts = Counter(by_reader.values())
        ranked = counts.most_common()
        if len(ranked) == 1:
            chosen[scan_id] = ranked[0][0]
        elif rule == "majority" and ranked[0][1] > ranked[1][1]:
            chosen[scan_id] = ranked[0][0]
        # else: a tie, or any disagreement under hold_out, waits for adjudication
    scans = Scan.objects.in_bulk(list(chosen))
    ordered = sorted(chosen)
    return [scans[i] for i in ordered], [chosen[i] for i in ordered]


def held_out_disagreements(project: Project, *, split: str = "pool") -> int:
    """How many labeled scans of ``split`` the disagreement rule keeps out of training."""
    labeled = (Annotation.objects.filter(scan__project=project, scan__split=split,
                                         outcome=Annotation.Outcome.LABEL)
               .values("scan_id").distinct().count())
    return labeled - len(training_labels(project, split=split)[0])


def class_label_sets(project) -> dict[int, int]:
    """{class id: label set id} for the project's classes (``project``: a Project or its id)."""
    return dict(LabelClass.objects.filter(project_id=getattr(project, "pk", project))
                .values_list("pk", "label_set_id"))


# --- findings sets (reads; the ML adapter trains on findings_targets) ----------------------


def findings_for_set(label_set: LabelSet) -> list[LabelClass]:
    """The set's findings in display order."""
    return list(label_set.classes.order_by("order", "name"))


def latest_findings_per_reader(label_set: LabelSet, split: str | None):
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
    latest = latest_findings_per_reader(label_set, split)
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


def patients_in_both_splits(project: Project) -> dict[str, int]:
    """How far eval is from patient-disjoint: the patients (and, for scans without a patient
    key, the studies) with scans in both eval and pool, and the eval scans they hold."""
    scans = Scan.objects.filter(project=project)
    counts = {}
    for field_name, word in (("patient_key", "patients"), ("study_key", "studies")):
        keyed = scans.exclude(**{field_name: ""})
        if word == "studies":
            keyed = keyed.filter(patient_key="")
        # the database intersects: only shared keys travel, not a key per pool scan
        both = set(keyed.filter(split="pool", **{f"{field_name}__in": keyed.filter(
            split="eval").values(field_name)}).order_by().values_list(
            field_name, flat=True).distinct())
        counts[word] = len(both)
        counts[f"eval_scans_{word}"] = keyed.filter(split="eval", **{
            f"{field_name}__in": both}).count() if both else 0
    return counts


def patient_overlap_words(project: Project) -> str:
    """A warning in words when eval shares patients (or studies) with the pool; ``""``
    when it does not."""
    counts = patients_in_both_splits(project)
    singular = {"patients": "patient", "studies": "study"}
    parts = [f"{counts[w]} {singular[w] if counts[w] == 1 else w}"
             for w in ("patients", "studies") if counts[w]]
    if not parts:
        return ""
    held = counts["eval_scans_patients"] + counts["eval_scans_studies"]
    verb = "has" if counts["patients"] + counts["studies"] == 1 else "have"
    return (f"Eval is not patient-disjoint: {' and '.join(parts)} {verb} scans in both eval and "
            f"the pool ({held} eval scan(s)), so eval figures may flatter the model. Import "
            "with --split auto:0.2 to keep whole patients on one side.")

