"""The findings gate, thresholds and promotion consequences on a findings-only project
(faults found by the NIH loop benchmark, docs/loop-e2e-findings-nih-2026-12-07.json): a
finding the active version never saw present is no bar to the next version; a regression
is judged by a paired bootstrap against the project's tolerance; a finding with a constant
head is never preselected; a promoted findings-only version (by the gate, or by an admin)
makes the next round.

Real scans: the brain-MRI fixtures read as three findings (glioma, meningioma, pituitary;
no tumour = "no finding"), the shipped starter encoder, a real database and named users."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from django.core.management import call_command

from annotator.findings import findings_answer_create, findings_targets
from annotator.models import Annotation, LabelClass, LabelSet, Scan
from ml_backend.metrics.findings import NEVER, choose_thresholds, compare_findings
from ml_backend.models import ModelVersion, Prediction, QueryRound
from ml_backend.services.findings import findings_scorer
from tests.base import FIXTURES
from tests.conftest import run_import

FINDINGS = ["glioma_tumor", "meningioma_tumor", "pituitary_tumor"]


def _csv(tmp_path, split: str, per_class: int | None = None, unread=()):
    """Every fixture scan of ``split``; the first ``per_class`` of each class answered (none
    of the classes in ``unread``), the rest listed with blank answers (the worklist's)."""
    folder = tmp_path / split
    rows = ["filename," + ",".join(FINDINGS)]
    for name in FINDINGS + ["no_tumor"]:
        for number, path in enumerate(sorted((FIXTURES / "brain_mri" / split / name).iterdir())):
            target = folder / f"{name}-{path.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
            answered = name not in unread and (per_class is None or number < per_class)
            rows.append(f"{target.name}," + ",".join(
                ("1" if f == name else "0") if answered else "" for f in FINDINGS))
    (folder / "findings.csv").write_text("\n".join(rows) + "\n")
    return folder / "findings.csv"


def _project(project, tmp_path, unread=()):
    run_import(project, _csv(tmp_path, "pool", per_class=12, unread=unread),
               label_set="brain findings")
    run_import(project, _csv(tmp_path, "eval"), split="eval", label_set="brain findings")
    call_command("pretrain", "--project", project.name, "--epochs", "0", "--no-progress")
    project.refresh_from_db()
    return project


def _newest(project) -> ModelVersion:
    return ModelVersion.objects.filter(project=project, kind="classifier").order_by("-pk").first()


def _pool(project, prefix: str, answered: bool) -> list[Scan]:
    have = set(Annotation.objects.filter(scan__project=project).values_list("scan_id", flat=True))
    return [s for s in Scan.objects.filter(project=project, split="pool").order_by("pk")
            if s.source_name.startswith(prefix) and (s.pk in have) == answered]


# --- pure: the comparison and the thresholds -------------------------------------------

def _scores(rng, positive, skill):
    """Scores whose AUC against ``positive`` is about ``skill``."""
    shift = np.sqrt(2) * {0.5: 0.0, 0.6: 0.36, 0.7: 0.74, 0.8: 1.19, 0.9: 1.81}[skill]
    return 1 / (1 + np.exp(-(rng.normal(size=len(positive)) + shift * positive - 2)))


def test_a_finding_the_active_version_knew_nothing_of_is_no_bar():
    rng = np.random.default_rng(1)
    y = np.zeros((146, 2))
    y[:20, 0] = y[10:40, 1] = 1
    candidate = np.stack([1 - _scores(rng, y[:, 0], 0.7), _scores(rng, y[:, 1], 0.8)], 1)
    active = np.stack([np.full(146, 0.04545), candidate[:, 1]], 1)   # a constant head
    result = compare_findings(y, candidate, active, ["Nodule", "Effusion"])
    nodule = result["per_finding"]["Nodule"]
    assert nodule["candidate_auc"] < 0.4 and nodule["active_auc"] is None
    assert nodule["status"] == "new" and "constant" in nodule["why"]
    assert result["promote"] and result["macro_auc"]["findings"] == 1
    # the finding missing from the active version (NaN): new as well
    active[:, 0] = np.nan
    assert compare_findings(y, candidate, active, ["Nodule", "Effusion"])["promote"]


def test_a_drop_within_the_noise_of_a_small_gate_is_kept_a_clear_one_held_back():
    rng = np.random.default_rng(2)
    y = np.zeros((146, 2))
    y[:6, 0] = y[10:60, 1] = 1
    active = np.stack([_scores(rng, y[:, 0], 0.8), _scores(rng, y[:, 1], 0.9)], 1)
    worse = active.copy()
    # Mass: 6 positives, the candidate ranks one positive lower: a drop over 0.05
    order = np.argsort(active[:6, 0])
    worse[order[-1], 0] = np.median(active[6:, 0])
    result = compare_findings(y, worse, active, ["Mass", "Effusion"], tolerance=0.02)
    mass = result["per_finding"]["Mass"]
    assert mass["delta"] < -0.05 and mass["status"] == "kept" and mass["upper"] > -0.02
    assert result["promote"]
    # Effusion, 50 positives, its head lost: confidently worse beyond the tolerance
    worse[:, 1] = rng.random(146)
    result = compare_findings(y, worse, active, ["Mass", "Effusion"], tolerance=0.02)
    assert result["per_finding"]["Effusion"]["status"] == "regressed"
    assert result["regressed"] == ["Effusion"] and not result["promote"]
    assert result["macro_auc"]["regression"] and result["macro_auc"]["upper"] < -0.02
    # the same drop under a tolerance larger than it: kept
    assert compare_findings(y, worse, active, ["Mass", "Effusion"], tolerance=0.6)["promote"]


def test_a_constant_score_never_becomes_a_threshold():
    y = np.zeros((20, 3))
    y[:4] = 1
    p = np.stack([np.full(20, 0.04545), np.full(20, 0.9),
                  np.linspace(0.9, 0.1, 20)], 1)
    thresholds = choose_thresholds(y, p)
    assert thresholds[0] == thresholds[1] == NEVER > 1.0     # never "present" on every scan
    assert thresholds[2] == pytest.approx(p[3, 2])            # a ranking head: F1-optimal
    assert (choose_thresholds(y, p, method="sensitivity")[:2] == NEVER).all()
    # a finding without a positive on the split keeps the default
    assert choose_thresholds(np.zeros((20, 1)), p[:, 2:])[0] == 0.5


def test_a_threshold_that_picks_scans_no_richer_than_the_split_is_never_preselected():
    """A weakly learned head's F1-best point marks nearly every scan present: PPV about the
    prevalence. It is never preselected, with the counts in words; a head that ranks keeps
    its F1 threshold; so does a small but clean one (2 of 2 right, prevalence 0.03)."""
    from types import SimpleNamespace

    from ml_backend.metrics.findings import preselection_evidence
    from ml_backend.services.findings import eval_thresholds

    rng = np.random.default_rng(0)
    n = 146
    y = np.zeros((n, 3))
    y[11:144:12, 0] = 1              # weak: positives spread evenly down the ranking
    y[:12, 1] = 1                                   # learned: positives ranked first
    y[:4, 2] = 1                                    # rare, learned
    p = np.stack([np.linspace(0.4, 0.3, n),
                  np.where(y[:, 1] == 1, 0.8, 0.2) + 0.05 * rng.random(n),
                  np.where(y[:, 2] == 1, 0.7, 0.1) + 0.05 * rng.random(n)], 1)
    chosen = choose_thresholds(y, p)
    evidence = preselection_evidence(y, p, chosen)
    assert evidence[0]["flagged"] > 100 and not evidence[0]["enriched"]
    assert evidence[1]["enriched"] and evidence[1]["ppv"] == 1.0
    assert evidence[2]["enriched"] and evidence[2]["right"] == 4
    label_set = SimpleNamespace(threshold_rule="f1", target_sensitivity=0.9)
    thresholds, report = eval_thresholds(label_set, y, p, ["weak", "learned", "rare"])
    assert thresholds[0] == NEVER and thresholds[1] == chosen[1] and thresholds[2] == chosen[2]
    note = report["per_finding"]["weak"]["threshold_note"]
    assert "no better than the finding's prevalence (0.08)" in note and "PPV" in note
    assert "threshold_note" not in report["per_finding"]["learned"]
    # two positives rightly found out of two flagged is evidence enough on 146 scans
    tiny = np.zeros((n, 1))
    tiny[:2] = 1
    score = np.where(tiny[:, 0] == 1, 0.9, 0.1)
    assert preselection_evidence(tiny, score[:, None], [0.5])[0]["enriched"]


# --- on a project -------------------------------------------------------------------------

@pytest.fixture
def unseen_project(project, tmp_path):
    """Pituitary scans left unread in the pool: the first version never sees it present."""
    return _project(project, tmp_path, unread=("pituitary_tumor",))


def test_a_finding_never_seen_present_is_never_preselected_and_the_refit_makes_a_round(
        unseen_project, client):
    from annotator.label_page import _findings_rows, _findings_suggestion

    project = unseen_project
    call_command("refit", project=project.name)
    project.refresh_from_db()
    model = project.active_model
    assert model is not None and model.status == ModelVersion.Status.ACTIVE
    entry = model.config["findings_sets"][0]
    assert entry["thresholds"]["pituitary_tumor"] == NEVER
    report = model.metrics["training"]["findings"]["brain findings"]["per_finding"]
    assert report["pituitary_tumor"]["positives"] == 10           # 10 eval positives
    assert report["pituitary_tumor"]["threshold_note"].startswith(
        "not enough positives to choose a threshold")
    assert "threshold_note" not in report["glioma_tumor"]
    # the reports page says so in words, not as a threshold of 1.001
    from django.urls import reverse

    from tests.base import PASSWORD

    assert client.login(username="dora", password=PASSWORD)
    page = client.get(reverse("annotator:reports", args=[project.pk])).content.decode()
    assert "not preselected" in page and "1.001" not in page
    assert "pituitary_tumor: not enough positives to choose a threshold" in page
    label_set = LabelSet.objects.get(project=project, name="brain findings")
    findings = list(LabelClass.objects.filter(label_set=label_set).order_by("order", "pk"))
    pool = list(Scan.objects.filter(project=project, split="pool"))[:40]
    preselected = {f.name: 0 for f in findings}
    for scan in pool:
        rows = _findings_rows(findings, {}, _findings_suggestion(project, scan, findings), scan)
        for row in rows:
            preselected[row["name"]] += row["preselected"]
    assert preselected["pituitary_tumor"] == 0, preselected
    assert preselected["glioma_tumor"] < len(pool)
    # the promotion's consequences: no class predictions to store (and no failure), the
    # next round ranked by this version
    assert not Prediction.objects.filter(model_version=model).exists()
    rounds = QueryRound.objects.filter(project=project, model_version=model)
    assert rounds.count() == 1 and rounds.get().size > 0
    # label cardinality departs from the labelled scans' mean: 24 of 36 read scans show one
    assert entry["mean_cardinality"] == pytest.approx(24 / 36)
    scorer = findings_scorer(model, label_set.pk)
    assert scorer.mean_cardinality == pytest.approx(24 / 36)
    # the project's hybrid strategy ranks the round by label cardinality from that mean
    from ml_backend.active.findings import findings_scores

    items = list(rounds.get().items.order_by("rank").select_related("scan"))
    proba = scorer.predict([item.scan for item in items])
    assert project.query_strategy == "hybrid"
    assert [item.score for item in items] == pytest.approx(
        findings_scores(proba, "cardinality", mean_cardinality=24 / 36).tolist(), abs=1e-6)
    assert not np.allclose(findings_scores(proba, "cardinality"),
                           findings_scores(proba, "cardinality", mean_cardinality=24 / 36))
    # ... and the round's label-cardinality scores are taken against it
    from ml_backend.active.findings import findings_scores
    from ml_backend.services.queries import _findings_contexts

    context = _findings_contexts(model, pool)[label_set.pk]
    assert context["mean_cardinality"] == pytest.approx(24 / 36)
    against_labels = findings_scores(context["proba"], "cardinality",
                                     mean_cardinality=24 / 36)
    against_candidates = findings_scores(context["proba"], "cardinality")
    assert not np.allclose(against_labels, against_candidates)


def test_a_head_learned_for_a_finding_the_active_version_never_saw_is_promoted(
        unseen_project, users):
    project = unseen_project
    call_command("refit", project=project.name)
    project.refresh_from_db()
    first = project.active_model
    # a reader swaps pituitary scans and scans without a tumour: the next head learns
    # pituitary badly (below the first version's 0.5 on the eval scans, which was a
    # constant, not a skill)
    label_set = LabelSet.objects.get(project=project, name="brain findings")
    names = {f.name: f.pk for f in LabelClass.objects.filter(label_set=label_set)}
    for prefix, pituitary in (("no_tumor", "present"), ("pituitary", "absent")):
        for scan in _pool(project, prefix, answered=False)[:12]:
            findings_answer_create(scan=scan, reader=users["alice"], states={
                names["glioma_tumor"]: "absent", names["meningioma_tumor"]: "absent",
                names["pituitary_tumor"]: pituitary})
    call_command("refit", project=project.name)
    project.refresh_from_db()
    second = _newest(project)
    assert second != first
    gate = second.metrics["findings_gate"]["brain findings"]
    pituitary = gate["per_finding"]["pituitary_tumor"]
    assert pituitary["candidate_auc"] < 0.45 and pituitary["status"] == "new", pituitary
    assert gate["tolerance"] == project.gate_tolerance
    assert project.active_model == second, second.status_reason
    assert "promoted" in second.status_reason
    assert QueryRound.objects.filter(project=project, model_version=second).exists()


@pytest.fixture
def regressed(project, tmp_path, users):
    """A first version, then adjudications that turn every pool pituitary into "absent" and
    every glioma into "pituitary present": the candidate can no longer find pituitary."""
    project = _project(project, tmp_path)
    call_command("refit", project=project.name)
    project.refresh_from_db()
    first = project.active_model
    label_set = LabelSet.objects.get(project=project, name="brain findings")
    pituitary = LabelClass.objects.get(name="pituitary_tumor")
    glioma = LabelClass.objects.get(name="glioma_tumor")
    scans, findings, targets = findings_targets(label_set, split="pool")
    column = {f.pk: i for i, f in enumerate(findings)}
    for scan, row in zip(scans, targets):
        if row[column[pituitary.pk]] == 1 or row[column[glioma.pk]] == 1:
            findings_answer_create(
                scan=scan, reader=users["bob"], source=Annotation.Source.ADJUDICATION,
                states={pituitary.pk: "absent" if row[column[pituitary.pk]] == 1 else "present"})
    return project, first


def test_a_clear_regression_is_held_back_and_promote_anyway_makes_the_next_round(
        regressed, users):
    from ml_backend.services.versions import model_version_promote

    project, first = regressed
    call_command("refit", project=project.name)
    project.refresh_from_db()
    candidate = _newest(project)
    assert project.active_model == first and candidate.status == ModelVersion.Status.READY
    gate = candidate.metrics["findings_gate"]["brain findings"]
    assert gate["per_finding"]["pituitary_tumor"]["status"] == "regressed"
    assert gate["tolerance"] == project.gate_tolerance == pytest.approx(0.02)
    assert "pituitary_tumor" in candidate.status_reason
    rounds = QueryRound.objects.filter(project=project).count()
    warning = model_version_promote(candidate, actor=users["dora"])
    assert warning is None
    project.refresh_from_db()
    assert project.active_model == candidate
    assert QueryRound.objects.filter(project=project).count() == rounds + 1
    assert QueryRound.objects.filter(project=project, model_version=candidate).get().size > 0


def test_the_projects_gate_tolerance_reaches_the_findings_gate(regressed):
    project, first = regressed
    project.gate_tolerance = 0.9          # "hold back only for a fall of 0.9 AUC or more"
    project.save(update_fields=["gate_tolerance"])
    call_command("refit", project=project.name)
    project.refresh_from_db()
    candidate = _newest(project)
    gate = candidate.metrics["findings_gate"]["brain findings"]
    assert gate["tolerance"] == 0.9
    assert gate["per_finding"]["pituitary_tumor"]["delta"] < -0.3
    assert project.active_model == candidate, candidate.status_reason
