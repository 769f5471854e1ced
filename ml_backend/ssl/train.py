"""SimCLRv2's three steps as plain functions over ``uint8 (N, H, W)`` image arrays.

1. ``pretrain``: contrastive pretraining (NT-Xent) of encoder + 3-layer projection head on
   unlabeled scans (Chen et al., 2020b, section 2.1).
2. ``finetune``: supervised fine-tuning of encoder + the *first* projection-head layer + a new
   linear classifier on the labeled scans (section 2.2), with class-imbalance handling
   (class-weighted loss or a weighted sampler; focal loss optional), AdamW, a cosine or
   one-cycle schedule and gradient clipping.
3. ``distill``: self-distillation — the fine-tuned teacher's temperature-softened
   probabilities on the unlabeled pool train a student of the same architecture
   (section 2.3, eq. 2), optionally mixed with the labeled loss.

Plus ``embed`` (encoder features) and ``predict_proba`` (class probabilities).

Every run writes a checkpoint holding state dicts, optimizer, epoch, the frozen config and a
``model_version``; loading uses ``torch.load(weights_only=True)`` (see ``checkpoints``). A
non-finite loss stops the run with ``TrainingError``. Mixed precision and a GPU are used when
one is present. ``workers`` is the number of DataLoader worker processes (0: none).

The pieces live in ``config``, ``models``, ``checkpoints``, ``losses``, ``images`` and
``loop``; this module re-exports their public names, so ``from ml_backend.ssl.train import X``
keeps working for all of them.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import WeightedRandomSampler

from ml_backend.errors import TrainingError
from ml_backend.ssl.checkpoints import (
    load_checkpoint,
    load_classifier,
    load_encoder_weights,
    load_pretrained,
    save_checkpoint,
    save_classifier,
    save_encoder_checkpoint,
)
from ml_backend.ssl.config import (
    DistillConfig,
    FinetuneConfig,
    PretrainConfig,
    network_config,
    config_from_dict,
)
from ml_backend.ssl.images import ImageArray, make_loader
from ml_backend.ssl.loop import (
    Progress,
    cycle,
    new_scaler,
    pick_device,
    recalibrate_batchnorm,
    seed_everything,
    train_one_epoch,
)
from ml_backend.ssl.losses import (
    class_weights,
    focal_loss,
    soft_target_loss,
    supervised_loss,
)
from ml_backend.ssl.models import Classifier, SimCLRModel
from ml_backend.ssl.transforms import TwoViews, augmentation, eval_transform

__all__ = [
    "Classifier", "DistillConfig", "FinetuneConfig", "PretrainConfig", "Progress",
    "SimCLRModel", "TrainingError", "class_weights", "config_from_dict", "distill", "embed",
    "finetune", "focal_loss", "load_checkpoint", "load_classifier", "load_encoder_weights",
    "load_pretrained", "pick_device", "predict_proba", "pretrain", "recalibrate_batchnorm",
    "save_checkpoint", "save_classifier", "train_one_epoch",
]


# --- step 1: pretrain ------------------------------------------------------------------


def _warmup_cosine(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps)
        * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))


def pretrain(
    images: np.ndarray,
    config: PretrainConfig,
    *,
    checkpoint_path: str | Path,
    model_version: str = "",
    init_checkpoint: str | Path | None = None,
    resume: bool = True,
    device: str | None = None,
    progress: Progress | None = None,
    hflip_mask: np.ndarray | None = None,
    workers: int = 0,
) -> dict:
    """Self-supervised pretraining with ``config.method`` (SimCLRv2 by default; MoCo v2, BYOL,
    SwAV, DINO: ``ml_backend/ssl/methods.py``), one loop for all. ``images``: ``uint8 (N, S, S)``
    at ``config.image_size``.

    Writes ``checkpoint_path`` after every epoch and resumes from it when it exists (same
    config required; ``resume=False`` starts over). ``init_checkpoint``: start from one of
    our encoders or a torchvision ResNet state dict. ``hflip_mask``: per image, whether a
    left-right flip keeps the anatomy plausible (overrides ``config.hflip``).
    ``progress`` gets ``{stage, epoch, epochs, step, steps, loss, images_per_s}`` every step.
    Returns ``{epochs, history, note, final_loss, device}``.
    """
    from ml_backend.ssl.methods import build_method

    if len(images) < 2:
        raise TrainingError("pretraining needs at least 2 scans")
    dev = pick_device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True       # fixed shapes: let cuDNN pick its kernels
    generator = seed_everything(config.seed)
    method = build_method(config, num_images=len(images))
    batch_size = min(config.batch_size, len(images))
    aug = config.augment_config()
    if hflip_mask is not None:
        aug = replace(aug, hflip=False)   # the mask decides per image
    loader = make_loader(ImageArray(images, TwoViews(aug), flip_mask=hflip_mask), batch_size,
                         shuffle=True, generator=generator, drop_last=True, device=dev,
                         workers=workers)
    steps_per_epoch = len(loader)
    start_epoch, history, note, state = 0, [], "", None

    checkpoint_path = Path(checkpoint_path)
    if resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        stored, current = state.get("config") or {}, asdict(config)
        # a key the stored config lacks was added later with a default: not a difference
        if any(stored.get(key, value) != value for key, value in current.items()) or \
                set(stored) - set(current):
            raise TrainingError(f"{checkpoint_path} was made with a different config; "
                                "remove it or pass resume=False")
        method.start()
        if "method_state" in state:
            method.load_state_dict(state["method_state"])
        else:
            method.encoder.load_state_dict(state["encoder"])
            method.head.load_state_dict(state["head"])
        start_epoch, history = state["epoch"], list(state.get("history", []))
        note = f"resumed at epoch {start_epoch}"
    else:
        if init_checkpoint:
            note = "initialised from " + load_encoder_weights(method, init_checkpoint)
        method.start()                      # momentum networks start from the same weights
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    method.to(dev, memory_format=memory_format)
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad],
                                  lr=config.lr, weight_decay=config.weight_decay)
    scheduler = _warmup_cosine(optimizer, max(1, int(config.warmup_epochs * steps_per_epoch)),
                               steps_per_epoch * config.epochs)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    scaler = new_scaler(dev, config.amp)
    total_steps = steps_per_epoch * config.epochs
    current_epoch = {"epoch": start_epoch}

    def step_loss(batch):
        view_a, view_b = (view.to(dev, non_blocking=True).contiguous(memory_format=memory_format)
                          for view in batch)
        return method.loss(view_a, view_b, epoch=current_epoch["epoch"]), len(view_a)

    for epoch in range(start_epoch, config.epochs):
        current_epoch["epoch"] = epoch
        first_step = epoch * steps_per_epoch
        result = train_one_epoch(
            method, loader, step_loss, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
            device=dev, amp=config.amp, where=f"pretraining epoch {epoch + 1}",
            progress=progress, cpu_bf16=config.cpu_bf16,
            after_step=lambda step, first=first_step: method.after_step(first + step,
                                                                       total_steps),
            event={"stage": "pretrain", "epoch": epoch + 1, "epochs": config.epochs})
        history.append({"epoch": epoch + 1, "loss": result["loss"],
                        "images_per_s": result["images_per_s"], "seconds": result["seconds"]})
        save_encoder_checkpoint(checkpoint_path, method, config, optimizer, scheduler,
                                model_version=model_version, epoch=epoch + 1, history=history)
    recalibrate_batchnorm(method.projection(), images, config, device=dev, workers=workers)
    save_encoder_checkpoint(checkpoint_path, method, config, optimizer, scheduler,
                            model_version=model_version, epoch=config.epochs, history=history,
                            batchnorm_recalibrated=True)
    return {"epochs": config.epochs, "history": history, "note": note,
            "final_loss": history[-1]["loss"] if history else None, "device": dev.type}


# --- embeddings ------------------------------------------------------------------------


@torch.no_grad()
def embed(
    encoder: nn.Module,
    images: np.ndarray,
    config: PretrainConfig,
    *,
    batch_size: int = 256,
    device: str | None = None,
    progress: Progress | None = None,
    workers: int = 0,
) -> np.ndarray:
    """Encoder features ``float32 (N, feature_dim)`` for ``uint8 (N, S, S)`` images.

    ``progress`` gets ``{stage: "embed", done, total, images_per_s}`` after every batch.
    """
    dev = pick_device(device)
    encoder = encoder.to(dev).eval()
    loader = make_loader(ImageArray(images, eval_transform(config.augment_config())), batch_size,
                         shuffle=False, generator=None, device=dev, workers=workers)
    chunks, done, started = [], 0, time.perf_counter()
    for batch in loader:
        chunks.append(encoder(batch.to(dev)).float().cpu().numpy())
        done += len(batch)
        if progress is not None:
            progress({"stage": "embed", "done": done, "total": len(images),
                      "images_per_s": done / max(time.perf_counter() - started, 1e-9)})
    if not chunks:
        return np.zeros((0, getattr(encoder, "feature_dim", 0)), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32)


# --- step 2: fine-tune -----------------------------------------------------------------


def _schedule(optimizer, config: FinetuneConfig | DistillConfig, total_steps: int):
    """Cosine decay over ``total_steps`` (distillation always), or one cycle. One cycle
    peaks each parameter group at its own rate, so the encoder keeps its
    ``backbone_lr_scale`` (a single ``max_lr`` would lift it to the last layer's)."""
    if getattr(config, "schedule", "cosine") == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=max(total_steps, 1))
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))


def _classifier_from(pretrained: SimCLRModel, pretrain_config: PretrainConfig,
                     num_classes: int, from_head_layer: int) -> Classifier:
    """A new classifier whose encoder and projection head start from ``pretrained``."""
    model = Classifier(pretrain_config, num_classes, from_head_layer)
    model.encoder.load_state_dict(pretrained.encoder.state_dict())
    model.head.load_state_dict(pretrained.head.state_dict())
    return model


@torch.no_grad()
def _features(model: Classifier, images: np.ndarray, pretrain_config: PretrainConfig,
              device: torch.device, workers: int = 0) -> np.ndarray:
    """The classifier's frozen input to its last layer, ``float32 (N, D)`` (eval mode)."""
    model.eval()
    loader = make_loader(ImageArray(images, eval_transform(pretrain_config.augment_config())),
                         256, shuffle=False, generator=None, device=device, workers=workers)
    return np.concatenate([model.features(x.to(device)).float().cpu().numpy() for x in loader])


def fit_probe_layer(model: Classifier, features: np.ndarray, labels: np.ndarray,
                    num_classes: int, *, c: float = 0.5, balanced: bool = True,
                    seed: int = 0) -> None:
    """LP-FT's first step: set ``model.fc`` to a class-balanced, L2-regularised logistic
    regression fitted on the frozen ``features`` (standardised inside the fit; the scaling
    is folded back into the layer's weights). Classes without a label get a bias far below
    the others, as a randomly initialised layer would never predict them either."""
    from sklearn.linear_model import LogisticRegression

    mean = features.mean(axis=0)
    scale = features.std(axis=0) + 1e-6
    present = np.unique(labels)
    weight = np.zeros((num_classes, features.shape[1]), np.float64)
    bias = np.full(num_classes, -10.0)
    if len(present) >= 2:
        fit = LogisticRegression(C=c, class_weight="balanced" if balanced else None,
                                 max_iter=2000, random_state=seed)
        fit.fit((features - mean) / scale, labels)
        coef, intercept = fit.coef_, fit.intercept_
        if len(fit.classes_) == 2:          # one logit for the pair: split it symmetrically
            coef = np.vstack([-coef[0] / 2, coef[0] / 2])
            intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
        for row, cls in enumerate(fit.classes_):
            weight[cls] = coef[row] / scale
            bias[cls] = intercept[row] - float((coef[row] * mean / scale).sum())
    else:                                    # one class only: nothing to separate
        bias[present] = 0.0
    with torch.no_grad():
        model.fc.weight.copy_(torch.as_tensor(weight, dtype=model.fc.weight.dtype))
        model.fc.bias.copy_(torch.as_tensor(bias, dtype=model.fc.bias.dtype))


def _param_groups(model: Classifier, lr: float, backbone_lr_scale: float):
    """The last layer at ``lr``; encoder and kept head layers at ``lr * backbone_lr_scale``
    (scale 0 freezes them: a linear probe trained by gradient)."""
    last = list(model.fc.parameters())
    ids = {id(p) for p in last}
    backbone = [p for p in model.parameters() if id(p) not in ids]
    if backbone_lr_scale == 0:
        for p in backbone:
            p.requires_grad_(False)
        return [{"params": last, "lr": lr}]
    return [{"params": last, "lr": lr}, {"params": backbone, "lr": lr * backbone_lr_scale}]


def run_epochs(model: nn.Module, loader, step_loss, config, *, optimizer, scheduler, scaler,
               device: torch.device, stage: str, progress: Progress | None = None) -> list[dict]:
    """The epochs of fine-tuning or distillation (``config``: a FinetuneConfig or
    DistillConfig): BatchNorm frozen unless ``config.batchnorm == "train"``, ``progress`` told
    ``{stage, epoch, epochs, loss}`` after each; every parameter trainable again at the end
    (a frozen encoder, ``backbone_lr_scale=0``, must not stay frozen in the saved model).
    Returns the history ``[{epoch, loss}]``."""
    what = "fine-tuning" if stage == "finetune" else "distillation"
    history = []
    for epoch in range(config.epochs):
        result = train_one_epoch(
            model, loader, step_loss, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
            device=device, amp=config.amp, where=f"{what} epoch {epoch + 1}",
            grad_clip=config.grad_clip, frozen_batchnorm=config.batchnorm != "train")
        history.append({"epoch": epoch + 1, "loss": result["loss"]})
        if progress is not None:
            progress({"stage": stage, "epoch": epoch + 1, "epochs": config.epochs,
                      "loss": history[-1]["loss"]})
    for p in model.parameters():
        p.requires_grad_(True)
    return history


def train_network(model: Classifier, loader, step_loss, config: FinetuneConfig | DistillConfig,
                  pretrain_config: PretrainConfig, *, bn_images: np.ndarray, stage: str,
                  kind: str, device: torch.device, progress: Progress | None = None,
                  workers: int = 0, checkpoint_path: str | Path | None = None,
                  model_version: str = "") -> tuple[Classifier, dict]:
    """What fine-tuning and distillation share once their loader and loss are set (classes
    and findings alike): AdamW with the last layer at ``lr`` and the encoder at ``lr *
    backbone_lr_scale``, the schedule over every step, the epochs (``run_epochs``),
    BatchNorm statistics re-estimated on ``bn_images`` where the epochs trained them, eval
    mode, and the checkpoint (``kind``) when ``checkpoint_path`` is given. Returns the model
    and ``{history, final_loss}``."""
    optimizer = torch.optim.AdamW(_param_groups(model, config.lr, config.backbone_lr_scale),
                                  lr=config.lr, weight_decay=config.weight_decay)
    scheduler = _schedule(optimizer, config, len(loader) * config.epochs)
    scaler = new_scaler(device, config.amp)
    history = run_epochs(model, loader, step_loss, config, optimizer=optimizer,
                         scheduler=scheduler, scaler=scaler, device=device, stage=stage,
                         progress=progress)
    if config.batchnorm == "train":
        recalibrate_batchnorm(model, bn_images, pretrain_config, device=device, workers=workers)
    model.eval()
    if checkpoint_path is not None:
        save_classifier(checkpoint_path, model, pretrain_config, config, model.fc.out_features,
                        model_version=model_version, history=history, kind=kind)
    return model, {"history": history, "final_loss": history[-1]["loss"]}


def _light_augmentation(pretrain_config: PretrainConfig):
    """Milder than pretraining's views: large crops, less noise and blur."""
    return augmentation(replace(pretrain_config.augment_config(), crop_scale=(0.7, 1.0),
                                noise_p=0.2, blur_p=0.2))


def network_input(pretrain_config: PretrainConfig, config: FinetuneConfig,
                  images: np.ndarray) -> PretrainConfig:
    """The network's config (``network_config`` at ``config.input_scale``), checking that
    ``images`` were loaded at its size: a mismatch is a caller's mistake that would
    otherwise train at one size and predict at another."""
    net = network_config(pretrain_config, config.input_scale)
    if len(images) and images.shape[1] != net.image_size:
        raise TrainingError(f"fine-tuning at input_scale {config.input_scale} reads scans at "
                            f"{net.image_size} px; these are {images.shape[1]} px")
    return net


def finetune(
    pretrained: SimCLRModel,
    pretrain_config: PretrainConfig,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    config: FinetuneConfig,
    *,
    checkpoint_path: str | Path | None = None,
    model_version: str = "",
    device: str | None = None,
    progress: Progress | None = None,
    workers: int = 0,
) -> tuple[Classifier, dict]:
    """SimCLRv2 step 2. ``labels``: int64 ``(N,)`` class indices in ``0..num_classes-1``.

    ``images`` are at the network's size: ``network_config(pretrain_config,
    config.input_scale).image_size`` (the encoder's size times ``input_scale``); the
    checkpoint keeps that config, so the network reads every later scan at that size.
    ``progress`` gets ``{stage: "finetune", epoch, epochs, loss}`` after every epoch.
    Returns the classifier (eval mode) and ``{history, final_loss}``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(images) or len(labels) == 0:
        raise TrainingError("fine-tuning needs as many labels as images, and at least one")
    pretrain_config = network_input(pretrain_config, config, images)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise TrainingError("labels must be class indices in 0..num_classes-1")
    dev = pick_device(device)
    generator = seed_everything(config.seed)
    model = _classifier_from(pretrained, pretrain_config, num_classes, config.from_head_layer)
    model.to(dev)
    if config.batchnorm == "recalibrated":   # statistics of these scans, then fixed
        recalibrate_batchnorm(model, images, pretrain_config, device=dev, workers=workers)
    if config.head_init == "probe":
        fit_probe_layer(model, _features(model, images, pretrain_config, dev, workers),
                        labels, num_classes, c=config.probe_c,
                        balanced=config.class_balance != "none", seed=config.seed)
    transform = _light_augmentation(pretrain_config) if config.augment \
        else eval_transform(pretrain_config.augment_config())
    dataset = ImageArray(images, transform, labels)
    weight, sampler = None, None
    if config.class_balance == "weighted_loss":
        weight = class_weights(labels, num_classes).to(dev)
    elif config.class_balance == "sampler":
        per_class = class_weights(labels, num_classes).numpy()
        sampler = WeightedRandomSampler(torch.as_tensor(per_class[labels], dtype=torch.double),
                                        num_samples=len(labels), replacement=True,
                                        generator=generator)
    batch_size = min(config.batch_size, len(labels))
    loader = make_loader(dataset, batch_size, shuffle=True, generator=generator, sampler=sampler,
                         drop_last=len(labels) > batch_size, device=dev, workers=workers)
    criterion = supervised_loss(config, weight)

    def step_loss(batch):
        x, y = batch[0].to(dev), batch[1].to(dev)
        return criterion(model(x).float(), y), len(x)

    return train_network(model, loader, step_loss, config, pretrain_config, bn_images=images,
                         stage="finetune", kind="finetuned", device=dev, progress=progress,
                         workers=workers, checkpoint_path=checkpoint_path,
                         model_version=model_version)


@torch.no_grad()
def predict_proba(model: Classifier, images: np.ndarray, config: PretrainConfig, *,
                  batch_size: int = 256, device: str | None = None,
                  temperature: float = 1.0, workers: int = 0) -> np.ndarray:
    """Class probabilities ``float32 (N, num_classes)``."""
    dev = pick_device(device)
    model = model.to(dev).eval()
    loader = make_loader(ImageArray(images, eval_transform(config.augment_config())), batch_size,
                         shuffle=False, generator=None, device=dev, workers=workers)
    out = [torch.softmax(model(x.to(dev)).float() / temperature, dim=1).cpu().numpy()
           for x in loader]
    return np.concatenate(out) if out else np.zeros((0, model.fc.out_features), np.float32)


# --- step 3: distill -------------------------------------------------------------------


@torch.no_grad()
def _teacher_targets(teacher: Classifier, images: np.ndarray, pretrain_config: PretrainConfig,
                     config: DistillConfig, *, device=None, workers: int = 0) -> np.ndarray:
    """The teacher's softened probabilities, averaged over the clean scan and
    ``teacher_views - 1`` lightly augmented views (a test-time-augmented teacher is a better
    teacher than its single pass, which is what lets a student of the same size beat it)."""
    temperature = config.teacher_temperature or config.temperature
    clean = predict_proba(teacher, images, pretrain_config, device=device,
                          temperature=temperature, workers=workers)
    if config.teacher_views <= 1:
        return clean
    dev = pick_device(device)
    teacher = teacher.to(dev).eval()
    generator = torch.Generator().manual_seed(config.seed + 1)
    total = clean.astype(np.float64)
    transform = _light_augmentation(pretrain_config)
    for _ in range(config.teacher_views - 1):
        loader = make_loader(ImageArray(images, transform), 256, shuffle=False,
                             generator=generator, device=dev, workers=workers)
        total += np.concatenate([torch.softmax(teacher(x.to(dev)).float() / temperature,
                                               dim=1).cpu().numpy() for x in loader])
    return (total / config.teacher_views).astype(np.float32)


def distill(
    teacher: Classifier,
    pretrained: SimCLRModel,
    pretrain_config: PretrainConfig,
    unlabeled: np.ndarray,
    config: DistillConfig,
    *,
    labeled: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    checkpoint_path: str | Path | None = None,
    model_version: str = "",
    device: str | None = None,
    progress: Progress | None = None,
    workers: int = 0,
) -> tuple[Classifier, dict]:
    """SimCLRv2 step 3 (self-distillation, eq. 2): the student minimises the cross-entropy
    to the teacher's softened probabilities ``softmax(t(x)/T)`` on the unlabeled pool, plus
    ``labeled_weight`` times the labeled cross-entropy when labels are given.

    The student has the teacher's architecture and starts from the pretrained encoder
    (SimCLRv2 also trains students from scratch; starting from the SSL weights is cheaper
    on a CPU and keeps the same representation family).
    ``progress`` gets ``{stage: "distill", epoch, epochs, loss}`` after every epoch.
    """
    if len(unlabeled) == 0:
        raise TrainingError("distillation needs unlabeled scans")
    dev = pick_device(device)
    generator = seed_everything(config.seed)
    num_classes = teacher.fc.out_features
    soft = torch.from_numpy(_teacher_targets(teacher, unlabeled, pretrain_config, config,
                                             device=device, workers=workers))
    student = _classifier_from(pretrained, pretrain_config, num_classes, teacher.from_head_layer)
    if config.student_init == "teacher":      # start where the teacher ended, then refine
        student.load_state_dict(teacher.state_dict())
    student.to(dev)
    transform = _light_augmentation(pretrain_config) if config.augment \
        else eval_transform(pretrain_config.augment_config())
    loader = make_loader(ImageArray(unlabeled, transform, soft),
                         min(config.batch_size, len(unlabeled)), shuffle=True,
                         generator=generator, drop_last=len(unlabeled) > config.batch_size,
                         device=dev, workers=workers)
    labeled_iter = None
    if labeled is not None and labels is not None and len(labeled) and config.labeled_weight > 0:
        labeled_loader = make_loader(ImageArray(labeled, transform, np.asarray(labels, np.int64)),
                                     min(config.batch_size, len(labeled)), shuffle=True,
                                     generator=generator, device=dev, workers=workers)
        labeled_iter = cycle(labeled_loader)

    def step_loss(batch):
        x, target = batch[0].to(dev), batch[1].to(dev)
        loss = soft_target_loss(student(x).float(), target, config.temperature)
        if labeled_iter is not None:
            lx, ly = next(labeled_iter)
            supervised = F.cross_entropy(student(lx.to(dev)).float(), ly.to(dev))
            loss = (1 - config.labeled_weight) * loss + config.labeled_weight * supervised
        return loss, len(x)

    return train_network(student, loader, step_loss, config, pretrain_config,
                         bn_images=unlabeled, stage="distill", kind="distilled", device=dev,
                         progress=progress, workers=workers, checkpoint_path=checkpoint_path,
                         model_version=model_version)
