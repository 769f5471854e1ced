"""Migrations that change a constraint on rows that already exist, run on such rows."""

from __future__ import annotations

import pytest
from django.db import IntegrityError, connection, transaction
from django.db.migrations.executor import MigrationExecutor

BEFORE = [("annotator", "0018_scan_patient_study_indexes")]
AFTER = [("annotator", "0019_submission_id_per_reader_project")]


def _migrate(targets):
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)
    return executor.loader.project_state(targets).apps


@pytest.mark.django_db(transaction=True)
def test_submission_ids_become_per_reader_and_project_on_existing_answers(users):
    """0019: existing answers (one saved before its project was filled in) keep every row;
    the project is filled in; afterwards another reader may reuse an id, the same reader
    in the same project may not, and Label Studio ids stay unique per source."""
    apps = _migrate(BEFORE)
    try:
        Project, Dataset, Scan, Annotation, User = (
            apps.get_model("annotator", "Project"), apps.get_model("annotator", "Dataset"),
            apps.get_model("annotator", "Scan"), apps.get_model("annotator", "Annotation"),
            apps.get_model("auth", "User"))
        alice, bob = User.objects.get(username="alice"), User.objects.get(username="bob")
        project = Project.objects.create(name="Before the change")
        dataset = Dataset.objects.create(project=project, name="chest")
        scan = Scan.objects.create(project=project, dataset=dataset, sha256="a" * 64,
                                   file_format="png", width=8, height=8)
        old = Annotation.objects.create(scan=scan, reader=alice, outcome="skip", source="web",
                                        external_id="run-7-42")
        Annotation.objects.filter(pk=old.pk).update(project=None)
        Annotation.objects.create(scan=scan, project=project, outcome="skip",
                                  source="label_studio", external_id="17")
        apps = _migrate(AFTER)
        Annotation = apps.get_model("annotator", "Annotation")
        assert Annotation.objects.count() == 2
        assert Annotation.objects.get(pk=old.pk).project_id == project.pk
        Annotation.objects.create(scan_id=scan.pk, project_id=project.pk, reader_id=bob.pk,
                                  outcome="skip", source="web", external_id="run-7-42")
        with pytest.raises(IntegrityError), transaction.atomic():
            Annotation.objects.create(scan_id=scan.pk, project_id=project.pk,
                                      reader_id=alice.pk, outcome="skip", source="web",
                                      external_id="run-7-42")
        with pytest.raises(IntegrityError), transaction.atomic():
            Annotation.objects.create(scan_id=scan.pk, project_id=project.pk, outcome="skip",
                                      source="label_studio", external_id="17")
    finally:
        _migrate(MigrationExecutor(connection).loader.graph.leaf_nodes())
