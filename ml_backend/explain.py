"""Grad-CAM (Selvaraju et al., ICCV 2017) for our ResNet encoders: where in the scan the
evidence for a class lies.

The class score is differentiated with respect to a convolutional feature map; the channel
weights are the spatially averaged gradients, and the map is the
ReLU of the weighted channel sum, upsampled to the input and min-max scaled to ``[0, 1]``. The map is the deepest
ResNet stage that still has at least ``min_side`` cells a side: ``layer4`` at 224 px input,
but at the 32–64 px our CPU models use, ``layer4`` is 1×1 or 2×2 and says nothing about
*where*, so an earlier stage (``layer2`` at 64 px, 8×8) is used, as is common for
low-resolution Grad-CAM. ``score``
maps pooled encoder features to class logits, so the same code explains the fast linear head
on frozen embeddings and the fine-tuned classifier. Pure: torch + numpy, no Django.

``method="layercam"`` (the default for the label page) is LayerCAM (Jiang et al., "LayerCAM:
Exploring Hierarchical Class Activation Maps for Localization", IEEE TIP 2021): each cell is
weighted by its own positive gradient instead of the channel's average, which keeps shallow
stages meaningful, and the maps of ``layer1`` and ``layer2`` (16×16 and 8×8 at 64 px) are
each scaled to ``[0, 1]`` and averaged at the input size. That is twice Grad-CAM's resolution
at our input sizes, without running the encoder at a size it was not trained for.
``method="gradcam"`` is the plain map of one stage.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ml_backend.ssl.encoder import ResNetEncoder
from ml_backend.ssl.transforms import eval_transform

Score = Callable[[torch.Tensor], torch.Tensor]


STAGES = ("layer1", "layer2", "layer3", "layer4")


def _forward_keeping(encoder: ResNetEncoder, x: torch.Tensor, min_side: int):
    """Pooled features, and the deepest stage output with at least ``min_side`` cells."""
    pooled, stages = _forward_stages(encoder, x)
    target = stages[0]
    for stage in stages:
        if min(stage.shape[2:]) >= min_side:
            target = stage
    return pooled, target


def _forward_stages(encoder: ResNetEncoder, x: torch.Tensor):
    """Pooled features and every stage's output (in the autograd graph when ``x`` is)."""
    net = encoder.net
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    stages = []
    for name in STAGES:
        x = getattr(net, name)(x)
        stages.append(x)
    return torch.flatten(net.avgpool(x), 1), stages


def _unit(cam: torch.Tensor) -> torch.Tensor | None:
    low, high = float(cam.min()), float(cam.max())
    if not np.isfinite(high) or high - low <= 1e-12 * max(1.0, abs(high)):
        return None
    return (cam - low) / (high - low)


def gradcam(encoder: ResNetEncoder, image: np.ndarray, augment_config, score: Score,
            class_index: int, *, min_side: int = 7, method: str = "gradcam",
            stages: tuple[int, ...] = (0, 1)) -> np.ndarray:
    """A ``float32 (S, S)`` map in ``[0, 1]`` for one ``uint8 (S, S)`` greyscale or
    ``(S, S, 3)`` colour image (already at the model's input size). All zeros when the map is
    flat (no region stands out). ``method``: ``gradcam`` or ``layercam`` (module docstring)."""
    if method not in ("gradcam", "layercam"):
        raise ValueError("method must be gradcam or layercam")
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3
                                                           and image.shape[2] == 3)):
        raise ValueError("gradcam expects one uint8 (S, S) or (S, S, 3) image")
    encoder.eval()
    x = torch.from_numpy(image).float().div(255.0)
    x = (x.permute(2, 0, 1) if image.ndim == 3 else x[None])[None]
    x = eval_transform(augment_config)(x)
    # the encoder is shared (one cached network per model version, many request threads):
    # only this call's activations get gradients (``autograd.grad``), never the parameters'
    # ``.grad``, so concurrent maps neither race nor leave anything on the module
    x = x.to(next(encoder.parameters()).device).requires_grad_(True)
    with torch.enable_grad():
        pooled, outputs = _forward_stages(encoder, x)
        logits = score(pooled)
        if not 0 <= class_index < logits.shape[1]:
            raise ValueError(f"class index {class_index} out of range for {logits.shape[1]} classes")
        grads = torch.autograd.grad(logits[0, class_index], outputs, allow_unused=True)
    outputs = [stage.detach().cpu() for stage in outputs]
    grads = [torch.zeros_like(stage) if grad is None else grad.detach().cpu()
             for stage, grad in zip(outputs, grads)]
    if method == "layercam":
        maps = []
        for stage, grad in [(outputs[i], grads[i]) for i in stages]:   # layer1 and layer2
            cam = (F.relu(grad) * stage).sum(dim=1, keepdim=True)
            cam = F.interpolate(F.relu(cam), size=image.shape[:2], mode="bilinear",
                                align_corners=False)[0, 0]
            unit = _unit(cam)
            if unit is not None:
                maps.append(unit)
        if not maps:
            return np.zeros(image.shape[:2], dtype=np.float32)
        fused = _unit(torch.stack(maps).mean(dim=0))
        return (np.zeros(image.shape[:2], dtype=np.float32) if fused is None
                else fused.numpy().astype(np.float32))
    features, gradient = outputs[0], grads[0]
    for stage, grad in zip(outputs, grads):
        if min(stage.shape[2:]) >= min_side:
            features, gradient = stage, grad
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * features).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    low, high = float(cam.min()), float(cam.max())
    if not np.isfinite(high) or high - low <= 1e-12 * max(1.0, abs(high)):
        return np.zeros(image.shape[:2], dtype=np.float32)
    return ((cam - low) / (high - low)).numpy().astype(np.float32)


def head_score(mean: np.ndarray, scale: np.ndarray, coef: np.ndarray,
               intercept: np.ndarray) -> Score:
    """The linear head's logits (see ``ml_backend.active.refit.LinearHead``) as torch ops."""
    m, s = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(scale, dtype=torch.float32)
    w = torch.as_tensor(coef, dtype=torch.float32)
    b = torch.as_tensor(intercept, dtype=torch.float32)
    return lambda pooled: ((pooled - m) / s) @ w.T + b


def _jet(values: np.ndarray) -> np.ndarray:
    """A perceptual blue → cyan → yellow → red ramp, ``(H, W)`` in [0, 1] → ``uint8 (H, W, 3)``."""
    stops = np.array([[0, 0, 128], [0, 128, 255], [0, 255, 255], [255, 255, 0],
                      [255, 128, 0], [200, 0, 0]], dtype=np.float32)
    position = np.clip(values, 0, 1) * (len(stops) - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, len(stops) - 1)
    t = (position - low)[..., None]
    return (stops[low] * (1 - t) + stops[high] * t).astype(np.uint8)


def overlay_png(cam: np.ndarray, width: int, height: int, *, max_alpha: float = 0.55) -> bytes:
    """An RGBA PNG of ``cam`` to lay over a ``width`` x ``height`` preview.

    Our model inputs are the preview letterboxed into a square (see
    ``ml_backend.data.arrays.to_square``): the map is scaled to that square and cropped back
    to the preview's own rectangle. Transparency follows the map, so cold regions stay clear.
    """
    side = max(width, height)
    square = Image.fromarray((np.clip(cam, 0, 1) * 255).astype(np.uint8)).resize(
        (side, side), Image.Resampling.BILINEAR)
    left, top = (side - width) // 2, (side - height) // 2
    values = np.asarray(square.crop((left, top, left + width, top + height)),
                        dtype=np.float32) / 255.0
    rgba = np.dstack([_jet(values), (values * max_alpha * 255).astype(np.uint8)])
    buffer = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buffer, format="PNG")
    return buffer.getvalue()
