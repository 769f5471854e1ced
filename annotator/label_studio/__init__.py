"""Label Studio as a second labeling UI — everything that knows Label Studio, in one package.

Django stays the system of record. ``sync`` creates or updates the Label Studio project
(labeling config from our LabelClasses), exports scans as tasks with signed, expiring image
URLs served by this site and our model's predictions (``score`` = confidence, so Label
Studio's ascending prediction-score order puts the least confident first), keeps the Label
Studio project's ``model_version`` equal to ours, saves a Data Manager tab ordered by score,
and registers our ML backend and a webhook carrying a shared secret. Annotations come back
through that webhook (``ingest``), and ``reconcile`` pulls the export to fill any gap, since
Label Studio sends each event once without retrying. Facts: ../shared/docs/LABEL_STUDIO.md.

- ``api``: the SDK client and our calls to it (errors → ``LabelStudioError``)
- ``config``: the labeling config, signed image URLs, task data, and which scans may be
  tasks (``task_scans``: pool, out of quarantine — the only scans an answer may land on)
- ``outbound``: create/update the project, export tasks, push predictions and config, reconcile
- ``inbound``: the webhook payload and one annotation upserted as ours, scoped by project
  (its task scans only; credited only to a member matched by e-mail)
- ``views``: the signed image URL and the webhook endpoints (no login)
- ``tasks``: the Celery tasks; ``receivers``: follow class changes and new classifiers

The ML-backend endpoints Label Studio calls (``/ml/<project>/predict`` …) are the ML
adapter's (``ml_backend/views.py``); the shape of a prediction is shared through
``ml_backend/label_studio_protocol.py``.
"""

from annotator.label_studio.api import LabelStudioError, _call, _raw, client
from annotator.label_studio.config import (
    _task_data,
    image_token,
    image_url,
    labeling_config,
    scan_for_token,
    set_choices,
)
from annotator.label_studio.inbound import (
    ANNOTATION_ACTIONS,
    WEBHOOK_HEADER,
    annotations_in,
    ingest,
    webhook_verified,
)
from annotator.label_studio.outbound import (
    VIEW_TITLE,
    _scans_to_export,
    push_config,
    push_predictions,
    reconcile,
    sync,
)
from annotator.label_studio.receivers import (
    follow_class_changes,
    follow_new_classifier,
    follow_new_round,
)

__all__ = [
    "ANNOTATION_ACTIONS", "LabelStudioError", "VIEW_TITLE", "WEBHOOK_HEADER", "annotations_in",
    "client", "follow_class_changes", "follow_new_classifier", "follow_new_round", "image_token",
    "image_url",
    "ingest", "labeling_config", "push_config", "push_predictions", "reconcile",
    "scan_for_token", "set_choices", "sync", "webhook_verified", "_call", "_raw",
    "_scans_to_export", "_task_data",
]
