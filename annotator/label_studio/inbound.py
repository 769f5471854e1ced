"""Label Studio's annotations back to us: the secret-checked webhook payload, and one
annotation upserted as ours (idempotent by its Label Studio id, scoped by project)."""

from __future__ import annotations

import logging

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from annotator.findings import (
    findings_answer_create,
    findings_answer_replace,
    findings_states,
    findings_states_from_names,
)
from annotator.label_studio.config import task_refusal
from annotator.models import Annotation, LabelClass, LabelStudioTask, Project, Scan
from annotator.services import AnnotationError, annotation_create
from medsite import jsonbody
from ml_backend.label_studio_protocol import FINDINGS_NAME, FROM_NAME, NO_FINDING, UNCERTAIN_NAME
from ml_backend.models import ModelVersion

logger = logging.getLogger(__name__)


WEBHOOK_HEADER = "X-MedLabel-Secret"


ANNOTATION_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")


def _choices(result: list, from_name: str) -> list[str]:
    """The choices of one control in a Label Studio result (strings only, deduplicated)."""
    out: list[str] = []
    for item in result if isinstance(result, list) else []:
        if not isinstance(item, dict):
            continue
        if item.get("from_name") == from_name and item.get("type") == "choices":
            value = item.get("value") if isinstance(item.get("value"), dict) else {}
            choices = value.get("choices")
            if isinstance(choices, list):
                out += [c[:100] for c in choices[:200] if isinstance(c, str) and c[:100] not in out]
    return out


def _choice(result: list) -> str | None:
    choices = _choices(result, FROM_NAME)
    return choices[0] if choices else None


def _findings_states(scan: Scan, result) -> dict[int, str]:
    """A Label Studio findings answer as states per finding id (AnnotationError if it is not
    one: nothing ticked, an unknown finding, "No finding" with a finding)."""
    present = _choices(result, FINDINGS_NAME)
    no_finding = any(c.lower() == NO_FINDING.lower() for c in present)
    present = [c for c in present if c.lower() != NO_FINDING.lower()]
    uncertain = _choices(result, UNCERTAIN_NAME)
    present = [c for c in present if c not in uncertain]   # ticked in both: uncertain
    return findings_states_from_names(scan.label_set, present, uncertain, no_finding=no_finding)


def _email(completed_by, emails: dict[int, str], ls=None) -> str:
    """The e-mail of a Label Studio annotator ('' if none is known): from the payload, or by
    their Label Studio id through the API (cached in ``emails``)."""
    email = None
    if isinstance(completed_by, dict):
        email = completed_by.get("email")
        email = email[:254] if isinstance(email, str) else None
    elif isinstance(completed_by, int) and not isinstance(completed_by, bool) and (
            0 < completed_by <= 2**31 - 1):
        if completed_by not in emails and ls is not None:
            try:
                emails[completed_by] = ls.users.get(id=completed_by).email or ""
            except Exception as exc:
                logger.warning("Label Studio user %s not readable: %s", completed_by, exc)
                emails[completed_by] = ""
        email = emails.get(completed_by)
    return (email or "").strip()


def _reader(project: Project, completed_by, emails: dict[int, str], ls=None):
    """Our reader for a Label Studio annotator: the one active user with a role in ``project``
    (a member, or a site admin, as on the label page) whose e-mail it is.

    Returns ``(user or None, e-mail or '', why nobody is credited or '')``. Anyone else, a
    user of another project included, is never credited: the answer is kept as an unknown
    reader's, as when Label Studio sends no e-mail."""
    email = _email(completed_by, emails, ls)
    if not email:
        return None, "", ""
    members = list(get_user_model().objects.filter(email__iexact=email, is_active=True)
                   .filter(Q(memberships__project=project) | Q(is_superuser=True))
                   .distinct().order_by("pk")[:2])
    if len(members) == 1:
        return members[0], email, ""
    if members:
        return None, email, "more than one member has this e-mail, not credited"
    return None, email, f"not a member of {project.name!r}, not credited"


def _external_id(annotation: dict) -> tuple[str, str]:
    """The Label Studio id of an annotation as we store it, or '' and why it is not one."""
    ls_id = annotation.get("id")
    if ls_id is None:
        return "", "the annotation has no id"
    if isinstance(ls_id, (dict, list, bool)) or len(str(ls_id)) > 64 or not str(ls_id):
        return "", "the annotation id is not a Label Studio id"
    return str(ls_id), ""


def _scan_of(project: Project, task: dict) -> tuple[Scan | None, str]:
    """The scan a Label Studio task stands for, or None and why the task may take no answer.

    A task we exported is matched on its task id (``LabelStudioTask``), and its data's
    scan_id, when it has one, must agree; another task is matched on its scan_id, unless
    that scan was exported as another task. Either way the scan must be one that may be a
    Label Studio task at all (``config.task_refusal``: this project's, pool, not
    quarantined), the rule the export chooses its scans by."""
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    scan_id, task_id = jsonbody.db_id(data.get("scan_id")), jsonbody.db_id(task.get("id"))
    label = str(task.get("id"))[:24]
    linked = (LabelStudioTask.objects.filter(ls_task_id=task_id).select_related("scan").first()
              if task_id is not None and task_id <= 2**31 - 1 else None)
    if linked is not None and linked.project_id != project.pk:
        return None, f"task {label} is a Label Studio task of another project"
    if linked is not None:
        if scan_id is not None and scan_id != linked.scan_id:
            return None, (f"task {label} is the task of scan {linked.scan_id}, but its data "
                          f"names scan {scan_id}")
        scan = linked.scan
    else:
        scan = Scan.objects.filter(pk=scan_id, project=project).first() if scan_id else None
        if scan is None:
            return None, f"task {label} is not one of {project.name!r}'s scans"
        exported = (LabelStudioTask.objects.filter(project=project, scan=scan)
                    .values_list("ls_task_id", flat=True).first())
        if exported is not None:
            return None, (f"task {label} is not the task of scan {scan.pk} (that is task "
                          f"{exported})")
    reason = task_refusal(project, scan)
    return (None, reason) if reason else (scan, "")


def _target(project: Project, annotation: dict, task: dict
            ) -> tuple[str, Scan | None, Annotation | None, str]:
    """Where an annotation would go, read only: ``(external id, scan, the answer stored
    for it already or None, '')``, or ``('', None, None, why it is refused)``."""
    external, reason = _external_id(annotation)
    if reason:
        return "", None, None, reason
    scan, reason = _scan_of(project, task)
    if scan is None:
        return "", None, None, reason
    existing = Annotation.objects.filter(source=Annotation.Source.LABEL_STUDIO,
                                         external_id=external).select_related("scan").first()
    if existing is not None and existing.scan.project_id != project.pk:
        # the same Label Studio id ingested for another project: never rewrite that one
        logger.warning("Label Studio annotation %s for project %s belongs to project %s: "
                       "refused", external, project.pk, existing.scan.project_id)
        return "", None, None, f"annotation {external} belongs to another project"
    if existing is not None and existing.scan_id != scan.pk:
        return "", None, None, (f"annotation {external} was stored for scan "
                                f"{existing.scan_id}, not scan {scan.pk}")
    return external, scan, existing, ""


def _echo(value):
    """A payload's id as the webhook's answer repeats it (an int or a short string)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return value[:64] if isinstance(value, str) else None


def webhook_screen(project: Project, payload: dict) -> tuple[list[tuple[dict, dict]], list[dict]]:
    """A webhook payload's ``(annotation, task)`` pairs split into those to ingest and those
    refused now, each refusal ``{"annotation", "task", "reason"}`` (what needs no call to
    Label Studio: the annotation's id and the scan it would land on). ``ingest`` checks it
    all again, since a scan may change in between."""
    accepted, refused = [], []
    for annotation, task in annotations_in(payload):
        reason = _target(project, annotation, task)[3]
        if not reason:
            accepted.append((annotation, task))
            continue
        logger.warning("Label Studio annotation %s for project %s refused: %s",
                       str(annotation.get("id"))[:24], project.pk, reason)
        refused.append({"annotation": _echo(annotation.get("id")),
                        "task": _echo(task.get("id")), "reason": reason})
    return accepted, refused


def ingest(project: Project, *, annotation: dict, task: dict, ls=None,
           emails: dict | None = None) -> tuple[Annotation | None, str]:
    """Upsert one Label Studio annotation as ours. Idempotent by its Label Studio id.

    Only on a scan that may be a Label Studio task (``_scan_of``), credited only to one of
    the project's readers (``_reader``). Returns ``(annotation, outcome)`` with outcome one
    of created / updated / unchanged / ignored (with the reason); an ignored one wrote
    nothing."""
    emails = {} if emails is None else emails
    external, scan, existing, reason = _target(project, annotation, task)
    if scan is None:
        return None, f"ignored: {reason}"
    findings_scan = scan.label_set_id is not None and scan.label_set.is_multi
    states = None
    if annotation.get("was_cancelled"):
        outcome, label_class = Annotation.Outcome.SKIP, None
    elif findings_scan:
        try:
            states = _findings_states(scan, annotation.get("result"))
        except AnnotationError as exc:
            return None, f"ignored: annotation {external}: {exc}"
        outcome, label_class = Annotation.Outcome.FINDINGS, None
    else:
        name = _choice(annotation.get("result"))
        if name is None:
            return None, f"ignored: annotation {external} has no {FROM_NAME!r} choice"
        label_class = LabelClass.objects.filter(project=project, name=name).first()
        if label_class is None:
            return None, f"ignored: unknown class {name!r} (sync the labeling config)"
        outcome = Annotation.Outcome.LABEL
    reader, email, uncredited = _reader(project, annotation.get("completed_by"), emails, ls)
    if uncredited:
        logger.warning("Label Studio annotation %s on scan %s of project %s: its annotator "
                       "is %s", external, scan.pk, project.pk, uncredited)
    if existing is not None:
        return _update(existing, outcome=outcome, label_class=label_class, states=states,
                       reader=reader)
    lead = annotation.get("lead_time")
    duration = (int(float(lead) * 1000) if isinstance(lead, (int, float))
                and not isinstance(lead, bool) and 0 <= lead <= 6 * 3600 else None)
    shown = _shown_from(project, scan, annotation.get("prediction"), findings=findings_scan)
    note = "" if reader else f"Label Studio user {email or '?'}" + (
        f": {uncredited}" if uncredited else "")
    try:
        with transaction.atomic():
            if states is not None:
                created = findings_answer_create(
                    scan=scan, reader=reader, states=states,
                    source=Annotation.Source.LABEL_STUDIO, duration_ms=duration,
                    external_id=external, note=note,
                    shown_model_version=shown.get("shown_model_version"),
                    shown_scores=shown.get("shown_scores"),
                    shown_preselected=project.label_studio_prelabel and bool(
                        shown.get("shown_model_version")))
                return created, "created"
            created = annotation_create(
                scan=scan, reader=reader, label_class=label_class, outcome=outcome,
                source=Annotation.Source.LABEL_STUDIO, duration_ms=duration,
                external_id=external, note=note,
                shown_preselected=project.label_studio_prelabel and bool(
                    shown.get("shown_suggestion")),
                **{k: v for k, v in shown.items() if k != "shown_scores"})
    except IntegrityError:   # the same event delivered twice at once
        again = Annotation.objects.filter(source=Annotation.Source.LABEL_STUDIO,
                                          external_id=external, scan__project=project).first()
        return (again, "unchanged") if again else (
            None, f"ignored: annotation {external} belongs to another project")
    except AnnotationError as exc:
        return None, f"ignored: {exc}"
    return created, "created"


def _update(existing: Annotation, *, outcome: str, label_class: LabelClass | None,
            states: dict[int, str] | None, reader) -> tuple[Annotation | None, str]:
    """An annotation seen again (an update, a replay, reconciliation): its answer changed,
    and its reader filled in when it was unknown and is now matched. All of it or, when the
    change is refused, none of it."""
    scan = existing.scan
    findings = states is not None or existing.outcome == Annotation.Outcome.FINDINGS
    changed = (existing.outcome, existing.label_class_id) != (outcome,
                                                              getattr(label_class, "pk", None))
    if (not findings and changed and label_class is not None
            and label_class.label_set_id != scan.label_set_id):
        return None, (f"ignored: {label_class.name!r} does not apply to scan {scan.pk} "
                      "(another label set)")
    fill = existing.reader_id is None and reader is not None
    try:
        with transaction.atomic():
            if fill:
                # the reader was unknown when it first arrived (no API key then): fill it in
                existing.reader = reader
                existing.note = (existing.note + "\n" if existing.note else "") + \
                    f"reader matched by e-mail {timezone.now():%Y-%m-%d %H:%M}"
                existing.save(update_fields=["reader", "note"])
            if findings:
                _, result = _update_findings(existing, outcome, states)
            elif not changed:
                result = "unchanged"
            else:
                existing.outcome, existing.label_class = outcome, label_class
                existing.note = (existing.note + "\n" if existing.note else "") + \
                    f"updated in Label Studio {timezone.now():%Y-%m-%d %H:%M}"
                existing.save(update_fields=["outcome", "label_class", "note"])
                result = "updated"
    except AnnotationError as exc:
        existing.refresh_from_db()
        return None, f"ignored: {exc}"
    return existing, "updated" if fill else result


def _update_findings(existing: Annotation, outcome: str, states: dict[int, str] | None
                     ) -> tuple[Annotation | None, str]:
    """A findings answer changed in Label Studio: its findings replaced (or, when it was a
    skip, the skip replaced by the answer's findings)."""
    stamp = f"updated in Label Studio {timezone.now():%Y-%m-%d %H:%M}"
    if states is None:          # a findings answer turned into a skip
        if existing.outcome == outcome:
            return existing, "unchanged"
        with transaction.atomic():
            existing.findings.all().delete()
            existing.outcome = outcome
            existing.note = (existing.note + "\n" if existing.note else "") + stamp
            existing.save(update_fields=["outcome", "note"])
        return existing, "updated"
    if existing.outcome == Annotation.Outcome.FINDINGS and findings_states(existing) == states:
        return existing, "unchanged"
    with transaction.atomic():
        if existing.outcome != Annotation.Outcome.FINDINGS:
            existing.outcome = Annotation.Outcome.FINDINGS
            existing.save(update_fields=["outcome"])
        findings_answer_replace(existing, states, note=stamp)
    return existing, "updated"


def _shown_from(project: Project, scan: Scan, prediction: dict | None, *,
                findings: bool = False) -> dict:
    """What the annotator was shown: the prediction Label Studio attached, else ours. For a
    findings scan: the model and its probability per finding id."""
    if findings:
        return _shown_findings(project, scan, prediction)
    if (isinstance(prediction, dict) and isinstance(prediction.get("model_version"), str)
            and len(prediction["model_version"]) <= 64):
        name = _choice(prediction.get("result"))
        return {"shown_model_version": ModelVersion.objects.filter(
                    project=project, version=prediction["model_version"]).first(),
                "shown_suggestion": LabelClass.objects.filter(project=project, name=name).first()
                if name else None,
                "shown_confidence": prediction.get("score")}
    task = LabelStudioTask.objects.filter(project=project, scan=scan).first()
    if task is None:
        return {}
    return {"shown_model_version": task.shown_model_version,
            "shown_suggestion": task.shown_suggestion,
            "shown_confidence": task.shown_confidence}


def _shown_findings(project: Project, scan: Scan, prediction) -> dict:
    if (isinstance(prediction, dict) and isinstance(prediction.get("model_version"), str)
            and len(prediction["model_version"]) <= 64):
        model = ModelVersion.objects.filter(project=project,
                                            version=prediction["model_version"]).first()
        scores = {}
        for item in prediction.get("result") if isinstance(prediction.get("result"), list) else []:
            if isinstance(item, dict) and item.get("from_name") == FINDINGS_NAME and isinstance(
                    item.get("scores"), dict):
                scores = item["scores"]
        ids = dict(LabelClass.objects.filter(label_set=scan.label_set,
                                             name__in=[str(k)[:100] for k in scores])
                   .values_list("name", "pk"))
        return {"shown_model_version": model,
                "shown_scores": {ids[k]: float(v) for k, v in scores.items()
                                 if k in ids and isinstance(v, (int, float))
                                 and not isinstance(v, bool) and 0 <= v <= 1} or None}
    task = LabelStudioTask.objects.filter(project=project, scan=scan).first()
    if task is None:
        return {}
    return {"shown_model_version": task.shown_model_version,
            "shown_scores": {int(k): v for k, v in (task.shown_scores or {}).items()} or None}


def webhook_verified(secret_header: str | None) -> bool:
    """The shared secret, compared as bytes in constant time (any header value, ASCII or
    not, is a yes or a no, never an error)."""
    import hmac

    expected = settings.LABEL_STUDIO_WEBHOOK_SECRET
    if not expected or not secret_header:
        return False
    return hmac.compare_digest(secret_header.encode("utf-8", "surrogateescape"),
                               expected.encode("utf-8"))


def annotations_in(payload: dict) -> list[tuple[dict, dict]]:
    """``(annotation, task)`` pairs in a webhook payload (single or bulk actions)."""
    if payload.get("action") not in ANNOTATION_ACTIONS:
        return []
    def listed(key: str) -> list[dict]:
        value = payload.get(key)
        return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []

    task = payload.get("task") if isinstance(payload.get("task"), dict) else {}
    if isinstance(payload.get("annotation"), dict):
        return [(payload["annotation"], task)]
    tasks = {t.get("id"): t for t in listed("tasks") if isinstance(t.get("id"), (int, str))}
    pairs = []
    for annotation in listed("annotations"):
        key = annotation.get("task")
        pairs.append((annotation, tasks.get(key, task) if isinstance(key, (int, str)) else task))
    return pairs
