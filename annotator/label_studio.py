"""Label Studio as a second labeling UI. The only module that knows Label Studio's JSON.

Django stays the system of record. ``sync`` creates or updates the Label Studio project
(labeling config from our LabelClasses), exports scans as tasks with signed, expiring image
URLs served by this site and our model's predictions (``score`` = confidence, so Label
Studio's ascending prediction-score order puts the least confident first), keeps the Label
Studio project's ``model_version`` equal to ours, saves a Data Manager tab ordered by score,
and registers our ML backend and a webhook carrying a shared secret. Annotations come back
through that webhook (``ingest``), and ``reconcile`` pulls the export to fill any gap, since
Label Studio sends each event once without retrying. Facts: ../shared/docs/LABEL_STUDIO.md.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from xml.sax.saxutils import quoteattr

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core import signing
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone

from annotator.labeling import current_round, effective_hotkeys
from annotator.models import Annotation, LabelClass, LabelStudioTask, Project, Scan
from annotator.services import AnnotationError, annotation_create
from ml_backend.label_studio_protocol import FROM_NAME, TO_NAME, prediction_json

logger = logging.getLogger(__name__)

VIEW_TITLE = "Least confident first"
SIGNER_SALT = "annotator.label_studio.image"
WEBHOOK_HEADER = "X-MedLabel-Secret"
ANNOTATION_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")


class LabelStudioError(Exception):
    """Label Studio is unreachable, refused a call, or is not configured; the message says
    what to do."""


# --- configuration and client --------------------------------------------------------------


def client(url: str | None = None, api_key: str | None = None):
    """A label-studio-sdk client; the key may be a personal access token or a legacy token."""
    from label_studio_sdk import LabelStudio

    url = url or settings.LABEL_STUDIO_URL
    api_key = api_key or settings.LABEL_STUDIO_API_KEY
    if not url or not api_key:
        raise LabelStudioError("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (an access token "
                               "from Label Studio → Account & Settings)")
    return LabelStudio(base_url=url.rstrip("/"), api_key=api_key, timeout=60)


def _raw(ls, method: str, path: str, **kwargs):
    """An API call the SDK has no method for, through the SDK's own authenticated client."""
    response = ls._client_wrapper.httpx_client.request(path.lstrip("/"), method=method, **kwargs)
    if response.status_code >= 400:
        raise LabelStudioError(f"Label Studio answered {response.status_code} to {method} "
                               f"{path}: {response.text[:300]}")
    return response.json() if response.content else None


def _call(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except LabelStudioError:
        raise
    except Exception as exc:  # the SDK raises ApiError / httpx errors: say what failed
        status = getattr(exc, "status_code", None)
        body = str(getattr(exc, "body", "") or exc)[:300]
        raise LabelStudioError(f"Label Studio could not {what}"
                               f"{f' (HTTP {status})' if status else ''}: {body}") from exc


# --- what Label Studio shows ------------------------------------------------------------------


def _multi_set(project: Project) -> bool:
    """Several label sets with classes: each task carries its own set's choices."""
    return project.label_sets.filter(classes__isnull=False).distinct().count() > 1


def set_choices(label_set) -> list[dict]:
    """The choices of one label set as Label Studio dynamic-choice options (task data)."""
    classes = list(label_set.classes.order_by("order", "name"))
    keys = effective_hotkeys(classes)
    return [{"value": c.name, **({"hotkey": keys[c.pk]} if keys.get(c.pk) else {}),
             **({"hint": c.description} if c.description else {})} for c in classes]


def labeling_config(project: Project) -> str:
    """Single-choice classification over a large zoomable image, one hotkey per class. With
    several label sets (chest X-ray, brain MRI, …) the choices are dynamic: each task lists
    only its scan's set's classes (``$classes`` in the task data), so an annotator is never
    offered a brain class for a chest film."""
    classes = list(project.label_classes.all())
    if not classes:
        raise LabelStudioError(f"project {project.name!r} has no classes yet: import labeled "
                               "scans or add a class first")
    image = (f'  <Image name="{TO_NAME}" value="$image" zoom="true" zoomControl="true" '
             f'brightnessControl="true" contrastControl="true" maxWidth="100%"/>\n')
    if _multi_set(project):
        return (f'<View>\n{image}  <Header value="Finding ($label_set)"/>\n'
                f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single-radio" '
                f'required="true" showInline="true" value="$classes"/>\n</View>')
    keys = effective_hotkeys(classes)
    choices = "\n".join(
        f"    <Choice value={quoteattr(c.name)}"
        + (f" hotkey={quoteattr(keys[c.pk])}" if keys.get(c.pk) else "")
        + (f" hint={quoteattr(c.description)}" if c.description else "") + "/>"
        for c in classes)
    return (f'<View>\n{image}'
            f'  <Header value="Finding"/>\n'
            f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single-radio" '
            f'required="true" showInline="true">\n{choices}\n  </Choices>\n</View>')


def image_token(scan: Scan) -> str:
    return signing.dumps({"scan": scan.pk}, salt=SIGNER_SALT, compress=True)


def image_url(scan: Scan) -> str:
    """A signed URL of the scan's display preview that expires after
    LABEL_STUDIO_IMAGE_URL_MAX_AGE (annotators' browsers send no cookies to our site)."""
    return settings.SITE_URL + reverse("annotator:ls_image", args=[image_token(scan)])


def scan_for_token(token: str) -> Scan | None:
    try:
        data = signing.loads(token, salt=SIGNER_SALT,
                             max_age=settings.LABEL_STUDIO_IMAGE_URL_MAX_AGE)
    except signing.BadSignature:
        return None
    return Scan.objects.filter(pk=data.get("scan"), quarantined=False).first()


def _prediction(project: Project, scan: Scan) -> dict | None:
    """Our active model's stored prediction for a scan, as a Label Studio prediction."""
    from ml_backend.models import Prediction

    model = project.active_model
    if model is None:
        return None
    stored = Prediction.objects.filter(model_version=model, scan=scan).select_related(
        "predicted_class").first()
    if stored is None or stored.predicted_class is None:
        return None
    return prediction_json(model.version, stored.predicted_class.name, stored.confidence)


def _task_data(scan: Scan, *, multi_set: bool = False) -> dict:
    data = {"image": image_url(scan), "scan_id": scan.pk, "dataset": scan.dataset.name}
    if multi_set:
        data["label_set"] = scan.label_set.name if scan.label_set_id else "no label set"
        data["classes"] = set_choices(scan.label_set) if scan.label_set_id else []
    return data


# --- sync ----------------------------------------------------------------------------------------


def _scans_to_export(project: Project, scope: str) -> list[Scan]:
    if scope == "pool":    # every pool scan nobody has labeled yet
        labeled = Annotation.objects.filter(scan__project=project,
                                            outcome=Annotation.Outcome.LABEL).values("scan_id")
        return list(project.scans.filter(split="pool", quarantined=False).exclude(pk__in=labeled)
                    .select_related("dataset").order_by("pk"))
    query_round = current_round(project)
    if query_round is None:
        raise LabelStudioError("no query round yet: run `manage.py query` (or use --scope pool)")
    return [item.scan for item in query_round.items.select_related("scan__dataset")
            .order_by("rank") if not item.scan.quarantined]


def sync(project: Project, *, create: bool = False, scope: str = "round", ls=None,
         log=lambda line: None) -> dict:
    """Create/update the Label Studio project and everything it needs; safe to run again."""
    ls = ls or client()
    project = Project.objects.select_related("active_model").get(pk=project.pk)
    config = labeling_config(project)
    summary = {"created_project": False, "tasks_created": 0, "urls_refreshed": 0,
               "predictions_pushed": 0}
    # 1. the project and its labeling config
    config_changed = False
    if project.label_studio_project_id:
        remote = _call("read the project", ls.projects.get, id=project.label_studio_project_id)
        if remote.label_config != config:
            _call("update the labeling config (new classes)", ls.projects.update,
                  project.label_studio_project_id, label_config=config)
            config_changed = True
            log("labeling config updated")
    elif create:
        remote = _call("create the project", ls.projects.create, title=project.name[:50],
                       description=project.description[:500] or "Synced from MedLabel",
                       label_config=config, show_skip_button=True)
        Project.objects.filter(pk=project.pk).update(label_studio_project_id=remote.id)
        project.label_studio_project_id = remote.id
        summary["created_project"] = True
        log(f"created Label Studio project {remote.id}")
    else:
        raise LabelStudioError(f"{project.name!r} is not linked to a Label Studio project yet: "
                               "run with --create")
    ls_id = project.label_studio_project_id

    # 2. tasks: new scans with predictions; stale image URLs refreshed
    multi = _multi_set(project)
    known = {t.scan_id: t for t in LabelStudioTask.objects.filter(project=project)}
    scans = _scans_to_export(project, scope)
    new = [s for s in scans if s.pk not in known]
    for start in range(0, len(new), 200):
        batch = new[start:start + 200]
        payload, shown = [], []
        for scan in batch:
            task = {"data": _task_data(scan, multi_set=multi)}
            prediction = _prediction(project, scan)
            if prediction:
                task["predictions"] = [prediction]
            payload.append(task)
            shown.append(prediction)
        result = _call("import tasks", ls.projects.import_tasks, ls_id, request=payload,
                       return_task_ids=True)
        ids = list(result.task_ids or [])
        if len(ids) != len(batch):
            raise LabelStudioError(f"Label Studio created {len(ids)} tasks for {len(batch)} scans")
        now = timezone.now()
        LabelStudioTask.objects.bulk_create([
            LabelStudioTask(project=project, scan=scan, ls_task_id=task_id, url_issued_at=now,
                            **_shown_fields(project, prediction))
            for scan, task_id, prediction in zip(batch, ids, shown)])
        summary["tasks_created"] += len(batch)
    stale = timezone.now() - timedelta(seconds=settings.LABEL_STUDIO_IMAGE_URL_MAX_AGE / 2)
    refresh = LabelStudioTask.objects.filter(project=project).select_related(
        "scan__dataset", "scan__label_set")
    if not multi or not config_changed:
        refresh = refresh.filter(url_issued_at__lt=stale)
    for task in refresh:
        _call("refresh an image URL", ls.tasks.update, id=task.ls_task_id,
              data=_task_data(task.scan, multi_set=multi))
        LabelStudioTask.objects.filter(pk=task.pk).update(url_issued_at=timezone.now())
        summary["urls_refreshed"] += 1
    summary["predictions_pushed"] = push_predictions(project, ls=ls)
    log(f"{summary['tasks_created']} tasks created, {summary['urls_refreshed']} image URLs "
        f"refreshed, {summary['predictions_pushed']} predictions pushed")

    # 3. the Data Manager tab ordered by prediction score (least confident first)
    views = _call("list Data Manager tabs", ls.views.list, project=ls_id)
    if not any((getattr(v, "data", None) or {}).get("title") == VIEW_TITLE for v in views):
        _call("create the Data Manager tab", ls.views.create, project=ls_id,
              data={"title": VIEW_TITLE, "ordering": ["tasks:predictions_score"]})
        log(f"Data Manager tab {VIEW_TITLE!r} created")

    # 4. our ML backend and our webhook
    base = settings.SITE_URL
    ml_url = base + reverse("ml_backend:root", args=[project.pk])
    backends = _call("list ML backends", ls.ml.list, project=ls_id)
    if not any(b.url.rstrip("/") == ml_url.rstrip("/") for b in backends):
        auth = {}
        if settings.ML_BACKEND_BASIC_AUTH:
            user, _, password = settings.ML_BACKEND_BASIC_AUTH.partition(":")
            auth = {"auth_method": "BASIC_AUTH", "basic_auth_user": user,
                    "basic_auth_pass": password}
        _call(f"register our ML backend at {ml_url} (can Label Studio reach SITE_URL?)",
              ls.ml.create, project=ls_id, url=ml_url, title="MedLabel SimCLRv2",
              is_interactive=False, **auth)
        log(f"ML backend registered: {ml_url}")
    hook_url = base + reverse("annotator:ls_webhook", args=[project.pk])
    secret = settings.LABEL_STUDIO_WEBHOOK_SECRET
    if not secret:
        raise LabelStudioError("set LABEL_STUDIO_WEBHOOK_SECRET: Label Studio's webhook "
                               "proves itself with it")
    hooks = _call("list webhooks", ls.webhooks.list, project=ls_id)
    if not any(h.url == hook_url for h in hooks):
        _call(f"register our webhook at {hook_url}", ls.webhooks.create, project=ls_id,
              url=hook_url, send_payload=True, send_for_all_actions=False,
              actions=["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"],
              headers={WEBHOOK_HEADER: secret})
        log(f"webhook registered: {hook_url}")
    return summary


def _shown_fields(project: Project, prediction: dict | None) -> dict:
    if not prediction:
        return {"shown_model_version": None, "shown_suggestion": None, "shown_confidence": None}
    name = prediction["result"][0]["value"]["choices"][0]
    return {"shown_model_version": project.active_model,
            "shown_suggestion": LabelClass.objects.filter(project=project, name=name).first(),
            "shown_confidence": prediction["score"]}


def push_predictions(project: Project, *, ls=None) -> int:
    """Give every exported task the active model's prediction and set the Label Studio
    project's model_version to ours (its score ordering only counts predictions of the
    project's model_version). Called by ``sync`` and after every promotion."""
    project = Project.objects.select_related("active_model").get(pk=project.pk)
    model = project.active_model
    if model is None or not project.label_studio_project_id:
        return 0
    ls = ls or client()
    behind = list(LabelStudioTask.objects.filter(project=project).exclude(
        shown_model_version=model).select_related("scan"))
    pushed = []
    rows = []
    for task in behind:
        prediction = _prediction(project, task.scan)
        if prediction is None:
            continue
        rows.append({"task": task.ls_task_id, **prediction})
        pushed.append((task, prediction))
    for start in range(0, len(rows), 500):
        _call("import predictions", ls.projects.import_predictions,
              project.label_studio_project_id, request=rows[start:start + 500])
    for task, prediction in pushed:
        for key, value in _shown_fields(project, prediction).items():
            setattr(task, key, value)
        task.save(update_fields=["shown_model_version", "shown_suggestion", "shown_confidence"])
    _call("set the project's model_version", ls.projects.update,
          project.label_studio_project_id, model_version=model.version)
    return len(pushed)


# --- annotations back ------------------------------------------------------------------------------


def _choice(result: list) -> str | None:
    for item in result or []:
        if item.get("from_name") == FROM_NAME and item.get("type") == "choices":
            choices = (item.get("value") or {}).get("choices") or []
            if choices:
                return str(choices[0])
    return None


def _reader(completed_by, emails: dict[int, str], ls=None):
    """Our user for a Label Studio annotator, matched by e-mail (None if there is none)."""
    email = None
    if isinstance(completed_by, dict):
        email = completed_by.get("email")
    elif isinstance(completed_by, int):
        if completed_by not in emails and ls is not None:
            try:
                emails[completed_by] = ls.users.get(id=completed_by).email or ""
            except Exception as exc:
                logger.warning("Label Studio user %s not readable: %s", completed_by, exc)
                emails[completed_by] = ""
        email = emails.get(completed_by)
    if not email:
        return None, ""
    return get_user_model().objects.filter(email__iexact=email).first(), email


def ingest(project: Project, *, annotation: dict, task: dict, ls=None,
           emails: dict | None = None) -> tuple[Annotation | None, str]:
    """Upsert one Label Studio annotation as ours. Idempotent by its Label Studio id.

    Returns ``(annotation, outcome)`` with outcome one of created / updated / unchanged /
    ignored (with the reason)."""
    emails = {} if emails is None else emails
    ls_id = annotation.get("id")
    if ls_id is None:
        return None, "ignored: the annotation has no id"
    data = task.get("data") or {}
    scan = Scan.objects.filter(pk=data.get("scan_id"), project=project).first()
    if scan is None:
        linked = LabelStudioTask.objects.filter(project=project, ls_task_id=task.get("id")).first()
        scan = linked.scan if linked else None
    if scan is None:
        return None, f"ignored: task {task.get('id')} is not one of {project.name!r}'s scans"
    if annotation.get("was_cancelled"):
        outcome, label_class = Annotation.Outcome.SKIP, None
    else:
        name = _choice(annotation.get("result"))
        if name is None:
            return None, f"ignored: annotation {ls_id} has no {FROM_NAME!r} choice"
        label_class = LabelClass.objects.filter(project=project, name=name).first()
        if label_class is None:
            return None, f"ignored: unknown class {name!r} (sync the labeling config)"
        outcome = Annotation.Outcome.LABEL
    reader, email = _reader(annotation.get("completed_by"), emails, ls)
    lead = annotation.get("lead_time")
    duration = (int(float(lead) * 1000) if isinstance(lead, (int, float))
                and not isinstance(lead, bool) and 0 <= lead <= 6 * 3600 else None)
    shown = _shown_from(project, scan, annotation.get("prediction"))
    external = str(ls_id)
    if len(external) > 64 or isinstance(ls_id, (dict, list, bool)):
        return None, "ignored: the annotation id is not a Label Studio id"
    existing = Annotation.objects.filter(source=Annotation.Source.LABEL_STUDIO,
                                         external_id=external).select_related("scan").first()
    if existing is not None and existing.scan.project_id != project.pk:
        # the same Label Studio id ingested for another project: never rewrite that one
        logger.warning("Label Studio annotation %s for project %s belongs to project %s: "
                       "refused", external, project.pk, existing.scan.project_id)
        return None, f"ignored: annotation {external} belongs to another project"
    if existing is not None and scan.quarantined:
        return None, f"ignored: scan {scan.pk} is quarantined"
    if existing is not None:
        if (existing.outcome, existing.label_class_id) == (outcome, getattr(label_class, "pk", None)):
            return existing, "unchanged"
        if label_class is not None and label_class.label_set_id != scan.label_set_id:
            return None, (f"ignored: {label_class.name!r} does not apply to scan {scan.pk} "
                          "(another label set)")
        existing.outcome, existing.label_class = outcome, label_class
        existing.note = (existing.note + "\n" if existing.note else "") + \
            f"updated in Label Studio {timezone.now():%Y-%m-%d %H:%M}"
        existing.save(update_fields=["outcome", "label_class", "note"])
        return existing, "updated"
    try:
        with transaction.atomic():
            created = annotation_create(
                scan=scan, reader=reader, label_class=label_class, outcome=outcome,
                source=Annotation.Source.LABEL_STUDIO, duration_ms=duration,
                external_id=external, note="" if reader else f"Label Studio user {email or '?'}",
                **shown)
    except IntegrityError:   # the same event delivered twice at once
        again = Annotation.objects.filter(source=Annotation.Source.LABEL_STUDIO,
                                          external_id=external, scan__project=project).first()
        return (again, "unchanged") if again else (
            None, f"ignored: annotation {external} belongs to another project")
    except AnnotationError as exc:
        return None, f"ignored: {exc}"
    return created, "created"


def _shown_from(project: Project, scan: Scan, prediction: dict | None) -> dict:
    """What the annotator was shown: the prediction Label Studio attached, else ours."""
    from ml_backend.models import ModelVersion

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


def reconcile(project: Project, *, ls=None) -> dict:
    """Pull Label Studio's export and ingest every annotation (webhooks are sent once, with no
    retry: this fills the gaps). Safe to run any time."""
    if not project.label_studio_project_id:
        raise LabelStudioError(f"{project.name!r} is not linked to Label Studio: run "
                               "`manage.py labelstudio_sync --create` first")
    ls = ls or client()
    export = _raw(ls, "GET", f"api/projects/{project.label_studio_project_id}/export",
                  params={"exportType": "JSON", "download_all_tasks": "false"})
    counts = {"created": 0, "updated": 0, "unchanged": 0, "ignored": 0}
    emails: dict[int, str] = {}
    for task in export or []:
        for annotation in task.get("annotations") or []:
            _, outcome = ingest(project, annotation=annotation, task=task, ls=ls, emails=emails)
            key = outcome.split(":")[0]
            counts[key] = counts.get(key, 0) + 1
            if key == "ignored":
                logger.warning("Label Studio annotation %s %s", annotation.get("id"), outcome)
    return counts


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
    task = payload.get("task") or {}
    if isinstance(payload.get("annotation"), dict):
        return [(payload["annotation"], task)]
    pairs = []
    tasks = {t.get("id"): t for t in payload.get("tasks") or [] if isinstance(t, dict)}
    for annotation in payload.get("annotations") or []:
        if isinstance(annotation, dict):
            pairs.append((annotation, tasks.get(annotation.get("task"), task)))
    return pairs


def push_config(project: Project, *, ls=None) -> bool:
    """Send the labeling config again (a class was added or changed). True if it changed."""
    project = Project.objects.get(pk=project.pk)
    if not project.label_studio_project_id:
        return False
    ls = ls or client()
    config = labeling_config(project)
    remote = _call("read the project", ls.projects.get, id=project.label_studio_project_id)
    changed = remote.label_config != config
    if changed:
        _call("update the labeling config", ls.projects.update, project.label_studio_project_id,
              label_config=config)
    if _multi_set(project):   # dynamic choices live in each task: give them the new classes
        for task in LabelStudioTask.objects.filter(project=project).select_related(
                "scan__dataset", "scan__label_set"):
            _call("update a task's choices", ls.tasks.update, id=task.ls_task_id,
                  data=_task_data(task.scan, multi_set=True))
            LabelStudioTask.objects.filter(pk=task.pk).update(url_issued_at=timezone.now())
        changed = True
    return changed


def follow_class_changes(sender, instance: LabelClass, raw: bool = False, **kwargs) -> None:
    """post_save of a LabelClass: a linked Label Studio project gets the new config."""
    if raw or not settings.LABEL_STUDIO_URL:
        return
    project_id = instance.project_id
    if not Project.objects.filter(pk=project_id, label_studio_project_id__isnull=False).exists():
        return
    from annotator.tasks import label_studio_push_config

    transaction.on_commit(lambda: label_studio_push_config.delay(project_id))


def follow_new_classifier(sender, *, project_id: int, **kwargs) -> None:
    """``classifier_published``: a linked Label Studio project gets the new predictions and
    model_version (its least-confident ordering counts only predictions of the project's
    model_version), as a task once the promotion is committed."""
    if not settings.LABEL_STUDIO_URL or not Project.objects.filter(
            pk=project_id, label_studio_project_id__isnull=False).exists():
        return
    from annotator.tasks import label_studio_push

    transaction.on_commit(lambda: label_studio_push.delay(project_id))
