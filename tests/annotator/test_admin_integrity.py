"""What the admin may not do (hostile-user probe): make another project's model, an encoder
or a version without its files the active classifier; move a class that has labels to
another label set; give two classes of one set one hotkey. Each is refused in words and
nothing changes; and if a project's active model is unusable anyway, the query and predict
paths say so instead of a 500."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser

import pytest
from django.test import Client
from django.urls import reverse
from rest_framework.authtoken.models import Token

from annotator import services
from annotator.models import Annotation, AuditEvent, LabelClass, LabelSet, Project, Scan
from ml_backend import services as ml
from ml_backend.models import ModelVersion
from tests.base import FIXTURES
from tests.conftest import run_import
from tests.factories import model_version_with_files

CHEST, BRAIN = "Chest X-ray", "Brain MRI"


class _FormValues(HTMLParser):
    """The values a browser would submit from the page's main form (inputs, checked boxes,
    selected options, textareas), so a test changes one field and posts the rest."""

    def __init__(self):
        super().__init__()
        self.values: list[tuple[str, str]] = []
        self._select = self._textarea = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        name = a.get("name")
        if tag == "input" and name and a.get("type") not in ("submit", "button", "file"):
            if a.get("type") in ("checkbox", "radio") and "checked" not in a:
                return
            self.values.append((name, a.get("value") or ("on" if a.get("type") == "checkbox"
                                                         else "")))
        elif tag == "select" and name:
            self._select = name
        elif tag == "option" and self._select and "selected" in a:
            self.values.append((self._select, a.get("value") or ""))
        elif tag == "textarea" and name:
            self._textarea, self._text = name, []

    def handle_data(self, data):
        if self._textarea:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "select":
            self._select = None
        elif tag == "textarea" and self._textarea:
            self.values.append((self._textarea, "".join(self._text).lstrip("\n")))
            self._textarea = None


def _form(client, url) -> dict:
    page = client.get(url)
    assert page.status_code == 200
    parser = _FormValues()
    parser.feed(page.content.decode())
    data: dict = {}
    for name, value in parser.values:
        if name in ("csrfmiddlewaretoken", "_selected_action", "action", "select_across"):
            continue
        data[name] = value
    return data


def _options(client, url, field: str) -> set[str]:
    page = client.get(url).content.decode()
    start = page.index(f'name="{field}"')
    block = page[start:page.index("</select>", start)]
    return set(re.findall(r'<option value="(\d+)"', block))


@pytest.fixture
def two_sets(project):
    """The demo's shape in small: chest films (normal, pneumonia) and brain MRIs (no tumour,
    pituitary), eval labeled, each in its own label set."""
    for folder, label_set, dataset, classes in (
            ("chest_xray", CHEST, "chest", ("normal", "pneumonia")),
            ("brain_mri", BRAIN, "brain", ("no_tumor", "pituitary_tumor"))):
        for name in classes:
            run_import(project, FIXTURES / folder / "eval" / name, layout="flat", split="eval",
                       default_label=name, dataset_name=dataset, label_set=label_set)
    project.sets = {s.name: s for s in project.label_sets.all()}
    project.classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    return project


# --- the active model and encoder --------------------------------------------------------


def test_admin_offers_and_accepts_only_this_projects_usable_versions(
        client, users, two_sets, other_project):
    project = two_sets
    classes = project.classes
    encoder = model_version_with_files(project, "p1-enc-1", kind="encoder", status="active")
    mine = model_version_with_files(project, "p1-clf-2", classes=[classes["normal"],
                                                                  classes["pneumonia"]])
    restored = ModelVersion.objects.create(     # a restored version whose files were not
        project=project, kind="classifier", version="p1-clf-3", status="retired",
        artifact_dir=str(mine.artifact_dir).replace("p1-clf-2", "p1-clf-3"),
        config=mine.config)
    theirs = model_version_with_files(other_project, "p2-enc-2", kind="encoder")
    their_clf = model_version_with_files(other_project, "p2-clf-3")
    Project.objects.filter(pk=project.pk).update(active_encoder=encoder)
    client.force_login(users["dora"])
    url = reverse("admin:annotator_project_change", args=[project.pk])

    # only this project's classifiers / encoders are offered
    assert _options(client, url, "active_model") == {str(mine.pk), str(restored.pk)}
    assert _options(client, url, "active_encoder") == {str(encoder.pk)}

    form = _form(client, url)
    for field, version, said in (
            ("active_model", theirs, "Choose one of this project&#x27;s classifier versions"),
            ("active_model", their_clf, "Choose one of this project&#x27;s classifier"),
            ("active_model", encoder, "Choose one of this project&#x27;s classifier"),
            ("active_encoder", mine, "Choose one of this project&#x27;s encoder versions"),
            ("active_model", restored, "p1-clf-3 has no files here")):
        response = client.post(url, {**form, field: version.pk})
        assert response.status_code == 200, (field, version)
        assert said in response.content.decode(), (field, version)
        project.refresh_from_db()
        assert project.active_model_id is None and project.active_encoder_id == encoder.pk

    # this project's classifier with its files: made active as a promotion would
    response = client.post(url, {**form, "active_model": mine.pk}, follow=True)
    assert response.status_code == 200
    project.refresh_from_db()
    mine.refresh_from_db()
    assert project.active_model == mine and mine.status == "active"
    assert AuditEvent.objects.filter(model_version="p1-clf-2", actor=users["dora"]).exists()


def test_admin_promote_refuses_a_version_without_its_files(client, users, two_sets):
    project = two_sets
    good = model_version_with_files(project, "p1-clf-2", classes=[project.classes["normal"]])
    ml.model_version_activate(good, reason="first")
    restored = ModelVersion.objects.create(
        project=project, kind="classifier", version="p1-clf-9", status="retired",
        artifact_dir=str(good.artifact_dir).replace("p1-clf-2", "p1-clf-9"), config=good.config)
    no_classes = model_version_with_files(project, "p1-clf-10")      # config lists none
    client.force_login(users["dora"])
    url = reverse("admin:ml_backend_modelversion_changelist")
    for version, said in ((restored, "p1-clf-9 has no files here"),
                          (no_classes, "p1-clf-10 is not a usable classifier")):
        page = client.post(url, {"action": "promote", "_selected_action": [version.pk]},
                           follow=True).content.decode()
        assert said in page and "it was not made active" in page
        project.refresh_from_db()
        version.refresh_from_db()
        assert project.active_model == good and version.status != "active"
    # and the project page's "promote anyway" says the same
    page = client.post(reverse("annotator:model_promote", args=[project.pk, restored.pk]),
                       follow=True).content.decode()
    assert "p1-clf-9 has no files here" in page
    project.refresh_from_db()
    assert project.active_model == good


def test_a_version_keeps_its_project_and_kind_in_the_admin(client, users, project,
                                                           other_project):
    version = model_version_with_files(project, "p1-enc-1", kind="encoder")
    client.force_login(users["dora"])
    url = reverse("admin:ml_backend_modelversion_change", args=[version.pk])
    form = _form(client, url)
    assert "project" not in form and "kind" not in form and "config" not in form
    client.post(url, {**form, "project": other_project.pk, "kind": "classifier"})
    version.refresh_from_db()
    assert version.project == project and version.kind == "encoder"


def test_an_unusable_active_model_is_a_clear_error_on_query_and_predict(
        two_sets, users, other_project, settings):
    """Set behind the admin's back (an old database, a hand edit): the worklist query and
    Label Studio's predict say what is wrong, with no 500 and no half-made round."""
    from ml_backend.models import QueryRound

    project = two_sets
    theirs = model_version_with_files(other_project, "p2-enc-2", kind="encoder")
    Project.objects.filter(pk=project.pk).update(active_model=theirs)
    token, _ = Token.objects.get_or_create(user=users["dora"])
    api = Client(HTTP_AUTHORIZATION=f"Token {token.key}")
    response = api.post(f"/api/v1/projects/{project.pk}/query/")
    assert response.status_code == 409, response.content
    assert "p2-enc-2 is an encoder, not a classifier" in response.json()["detail"]
    assert not QueryRound.objects.filter(project=project).exists()

    settings.ML_BACKEND_BASIC_AUTH = "ls:secret"
    ml = Client(headers={"Authorization": "Basic " + base64.b64encode(b"ls:secret").decode()})
    scan = Scan.objects.filter(project=project, dataset__name="chest").first()
    response = ml.post(f"/ml/{project.pk}/predict", content_type="application/json",
                       data=json.dumps({"tasks": [{"data": {"scan_id": scan.pk}}]}))
    assert response.status_code == 503, response.content
    assert "p2-enc-2 is an encoder, not a classifier" in response.json()["error"]

    # a classifier whose config lost its classes: the same, in its words
    broken = model_version_with_files(project, "p1-clf-4")
    ModelVersion.objects.filter(pk=broken.pk).update(config={"kind": "finetuned"})
    Project.objects.filter(pk=project.pk).update(active_model=broken)
    response = api.post(f"/api/v1/projects/{project.pk}/query/")
    assert response.status_code == 409
    assert "p1-clf-4's config does not list its classes" in response.json()["detail"]


# --- a class's label set and hotkey ----------------------------------------------------


def test_a_class_with_labels_keeps_its_label_set(client, users, two_sets):
    project = two_sets
    pneumonia = project.classes["pneumonia"]
    assert Annotation.objects.filter(label_class=pneumonia).exists()
    assert pneumonia.label_set == project.sets[CHEST] and pneumonia.hotkey == "2"
    client.force_login(users["dora"])
    url = reverse("admin:annotator_labelclass_change", args=[pneumonia.pk])
    form = _form(client, url)
    response = client.post(url, {**form, "label_set": project.sets[BRAIN].pk})
    assert response.status_code == 200
    page = response.content.decode()
    assert "cannot move from &#x27;Chest X-ray&#x27; to &#x27;Brain MRI&#x27;" in page
    assert "answers on &#x27;Chest X-ray&#x27; scans" in page
    pneumonia.refresh_from_db()
    assert pneumonia.label_set == project.sets[CHEST]
    assert list(project.sets[BRAIN].classes.filter(hotkey="2")) == [
        project.classes["pituitary_tumor"]]
    # the service refuses it too, and says why
    with pytest.raises(ValueError, match="cannot move from 'Chest X-ray'"):
        services.label_class_update(label_class=pneumonia, label_set=project.sets[BRAIN])
    # the project page's class rows as well
    url = reverse("admin:annotator_project_change", args=[project.pk])
    form = _form(client, url)
    row = next(k[:-len("-name")] for k, v in form.items()
               if k.startswith("label_classes-") and k.endswith("-name") and v == "pneumonia")
    response = client.post(url, {**form, f"{row}-label_set": project.sets[BRAIN].pk})
    assert response.status_code == 200 and "cannot move from" in response.content.decode()
    pneumonia.refresh_from_db()
    assert pneumonia.label_set == project.sets[CHEST]


def test_a_class_moves_only_with_a_key_free_in_its_new_set(client, users, two_sets,
                                                          other_project):
    project = two_sets
    cyst, _ = services.label_class_get_or_create(project=project, name="cyst",
                                                 label_set=project.sets[CHEST])
    assert cyst.hotkey == "3" and not Annotation.objects.filter(label_class=cyst).exists()
    client.force_login(users["dora"])
    url = reverse("admin:annotator_labelclass_change", args=[cyst.pk])
    form = _form(client, url)
    # hotkey 2 is pituitary_tumor's in the brain set
    response = client.post(url, {**form, "label_set": project.sets[BRAIN].pk, "hotkey": "2"})
    assert response.status_code == 200
    assert "&#x27;2&#x27; already labels &#x27;pituitary_tumor&#x27; in &#x27;Brain MRI" \
        in response.content.decode()
    # in its own set too (the admin used to take any key the label page leaves free)
    response = client.post(url, {**form, "hotkey": "1"})
    assert "already labels &#x27;normal&#x27;" in response.content.decode()
    cyst.refresh_from_db()
    assert (cyst.label_set, cyst.hotkey) == (project.sets[CHEST], "3")
    # another project's set is not one to choose
    theirs = LabelSet.objects.create(project=other_project, name="Theirs")
    response = client.post(url, {**form, "label_set": theirs.pk})
    assert response.status_code == 200
    cyst.refresh_from_db()
    assert cyst.label_set == project.sets[CHEST]
    # a class without labels may move, with a key free there
    assert client.post(url, {**form, "label_set": project.sets[BRAIN].pk,
                             "hotkey": "3"}).status_code == 302
    cyst.refresh_from_db()
    assert (cyst.label_set, cyst.hotkey) == (project.sets[BRAIN], "3")
    # a new class in the admin is checked the same way
    add = client.post(reverse("admin:annotator_labelclass_add"), {
        "project": project.pk, "label_set": project.sets[BRAIN].pk, "name": "cavernoma",
        "description": "", "hotkey": "3", "color": "#4c78a8", "order": 9})
    assert add.status_code == 200 and "already labels &#x27;cyst&#x27;" in add.content.decode()
    add = client.post(reverse("admin:annotator_labelclass_add"), {
        "project": project.pk, "label_set": theirs.pk, "name": "cavernoma",
        "description": "", "hotkey": "", "color": "#4c78a8", "order": 9})
    assert add.status_code == 200 and "belongs to another project" in add.content.decode()
    assert not LabelClass.objects.filter(name="cavernoma").exists()
    # the service keeps the same rules
    with pytest.raises(ValueError, match="'1' already labels 'no_tumor' in 'Brain MRI'"):
        services.label_class_update(label_class=cyst, hotkey="1")
    with pytest.raises(ValueError, match="belongs to another project"):
        services.label_class_update(label_class=cyst, label_set=theirs)
    moved = services.label_class_update(label_class=cyst, label_set=project.sets[CHEST],
                                        hotkey="4", name="  renal   cyst ")
    assert (moved.label_set, moved.hotkey, moved.name) == (project.sets[CHEST], "4",
                                                           "renal cyst")


def test_project_page_class_rows_may_swap_keys_but_never_share_one(client, users, two_sets):
    project = two_sets
    normal, pneumonia = project.classes["normal"], project.classes["pneumonia"]
    client.force_login(users["dora"])
    url = reverse("admin:annotator_project_change", args=[project.pk])
    form = _form(client, url)
    rows = {v: k[:-len("-name")] for k, v in form.items()
            if k.startswith("label_classes-") and k.endswith("-name")}
    shared = client.post(url, {**form, f"{rows['normal']}-hotkey": "2"})
    assert shared.status_code == 200
    assert ("&#x27;normal&#x27; and &#x27;pneumonia&#x27; would both answer to "
            "&#x27;2&#x27; in &#x27;Chest X-ray&#x27;") in shared.content.decode() or \
        ("&#x27;pneumonia&#x27; and &#x27;normal&#x27; would both answer to "
         "&#x27;2&#x27; in &#x27;Chest X-ray&#x27;") in shared.content.decode()
    normal.refresh_from_db()
    assert normal.hotkey == "1"
    swapped = client.post(url, {**form, f"{rows['normal']}-hotkey": "2",
                                f"{rows['pneumonia']}-hotkey": "1"})
    assert swapped.status_code == 302
    normal.refresh_from_db()
    pneumonia.refresh_from_db()
    assert (normal.hotkey, pneumonia.hotkey) == ("2", "1")
    # the same key in two different sets is fine (each label page has its own keys)
    assert project.classes["no_tumor"].hotkey == "1"


def test_a_label_set_with_answers_keeps_its_kind_and_project(client, users, two_sets,
                                                            other_project):
    project = two_sets
    chest = project.sets[CHEST]
    client.force_login(users["dora"])
    url = reverse("admin:annotator_labelset_change", args=[chest.pk])
    form = _form(client, url)
    assert "project" not in form
    response = client.post(url, {**form, "kind": "multi", "project": other_project.pk})
    assert response.status_code == 200
    assert "already holds answers: its kind" in response.content.decode()
    chest.refresh_from_db()
    assert (chest.kind, chest.project_id) == ("single", project.pk)
    # a set without answers may still change its kind
    empty = LabelSet.objects.create(project=project, name="Knee", order=5)
    url = reverse("admin:annotator_labelset_change", args=[empty.pk])
    assert client.post(url, {**_form(client, url), "kind": "multi"}).status_code == 302
    empty.refresh_from_db()
    assert empty.kind == "multi"
