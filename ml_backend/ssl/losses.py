"""The losses of SimCLRv2's three steps.

- ``NTXentLoss``: the normalized temperature-scaled cross-entropy of SimCLR (Chen et al.,
  2020, eq. 1), for pretraining;
- ``supervised_loss``: (class-weighted, label-smoothed) cross-entropy or ``focal_loss`` for
  fine-tuning, with ``class_weights`` against class imbalance;
- ``soft_target_loss``: cross-entropy to a teacher's softened probabilities, for
  self-distillation (SimCLRv2, eq. 2).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ml_backend.ssl.config import FinetuneConfig


class NTXentLoss(nn.Module):
    """For a batch of ``N`` pairs ``(z_a[i], z_b[i])``, each of the ``2N`` views must pick its
    partner among the other ``2N - 1`` views by cosine similarity / ``temperature``.

    ``forward(z_a, z_b)`` with shapes ``(N, D)`` returns the mean loss over the ``2N`` views.
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if not temperature > 0:
            raise ValueError("temperature must be positive")
        self.temperature = temperature

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        if z_a.shape != z_b.shape or z_a.ndim != 2:
            raise ValueError(f"expected two (N, D) tensors, got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
        n = z_a.shape[0]
        if n < 2:
            raise ValueError("NT-Xent needs at least 2 pairs per batch")
        z = F.normalize(torch.cat([z_a, z_b], dim=0).float(), dim=1)
        logits = z @ z.t() / self.temperature
        logits.fill_diagonal_(float("-inf"))       # a view is not its own candidate
        targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(logits, targets)


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


def supervised_loss(config: FinetuneConfig, weight: torch.Tensor | None = None
                    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(logits, targets)`` as ``config`` asks: cross-entropy or focal loss, with class
    ``weight`` and ``config.label_smoothing``."""
    def compute(logits, targets):
        if config.loss == "focal":
            return focal_loss(logits, targets, gamma=config.focal_gamma, weight=weight,
                              label_smoothing=config.label_smoothing)
        return F.cross_entropy(logits, targets, weight=weight,
                               label_smoothing=config.label_smoothing)
    return compute


def soft_target_loss(logits: torch.Tensor, soft_targets: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
    """Mean cross-entropy between ``soft_targets`` (probabilities ``(B, C)``) and
    ``softmax(logits / temperature)``."""
    log_p = F.log_softmax(logits / temperature, dim=1)
    return -(soft_targets * log_p).sum(dim=1).mean()


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, *,
               pos_weight: torch.Tensor | None = None, focal_gamma: float = 0.0
               ) -> torch.Tensor:
    """Binary cross-entropy per (scan, finding), averaged over the known answers only:
    ``targets`` holds 1 / 0 (or soft probabilities) and NaN where the answer is unknown.
    ``pos_weight`` (F,) up-weights each finding's positives; ``focal_gamma > 0`` multiplies
    each term by ``(1 - p_t)^gamma`` (binary focal loss, Lin et al. 2017)."""
    known = ~torch.isnan(targets)
    y = torch.where(known, targets, torch.zeros_like(targets))
    loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight,
                                              reduction="none")
    if focal_gamma > 0:
        p = torch.sigmoid(logits)
        p_t = p * y + (1 - p) * (1 - y)
        loss = (1 - p_t) ** focal_gamma * loss
    return (loss * known).sum() / known.sum().clamp(min=1)


def findings_pos_weight(targets: np.ndarray, cap: float = 50.0) -> torch.Tensor:
    """Per finding ``negatives / positives`` among the known answers (1 where a finding has
    no known positive), capped: the multi-label counterpart of class-balanced weights."""
    t = np.asarray(targets, dtype=np.float64)
    positives = np.nansum(t == 1, axis=0)
    negatives = np.nansum(t == 0, axis=0)
    weight = np.where(positives > 0, negatives / np.maximum(positives, 1), 1.0)
    return torch.tensor(np.clip(weight, 1.0 / cap, cap), dtype=torch.float32)
