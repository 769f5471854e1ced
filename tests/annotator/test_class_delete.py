"""A class that anything refers to cannot be deleted (the probe's fault: deleting a class the
active model learned made every later refit fail "KeyError: 14" and its stored predictions
lost their class silently). The admin's delete page, its "delete selected" action and the
project page's class rows refuse it, as they refuse moving it to another label set, naming
what refers to it; a class nothing refers to is deleted as before. And a class deleted
behind the admin's back (a shell, an older release) never breaks a refit: the gate compares
on the classes that still exist and says which one is gone."""

from __future__ import annotations

from django.urls import reverse
from django.utils import timezone

from annotator import services
from annotator.models import Annotation, AuditEvent, LabelClass, LabelStudioTask, Scan
from ml_backend import services as ml
from ml_backend.models import Prediction, TrainingRun
from tests.annotator.test_admin_integrity import BRAIN, _form, two_sets  # noqa: F401
from tests.factories import model_version_with_files
from tests.ml_backend.test_label_sets import mixed_project  # noqa: F401 (a fixture)


def _deleted(label_class) -> bool:
    return not LabelClass.objects.filter(pk=label_class.pk).exists()


def test_the_admin_refuses_to_delete_a_class_anything_refers_to(client, users, two_sets):  # noqa: F811
    project = two_sets
    brain = project.sets[BRAIN]
    probe, _ = services.label_class_get_or_create(project=project, name="probe_x",
                                                  label_set=brain)
    learned = [*project.classes.values(), probe]
    version = model_version_with_files(project, "p1-clf-29", classes=learned)
    scans = list(Scan.objects.filter(project=project, label_set=brain).order_by("pk")[:2])
    for scan in scans:       # the version's stored predictions, one of them probe_x
        Prediction.objects.create(scan=scan, model_version=version, predicted_class=probe,
                                  probabilities={str(probe.pk): 0.9}, confidence=0.9,
                                  uncertainty=0.1)
    LabelStudioTask.objects.create(project=project, scan=scans[0], ls_task_id=77,
                                   url_issued_at=timezone.now(), shown_suggestion=probe)
    client.force_login(users["dora"])
    said = ("&#x27;probe_x&#x27; cannot be deleted: model version p1-clf-29 learned it: "
            "retire and delete that version first (roll back if one is active), or keep the "
            "class; 2 stored predictions name it")

    # the delete page says why, and its POST deletes nothing
    url = reverse("admin:annotator_labelclass_delete", args=[probe.pk])
    page = client.get(url).content.decode()
    assert said in page and "1 Label Studio task carries it as its suggestion" in page
    assert "probe_x: model version p1-clf-29 learned it" in page      # the protected list
    response = client.post(url, {"post": "yes"})
    assert response.status_code == 200 and said in response.content.decode()
    assert not _deleted(probe)

    # the "delete selected" action: the same refusal, the other classes stay too
    changelist = reverse("admin:annotator_labelclass_changelist")
    normal = project.classes["normal"]            # eval answers give it
    response = client.post(changelist, {"action": "delete_selected", "post": "yes",
                                        "_selected_action": [probe.pk, normal.pk]})
    page = response.content.decode()
    assert response.status_code == 200 and said in page
    answers = Annotation.objects.filter(label_class=normal).count()
    assert "&#x27;normal&#x27; cannot be deleted: model version p1-clf-29 learned it" in page
    assert f"{answers} answers give it: change or delete those answers first" in page
    assert not _deleted(probe) and not _deleted(normal)

    # the project page's class rows: a row marked for deletion is refused in words
    url = reverse("admin:annotator_project_change", args=[project.pk])
    form = _form(client, url)
    row = next(k[:-len("-name")] for k, v in form.items()
               if k.startswith("label_classes-") and k.endswith("-name") and v == "probe_x")
    response = client.post(url, {**form, f"{row}-DELETE": "on"})
    assert response.status_code == 200 and said in response.content.decode()
    assert not _deleted(probe)
    assert not AuditEvent.objects.filter(action="class.deleted").exists()

    # a class nothing refers to goes as before (the action, and the project page)
    spare, _ = services.label_class_get_or_create(project=project, name="spare",
                                                  label_set=brain)
    response = client.post(changelist, {"action": "delete_selected", "post": "yes",
                                        "_selected_action": [spare.pk]})
    assert response.status_code == 302 and _deleted(spare)

    # once the version (and its predictions, and the task's suggestion) are gone, so may it
    version.delete()
    LabelStudioTask.objects.filter(shown_suggestion=probe).update(shown_suggestion=None)
    assert client.post(reverse("admin:annotator_labelclass_delete", args=[probe.pk]),
                       {"post": "yes"}).status_code == 302
    assert _deleted(probe)
    assert AuditEvent.objects.filter(action="class.deleted", object_id=str(probe.pk)).exists()


def test_a_refit_after_a_learned_class_was_deleted_behind_the_admin_compares_what_is_left(
        mixed_project, users, client):  # noqa: F811
    """The probe's steps: a class labeled on 4 scans, a refit that learns it, its answers
    deleted, the class deleted. The admin refuses the last step, naming the version; done
    from a shell anyway, the next refit succeeds and its gate says which class is gone."""
    project = mixed_project
    brain = project.label_sets.get(name=BRAIN)
    probe, _ = services.label_class_get_or_create(project=project, name="probe_x",
                                                  label_set=brain)
    for scan in Scan.objects.filter(project=project, split="pool",
                                    label_set=brain).order_by("-pk")[:4]:
        services.annotation_create(scan=scan, reader=users["alice"], label_class=probe)
    run = ml.training_run_create(project=project, kind="refit")
    assert ml.training_run_execute(run.pk).status == "succeeded"
    run.refresh_from_db()
    learned = run.model_version
    assert probe.pk in [c["id"] for c in learned.config["classes"]]
    # active, whether its gate promoted it or not (a warning: its predictions failed)
    project.refresh_from_db()
    if project.active_model_id != learned.pk:
        assert ml.model_version_promote(learned, actor=users["dora"]) is None
    project.refresh_from_db()
    assert project.active_model == learned
    named = Prediction.objects.filter(model_version=learned, predicted_class=probe).count()

    Annotation.objects.filter(label_class=probe).delete()
    client.force_login(users["dora"])
    page = client.get(reverse("admin:annotator_labelclass_delete",
                              args=[probe.pk])).content.decode()
    assert (f"&#x27;probe_x&#x27; cannot be deleted: model version {learned.version} learned "
            "it") in page
    if named:
        assert f"{named} stored prediction" in page

    # from a shell: the class goes (its predictions keep their row, without a class)
    LabelClass.objects.filter(pk=probe.pk).delete()
    run = ml.training_run_create(project=project, kind="refit")
    run = ml.training_run_execute(run.pk)
    assert run.status == TrainingRun.Status.SUCCEEDED, run.last_error
    run.refresh_from_db()
    candidate = run.model_version
    reason = candidate.status_reason
    assert (f"Left out of the comparison, no longer a class of this project: 'probe_x' "
            f"(class id {probe.pk}), learned by {learned.version}; {candidate.version} and "
            f"{learned.version} were compared on the classes both know that still exist"
            ) in reason, reason
    gone = candidate.metrics["gate"]["deleted_classes"]
    assert gone == [{"id": probe.pk, "name": "probe_x", "learned_by": [learned.version]}]
    # compared on the four classes that exist; probe_x is not a class the candidate "dropped"
    comparison = candidate.metrics["gate"]
    assert set(comparison["shared_classes"]) == {"normal", "pneumonia", "no_tumor",
                                                 "pituitary_tumor"}
    assert comparison["dropped_classes"] == [] and "probe_x" not in comparison["regressions"]

