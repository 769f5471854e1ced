"""``manage.py report`` on a model with one head per label set: its temperature is one number
per set ({"Chest X-ray": 11.2, "Brain MRI": 8.29}), which the Markdown report formatted as
one number and crashed (``TypeError: unsupported format string passed to dict.__format__``).
It now prints each set's temperature; ``--format json`` keeps the mapping."""

from __future__ import annotations

import io
import json

from django.core.management import call_command

from ml_backend.management.commands.report import _temperature
from tests.ml_backend.test_label_sets import BRAIN, CHEST, mixed_project  # noqa: F401


def _report(project, *args) -> str:
    out = io.StringIO()
    call_command("report", "--project", project.name, *args, stdout=out)
    return out.getvalue()


def test_report_prints_each_label_sets_temperature(mixed_project):  # noqa: F811
    project = mixed_project
    model = project.active_model
    per_set = {s["name"]: s["temperature"] for s in model.config["label_sets"]}
    assert set(per_set) == {CHEST, BRAIN} and model.config["temperature"] is None
    evaluation = model.evaluations.latest("created_at")
    assert evaluation.report["temperature"] == per_set       # what the report reads
    assert "ece_before_scaling" in evaluation.report

    text = _report(project)
    assert f"# {project.name}: {model.version}" in text
    line = next(x for x in text.splitlines() if x.startswith("Eval scans:"))
    assert (f"T per label set: {CHEST} {per_set[CHEST]:.2f}, {BRAIN} {per_set[BRAIN]:.2f})"
            in line) or (f"T per label set: {BRAIN} {per_set[BRAIN]:.2f}, {CHEST} "
                         f"{per_set[CHEST]:.2f})" in line), line
    # the JSON keeps the numbers as they are
    data = json.loads(_report(project, "--format", "json"))
    assert data["report"]["temperature"] == per_set


def test_one_networks_temperature_is_one_number():
    assert _temperature(1.234) == "T=1.23"
    assert _temperature(None) == "T=1.00"                 # not calibrated: T = 1
    assert _temperature({"Chest X-ray": 11.2, "Brain MRI": None}) == \
        "T per label set: Chest X-ray 11.20, Brain MRI —"
