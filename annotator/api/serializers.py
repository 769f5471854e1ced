"""What the API shows of each object (read) and what it accepts (write). Nothing here holds
identifying data: scans are shown by their pseudonymous keys and technical attributes."""

from __future__ import annotations

from rest_framework import serializers

from annotator.models import Annotation, Dataset, LabelClass, Project, Scan
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

    class Meta:
        model = Annotation
        fields = ["id", "scan", "outcome", "label", "reader", "source", "created_at",
                  "duration_ms", "shown_model_version", "shown_suggestion", "shown_confidence",
                  "shown_preselected", "query_round"]


class AnswerSerializer(serializers.Serializer):
    """A reader's answer, as the label page sends it."""

    scan = serializers.IntegerField(help_text="The scan's id (in this project).")
    outcome = serializers.ChoiceField(choices=["label", "skip", "unsure"], default="label")
    class_id = serializers.IntegerField(required=False, allow_null=True,
                                        help_text="The class, for outcome=label.")
    duration_ms = serializers.IntegerField(required=False, allow_null=True, min_value=0)
    shown_model_version = serializers.CharField(required=False, allow_blank=True,
                                                help_text="The model version whose suggestion "
                                                "the reader saw, if any.")
    shown_suggestion = serializers.IntegerField(required=False, allow_null=True,
                                                help_text="The class suggested to the reader.")
    shown_confidence = serializers.FloatField(required=False, allow_null=True, min_value=0,
                                              max_value=1)
    submission_id = serializers.CharField(required=False, max_length=64,
                                          help_text="Makes a retried request a no-op.")


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
