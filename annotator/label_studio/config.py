"""What Label Studio shows: the labeling config built from our label sets and classes, signed
image URLs, and the task data and prediction of a scan."""

from __future__ import annotations

import logging
from xml.sax.saxutils import quoteattr

from django.conf import settings
from django.core import signing
from django.urls import reverse

from annotator.label_studio.api import LabelStudioError
from annotator.label_page import effective_hotkeys
from annotator.models import Project, Scan
from ml_backend.label_studio_protocol import FROM_NAME, TO_NAME, prediction_json
from ml_backend.models import Prediction

logger = logging.getLogger(__name__)


SIGNER_SALT = "annotator.label_studio.image"


def _multi_set(project: Project) -> bool:
    """Several label sets with classes: each task carries its own set's choices."""
    return project.label_sets.filter(classes__isnull=False).distinct().count() > 1


def set_choices(label_set) -> list[dict]:
    """The choices of one label set as Label Studio dynamic-choice options (task data)."""
    classes = list(label_set.classes.order_by("order", "name"))
    keys = effective_hotkeys(classes)
    return [{"value": c.name, **({"hotkey": keys[c.pk]} if keys.get(c.pk) else {}),
             **({"hint": c.description} if c.description else {})} for c in classes]


def labeling_config(project: Project) -> str:
    """Single-choice classification over a large zoomable image, one hotkey per class. With
    several label sets (chest X-ray, brain MRI, …) the choices are dynamic: each task lists
    only its scan's set's classes (``$classes`` in the task data), so an annotator is never
    offered a brain class for a chest film."""
    classes = list(project.label_classes.all())
    findings_sets = sorted({c.label_set.name for c in classes if c.label_set.is_multi})
    if findings_sets:
        raise LabelStudioError(
            f"project {project.name!r} has findings label sets ({', '.join(findings_sets)}): "
            "Label Studio sync handles single-label sets only so far; label findings on our "
            "label page")
    if not classes:
        raise LabelStudioError(f"project {project.name!r} has no classes yet: import labeled "
                               "scans or add a class first")
    image = (f'  <Image name="{TO_NAME}" value="$image" zoom="true" zoomControl="true" '
             f'brightnessControl="true" contrastControl="true" maxWidth="100%"/>\n')
    if _multi_set(project):
        return (f'<View>\n{image}  <Header value="Finding ($label_set)"/>\n'
                f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single-radio" '
                f'required="true" showInline="true" value="$classes"/>\n</View>')
    keys = effective_hotkeys(classes)
    choices = "\n".join(
        f"    <Choice value={quoteattr(c.name)}"
        + (f" hotkey={quoteattr(keys[c.pk])}" if keys.get(c.pk) else "")
        + (f" hint={quoteattr(c.description)}" if c.description else "") + "/>"
        for c in classes)
    return (f'<View>\n{image}'
            f'  <Header value="Finding"/>\n'
            f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single-radio" '
            f'required="true" showInline="true">\n{choices}\n  </Choices>\n</View>')


def image_token(scan: Scan) -> str:
    return signing.dumps({"scan": scan.pk}, salt=SIGNER_SALT, compress=True)


def image_url(scan: Scan) -> str:
    """A signed URL of the scan's display preview that expires after
    LABEL_STUDIO_IMAGE_URL_MAX_AGE (annotators' browsers send no cookies to our site)."""
    return settings.SITE_URL + reverse("annotator:ls_image", args=[image_token(scan)])


def scan_for_token(token: str) -> Scan | None:
    try:
        data = signing.loads(token, salt=SIGNER_SALT,
                             max_age=settings.LABEL_STUDIO_IMAGE_URL_MAX_AGE)
    except signing.BadSignature:
        return None
    return Scan.objects.filter(pk=data.get("scan"), quarantined=False).first()


def _prediction(project: Project, scan: Scan) -> dict | None:
    """Our active model's stored prediction for a scan, as a Label Studio prediction."""
    model = project.active_model
    if model is None:
        return None
    stored = Prediction.objects.filter(model_version=model, scan=scan).select_related(
        "predicted_class").first()
    if stored is None or stored.predicted_class is None:
        return None
    return prediction_json(model.version, stored.predicted_class.name, stored.confidence)


def _task_data(scan: Scan, *, multi_set: bool = False) -> dict:
    data = {"image": image_url(scan), "scan_id": scan.pk, "dataset": scan.dataset.name}
    if multi_set:
        data["label_set"] = scan.label_set.name if scan.label_set_id else "no label set"
        data["classes"] = set_choices(scan.label_set) if scan.label_set_id else []
    return data
