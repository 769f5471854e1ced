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

Every run writes a checkpoint holding state dicts, optimizer, epoch, the frozen config and a
``model_version``; loading uses ``torch.load(weights_only=True)``. A non-finite loss stops the
run with ``TrainingError``. Mixed precision and a GPU are used when one is present.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from ml_backend.ssl.encoder import ResNetEncoder
from ml_backend.ssl.heads import ProjectionHead
from ml_backend.ssl.losses import NTXentLoss
from ml_backend.ssl.transforms import AugmentConfig, TwoViews, augmentation, eval_transform

Progress = Callable[[dict], None]


class TrainingError(Exception):
    """Training cannot go on (non-finite loss, bad data, incompatible checkpoint)."""


# --- configs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainConfig:
    arch: str = "resnet18"
    image_size: int = 64
    small_input: bool | None = None          # None: True when image_size <= 32 (MedMNIST)
    proj_hidden_dim: int = 512
    proj_out_dim: int = 128
    proj_layers: int = 3
    temperature: float = 0.2
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    seed: int = 0
    amp: bool = True                          # only takes effect on a GPU
    hflip: bool = False
    augment: dict = field(default_factory=dict)   # overrides of AugmentConfig fields

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("epochs must be >= 1 and batch_size >= 2")
        if self.lr <= 0 or self.temperature <= 0:
            raise ValueError("lr and temperature must be positive")

    @property
    def uses_small_input(self) -> bool:
        return self.image_size <= 32 if self.small_input is None else self.small_input

    def augment_config(self) -> AugmentConfig:
        return AugmentConfig(size=self.image_size, hflip=self.hflip, **self.augment)


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 1e-4
    schedule: str = "cosine"                 # cosine | onecycle
    grad_clip: float = 1.0
    loss: str = "ce"                          # ce | focal
    focal_gamma: float = 2.0
    class_balance: str = "weighted_loss"      # weighted_loss | sampler | none
    from_head_layer: int = 1                  # SimCLRv2: fine-tune from the first head layer
    label_smoothing: float = 0.0
    augment: bool = True
    seed: int = 0
    amp: bool = True

    def __post_init__(self):
        if self.schedule not in ("cosine", "onecycle"):
            raise ValueError("schedule must be cosine or onecycle")
        if self.loss not in ("ce", "focal"):
            raise ValueError("loss must be ce or focal")
        if self.class_balance not in ("weighted_loss", "sampler", "none"):
            raise ValueError("class_balance must be weighted_loss, sampler or none")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")


@dataclass(frozen=True)
class DistillConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 3e-4
    weight_decay: float = 1e-4
    temperature: float = 1.0                  # softening of the teacher's logits
    labeled_weight: float = 0.5               # alpha in (1-a)*distill + a*labeled CE
    grad_clip: float = 1.0
    seed: int = 0
    amp: bool = True

    def __post_init__(self):
        if self.temperature <= 0 or not 0 <= self.labeled_weight <= 1:
            raise ValueError("temperature must be positive and labeled_weight in [0, 1]")


def config_from_dict(cls, data: dict):
    """Rebuild a config dataclass from a checkpoint's dict, ignoring unknown keys."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names})


# --- models ----------------------------------------------------------------------------


class SimCLRModel(nn.Module):
    def __init__(self, config: PretrainConfig):
        super().__init__()
        self.encoder = ResNetEncoder(config.arch, small_input=config.uses_small_input)
        self.head = ProjectionHead(self.encoder.feature_dim, config.proj_hidden_dim,
                                   config.proj_out_dim, config.proj_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class Classifier(nn.Module):
    """Encoder + the first ``from_head_layer`` projection layers + a linear layer.

    ``forward``: ``(B, 1, S, S)`` → logits ``(B, num_classes)``.
    """

    def __init__(self, pretrain_config: PretrainConfig, num_classes: int, from_head_layer: int = 1):
        super().__init__()
        if num_classes < 2:
            raise ValueError("a classifier needs at least 2 classes")
        base = SimCLRModel(pretrain_config)
        if not 0 <= from_head_layer <= base.head.num_layers:
            raise ValueError(f"from_head_layer must be in 0..{base.head.num_layers}")
        self.encoder = base.encoder
        self.head = base.head
        self.from_head_layer = from_head_layer
        self.fc = nn.Linear(base.head.output_dim(from_head_layer), num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x), upto=self.from_head_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


# --- data ------------------------------------------------------------------------------


class _Images(Dataset):
    """uint8 ``(N, H, W)`` → float ``(1, H, W)`` in [0, 1], through ``transform``."""

    def __init__(self, images: np.ndarray, transform, targets: np.ndarray | None = None,
                 flip_mask: np.ndarray | None = None):
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError("images must be a uint8 array of shape (N, H, W)")
        if flip_mask is not None and len(flip_mask) != len(images):
            raise ValueError("flip_mask needs one entry per image")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.transform = transform
        self.targets = None if targets is None else torch.as_tensor(targets)
        self.flip_mask = None if flip_mask is None else np.asarray(flip_mask, dtype=bool)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        x = self.images[index].unsqueeze(0).float().div_(255.0)
        if self.flip_mask is not None and self.flip_mask[index] and torch.rand(1).item() < 0.5:
            x = x.flip(-1)   # only where the scan's dataset says flips preserve anatomy
        x = self.transform(x)
        if self.targets is None:
            return x
        return x, self.targets[index]


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _seed(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    return torch.Generator().manual_seed(seed)


def _loader(dataset, batch_size, *, shuffle, generator, sampler=None, drop_last=False,
            device=None):
    workers = int(os.environ.get("MEDLABEL_DATALOADER_WORKERS", "0"))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, generator=generator, drop_last=drop_last,
                      num_workers=workers, pin_memory=device is not None and device.type == "cuda",
                      persistent_workers=workers > 0)


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if device.type == "cpu"
                          else torch.float16, enabled=enabled and device.type == "cuda")


def _clipped_step(loss, model, optimizer, scaler, scheduler, grad_clip: float) -> None:
    """Backward (scaled under AMP), clip the gradient norm, step optimizer and schedule."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


def _check_finite(loss: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss):
        raise TrainingError(f"non-finite loss ({loss.item()}) during {where}; "
                            "lower the learning rate or check the input scans")


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: np.ndarray, config: PretrainConfig, *,
                          device: torch.device, batch_size: int = 256) -> None:
    """Re-estimate every BatchNorm's running mean/variance as an exact average over
    ``images`` (deterministic eval transform).

    After few optimisation steps the running statistics (momentum 0.1) still sit near their
    initial values, so eval-mode outputs (embeddings, predictions) would be wrong; one
    forward pass over the data fixes them without changing any weight.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or len(images) == 0:
        return
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None          # cumulative moving average = exact mean over batches
    was_training = model.training
    model.train()
    loader = _loader(_Images(images, eval_transform(config.augment_config())),
                     max(2, min(batch_size, len(images))), shuffle=False, generator=None,
                     device=device)
    for batch in loader:
        if len(batch) > 1:             # BatchNorm1d needs more than one sample in train mode
            model(batch.to(device))
    for m, momentum in saved:
        m.momentum = momentum
    model.train(was_training)


# --- checkpoints -----------------------------------------------------------------------


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Write atomically: a crash never leaves a half-written checkpoint in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainingError(f"checkpoint not found: {path}") from None
    except (RuntimeError, ValueError, EOFError, OSError) as exc:
        raise TrainingError(f"cannot read checkpoint {path}: {exc}") from None


def load_encoder_weights(model: SimCLRModel, path: str | Path) -> str:
    """Start from a saved encoder: one of ours, or a torchvision ResNet state dict on disk.

    Returns a short description of what was loaded. 3-channel first convolutions are summed
    over channels (the usual greyscale adaptation); the classification layer is ignored.
    """
    state = load_checkpoint(path)
    if "encoder" in state:  # ours
        model.encoder.load_state_dict(state["encoder"])
        if "head" in state:
            try:
                model.head.load_state_dict(state["head"])
            except RuntimeError:
                return "encoder (head shape differs: new head)"
            return "encoder + projection head"
        return "encoder"
    state = state.get("state_dict", state)
    mapped = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("encoder.").removeprefix("net.")
        if key.startswith("fc."):
            continue
        if key == "conv1.weight" and value.shape[1] == 3:
            value = value.sum(dim=1, keepdim=True)
        mapped[key] = value
    own = model.encoder.net.state_dict()
    usable = {k: v for k, v in mapped.items() if k in own and own[k].shape == v.shape}
    if len(usable) < len(own) // 2:
        raise TrainingError(f"{path} does not look like a {model.encoder.arch} state dict "
                            f"({len(usable)} of {len(own)} tensors match)")
    model.encoder.net.load_state_dict(usable, strict=False)
    return f"torchvision-style weights ({len(usable)}/{len(own)} tensors)"


# --- step 1: pretrain ------------------------------------------------------------------


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
) -> dict:
    """Contrastive pretraining. ``images``: ``uint8 (N, S, S)`` at ``config.image_size``.

    ``hflip_mask`` (bool per image) allows horizontal flips per scan, e.g. per dataset;
    without it ``config.hflip`` applies to all. Resumes from ``checkpoint_path`` when it
    exists and ``resume`` is set (same config). Returns the final metrics; the checkpoint
    holds encoder + head.
    """
    if len(images) < config.batch_size and len(images) < 2:
        raise TrainingError("pretraining needs at least 2 scans")
    dev = pick_device(device)
    generator = _seed(config.seed)
    model = SimCLRModel(config).to(dev)
    batch_size = min(config.batch_size, len(images))
    aug = config.augment_config()
    if hflip_mask is not None:
        aug = replace(aug, hflip=False)   # the mask decides per image
    loader = _loader(_Images(images, TwoViews(aug), flip_mask=hflip_mask), batch_size,
                     shuffle=True, generator=generator, drop_last=True, device=dev)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    warmup = max(1, int(config.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup)
        * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    criterion = NTXentLoss(config.temperature)
    scaler = torch.amp.GradScaler(enabled=config.amp and dev.type == "cuda")
    start_epoch, history, note = 0, [], ""

    checkpoint_path = Path(checkpoint_path)
    if resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        if state.get("config") != asdict(config):
            raise TrainingError(f"{checkpoint_path} was made with a different config; "
                                "remove it or pass resume=False")
        model.encoder.load_state_dict(state["encoder"])
        model.head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"], list(state.get("history", []))
        note = f"resumed at epoch {start_epoch}"
    elif init_checkpoint:
        note = "initialised from " + load_encoder_weights(model, init_checkpoint)
    model.to(dev)

    for epoch in range(start_epoch, config.epochs):
        model.train()
        started, seen, total = time.perf_counter(), 0, 0.0
        for step, (view_a, view_b) in enumerate(loader, start=1):
            view_a, view_b = view_a.to(dev, non_blocking=True), view_b.to(dev, non_blocking=True)
            with _autocast(dev, config.amp):
                z = model(torch.cat([view_a, view_b]))
                loss = criterion(*z.float().chunk(2))
            _check_finite(loss, f"pretraining epoch {epoch + 1}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            seen += len(view_a)
            total += loss.item() * len(view_a)
            if progress is not None:
                elapsed = time.perf_counter() - started
                progress({"stage": "pretrain", "epoch": epoch + 1, "epochs": config.epochs,
                          "step": step, "steps": steps_per_epoch, "loss": loss.item(),
                          "images_per_s": seen / max(elapsed, 1e-9)})
        elapsed = time.perf_counter() - started
        history.append({"epoch": epoch + 1, "loss": total / max(seen, 1),
                        "images_per_s": seen / max(elapsed, 1e-9), "seconds": elapsed})
        save_checkpoint(checkpoint_path, {
            "kind": "simclr_encoder", "model_version": model_version, "config": asdict(config),
            "encoder": model.encoder.state_dict(), "head": model.head.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch + 1, "history": history,
        })
    recalibrate_batchnorm(model, images, config, device=dev)
    save_checkpoint(checkpoint_path, {
        "kind": "simclr_encoder", "model_version": model_version, "config": asdict(config),
        "encoder": model.encoder.state_dict(), "head": model.head.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "epoch": config.epochs, "history": history, "batchnorm_recalibrated": True,
    })
    return {"epochs": config.epochs, "history": history, "note": note,
            "final_loss": history[-1]["loss"] if history else None, "device": dev.type}


def load_pretrained(path: str | Path) -> tuple[SimCLRModel, PretrainConfig]:
    state = load_checkpoint(path)
    if "encoder" not in state or "config" not in state:
        raise TrainingError(f"{path} is not a SimCLR encoder checkpoint")
    config = config_from_dict(PretrainConfig, state["config"])
    model = SimCLRModel(config)
    model.encoder.load_state_dict(state["encoder"])
    model.head.load_state_dict(state["head"])
    return model.eval(), config


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
) -> np.ndarray:
    """Encoder features ``float32 (N, feature_dim)`` for ``uint8 (N, S, S)`` images."""
    dev = pick_device(device)
    encoder = encoder.to(dev).eval()
    loader = _loader(_Images(images, eval_transform(config.augment_config())), batch_size,
                     shuffle=False, generator=None, device=dev)
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


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 over present classes; absent classes get 0."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / (counts > 0).sum(), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def focal_loss(logits, targets, *, gamma: float, weight=None, label_smoothing: float = 0.0):
    """Lin et al. (2017): ``(1 - p_t)^gamma`` times the (weighted) cross-entropy."""
    ce = F.cross_entropy(logits, targets, weight=weight, reduction="none",
                         label_smoothing=label_smoothing)
    p_t = torch.softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    return ((1 - p_t) ** gamma * ce).mean()


def _supervised_loss(config, weight):
    def compute(logits, targets):
        if config.loss == "focal":
            return focal_loss(logits, targets, gamma=config.focal_gamma, weight=weight,
                              label_smoothing=config.label_smoothing)
        return F.cross_entropy(logits, targets, weight=weight,
                               label_smoothing=config.label_smoothing)
    return compute


def _schedule(optimizer, config, total_steps):
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr,
                                                   total_steps=max(total_steps, 1))
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))


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
) -> tuple[Classifier, dict]:
    """SimCLRv2 step 2. ``labels``: int64 ``(N,)`` class indices in ``0..num_classes-1``."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(images) or len(labels) == 0:
        raise TrainingError("fine-tuning needs as many labels as images, and at least one")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise TrainingError("labels must be class indices in 0..num_classes-1")
    dev = pick_device(device)
    generator = _seed(config.seed)
    model = Classifier(pretrain_config, num_classes, config.from_head_layer)
    model.encoder.load_state_dict(pretrained.encoder.state_dict())
    model.head.load_state_dict(pretrained.head.state_dict())
    model.to(dev)
    aug = pretrain_config.augment_config()
    transform = augmentation(replace(aug, crop_scale=(0.7, 1.0), noise_p=0.2, blur_p=0.2)) \
        if config.augment else eval_transform(aug)
    dataset = _Images(images, transform, labels)
    weight, sampler = None, None
    if config.class_balance == "weighted_loss":
        weight = class_weights(labels, num_classes).to(dev)
    elif config.class_balance == "sampler":
        per_class = class_weights(labels, num_classes).numpy()
        sampler = WeightedRandomSampler(torch.as_tensor(per_class[labels], dtype=torch.double),
                                        num_samples=len(labels), replacement=True,
                                        generator=generator)
    batch_size = min(config.batch_size, len(labels))
    loader = _loader(dataset, batch_size, shuffle=True, generator=generator, sampler=sampler,
                     drop_last=len(labels) > batch_size, device=dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    scheduler = _schedule(optimizer, config, len(loader) * config.epochs)
    criterion = _supervised_loss(config, weight)
    scaler = torch.amp.GradScaler(enabled=config.amp and dev.type == "cuda")
    history = []
    for epoch in range(config.epochs):
        model.train()
        total, seen = 0.0, 0
        for x, y in loader:
            x, y = x.to(dev), y.to(dev)
            with _autocast(dev, config.amp):
                loss = criterion(model(x).float(), y)
            _check_finite(loss, f"fine-tuning epoch {epoch + 1}")
            _clipped_step(loss, model, optimizer, scaler, scheduler, config.grad_clip)
            total += loss.item() * len(x)
            seen += len(x)
        history.append({"epoch": epoch + 1, "loss": total / max(seen, 1)})
        if progress is not None:
            progress({"stage": "finetune", "epoch": epoch + 1, "epochs": config.epochs,
                      "loss": history[-1]["loss"]})
    recalibrate_batchnorm(model, images, pretrain_config, device=dev)
    model.eval()
    if checkpoint_path is not None:
        save_classifier(checkpoint_path, model, pretrain_config, config, num_classes,
                        model_version=model_version, history=history, kind="finetuned")
    return model, {"history": history, "final_loss": history[-1]["loss"]}


def save_classifier(path, model: Classifier, pretrain_config: PretrainConfig, config,
                    num_classes: int, *, model_version: str, history: list, kind: str) -> None:
    save_checkpoint(path, {
        "kind": kind, "model_version": model_version,
        "pretrain_config": asdict(pretrain_config), "config": asdict(config),
        "num_classes": num_classes, "from_head_layer": model.from_head_layer,
        "state": model.state_dict(), "history": history,
    })


def load_classifier(path: str | Path) -> tuple[Classifier, PretrainConfig]:
    state = load_checkpoint(path)
    if "state" not in state or "pretrain_config" not in state:
        raise TrainingError(f"{path} is not a classifier checkpoint")
    pretrain_config = config_from_dict(PretrainConfig, state["pretrain_config"])
    model = Classifier(pretrain_config, state["num_classes"], state["from_head_layer"])
    model.load_state_dict(state["state"])
    return model.eval(), pretrain_config


@torch.no_grad()
def predict_proba(model: Classifier, images: np.ndarray, config: PretrainConfig, *,
                  batch_size: int = 256, device: str | None = None,
                  temperature: float = 1.0) -> np.ndarray:
    """Class probabilities ``float32 (N, num_classes)``."""
    dev = pick_device(device)
    model = model.to(dev).eval()
    loader = _loader(_Images(images, eval_transform(config.augment_config())), batch_size,
                     shuffle=False, generator=None, device=dev)
    out = [torch.softmax(model(x.to(dev)).float() / temperature, dim=1).cpu().numpy()
           for x in loader]
    return np.concatenate(out) if out else np.zeros((0, model.fc.out_features), np.float32)


# --- step 3: distill -------------------------------------------------------------------


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
) -> tuple[Classifier, dict]:
    """SimCLRv2 step 3 (self-distillation, eq. 2): the student minimises the cross-entropy
    to the teacher's softened probabilities ``softmax(t(x)/T)`` on the unlabeled pool, plus
    ``labeled_weight`` times the labeled cross-entropy when labels are given.

    The student has the teacher's architecture and starts from the pretrained encoder
    (SimCLRv2 also trains students from scratch; starting from the SSL weights is cheaper
    on a CPU and keeps the same representation family).
    """
    if len(unlabeled) == 0:
        raise TrainingError("distillation needs unlabeled scans")
    dev = pick_device(device)
    generator = _seed(config.seed)
    num_classes = teacher.fc.out_features
    soft = torch.from_numpy(predict_proba(teacher, unlabeled, pretrain_config, device=device,
                                          temperature=config.temperature))
    student = Classifier(pretrain_config, num_classes, teacher.from_head_layer)
    student.encoder.load_state_dict(pretrained.encoder.state_dict())
    student.head.load_state_dict(pretrained.head.state_dict())
    student.to(dev)
    aug = pretrain_config.augment_config()
    transform = augmentation(replace(aug, crop_scale=(0.7, 1.0), noise_p=0.2, blur_p=0.2))
    pool = _Images(unlabeled, transform, soft)
    loader = _loader(pool, min(config.batch_size, len(unlabeled)), shuffle=True,
                     generator=generator, drop_last=len(unlabeled) > config.batch_size, device=dev)
    labeled_iter = None
    if labeled is not None and labels is not None and len(labeled) and config.labeled_weight > 0:
        labeled_loader = _loader(_Images(labeled, transform, np.asarray(labels, np.int64)),
                                 min(config.batch_size, len(labeled)), shuffle=True,
                                 generator=generator, device=dev)
        labeled_iter = _cycle(labeled_loader)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer,
                                                           T_max=max(len(loader) * config.epochs, 1))
    scaler = torch.amp.GradScaler(enabled=config.amp and dev.type == "cuda")
    history = []
    for epoch in range(config.epochs):
        student.train()
        total, seen = 0.0, 0
        for x, target in loader:
            x, target = x.to(dev), target.to(dev)
            with _autocast(dev, config.amp):
                log_p = F.log_softmax(student(x).float() / config.temperature, dim=1)
                loss = -(target * log_p).sum(dim=1).mean()
                if labeled_iter is not None:
                    lx, ly = next(labeled_iter)
                    supervised = F.cross_entropy(student(lx.to(dev)).float(), ly.to(dev))
                    loss = (1 - config.labeled_weight) * loss + config.labeled_weight * supervised
            _check_finite(loss, f"distillation epoch {epoch + 1}")
            _clipped_step(loss, student, optimizer, scaler, scheduler, config.grad_clip)
            total += loss.item() * len(x)
            seen += len(x)
        history.append({"epoch": epoch + 1, "loss": total / max(seen, 1)})
        if progress is not None:
            progress({"stage": "distill", "epoch": epoch + 1, "epochs": config.epochs,
                      "loss": history[-1]["loss"]})
    recalibrate_batchnorm(student, unlabeled, pretrain_config, device=dev)
    student.eval()
    if checkpoint_path is not None:
        save_classifier(checkpoint_path, student, pretrain_config, config, num_classes,
                        model_version=model_version, history=history, kind="distilled")
    return student, {"history": history, "final_loss": history[-1]["loss"]}


def _cycle(loader):
    while True:
        yield from loader
