"""The audit trail: every annotation, adjudication, model promotion / roll-back and class
change becomes an AuditEvent (who, when, what, model version shown).

Annotations and classes are recorded by signals, so every path (web UI, admin, Label
Studio, imports, commands) is covered; the actor of a web request comes from
``AuditActorMiddleware``. Promotions and roll-backs are recorded by the service that makes
them (``ml_backend.services.model_version_activate``).
"""

from __future__ import annotations

import contextvars
import csv
import io

from django.db.models.signals import post_delete, post_save, pre_save
from django.dispatch import receiver

from annotator.models import Annotation, AuditEvent, LabelClass
from annotator.spreadsheet import csv_row
from ml_backend.signals import model_activated, model_not_activated

_actor: contextvars.ContextVar = contextvars.ContextVar("audit_actor", default=None)
CLASS_FIELDS = ("name", "description", "hotkey", "color", "order")


class AuditActorMiddleware:
    """Remember the logged-in user of the current request for the audit trail."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        user = getattr(request, "user", None)
        token = _actor.set(user if user is not None and user.is_authenticated else None)
        try:
            return self.get_response(request)
        finally:
            _actor.reset(token)


def record(*, action: str, obj_type: str, obj_id, project=None, actor=None, actor_name: str = "",
           model_version: str = "", details: dict | None = None) -> AuditEvent:
    actor = actor if actor is not None else _actor.get()
    name = actor_name or (actor.get_username() if actor is not None else "system")
    return AuditEvent.objects.create(
        actor=actor, actor_name=name[:150], project=project, action=action,
        object_type=obj_type, object_id=str(obj_id), model_version=model_version[:64],
        details=details or {})


def _annotation_details(a: Annotation) -> dict:
    return {"scan": a.scan_id, "outcome": a.outcome,
            "label": a.label_class.name if a.label_class_id else None, "source": a.source,
            "reader": a.reader.get_username() if a.reader_id else None,
            "shown_suggestion": a.shown_suggestion.name if a.shown_suggestion_id else None,
            "shown_confidence": a.shown_confidence,
            "shown_acquisition_score": a.shown_acquisition_score,
            "duration_ms": a.duration_ms, "external_id": a.external_id or None}


@receiver(pre_save, sender=Annotation)
def _annotation_before(sender, instance: Annotation, **kwargs):
    if instance.pk:
        instance._audit_before = Annotation.objects.filter(pk=instance.pk).values(
            "outcome", "label_class__name").first()


@receiver(post_save, sender=Annotation)
def _annotation_saved(sender, instance: Annotation, created: bool, raw: bool = False, **kwargs):
    if raw:
        return
    if created:
        action = (AuditEvent.Action.ADJUDICATED if instance.source == Annotation.Source.ADJUDICATION
                  else AuditEvent.Action.ANNOTATION_CREATED)
        details = _annotation_details(instance)
    else:
        action = AuditEvent.Action.ANNOTATION_UPDATED
        details = {**_annotation_details(instance),
                   "before": getattr(instance, "_audit_before", None)}
        if instance.outcome == Annotation.Outcome.FINDINGS:   # a findings answer changed
            details["findings"] = {f.finding.name: f.state
                                   for f in instance.findings.select_related("finding")}
            if getattr(instance, "_audit_findings_before", None) is not None:
                details["findings_before"] = instance._audit_findings_before
    actor = _actor.get() or (instance.reader if instance.reader_id else None)
    record(action=action, obj_type="annotation", obj_id=instance.pk,
           project=instance.scan.project, actor=actor,
           actor_name="" if actor else instance.get_source_display(),
           model_version=instance.shown_model_version.version
           if instance.shown_model_version_id else "", details=details)


@receiver(post_delete, sender=Annotation)
def _annotation_deleted(sender, instance: Annotation, **kwargs):
    # No project link: a deletion may be part of deleting the project itself. Its id is kept.
    actor = _actor.get()
    AuditEvent.objects.create(
        actor=actor, actor_name=actor.get_username() if actor else "system",
        action=AuditEvent.Action.ANNOTATION_DELETED, object_type="annotation",
        object_id=str(instance.pk), details={**_safe_details(instance),
                                             "project_id": _project_id_of_scan(instance.scan_id)})


def _project_id_of_scan(scan_id):
    from annotator.models import Scan

    return Scan.objects.filter(pk=scan_id).values_list("project_id", flat=True).first()


def _safe_details(instance: Annotation) -> dict:
    try:
        return _annotation_details(instance)
    except Exception:   # a cascade may already have removed related rows
        return {"scan": instance.scan_id, "outcome": instance.outcome}


@receiver(pre_save, sender=LabelClass)
def _class_before(sender, instance: LabelClass, **kwargs):
    if instance.pk:
        instance._audit_before = LabelClass.objects.filter(pk=instance.pk).values(
            *CLASS_FIELDS).first()


@receiver(post_save, sender=LabelClass)
def _class_saved(sender, instance: LabelClass, created: bool, raw: bool = False, **kwargs):
    if raw:
        return
    now = {f: getattr(instance, f) for f in CLASS_FIELDS}
    if created:
        actor = _actor.get() or instance.created_by
        record(action=AuditEvent.Action.CLASS_CREATED, obj_type="label_class", obj_id=instance.pk,
               project=instance.project, actor=actor, details=now)
        return
    before = getattr(instance, "_audit_before", None) or {}
    changed = {f: [before.get(f), now[f]] for f in CLASS_FIELDS if before.get(f) != now[f]}
    if changed:
        record(action=AuditEvent.Action.CLASS_CHANGED, obj_type="label_class", obj_id=instance.pk,
               project=instance.project, details={"changed": changed, "name": instance.name})


@receiver(post_delete, sender=LabelClass)
def _class_deleted(sender, instance: LabelClass, **kwargs):
    actor = _actor.get()
    AuditEvent.objects.create(
        actor=actor, actor_name=actor.get_username() if actor else "system",
        action=AuditEvent.Action.CLASS_DELETED, object_type="label_class",
        object_id=str(instance.pk),
        details={"name": instance.name, "project_id": instance.project_id})


CSV_COLUMNS = ["time", "actor", "project", "action", "object_type", "object_id",
               "model_version", "details"]


def to_csv(events) -> str:
    import json

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for e in events:
        # names (a user's, a project's, a model's) never run as spreadsheet formulas
        writer.writerow(csv_row([e.created_at.isoformat(), e.actor_name,
                                 e.project.name if e.project_id else "", e.action,
                                 e.object_type, e.object_id, e.model_version,
                                 json.dumps(e.details, sort_keys=True)]))
    return buffer.getvalue()


@receiver(model_activated, dispatch_uid="audit_model_activated")
def _model_activated(sender, *, model, project, previous, actor, rolled_back, **kwargs):
    """A model version became active (the gate, a promotion by hand, a rollback)."""
    record(action=AuditEvent.Action.MODEL_ROLLED_BACK if rolled_back
           else AuditEvent.Action.MODEL_PROMOTED, obj_type="model_version", obj_id=model.pk,
           project=project, actor=actor, model_version=model.version,
           details={"kind": model.kind, "previous": previous, "reason": model.status_reason,
                    "num_labels": model.num_labels})


@receiver(model_not_activated, dispatch_uid="audit_model_not_activated")
def _model_not_activated(sender, *, model, project, chosen, chosen_by, active, **kwargs):
    """A run's version passed its gate but was kept, not activated: a person chose the
    active version while the run ran."""
    record(action=AuditEvent.Action.MODEL_NOT_ACTIVATED, obj_type="model_version",
           obj_id=model.pk, project=project, model_version=model.version,
           details={"kind": model.kind, "reason": model.status_reason, "chosen": chosen,
                    "chosen_by": chosen_by, "active": active, "num_labels": model.num_labels})
