"""Label Studio's side doors: signed image URLs for its annotators' browsers, and the
webhook that brings annotations back (answers at once, queues the work)."""

from __future__ import annotations

import logging

from django.http import FileResponse, Http404, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from annotator import background
from annotator.label_studio import config, inbound
from annotator.label_studio.tasks import label_studio_ingest_payload
from annotator.models import Project
from annotator.storage import media_path
from medsite import jsonbody

logger = logging.getLogger(__name__)


@require_GET
def ls_image(request, token: str):
    """A scan's display preview for a signed, unexpired token (no login: Label Studio's
    annotators' browsers send no cookies to this site)."""
    scan = config.scan_for_token(token)
    if scan is None:
        raise Http404("This image link is invalid or expired: sync the project again.")
    try:
        handle = open(media_path(scan.preview.name), "rb")
    except (OSError, ValueError):
        raise Http404("The preview file is missing.") from None
    response = FileResponse(handle, content_type="image/png")
    response["Cache-Control"] = "private, max-age=3600"
    response["Access-Control-Allow-Origin"] = "*"   # Label Studio's canvas reads the pixels
    return response


@csrf_exempt
@require_POST
def ls_webhook(request, project_id: int):
    if not inbound.webhook_verified(request.headers.get(inbound.WEBHOOK_HEADER)):
        return JsonResponse({"error": "missing or wrong webhook secret"}, status=403)
    project = Project.objects.filter(pk=project_id).first()
    if project is None:
        return JsonResponse({"error": f"no project {project_id} on this site: check the "
                                      "webhook URL in Label Studio"}, status=404)
    try:
        payload = jsonbody.parse_json(request.body, expect=dict)
    except jsonbody.BodyError as exc:
        logger.warning("Label Studio webhook for project %s refused: %s", project.pk, exc)
        return JsonResponse({"error": str(exc)}, status=exc.status)
    sent_for = payload.get("project")
    sent_for = sent_for.get("id") if isinstance(sent_for, dict) else None
    if sent_for is not None and sent_for != project.label_studio_project_id:
        # another Label Studio project's event sent to this project's webhook: refused
        logger.warning("Label Studio webhook for project %s carried Label Studio project %r "
                       "(linked: %r): refused", project.pk, str(sent_for)[:20],
                       project.label_studio_project_id)
        return JsonResponse({"error": "this event is for another Label Studio project"},
                            status=409)
    # refused now, with their reasons: what may not land on this project's task scans
    pairs, refused = inbound.webhook_screen(project, payload)
    if pairs:       # one task for the payload, however many annotations a bulk event carries
        background.send(label_studio_ingest_payload, project.pk, inbound.queued_items(pairs))
    return JsonResponse({"queued": len(pairs), "refused": refused,
                         "action": payload.get("action")})
