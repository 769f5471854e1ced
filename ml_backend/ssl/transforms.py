"""Anatomy-preserving augmentations that make the two views of SimCLR for greyscale scans.

Choices, and why (SimCLR's colour distortion and strong crops are made for natural images):

- **Random resized crop** with scale ``(0.5, 1.0)`` and aspect ratio ``(0.8, 1.25)``: a view
  still shows most of the anatomy, so the pathology (often small) is usually kept.
- **Small affine**: rotation ±10°, translation ±6%, scale 0.95–1.05 (patient positioning).
- **Intensity**: brightness ±0.2, contrast 0.8–1.25 and gamma 0.7–1.4: scanner and exposure
  differences between sites. No hue or saturation jitter: scans are greyscale.
- **Gaussian blur** (p=0.3, σ 0.1–1.5 px at 224 px, scaled with size) and **Gaussian noise**
  (p=0.3, σ ≤ 0.04): resolution and detector noise differences.
- **Horizontal flip only when the dataset allows it** (``hflip=True``): brain MRI is close to
  left-right symmetric, but a chest X-ray is not (heart on the left; a flip makes situs
  inversus). The Dataset row's ``hflip_allowed`` sets it per data source.
- No vertical flip, no large rotation, no cutout: each can turn a normal scan implausible.

Inputs are float tensors ``(1, H, W)`` in ``[0, 1]``; outputs ``(1, size, size)`` normalised
with ``mean``/``std``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torchvision.transforms import v2


@dataclass(frozen=True)
class AugmentConfig:
    size: int = 64
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (0.8, 1.25)
    rotation: float = 10.0
    translate: float = 0.06
    scale: tuple[float, float] = (0.95, 1.05)
    brightness: float = 0.2
    contrast: tuple[float, float] = (0.8, 1.25)
    gamma: tuple[float, float] = (0.7, 1.4)
    blur_p: float = 0.3
    noise_p: float = 0.3
    noise_std: float = 0.04
    hflip: bool = False
    mean: float = 0.5
    std: float = 0.25

    def __post_init__(self):
        if self.size < 8:
            raise ValueError("size must be at least 8 pixels")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError("crop_scale must satisfy 0 < low <= high <= 1")
        if not 0 <= self.blur_p <= 1 or not 0 <= self.noise_p <= 1:
            raise ValueError("probabilities must be in [0, 1]")
        if self.std <= 0:
            raise ValueError("std must be positive")

    def to_dict(self) -> dict:
        return asdict(self)


class _Intensity(torch.nn.Module):
    def __init__(self, config: AugmentConfig):
        super().__init__()
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        gamma = torch.empty(1).uniform_(*c.gamma).item()
        x = x.clamp(0, 1) ** gamma
        contrast = torch.empty(1).uniform_(*c.contrast).item()
        brightness = torch.empty(1).uniform_(-c.brightness, c.brightness).item()
        mean = x.mean()
        x = (x - mean) * contrast + mean + brightness
        if torch.rand(1).item() < c.noise_p:
            x = x + torch.randn_like(x) * torch.empty(1).uniform_(0, c.noise_std).item()
        return x.clamp(0, 1)


def augmentation(config: AugmentConfig) -> v2.Compose:
    """One random view of a ``(1, H, W)`` scan."""
    sigma_max = max(0.1, 1.5 * config.size / 224)
    kernel = max(3, (int(4 * sigma_max) // 2) * 2 + 1)
    steps = [
        v2.RandomResizedCrop(config.size, scale=config.crop_scale, ratio=config.crop_ratio,
                             antialias=True),
        v2.RandomAffine(degrees=config.rotation, translate=(config.translate, config.translate),
                        scale=config.scale),
    ]
    if config.hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [
        _Intensity(config),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, sigma_max))], p=config.blur_p),
        v2.Normalize([config.mean], [config.std]),
    ]
    return v2.Compose(steps)


def eval_transform(config: AugmentConfig) -> v2.Compose:
    """Deterministic resize + normalise, for embeddings and evaluation."""
    return v2.Compose([
        v2.Resize((config.size, config.size), antialias=True),
        v2.Normalize([config.mean], [config.std]),
    ])


class TwoViews:
    """``x -> (view_a, view_b)``, two independent augmentations of one scan."""

    def __init__(self, config: AugmentConfig):
        self.transform = augmentation(config)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(x), self.transform(x)
