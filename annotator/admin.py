from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db import models as db_models
from django.db.models import Count
from django.urls import reverse
from django.utils.html import format_html

from annotator.models import (
    Annotation,
    AuditEvent,
    Dataset,
    ImportChunk,
    ImportJob,
    LabelClass,
    FindingAnswer,
    LabelSet,
    LabelStudioTask,
    Membership,
    PacsReport,
    Project,
    Scan,
    ScanLease,
    hotkey_error,
)
from annotator.services import (
    _learned_ids,
    colour_mode_locked,
    label_class_hotkey_problem,
    label_class_set_change_problem,
    label_class_uses,
)
from ml_backend import services as ml
from ml_backend.models import ModelVersion
from ml_backend.services.artifacts import model_version_files_problem


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 1
    autocomplete_fields = ["user"]


# Inline rows sized to fit a 1280-pixel screen (the project page is edited on laptops).
COMPACT = {
    db_models.TextField: {"widget": forms.Textarea(attrs={"rows": 2, "cols": 32})},
    db_models.CharField: {"widget": forms.TextInput(attrs={"size": 14})},
    db_models.FloatField: {"widget": forms.NumberInput(attrs={"style": "width: 5em"})},
    db_models.IntegerField: {"widget": forms.NumberInput(attrs={"style": "width: 4em"})},
    db_models.PositiveSmallIntegerField: {"widget": forms.NumberInput(
        attrs={"style": "width: 4em"})},
}


class LabelClassAdminForm(forms.ModelForm):
    """A class in the admin: only its project's label sets; a class that has labels keeps
    its set (``label_class_set_change_problem``); its hotkey is free in the set it will be
    in (``label_class_hotkey_problem``), whichever set that is."""

    # the inline's formset checks the keys of all its rows together (a swap is fine)
    hotkeys_checked_by_formset = False

    class Meta:
        model = LabelClass
        fields = "__all__"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "label_set" in self.fields and self.instance.project_id is not None:
            self.fields["label_set"].queryset = LabelSet.objects.filter(
                project_id=self.instance.project_id)

    def clean(self):
        cleaned = super().clean()
        if "label_set" in self.errors or "project" in self.errors:
            return cleaned
        project = cleaned.get("project") or (self.instance.project
                                             if self.instance.project_id else None)
        label_set = cleaned.get("label_set", self.instance.label_set
                                if self.instance.label_set_id else None)
        if project is None or label_set is None:
            return cleaned
        probe = LabelClass(pk=self.instance.pk, project=project)
        problem = label_class_set_change_problem(probe, label_set)
        if problem:
            self.add_error("label_set" if "label_set" in self.fields else None, problem)
            return cleaned
        key = (cleaned.get("hotkey") or "").strip().lower()
        # a key the label page keeps is the model's own check (LabelClass.clean); here: one
        # key per set, in the set the class will be in
        if not self.hotkeys_checked_by_formset and hotkey_error(
                key, findings=label_set.is_multi) is None:
            problem = label_class_hotkey_problem(label_set=label_set, hotkey=key,
                                                 label_class=probe)
            if problem:
                self.add_error("hotkey" if "hotkey" in self.fields else None, problem)
        return cleaned


class LabelClassInlineForm(LabelClassAdminForm):
    hotkeys_checked_by_formset = True


class LabelClassInlineFormSet(forms.BaseInlineFormSet):
    """Each hotkey once per label set, over the project's classes as they will be after
    this save (so two rows may swap their keys)."""

    def clean(self):
        super().clean()
        # a row marked for deletion: refused while anything refers to its class
        refusals = [label_class_delete_problem(form.instance) for form in self.forms
                    if self.can_delete and form.instance.pk is not None
                    and hasattr(form, "cleaned_data") and self._should_delete_form(form)]
        if any(refusals):
            raise ValidationError([r for r in refusals if r])
        if any(self.errors) or self.instance.pk is None:
            return
        final = {c.pk: (c.label_set_id, (c.hotkey or "").lower(), c.name)
                 for c in LabelClass.objects.filter(project=self.instance)}
        added = []
        for form in self.forms:
            if not hasattr(form, "cleaned_data") or not form.cleaned_data:
                continue
            if self.can_delete and self._should_delete_form(form):
                final.pop(form.instance.pk, None)
                continue
            data = form.cleaned_data
            label_set = data.get("label_set")
            entry = (label_set.pk if label_set else None,
                     (data.get("hotkey") or "").strip().lower(), data.get("name"))
            if form.instance.pk:
                final[form.instance.pk] = entry
            else:
                added.append(entry)
        seen: dict[tuple, str] = {}
        names = dict(LabelSet.objects.filter(project=self.instance).values_list("pk", "name"))
        for set_id, key, name in [*final.values(), *added]:
            if not key:
                continue
            if (set_id, key) in seen:
                raise ValidationError(
                    f"{seen[set_id, key]!r} and {name!r} would both answer to {key!r} in "
                    f"{names.get(set_id, 'one label set')!r}: give one of them another key.")
            seen[set_id, key] = name


def _count(n: int, thing: str, verb: str) -> str:
    """"1 answer gives", "3 answers give" (``verb`` as after a plural)."""
    if n == 1:
        return f"1 {thing} {verb[:-1] + 'ies' if verb.endswith('ry') else verb + 's'}"
    return f"{n} {thing}s {verb}"


def label_class_delete_refusals(label_class: LabelClass) -> list[str]:
    """Why ``label_class`` may not be deleted, one reason a line (empty when it may): the
    rule that keeps a class in its label set (``label_class_uses``: answers, findings
    answers, suggestions shown, predictions, classifier versions that learned it) and a
    Label Studio task carrying it as its suggestion. Deleted, the answers would stop it
    (PROTECT), the suggestions and predictions would lose their class silently (SET_NULL),
    and a version that learned it would name a class that no longer exists."""
    if label_class.pk is None:
        return []
    uses = label_class_uses(label_class)
    tasks = LabelStudioTask.objects.filter(shown_suggestion_id=label_class.pk).count()
    reasons = []
    if uses.get("model versions"):
        versions = [version for version, config in ModelVersion.objects.filter(
            project_id=label_class.project_id, kind=ModelVersion.Kind.CLASSIFIER
        ).order_by("created_at", "pk").values_list("version", "config").iterator()
            if label_class.pk in _learned_ids(config)]
        those = "that version" if len(versions) == 1 else "those versions"
        reasons.append(
            f"model version{'s' if len(versions) > 1 else ''} {', '.join(versions)} learned "
            f"it: retire and delete {those} first (roll back if one is active), or keep the "
            "class")
    if uses.get("answers"):
        n = uses["answers"]
        reasons.append(f"{_count(n, 'answer', 'give')} it: change or delete "
                       f"{'that answer' if n == 1 else 'those answers'} first")
    if uses.get("findings answers"):
        n = uses["findings answers"]
        reasons.append(f"{_count(n, 'findings answer', 'state')} it: change or delete "
                       f"{'that answer' if n == 1 else 'those answers'} first")
    if uses.get("shown suggestions"):
        reasons.append(f"{_count(uses['shown suggestions'], 'answer', 'record')} it as the "
                       "suggestion shown to the reader")
    if uses.get("predictions"):
        reasons.append(f"{_count(uses['predictions'], 'stored prediction', 'name')} it "
                       "(predictions go with the version that made them)")
    if tasks:
        reasons.append(f"{_count(tasks, 'Label Studio task', 'carry')} it as its "
                       "suggestion")
    return reasons


def label_class_delete_problem(label_class: LabelClass, reasons: list[str] | None = None
                               ) -> str | None:
    """The refusals of ``label_class_delete_refusals`` as one sentence (None: it may go)."""
    reasons = label_class_delete_refusals(label_class) if reasons is None else reasons
    if not reasons:
        return None
    return (f"{label_class.name!r} cannot be deleted: {'; '.join(reasons)}. A class that "
            "anything refers to is kept: rename it, or leave it unused.")


class LabelClassInline(admin.TabularInline):
    model = LabelClass
    form = LabelClassInlineForm
    formset = LabelClassInlineFormSet
    extra = 0
    fields = ["name", "label_set", "hotkey", "color", "order", "description"]
    formfield_overrides = COMPACT

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        """Only this project's label sets (a new project has none to offer yet)."""
        if db_field.name == "label_set":
            project_id = request.resolver_match.kwargs.get("object_id") \
                if request.resolver_match else None
            kwargs["queryset"] = LabelSet.objects.filter(
                project_id=project_id if str(project_id or "").isdigit() else None)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)


class LabelSetAdminForm(forms.ModelForm):
    """A set's kind (single label or findings) changes only while it holds no answers
    (the rule ``label_set_create`` keeps)."""

    class Meta:
        model = LabelSet
        fields = "__all__"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "datasets" in self.fields and self.instance.project_id is not None:
            self.fields["datasets"].queryset = Dataset.objects.filter(
                project_id=self.instance.project_id)

    def clean_kind(self):
        kind = self.cleaned_data.get("kind")
        if self.instance.pk and kind != self.instance.kind and Annotation.objects.filter(
                db_models.Q(label_class__label_set=self.instance)
                | db_models.Q(findings__finding__label_set=self.instance)).exists():
            raise ValidationError(f"{self.instance.name!r} already holds answers: its kind "
                                  "(single label or findings) can no longer change.")
        return kind


class LabelSetInline(admin.StackedInline):
    """Stacked: a set has too many settings for one table row on a laptop screen."""
    model = LabelSet
    form = LabelSetAdminForm
    extra = 0
    fields = ["name", ("kind", "order"), ("uncertain_policy", "threshold_rule",
                                          "target_sensitivity"), ("modalities", "body_parts")]
    show_change_link = True


@admin.register(LabelSet)
class LabelSetAdmin(admin.ModelAdmin):
    """Which classes apply to which scans: a scan uses the first set (by order) claiming its
    dataset, then its modality, then its body part; a set without rules takes the rest.
    Saving re-applies the rules to the project's scans."""

    list_display = ["name", "project", "kind", "uncertain_policy", "modalities", "body_parts",
                    "order", "class_count", "scan_count"]
    list_filter = ["project", "kind"]
    search_fields = ["name", "description"]
    filter_horizontal = ["datasets"]
    form = LabelSetAdminForm

    def get_readonly_fields(self, request, obj=None):
        """A set stays in its project (its classes, scans and answers are that project's)."""
        fields = list(super().get_readonly_fields(request, obj))
        return fields + ["project"] if obj is not None else fields

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(
            _classes=Count("classes", distinct=True), _scans=Count("scans", distinct=True))

    @admin.display(ordering="_classes", description="classes")
    def class_count(self, obj):
        return obj._classes

    @admin.display(ordering="_scans", description="scans")
    def scan_count(self, obj):
        return obj._scans

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        from annotator.services import label_sets_assign

        moved = label_sets_assign(form.instance.project)
        if moved:
            self.message_user(request, f"{moved} scan(s) now use a different label set")


class ProjectAdminForm(forms.ModelForm):
    """The active classifier and encoder: only this project's versions of that kind are
    offered, and one is accepted only with the files it needs
    (``model_version_files_problem``); a new project has none to offer."""

    ACTIVE = {"active_model": ModelVersion.Kind.CLASSIFIER,
              "active_encoder": ModelVersion.Kind.ENCODER}

    class Meta:
        model = Project
        fields = "__all__"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name, kind in self.ACTIVE.items():
            if name not in self.fields:
                continue
            field = self.fields[name]
            field.queryset = ModelVersion.objects.filter(
                project_id=self.instance.pk, kind=kind).exclude(
                status__in=[ModelVersion.Status.FAILED, ModelVersion.Status.TRAINING]
            ).order_by("-created_at", "-pk") if self.instance.pk else ModelVersion.objects.none()
            field.error_messages["invalid_choice"] = (
                f"Choose one of this project's {kind} versions (not failed, not training): "
                f"a version of another project, or another kind, cannot be its {name}.")

    def clean(self):
        cleaned = super().clean()
        for name, kind in self.ACTIVE.items():
            model = cleaned.get(name)
            if model is None or name not in self.changed_data:
                continue
            if model.project_id != self.instance.pk or model.kind != kind:
                self.add_error(name, f"{model.version} is not a {kind} of this project.")
                continue
            problem = model_version_files_problem(model)
            if problem:
                self.add_error(name, problem)
        return cleaned


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    form = ProjectAdminForm
    list_display = ["name", "scan_count", "class_count", "colour_mode", "query_strategy",
                    "active_model", "label_studio_project_id", "created_at"]
    list_filter = ["query_strategy", "colour_mode", "created_at"]
    search_fields = ["name", "description"]
    inlines = [MembershipInline, LabelSetInline, LabelClassInline]
    raw_id_fields = ["created_by"]

    class Media:
        css = {"all": ["annotator/admin.css"]}

    def get_readonly_fields(self, request, obj=None):
        """Grey or colour is fixed once a model exists: its networks take 1 or 3 channels."""
        fields = list(super().get_readonly_fields(request, obj))
        if obj is not None and colour_mode_locked(obj):
            fields.append("colour_mode")
        return fields

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(
            _scans=Count("scans", distinct=True), _classes=Count("label_classes", distinct=True)
        )

    @admin.display(ordering="_scans", description="scans")
    def scan_count(self, obj):
        return obj._scans

    @admin.display(ordering="_classes", description="classes")
    def class_count(self, obj):
        return obj._classes

    def save_model(self, request, obj, form, change):
        """A new active encoder or classifier chosen here is made active as a promotion
        would (its status, the previous one retired, the audit trail, the pool's
        predictions and the next round); clearing one just clears it."""
        chosen = {name: form.cleaned_data[name] for name in ProjectAdminForm.ACTIVE
                  if change and name in form.changed_data and form.cleaned_data.get(name)}
        if chosen:          # saved as they were; the promotion below sets them
            stored = Project.objects.filter(pk=obj.pk).values(*[f"{n}_id" for n in chosen])[0]
            for key, value in stored.items():
                setattr(obj, key, value)
        super().save_model(request, obj, form, change)
        for name in ("active_encoder", "active_model"):
            if name not in chosen:
                continue
            model = chosen[name]
            try:
                warning = ml.model_version_promote(
                    model, actor=request.user,
                    reason=f"made the {name.replace('_', ' ')} by {request.user} in the admin")
            except ml.TrainingError as exc:
                self.message_user(request, f"{model.version}: {exc}", messages.ERROR)
                continue
            if warning:
                self.message_user(request, warning, messages.WARNING)
            else:
                self.message_user(request, f"{model.version} is now the project's "
                                           f"{name.replace('_', ' ')}")
        if chosen:
            obj.refresh_from_db()


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "project", "role", "created_at"]
    list_filter = ["role", "project"]
    search_fields = ["user__username", "user__email", "project__name"]
    autocomplete_fields = ["user", "project"]


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    list_display = ["name", "project", "site", "scanner", "modality", "body_part",
                    "hflip_allowed", "colour_mode", "scan_count"]
    list_filter = ["project", "modality", "body_part", "hflip_allowed", "colour_mode"]
    readonly_fields = ["colour_mode", "colour_note"]
    search_fields = ["name", "site", "scanner", "description"]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(_scans=Count("scans"))

    @admin.display(ordering="_scans", description="scans")
    def scan_count(self, obj):
        return obj._scans


class AnnotationInline(admin.TabularInline):
    model = Annotation
    extra = 0
    fields = ["label_class", "outcome", "reader", "source", "created_at", "shown_model_version",
              "shown_suggestion", "shown_confidence"]
    readonly_fields = ["created_at"]
    raw_id_fields = ["reader", "shown_model_version"]


def _thumbnail(scan: Scan, size: int) -> str:
    if scan.pk is None:
        return "—"
    url = reverse("annotator:scan_preview", args=[scan.pk])
    return format_html(
        '<img src="{}" alt="scan {}" style="max-width:{}px;max-height:{}px;background:#000">',
        url, scan.pk, size, size,
    )


@admin.register(Scan)
class ScanAdmin(admin.ModelAdmin):
    list_display = ["id", "thumbnail", "project", "dataset", "split", "file_format", "modality",
                    "body_part", "size", "labels", "created_at"]
    list_filter = ["project", "label_set", "split", "quarantined", "file_format", "modality",
                   "body_part", "colour",
                   "dataset", "burned_in_annotation"]
    actions = ["release_from_quarantine"]
    search_fields = ["=id", "sha256", "source_name", "patient_key", "=study_key", "=series_key",
                     "manufacturer",
                     "manufacturer_model"]
    readonly_fields = ["large_preview", "sha256", "file", "preview", "file_format", "width",
                       "height", "num_frames", "bits_stored", "modality", "manufacturer",
                       "manufacturer_model", "body_part", "photometric", "pixel_spacing",
                       "transfer_syntax", "patient_key", "study_key", "series_key",
                       "series_number", "instance_number", "slice_position", "slice_spacing",
                       "burned_in_annotation", "source_name", "created_at"]
    list_select_related = ["project", "dataset"]
    list_per_page = 50
    inlines = [AnnotationInline]

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("annotations__label_class")

    def has_add_permission(self, request):
        # Scans enter through import (command or upload page), which de-identifies them.
        return False

    @admin.action(description="Release from quarantine (pixels checked: no identifying text)")
    def release_from_quarantine(self, request, queryset):
        released = 0
        for scan in queryset.filter(quarantined=True):
            scan.quarantined = False
            scan.save(update_fields=["quarantined"])
            from annotator import audit

            audit.record(action="scan.released", obj_type="scan", obj_id=scan.pk,
                         project=scan.project, actor=request.user,
                         details={"burned_in_annotation": scan.burned_in_annotation})
            released += 1
        self.message_user(request, f"{released} scan(s) released from quarantine")

    @admin.display(description="preview")
    def thumbnail(self, obj):
        return _thumbnail(obj, 64)

    @admin.display(description="preview")
    def large_preview(self, obj):
        return _thumbnail(obj, 512)

    @admin.display(description="size")
    def size(self, obj):
        return f"{obj.width}x{obj.height}" + (f"x{obj.num_frames}" if obj.num_frames > 1 else "")

    @admin.display(description="labels")
    def labels(self, obj):
        names = sorted({a.label_class.name for a in obj.annotations.all() if a.label_class})
        return ", ".join(names) or "—"


@admin.register(LabelClass)
class LabelClassAdmin(admin.ModelAdmin):
    form = LabelClassAdminForm
    list_display = ["name", "project", "label_set", "hotkey", "swatch", "order", "label_count", "created_at"]
    list_filter = ["project", "label_set"]
    search_fields = ["name", "description"]

    def get_readonly_fields(self, request, obj=None):
        """A class stays in its project (its answers, models and sets are that project's)."""
        fields = list(super().get_readonly_fields(request, obj))
        return fields + ["project"] if obj is not None else fields

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(_labels=Count("annotations"))

    def get_deleted_objects(self, objs, request):
        """The delete page and the "delete selected" action refuse a class that anything
        refers to (``label_class_delete_refusals``), as they refuse one with answers: each
        reason is listed as what protects it, and said in one sentence above."""
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        protected = list(protected)
        for label_class in objs:
            reasons = label_class_delete_refusals(label_class)
            if reasons:
                protected += [f"{label_class.name}: {reason}" for reason in reasons]
                self.message_user(request, label_class_delete_problem(label_class, reasons),
                                  messages.ERROR)
        return deleted, counts, perms_needed, protected

    @admin.display(ordering="_labels", description="labels")
    def label_count(self, obj):
        return obj._labels

    @admin.display(description="colour")
    def swatch(self, obj):
        return format_html(
            '<span style="display:inline-block;width:1em;height:1em;background:{}"></span> {}',
            obj.color, obj.color,
        )


class FindingAnswerInline(admin.TabularInline):
    """A findings answer's per-finding states (present / absent / uncertain)."""

    model = FindingAnswer
    extra = 0
    fields = ["finding", "state"]
    raw_id_fields = ["finding"]


@admin.register(FindingAnswer)
class FindingAnswerAdmin(admin.ModelAdmin):
    """Each finding of each findings answer: filter by finding and state (e.g. every
    uncertain Effusion), open the answer for who, when and what the reader was shown."""

    list_display = ["id", "annotation", "finding", "state", "reader", "created_at"]
    list_filter = ["state", "finding__label_set", "finding"]
    search_fields = ["=annotation__scan__id", "finding__name", "annotation__reader__username"]
    raw_id_fields = ["annotation", "finding"]
    list_select_related = ["annotation__reader", "finding"]

    @admin.display(ordering="annotation__reader__username")
    def reader(self, obj):
        return obj.annotation.reader

    @admin.display(ordering="annotation__created_at")
    def created_at(self, obj):
        return obj.annotation.created_at


@admin.register(Annotation)
class AnnotationAdmin(admin.ModelAdmin):
    list_display = ["id", "scan", "label_class", "outcome", "findings_summary", "reader",
                    "source", "created_at", "duration_ms", "shown_model_version",
                    "shown_suggestion", "shown_confidence"]
    inlines = [FindingAnswerInline]

    @admin.display(description="findings")
    def findings_summary(self, obj):
        return obj.findings_text()

    list_filter = ["source", "outcome", "label_class__project", "label_class", "created_at"]
    search_fields = ["=scan__id", "reader__username", "label_class__name", "external_id", "note"]
    raw_id_fields = ["scan", "reader", "shown_model_version", "query_round", "import_job"]
    list_select_related = ["scan", "label_class", "reader", "shown_model_version",
                           "shown_suggestion"]
    date_hierarchy = "created_at"

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("findings__finding")

    def save_model(self, request, obj, form, change):
        """A label added here counts like one from the labeling UI: it may queue a refit."""
        from annotator.services import label_saved

        if not change and obj.reader_id is None:
            obj.reader = request.user
        super().save_model(request, obj, form, change)
        if not change:
            label_saved(obj)


@admin.register(ImportJob)
class ImportJobAdmin(admin.ModelAdmin):
    list_display = ["id", "project", "status", "dataset_name", "split", "total", "imported",
                    "duplicates", "failed", "labels_added", "created_by", "created_at"]
    list_filter = ["status", "project", "split", "source_is_upload"]
    search_fields = ["source", "dataset_name", "last_error"]
    readonly_fields = [f.name for f in ImportJob._meta.fields]

    def has_add_permission(self, request):
        return False


@admin.register(ImportChunk)
class ImportChunkAdmin(admin.ModelAdmin):
    """The chunks of a large import on the workers (README "Scaling out"): which ran, how
    often (a lost worker's chunk runs again), and what each imported."""

    list_display = ["id", "job", "index", "start", "stop", "status", "attempts", "processed",
                    "imported", "duplicates", "failed", "finished_at"]
    list_filter = ["status"]
    search_fields = ["job__source", "job__dataset_name"]
    readonly_fields = [f.name for f in ImportChunk._meta.fields]

    def has_add_permission(self, request):
        return False


@admin.register(ScanLease)
class ScanLeaseAdmin(admin.ModelAdmin):
    """Who has which scan open in the label page (expired rows are free to take)."""

    list_display = ("scan", "user", "project", "expires_at", "created_at")
    list_filter = ("project",)
    search_fields = ("user__username",)
    readonly_fields = ("project", "scan", "user", "created_at")

    def has_add_permission(self, request):
        return False


@admin.register(LabelStudioTask)
class LabelStudioTaskAdmin(admin.ModelAdmin):
    """Scans exported to Label Studio and the prediction each task carries."""

    list_display = ("ls_task_id", "scan", "project", "shown_model_version", "shown_suggestion",
                    "shown_confidence", "url_issued_at")
    list_filter = ("project",)
    search_fields = ("ls_task_id",)
    readonly_fields = [f.name for f in LabelStudioTask._meta.fields]

    def has_add_permission(self, request):
        return False


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    """The audit trail: read-only, filterable, exportable as CSV."""

    list_display = ("created_at", "actor_name", "project", "action", "object_type", "object_id",
                    "model_version")
    list_filter = ("action", "project", "object_type")
    search_fields = ("actor_name", "object_id", "model_version")
    date_hierarchy = "created_at"
    actions = ["export_csv"]
    readonly_fields = [f.name for f in AuditEvent._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.action(description="Export selected events as CSV")
    def export_csv(self, request, queryset):
        from django.http import HttpResponse

        from annotator.audit import to_csv

        response = HttpResponse(to_csv(queryset.select_related("project").order_by("created_at")),
                                content_type="text/csv")
        response["Content-Disposition"] = 'attachment; filename="medlabel-audit.csv"'
        return response


@admin.register(PacsReport)
class PacsReportAdmin(admin.ModelAdmin):
    """What was sent back to the PACS (`manage.py pacs_push`), read-only."""

    list_display = ["scan", "result", "model_version", "sent_at"]
    list_filter = ["scan__project", "model_version"]
    search_fields = ["=scan__id", "result", "sop_instance_uid"]
    readonly_fields = ["scan", "result", "model_version", "sop_instance_uid", "sent_at"]

    def has_add_permission(self, request):
        return False

