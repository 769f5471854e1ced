from __future__ import annotations

from django.contrib import admin, messages

from ml_backend.models import (
    Evaluation,
    ModelVersion,
    Prediction,
    QueryItem,
    QueryRound,
    TrainingRun,
)


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = ["version", "project", "kind", "status", "parent", "num_labels", "macro_f1",
                    "created_at", "promoted_at"]
    list_filter = ["project", "kind", "status"]
    search_fields = ["version", "status_reason", "artifact_dir"]
    raw_id_fields = ["parent"]
    actions = ["promote", "roll_back"]

    def get_readonly_fields(self, request, obj=None):
        """What a version is (its project, kind, files, config, encoder) is fixed once it
        exists: edited, it would be another project's model, or an encoder read as a
        classifier. It becomes active through the actions (promote, roll back)."""
        fields = list(super().get_readonly_fields(request, obj))
        if obj is not None:
            fields += ["project", "kind", "version", "parent", "artifact_dir", "config"]
        return fields

    @admin.display(description="eval macro-F1")
    def macro_f1(self, obj):
        evaluation = obj.evaluations.order_by("-created_at").first()
        return "—" if evaluation is None or evaluation.macro_f1 is None else f"{evaluation.macro_f1:.3f}"

    @admin.action(description="Promote to active (bypasses the gate)")
    def promote(self, request, queryset):
        """Each selected version is made active (a classifier as the project's model, an
        encoder as its encoder); one without the files it needs, or that failed or is still
        training, is refused in words and nothing changes for it."""
        from ml_backend import services

        for model in queryset.select_related("project", "parent"):
            try:
                warning = services.model_version_promote(
                    model, actor=request.user, reason=f"promoted by {request.user} in admin")
            except services.TrainingError as exc:
                self.message_user(request, f"{model.version}: {exc}", messages.ERROR)
                continue
            self.message_user(request, warning or f"{model.version} is now active",
                              messages.WARNING if warning else messages.INFO)

    @admin.action(description="Roll back to the previously active version")
    def roll_back(self, request, queryset):
        from ml_backend import services

        for model in queryset.filter(status=ModelVersion.Status.ACTIVE):
            previous = (ModelVersion.objects.filter(project=model.project, kind=model.kind,
                                                    status=ModelVersion.Status.RETIRED,
                                                    promoted_at__isnull=False)
                        .exclude(pk=model.pk).order_by("-promoted_at").first())
            if previous is None:
                self.message_user(request, f"{model.version}: no earlier version to roll back to",
                                  messages.WARNING)
                continue
            try:
                warning = services.model_version_promote(
                    previous, actor=request.user, rolled_back_from=model,
                    reason=f"rolled back from {model.version} by {request.user}")
            except services.TrainingError as exc:
                self.message_user(request, f"{previous.version}: {exc}", messages.ERROR)
                continue
            self.message_user(request, warning or f"{model.project}: {previous.version} is "
                              "active again", messages.WARNING if warning else messages.INFO)


@admin.register(TrainingRun)
class TrainingRunAdmin(admin.ModelAdmin):
    list_display = ["id", "project", "kind", "status", "progress", "model_version", "claimed_by",
                    "created_at", "finished_at"]
    list_filter = ["project", "kind", "status"]
    search_fields = ["log", "last_error", "claimed_by"]
    raw_id_fields = ["model_version", "requested_by"]


@admin.register(Prediction)
class PredictionAdmin(admin.ModelAdmin):
    list_display = ["id", "scan", "model_version", "predicted_class", "confidence", "uncertainty",
                    "created_at"]
    list_filter = ["model_version__project", "model_version", "predicted_class"]
    search_fields = ["=scan__id", "model_version__version"]
    raw_id_fields = ["scan", "model_version", "predicted_class"]
    list_select_related = ["scan", "model_version", "predicted_class"]


class QueryItemInline(admin.TabularInline):
    model = QueryItem
    extra = 0
    raw_id_fields = ["scan"]


@admin.register(QueryRound)
class QueryRoundAdmin(admin.ModelAdmin):
    list_display = ["id", "project", "strategy", "size", "model_version", "created_by",
                    "created_at"]
    list_filter = ["project", "strategy"]
    search_fields = ["strategy", "model_version__version"]
    raw_id_fields = ["model_version", "created_by"]
    inlines = [QueryItemInline]


@admin.register(QueryItem)
class QueryItemAdmin(admin.ModelAdmin):
    list_display = ["id", "query_round", "rank", "scan", "score"]
    list_filter = ["query_round__project"]
    search_fields = ["=scan__id", "=query_round__id"]
    raw_id_fields = ["query_round", "scan"]


@admin.register(Evaluation)
class EvaluationAdmin(admin.ModelAdmin):
    list_display = ["id", "model_version", "num_labels", "num_eval", "accuracy", "macro_f1",
                    "macro_auc", "cohen_kappa", "ece", "created_at"]
    list_filter = ["model_version__project"]
    search_fields = ["model_version__version"]
    raw_id_fields = ["model_version"]
