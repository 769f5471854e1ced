"""Signal receivers: a linked Label Studio project follows class changes and new classifiers
(connected in ``annotator/apps.py``)."""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction

from annotator import background
from annotator.label_studio.tasks import (
    label_studio_push,
    label_studio_push_config,
    label_studio_push_round,
)
from annotator.models import LabelClass, Project

logger = logging.getLogger(__name__)


def follow_class_changes(sender, instance: LabelClass, raw: bool = False, **kwargs) -> None:
    """post_save of a LabelClass: a linked Label Studio project gets the new config."""
    if raw or not settings.LABEL_STUDIO_URL:
        return
    project_id = instance.project_id
    if not Project.objects.filter(pk=project_id, label_studio_project_id__isnull=False).exists():
        return
    transaction.on_commit(lambda: background.send(label_studio_push_config, project_id))


def follow_new_classifier(sender, *, project_id: int, **kwargs) -> None:
    """``classifier_published``: a linked Label Studio project gets the new predictions and
    model_version (its least-confident ordering counts only predictions of the project's
    model_version), as a task once the promotion is committed."""
    if not settings.LABEL_STUDIO_URL or not Project.objects.filter(
            pk=project_id, label_studio_project_id__isnull=False).exists():
        return
    transaction.on_commit(lambda: background.send(label_studio_push, project_id))


def follow_new_round(sender, *, project_id: int, **kwargs) -> None:
    """``round_created``: a linked Label Studio project (with ``label_studio_push_rounds``)
    gets the round's scans as tasks, in the background."""
    if not settings.LABEL_STUDIO_URL or not Project.objects.filter(
            pk=project_id, label_studio_project_id__isnull=False,
            label_studio_push_rounds=True).exists():
        return
    background.send(label_studio_push_round, project_id)
