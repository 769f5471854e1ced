"""bench.ssl_eval: one end-to-end run on the tiny brain MRI fixture, plus its helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import ssl_eval
from tests.base import FIXTURES

POOL = FIXTURES / "brain_mri" / "pool"
EVAL = FIXTURES / "brain_mri" / "eval"
FRACTIONS = ["0.5", "1"]


def bench_args(tmp_path, out_name: str) -> list[str]:
    # A 7x7-stem ResNet (--small-input no) keeps the run well under a minute on 2 CPU cores.
    return ["--train", str(POOL), "--eval", str(EVAL), "--image-size", "32",
            "--small-input", "no", "--epochs", "1", "--batch-size", "32",
            "--finetune-epochs", "2", "--distill-epochs", "1", "--seeds", "1",
            "--labels-fraction", "0.5,1.0", "--cache-dir", str(tmp_path / "cache"),
            "--device", "cpu", "--out", str(tmp_path / out_name)]


def in_unit_interval(value) -> bool:
    return value is not None and 0.0 <= value <= 1.0


@pytest.mark.slow
def test_end_to_end_on_fixture_and_encoder_cache(tmp_path, capsys):
    assert ssl_eval.main(bench_args(tmp_path, "first.json")) == 0
    first = json.loads((tmp_path / "first.json").read_text())
    printed = capsys.readouterr().out
    assert "pretrain epoch 1/1" in printed and "images/s" in printed
    assert "pixels_logreg" in printed and "label-free (simclr)" in printed

    assert {"args", "machine", "data", "configs", "encoder_cached", "pretrain", "label_free",
            "runs", "aggregates", "timings"} <= set(first)
    assert first["encoder_cached"] is False
    assert first["data"]["num_train"] == 160 and first["data"]["num_eval"] == 40
    assert first["data"]["class_names"] == ["glioma_tumor", "meningioma_tumor", "no_tumor",
                                            "pituitary_tumor"]
    assert first["labeled_counts"] == {"0.5": 80, "1": 160}
    assert set(first["aggregates"]) == set(FRACTIONS)
    for fraction in FRACTIONS:
        assert set(first["aggregates"][fraction]) == set(ssl_eval.METHODS)
        for stats in first["aggregates"][fraction].values():
            assert stats["runs"] == 1
            for metric in ("accuracy", "macro_f1", "macro_auc", "ece"):
                assert in_unit_interval(stats[metric]["mean"])
            assert stats["nll"]["mean"] >= 0
    assert len(first["runs"]) == len(FRACTIONS) * len(ssl_eval.METHODS)
    for run in first["runs"]:
        metrics = run["metrics"]
        for key in ("accuracy", "macro_f1", "macro_auc"):
            assert in_unit_interval(metrics[key]), (run["method"], key)
        assert set(metrics["per_class"]) == set(first["data"]["class_names"])
        for row in metrics["per_class"].values():
            assert all(in_unit_interval(row[k]) for k in ("precision", "recall", "f1"))
    for name in ("simclr", "pixels", "embedding+thumbnail (cluster view)",
                 "thumbnail, standardised"):
        row = first["label_free"][name]
        assert in_unit_interval(row["knn_accuracy"])
        assert in_unit_interval(row["kmeans"]["purity"]) and row["kmeans"]["k"] == 4
    timings = first["timings"]
    assert timings["pretrain_seconds"] > 0 and timings["pretrain_images_per_s"] > 0
    assert timings["embed_images_per_s"] > 0 and timings["total_seconds"] > 0
    assert first["machine"]["torch_device"] == "cpu"
    assert first["machine"]["torch_num_threads"] >= 1 and first["machine"]["cpu_count"] >= 1

    # Second run: decoded arrays and the pretrained encoder come from the cache.
    assert ssl_eval.main(bench_args(tmp_path, "second.json")) == 0
    second = json.loads((tmp_path / "second.json").read_text())
    printed = capsys.readouterr().out
    assert "from cache" in printed and "reusing cached encoder" in printed
    assert "pretrain epoch" not in printed
    assert second["encoder_cached"] is True
    assert second["timings"]["pretrain_seconds"] == 0.0
    assert second["pretrain"]["checkpoint"] == first["pretrain"]["checkpoint"]
    # Same encoder, same data: the label-free numbers and the pixel floor repeat exactly.
    assert second["label_free"] == first["label_free"]
    assert [r["metrics"]["accuracy"] for r in second["runs"] if r["method"] == "pixels_logreg"] \
        == [r["metrics"]["accuracy"] for r in first["runs"] if r["method"] == "pixels_logreg"]
    assert not list(tmp_path.glob(".tmp-*"))


def blob_image(seed: int, size: int = 32) -> np.ndarray:
    """A smooth random 'scan': a few bright Gaussian blobs on black."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.zeros((size, size))
    for _ in range(4):
        cy, cx = rng.uniform(4, size - 4, 2)
        image += rng.uniform(0.5, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2)
                                               / (2 * rng.uniform(2, 5) ** 2))
    return np.clip(image / image.max() * 255, 0, 255).astype(np.uint8)


def test_near_duplicate_grouping():
    original = blob_image(1)
    noisy = np.clip(original + np.random.default_rng(9).normal(0, 4, original.shape),
                    0, 255).astype(np.uint8)
    different = blob_image(2)
    images = np.stack([original, different, noisy])
    hashes = ssl_eval.average_hash(images)
    assert np.bitwise_count(hashes[0] ^ hashes[2]) <= 4
    assert np.bitwise_count(hashes[0] ^ hashes[1]) > 4
    groups = ssl_eval.near_duplicate_groups(images)
    assert groups[0] == groups[2]
    assert groups[1] != groups[0]
    # The hash alone (no thumbnail check) gives the same answer here.
    alone = ssl_eval.near_duplicate_groups(images, min_correlation=None)
    assert alone[0] == alone[2] != alone[1]


def test_grouped_holdout_keeps_groups_on_one_side():
    labels = np.repeat([0, 1, 2], 40)
    groups = np.arange(120) // 3           # triples of "duplicates"
    train_idx, eval_idx = ssl_eval.grouped_holdout(labels, groups, 0.2, seed=0)
    assert not set(groups[train_idx]) & set(groups[eval_idx])
    assert len(set(train_idx) | set(eval_idx)) == 120
    assert 0.15 <= len(eval_idx) / 120 <= 0.25
    assert set(labels[eval_idx]) == {0, 1, 2}


def test_stratified_subset():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    subset = ssl_eval.stratified_subset(labels, 10, seed=0)
    assert len(subset) == 10 and len(set(subset)) == 10
    counts = np.bincount(labels[subset], minlength=3)
    assert counts.tolist() == [8, 1, 1]       # every class at least once
    assert not np.array_equal(subset, ssl_eval.stratified_subset(labels, 10, seed=1))
    assert len(ssl_eval.stratified_subset(labels, 1, seed=0)) == 3
    assert len(ssl_eval.stratified_subset(labels, 1000, seed=0)) == 100


def test_knn_accuracy_and_purity_on_separable_vectors():
    rng = np.random.default_rng(0)
    centers = np.eye(3, 16) * 10
    train_y = np.repeat([0, 1, 2], 30)
    eval_y = np.repeat([0, 1, 2], 10)
    train_x = centers[train_y] + rng.normal(size=(90, 16))
    eval_x = centers[eval_y] + rng.normal(size=(30, 16))
    assert ssl_eval.knn_accuracy(train_x, train_y, eval_x, eval_y, k=20) == 1.0
    assert ssl_eval.cluster_purity(eval_x, eval_y, 3)["purity"] == 1.0
    row = ssl_eval.label_free(train_x, train_y, eval_x, eval_y, 3, view_k=6)
    assert row["kmeans"]["k"] == 3 and row["kmeans"]["seeds"] == ssl_eval.CLUSTER_SEEDS
    assert row["kmeans"]["purity"] == 1.0 and row["kmeans"]["purity_std"] == 0.0
    # six clusters split the three blobs: each cluster still holds one class
    assert row["kmeans_view"]["k"] == 6 and row["kmeans_view"]["purity"] == 1.0
    assert row["kmeans_view"]["nmi"] < row["kmeans"]["nmi"]
    assert "kmeans_view" not in ssl_eval.label_free(train_x, train_y, eval_x, eval_y, 3,
                                                    view_k=3)


def test_split_eval_holds_out_whole_groups(tmp_path):
    args = ssl_eval.build_parser().parse_args(
        ["--train", str(POOL), "--eval", "split:0.25", "--image-size", "32",
         "--cache-dir", str(tmp_path)])
    data = ssl_eval.load_data(args)
    info = data["info"]
    assert info["num_train"] + info["num_eval"] == 160
    assert 30 <= info["num_eval"] <= 50
    assert set(data["y_eval"].tolist()) == {0, 1, 2, 3}
    assert info["near_duplicate_groups"] <= 160
    # No eval scan has a near-duplicate in train.
    everything = np.concatenate([data["x_train"], data["x_eval"]])
    groups = ssl_eval.near_duplicate_groups(everything)
    assert not set(groups[:info["num_train"]]) & set(groups[info["num_train"]:])
    assert list(tmp_path.glob("data-*.npz"))


def test_an_encoder_evaluated_as_is_with_a_subset_of_methods(tmp_path, capsys):
    """--epochs 0 --init-checkpoint: the encoder is evaluated at its own size, no pretraining;
    --evaluations runs only what is asked (the teacher comes with the distilled student)."""
    from ml_backend.ssl.config import PretrainConfig
    from ml_backend.ssl.train import pretrain

    images = np.stack([blob_image(seed, 40) for seed in range(16)])
    encoder = tmp_path / "encoder.pt"
    pretrain(images, PretrainConfig(image_size=40, small_input=False, epochs=1, batch_size=8),
             checkpoint_path=encoder)
    args = bench_args(tmp_path, "as-is.json")
    args[args.index("--epochs") + 1] = "0"
    args += ["--init-checkpoint", str(encoder), "--evaluations",
             "pixels_logreg,linear_probe,hybrid_probe", "--labels-fraction", "1.0"]
    assert ssl_eval.main(args) == 0
    result = json.loads((tmp_path / "as-is.json").read_text())
    assert result["configs"]["pretrain"]["image_size"] == 40      # the checkpoint's, not 32
    assert result["pretrain"]["init_checkpoint"] == str(encoder)
    assert set(result["aggregates"]["1"]) == {"pixels_logreg", "linear_probe", "hybrid_probe"}
    hybrid = result["aggregates"]["1"]["hybrid_probe"]
    assert 0 <= hybrid["macro_f1"]["mean"] <= 1 and hybrid["macro_auc"]["mean"] is not None
    with pytest.raises(SystemExit, match="SIDE:WEIGHT"):
        ssl_eval.main(args + ["--hybrid-pixels", "16"])
    assert "pretrain epoch" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown"):
        ssl_eval.main(args + ["--evaluations", "pixels_logreg,nonsense"])


def test_the_student_can_learn_the_teachers_soft_labels_on_the_eval_scans_too(tmp_path,
                                                                               monkeypatch):
    """--distill-pool train+eval: the student's unlabeled pool is every train and eval scan
    (as the product distils on the whole project); the eval labels never reach it; the
    teacher's temperature is passed through."""
    from ml_backend.ssl.config import PretrainConfig
    from ml_backend.ssl.train import pretrain

    images = np.stack([blob_image(seed, 40) for seed in range(16)])
    encoder = tmp_path / "encoder.pt"
    pretrain(images, PretrainConfig(image_size=40, small_input=False, epochs=1, batch_size=8),
             checkpoint_path=encoder)
    seen = []
    real = ssl_eval.distill

    def recording(teacher, encoder_model, config, unlabeled, d_config, **kwargs):
        seen.append((len(unlabeled), len(kwargs["labeled"]), d_config.teacher_temperature,
                     unlabeled.shape[1], config.image_size))
        return real(teacher, encoder_model, config, unlabeled, d_config, **kwargs)

    monkeypatch.setattr(ssl_eval, "distill", recording)
    args = bench_args(tmp_path, "pool.json")
    args[args.index("--epochs") + 1] = "0"
    args += ["--init-checkpoint", str(encoder), "--evaluations", "simclr_distill",
             "--labels-fraction", "0.5"]
    assert ssl_eval.main(args + ["--distill-pool", "train+eval",
                                 "--teacher-temperature", "0.5"]) == 0
    assert ssl_eval.main(args) == 0
    train, held = (sum(f.is_file() for f in folder.rglob("*")) for folder in (POOL, EVAL))
    assert seen[0][0] == train + held and seen[0][2] == 0.5
    assert seen[1][0] == train and seen[1][2] is None
    assert seen[0][1] == seen[1][1] < train                      # the labels: train's only
    assert seen[0][3:] == seen[1][3:] == (40, 40)
    result = json.loads((tmp_path / "pool.json").read_text())
    assert result["args"]["distill_pool"] == "train"
    # --finetune-input-scale 2: the teacher and its student read the scans at 80 px
    assert ssl_eval.main(args + ["--finetune-input-scale", "2"]) == 0
    assert seen[2][3:] == (80, 80)
    result = json.loads((tmp_path / "pool.json").read_text())
    assert result["configs"]["finetune"]["input_scale"] == 2
    assert result["aggregates"]["0.5"]["simclr_distill"]["macro_f1"]["mean"] is not None


@pytest.mark.slow
def test_several_ssl_methods_on_the_same_data(tmp_path):
    """--methods simclr,byol: one JSON per method, same data and seeds; the pixel floor runs
    once (with the first method)."""
    args = bench_args(tmp_path, "methods.json") + [
        "--methods", "simclr,byol", "--evaluations", "pixels_logreg,linear_probe",
        "--labels-fraction", "1.0"]
    assert ssl_eval.main(args) == 0
    simclr = json.loads((tmp_path / "methods-simclr.json").read_text())
    byol = json.loads((tmp_path / "methods-byol.json").read_text())
    assert simclr["configs"]["pretrain"]["method"] == "simclr"
    assert byol["configs"]["pretrain"]["method"] == "byol"
    assert set(simclr["aggregates"]["1"]) == {"pixels_logreg", "linear_probe"}
    assert set(byol["aggregates"]["1"]) == {"linear_probe"}
    assert set(byol["label_free"]) == {"byol", "pixels", "embedding+thumbnail (cluster view)",
                                       "thumbnail, standardised"}
    assert simclr["pretrain"]["checkpoint"] != byol["pretrain"]["checkpoint"]
    with pytest.raises(SystemExit, match="unknown"):
        ssl_eval.main(bench_args(tmp_path, "x.json") + ["--methods", "simclr,barlow"])


def test_an_eval_set_with_no_train_class_stops_before_any_training(tmp_path, capsys):
    """A withheld split whose labels read class_0 / class_1 shares no class with train: the
    bench says so at once instead of pretraining and then crashing."""
    rng = np.random.default_rng(0)
    train = tmp_path / "pneumoniamnist.npz"
    np.savez(train, train_images=(rng.random((12, 28, 28)) * 255).astype(np.uint8),
             train_labels=np.array([[0], [1]] * 6))
    withheld = tmp_path / "withheld.npz"
    np.savez(withheld, test_images=(rng.random((4, 28, 28)) * 255).astype(np.uint8),
             test_labels=np.array([[0], [1]] * 2))
    args = ["--train", f"{train}#train", "--eval", f"{withheld}#test", "--epochs", "1",
            "--seeds", "1", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "x.json")]
    with pytest.raises(SystemExit, match="none of its 4 scans has a class of --train"):
        ssl_eval.main(args)
    assert "pretrain" not in capsys.readouterr().out
    # naming the set fixes it
    args[3] = f"{withheld}#test?set=pneumoniamnist"
    args += ["--evaluations", "pixels_logreg", "--labels-fraction", "1.0", "--image-size", "32",
             "--small-input", "no", "--batch-size", "4"]
    assert ssl_eval.main(args) == 0


@pytest.mark.slow
def test_a_findings_source_reports_per_finding_auc_for_every_method(tmp_path, capsys):
    """--train given as a multi-label CSV: bench.ssl_eval runs the findings path (the brain
    fixtures read as three findings), per-finding AUC and macro AUC for every method."""
    from tests.ml_backend.test_findings_refit import FINDINGS, _findings_csv

    train, evaluation = _findings_csv(tmp_path, "pool"), _findings_csv(tmp_path, "eval")
    out = tmp_path / "findings.json"
    assert ssl_eval.main([
        "--train", str(train), "--eval", str(evaluation), "--epochs", "0",
        "--init-checkpoint", "ml_backend/starter/simclr-resnet18-64px.pt",
        "--finetune-epochs", "1", "--distill-epochs", "1", "--seeds", "1",
        "--labels-fraction", "1.0", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
        "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "findings" and result["findings"] == FINDINGS
    methods = {key.split("/")[1] for key in result["aggregates"]}
    assert methods == {"pixels_logreg", "supervised", "linear_probe", "simclr_finetune",
                       "simclr_distill"}
    probe = result["aggregates"]["1/linear_probe"]
    assert set(probe["per_finding_auc"]) == set(FINDINGS)
    assert probe["macro_auc"]["mean"] > 0.7
    assert "macro AUC" in capsys.readouterr().out


def test_findings_and_classes_read_the_encoder_at_two_sizes(tmp_path, capsys):
    """--embed-scales 1,2: the probe's features are the encoder's at 64 and 128 px, side by
    side (the product's MEDLABEL_EMBED_SCALES), for a findings source and a class source."""
    from tests.ml_backend.test_findings_refit import _findings_csv

    train, evaluation = _findings_csv(tmp_path, "pool"), _findings_csv(tmp_path, "eval")
    common = ["--epochs", "0", "--init-checkpoint", "ml_backend/starter/simclr-resnet18-64px.pt",
              "--seeds", "1", "--labels-fraction", "1.0", "--cache-dir", str(tmp_path / "cache"),
              "--device", "cpu", "--embed-scales", "1,2"]
    out = tmp_path / "findings.json"
    assert ssl_eval.main(["--train", str(train), "--eval", str(evaluation),
                          "--evaluations", "linear_probe", "--out", str(out), *common]) == 0
    assert json.loads(out.read_text())["aggregates"]["1/linear_probe"]["macro_auc"]["mean"] > 0.7
    out = tmp_path / "classes.json"
    assert ssl_eval.main(["--train", str(POOL), "--eval", str(EVAL), "--evaluations",
                          "linear_probe,refit_head", "--out", str(out), *common]) == 0
    result = json.loads(out.read_text())
    assert result["args"]["embed_scales"] == "1,2"
    assert result["aggregates"]["1"]["refit_head"]["macro_f1"]["mean"] > 0.7
    assert capsys.readouterr().out.count("embeddings at 64, 128 px, stages 4: 1024 features") == 2
    # the third stage pooled beside the output at each size (the product's
    # MEDLABEL_EMBED_LAYERS=3,4): 256 + 512 features per size
    assert ssl_eval.main(["--train", str(POOL), "--eval", str(EVAL), "--evaluations",
                          "linear_probe", "--embed-layers", "3,4", "--out", str(out),
                          *common]) == 0
    assert json.loads(out.read_text())["args"]["embed_layers"] == "3,4"
    assert "embeddings at 64, 128 px, stages 3,4: 1536 features" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="include 4"):
        ssl_eval.main(["--train", str(POOL), "--eval", str(EVAL), "--out", str(out),
                       "--embed-layers", "2,3", *common])
    with pytest.raises(SystemExit, match="divide the largest"):
        ssl_eval.main(["--train", str(POOL), "--eval", str(EVAL), "--out", str(out),
                       *common[:-1], "2,3"])


def test_findings_networks_read_at_twice_the_encoders_size(tmp_path, capsys, monkeypatch):
    """--finetune-input-scale 2 on a findings source: the fine-tuned network and its student
    learn and predict on the scans decoded at 128 px; the scratch baseline stays at 64."""
    from ml_backend.ssl import findings
    from tests.ml_backend.test_findings_refit import _findings_csv

    seen = []
    for name in ("finetune_findings", "distill_findings", "predict_findings"):
        real = getattr(findings, name)

        def recording(*args, _real=real, _name=name, **kwargs):
            images = args[2] if _name == "finetune_findings" else args[1] \
                if _name == "predict_findings" else args[3]
            config = args[1] if _name == "finetune_findings" else args[2]
            seen.append((_name, images.shape[1], config.image_size))
            return _real(*args, **kwargs)

        monkeypatch.setattr(findings, name, recording)
    train, evaluation = _findings_csv(tmp_path, "pool"), _findings_csv(tmp_path, "eval")
    out = tmp_path / "findings.json"
    assert ssl_eval.main([
        "--train", str(train), "--eval", str(evaluation), "--epochs", "0",
        "--init-checkpoint", "ml_backend/starter/simclr-resnet18-64px.pt",
        "--evaluations", "supervised,simclr_distill", "--finetune-input-scale", "2",
        "--finetune-epochs", "1", "--distill-epochs", "1", "--seeds", "1",
        "--labels-fraction", "1.0", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
        "--out", str(out)]) == 0
    assert "fine-tuned networks read the scans at 128 px" in capsys.readouterr().out
    # scratch: trained on 64 px scans (its config is the encoder's; the network checks them)
    assert seen[0] == ("finetune_findings", 64, 64) and seen[1] == ("predict_findings", 64, 64)
    assert seen[2] == ("finetune_findings", 128, 64)           # the encoder's config, 2x scans
    assert [s[1:] for s in seen[3:]] == [(128, 128)] * (len(seen) - 3)
    assert {s[0] for s in seen[3:]} == {"predict_findings", "distill_findings"}
    result = json.loads(out.read_text())
    assert result["args"]["finetune_input_scale"] == 2
    assert result["aggregates"]["1/simclr_distill"]["macro_auc"]["mean"] is not None


def test_augmentation_overrides_reach_the_pretraining_config():
    """--augment FIELD=VALUE (repeatable) overrides the pretraining augmentation, is saved in
    the config (so the encoder cache tells the variants apart), and refuses unknown fields."""
    base = ["--train", str(POOL), "--eval", str(EVAL), "--channels", "1"]
    args = ssl_eval.build_parser().parse_args(base + [
        "--augment", "brightness=0", "--augment", "contrast=1,1", "--augment", "hflip=yes"])
    config = ssl_eval.pretrain_config(args)
    augment = config.augment_config()
    assert (augment.brightness, augment.contrast, augment.hflip) == (0.0, (1.0, 1.0), True)
    assert augment.gamma == (0.7, 1.4)                           # untouched fields keep theirs
    plain = ssl_eval.pretrain_config(ssl_eval.build_parser().parse_args(base))
    assert plain.augment == {} and config.augment != plain.augment
    for bad in ("bogus=1", "brightness", "size=32", "contrast=a,b"):
        with pytest.raises(SystemExit):
            ssl_eval.build_parser().parse_args(base + ["--augment", bad])
