"""The API's views: thin, project-scoped, each read from a selector or a queryset limited to
the caller's projects, each write through the service the UI uses."""

from __future__ import annotations

import json
import re

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, TooManyFilesSent
from django.db.models import Exists, OuterRef
from django.http import FileResponse, Http404, HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import generics, serializers, status
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from annotator import labeling, selectors, services
from annotator.api import serializers as s
from annotator.api.errors import problem
from annotator.forms import UploadForm
from annotator.models import Annotation, ImportJob, LabelClass, Project, Scan
from annotator.uploads import upload_import_start
from ml_backend.models import ModelVersion, Prediction, TrainingRun


class ProjectScoped:
    """Views under /projects/<id>/: the project, if the caller is a member (else 404)."""

    def project(self) -> Project:
        if not hasattr(self, "_project"):
            self._project = selectors.project_get_for_user(self.request.user,
                                                           self.kwargs["project_id"])
        return self._project


class ProjectList(generics.ListAPIView):
    """The projects you are a member of."""

    serializer_class = s.ProjectSerializer

    def get_queryset(self):
        return selectors.project_list_for_user(self.request.user).select_related(
            "active_model", "active_encoder").order_by("pk")


class ProjectDetail(ProjectScoped, generics.RetrieveAPIView):
    serializer_class = s.ProjectSerializer

    def get_object(self):
        return self.project()


class DatasetList(ProjectScoped, generics.ListAPIView):
    serializer_class = s.DatasetSerializer

    def get_queryset(self):
        return self.project().datasets.order_by("pk")


class ClassList(ProjectScoped, generics.ListAPIView):
    """The project's classes and findings, with the label set each belongs to."""

    serializer_class = s.LabelClassSerializer

    def get_queryset(self):
        return LabelClass.objects.filter(project=self.project()).select_related(
            "label_set").order_by("label_set__order", "order", "name")


def query_flag(query, name: str) -> bool | None:
    """A true/false query parameter: None when absent or empty; anything else than true or
    false is refused (a filter that is silently ignored returns what was not asked for)."""
    value = query.get(name)
    if not value:
        return None
    if value not in ("true", "false"):
        raise ValidationError({name: f"use true or false, not {value[:40]!r}"})
    return value == "true"


@extend_schema(parameters=[
    OpenApiParameter("split", str, enum=["pool", "eval"]),
    OpenApiParameter("labeled", bool, description="only scans with (true) or without (false) "
                     "a label or findings answer"),
    OpenApiParameter("dataset", str, description="dataset name"),
    OpenApiParameter("modality", str, description="DICOM modality code, e.g. CT"),
    OpenApiParameter("disagreement", bool, description="true: only scans where the active "
                     "model's prediction differs from the scan's training label"),
])
class ScanList(ProjectScoped, generics.ListAPIView):
    """The project's scans (quarantined ones only for its admins), filtered."""

    serializer_class = s.ScanSerializer

    def get_queryset(self):
        project = self.project()
        scans = Scan.objects.filter(project=project).select_related("dataset", "label_set")
        if project.role_of(self.request.user) != "admin":
            scans = scans.filter(quarantined=False)
        query = self.request.query_params
        if query.get("split"):
            if query["split"] not in ("pool", "eval"):
                raise ValidationError({"split": "use pool or eval"})
            scans = scans.filter(split=query["split"])
        if query.get("dataset"):
            scans = scans.filter(dataset__name=query["dataset"])
        if query.get("modality"):
            scans = scans.filter(modality=query["modality"].upper())
        labeled = query_flag(query, "labeled")
        if labeled is not None:
            answered = Annotation.objects.filter(scan=OuterRef("pk"),
                                                 outcome__in=Annotation.LABELLING)
            scans = scans.filter(Exists(answered)) if labeled else \
                scans.exclude(Exists(answered))
        if query_flag(query, "disagreement"):
            scans = scans.filter(pk__in=self._disagreeing(project))
        return scans.order_by("pk")

    @staticmethod
    def _disagreeing(project: Project) -> list[int]:
        if project.active_model_id is None:
            return []
        predicted = dict(Prediction.objects.filter(model_version_id=project.active_model_id)
                         .values_list("scan_id", "predicted_class_id"))
        found = []
        for split in ("pool", "eval"):
            scans, class_ids = selectors.training_labels(project, split=split)
            found += [scan.pk for scan, c in zip(scans, class_ids)
                      if scan.pk in predicted and predicted[scan.pk] != c]
        return found


class ScanDetail(generics.RetrieveAPIView):
    serializer_class = s.ScanSerializer

    def get_object(self):
        return selectors.scan_get_for_user(self.request.user, self.kwargs["scan_id"])


class Worklist(ProjectScoped, APIView):
    """The current query round: the scans to read next, in rank order, with why each was
    chosen and its state for you."""

    @extend_schema(responses=inline_serializer("Worklist", {
        "round": serializers.IntegerField(allow_null=True),
        "progress": serializers.DictField(allow_null=True),
        "items": s.WorklistItemSerializer(many=True)}))
    def get(self, request, project_id: int):
        data = labeling.worklist(self.project(), request.user)
        return Response({"round": data["round"].pk if data["round"] else None,
                         "progress": data["progress"],
                         "items": s.WorklistItemSerializer(data["rows"], many=True).data})


@extend_schema(parameters=[
    OpenApiParameter("scan", int, description="only this scan's answers"),
    OpenApiParameter("reader", str, description="only this reader's answers (username)"),
    OpenApiParameter("outcome", str, enum=["label", "findings", "skip", "unsure"]),
])
class AnnotationList(ProjectScoped, generics.ListCreateAPIView):
    """Every answer in the project (GET; a reader in a blind-reading project sees other
    readers' answers on a scan once they have answered it), or a new answer (POST) —
    recorded exactly as one given on the label page: the same checks, audit fields, readers
    policy and refits."""

    def get_serializer_class(self):
        return s.AnswerSerializer if self.request.method == "POST" else s.AnnotationSerializer

    def get_queryset(self):
        # a blind reader: other readers' answers only on scans they have answered themselves
        return selectors.answers_visible(
            self.project(), self.request.user,
            Annotation.objects.filter(scan__project=self.project())
            .select_related("reader", "label_class", "shown_model_version", "shown_suggestion")
            .prefetch_related("findings__finding").order_by("pk"))

    def filter_queryset(self, queryset):
        query = self.request.query_params
        if query.get("scan"):
            if not re.fullmatch(r"-?[0-9]{1,18}", query["scan"]):
                raise ValidationError({"scan": "a scan id (a whole number)"})
            queryset = queryset.filter(scan_id=int(query["scan"]))
        if query.get("reader"):
            queryset = queryset.filter(reader__username=query["reader"])
        if query.get("outcome"):
            if query["outcome"] not in Annotation.Outcome.values:
                raise ValidationError({"outcome": "use " + ", ".join(Annotation.Outcome.values)})
            queryset = queryset.filter(outcome=query["outcome"])
        return queryset

    @extend_schema(request=s.AnswerSerializer, responses={201: s.AnnotationSerializer,
                                                          200: s.AnnotationSerializer,
                                                          409: OpenApiTypes.OBJECT})
    def post(self, request, project_id: int):
        answer = s.AnswerSerializer(data=request.data)
        answer.is_valid(raise_exception=True)
        data = {k: v for k, v in answer.validated_data.items() if v is not None}
        project = self.project()
        scan = Scan.objects.filter(project=project, pk=data.pop("scan")).first()
        if scan is None or (scan.quarantined and project.role_of(request.user) != "admin"):
            raise Http404("No such scan in this project.")
        if "outcome" not in request.data and (data.get("findings") or data.get("no_finding")):
            data["outcome"] = "findings"
        if data["outcome"] == "findings":
            for key in ("findings", "shown_scores"):
                data[key] = _finding_ids(scan, data.get(key) or {}, key)
        try:
            annotation, created = labeling.answer_submit(project=project, scan=scan,
                                                         user=request.user, data=data)
        except labeling.AnswerRefused as exc:      # e.g. an eval scan, and not a reviewer
            raise PermissionDenied(str(exc)) from None
        except labeling.SubmissionConflict as exc:  # the id names another answer: not a no-op
            return problem(409, str(exc))
        except services.AnnotationError as exc:
            raise ValidationError({"answer": str(exc)}) from None
        return Response(s.AnnotationSerializer(annotation).data,
                        status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


def _finding_ids(scan: Scan, by_key: dict, field: str) -> dict[int, object]:
    """Findings named by id or by name (as a script knows them) → by id. Ids are checked by
    the answer service; an unknown name is refused here, with the set's findings."""
    from annotator.selectors import findings_for_set

    if scan.label_set_id is None or not scan.label_set.is_multi:
        raise ValidationError({field: f"scan {scan.pk} takes one class, not findings "
                                      "(use outcome=label with class_id)"})
    findings = {f.name: f.pk for f in findings_for_set(scan.label_set)}
    out, named = {}, {}
    for key, value in by_key.items():
        key = str(key)
        if re.fullmatch(r"-?[0-9]{1,18}", key):
            finding = int(key)
        elif key in findings:
            finding = findings[key]
        else:
            raise ValidationError({field: f"{key!r} is not a finding of {scan.label_set.name!r}"
                                          f" (its findings: {', '.join(findings)})"})
        if finding in out:        # "13" and "013", or a name and its id: one finding twice
            raise ValidationError({field: f"{named[finding]!r} and {key!r} name the same "
                                          "finding: give each finding once"})
        out[finding], named[finding] = value, key
    return out


class _Download(BaseRenderer):
    """A file the view makes itself; errors (dicts) still go out as JSON."""

    charset = None

    def render(self, data, accepted_media_type=None, renderer_context=None):
        return data if isinstance(data, (bytes, str)) else json.dumps(data).encode()


class CsvRenderer(_Download):
    media_type, format = "text/csv", "csv"


class JsonLinesRenderer(_Download):
    media_type, format = "application/x-ndjson", "jsonl"


class ZipRenderer(_Download):
    media_type, format = "application/zip", "zip"


@extend_schema(parameters=[
    OpenApiParameter("format", str, enum=["csv", "jsonl"], description="csv (default) or "
                     "JSON lines; the image folder layout is `manage.py export_labels`"),
    OpenApiParameter("split", str, enum=["all", "pool", "eval"]),
    OpenApiParameter("adjudicated", bool, description="true: only scans whose label is "
                     "settled (agreed by the readers needed, or adjudicated)"),
], responses={(200, "text/csv"): OpenApiTypes.STR,
              (200, "application/x-ndjson"): OpenApiTypes.STR})
class LabelExport(ProjectScoped, APIView):
    """The labels, one row per scan: the final label or findings, every reader's answer,
    agreement, and what each reader was shown (the reports page's download)."""

    renderer_classes = [JSONRenderer, CsvRenderer, JsonLinesRenderer]

    def get(self, request, project_id: int):
        from annotator import exports

        query = request.query_params
        if selectors.reads_blind(self.project(), request.user):
            raise PermissionDenied(selectors.BLIND_DOWNLOAD)
        try:
            body, content_type, name = exports.label_download(
                self.project(), fmt=query.get("format") or "csv", split=query.get("split") or "all",
                adjudicated_only=bool(query_flag(query, "adjudicated")))
        except exports.ExportError as exc:
            raise ValidationError({"request": str(exc)}) from None
        response = HttpResponse(body, content_type=content_type)
        response["Content-Disposition"] = f'attachment; filename="{name}"'
        return response


class ImportList(ProjectScoped, generics.ListAPIView):
    """Imports into the project, newest first (GET), or new scans uploaded (POST,
    multipart/form-data): each file checked by its content and de-identified exactly as on
    the upload page; the import runs in the background — follow it at /imports/<id>/."""

    serializer_class = s.ImportJobSerializer
    parser_classes = [MultiPartParser, FormParser]

    def get_queryset(self):
        return ImportJob.objects.filter(project=self.project()).order_by("-created_at", "-pk")

    @extend_schema(request={"multipart/form-data": s.UploadSerializer},
                   responses={202: s.UploadResultSerializer})
    def post(self, request, project_id: int):
        project = self.project()
        try:
            fields = request.POST.copy()      # the schema's defaults, as the page's
        except TooManyFilesSent:
            raise ValidationError({"files": f"at most {settings.UPLOAD_MAX_FILES} files per "
                                            "upload: send them in several"}) from None
        except RequestDataTooBig:
            raise ValidationError({"files": "the request is too large: send the files in "
                                            "several uploads"}) from None
        fields.setdefault("dataset", "uploads")
        fields.setdefault("split", "pool")
        form = UploadForm(fields, request.FILES, label_classes=list(project.label_classes.all()))
        if not form.is_valid():
            raise ValidationError({k: [str(e) for e in v] for k, v in form.errors.items()})
        refusal = selectors.eval_upload_refusal(project, request.user, form.cleaned_data["split"])
        if refusal is not None:
            raise PermissionDenied(refusal)
        try:
            job, rejected = upload_import_start(project=project, user=request.user,
                                                cleaned=form.cleaned_data)
        except services.DatasetMismatch as exc:      # nothing kept, the dataset unchanged
            raise ValidationError({"dataset": [str(exc)]}) from None
        refused = [{"name": r.name, "reason": r.reason} for r in rejected]
        if job is None:
            raise ValidationError({"files": ["none of the files can be imported: " + "; ".join(
                f"{r['name']}: {r['reason']}" for r in refused)]})
        return Response({**s.ImportJobSerializer(job).data, "rejected": refused},
                        status=status.HTTP_202_ACCEPTED)


class ImportDetail(generics.RetrieveAPIView):
    """One import: status, counts and per-file errors (it runs in the background)."""

    serializer_class = s.ImportJobSerializer

    def get_object(self):
        return selectors.import_job_get_for_user(self.request.user, self.kwargs["job_id"])


@extend_schema(parameters=[OpenApiParameter("format", str, enum=["onnx", "torchscript"],
                                            description="onnx (default) or torchscript")],
               responses={(200, "application/zip"): OpenApiTypes.BINARY,
                          409: OpenApiTypes.OBJECT, 503: OpenApiTypes.OBJECT})
class ModelExport(ProjectScoped, APIView):
    """A classifier version as a zip: one network per label set (classes or findings),
    image in, calibrated probabilities out, checked against PyTorch on the project's own
    scans, with its model card (Markdown and JSON). A project admin or reviewer only."""

    renderer_classes = [JSONRenderer, ZipRenderer]

    def get(self, request, project_id: int, version: str):
        from ml_backend.errors import TrainingError
        from ml_backend.services.export import ExportBusy, model_export_archive

        project = self.project()
        if project.role_of(request.user) not in ("admin", "reviewer"):
            raise PermissionDenied("a model leaves the project only with a project admin or "
                                   "reviewer")
        model = ModelVersion.objects.filter(project=project, version=version).first()
        if model is None:
            raise Http404(f"No model version {version!r} in this project.")
        fmt = request.query_params.get("format") or "onnx"
        if fmt not in ("onnx", "torchscript"):
            raise ValidationError({"format": "use onnx or torchscript"})
        try:
            path = model_export_archive(model, fmt=fmt)
        except ExportBusy as exc:       # another request is making this very file
            response = problem(503, str(exc), title="Export in progress")
            response["Retry-After"] = "10"
            return response
        except TrainingError as exc:
            return problem(409, str(exc))
        return FileResponse(open(path, "rb"), as_attachment=True, filename=path.name,
                            content_type="application/zip")


class ModelList(ProjectScoped, generics.ListAPIView):
    """The project's model versions (encoders and classifiers), newest first, each with its
    latest evaluation on the eval split."""

    serializer_class = s.ModelVersionSerializer

    def get_queryset(self):
        return ModelVersion.objects.filter(project=self.project()).select_related(
            "parent").order_by("-created_at", "-pk")


@extend_schema(parameters=[OpenApiParameter(
    "version", str, description="model version (default: the active classifier)")])
class PredictionList(ProjectScoped, generics.ListAPIView):
    """A classifier's stored predictions for the pool (for a reader in a blind-reading
    project, not those of scans another reader has read and they have not)."""

    serializer_class = s.PredictionSerializer

    def get_queryset(self):
        project = self.project()
        version = self.request.query_params.get("version")
        model = (ModelVersion.objects.filter(project=project, version=version).first()
                 if version else project.active_model)
        if model is None:
            if version:
                raise Http404(f"No model version {version!r} in this project.")
            return Prediction.objects.none()
        # a blind reader sees no model on a scan they would read second (as on the label page)
        return selectors.predictions_visible(
            project, self.request.user,
            Prediction.objects.filter(model_version=model).select_related(
                "model_version", "predicted_class").order_by("scan_id"))


class RunList(ProjectScoped, generics.ListAPIView):
    """Training runs (pretraining, refits, retrains, fine-tuning …) with status and
    progress, newest first."""

    serializer_class = s.TrainingRunSerializer

    def get_queryset(self):
        return TrainingRun.objects.filter(project=self.project()).select_related(
            "model_version").order_by("-created_at", "-pk")


class RefitStart(ProjectScoped, APIView):
    """Start a refit now (as "start training" does): queued, never run in the request. 409
    when it could only fail: no encoder yet, or labels of too few classes (the sentence its
    run would fail with)."""

    @extend_schema(request=None, responses={201: s.RefitSerializer, 200: s.RefitSerializer,
                                            409: OpenApiTypes.OBJECT})
    def post(self, request, project_id: int):
        from ml_backend.services import runs

        project = self.project()
        refusal = runs.refit_refusal(project) if project.active_encoder_id else None
        if refusal:
            return problem(409, refusal)
        run = runs.refit_start_if_due(project=project, force=True,
                                      params={"requested_from": "api"})
        if run is not None:
            return Response({"run": run.pk, "status": run.status,
                             "message": f"refit run {run.pk} queued"}, status=201)
        busy = runs.refit_busy(project)
        if busy is not None:
            return Response({"run": busy.pk, "status": busy.status,
                             "message": f"refit run {busy.pk} is already {busy.status}"})
        return problem(409, "the project has no encoder yet: pretrain one first")


class RetrainStart(ProjectScoped, APIView):
    """Start a retrain (fine-tune the network on every label) now: queued. A project admin or
    reviewer only (hours of compute). 409 when one is queued or running, or when it could only
    fail (no encoder, labels of fewer than two classes: the sentence its run would fail
    with)."""

    @extend_schema(request=None, responses={201: s.RefitSerializer, 409: OpenApiTypes.OBJECT})
    def post(self, request, project_id: int):
        from ml_backend import services as ml
        from ml_backend.services import runs

        project = self.project()
        if project.role_of(request.user) not in ("admin", "reviewer"):
            raise PermissionDenied("a retrain takes hours of compute: a project admin or "
                                   "reviewer starts it")
        refusal = runs.retrain_refusal(project)
        if refusal:
            return problem(409, refusal)
        try:
            run = ml.retrain_start(project=project, params={"requested_from": "api"},
                                   enqueue=True)
        except (ml.RetrainSkipped, ml.TrainingError) as exc:
            return problem(409, str(exc))
        return Response({"run": run.pk, "status": run.status,
                         "message": f"retrain run {run.pk} queued"}, status=201)


class QueryStart(ProjectScoped, APIView):
    """Choose the next round of scans to read now (the worklist's "choose the next scans")."""

    @extend_schema(request=None, responses={201: inline_serializer("NewRound", {
        "round": serializers.IntegerField(), "size": serializers.IntegerField(),
        "strategy": serializers.CharField()}), 409: OpenApiTypes.OBJECT})
    def post(self, request, project_id: int):
        from ml_backend import services as ml

        project = self.project()
        try:
            new_round = ml.query_round_create(project=project, created_by=request.user)
        except ml.TrainingError as exc:
            return problem(409, str(exc))
        return Response({"round": new_round.pk, "size": new_round.size,
                         "strategy": new_round.strategy}, status=201)
