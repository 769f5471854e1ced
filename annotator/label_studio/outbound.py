"""Our side to Label Studio: create or update the project (config, ML backend, webhook, the
"least confident first" tab), export scans as tasks with predictions, push a new model's
predictions and config, and reconcile (pull the export to fill webhook gaps)."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.urls import reverse
from django.utils import timezone

from annotator.label_studio.api import LabelStudioError, _call, _raw, client
from annotator.label_studio.config import (
    _multi_set,
    _task_data,
    labeling_config,
    predictions_for,
    task_refusal,
    task_scans,
)
from annotator.label_studio.inbound import WEBHOOK_HEADER, ingest
from annotator.labeling import current_round
from annotator.models import Annotation, LabelClass, LabelStudioTask, Project, Scan
from ml_backend.label_studio_protocol import FINDINGS_NAME

logger = logging.getLogger(__name__)


VIEW_TITLE = "Least confident first"


def _scans_to_export(project: Project, scope: str) -> list[Scan]:
    """The scans to make tasks of, among those that may be tasks at all (``task_scans``: the
    webhook takes answers on those only)."""
    if scope == "pool":    # every task scan nobody has labeled yet
        labeled = Annotation.objects.filter(project=project,
                                            outcome__in=Annotation.LABELLING).values("scan_id")
        return list(task_scans(project).exclude(pk__in=labeled)
                    .select_related("dataset").order_by("pk"))
    query_round = current_round(project)
    if query_round is None:
        raise LabelStudioError("no query round yet: run `manage.py query` (or use --scope pool)")
    return [item.scan for item in query_round.items.select_related("scan__dataset")
            .order_by("rank") if task_refusal(project, item.scan) is None]


def sync(project: Project, *, create: bool = False, scope: str = "round", ls=None,
         log=lambda line: None) -> dict:
    """Create/update the Label Studio project and everything it needs; safe to run again."""
    ls = ls or client()
    project = Project.objects.select_related("active_model").get(pk=project.pk)
    config = labeling_config(project)
    summary = {"created_project": False, "tasks_created": 0, "urls_refreshed": 0,
               "predictions_with_new_tasks": 0, "predictions_pushed": 0}
    # 1. the project and its labeling config
    config_changed = False
    if project.label_studio_project_id:
        remote = _call("read the project", ls.projects.get, id=project.label_studio_project_id)
        if remote.label_config != config:
            _call("update the labeling config (new classes)", ls.projects.update,
                  project.label_studio_project_id, label_config=config)
            config_changed = True
            log("labeling config updated")
        if bool(getattr(remote, "show_collab_predictions", False)) != project.label_studio_prelabel:
            _call("set pre-labelling", ls.projects.update, project.label_studio_project_id,
                  show_collab_predictions=project.label_studio_prelabel)
            log(f"pre-labelling {'on' if project.label_studio_prelabel else 'off'}")
    elif create:
        # pre-labelling off unless the project asks for it: a preselected model answer and
        # a missed key would store the model's guess as the reader's
        remote = _call("create the project", ls.projects.create, title=project.name[:50],
                       description=project.description[:500] or "Synced from MedLabel",
                       label_config=config, show_skip_button=True,
                       show_collab_predictions=project.label_studio_prelabel)
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
        predictions = predictions_for(project, batch)
        for scan in batch:
            task = {"data": _task_data(scan, multi_set=multi)}
            prediction = predictions.get(scan.pk)
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
        summary["predictions_with_new_tasks"] += sum(1 for p in shown if p)
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
    log(f"{summary['tasks_created']} tasks created ({summary['predictions_with_new_tasks']} "
        f"with our prediction), {summary['urls_refreshed']} image URLs refreshed, "
        f"{summary['predictions_pushed']} predictions pushed to earlier tasks")
    if project.active_model is None:
        log("no predictions yet: the project has no classifier. Label a few scans of each "
            "class (here or in Label Studio), then refit (`manage.py refit`, or Start "
            "training on Label Studio's model card); the new model's predictions reach "
            "Label Studio by themselves")

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
    """What a task shows: the model, and its suggested class and confidence (single-label) or
    its probability per finding id (findings)."""
    if not prediction:
        return {"shown_model_version": None, "shown_suggestion": None, "shown_confidence": None,
                "shown_scores": None}
    item = prediction["result"][0]
    if item["from_name"] == FINDINGS_NAME:
        ids = dict(LabelClass.objects.filter(project=project, name__in=list(item["scores"]))
                   .values_list("name", "pk"))
        return {"shown_model_version": project.active_model, "shown_suggestion": None,
                "shown_confidence": prediction["score"],
                "shown_scores": {str(ids[n]): p for n, p in item["scores"].items() if n in ids}}
    name = item["value"]["choices"][0]
    return {"shown_model_version": project.active_model,
            "shown_suggestion": LabelClass.objects.filter(project=project, name=name).first(),
            "shown_confidence": prediction["score"], "shown_scores": None}


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
        shown_model_version=model).select_related("scan__label_set"))
    pushed = []
    rows = []
    predictions = {}
    for start in range(0, len(behind), 500):
        predictions.update(predictions_for(project, [t.scan for t in behind[start:start + 500]]))
    for task in behind:
        prediction = predictions.get(task.scan_id)
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
        task.save(update_fields=["shown_model_version", "shown_suggestion", "shown_confidence",
                                 "shown_scores"])
    _call("set the project's model_version", ls.projects.update,
          project.label_studio_project_id, model_version=model.version)
    return len(pushed)


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
