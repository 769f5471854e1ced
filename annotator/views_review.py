"""The reviewer's page: disagreements, likely label errors, reader agreement, adjudication.

Reviewers and admins only: clinicians and outsiders get 404 (``project_get_for_user`` with
``roles=("reviewer",)`` lets admins and superusers through).
"""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST, require_safe

from annotator import review as reviews
from annotator import selectors
from annotator.findings import findings_agreement_all
from annotator.models import LabelClass
from annotator.services import AnnotationError

REVIEW_ROLES = ("reviewer",)


NOTE_MAX_CHARS = 2000
SECTION_IDS = ("disagreements", "flagged")     # the review page's sections, in order


class AdjudicationForm(forms.Form):
    label_class = forms.IntegerField(min_value=1)
    note = forms.CharField(required=False, max_length=NOTE_MAX_CHARS, error_messages={
        "max_length": f"the note is too long: %(show_value)s characters, the limit is "
                      f"{NOTE_MAX_CHARS:,}"})


@login_required
@require_safe
def review(request, project_id: int):
    project = selectors.project_get_for_user(request.user, project_id, roles=REVIEW_ROLES)
    return _review_page(request, project)


def _review_page(request, project, *, status: int = 200):
    return render(request, "annotator/review.html", {
        "held_out": selectors.held_out_disagreements(project),
        "project": project,
        "role": project.role_of(request.user),
        "classes": list(project.label_classes.all()),
        "sections": [
            {"id": "disagreements", "title": "Readers disagree",
             "rows": reviews.disagreements(project),
             "empty": "No open disagreements: every scan read twice agrees or is adjudicated."},
            {"id": "flagged", "title": "Flagged as likely label errors",
             "rows": reviews.flagged(project),
             "empty": "Nothing flagged and not yet adjudicated. Run the label-quality check "
                      "to look for likely label errors."},
        ],
        "quality_round": reviews.latest_quality_round(project),
        "agreement": reviews.agreement_by_class(project),
        "findings_agreement": [
            {"label_set": label_set, **findings_agreement_all(label_set)}
            for label_set in project.label_sets.filter(kind="multi").order_by("order", "pk")],
        "min_pairs": reviews.MIN_PAIRS,
    }, status=status)


@login_required
@require_POST
def adjudicate(request, project_id: int, scan_id: int):
    """Store the reviewer's decision. The form's ``seen`` (what its row showed) makes it a
    decision on those answers: if the scan's answers or adjudication changed since, the
    review page comes back as it is now, with a 409 and what changed, and nothing is stored.
    A post without ``seen`` (a page from before it) is stored as before, and the message
    names any adjudication it replaces."""
    project = selectors.project_get_for_user(request.user, project_id, roles=REVIEW_ROLES)
    scan = project.scans.select_related("project").filter(pk=scan_id).first()
    if scan is None:
        raise Http404("No such scan in this project.")
    form = AdjudicationForm(request.POST)
    # back to the section the reviewer was in, with the message there (not at the top)
    section = request.POST.get("section", "")
    section = section if section in SECTION_IDS else ""
    tags = f"section-{section}" if section else ""
    back = redirect(reverse("annotator:review", args=[project.pk])
                    + (f"#{section}" if section else ""))
    label_class = None
    if "note" in form.errors:            # the class may be fine: say what is wrong
        messages.error(request, f"Scan {scan.pk} was not adjudicated: "
                                f"{' '.join(form.errors['note'])}.", extra_tags=tags)
        return back
    if form.is_valid():
        label_class = LabelClass.objects.filter(pk=form.cleaned_data["label_class"]).first()
    if label_class is None:
        messages.error(request, f"Scan {scan.pk} was not adjudicated: choose one of the "
                                "project's classes.", extra_tags=tags)
        return back
    try:
        done = reviews.adjudicate(scan=scan, reviewer=request.user, label_class=label_class,
                                  note=form.cleaned_data["note"],
                                  seen=request.POST.get("seen") or None)
    except reviews.AdjudicationConflict as exc:
        messages.error(request, f"Scan {scan.pk} was not adjudicated: {exc}.", extra_tags=tags)
        return _review_page(request, project, status=409)
    except (reviews.ReviewError, AnnotationError) as exc:
        messages.error(request, f"Scan {scan.pk} was not adjudicated: {exc}.", extra_tags=tags)
    else:
        replaces = f" (it replaces {done.replaced_in_words})" if done.replaced else ""
        messages.success(request, f"Scan {scan.pk} adjudicated as {label_class.name}: "
                                  f"training now uses this label{replaces}.", extra_tags=tags)
    return back


@login_required
@require_POST
def run_quality_check(request, project_id: int):
    """Run the label-quality check now. It fits small linear heads on stored embeddings
    (seconds), and its error must reach the reviewer; a QueryRound has no row to record a
    background failure on, so it runs in the request rather than as a task."""
    from ml_backend.errors import TrainingError
    from ml_backend.services import label_quality_check

    project = selectors.project_get_for_user(request.user, project_id, roles=REVIEW_ROLES)
    try:
        round_ = label_quality_check(project=project, created_by=request.user)
    except TrainingError as exc:
        messages.error(request, f"The label-quality check did not run: {exc}.")
    else:
        skipped = getattr(round_, "skipped", [])
        messages.success(request, f"Label-quality check (round {round_.pk}): {round_.size} "
                                  f"scan{'s' if round_.size != 1 else ''} flagged as likely "
                                  "label errors." + (f" Not checked (fewer than 2 labels): "
                                                     f"{', '.join(skipped)}." if skipped else ""))
    return redirect("annotator:review", project.pk)


@login_required
@require_safe
def readers(request, project_id: int):
    """The project admin's per-reader dashboard."""
    project = selectors.project_get_for_user(request.user, project_id, roles=())
    if project.role_of(request.user) != "admin":
        raise Http404("Only a project admin sees the readers' dashboard.")
    return render(request, "annotator/readers.html", {
        "project": project, "readers": reviews.reader_stats(project)})
