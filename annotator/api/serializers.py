"""What the API shows of each object (read) and what it accepts (write). Nothing here holds
identifying data: scans are shown by their pseudonymous keys and technical attributes."""

from __future__ import annotations

from rest_framework import serializers

from annotator.models import Annotation, Dataset, ImportJob, LabelClass, Project, Scan
from annotator.services import answer_outcome_conflicts
from ml_backend.models import Evaluation, ModelVersion, Prediction, TrainingRun


class ProjectSerializer(serializers.ModelSerializer):
    role = serializers.SerializerMethodField(help_text="Your role in this project.")
    active_model = serializers.SlugRelatedField(slug_field="version", read_only=True, allow_null=True)
    active_encoder = serializers.SlugRelatedField(slug_field="version", read_only=True, allow_null=True)

    class Meta:
        model = Project
        fields = ["id", "name", "description", "role", "colour_mode", "query_strategy",
                  "query_batch_size", "refit_every", "readers_per_scan", "dicom_grouping",
                  "active_model", "active_encoder", "created_at"]

    def get_role(self, project) -> str:
        return project.role_of(self.context["request"].user) or ""


class DatasetSerializer(serializers.ModelSerializer):
    class Meta:
        model = Dataset
        fields = ["id", "name", "modality", "body_part", "colour_mode"]


class LabelClassSerializer(serializers.ModelSerializer):
    label_set = serializers.CharField(source="label_set.name", read_only=True, default=None, allow_null=True)
    kind = serializers.SerializerMethodField(help_text="class (single label) or finding")

    class Meta:
        model = LabelClass
        fields = ["id", "name", "label_set", "kind", "hotkey", "color", "description"]

    def get_kind(self, label_class) -> str:
        return "finding" if label_class.label_set_id and label_class.label_set.is_multi \
            else "class"


class ScanSerializer(serializers.ModelSerializer):
    dataset = serializers.CharField(source="dataset.name", read_only=True)
    label_set = serializers.CharField(source="label_set.name", read_only=True, default=None, allow_null=True)
    preview = serializers.SerializerMethodField(help_text="URL of the scan's preview PNG.")

    class Meta:
        model = Scan
        fields = ["id", "dataset", "split", "label_set", "file_format", "width", "height",
                  "num_frames", "modality", "body_part", "colour", "patient_key", "study_key",
                  "series_key", "series_number", "slice_position", "slices", "quarantined",
                  "preview", "created_at"]

    def get_preview(self, scan) -> str:
        from django.urls import reverse

        return reverse("annotator:scan_preview", args=[scan.pk])


class AnnotationSerializer(serializers.ModelSerializer):
    reader = serializers.CharField(source="reader.username", read_only=True, default=None, allow_null=True)
    label = serializers.CharField(source="label_class.name", read_only=True, default=None, allow_null=True)
    shown_model_version = serializers.SlugRelatedField(slug_field="version", read_only=True, allow_null=True)
    shown_suggestion = serializers.SlugRelatedField(slug_field="name", read_only=True, allow_null=True)
    findings = serializers.SerializerMethodField(
        help_text="A findings answer: each finding answered, by name: present, absent or "
                  "uncertain (null for a class answer).")
    shown_scores = serializers.SerializerMethodField(
        help_text="A findings answer: the probability per finding the reader was shown.")

    class Meta:
        model = Annotation
        fields = ["id", "scan", "outcome", "label", "findings", "reader", "source",
                  "created_at", "duration_ms", "shown_model_version", "shown_suggestion",
                  "shown_confidence", "shown_scores", "shown_preselected", "query_round"]

    def get_findings(self, annotation) -> dict[str, str] | None:
        if annotation.outcome != Annotation.Outcome.FINDINGS:
            return None
        return {f.finding.name: f.state for f in annotation.findings.all()}

    def get_shown_scores(self, annotation) -> dict[str, float] | None:
        if not annotation.shown_scores:
            return None
        names = {f.finding_id: f.finding.name for f in annotation.findings.all()}
        return {names.get(int(k), str(k)): float(v) for k, v in annotation.shown_scores.items()}


class AnswerSerializer(serializers.Serializer):
    """A reader's answer, as the label page sends it: a class (``outcome=label``), findings
    (``outcome=findings``, for a scan of a findings set), skip or unsure."""

    scan = serializers.IntegerField(help_text="The scan's id (in this project).")
    outcome = serializers.ChoiceField(choices=["label", "findings", "skip", "unsure"],
                                      default="label",
                                      help_text="label (one class), findings (several "
                                      "findings, for a scan of a findings set), skip or unsure.")
    class_id = serializers.IntegerField(required=False, allow_null=True,
                                        help_text="The class, for outcome=label.")
    findings = serializers.DictField(
        child=serializers.ChoiceField(choices=["present", "absent", "uncertain"]),
        required=False, allow_empty=True,
        help_text="For outcome=findings: finding (its id or name) → present, absent or "
                  "uncertain. Findings left out are unanswered.")
    no_finding = serializers.BooleanField(
        required=False, default=False,
        help_text="For outcome=findings: no finding at all (every finding of the set absent).")
    shown_scores = serializers.DictField(
        child=serializers.FloatField(min_value=0, max_value=1), required=False,
        help_text="For outcome=findings: finding (id or name) → the probability the reader "
                  "was shown.")
    duration_ms = serializers.IntegerField(
        required=False, allow_null=True, min_value=0,
        error_messages={"invalid": "the reading time in whole milliseconds (0 or more)",
                        "min_value": "the reading time in whole milliseconds (0 or more)"},
        help_text="How long the reader took, in milliseconds (a longer reading than 6 hours "
                  "is stored as 6 hours).")
    shown_model_version = serializers.CharField(required=False, allow_blank=True,
                                                help_text="The model version whose suggestion "
                                                "the reader saw, if any.")
    shown_suggestion = serializers.IntegerField(
        required=False, allow_null=True,
        help_text="The class the model suggested to the reader: a class of the scan's label "
                  "set, with the classifier that suggested it in shown_model_version.")
    shown_confidence = serializers.FloatField(required=False, allow_null=True, min_value=0,
                                              max_value=1)
    submission_id = serializers.CharField(required=False, max_length=64,
                                          help_text="Your key for this answer (unique among "
                                          "your answers in this project): a retried request "
                                          "with it is a no-op (200, the stored answer); the "
                                          "same key with a different answer is refused (409, "
                                          "naming the stored one): send a change with a new "
                                          "key.")

    def validate(self, attrs):
        """An answer says one thing (``services.answer_outcome_conflicts``): a field of
        another outcome is refused, naming it, never dropped. Without ``outcome``, findings
        or no_finding make a findings answer (as the view reads it)."""
        has_findings = bool(attrs.get("findings")) or attrs.get("no_finding") is True
        outcome = (attrs.get("outcome") if "outcome" in self.initial_data
                   else "findings" if has_findings else "label")
        conflicts = answer_outcome_conflicts(
            outcome=outcome, class_id=attrs.get("class_id"), findings=attrs.get("findings"),
            no_finding=attrs.get("no_finding"))
        if conflicts:
            raise serializers.ValidationError(conflicts)
        return attrs


class WorklistItemSerializer(serializers.Serializer):
    rank = serializers.IntegerField(source="item.rank")
    scan = ScanSerializer()
    state = serializers.CharField(help_text="open, second, held, answered or labeled")
    readings = serializers.IntegerField()
    needed = serializers.IntegerField()
    why = serializers.SerializerMethodField(help_text="Why the scan was chosen, in words.")
    score = serializers.FloatField(source="item.score")

    def get_why(self, row) -> str:
        reason = row["reason"]
        return reason.get("words") or reason.get("why") or ""


class EvaluationSerializer(serializers.ModelSerializer):
    class Meta:
        model = Evaluation
        fields = ["num_labels", "num_eval", "accuracy", "macro_f1", "macro_auc", "cohen_kappa",
                  "ece", "created_at"]


class ModelVersionSerializer(serializers.ModelSerializer):
    parent = serializers.SlugRelatedField(slug_field="version", read_only=True, allow_null=True)
    evaluation = serializers.SerializerMethodField()

    class Meta:
        model = ModelVersion
        fields = ["id", "version", "kind", "status", "status_reason", "parent", "num_labels",
                  "created_at", "promoted_at", "evaluation"]

    def get_evaluation(self, model) -> dict | None:
        evaluation = model.evaluations.order_by("-created_at").first()
        return EvaluationSerializer(evaluation).data if evaluation else None


class TrainingRunSerializer(serializers.ModelSerializer):
    model_version = serializers.SlugRelatedField(slug_field="version", read_only=True, allow_null=True)

    class Meta:
        model = TrainingRun
        fields = ["id", "kind", "status", "progress", "model_version", "last_error",
                  "created_at", "started_at", "finished_at"]


class PredictionSerializer(serializers.ModelSerializer):
    model_version = serializers.SlugRelatedField(slug_field="version", read_only=True, allow_null=True)
    predicted_class = serializers.SlugRelatedField(slug_field="name", read_only=True, allow_null=True)

    class Meta:
        model = Prediction
        fields = ["scan", "model_version", "predicted_class", "confidence", "uncertainty",
                  "probabilities"]


class RefitSerializer(serializers.Serializer):
    run = serializers.IntegerField(allow_null=True)
    status = serializers.CharField()
    message = serializers.CharField()


class ImportJobSerializer(serializers.ModelSerializer):
    url = serializers.SerializerMethodField(help_text="The import's page on the site.")

    class Meta:
        model = ImportJob
        fields = ["id", "status", "dataset_name", "split", "total", "processed", "imported",
                  "duplicates", "failed", "skipped", "labels_added", "classes_created",
                  "errors", "warnings", "last_error", "created_at", "started_at",
                  "finished_at", "url"]

    def get_url(self, job) -> str:
        return job.get_absolute_url()


class RejectedFileSerializer(serializers.Serializer):
    name = serializers.CharField(help_text="The file's name (a DICOM's is never shown).")
    reason = serializers.CharField()


class UploadSerializer(serializers.Serializer):
    """Scans to import (multipart/form-data), checked and de-identified exactly as the
    upload page's."""

    files = serializers.ListField(child=serializers.FileField(),
                                  help_text="DICOM (.dcm or none), PNG, JPEG or TIFF files.")
    dataset = serializers.CharField(default="uploads", help_text="Site, scanner or collection.")
    split = serializers.ChoiceField(choices=["pool", "eval", "auto:0.2"], default="pool")
    modality = serializers.CharField(required=False, help_text="For PNG / JPEG / TIFF, e.g. CR.")
    body_part = serializers.CharField(required=False, help_text="e.g. CHEST, BRAIN, BLOOD.")
    label = serializers.CharField(required=False, help_text="A class every file shows.")


class UploadResultSerializer(ImportJobSerializer):
    rejected = RejectedFileSerializer(many=True, read_only=True)

    class Meta(ImportJobSerializer.Meta):
        fields = ImportJobSerializer.Meta.fields + ["rejected"]
