"""The label-free view: what the data holds before anything is labeled.

The project's embedded scans in k clusters (cosine k-means on the active encoder's
SimCLRv2 embeddings and each scan's 16 x 16 thumbnail, standardised side by side,
``ml_backend.services.scan_clusters``), each with its most typical
scans, its size, the datasets it draws on and how its scans are labeled so far; and a map
of the scans coloured by cluster. A clinician sees the main kinds of scan (and the odd ones
out) at a glance, and can start labeling from a cluster's typical scans.
"""

from __future__ import annotations

import logging

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_safe

from annotator import selectors
from ml_backend import charts
from ml_backend import services as ml
from ml_backend.services.runs import encoder_files_refusal

logger = logging.getLogger(__name__)

K_CHOICES = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20)
DEFAULT_K = 8


def _options(request, project) -> tuple[int, object]:
    """``?k=`` (one of K_CHOICES) and ``?set=`` (a label set of the project, or none)."""
    try:
        k = int(request.GET.get("k", DEFAULT_K))
    except ValueError:
        raise Http404("k must be a whole number") from None
    if k not in K_CHOICES:
        raise Http404(f"k must be one of {', '.join(map(str, K_CHOICES))}")
    label_set = None
    if request.GET.get("set"):
        try:
            label_set = project.label_sets.get(pk=int(request.GET["set"]))
        except (ValueError, project.label_sets.model.DoesNotExist):
            raise Http404("No such label set in this project.") from None
    return k, label_set


@login_required
@require_safe
def clusters(request, project_id: int):
    project = selectors.project_get_for_user(request.user, project_id)
    k, label_set = _options(request, project)
    result, error = None, None
    try:
        result = ml.scan_clusters(project=project, k=k,
                                  label_set_id=label_set.pk if label_set else None)
    except (ml.TrainingError, ml.ModelUnavailable) as exc:
        # lost files are not "not embedded yet": embedding cannot help, restoring can
        error = encoder_files_refusal(project) or str(exc)
    query = f"?k={k}" + (f"&set={label_set.pk}" if label_set else "")
    return render(request, "annotator/clusters.html", {
        "project": project, "result": result, "error": error, "k": k,
        "k_choices": K_CHOICES, "label_set": label_set,
        "label_sets": list(project.label_sets.all()), "query": query,
    })


@login_required
def clusters_map(request, project_id: int):
    project = selectors.project_get_for_user(request.user, project_id)
    k, label_set = _options(request, project)
    try:
        result = ml.scan_clusters(project=project, k=k,
                                  label_set_id=label_set.pk if label_set else None)
        table = ml.embedding_table(project.active_encoder)
    except (ml.TrainingError, ml.ModelUnavailable) as exc:
        raise Http404(str(exc)) from None
    ids = list(result["assignment"])
    # the map shows what was clustered (the embedding and the thumbnail, standardised)
    vectors, inputs = ml.cluster_vectors(table, ids)
    xy, kept = charts.pca_2d(vectors, max_points=5000, seed=0, normalize=True)
    labels = [result["assignment"][ids[i]] - 1 for i in kept]
    names = [f"cluster {c + 1}" for c in range(k)]
    title = (f"{len(kept)} scans in {k} clusters\n({result['encoder']} {inputs}, PCA"
             + (f"; {label_set.name}" if label_set else "") + ")")
    png = charts.embedding_map_png(xy, labels, names, title,
                                   colors=[charts.class_color(i) for i in range(k)])
    response = HttpResponse(png, content_type="image/png")
    response["Cache-Control"] = "private, max-age=60"
    return response
