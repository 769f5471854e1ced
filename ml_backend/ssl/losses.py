"""NT-Xent, the normalized temperature-scaled cross-entropy of SimCLR (Chen et al., 2020, eq. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
