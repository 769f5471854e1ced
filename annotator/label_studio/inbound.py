"""Label Studio's annotations back to us: the secret-checked webhook payload, and one
annotation upserted as ours (idempotent by its Label Studio id, scoped by project)."""

from __future__ import annotations

import logging
from typing import NamedTuple

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import Q

from annotator.findings import (
    findings_answer_create,
    findings_answer_replace,
    findings_states,
    findings_states_from_names,
)
from annotator.label_studio.config import task_refusal
from annotator.models import Annotation, LabelClass, LabelStudioTask, Project, Scan
from annotator.services import AnnotationError, annotation_create, refit_asks_deferred
from medsite import jsonbody
from medsite.when import in_words
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


def _reader_for(project: Project, email: str):
    """Our reader for a Label Studio annotator's e-mail (``_email``): the one active user with
    a role in ``project`` (a member, or a site admin, as on the label page) whose e-mail it is.

    Returns ``(user or None, e-mail or '', why nobody is credited or '')``. Anyone else, a
    user of another project included, is never credited: the answer is kept as an unknown
    reader's, as when Label Studio sends no e-mail."""
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


class Target(NamedTuple):
    """Where one Label Studio annotation would go: its external id, the scan, the answer
    stored under that id already, and the scan's Label Studio task of this project (what
    the annotator was shown) — or ``reason``, why it is refused, and the rest empty."""

    external: str
    scan: Scan | None
    existing: Annotation | None
    reason: str
    ls_task: LabelStudioTask | None = None


# ids per ``IN (...)`` list: under SQLite's bound on the parameters of one query
_IN_CHUNK = 900


def _rows_in(queryset, field: str, values) -> list:
    """``queryset`` filtered on ``field`` among ``values``: one query per 900 values."""
    values = sorted(values)
    return [row for start in range(0, len(values), _IN_CHUNK)
            for row in queryset.filter(**{f"{field}__in": values[start:start + _IN_CHUNK]})]


def _task_keys(task: dict) -> tuple[int | None, int | None, str]:
    """A payload task's ``(scan id named in its data, its Label Studio task id we may look
    up, its id as the answers quote it)``."""
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    scan_id, task_id = jsonbody.db_id(data.get("scan_id")), jsonbody.db_id(task.get("id"))
    if task_id is not None and task_id > 2**31 - 1:
        task_id = None                     # beyond the column: no task of ours has it
    return scan_id, task_id, str(task.get("id"))[:24]


class PayloadLookup:
    """The rows a payload's annotations are checked against, each kind read once for the
    whole payload — its Label Studio task ids, the scans its tasks name, the tasks this
    project exported of those scans, the answers stored already under its annotation ids
    — and the classes and readers its answers name, read once per name or e-mail. A bulk
    event of thousands of annotations is screened in a few queries, never several per
    annotation. ``target`` applies the per-annotation rules to these rows; ``stored``
    keeps an answer just written, so a later annotation of the same payload with the same
    id finds it."""

    def __init__(self, project: Project, pairs: list[tuple[dict, dict]]):
        self.project = project
        task_ids, scan_ids, externals = set(), set(), set()
        for annotation, task in pairs:
            external, reason = _external_id(annotation)
            if reason:
                continue
            externals.add(external)
            scan_id, task_id, _ = _task_keys(task)
            if task_id is not None:
                task_ids.add(task_id)
            if scan_id is not None:
                scan_ids.add(scan_id)
        self.linked = {t.ls_task_id: t for t in _rows_in(
            LabelStudioTask.objects.select_related("scan__project", "scan__label_set",
                                                   "shown_model_version", "shown_suggestion"),
            "ls_task_id", task_ids)}
        self.scans = {s.pk: s for s in _rows_in(
            Scan.objects.filter(project=project).select_related("project", "label_set"), "pk",
            scan_ids)}
        self.exported: dict[int, int] = {}
        for scan_id, ls_task_id in _rows_in(
                LabelStudioTask.objects.filter(project=project).order_by("pk")
                .values_list("scan_id", "ls_task_id"), "scan_id", self.scans):
            self.exported.setdefault(scan_id, ls_task_id)
        self.existing: dict[str, Annotation] = {}
        for annotation in _rows_in(
                Annotation.objects.filter(source=Annotation.Source.LABEL_STUDIO)
                .select_related("scan").order_by("pk"), "external_id", externals):
            self.existing.setdefault(annotation.external_id, annotation)
        self._classes: dict[str, LabelClass | None] = {}
        self._readers: dict[str, tuple] = {}

    def scan_of(self, task: dict) -> tuple[Scan | None, str, LabelStudioTask | None]:
        """The scan a Label Studio task stands for, or None and why the task may take no
        answer (and the task we exported for it, if it is one).

        A task we exported is matched on its task id (``LabelStudioTask``), and its data's
        scan_id, when it has one, must agree; another task is matched on its scan_id, unless
        that scan was exported as another task. Either way the scan must be one that may be
        a Label Studio task at all (``config.task_refusal``: this project's, pool, not
        quarantined), the rule the export chooses its scans by."""
        project = self.project
        scan_id, task_id, label = _task_keys(task)
        linked = self.linked.get(task_id) if task_id is not None else None
        if linked is not None and linked.project_id != project.pk:
            return None, f"task {label} is a Label Studio task of another project", None
        if linked is not None:
            if scan_id is not None and scan_id != linked.scan_id:
                return None, (f"task {label} is the task of scan {linked.scan_id}, but its "
                              f"data names scan {scan_id}"), None
            scan = linked.scan
        else:
            scan = self.scans.get(scan_id) if scan_id else None
            if scan is None:
                return None, f"task {label} is not one of {project.name!r}'s scans", None
            exported = self.exported.get(scan.pk)
            if exported is not None:
                return None, (f"task {label} is not the task of scan {scan.pk} (that is task "
                              f"{exported})"), None
        reason = task_refusal(project, scan)
        return (None, reason, None) if reason else (scan, "", linked)

    def target(self, annotation: dict, task: dict) -> Target:
        """Where an annotation would go, read only (``Target``; ``reason`` when refused)."""
        project = self.project
        external, reason = _external_id(annotation)
        if reason:
            return Target("", None, None, reason)
        scan, reason, ls_task = self.scan_of(task)
        if scan is None:
            return Target("", None, None, reason)
        existing = self.existing.get(external)
        if existing is not None and existing.scan.project_id != project.pk:
            # the same Label Studio id ingested for another project: never rewrite that one
            logger.warning("Label Studio annotation %s for project %s belongs to project %s: "
                           "refused", external, project.pk, existing.scan.project_id)
            return Target("", None, None, f"annotation {external} belongs to another project")
        if existing is not None and existing.scan_id != scan.pk:
            return Target("", None, None, (f"annotation {external} was stored for scan "
                                           f"{existing.scan_id}, not scan {scan.pk}"))
        return Target(external, scan, existing, "", ls_task)

    def stored(self, external: str, annotation: Annotation | None) -> None:
        if annotation is not None:
            self.existing[external] = annotation

    def label_class(self, name: str) -> LabelClass | None:
        if name not in self._classes:
            self._classes[name] = (LabelClass.objects.filter(project=self.project, name=name)
                                   .select_related("label_set").first())
        return self._classes[name]

    def reader(self, completed_by, emails: dict[int, str], ls=None):
        """``_reader_for`` the annotator's e-mail, read once per e-mail."""
        email = _email(completed_by, emails, ls)
        if email not in self._readers:
            self._readers[email] = _reader_for(self.project, email)
        return self._readers[email]


def _echo(value):
    """A payload's id as the webhook's answer repeats it (an int or a short string)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return value[:64] if isinstance(value, str) else None


def webhook_screen(project: Project, payload: dict) -> tuple[list[tuple[dict, dict]], list[dict]]:
    """A webhook payload's ``(annotation, task)`` pairs split into those to ingest and those
    refused now, each refusal ``{"annotation", "task", "reason"}`` (what needs no call to
    Label Studio: the annotation's id and the scan it would land on). ``ingest`` checks it
    all again, since a scan may change in between. The rows the rules read are read once
    for the whole payload (``PayloadLookup``), not per annotation."""
    accepted, refused = [], []
    pairs = annotations_in(payload)
    lookup = PayloadLookup(project, pairs)
    for annotation, task in pairs:
        reason = lookup.target(annotation, task).reason
        if not reason:
            accepted.append((annotation, task))
            continue
        logger.warning("Label Studio annotation %s for project %s refused: %s",
                       str(annotation.get("id"))[:24], project.pk, reason)
        refused.append({"annotation": _echo(annotation.get("id")),
                        "task": _echo(task.get("id")), "reason": reason})
    return accepted, refused


def ingest(project: Project, *, annotation: dict, task: dict, ls=None,
           emails: dict | None = None, lookup: PayloadLookup | None = None
           ) -> tuple[Annotation | None, str]:
    """Upsert one Label Studio annotation as ours. Idempotent by its Label Studio id.

    Only on a scan that may be a Label Studio task (``PayloadLookup.scan_of``), credited only
    to one of the project's readers (``_reader_for``). ``lookup``: the rows of the payload it
    came in (``ingest_payload``), read once for all its annotations. Returns ``(annotation,
    outcome)`` with outcome one of created / updated / unchanged / ignored (with the
    reason); an ignored one wrote nothing."""
    emails = {} if emails is None else emails
    lookup = PayloadLookup(project, [(annotation, task)]) if lookup is None else lookup
    target = lookup.target(annotation, task)
    external, scan, existing, reason = target.external, target.scan, target.existing, \
        target.reason
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
        label_class = lookup.label_class(name)
        if label_class is None:
            return None, f"ignored: unknown class {name!r} (sync the labeling config)"
        outcome = Annotation.Outcome.LABEL
    reader, email, uncredited = lookup.reader(annotation.get("completed_by"), emails, ls)
    if uncredited:
        logger.warning("Label Studio annotation %s on scan %s of project %s: its annotator "
                       "is %s", external, scan.pk, project.pk, uncredited)
    if existing is not None:
        return _update(existing, outcome=outcome, label_class=label_class, states=states,
                       reader=reader)
    lead = annotation.get("lead_time")
    duration = (int(float(lead) * 1000) if isinstance(lead, (int, float))
                and not isinstance(lead, bool) and 0 <= lead <= 6 * 3600 else None)
    shown = _shown_from(project, scan, annotation.get("prediction"), target.ls_task,
                        findings=findings_scan)
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
                lookup.stored(external, created)
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
        lookup.stored(external, again)
        return (again, "unchanged") if again else (
            None, f"ignored: annotation {external} belongs to another project")
    except AnnotationError as exc:
        return None, f"ignored: {exc}"
    lookup.stored(external, created)
    return created, "created"


def queued_items(pairs: list[tuple[dict, dict]]) -> list[list[dict]]:
    """A payload's ``(annotation, task)`` pairs as the webhook queues them: only what
    ``ingest`` reads (the payload also carries the project's token, never queued)."""
    return [[{k: annotation.get(k) for k in ("id", "result", "was_cancelled", "completed_by",
                                             "lead_time", "prediction", "task")},
             {"id": task.get("id"),
              "data": task.get("data") if isinstance(task.get("data"), dict) else {}}]
            for annotation, task in pairs]


def ingest_payload(project: Project, pairs: list, *, ls=None) -> dict[str, int]:
    """One webhook payload's annotations, each upserted in order as ``ingest`` does it, the
    rows they are checked against read once for all of them (``PayloadLookup``) and each
    Label Studio annotator's e-mail asked of Label Studio once (before any row is written).

    In one transaction (each write in ``ingest``'s own savepoint, so a refused one loses
    nothing else): the answers are committed together, and the refit they bring is asked
    for once, after all of them (``services.refit_asks_deferred``) — never a refit every few
    answers of one bulk event. Returns how many were created / updated / unchanged /
    ignored."""
    pairs = [(annotation, task) for annotation, task in pairs]
    emails: dict[int, str] = {}
    for annotation, _ in pairs:
        _email(annotation.get("completed_by"), emails, ls)   # Label Studio, outside the transaction
    lookup = PayloadLookup(project, pairs)
    counts = {"created": 0, "updated": 0, "unchanged": 0, "ignored": 0}
    with transaction.atomic(), refit_asks_deferred():
        for annotation, task in pairs:
            try:
                # one savepoint each: a fault of one annotation (a database error, a value
                # the database refuses) loses that one, logged, never the payload's others
                with transaction.atomic():
                    _, outcome = ingest(project, annotation=annotation, task=task, ls=ls,
                                        emails=emails, lookup=lookup)
            except (DatabaseError, ValueError, KeyError, TypeError) as exc:
                outcome = (f"ignored: annotation {str(annotation.get('id'))[:24]} could not be "
                           f"stored ({type(exc).__name__}); `labelstudio_reconcile` fetches "
                           "it again")
            key = outcome.split(":")[0]
            counts[key] = counts.get(key, 0) + 1
            if key == "ignored":     # the record of a refusal, where no one sees the result
                logger.warning("Label Studio annotation %s for project %s %s",
                               str(annotation.get("id"))[:24], project.pk, outcome)
    return counts


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
                    f"reader matched by e-mail {in_words()}"
                existing.save(update_fields=["reader", "note"])
            if findings:
                _, result = _update_findings(existing, outcome, states)
            elif not changed:
                result = "unchanged"
            else:
                existing.outcome, existing.label_class = outcome, label_class
                existing.note = (existing.note + "\n" if existing.note else "") + \
                    f"updated in Label Studio {in_words()}"
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
    stamp = f"updated in Label Studio {in_words()}"
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


def _shown_from(project: Project, scan: Scan, prediction: dict | None,
                task: LabelStudioTask | None, *, findings: bool = False) -> dict:
    """What the annotator was shown: the prediction Label Studio attached, else ours (what
    ``task``, the scan's Label Studio task of this project, if any, was shown). For a
    findings scan: the model and its probability per finding id."""
    if findings:
        return _shown_findings(project, scan, prediction, task)
    if (isinstance(prediction, dict) and isinstance(prediction.get("model_version"), str)
            and len(prediction["model_version"]) <= 64):
        name = _choice(prediction.get("result"))
        return {"shown_model_version": ModelVersion.objects.filter(
                    project=project, version=prediction["model_version"]).first(),
                "shown_suggestion": LabelClass.objects.filter(project=project, name=name).first()
                if name else None,
                "shown_confidence": prediction.get("score")}
    if task is None:
        return {}
    return {"shown_model_version": task.shown_model_version,
            "shown_suggestion": task.shown_suggestion,
            "shown_confidence": task.shown_confidence}


def _shown_findings(project: Project, scan: Scan, prediction,
                    task: LabelStudioTask | None) -> dict:
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
