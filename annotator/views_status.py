"""The label page's model status line: is a refit running, and what came of the last one."""

from __future__ import annotations

from django.http import JsonResponse
from django.views.decorators.http import require_GET

from annotator import selectors
from annotator.auth import login_required_json
from annotator.status import model_status as project_model_status


@login_required_json
@require_GET
def model_status(request, project_id: int):
    project = selectors.project_get_for_user(request.user, project_id)
    response = JsonResponse(project_model_status(project))
    response["Cache-Control"] = "no-store"
    return response
