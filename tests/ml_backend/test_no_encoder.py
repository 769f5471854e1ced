"""A project with no encoder (or one whose files went missing) is still labeled, and is
told the truth.

The sixth probe's project: 15 unlabeled pool scans imported with ``import_scans
--create-project``, no encoder. The worklist promises that scans are then chosen at
random; the project's strategy (hybrid) needs embeddings, so the round falls back to random
and says so in each pick's reason; the label page serves scans; and when a round truly
cannot be made the page says why instead of "nothing left". With the active encoder's
folder moved away, the pages that need its embeddings, the label page's similar-scans
panel and Label Studio's health say the files are missing and how to get them back, and
``embed`` is refused before a run is made."""

from __future__ import annotations

import shutil
from html import unescape
from pathlib import Path

import pytest
from django.contrib.messages import get_messages
from django.core.management import CommandError, call_command

from annotator import labeling
from annotator.models import Project, Scan
from ml_backend import services as ml
from ml_backend.models import QueryRound, TrainingRun
from tests.base import FIXTURES, PASSWORD
from tests.label_studio.conftest import ML_AUTH, ml_client

pytestmark = pytest.mark.django_db


def _import(tmp_path, name: str, folder: Path, n: int, *, split: str = "pool") -> Project:
    """``manage.py import_scans --create-project`` of ``n`` files of ``folder``."""
    source = tmp_path / f"{name}-{split}"
    source.mkdir()
    for path in sorted(folder.iterdir())[:n]:
        shutil.copy(path, source / path.name)
    call_command("import_scans", str(source), "--project", name, "--create-project",
                 "--layout", "flat", "--split", split, "--no-progress")
    return Project.objects.get(name=name)


@pytest.fixture
def no_encoder(users, tmp_path):
    """The probe's project: 15 unlabeled pool chest films, no encoder, alice a clinician."""
    from annotator import services
    from annotator.models import Membership

    project = _import(tmp_path, "No encoder", FIXTURES / "chest_xray" / "pool" / "normal", 15)
    services.membership_set(project=project, user=users["alice"],
                            role=Membership.Role.CLINICIAN)
    assert project.active_encoder is None and project.query_strategy == "hybrid"
    assert project.scans.filter(split="pool").count() == 15
    return project


def _login(client, user):
    assert client.login(username=user.username, password=PASSWORD)
    return client


def test_without_embeddings_the_round_falls_back_to_random_and_says_so(no_encoder, users):
    project = no_encoder
    query_round = ml.query_round_create(project=project, created_by=users["alice"])
    assert query_round.size == 15                        # the batch (20) takes the whole pool
    assert query_round.strategy == "random"              # what chose them, not what was asked
    whys = {item.reason["why"] for item in query_round.items.all()}
    assert whys == {"picked at random: this project has no encoder yet, so its 'hybrid' "
                    "strategy cannot rank the scans (pretrain one for better picks)"}
    assert {item.reason["fallback_from"] for item in query_round.items.all()} == {"hybrid"}
    words = labeling.describe_reason(query_round.items.first().reason)["words"]
    assert words.startswith("Picked at random: this project has no encoder yet")


def test_an_explicit_strategy_that_needs_embeddings_is_refused_in_consistent_words(no_encoder):
    """The CLI's ``--strategy hybrid`` is a choice, not a default: it is refused (no round),
    and the list of what each strategy needs agrees with the refusal."""
    rounds = QueryRound.objects.count()
    with pytest.raises(CommandError) as refused:
        call_command("query", "--project", no_encoder.name, "--strategy", "hybrid")
    message = str(refused.value)
    assert "the 'hybrid' strategy cannot choose scans here (this strategy needs embeddings)" \
        in message
    assert "hybrid: embeddings or a model" in message and "random: nothing" in message
    assert "strategies that need no model: hybrid" not in message
    assert QueryRound.objects.count() == rounds


def test_the_cli_query_with_the_projects_strategy_picks_at_random(no_encoder, capsys):
    call_command("query", "--project", no_encoder.name, "--n", "4")
    out = capsys.readouterr().out
    assert "Query round" in out and ": 4 scans by random" in out
    assert "picked at random: this project has no encoder yet" in out


def test_the_label_page_serves_scans_without_an_encoder(no_encoder, users, client):
    """/next/ (the worklist's Start) and the answer's next scan: a scan, not "nothing left"."""
    project = no_encoder
    _login(client, users["alice"])
    response = client.get(f"/projects/{project.pk}/next/")
    assert response.status_code == 302
    assert f"/projects/{project.pk}/label/" in response["Location"], (
        response["Location"], [str(m) for m in get_messages(response.wsgi_request)])
    first = QueryRound.objects.get(project=project)
    assert first.size == 15 and first.strategy == "random"
    scan_id = int(response["Location"].rstrip("/").split("/")[-1])
    page = client.get(response["Location"], {"format": "json"})
    assert page.status_code == 200 and page.json()["scan"]["id"] == scan_id
    answered = client.post(f"/projects/{project.pk}/label/{scan_id}/answer/",
                           {"outcome": "skip"})
    assert answered.status_code in (200, 201), answered.content
    assert answered.json()["next"] is not None
    assert answered.json()["next"]["scan"]["id"] != scan_id


def test_when_no_round_can_be_made_the_page_says_why(no_encoder, users, client):
    """The pool scans wait in a label set with no classes while another set has classes: no
    scan can be answered, and the page says so (not "every pool scan is labeled")."""
    from annotator.models import LabelClass, LabelSet

    project = no_encoder
    other = LabelSet.objects.create(project=project, name="brain MRI")
    LabelClass.objects.create(project=project, label_set=other, name="glioma")
    _login(client, users["alice"])
    response = client.get(f"/projects/{project.pk}/next/")
    assert response.status_code == 302 and response["Location"].endswith(
        f"/projects/{project.pk}/worklist/")
    said = [str(m) for m in get_messages(response.wsgi_request)]
    assert len(said) == 1 and "No unlabeled scans left" not in said[0]
    assert said[0].startswith("No round of scans to label could be made: ")
    assert "15 unlabeled pool scans" in said[0] and "no classes" in said[0]
    assert not QueryRound.objects.filter(project=project).exists()     # no empty round


def test_nothing_left_is_said_only_when_nothing_is_left(no_encoder, users):
    project = no_encoder
    for scan in Scan.objects.filter(project=project):
        labeling.answer_submit(project=project, scan=scan, user=users["alice"],
                               data={"outcome": "skip"})
    assert labeling.lease_next_or_new_round(project=project, user=users["alice"]) is None
    assert labeling.nothing_left_words(project, users["alice"]) == (
        "No unlabeled scans left for you: every pool scan is labeled or answered by you.")


# --- the active encoder's folder moved away --------------------------------------------


@pytest.fixture
def encoder_gone(no_encoder, users):
    """An active encoder row whose folder is not there (moved away, a restore without its
    files), and one labeled scan to be similar to."""
    from tests.factories import model_version_with_files

    project = no_encoder
    encoder = model_version_with_files(project, f"p{project.pk}-enc-1", kind="encoder",
                                       status="active")
    project.active_encoder = encoder
    project.save(update_fields=["active_encoder"])
    shutil.rmtree(encoder.artifact_dir)
    return project


MISSING = "the active encoder p{pk}-enc-1's files are missing"


def test_embed_is_refused_up_front_when_the_encoders_files_are_missing(encoder_gone):
    project = encoder_gone
    with pytest.raises(CommandError) as refused:
        call_command("embed", "--project", project.name, "--no-progress")
    message = str(refused.value)
    assert MISSING.format(pk=project.pk) in message
    assert "restore its folder" in message and "backup" in message and "pretrain" in message
    assert not TrainingRun.objects.filter(project=project).exists()


def test_pages_say_the_encoders_files_are_missing_not_run_embed(encoder_gone, users, client):
    from annotator.models import LabelClass, LabelSet

    project = encoder_gone
    label_set = LabelSet.objects.filter(project=project).first() or LabelSet.objects.create(
        project=project, name="chest")
    normal = LabelClass.objects.create(project=project, label_set=label_set, name="normal")
    Scan.objects.filter(project=project).update(label_set=label_set)
    _login(client, users["alice"])
    missing = MISSING.format(pk=project.pk)
    for url in (f"/projects/{project.pk}/clusters/", f"/projects/{project.pk}/reports/",
                f"/projects/{project.pk}/classes/{normal.pk}/"):
        html = unescape(client.get(url).content.decode())
        assert missing in html, url
        assert "manage.py embed" not in html, url
    scan = Scan.objects.filter(project=project).first()
    payload = client.get(f"/projects/{project.pk}/label/{scan.pk}/", {"format": "json"}).json()
    assert payload["similar_error"] and missing in payload["similar_error"]


def test_health_reports_the_missing_files_and_stays_valid_for_label_studio(encoder_gone,
                                                                             settings):
    settings.ML_BACKEND_BASIC_AUTH = ML_AUTH
    project = encoder_gone
    health = ml_client().get(f"/ml/{project.pk}/health")
    assert health.status_code == 200                    # Label Studio: 200 JSON, or disconnected
    body = health.json()
    assert body["status"] == "UP" and body["model_class"] and "model_version" in body
    assert len(body["problems"]) == 1 and MISSING.format(pk=project.pk) in body["problems"][0]


def test_health_of_a_sound_project_lists_no_problems(no_encoder, settings):
    settings.ML_BACKEND_BASIC_AUTH = ML_AUTH
    body = ml_client().get(f"/ml/{no_encoder.pk}/health").json()
    assert body["status"] == "UP" and body["problems"] == []
