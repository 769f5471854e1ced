"""ResNet encoders adapted to single-channel scans of any size.

Chen et al., "Big Self-Supervised Models are Strong Semi-Supervised Learners" (SimCLRv2,
NeurIPS 2020) use ResNets; we build torchvision's (random init, no download) and change:

- the stem takes 1 channel for greyscale projects (X-ray, CT, MR) and 3 for colour ones
  (H&E, blood smears, dermatology): ``in_channels``;
- for small inputs (``small_input=True``, e.g. MedMNIST at 28 px) the 7x7 stride-2 stem and the
  max-pool are replaced by a 3x3 stride-1 convolution, as in SimCLR's CIFAR-10 setting, so a
  28 px scan still has a 4x4 feature map before the global pool;
- the classification layer is removed: ``forward`` returns pooled features ``(B, feature_dim)``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models

from ml_backend.ssl.config import PretrainConfig, check_scales, network_config

ARCHS = {"resnet18": (models.resnet18, 512), "resnet34": (models.resnet34, 512),
         "resnet50": (models.resnet50, 2048)}


class ResNetEncoder(nn.Module):
    def __init__(self, arch: str = "resnet18", *, in_channels: int = 1, small_input: bool = False):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        if in_channels < 1:
            raise ValueError("in_channels must be positive")
        builder, self.feature_dim = ARCHS[arch]
        net = builder(weights=None)
        if small_input:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        else:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        net.fc = nn.Identity()
        self.arch, self.in_channels, self.small_input = arch, in_channels, small_input
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, C, H, W)`` float → ``(B, feature_dim)``."""
        return self.net(x)


class MultiScaleEncoder(nn.Module):
    """One encoder read at several sizes of the same scan, its pooled features side by side.

    The input is the scan at ``base * max(scales)`` pixels (``base``: the size the encoder
    was trained at); scale ``s`` sees it average-pooled by ``max(scales) // s``, so scale 1
    is the scan at the training size and scale 2 the same scan at twice the size, where the
    encoder's filters cover finer structure. ``forward`` → ``(B, feature_dim * len(scales))``,
    the scales in increasing order. No weights of its own: it is a way of reading a
    pretrained encoder (test-time multi-scale features), not a new network to train."""

    def __init__(self, encoder: nn.Module, scales):
        super().__init__()
        self.scales = check_scales(scales)
        self.inner = encoder
        self.feature_dim = encoder.feature_dim * len(self.scales)
        self.in_channels = encoder.in_channels

    def block(self, scale: int) -> slice:
        """The feature columns of ``scale``."""
        d = self.inner.feature_dim
        k = self.scales.index(scale)
        return slice(k * d, (k + 1) * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = self.scales[-1]
        views = [x if s == top else nn.functional.avg_pool2d(x, top // s) for s in self.scales]
        return torch.cat([self.inner(v) for v in views], dim=1)


def at_scales(encoder: nn.Module, config: PretrainConfig, scales
              ) -> tuple[nn.Module, PretrainConfig]:
    """``encoder`` and its ``config`` as they embed scans read at ``scales``: unchanged for
    ``(1,)``, else a ``MultiScaleEncoder`` and the config of its input (the largest size; the
    stem of the training size kept)."""
    scales = check_scales(scales)
    if scales == (1,):
        return encoder, config
    return MultiScaleEncoder(encoder, scales).eval(), network_config(config, scales[-1])
