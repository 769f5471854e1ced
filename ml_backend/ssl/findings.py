"""SimCLRv2 steps 2 and 3 for multi-label findings: per-finding sigmoid outputs trained with a
masked binary cross-entropy (unknown answers — not read, or uncertain under the "ignore"
policy — add nothing to the loss), with per-finding positive weights or a binary focal loss.

Targets are ``float (N, F)``: 1 present, 0 absent, NaN unknown (apply the project's
uncertain-label policy first, ``ml_backend.metrics.findings.uncertain_policy``). The same
``FinetuneConfig`` / ``DistillConfig`` as the single-label steps apply (LP-FT start,
BatchNorm mode, backbone learning-rate scale); ``loss="focal"`` uses ``focal_gamma`` and
``class_balance="weighted_loss"`` sets each finding's positive weight to negatives/positives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ml_backend.errors import TrainingError
from ml_backend.ssl.config import DistillConfig, FinetuneConfig, PretrainConfig
from ml_backend.ssl.images import ImageArray, make_loader
from ml_backend.ssl.loop import (
    Progress,
    pick_device,
    recalibrate_batchnorm,
    seed_everything,
)
from ml_backend.ssl.losses import findings_pos_weight, masked_bce
from ml_backend.ssl.models import Classifier, SimCLRModel
from ml_backend.ssl.train import (
    _classifier_from,
    _features,
    _light_augmentation,
    network_input,
    train_network,
)
from ml_backend.ssl.transforms import eval_transform

__all__ = ["distill_findings", "finetune_findings", "fit_findings_probe_layer",
           "predict_findings"]


def fit_findings_probe_layer(model: Classifier, features: np.ndarray, targets: np.ndarray, *,
                             c: float = 0.5, seed: int = 0) -> None:
    """LP-FT's first step for findings: each output of ``model.fc`` becomes the class-balanced
    logistic regression of its finding on the frozen features (known answers only); a
    finding with one kind of answer gets the log-odds of its smoothed frequency."""
    from sklearn.linear_model import LogisticRegression

    mean = features.mean(axis=0)
    scale = features.std(axis=0) + 1e-6
    xs = (features - mean) / scale
    n_findings = targets.shape[1]
    weight = np.zeros((n_findings, features.shape[1]))
    bias = np.zeros(n_findings)
    for f in range(n_findings):
        known = ~np.isnan(targets[:, f])
        y = targets[known, f].astype(int)
        if y.min(initial=1) == y.max(initial=0):      # empty, or one kind of answer only
            p = (y.sum() + 0.5) / (len(y) + 1.0)
            bias[f] = np.log(p / (1 - p))
            continue
        fit = LogisticRegression(C=c, class_weight="balanced", max_iter=2000,
                                 random_state=seed).fit(xs[known], y)
        weight[f] = fit.coef_[0] / scale
        bias[f] = fit.intercept_[0] - float((fit.coef_[0] * mean / scale).sum())
    with torch.no_grad():
        model.fc.weight.copy_(torch.as_tensor(weight, dtype=model.fc.weight.dtype))
        model.fc.bias.copy_(torch.as_tensor(bias, dtype=model.fc.bias.dtype))


def _check_targets(images: np.ndarray, targets: np.ndarray) -> np.ndarray:
    targets = np.asarray(targets, dtype=np.float32)
    if targets.ndim != 2 or len(targets) != len(images) or len(targets) == 0:
        raise TrainingError("findings targets must be (N, F) with one row per image")
    known = ~np.isnan(targets)
    if not np.isin(targets[known], (0.0, 1.0)).all():
        raise TrainingError("findings targets hold 1, 0 or NaN (apply the uncertain-label "
                            "policy first)")
    if targets.shape[1] < 2:
        raise TrainingError("a findings model needs at least 2 findings")
    return targets


def finetune_findings(
    pretrained: SimCLRModel,
    pretrain_config: PretrainConfig,
    images: np.ndarray,
    targets: np.ndarray,
    config: FinetuneConfig,
    *,
    checkpoint_path: str | Path | None = None,
    model_version: str = "",
    device: str | None = None,
    progress: Progress | None = None,
    workers: int = 0,
) -> tuple[Classifier, dict]:
    """Fine-tune the pretrained encoder into ``F`` sigmoid outputs (module docstring)."""
    targets = _check_targets(images, targets)
    pretrain_config = network_input(pretrain_config, config, images)
    n_findings = targets.shape[1]
    dev = pick_device(device)
    generator = seed_everything(config.seed)
    model = _classifier_from(pretrained, pretrain_config, n_findings, config.from_head_layer)
    model.to(dev)
    if config.batchnorm == "recalibrated":
        recalibrate_batchnorm(model, images, pretrain_config, device=dev, workers=workers)
    if config.head_init == "probe":
        fit_findings_probe_layer(model, _features(model, images, pretrain_config, dev, workers),
                                 targets, c=config.probe_c, seed=config.seed)
    transform = _light_augmentation(pretrain_config) if config.augment \
        else eval_transform(pretrain_config.augment_config())
    batch_size = min(config.batch_size, len(targets))
    loader = make_loader(ImageArray(images, transform, targets), batch_size, shuffle=True,
                         generator=generator, drop_last=len(targets) > batch_size, device=dev,
                         workers=workers)
    pos_weight = (findings_pos_weight(targets).to(dev)
                  if config.class_balance == "weighted_loss" else None)
    gamma = config.focal_gamma if config.loss == "focal" else 0.0

    def step_loss(batch):
        x, y = batch[0].to(dev), batch[1].to(dev)
        return masked_bce(model(x).float(), y, pos_weight=pos_weight, focal_gamma=gamma), len(x)

    return train_network(model, loader, step_loss, config, pretrain_config, bn_images=images,
                         stage="finetune", kind="finetuned-findings", device=dev,
                         progress=progress, workers=workers, checkpoint_path=checkpoint_path,
                         model_version=model_version)


@torch.no_grad()
def predict_findings(model: Classifier, images: np.ndarray, config: PretrainConfig, *,
                     batch_size: int = 256, device: str | None = None,
                     workers: int = 0) -> np.ndarray:
    """Per-finding probabilities ``float32 (N, F)`` (independent sigmoids)."""
    dev = pick_device(device)
    model = model.to(dev).eval()
    loader = make_loader(ImageArray(images, eval_transform(config.augment_config())), batch_size,
                         shuffle=False, generator=None, device=dev, workers=workers)
    out = [torch.sigmoid(model(x.to(dev)).float()).cpu().numpy() for x in loader]
    return np.concatenate(out) if out else np.zeros((0, model.fc.out_features), np.float32)


def distill_findings(
    teacher: Classifier,
    pretrained: SimCLRModel,
    pretrain_config: PretrainConfig,
    unlabeled: np.ndarray,
    config: DistillConfig,
    *,
    labeled: np.ndarray | None = None,
    targets: np.ndarray | None = None,
    checkpoint_path: str | Path | None = None,
    model_version: str = "",
    device: str | None = None,
    progress: Progress | None = None,
    workers: int = 0,
) -> tuple[Classifier, dict]:
    """SimCLRv2 step 3 for findings: the student matches the teacher's per-finding
    probabilities on the unlabeled scans (binary cross-entropy to soft targets), plus
    ``labeled_weight`` times the masked BCE on the labels when given."""
    if len(unlabeled) == 0:
        raise TrainingError("distillation needs unlabeled scans")
    dev = pick_device(device)
    generator = seed_everything(config.seed)
    n_findings = teacher.fc.out_features
    soft = predict_findings(teacher, unlabeled, pretrain_config, device=device, workers=workers)
    student = _classifier_from(pretrained, pretrain_config, n_findings, teacher.from_head_layer)
    if config.student_init == "teacher":
        student.load_state_dict(teacher.state_dict())
    student.to(dev)
    transform = _light_augmentation(pretrain_config) if config.augment \
        else eval_transform(pretrain_config.augment_config())
    loader = make_loader(ImageArray(unlabeled, transform, soft),
                         min(config.batch_size, len(unlabeled)), shuffle=True,
                         generator=generator, drop_last=len(unlabeled) > config.batch_size,
                         device=dev, workers=workers)
    labeled_iter = None
    if labeled is not None and targets is not None and len(labeled) and config.labeled_weight:
        from ml_backend.ssl.loop import cycle

        labeled_iter = cycle(make_loader(
            ImageArray(labeled, transform, _check_targets(labeled, targets)),
            min(config.batch_size, len(labeled)), shuffle=True, generator=generator,
            device=dev, workers=workers))

    def step_loss(batch):
        x, target = batch[0].to(dev), batch[1].to(dev)
        loss = masked_bce(student(x).float(), target)
        if labeled_iter is not None:
            lx, ly = next(labeled_iter)
            supervised = masked_bce(student(lx.to(dev)).float(), ly.to(dev))
            loss = (1 - config.labeled_weight) * loss + config.labeled_weight * supervised
        return loss, len(x)

    return train_network(student, loader, step_loss, config, pretrain_config,
                         bn_images=unlabeled, stage="distill", kind="distilled-findings",
                         device=dev, progress=progress, workers=workers,
                         checkpoint_path=checkpoint_path, model_version=model_version)
