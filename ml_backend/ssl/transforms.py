"""Anatomy-preserving augmentations that make the two views of SimCLR, for greyscale scans
and for colour ones (stained tissue, blood smears, photographs).

Choices, and why (SimCLR's colour distortion and strong crops are made for natural images):

- **Random resized crop** with scale ``(0.5, 1.0)`` and aspect ratio ``(0.8, 1.25)``: a view
  still shows most of the anatomy, so the pathology (often small) is usually kept.
- **Small affine**: rotation ±10°, translation ±6%, scale 0.95–1.05 (patient positioning).
- **Intensity**: brightness ±0.2, contrast 0.8–1.25 and gamma 0.7–1.4: scanner and exposure
  differences between sites, applied alike to every channel of a colour image.
- **Colour, only for colour projects** (``channels=3``; never on greyscale, where there is
  no colour to vary): in colour the hue often *is* the finding (eosinophil granules are
  orange-red, basophils dark purple; haematoxylin stains nuclei blue-purple, eosin stroma
  pink), so SimCLR's strong colour distortion (hue ±0.5, greyscale conversion) would teach
  the encoder to ignore it. We vary colour only as far as staining and scanners do:
  ``colour="stain"`` jitters the stains in HED space (Tellez et al., "Whole-slide mitosis
  detection in H&E breast histology using PHH3 as a reference to train distilled
  stain-invariant convolutional networks", IEEE TMI 2018: each of haematoxylin, eosin and
  DAB optical densities scaled by U(1-σ, 1+σ) and shifted by U(-σ, σ), σ = 0.05, the
  "light" setting) and adds a bounded hue (±0.04) and saturation (±25%) jitter;
  ``colour="jitter"`` only the bounded hue/saturation jitter (dermatology, fundus,
  endoscopy photographs). No greyscale conversion, no large hue shift.
- **Gaussian blur** (p=0.3, σ 0.1–1.5 px at 224 px, scaled with size) and **Gaussian noise**
  (p=0.3, σ ≤ 0.04): resolution and detector noise differences.
- **Horizontal flip only when the dataset allows it** (``hflip=True``): brain MRI is close to
  left-right symmetric, but a chest X-ray is not (heart on the left; a flip makes situs
  inversus). The Dataset row's ``hflip_allowed`` sets it per data source.
- No vertical flip, no large rotation, no cutout: each can turn a normal scan implausible.

Inputs are float tensors ``(C, H, W)`` in ``[0, 1]`` (C = 1 or 3); outputs ``(C, size,
size)`` normalised with ``mean``/``std`` on every channel.
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
    channels: int = 1
    colour: str = "none"                      # stain | jitter | none (colour input only)
    hue: float = 0.04
    saturation: float = 0.25
    stain_sigma: float = 0.05

    def __post_init__(self):
        if self.size < 8:
            raise ValueError("size must be at least 8 pixels")
        if self.channels not in (1, 3):
            raise ValueError("channels must be 1 or 3")
        if self.colour not in ("stain", "jitter", "none"):
            raise ValueError("colour must be stain, jitter or none")
        if self.colour != "none" and self.channels != 3:
            raise ValueError("colour augmentations need 3-channel (colour) input")
        if not 0 <= self.hue <= 0.5 or not 0 <= self.saturation < 1 or not 0 <= self.stain_sigma < 1:
            raise ValueError("hue must be in [0, 0.5], saturation and stain_sigma in [0, 1)")
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


# Ruifrok & Johnston's stain vectors (as scikit-image's rgb2hed): rows H, E, DAB in RGB
# optical density.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_OD_FLOOR = 1e-6


def rgb_to_hed(x: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` RGB in [0, 1] → HED stain optical densities ``(3, H, W)``."""
    od = -torch.log(x.clamp(min=_OD_FLOOR))
    return torch.einsum("chw,cd->dhw", od, _HED_FROM_RGB.to(x.dtype))


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    od = torch.einsum("dhw,dc->chw", hed, _RGB_FROM_HED.to(hed.dtype))
    return torch.exp(-od).clamp(0, 1)


class StainJitter(torch.nn.Module):
    """H&E stain augmentation in HED space (Tellez et al. 2018): per stain, optical density
    ``od * U(1-σ, 1+σ) + U(-σ, σ)``. A per-pixel colour map: where the input is the same
    colour the output is too, shapes and positions never move. σ = 0 is the identity."""

    def __init__(self, sigma: float = 0.05):
        super().__init__()
        self.sigma = float(sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sigma == 0 or x.shape[0] != 3:
            return x
        alpha = torch.empty(3, 1, 1).uniform_(1 - self.sigma, 1 + self.sigma)
        beta = torch.empty(3, 1, 1).uniform_(-self.sigma, self.sigma)
        return hed_to_rgb(rgb_to_hed(x) * alpha + beta)


def colour_steps(config: AugmentConfig) -> list:
    """The colour augmentations of ``config`` (none for greyscale)."""
    if config.colour == "none":
        return []
    steps = []
    if config.colour == "stain" and config.stain_sigma > 0:
        steps.append(StainJitter(config.stain_sigma))
    if config.hue > 0 or config.saturation > 0:
        steps.append(v2.RandomApply([v2.ColorJitter(
            saturation=(1 - config.saturation, 1 + config.saturation) if config.saturation
            else None, hue=config.hue or None)], p=0.8))
    return steps


def augmentation(config: AugmentConfig) -> v2.Compose:
    """One random view of a ``(C, H, W)`` scan."""
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
    steps += colour_steps(config)
    steps += [
        _Intensity(config),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, sigma_max))], p=config.blur_p),
        v2.Normalize([config.mean] * config.channels, [config.std] * config.channels),
    ]
    return v2.Compose(steps)


def eval_transform(config: AugmentConfig) -> v2.Compose:
    """Deterministic resize + normalise, for embeddings and evaluation."""
    return v2.Compose([
        v2.Resize((config.size, config.size), antialias=True),
        v2.Normalize([config.mean] * config.channels, [config.std] * config.channels),
    ])


class TwoViews:
    """``x -> (view_a, view_b)``, two independent augmentations of one scan."""

    def __init__(self, config: AugmentConfig):
        self.transform = augmentation(config)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(x), self.transform(x)
