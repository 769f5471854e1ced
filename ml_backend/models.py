"""Model versions, training runs, predictions, query rounds and evaluations.

Artifacts (checkpoints, embeddings, FAISS indexes) live on disk under
``ARTIFACTS_ROOT/models/<version>/``; rows hold paths and JSON, never pickles.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models


class ModelVersion(models.Model):
    class Kind(models.TextChoices):
        ENCODER = "encoder", "SimCLRv2 encoder"
        CLASSIFIER = "classifier", "Classifier"

    class Status(models.TextChoices):
        TRAINING = "training", "Training"
        READY = "ready", "Ready (not active)"
        ACTIVE = "active", "Active"
        RETIRED = "retired", "Retired"
        FAILED = "failed", "Failed"

    project = models.ForeignKey(
        "annotator.Project", on_delete=models.CASCADE, related_name="model_versions"
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    version = models.CharField(max_length=64, unique=True, help_text="e.g. enc-3 or clf-12")
    parent = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="children",
        help_text="The encoder a classifier (or a fine-tuned encoder) was built from.",
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.TRAINING)
    status_reason = models.TextField(blank=True, help_text="Why it was (not) promoted.")
    artifact_dir = models.CharField(max_length=500, blank=True)
    config = models.JSONField(default=dict, blank=True, help_text="Frozen training config.")
    num_labels = models.PositiveIntegerField(default=0)
    metrics = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    promoted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.version


class TrainingRun(models.Model):
    """A unit of background ML work, claimed by exactly one worker."""

    class Kind(models.TextChoices):
        PRETRAIN = "pretrain", "Pretrain (SimCLRv2)"
        EMBED = "embed", "Embed + index"
        REFIT = "refit", "Refit head"
        RETRAIN = "retrain", "Retrain (fine-tune)"
        DISTILL = "distill", "Distill"

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        ABANDONED = "abandoned", "Abandoned (worker lost)"

    project = models.ForeignKey(
        "annotator.Project", on_delete=models.CASCADE, related_name="training_runs"
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    params = models.JSONField(default=dict, blank=True)
    progress = models.FloatField(default=0.0, help_text="0..1")
    log = models.TextField(blank=True)
    last_error = models.TextField(blank=True)
    model_version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="runs"
    )
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    claimed_by = models.CharField(max_length=200, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["project", "status"], name="run_project_status")]

    def __str__(self) -> str:
        return f"{self.kind} #{self.pk} ({self.status})"


class Prediction(models.Model):
    scan = models.ForeignKey("annotator.Scan", on_delete=models.CASCADE, related_name="predictions")
    model_version = models.ForeignKey(
        ModelVersion, on_delete=models.CASCADE, related_name="predictions"
    )
    probabilities = models.JSONField(help_text="{class id: probability}")
    predicted_class = models.ForeignKey(
        "annotator.LabelClass", null=True, on_delete=models.SET_NULL, related_name="+"
    )
    confidence = models.FloatField()
    uncertainty = models.FloatField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["scan", "model_version"], name="prediction_unique_scan_version"
            )
        ]
        indexes = [models.Index(fields=["model_version", "confidence"], name="prediction_conf")]

    def __str__(self) -> str:
        return f"{self.predicted_class} ({self.confidence:.2f}) for scan {self.scan_id}"


class QueryRound(models.Model):
    """One active-learning batch: which scans to label next and why."""

    project = models.ForeignKey(
        "annotator.Project", on_delete=models.CASCADE, related_name="query_rounds"
    )
    model_version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    strategy = models.CharField(max_length=32)
    size = models.PositiveIntegerField(default=0)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"Round {self.pk} ({self.strategy}, {self.size} scans)"


class QueryItem(models.Model):
    query_round = models.ForeignKey(QueryRound, on_delete=models.CASCADE, related_name="items")
    scan = models.ForeignKey("annotator.Scan", on_delete=models.CASCADE, related_name="+")
    rank = models.PositiveIntegerField()
    score = models.FloatField()
    reason = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["query_round", "rank"]
        constraints = [
            models.UniqueConstraint(fields=["query_round", "scan"], name="queryitem_unique_scan"),
            models.UniqueConstraint(fields=["query_round", "rank"], name="queryitem_unique_rank"),
        ]

    def __str__(self) -> str:
        return f"#{self.rank} scan {self.scan_id}"


class Evaluation(models.Model):
    """A model version measured on the project's eval split."""

    model_version = models.ForeignKey(
        ModelVersion, on_delete=models.CASCADE, related_name="evaluations"
    )
    num_labels = models.PositiveIntegerField(default=0, help_text="Training labels seen.")
    num_eval = models.PositiveIntegerField(default=0, help_text="Eval scans scored.")
    accuracy = models.FloatField(null=True, blank=True)
    macro_f1 = models.FloatField(null=True, blank=True)
    macro_auc = models.FloatField(null=True, blank=True)
    cohen_kappa = models.FloatField(null=True, blank=True)
    ece = models.FloatField(null=True, blank=True)
    report = models.JSONField(
        default=dict,
        blank=True,
        help_text="Per-class P/R/F1/support/AUC/AP, confusion matrix, calibration, per-dataset.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"Evaluation of {self.model_version} ({self.num_labels} labels)"
