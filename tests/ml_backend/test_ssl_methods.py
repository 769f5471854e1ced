"""pretrain --method: SimCLRv2, MoCo v2, BYOL, SwAV and DINO through one training loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from django.core.management import call_command

from ml_backend.models import ModelVersion
from ml_backend.ssl.checkpoints import load_checkpoint, load_pretrained
from ml_backend.ssl.config import SSL_METHODS, PretrainConfig
from ml_backend.ssl.methods import build_method
from ml_backend.ssl.models import Classifier
from ml_backend.ssl.train import embed, pretrain
from tests.conftest import _import_brain


def _images(n=48, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, size, size)) * 255).astype(np.uint8)


@pytest.mark.parametrize("method", SSL_METHODS)
def test_every_method_trains_saves_resumes_and_embeds(tmp_path, method):
    config = PretrainConfig(image_size=32, small_input=False, epochs=2, batch_size=16,
                            method=method, frozen_prototype_steps=1)
    path = tmp_path / f"{method}.pt"
    result = pretrain(_images(), config, checkpoint_path=path)
    assert len(result["history"]) == 2
    assert all(np.isfinite(h["loss"]) for h in result["history"])
    state = load_checkpoint(path)
    assert ("method_state" in state) == (method != "simclr")   # SimCLR's format is unchanged
    model, loaded = load_pretrained(path)
    assert loaded.method == method
    vectors = embed(model.encoder, _images(4, seed=1), loaded)
    assert vectors.shape == (4, 512) and np.isfinite(vectors).all()
    again = pretrain(_images(), config, checkpoint_path=path)        # finished: resumes, no step
    assert again["note"] == "resumed at epoch 2"
    # only SimCLRv2's projection head travels with the encoder into fine-tuning
    assert Classifier(loaded, 2, from_head_layer=1).from_head_layer == (
        1 if method == "simclr" else 0)


def test_momentum_networks_follow_the_online_ones():
    config = PretrainConfig(image_size=32, small_input=False, method="byol", momentum=0.5)
    method = build_method(config, num_images=10)
    method.start()
    teacher = [p.detach().clone() for p in method.teacher_encoder.parameters()]
    assert all(not p.requires_grad for p in method.teacher_encoder.parameters())
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(1.0)
    method.after_step(0, 10)
    moved = [p for p in method.teacher_encoder.parameters()]
    assert all(torch.allclose(m, t + 0.5) for m, t in zip(moved, teacher))


def test_moco_is_v3s_symmetric_in_batch_loss_unless_a_queue_is_asked_for(tmp_path):
    config = PretrainConfig(image_size=32, small_input=False, epochs=1, batch_size=16,
                            method="moco", temperature=0.5)
    method = build_method(config, num_images=48)
    assert method.queue_size == 0 and method.criterion is None    # no memory bank
    # the contrast: each query against every key, its own the target, scaled by 2 tau
    keys = torch.eye(4, 8)
    expected = np.log(1 + 3 * np.exp(-1 / 0.5)) * 2 * 0.5
    assert method._contrast(keys * 3.0, keys).item() == pytest.approx(expected, rel=1e-5)
    # keys that do not match their queries cost more than ones that do
    assert method._contrast(keys, keys.roll(1, dims=0)).item() > expected
    result = pretrain(_images(), config, checkpoint_path=tmp_path / "moco-v3.pt")
    assert np.isfinite(result["history"][0]["loss"])
    assert load_checkpoint(tmp_path / "moco-v3.pt")["config"]["queue_size"] == 0
    with pytest.raises(ValueError, match="queue_size"):
        PretrainConfig(method="moco", queue_size=-1)
    # MoCo v2: a queue of negatives, capped at half the data
    v2 = PretrainConfig(image_size=32, small_input=False, epochs=1, batch_size=16,
                        method="moco", queue_size=4096)
    assert build_method(v2, num_images=48).queue_size == 24
    result = pretrain(_images(), v2, checkpoint_path=tmp_path / "moco-v2.pt")
    assert np.isfinite(result["history"][0]["loss"])


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method must be one of"):
        PretrainConfig(method="barlow")


def test_pretrain_command_with_byol(project, settings):
    settings.STARTER_ENCODER = ""
    _import_brain(project)
    call_command("pretrain", "--project", project.name, "--method", "byol", "--epochs", "1",
                 "--image-size", "32", "--batch-size", "32", "--small-input", "no",
                 "--no-progress")
    project.refresh_from_db()
    encoder = project.active_encoder
    assert encoder.config["pretrain"]["method"] == "byol"
    assert encoder.status == ModelVersion.Status.ACTIVE
    assert encoder.metrics["embeddings"]["total"] == project.scans.count()
