"""The two networks of SimCLRv2: encoder + projection head, and the classifier built on it."""

from __future__ import annotations

import torch
from torch import nn

from ml_backend.ssl.config import PretrainConfig
from ml_backend.ssl.encoder import ResNetEncoder
from ml_backend.ssl.heads import ProjectionHead


class SimCLRModel(nn.Module):
    """Encoder + projection head of ``config``: ``(B, C, S, S)`` → ``(B, proj_out_dim)``
    (``C = config.channels``: 1 greyscale, 3 colour)."""

    def __init__(self, config: PretrainConfig):
        super().__init__()
        self.encoder = ResNetEncoder(config.arch, in_channels=config.channels,
                                     small_input=config.uses_small_input)
        self.head = ProjectionHead(self.encoder.feature_dim, config.proj_hidden_dim,
                                   config.proj_out_dim, config.proj_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class Classifier(nn.Module):
    """Encoder + the first ``from_head_layer`` projection layers + a linear layer.

    ``forward``: ``(B, C, S, S)`` → logits ``(B, num_classes)``.
    """

    def __init__(self, pretrain_config: PretrainConfig, num_classes: int, from_head_layer: int = 1):
        super().__init__()
        if num_classes < 2:
            raise ValueError("a classifier needs at least 2 classes")
        base = SimCLRModel(pretrain_config)
        if pretrain_config.method != "simclr":
            from_head_layer = 0     # only SimCLRv2's projection head is kept with the encoder
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
