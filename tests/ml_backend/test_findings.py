"""Multi-label findings: per-finding heads, reports and thresholds, checked against
scikit-learn on real embeddings-like data and by hand."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from ml_backend.active.findings import (
    FindingsHead,
    findings_scores,
    fit_findings_head,
    unsure_findings,
)
from ml_backend.metrics.findings import (
    UNCERTAIN,
    choose_thresholds,
    findings_report,
    uncertain_policy,
)


def _two_findings(n: int = 400, seed: int = 0):
    """Two independent findings, each shifting its own 3 dimensions of a 16-d embedding."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 2)) < [0.3, 0.1]).astype(float)
    x = rng.normal(size=(n, 16))
    x[:, :3] += 2.0 * y[:, [0]]
    x[:, 3:6] += 2.0 * y[:, [1]]
    return x, y


def test_report_matches_scikit_learn_per_finding_and_skips_unknowns():
    rng = np.random.default_rng(1)
    y = (rng.random((200, 3)) < [0.2, 0.5, 0.0]).astype(float)
    p = np.clip(0.6 * y + 0.4 * rng.random((200, 3)), 0, 1)
    y[:20, 0] = np.nan                         # not read for the first finding
    report = findings_report(y, p, ["effusion", "nodule", "hernia"], thresholds=[0.5, 0.6, 0.5])
    known = ~np.isnan(y[:, 0])
    row = report["per_finding"]["effusion"]
    assert row["known"] == 180
    assert row["auc"] == pytest.approx(roc_auc_score(y[known, 0], p[known, 0]))
    assert row["ap"] == pytest.approx(average_precision_score(y[known, 0], p[known, 0]))
    predicted = p[known, 0] >= 0.5
    truth = y[known, 0] == 1
    assert row["sensitivity"] == pytest.approx((predicted & truth).sum() / truth.sum())
    assert row["specificity"] == pytest.approx((~predicted & ~truth).sum() / (~truth).sum())
    assert report["per_finding"]["nodule"]["threshold"] == 0.6
    hernia = report["per_finding"]["hernia"]           # never present: AUC undefined, not 0
    assert hernia["auc"] is None and hernia["positives"] == 0
    assert report["findings_with_auc"] == 2
    assert report["macro_auc"] == pytest.approx(np.mean(
        [report["per_finding"][n]["auc"] for n in ("effusion", "nodule")]))
    complete = ~np.isnan(y).any(axis=1)
    assert report["any_finding_auc"] == pytest.approx(
        roc_auc_score((y[complete] == 1).any(axis=1), p[complete].max(axis=1)))
    assert 0 <= report["macro_ece"] <= 1


def test_uncertain_policies():
    y = np.array([[1, UNCERTAIN, 0], [UNCERTAIN, 0, np.nan]])
    assert np.isnan(uncertain_policy(y, "ignore")[0, 1])
    assert uncertain_policy(y, "zeros")[0, 1] == 0 and uncertain_policy(y, "ones")[1, 0] == 1
    assert np.isnan(uncertain_policy(y, "ones")[1, 2])          # unknown stays unknown
    with pytest.raises(ValueError, match="policy"):
        uncertain_policy(y, "maybe")
    with pytest.raises(ValueError, match="uncertain-label policy"):
        findings_report(y, np.full(y.shape, 0.5), ["a", "b", "c"])


def test_thresholds_by_f1_and_by_sensitivity():
    y = np.array([[1], [1], [1], [0], [0], [0], [0], [1]], dtype=float)
    p = np.array([[0.9], [0.8], [0.4], [0.7], [0.2], [0.1], [0.3], [0.35]])
    by_f1 = choose_thresholds(y, p, method="f1")[0]
    f1 = lambda t: findings_report(y, p, ["x"], thresholds=[t])["per_finding"]["x"]["f1"]  # noqa: E731
    assert all(f1(by_f1) >= f1(t) for t in np.unique(p))
    by_sensitivity = choose_thresholds(y, p, method="sensitivity", target_sensitivity=1.0)[0]
    assert by_sensitivity == pytest.approx(0.35)               # lowest positive score
    assert choose_thresholds(np.zeros((3, 1)), np.array([[0.2], [0.3], [0.1]]))[0] == 0.5
    # no positive: the default; one score for every scan (a constant head): never preselected
    assert choose_thresholds(np.zeros((3, 1)), np.full((3, 1), 0.2))[0] > 1.0


def test_head_learns_two_findings_from_few_labels_and_is_calibrated(tmp_path):
    x, y = _two_findings(600)
    train, test = slice(0, 60), slice(200, 600)          # 60 labelled scans
    head, details = fit_findings_head(x[train], y[train], np.array([11, 12]))
    proba = head.predict_proba(x[test])
    for f in range(2):
        assert roc_auc_score(y[test, f], proba[:, f]) > 0.9
    report = findings_report(y[test], proba, ["effusion", "nodule"])
    assert report["macro_auc"] > 0.9
    # calibrated: the mean probability tracks the true prevalence (balanced weights undone)
    assert abs(proba[:, 0].mean() - y[test, 0].mean()) < 0.08
    assert {d["calibration"] for d in details["findings"]} <= {"platt", "prior"}
    head.thresholds = choose_thresholds(y[test], proba)
    head.save(tmp_path / "head.npz")
    again = FindingsHead.load(tmp_path / "head.npz")
    np.testing.assert_allclose(again.predict_proba(x[test]), proba)
    np.testing.assert_array_equal(again.predict(x[test]), proba >= head.thresholds)


def test_platt_slope_softens_never_sharpens_nor_reverses():
    from ml_backend.active.findings import PLATT_SLOPE_BOUNDS, _platt

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    clean = (2 * y - 1) * 1.0 + rng.normal(0, 1, 400)   # the true log-odds are 2 * clean
    # logits too soft: the unbounded fit would sharpen them (slope 20); bounded at 1
    a, b = _platt(clean / 10, y)
    assert 0.9 < a <= PLATT_SLOPE_BOUNDS[1]
    # logits too sharp: softened, as before (about 2 / 10)
    a, _ = _platt(clean * 10, y)
    assert 0.12 < a < 0.3
    # logits that rank the wrong way: never reversed; the floor keeps the ranking
    a, b = _platt(-clean, y)
    assert PLATT_SLOPE_BOUNDS[0] <= a < 0.015
    p = 1 / (1 + np.exp(-(a * -clean + b)))
    assert abs(p.mean() - y.mean()) < 0.05 and p.max() - p.min() < 0.2
    # two positives among twenty: a softening, not the end of the range they happen to favour
    few = np.r_[np.ones(2), np.zeros(18)]
    a, _ = _platt(np.r_[3.0, 2.5, rng.normal(-2, 1, 18)], few)
    assert 0.05 < a < 0.9


def test_head_ignores_unknown_answers_and_handles_a_finding_never_seen():
    x, y = _two_findings(300, seed=2)
    y = np.concatenate([y, np.zeros((300, 1))], axis=1)   # a third finding, never present
    masked = y.copy()
    masked[::2, 0] = np.nan                                # half of finding 0 not answered
    head, details = fit_findings_head(x, masked, np.array(["a", "b", "never"]))
    assert details["findings"][0]["known"] == 150
    assert details["findings"][2]["calibration"] == "constant"
    proba = head.predict_proba(x)
    assert np.allclose(proba[:, 2], proba[0, 2]) and proba[0, 2] < 0.01
    assert roc_auc_score(y[:, 0], proba[:, 0]) > 0.9


def test_active_learning_scores_over_all_findings():
    p = np.array([[0.5, 0.01, 0.01],     # one very unsure finding
                  [0.3, 0.3, 0.3],       # all somewhat unsure
                  [0.99, 0.01, 0.02]])   # sure
    assert findings_scores(p, "max_entropy").argmax() == 0
    assert findings_scores(p, "mean_entropy").argmax() == 1
    assert findings_scores(p, "mean_entropy").argmin() == 2
    busy = findings_scores(np.array([[0.3, 0.3, 0.3], [0.3, 0.7, 0.7]]), "cardinality",
                           mean_cardinality=0.9)
    assert busy[1] > busy[0]                  # same entropy, expects more findings than usual
    why = unsure_findings(p[0], ["effusion", "nodule", "mass"])
    assert why[0]["name"] == "effusion" and why[0]["probability"] == 0.5
    with pytest.raises(ValueError, match="strategy"):
        findings_scores(p, "random")


# --- sources -----------------------------------------------------------------------------

from pathlib import Path  # noqa: E402

from PIL import Image  # noqa: E402

from ml_backend.data.datasets import SourceError  # noqa: E402
from ml_backend.data.findings import (  # noqa: E402
    CHESTX_RAY14_FINDINGS,
    is_findings_source,
    read_findings_source,
)

NIH = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "nih_cxr14_subset"


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), 128).save(path)


@pytest.mark.skipif(not NIH.is_dir(), reason="needs ../shared/data/nih_cxr14_subset")
def test_nih_csv_with_split_reads_the_published_counts():
    listing = read_findings_source(f"{NIH}/labels.csv#train")
    assert listing.layout == "chestxray14" and listing.findings == CHESTX_RAY14_FINDINGS
    assert len(listing.items) == 725
    assert listing.targets.sum(axis=0).astype(int).tolist()[:3] == [62, 57, 99]
    assert int((listing.targets.sum(axis=1) == 0).sum()) == 380          # No Finding
    assert listing.items[0].load()[:4] == b"\x89PNG"
    assert is_findings_source(f"{NIH}/labels.csv")


def test_chestxray14_style_csv(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / "images" / name)
    (tmp_path / "nih.csv").write_text(
        "Image Index,Finding Labels\na.png,Effusion|Cardiomegaly\nb.png,No Finding\n"
        "c.png,Effusion|Lung_Lesion\n")
    listing = read_findings_source(tmp_path / "nih.csv")
    effusion = listing.findings.index("Effusion")
    assert listing.findings[-1] == "Lung_Lesion" and "Lung_Lesion" in listing.notes[0]
    assert listing.targets[:, effusion].tolist() == [1, 0, 1]
    assert listing.targets[1].sum() == 0 and not np.isnan(listing.targets).any()
    (tmp_path / "bad.csv").write_text("Image Index,Finding Labels\na.png,No Finding|Mass\n")
    with pytest.raises(SourceError, match="No Finding' together"):
        read_findings_source(tmp_path / "bad.csv")


def test_chexpert_style_csv_keeps_uncertain_and_unknown(tmp_path):
    for name in ("p1.jpg", "p2.jpg", "p3.jpg"):
        _png(tmp_path / "train" / name)
    (tmp_path / "chexpert.csv").write_text(
        "Path,Sex,Age,Frontal/Lateral,No Finding,Edema,Pleural Effusion,Support Devices\n"
        "train/p1.jpg,Female,68,Frontal,,1.0,-1.0,\n"
        "train/p2.jpg,Male,87,Lateral,1.0,,,0.0\n"
        "train/p3.jpg,Male,41,Frontal,,0,-1,1\n")
    listing = read_findings_source(tmp_path / "chexpert.csv")
    assert listing.layout == "chexpert"
    assert listing.findings == ["Edema", "Pleural Effusion", "Support Devices"]
    t = listing.targets
    assert t[0, 0] == 1 and t[0, 1] == -1 and np.isnan(t[0, 2])     # blank: unknown
    assert t[1].tolist() == [0, 0, 0]                                # No Finding: blanks absent
    assert t[2].tolist() == [0, -1, 1]
    assert any("Sex" in note and "Age" in note for note in listing.notes)
    assert listing.counts()["Pleural Effusion"] == {"present": 0, "absent": 1, "uncertain": 2,
                                                    "unknown": 0}


def test_plain_zero_one_csv_and_npz(tmp_path):
    for name in ("x.png", "y.png"):
        _png(tmp_path / name)
    (tmp_path / "wide.csv").write_text("filename,effusion,nodule\nx.png,1,0\ny.png,0,0\n")
    listing = read_findings_source(tmp_path / "wide.csv")
    assert listing.findings == ["effusion", "nodule"] and listing.targets.tolist() == [[1, 0],
                                                                                     [0, 0]]
    assert not is_findings_source(tmp_path / "nope.csv")
    labels = np.zeros((5, 14), np.uint8)
    labels[0, [1, 2]] = 1
    np.savez(tmp_path / "chestmnist.npz", train_images=np.zeros((5, 28, 28), np.uint8),
             train_labels=labels)
    assert is_findings_source(f"{tmp_path}/chestmnist.npz#train")
    chest = read_findings_source(f"{tmp_path}/chestmnist.npz#train")
    assert chest.findings == CHESTX_RAY14_FINDINGS and chest.targets[0, 1:3].tolist() == [1, 1]
    np.savez(tmp_path / "single.npz", train_images=np.zeros((2, 4, 4), np.uint8),
             train_labels=np.zeros((2, 1), np.uint8))
    assert not is_findings_source(f"{tmp_path}/single.npz#train")    # one label: single-label


def test_each_scans_patient_comes_from_the_patient_column_or_the_file_name(tmp_path):
    """ChestX-ray14 films are <patient>_<film>.png, CheXpert paths hold a patientNNNNN
    folder, and a 'Patient ID' column wins over both; the patient column is no finding."""
    for name in ("00000001_000.png", "00000001_001.png", "00000002_000.png", "x.png"):
        _png(tmp_path / "images" / name)
    (tmp_path / "nih.csv").write_text(
        "Image Index,Finding Labels\n00000001_000.png,Mass\n00000001_001.png,No Finding\n"
        "00000002_000.png,Effusion\nx.png,No Finding\n")
    listing = read_findings_source(tmp_path / "nih.csv")
    assert [i.patient for i in listing.items] == ["00000001", "00000001", "00000002", None]
    assert any("2 patient(s) for 3 of 4 scan(s)" in note for note in listing.notes)
    assert "00000001" not in " ".join(listing.notes)          # counts, never identifiers
    (tmp_path / "ids.csv").write_text(
        "Image Index,Finding Labels,Patient ID\n00000001_000.png,Mass,7\n"
        "00000002_000.png,No Finding,7\nx.png,Edema,1\n")
    by_column = read_findings_source(tmp_path / "ids.csv")
    assert [i.patient for i in by_column.items] == ["7", "7", "1"]
    for name in ("patient00011/study1/view1_frontal.jpg", "patient00012/study1/view1_frontal.jpg"):
        _png(tmp_path / "train" / name)
    (tmp_path / "chexpert.csv").write_text(
        "Path,patient_id,Edema,Pleural Effusion\n"
        "train/patient00011/study1/view1_frontal.jpg,1,1,0\n"
        "train/patient00012/study1/view1_frontal.jpg,0,0,1\n")
    chexpert = read_findings_source(tmp_path / "chexpert.csv")
    assert chexpert.findings == ["Edema", "Pleural Effusion"]   # 1/0 values, still no finding
    assert [i.patient for i in chexpert.items] == ["1", "0"]
    (tmp_path / "chexpert2.csv").write_text(
        "Path,Edema,Pleural Effusion\n"
        "train/patient00011/study1/view1_frontal.jpg,1,0\n"
        "train/patient00012/study1/view1_frontal.jpg,0,1\n")
    assert [i.patient for i in read_findings_source(tmp_path / "chexpert2.csv").items] == [
        "patient00011", "patient00012"]
