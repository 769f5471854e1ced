"""Reads: what a user may see, and lists for pages."""

from __future__ import annotations

from collections import Counter

from django.db.models import Count, Q, QuerySet
from django.http import Http404

from annotator.models import (
    Annotation,
    ImportJob,
    LabelClass,
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


def label_class_counts(project: Project) -> QuerySet[LabelClass]:
    return project.label_classes.annotate(
        labels=Count("annotations", filter=Q(annotations__outcome=Annotation.Outcome.LABEL),
                     distinct=True),
        present=Count("answers", filter=Q(answers__state="present"), distinct=True),
    )


def scan_list_for_project(project: Project, *, split: str | None = None,
                          include_quarantined: bool = False) -> QuerySet[Scan]:
    scans = project.scans.select_related("dataset").prefetch_related("annotations__label_class")
    if not include_quarantined:
        scans = scans.filter(quarantined=False)
    if split:
        scans = scans.filter(split=split)
    return scans.order_by("id")


def project_stats(project: Project) -> dict:
    scans = project.scans
    labeled = scans.filter(annotations__outcome=Annotation.Outcome.LABEL).distinct().count()
    return {
        "scans": scans.count(),
        "pool": scans.filter(split="pool").count(),
        "eval": scans.filter(split="eval").count(),
        "labeled": labeled,
        "annotations": Annotation.objects.filter(scan__project=project).count(),
    }


def training_runs_for_project(project: Project, *, limit: int = 8):
    """The project's running and queued ML runs first, then the latest finished ones."""
    from ml_backend.models import TrainingRun

    runs = TrainingRun.objects.filter(project=project).select_related("model_version")
    active = list(runs.filter(status__in=["queued", "running"]).order_by("created_at"))
    done = list(runs.exclude(status__in=["queued", "running"]).order_by("-created_at")[:limit])
    return active + done[: max(0, limit - len(active))]


def training_labels(project: Project, *, split: str) -> tuple[list[Scan], list[int]]:
    """The label each labeled scan of ``split`` adds up to, as the models train and are
    evaluated on it: an adjudication if any, else the most common label (the latest wins
    ties). Returns the scans and their LabelClass ids, by scan id."""
    annotations = (Annotation.objects
                   .filter(scan__project=project, scan__split=split,
                           outcome=Annotation.Outcome.LABEL)
                   .order_by("created_at", "pk")
                   .values_list("scan_id", "label_class_id", "source"))
    votes: dict[int, list[tuple[int, str]]] = {}
    for scan_id, class_id, source in annotations:
        votes.setdefault(scan_id, []).append((class_id, source))
    chosen = {}
    for scan_id, items in votes.items():
        adjudicated = [c for c, source in items if source == Annotation.Source.ADJUDICATION]
        if adjudicated:
            chosen[scan_id] = adjudicated[-1]
            continue
        counts = Counter(c for c, _ in items)
        best = max(counts.values())
        chosen[scan_id] = next(c for c, _ in reversed(items) if counts[c] == best)
    scans = Scan.objects.in_bulk(list(chosen))
    ordered = sorted(chosen)
    return [scans[i] for i in ordered], [chosen[i] for i in ordered]


def class_label_sets(project) -> dict[int, int]:
    """{class id: label set id} for the project's classes (``project``: a Project or its id)."""
    return dict(LabelClass.objects.filter(project_id=getattr(project, "pk", project))
                .values_list("pk", "label_set_id"))
