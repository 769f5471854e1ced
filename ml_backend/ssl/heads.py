"""SimCLRv2 projection head (3 layers) and a linear classifier head.

SimCLRv2 (Chen et al., 2020, section 2) uses a deeper projection head than SimCLR and
fine-tunes "from the middle layer" of it: the first projection layer is kept as part of the
encoder when fine-tuning. ``ProjectionHead.forward(x, upto=1)`` returns that layer's output.
"""

from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """``num_layers`` Linear→BN(→ReLU) blocks; the last has no ReLU.

    Shapes: ``(B, in_dim)`` → ``(B, out_dim)``; intermediate layers have ``hidden_dim`` units.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128,
                 num_layers: int = 3):
        super().__init__()
        if num_layers < 1:
            raise ValueError("num_layers must be at least 1")
        if min(in_dim, hidden_dim, out_dim) < 1:
            raise ValueError("dimensions must be positive")
        blocks = []
        dim = in_dim
        for index in range(num_layers):
            last = index == num_layers - 1
            width = out_dim if last else hidden_dim
            layers = [nn.Linear(dim, width, bias=False), nn.BatchNorm1d(width)]
            if not last:
                layers.append(nn.ReLU(inplace=True))
            blocks.append(nn.Sequential(*layers))
            dim = width
        self.blocks = nn.ModuleList(blocks)
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def output_dim(self, upto: int | None = None) -> int:
        upto = self.num_layers if upto is None else upto
        if upto == 0:
            return self.in_dim
        return self.out_dim if upto == self.num_layers else self.hidden_dim

    def forward(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        upto = self.num_layers if upto is None else upto
        if not 0 <= upto <= self.num_layers:
            raise ValueError(f"upto must be in 0..{self.num_layers}")
        for block in self.blocks[:upto]:
            x = block(x)
        return x
