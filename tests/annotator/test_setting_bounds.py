"""Settings the Django admin (and any form or serializer of the models) used to take
without a check — the seventh probe: a negative gate tolerance failed every later refit, a
novelty percentile of -5 flagged the project's own scans as unlike its data, a batch size of
0 or a refit every 0 labels was reinterpreted without a word, a class colour the charts
cannot draw broke both embedding maps, and a name with terminal escapes reached the
exports. Each is refused in words where it is typed; values saved before are brought into
range by the migration."""

from __future__ import annotations

import importlib

import pytest
from django.apps import apps
from django.forms.models import model_to_dict

from annotator import services
from annotator.admin import LabelClassAdminForm, LabelSetAdminForm, ProjectAdminForm
from annotator.models import LabelClass, LabelSet, Project

pytestmark = pytest.mark.django_db


def _errors(form_class, instance, **changes) -> dict:
    data = {k: v for k, v in model_to_dict(instance).items() if v is not None}
    data.update(changes)
    form = form_class(data=data, instance=instance)
    form.is_valid()
    return {k: " ".join(v) for k, v in form.errors.items()}


@pytest.mark.parametrize("field,value", [
    ("gate_tolerance", -1), ("gate_tolerance", 5), ("novelty_percentile", -5),
    ("novelty_percentile", 150), ("novelty_percentile", 10), ("query_batch_size", 0),
    ("query_batch_size", 99_999_999_999), ("refit_every", 0),
    ("name", "bad\x01name\x1b[31m"),
])
def test_the_project_form_refuses_out_of_range_settings(project, field, value):
    errors = _errors(ProjectAdminForm, project, **{field: value})
    assert field in errors, errors
    if field == "name":
        assert "control or invisible character (U+0001)" in errors["name"]
    project.refresh_from_db()
    assert getattr(project, field) != value


def test_the_project_form_keeps_values_in_range(project):
    errors = _errors(ProjectAdminForm, project, gate_tolerance=0, novelty_percentile=100,
                     query_batch_size=10_000, refit_every=1)
    assert not {"gate_tolerance", "novelty_percentile", "query_batch_size",
                "refit_every"} & set(errors), errors


def test_label_set_and_class_forms_refuse_bad_values(project):
    label_set = services.label_set_create(project=project, name="chest findings",
                                          kind=LabelSet.Kind.MULTI)
    for value in (0, -1, 1.5):
        assert "target_sensitivity" in _errors(LabelSetAdminForm, label_set,
                                               target_sensitivity=value)
    assert "name" in _errors(LabelSetAdminForm, label_set, name="chest\u202efindings")
    label_class, _ = services.label_class_get_or_create(project=project, name="Effusion",
                                                        label_set=label_set)
    for colour in ("#zzzzzz", "red;x", "#abc"):
        errors = _errors(LabelClassAdminForm, label_class, color=colour)
        assert "#RRGGBB" in errors.get("color", ""), errors
    assert "name" in _errors(LabelClassAdminForm, label_class, name="pneu\x0bmonia\x1b[2J")
    assert "color" not in _errors(LabelClassAdminForm, label_class, color="#A1b2C3")


def test_values_saved_before_the_bounds_are_brought_into_range(project):
    label_set = services.label_set_create(project=project, name="chest findings",
                                          kind=LabelSet.Kind.MULTI)
    label_class, _ = services.label_class_get_or_create(project=project, name="Effusion",
                                                        label_set=label_set)
    Project.objects.filter(pk=project.pk).update(gate_tolerance=-1, novelty_percentile=-5,
                                                 query_batch_size=0, refit_every=0)
    LabelSet.objects.filter(pk=label_set.pk).update(target_sensitivity=1.5)
    LabelClass.objects.filter(pk=label_class.pk).update(color="red;x")
    migration = importlib.import_module("annotator.migrations.0022_setting_bounds")
    migration.settings_into_bounds(apps, None)
    project.refresh_from_db()
    assert (project.gate_tolerance, project.novelty_percentile, project.query_batch_size,
            project.refit_every) == (0.0, 50.0, 1, 1)
    assert LabelSet.objects.get(pk=label_set.pk).target_sensitivity == 1.0
    assert LabelClass.objects.get(pk=label_class.pk).color == "#4c78a8"
