"""The API's views: thin, project-scoped, each read from a selector or a queryset limited to
the caller's projects, each write through the service the UI uses."""

from __future__ import annotations

from django.db.models import Exists, OuterRef
from django.http import Http404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import generics, serializers, status
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from annotator import labeling, selectors, services
from annotator.api import serializers as s
from annotator.api.errors import problem
from annotator.models import Annotation, LabelClass, Project, Scan
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
        if query.get("labeled") in ("true", "false"):
            labeled = Annotation.objects.filter(scan=OuterRef("pk"),
                                                outcome__in=Annotation.LABELLING)
            scans = scans.filter(Exists(labeled)) if query["labeled"] == "true" else \
                scans.exclude(Exists(labeled))
        if query.get("disagreement") == "true":
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


class AnnotationList(ProjectScoped, generics.ListCreateAPIView):
    """Every answer in the project (GET), or a new answer (POST) — recorded exactly as one
    given on the label page: the same checks, audit fields, readers policy and refits."""

    def get_serializer_class(self):
        return s.AnswerSerializer if self.request.method == "POST" else s.AnnotationSerializer

    def get_queryset(self):
        return (Annotation.objects.filter(scan__project=self.project())
                .select_related("reader", "label_class", "shown_model_version",
                                "shown_suggestion").order_by("pk"))

    @extend_schema(request=s.AnswerSerializer, responses={201: s.AnnotationSerializer,
                                                          200: s.AnnotationSerializer})
    def post(self, request, project_id: int):
        answer = s.AnswerSerializer(data=request.data)
        answer.is_valid(raise_exception=True)
        data = {k: v for k, v in answer.validated_data.items() if v is not None}
        project = self.project()
        scan = Scan.objects.filter(project=project, pk=data.pop("scan")).first()
        if scan is None or (scan.quarantined and project.role_of(request.user) != "admin"):
            raise Http404("No such scan in this project.")
        try:
            annotation, created = labeling.answer_submit(project=project, scan=scan,
                                                         user=request.user, data=data)
        except services.AnnotationError as exc:
            raise ValidationError({"answer": str(exc)}) from None
        return Response(s.AnnotationSerializer(annotation).data,
                        status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


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
    """A classifier's stored predictions for the pool."""

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
        return Prediction.objects.filter(model_version=model).select_related(
            "model_version", "predicted_class").order_by("scan_id")


class RunList(ProjectScoped, generics.ListAPIView):
    """Training runs (pretraining, refits, retrains, fine-tuning …) with status and
    progress, newest first."""

    serializer_class = s.TrainingRunSerializer

    def get_queryset(self):
        return TrainingRun.objects.filter(project=self.project()).select_related(
            "model_version").order_by("-created_at", "-pk")


class RefitStart(ProjectScoped, APIView):
    """Start a refit now (as "start training" does): queued, never run in the request."""

    @extend_schema(request=None, responses={201: s.RefitSerializer, 200: s.RefitSerializer,
                                            409: OpenApiTypes.OBJECT})
    def post(self, request, project_id: int):
        from ml_backend.services import runs

        project = self.project()
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
    reviewer only (hours of compute)."""

    @extend_schema(request=None, responses={201: s.RefitSerializer, 409: OpenApiTypes.OBJECT})
    def post(self, request, project_id: int):
        from ml_backend import services as ml

        project = self.project()
        if project.role_of(request.user) not in ("admin", "reviewer"):
            raise PermissionDenied("a retrain takes hours of compute: a project admin or "
                                   "reviewer starts it")
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
