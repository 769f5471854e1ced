"""What Label Studio shows: the labeling config built from our label sets and classes, signed
image URLs, and the task data and prediction of a scan."""

from __future__ import annotations

import logging
from xml.sax.saxutils import quoteattr

from django.conf import settings
from django.core import signing
from django.db.models import QuerySet
from django.urls import reverse

from annotator.label_studio.api import LabelStudioError
from annotator.label_page import effective_hotkeys, finding_hotkeys
from annotator.models import Project, Scan, Split
from annotator.selectors import findings_for_set
from ml_backend.label_studio_protocol import (
    FINDINGS_NAME,
    FROM_NAME,
    NO_FINDING,
    TO_NAME,
    UNCERTAIN_NAME,
    findings_prediction_json,
    prediction_json,
)
from ml_backend.models import Prediction

logger = logging.getLogger(__name__)


SIGNER_SALT = "annotator.label_studio.image"


def _sets(project: Project) -> list:
    """The project's label sets that have classes (or findings), in a stable order."""
    from annotator.models import LabelSet

    return list(LabelSet.objects.filter(project=project, classes__isnull=False).distinct()
                .order_by("pk"))


def _multi_set(project: Project) -> bool:
    """Several label sets with classes: each task carries its own set's choices."""
    return len(_sets(project)) > 1


def set_choices(label_set) -> list[dict]:
    """The choices of one label set as Label Studio dynamic-choice options (task data)."""
    classes = list(label_set.classes.order_by("order", "name"))
    keys = effective_hotkeys(classes)
    return [{"value": c.name, **({"hotkey": keys[c.pk]} if keys.get(c.pk) else {}),
             **({"hint": c.description} if c.description else {})} for c in classes]


def findings_keys(findings: list) -> dict[int, str]:
    """Digit hotkeys 1–9 for the findings (Label Studio's own shortcuts use letters); 0 is
    "No finding"."""
    return {pk: key for pk, key in finding_hotkeys(findings).items() if key in "123456789"}


def findings_choices(label_set) -> tuple[list[dict], list[dict]]:
    """A findings set as two dynamic-choice lists: present (with "No finding", key 0) and
    uncertain."""
    findings = list(findings_for_set(label_set))
    keys = findings_keys(findings)
    present = [{"value": f.name, **({"hotkey": keys[f.pk]} if keys.get(f.pk) else {}),
                **({"hint": f.description} if f.description else {})} for f in findings]
    present.append({"value": NO_FINDING, "hotkey": "0",
                    "hint": "every finding of the set is absent"})
    return present, [{"value": f.name} for f in findings]


PRESENT_HEADER = "Findings present (tick each, or No finding)"
UNCERTAIN_HEADER = "Uncertain (findings you cannot call present or absent)"


def labeling_config(project: Project) -> str:
    """Classification over a large zoomable image. A single-label set: one single-choice
    control, one hotkey per class. A findings set: a multiple-choice control of the findings
    present (or "No finding", key 0) and one of the uncertain ones; a finding in neither is
    absent. With several label sets (chest X-ray findings, brain MRI tumour type, …) the
    choices are dynamic: each task lists only its scan's set's classes or findings (task data
    ``$classes`` / ``$findings`` / ``$uncertain``), so an annotator is never offered a brain
    class for a chest film."""
    classes = list(project.label_classes.all())
    if not classes:
        raise LabelStudioError(f"project {project.name!r} has no classes yet: import labeled "
                               "scans or add a class first")
    clashing = sorted(c.name for c in classes if c.name.lower() == NO_FINDING.lower())
    if clashing:
        raise LabelStudioError(f"a class is named {clashing[0]!r}, which Label Studio's "
                               "findings control uses for the empty set: rename it")
    # the image never pushes the answer below the fold (65% of the window's height at most)
    image = (f'  <Image name="{TO_NAME}" value="$image" zoom="true" zoomControl="true" '
             f'brightnessControl="true" contrastControl="true" maxWidth="100%" '
             f'maxHeight="65vh"/>\n')
    sets = _sets(project)
    has_single = any(not s.is_multi for s in sets)
    has_findings = any(s.is_multi for s in sets)
    if len(sets) > 1:
        parts = [f'<View>\n{image}  <Header value="$label_set"/>\n']
        if has_single:
            # required only when every task has a class to choose (findings tasks have none)
            required = "" if has_findings else ' required="true"'
            parts.append(f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" '
                         f'choice="single-radio"{required} showInline="true" '
                         f'value="$classes"/>\n')
        if has_findings:
            parts.append(f'  <Header value="$findings_header" size="5"/>\n'
                         f'  <Choices name="{FINDINGS_NAME}" toName="{TO_NAME}" '
                         f'choice="multiple" showInline="true" value="$findings"/>\n'
                         f'  <Header value="$uncertain_header" size="5"/>\n'
                         f'  <Choices name="{UNCERTAIN_NAME}" toName="{TO_NAME}" '
                         f'choice="multiple" showInline="true" value="$uncertain"/>\n')
        return "".join(parts) + "</View>"
    if has_findings:
        present, uncertain = findings_choices(sets[0])

        def rows(options):
            return "\n".join(
                f"    <Choice value={quoteattr(o['value'])}"
                + (f" hotkey={quoteattr(o['hotkey'])}" if o.get("hotkey") else "")
                + (f" hint={quoteattr(o['hint'])}" if o.get("hint") else "") + "/>"
                for o in options)
        return (f'<View>\n{image}'
                f'  <Header value={quoteattr(PRESENT_HEADER)}/>\n'
                f'  <Choices name="{FINDINGS_NAME}" toName="{TO_NAME}" choice="multiple" '
                f'required="true" showInline="true">\n{rows(present)}\n  </Choices>\n'
                f'  <Header value={quoteattr(UNCERTAIN_HEADER)} size="5"/>\n'
                f'  <Choices name="{UNCERTAIN_NAME}" toName="{TO_NAME}" choice="multiple" '
                f'showInline="true">\n{rows(uncertain)}\n  </Choices>\n</View>')
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


# The one rule of which scans may be Label Studio tasks, and so the only scans an answer
# from Label Studio may land on (the export and the webhook both read it): the project's pool
# scans out of quarantine. Eval scans are labeled once, at import or by reviewers and admins
# on the label page (a reader's answer would move the scores every model is compared on);
# a quarantined scan is shown to project admins only until one releases it.
def task_scans(project: Project) -> QuerySet[Scan]:
    """The scans of ``project`` that may be Label Studio tasks."""
    return project.scans.filter(split=Split.POOL, quarantined=False)


def task_refusal(project: Project, scan: Scan) -> str | None:
    """Why ``scan`` may not be a Label Studio task of ``project`` (nor take an answer from
    one), or None. The same rule as ``task_scans``, for one scan."""
    if scan.project_id != project.pk:
        return f"scan {scan.pk} is not one of {project.name!r}'s scans"
    if scan.quarantined:
        return (f"scan {scan.pk} is quarantined (it may show burned-in patient details): "
                "it is not read until a project admin releases it")
    if scan.split != Split.POOL:
        return (f"scan {scan.pk} is an eval scan: its labels are the fixed test set every "
                "model is scored on, never a Label Studio task (reviewers and admins "
                "label it on the label page)")
    return None


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
    """Our active model's prediction for a scan, as a Label Studio prediction."""
    return predictions_for(project, [scan]).get(scan.pk)


def predictions_for(project: Project, scans: list[Scan]) -> dict[int, dict]:
    """Our active model's predictions for scans as Label Studio predictions, by scan id: the
    stored prediction of a single-label scan; a findings scan's per-finding probabilities,
    scored in one batch per findings set. A scan the model has nothing for is left out."""
    model = project.active_model
    if model is None or not scans:
        return {}
    out: dict[int, dict] = {}
    by_set: dict[int, list[Scan]] = {}
    single = []
    for scan in scans:
        if scan.label_set_id is not None and scan.label_set.is_multi:
            by_set.setdefault(scan.label_set_id, []).append(scan)
        else:
            single.append(scan)
    if single:
        for stored in Prediction.objects.filter(
                model_version=model, scan__in=single,
                predicted_class__isnull=False).select_related("predicted_class"):
            out[stored.scan_id] = prediction_json(model.version, stored.predicted_class.name,
                                                  stored.confidence)
    if by_set:
        from ml_backend.errors import TrainingError
        from ml_backend.services.findings import findings_predictions

        try:
            scored = findings_predictions(model, [s for m in by_set.values() for s in m])
        except (TrainingError, OSError, ValueError) as exc:
            logger.warning("findings predictions for Label Studio with %s failed: %s",
                           model.version, exc)
            scored = {}
        for scan_id, (scores, thresholds) in scored.items():
            out[scan_id] = findings_prediction_json(model.version, scores, thresholds)
    return out


def _task_data(scan: Scan, *, multi_set: bool = False) -> dict:
    data = {"image": image_url(scan), "scan_id": scan.pk, "dataset": scan.dataset.name}
    if multi_set:
        label_set = scan.label_set if scan.label_set_id else None
        data["label_set"] = label_set.name if label_set else "no label set"
        data["classes"], data["findings"], data["uncertain"] = [], [], []
        data["findings_header"] = data["uncertain_header"] = ""
        if label_set is not None and label_set.is_multi:
            data["findings"], data["uncertain"] = findings_choices(label_set)
            data["findings_header"], data["uncertain_header"] = PRESENT_HEADER, UNCERTAIN_HEADER
        elif label_set is not None:
            data["classes"] = set_choices(label_set)
    return data
