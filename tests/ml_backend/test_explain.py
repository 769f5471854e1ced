"""Grad-CAM on our encoders: right shape and range, a resolved map at small inputs, and the
map lights up where the evidence is."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ml_backend.explain import gradcam, head_score, overlay_png
from ml_backend.ssl.encoder import ResNetEncoder
from ml_backend.ssl.train import PretrainConfig


def bright_square() -> np.ndarray:
    image = np.zeros((64, 64), np.uint8)
    image[8:24, 40:56] = 255
    return image


def activation_score(pooled: torch.Tensor) -> torch.Tensor:
    """Class 0 = total activation, class 1 = its negative."""
    total = pooled.sum(dim=1)
    return torch.stack([total, -total], dim=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_map_lights_up_where_the_evidence_is(seed):
    torch.manual_seed(seed)
    encoder = ResNetEncoder("resnet18").eval()
    config = PretrainConfig(image_size=64, small_input=False).augment_config()
    cam = gradcam(encoder, bright_square(), config, activation_score, 0)
    assert cam.shape == (64, 64) and cam.dtype == np.float32
    assert cam.min() == 0.0 and cam.max() == pytest.approx(1.0)
    inside, everywhere = cam[8:24, 40:56].mean(), cam.mean()
    assert inside > everywhere + 0.1, (inside, everywhere)
    # the map is resolved (layer2, 8x8 cells at 64 px), not one flat value
    assert len(np.unique(np.round(cam, 3))) > 50


def test_flat_maps_are_zero_and_bad_input_is_refused():
    torch.manual_seed(0)
    encoder = ResNetEncoder("resnet18").eval()
    config = PretrainConfig(image_size=64, small_input=False).augment_config()
    constant = lambda pooled: torch.zeros(len(pooled), 2) + 0 * pooled[:, :2]
    assert not gradcam(encoder, bright_square(), config, constant, 0).any()
    with pytest.raises(ValueError, match="out of range"):
        gradcam(encoder, bright_square(), config, activation_score, 5)
    with pytest.raises(ValueError, match="uint8"):
        gradcam(encoder, bright_square().astype(np.float32), config, activation_score, 0)


def test_head_score_matches_the_linear_head():
    from ml_backend.active.refit import LinearHead

    rng = np.random.default_rng(0)
    head = LinearHead(coef=rng.normal(size=(3, 8)), intercept=rng.normal(size=3),
                      mean=rng.normal(size=8), scale=rng.uniform(0.5, 2, size=8),
                      temperature=1.0, class_ids=np.array([4, 5, 6]))
    x = rng.normal(size=(5, 8)).astype(np.float32)
    ours = head_score(head.mean, head.scale, head.coef, head.intercept)(torch.from_numpy(x))
    np.testing.assert_allclose(ours.numpy(), head.logits(x), rtol=1e-4, atol=1e-4)


def test_overlay_is_rgba_at_the_preview_size_and_cropped_from_the_letterbox():
    cam = np.zeros((64, 64), np.float32)
    cam[:, :32] = 1.0                              # left half hot
    png = overlay_png(cam, width=200, height=100)  # a wide preview, letterboxed vertically
    overlay = Image.open(io.BytesIO(png))
    assert overlay.mode == "RGBA" and overlay.size == (200, 100)
    alpha = np.asarray(overlay.getchannel("A"))
    assert alpha[:, :90].mean() > 100 and alpha[:, 110:].mean() < 5


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_concurrent_maps_on_one_shared_encoder_all_succeed_and_match_the_map_alone(method):
    """The web process keeps ONE cached encoder per model version, and 8–10 Grad-CAM requests
    at once ran on it: each call set the parameters' ``.grad`` to None while another's
    ``backward()`` accumulated into them (``cannot call bump_version() on undefined tensor``,
    then "corrupted double-linked list" and a segfault). Maps from 10 threads at once, many
    rounds, on one encoder: every one succeeds and equals the map computed alone, and nothing
    is left on the shared parameters. (Before the fix the last check failed every time; the
    crash itself is a race, which one intra-op thread and small inputs make likely.)"""
    import threading

    torch.manual_seed(0)
    encoder = ResNetEncoder("resnet18").eval()
    config = PretrainConfig(image_size=32, small_input=False).augment_config()
    base = np.zeros((32, 32), np.uint8)
    base[4:12, 20:28] = 255
    images = [np.roll(base, 3 * i, axis=i % 2) for i in range(10)]
    alone = [gradcam(encoder, image, config, activation_score, 0, method=method)
             for image in images]
    rounds, results, errors = 20, {}, []
    barrier = threading.Barrier(len(images))

    def work(i: int) -> None:
        try:
            for r in range(rounds):
                barrier.wait(timeout=60)
                results[i, r] = gradcam(encoder, images[i], config, activation_score, 0,
                                        method=method)
        except Exception as exc:   # noqa: BLE001 - reported below, with its thread
            errors.append((i, repr(exc)))
            barrier.abort()

    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    finally:
        torch.set_num_threads(threads_before)
    assert not errors, errors
    assert len(results) == rounds * len(images)
    for (i, _), cam in results.items():
        np.testing.assert_allclose(cam, alone[i], rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in encoder.parameters())
