"""The training loop shared by pretraining, fine-tuning and distillation, and its helpers.

``train_one_epoch`` runs one pass over a loader: forward under autocast (mixed precision on
a GPU only), a non-finite loss stops the run with ``TrainingError``, backward through the
AMP ``GradScaler``, optional gradient-norm clipping, optimizer and per-step scheduler step.
What differs between the three steps (batch layout, loss) is the ``step_loss`` callable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ml_backend.errors import TrainingError
from ml_backend.ssl.config import PretrainConfig
from ml_backend.ssl.images import ImageArray, make_loader
from ml_backend.ssl.transforms import eval_transform

Progress = Callable[[dict], None]


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's and numpy's global generators; return a generator for the loaders."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    return torch.Generator().manual_seed(seed)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX): where it does not,
    bf16 autocast is emulated and slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast(device: torch.device, enabled: bool, *, cpu_bf16: bool = False):
    """Mixed precision when ``enabled``: float16 on a GPU; on a CPU bfloat16 only when
    ``cpu_bf16`` and the CPU has native bf16 (about 1.8x the images/s of float32 on an
    AVX512-BF16 EPYC, see docs/benchmarks.md); otherwise a no-op context."""
    if device.type == "cpu":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16,
                              enabled=enabled and cpu_bf16 and cpu_has_bf16())
    return torch.autocast(device_type=device.type, dtype=torch.float16,
                          enabled=enabled and device.type == "cuda")


def check_finite(loss: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss):
        raise TrainingError(f"non-finite loss ({loss.item()}) during {where}; "
                            "lower the learning rate or check the input scans")


def new_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(enabled=amp and device.type == "cuda")


def cycle(loader: DataLoader) -> Iterator:
    """Batches of ``loader`` forever (a new pass, reshuffled, after each)."""
    while True:
        yield from loader


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    step_loss: Callable[[Any], tuple[torch.Tensor, int]],
    *,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    amp: bool,
    where: str,
    grad_clip: float | None = None,
    progress: Progress | None = None,
    event: dict | None = None,
    cpu_bf16: bool = False,
    after_step: Callable[[int], None] | None = None,
    frozen_batchnorm: bool = False,
) -> dict[str, float]:
    """One pass over ``loader``; returns ``loss`` (mean per image), ``images``, ``seconds``
    and ``images_per_s``.

    ``step_loss(batch)`` moves the batch to the device and returns ``(loss, images in the
    batch)``; it runs under autocast. ``where`` names the epoch in the non-finite loss error.
    ``grad_clip``: clip the gradient norm to it (None: no clipping). With ``progress`` and
    ``event``, every step reports ``{**event, "step", "steps", "loss", "images_per_s"}``.
    ``frozen_batchnorm``: BatchNorm layers stay in eval mode (their running statistics are
    used and kept; their affine weights still learn).
    """
    model.train()
    if frozen_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    started, seen, total = time.perf_counter(), 0, 0.0
    steps = len(loader)
    for step, batch in enumerate(loader, start=1):
        with autocast(device, amp, cpu_bf16=cpu_bf16):
            loss, images = step_loss(batch)
        check_finite(loss, where)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if after_step is not None:
            after_step(step)          # e.g. a momentum network follows the weights
        seen += images
        total += loss.item() * images
        if progress is not None and event is not None:
            elapsed = time.perf_counter() - started
            progress({**event, "step": step, "steps": steps, "loss": loss.item(),
                      "images_per_s": seen / max(elapsed, 1e-9)})
    elapsed = time.perf_counter() - started
    return {"loss": total / max(seen, 1), "images": seen, "seconds": elapsed,
            "images_per_s": seen / max(elapsed, 1e-9)}


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: np.ndarray, config: PretrainConfig, *,
                          device: torch.device, batch_size: int = 256, workers: int = 0) -> None:
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
    loader = make_loader(ImageArray(images, eval_transform(config.augment_config())),
                         max(2, min(batch_size, len(images))), shuffle=False, generator=None,
                         device=device, workers=workers)
    for batch in loader:
        if len(batch) > 1:             # BatchNorm1d needs more than one sample in train mode
            model(batch.to(device))
    for m, momentum in saved:
        m.momentum = momentum
    model.train(was_training)
