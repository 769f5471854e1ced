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

from ml_backend.ssl.config import PretrainConfig, check_layers, check_scales, network_config

ARCHS = {"resnet18": (models.resnet18, 512), "resnet34": (models.resnet34, 512),
         "resnet50": (models.resnet50, 2048)}
# the channels of each residual stage's output (layer1 … layer4), per architecture
LAYER_DIMS = {"resnet18": (64, 128, 256, 512), "resnet34": (64, 128, 256, 512),
              "resnet50": (256, 512, 1024, 2048)}


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

    def pooled(self, x: torch.Tensor, layers) -> list[torch.Tensor]:
        """The globally average-pooled output of each residual stage in ``layers`` (1–4, in
        that order): ``[(B, LAYER_DIMS[arch][l - 1]) for l in layers]``. Stage 4's is what
        ``forward`` returns."""
        net, wanted, out = self.net, set(layers), {}
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        for number, stage in enumerate((net.layer1, net.layer2, net.layer3, net.layer4), 1):
            h = stage(h)
            if number in wanted:
                out[number] = torch.flatten(net.avgpool(h), 1)
        return [out[number] for number in sorted(wanted)]


class MultiScaleEncoder(nn.Module):
    """One encoder read at several sizes of the same scan, and at several of its stages, the
    pooled features side by side.

    The input is the scan at ``base * max(scales)`` pixels (``base``: the size the encoder
    was trained at); scale ``s`` sees it average-pooled by ``max(scales) // s``, so scale 1
    is the scan at the training size and scale 2 the same scan at twice the size, where the
    encoder's filters cover finer structure. At each scale the output of each residual
    stage in ``layers`` is average-pooled over the image (stage 4 alone: the encoder's own
    output; ``(3, 4)`` adds stage 3's, which keeps more of the scan's local texture).
    ``forward`` → ``(B, sum of the stages' widths * len(scales))``: per scale in increasing
    order, its stages in increasing order. No weights of its own: it is a way of reading a
    pretrained encoder (test-time multi-scale, multi-stage features), not a new network to
    train."""

    def __init__(self, encoder: nn.Module, scales, layers=(4,)):
        super().__init__()
        self.scales = check_scales(scales)
        self.layers = check_layers(layers)
        self.inner = encoder
        dims = LAYER_DIMS[encoder.arch]
        self.widths = [dims[layer - 1] for layer in self.layers]
        self.feature_dim = sum(self.widths) * len(self.scales)
        self.in_channels = encoder.in_channels

    def block(self, scale: int, layer: int = 4) -> slice:
        """The feature columns of stage ``layer`` read at ``scale``."""
        per_scale = sum(self.widths)
        k, j = self.scales.index(scale), self.layers.index(layer)
        start = k * per_scale + sum(self.widths[:j])
        return slice(start, start + self.widths[j])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = self.scales[-1]
        views = [x if s == top else nn.functional.avg_pool2d(x, top // s) for s in self.scales]
        return torch.cat([f for v in views for f in self.inner.pooled(v, self.layers)], dim=1)


def at_scales(encoder: nn.Module, config: PretrainConfig, scales, layers=(4,)
              ) -> tuple[nn.Module, PretrainConfig]:
    """``encoder`` and its ``config`` as they embed scans read at ``scales`` from its stages
    ``layers``: unchanged for ``(1,)`` and ``(4,)``, else a ``MultiScaleEncoder`` and the
    config of its input (the largest size; the stem of the training size kept)."""
    scales, layers = check_scales(scales), check_layers(layers)
    if scales == (1,) and layers == (4,):
        return encoder, config
    return (MultiScaleEncoder(encoder, scales, layers).eval(),
            network_config(config, scales[-1]))
