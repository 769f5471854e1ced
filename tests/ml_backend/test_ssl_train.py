"""SimCLRv2 training loops on tiny real scans (seconds on a CPU): learning happens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml_backend.data.arrays import load_images
from ml_backend.ssl.train import (
    DistillConfig,
    FinetuneConfig,
    PretrainConfig,
    TrainingError,
    class_weights,
    distill,
    embed,
    finetune,
    focal_loss,
    load_checkpoint,
    load_classifier,
    load_encoder_weights,
    load_pretrained,
    predict_proba,
    pretrain,
    SimCLRModel,
)
from tests.base import FIXTURES

SIZE = 32
TINY = dict(arch="resnet18", image_size=SIZE, small_input=False, proj_hidden_dim=64,
            proj_out_dim=32, batch_size=32, lr=2e-3, warmup_epochs=0.5)


def fixture_split(collection: str, split: str, classes: list[str], size: int = SIZE):
    images, labels = [], []
    for index, name in enumerate(classes):
        files = sorted((FIXTURES / collection / split / name).iterdir())
        images.append(load_images(files, size))
        labels += [index] * len(files)
    return np.concatenate(images), np.array(labels)


@pytest.fixture(scope="module")
def brain():
    classes = ["no_tumor", "pituitary_tumor"]
    return fixture_split("brain_mri", "pool", classes), fixture_split("brain_mri", "eval", classes)


@pytest.fixture(scope="module")
def pretrained(brain, tmp_path_factory):
    (images, _), _ = brain
    path = tmp_path_factory.mktemp("ckpt") / "encoder.pt"
    # float32: these checks are about the steps, on 20 eval scans; bf16 vs float32 quality is
    # compared in docs/benchmarks.md (bench.ssl_eval --precision)
    config = PretrainConfig(epochs=8, **{**TINY, "batch_size": 16, "cpu_bf16": False})
    metrics = pretrain(images, config, checkpoint_path=path, model_version="enc-test")
    return path, config, metrics


def fixed_pair_loss(model, images, config, seed=123) -> float:
    """NT-Xent on the same seeded augmented pairs: comparable before and after training
    (per-epoch training losses of a tiny set are too noisy to show progress)."""
    from ml_backend.ssl.losses import NTXentLoss
    from ml_backend.ssl.transforms import TwoViews

    torch.manual_seed(seed)
    two = TwoViews(config.augment_config())
    pairs = [two(torch.from_numpy(im).unsqueeze(0).float() / 255) for im in images[:64]]
    view_a, view_b = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
    model.train()   # batch statistics for both models; no_grad keeps weights fixed
    with torch.no_grad():
        return NTXentLoss(config.temperature)(model(view_a), model(view_b)).item()


def test_pretrain_loss_falls_and_checkpoint_is_complete(brain, pretrained):
    (images, _), _ = brain
    path, config, metrics = pretrained
    torch.manual_seed(config.seed)
    untrained = SimCLRModel(config)        # the same initialisation pretrain starts from
    trained, _ = load_pretrained(path)
    before, after = fixed_pair_loss(untrained, images, config), fixed_pair_loss(trained, images, config)
    assert after < before - 0.2, (before, after)
    assert all(epoch["images_per_s"] > 0 for epoch in metrics["history"])
    state = load_checkpoint(path)
    assert state["model_version"] == "enc-test" and state["epoch"] == 8
    assert state["config"]["image_size"] == SIZE and {"encoder", "head", "optimizer"} <= set(state)
    model, loaded_config = load_pretrained(path)
    assert loaded_config == config


def test_pretrain_resumes_from_its_checkpoint(brain, pretrained, tmp_path):
    (images, _), _ = brain
    path = tmp_path / "enc.pt"
    config = PretrainConfig(epochs=2, **TINY)
    pretrain(images[:64], config, checkpoint_path=path)
    again = pretrain(images[:64], config, checkpoint_path=path)   # already done: no new epochs
    assert again["note"] == "resumed at epoch 2" and len(again["history"]) == 2
    longer = PretrainConfig(epochs=3, **TINY)
    with pytest.raises(TrainingError, match="different config"):
        pretrain(images[:64], longer, checkpoint_path=path)


def test_init_checkpoint_loads_ours_and_torchvision_style(pretrained, tmp_path):
    path, config, _ = pretrained
    model = SimCLRModel(config)
    assert load_encoder_weights(model, path) == "encoder + projection head"
    reference, _ = load_pretrained(path)
    for a, b in zip(model.encoder.parameters(), reference.encoder.parameters()):
        assert torch.equal(a, b)
    import torchvision

    rgb = torchvision.models.resnet18(weights=None)
    torch.save(rgb.state_dict(), tmp_path / "resnet18.pth")
    fresh = SimCLRModel(config)
    assert "torchvision-style" in load_encoder_weights(fresh, tmp_path / "resnet18.pth")
    expected = rgb.conv1.weight.sum(dim=1, keepdim=True)
    assert torch.allclose(fresh.encoder.net.conv1.weight, expected)


def test_non_finite_loss_stops_training(brain, tmp_path):
    (images, _), _ = brain
    config = PretrainConfig(epochs=1, temperature=1e-45, **TINY)
    with pytest.raises(TrainingError, match="non-finite loss"):
        pretrain(images[:64], config, checkpoint_path=tmp_path / "nan.pt")
    assert not (tmp_path / "nan.pt").exists()


def test_finetune_from_head_layer_one_beats_chance(brain, pretrained, tmp_path):
    (images, labels), (eval_images, eval_labels) = brain
    path, pconfig, _ = pretrained
    model, _ = load_pretrained(path)
    config = FinetuneConfig(epochs=8, batch_size=32, lr=1e-3, loss="focal",
                            class_balance="weighted_loss", from_head_layer=1)
    classifier, metrics = finetune(model, pconfig, images, labels, 2, config,
                                   checkpoint_path=tmp_path / "clf.pt", model_version="clf-test")
    history = [h["loss"] for h in metrics["history"]]
    assert history[-1] < history[0]
    assert classifier.fc.in_features == pconfig.proj_hidden_dim   # head layer 1 output
    proba = predict_proba(classifier, eval_images, pconfig)
    accuracy = float((proba.argmax(1) == eval_labels).mean())
    assert accuracy >= 0.75, accuracy            # chance is 0.5 (10 + 10 eval scans)
    reloaded, _ = load_classifier(tmp_path / "clf.pt")
    np.testing.assert_allclose(predict_proba(reloaded, eval_images, pconfig), proba, atol=1e-5)


def test_linear_probe_on_embeddings_beats_chance(brain, pretrained):
    from sklearn.linear_model import LogisticRegression

    (images, labels), (eval_images, eval_labels) = brain
    path, pconfig, _ = pretrained
    model, _ = load_pretrained(path)
    train = embed(model.encoder, images, pconfig)
    test = embed(model.encoder, eval_images, pconfig)
    assert train.shape == (len(images), 512) and train.dtype == np.float32
    probe = LogisticRegression(max_iter=2000, class_weight="balanced").fit(train, labels)
    assert probe.score(test, eval_labels) >= 0.75


def test_distill_trains_a_student_from_teacher_soft_labels(brain, pretrained, tmp_path):
    (images, labels), (eval_images, eval_labels) = brain
    path, pconfig, _ = pretrained
    model, _ = load_pretrained(path)
    teacher, _ = finetune(model, pconfig, images, labels, 2,
                          FinetuneConfig(epochs=6, batch_size=32, lr=1e-3))
    config = DistillConfig(epochs=8, batch_size=16, lr=1e-3, labeled_weight=0.2)
    student, metrics = distill(teacher, model, pconfig, images, config, labeled=images[:20],
                               labels=labels[:20], checkpoint_path=tmp_path / "student.pt")
    losses = [h["loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0]
    teacher_pred = predict_proba(teacher, images, pconfig).argmax(1)
    student_pred = predict_proba(student, images, pconfig).argmax(1)
    agreement = float((student_pred == teacher_pred).mean())
    assert agreement >= 0.75, agreement    # the student learned the teacher's labels on the pool
    assert load_checkpoint(tmp_path / "student.pt")["kind"] == "distilled"


def test_class_weights_and_focal_loss():
    weights = class_weights(np.array([0, 0, 0, 1]), 3)
    assert weights[2] == 0 and weights[1] > weights[0]
    logits = torch.tensor([[4.0, 0.0], [0.0, 0.1]])
    targets = torch.tensor([0, 1])
    ce = torch.nn.functional.cross_entropy(logits, targets)
    assert focal_loss(logits, targets, gamma=0.0).item() == pytest.approx(ce.item(), rel=1e-6)
    assert focal_loss(logits, targets, gamma=2.0) < ce   # easy examples down-weighted


def test_finetune_checks_labels(pretrained):
    path, pconfig, _ = pretrained
    model, _ = load_pretrained(path)
    images = np.zeros((4, SIZE, SIZE), np.uint8)
    with pytest.raises(TrainingError, match="class indices"):
        finetune(model, pconfig, images, np.array([0, 1, 2, 5]), 3, FinetuneConfig(epochs=1))


def test_probe_layer_is_the_logistic_regression_on_frozen_features(brain, pretrained):
    """LP-FT's first step: the classifier's last layer, before any gradient step, predicts
    exactly what scikit-learn's standardised, class-balanced logistic regression does."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from ml_backend.ssl.train import _classifier_from, _features, fit_probe_layer

    (images, labels), (eval_images, _) = brain
    path, pconfig, _ = pretrained
    model, _ = load_pretrained(path)
    for num_classes, y in ((2, labels), (3, np.where(np.arange(len(labels)) % 3 == 0, 2, labels))):
        classifier = _classifier_from(model, pconfig, num_classes, 1)
        device = torch.device("cpu")
        features = _features(classifier, images, pconfig, device)
        fit_probe_layer(classifier, features, y, num_classes, c=0.5)
        reference = make_pipeline(StandardScaler(), LogisticRegression(
            C=0.5, class_weight="balanced", max_iter=2000, random_state=0)).fit(features, y)
        eval_features = _features(classifier, eval_images, pconfig, device)
        expected = reference.predict_proba(eval_features)
        got = predict_proba(classifier, eval_images, pconfig)
        np.testing.assert_allclose(got, expected, atol=2e-3)


def test_probe_layer_leaves_an_unlabelled_class_unpredicted(brain, pretrained):
    from ml_backend.ssl.train import _classifier_from, _features, fit_probe_layer

    (images, labels), _ = brain
    path, pconfig, _ = pretrained
    model, _ = load_pretrained(path)
    classifier = _classifier_from(model, pconfig, 3, 1)
    fit_probe_layer(classifier, _features(classifier, images, pconfig, torch.device("cpu")),
                    labels, 3)
    assert predict_proba(classifier, images, pconfig)[:, 2].max() < 1e-3


def test_frozen_encoder_and_batchnorm_keep_what_pretraining_learned(brain, pretrained):
    """backbone_lr_scale 0 trains the last layer only; frozen BatchNorm keeps its statistics
    through the epochs (they are set once on these scans, before fine-tuning)."""
    from ml_backend.ssl.loop import recalibrate_batchnorm

    (images, labels), _ = brain
    path, pconfig, _ = pretrained
    model, _ = load_pretrained(path)
    config = FinetuneConfig(epochs=2, batch_size=16, lr=1e-2, backbone_lr_scale=0.0,
                            batchnorm="recalibrated", augment=True)
    classifier, _ = finetune(model, pconfig, images, labels, 2, config)
    reference, _ = load_pretrained(path)
    recalibrate_batchnorm(reference, images, pconfig, device=torch.device("cpu"))
    for (name, got), expected in zip(classifier.encoder.state_dict().items(),
                                     reference.encoder.state_dict().values()):
        torch.testing.assert_close(got, expected, msg=name)
    assert all(p.requires_grad for p in classifier.parameters())   # usable afterwards

    trained, _ = finetune(model, pconfig, images, labels, 2,
                          FinetuneConfig(epochs=2, batch_size=16, lr=1e-2,
                                         backbone_lr_scale=1.0, batchnorm="train"))
    moved = [name for (name, got), expected in zip(trained.encoder.state_dict().items(),
                                                   reference.encoder.state_dict().values())
             if name.endswith("running_mean") and not torch.allclose(got, expected)]
    assert moved                                   # a trained BatchNorm does move


def test_student_starts_as_its_teacher(brain, pretrained):
    (images, labels), _ = brain
    path, pconfig, _ = pretrained
    model, _ = load_pretrained(path)
    teacher, _ = finetune(model, pconfig, images, labels, 2,
                          FinetuneConfig(epochs=1, batch_size=32))
    # a learning rate of ~0: the student stays its teacher, BatchNorm statistics included
    student, _ = distill(teacher, model, pconfig, images,
                         DistillConfig(epochs=1, batch_size=16, lr=1e-12, student_init="teacher"))
    np.testing.assert_allclose(predict_proba(student, images, pconfig),
                               predict_proba(teacher, images, pconfig), atol=1e-4)


def test_a_cooler_teacher_sharpens_the_soft_labels_and_moves_its_student(brain, pretrained):
    """teacher_temperature < temperature: the targets are the teacher's probabilities made
    more confident (same argmax), so a student that starts as its teacher has a gradient."""
    from ml_backend.ssl.train import _teacher_targets

    (images, labels), _ = brain
    path, pconfig, _ = pretrained
    model, _ = load_pretrained(path)
    teacher, _ = finetune(model, pconfig, images, labels, 2,
                          FinetuneConfig(epochs=1, batch_size=32))
    plain = _teacher_targets(teacher, images, pconfig, DistillConfig())
    sharp = _teacher_targets(teacher, images, pconfig, DistillConfig(teacher_temperature=0.5))
    np.testing.assert_array_equal(sharp.argmax(1), plain.argmax(1))
    assert (sharp.max(1) >= plain.max(1) - 1e-6).all() and (sharp.max(1) > plain.max(1)).any()
    student, _ = distill(teacher, model, pconfig, images,
                         DistillConfig(epochs=1, batch_size=16, lr=1e-3, labeled_weight=0,
                                       teacher_temperature=0.5))
    moved = np.abs(predict_proba(student, images, pconfig)
                   - predict_proba(teacher, images, pconfig)).max()
    assert moved > 1e-3


def test_finetune_at_twice_the_size_reads_and_keeps_that_size(brain, pretrained, tmp_path):
    """``input_scale=2``: the network learns and predicts on scans at twice the encoder's
    size with the encoder's stem; its checkpoint says so, so a reload, and a student
    distilled from it, read at that size; scans at the encoder's size are refused."""
    from ml_backend.ssl.config import network_config

    (images, labels), (_, eval_labels) = brain
    path, pconfig, _ = pretrained
    model, _ = load_pretrained(path)
    config = FinetuneConfig(epochs=6, batch_size=32, lr=1e-3, input_scale=2)
    with pytest.raises(TrainingError, match=f"reads scans at {2 * SIZE} px; these are {SIZE} px"):
        finetune(model, pconfig, images, labels, 2, config)
    big = network_config(pconfig, 2)
    assert (big.image_size, big.uses_small_input) == (2 * SIZE, pconfig.uses_small_input)
    assert network_config(pconfig, 1) is pconfig
    classes = ["no_tumor", "pituitary_tumor"]
    big_images, big_labels = fixture_split("brain_mri", "pool", classes, 2 * SIZE)
    big_eval, _ = fixture_split("brain_mri", "eval", classes, 2 * SIZE)
    assert np.array_equal(big_labels, labels)
    finetune(model, pconfig, big_images, labels, 2, config,
             checkpoint_path=tmp_path / "clf.pt")
    reloaded, saved = load_classifier(tmp_path / "clf.pt")
    assert saved.image_size == 2 * SIZE and saved.uses_small_input == pconfig.uses_small_input
    proba = predict_proba(reloaded, big_eval, saved)
    assert float((proba.argmax(1) == eval_labels).mean()) >= 0.75
    student, _ = distill(reloaded, model, saved, big_images,
                         DistillConfig(epochs=1, batch_size=16, lr=1e-4),
                         labeled=big_images[:8], labels=labels[:8],
                         checkpoint_path=tmp_path / "student.pt")
    assert load_classifier(tmp_path / "student.pt")[1].image_size == 2 * SIZE


def test_new_finetune_options_are_checked():
    with pytest.raises(ValueError, match="input_scale"):
        FinetuneConfig(input_scale=0)
    with pytest.raises(ValueError, match="head_init"):
        FinetuneConfig(head_init="zeros")
    with pytest.raises(ValueError, match="backbone_lr_scale"):
        FinetuneConfig(backbone_lr_scale=2.0)
    with pytest.raises(ValueError, match="batchnorm"):
        FinetuneConfig(batchnorm="frozen")
    with pytest.raises(ValueError, match="student_init"):
        DistillConfig(student_init="scratch")
    with pytest.raises(ValueError, match="teacher_temperature"):
        DistillConfig(teacher_temperature=0)


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_the_schedule_keeps_the_encoders_smaller_learning_rate(schedule):
    """backbone_lr_scale holds at every step of either schedule: one cycle used to peak
    every parameter group at the last layer's rate, the encoder's included."""
    from ml_backend.ssl.train import _param_groups, _schedule

    model = torch.nn.Module()
    model.encoder, model.fc = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    config = FinetuneConfig(lr=1e-2, backbone_lr_scale=0.1, schedule=schedule)
    optimizer = torch.optim.AdamW(_param_groups(model, config.lr, config.backbone_lr_scale),
                                  lr=config.lr)
    scheduler = _schedule(optimizer, config, total_steps=20)
    peaks = [0.0, 0.0]
    for _ in range(20):
        last, encoder = (group["lr"] for group in optimizer.param_groups)
        assert encoder == pytest.approx(0.1 * last, rel=1e-6)
        peaks = [max(peaks[0], last), max(peaks[1], encoder)]
        optimizer.step()
        scheduler.step()
    assert peaks[0] == pytest.approx(1e-2, rel=0.05) and peaks[1] == pytest.approx(1e-3, rel=0.05)


def test_findings_finetune_and_distill_learn_two_findings_with_unknown_answers(brain, pretrained,
                                                                               tmp_path):
    """Two findings on the brain fixtures: "tumour" (pituitary) and a finding nobody answered
    for half the scans; the masked BCE ignores the unknowns and the model ranks both."""
    from sklearn.metrics import roc_auc_score

    from ml_backend.ssl.findings import distill_findings, finetune_findings, predict_findings
    from ml_backend.ssl.losses import masked_bce

    (images, labels), (eval_images, eval_labels) = brain
    path, pconfig, _ = pretrained
    model, _ = load_pretrained(path)
    targets = np.stack([labels, 1 - labels], axis=1).astype(np.float32)
    targets[::2, 1] = np.nan
    config = FinetuneConfig(epochs=4, batch_size=16, lr=1e-3)
    clf, metrics = finetune_findings(model, pconfig, images, targets, config,
                                     checkpoint_path=tmp_path / "f.pt")
    proba = predict_findings(clf, eval_images, pconfig)
    assert proba.shape == (len(eval_images), 2)
    assert roc_auc_score(eval_labels, proba[:, 0]) >= 0.8
    assert roc_auc_score(1 - eval_labels, proba[:, 1]) >= 0.8
    assert load_checkpoint(tmp_path / "f.pt")["kind"] == "finetuned-findings"
    student, _ = distill_findings(clf, model, pconfig, images,
                                  DistillConfig(epochs=1, batch_size=16, lr=1e-4),
                                  labeled=images, targets=targets)
    assert roc_auc_score(eval_labels, predict_findings(student, eval_images, pconfig)[:, 0]) >= 0.8
    # unknown answers add nothing: the loss with them equals the loss over the known ones
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    y = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    known = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor([2.0, 0.5, 3.0]), torch.tensor([1.0, 0.0, 1.0]))
    assert masked_bce(logits, y).item() == pytest.approx(known.item(), rel=1e-6)
    with pytest.raises(TrainingError, match="policy"):
        finetune_findings(model, pconfig, images[:4], np.full((4, 2), -1.0), config)
