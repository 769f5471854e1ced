"""The starter encoder: built by the pure core, shipped in half precision with a data card,
and the point every new project's pretraining starts from (``pretrain --from``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from django.conf import settings as django_settings
from django.core.management import call_command

from ml_backend.models import ModelVersion, TrainingRun
from ml_backend.services.artifacts import embeddings_paths
from ml_backend.ssl import starter
from ml_backend.ssl.checkpoints import load_checkpoint, load_pretrained
from ml_backend.ssl.config import PretrainConfig
from tests.base import FIXTURES
from tests.conftest import _import_brain

TINY = PretrainConfig(image_size=32, small_input=False, epochs=1, batch_size=32, seed=0)
SOURCES = (starter.StarterSource("brain MRI fixtures", "brain_mri/pool", hflip=True),
           starter.StarterSource("chest X-ray fixtures", "chest_xray/pool", hflip=False))


@pytest.fixture(scope="module")
def tiny_starter(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("starter")
    out = folder / "tiny-starter.pt"
    starter.build(FIXTURES, out, config=TINY, sources=SOURCES, work_dir=folder / "work",
                  command="pytest")
    return out


def test_build_writes_a_half_precision_encoder_and_its_card(tiny_starter):
    state = load_checkpoint(tiny_starter)
    assert state["kind"] == "simclr_encoder" and state["batchnorm_recalibrated"]
    floats = [v for v in state["encoder"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert "optimizer" not in state            # nothing a project does not need is shipped
    card = json.loads(tiny_starter.with_suffix(".json").read_text())
    assert [s["scans"] for s in card["sources"]] == [160, 150]
    assert card["scans"] == 310 and card["epochs"] == 1 and len(card["history"]) == 1
    assert card["file"]["sha256"] == hashlib.sha256(tiny_starter.read_bytes()).hexdigest()
    assert card["command"] == "pytest" and card["config"]["image_size"] == 32
    model, config = load_pretrained(tiny_starter)     # fp16 weights load into fp32 models
    assert config == TINY and next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        features = model.encoder(torch.rand(2, 1, 32, 32))
    assert torch.isfinite(features).all()


def test_build_refuses_a_source_with_no_readable_scan(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a scan")
    with pytest.raises(starter.TrainingError, match="no scan could be read"):
        starter.load_sources(tmp_path, (starter.StarterSource("x", "empty", False),), size=32)


def test_decoded_pixels_travel_to_a_machine_without_the_scans(tmp_path):
    """--save-decoded where the scans are, --decoded where they are not (a rented GPU): the
    same pixels, refused when a source is missing, resized or altered."""
    decoded = tmp_path / "decoded.npz"
    assert starter.main(["--data", str(FIXTURES), "--save-decoded", str(decoded),
                         "--image-size", "32"]) == 1           # the default sources are absent
    assert not decoded.exists()
    card = starter.save_decoded(FIXTURES, SOURCES, size=32, path=decoded)
    assert [c["scans"] for c in card] == [160, 150]
    data = starter.read_decoded(decoded, SOURCES, size=32)
    fresh = starter.load_sources(FIXTURES, SOURCES, size=32)
    assert np.array_equal(data["images"], fresh["images"])
    assert np.array_equal(data["hflip"], fresh["hflip"]) and data["hflip"][:160].all()
    with pytest.raises(starter.TrainingError, match="expected"):
        starter.read_decoded(decoded, SOURCES[:1], size=32)
    with pytest.raises(starter.TrainingError, match="--image-size 64"):
        starter.read_decoded(decoded, SOURCES, size=64)
    images = data["images"].copy()
    images[200, 0, 0] ^= 1                                      # one pixel of a chest scan
    np.savez(decoded, images=images, hflip=data["hflip"],
             card=np.array(json.dumps(data["sources"])))
    with pytest.raises(starter.TrainingError, match="chest_xray/pool do not match"):
        starter.read_decoded(decoded, SOURCES, size=32)
    decoded.write_bytes(b"not an npz")
    with pytest.raises(starter.TrainingError, match="not a decoded-sources file"):
        starter.read_decoded(decoded, SOURCES, size=32)


def test_a_starter_built_from_decoded_pixels_says_how(tmp_path):
    decoded = tmp_path / "decoded.npz"
    starter.save_decoded(FIXTURES, SOURCES, size=32, path=decoded)
    out = tmp_path / "from-decoded.pt"
    card = starter.build(tmp_path / "no-scans-here", out, config=TINY, sources=SOURCES,
                         work_dir=tmp_path / "work", decoded=decoded, command="train",
                         decode_command="decode")
    assert card["scans"] == 310 and card["decode_command"] == "decode"
    markdown = out.with_suffix(".md").read_text()
    assert "Decoded first, where the scans are: `decode`" in markdown
    assert "Rebuild exactly: `train`" in markdown


def _pretrain_run(project) -> TrainingRun:
    return TrainingRun.objects.filter(project=project, kind="pretrain").latest("pk")


def test_epochs_zero_adopts_the_starter_as_shipped(project, settings, tiny_starter):
    settings.STARTER_ENCODER = str(tiny_starter)
    _import_brain(project)
    call_command("pretrain", "--project", project.name, "--epochs", "0", "--no-progress")
    project.refresh_from_db()
    encoder = project.active_encoder
    assert encoder is not None and encoder.config["start_from"] == "starter"
    assert encoder.config["starter"]["sha256"] == hashlib.sha256(
        tiny_starter.read_bytes()).hexdigest()
    assert encoder.metrics["pretrain"]["epochs"] == 0
    # the project's vectors are the starter's own embeddings of its scans, read at its size
    # and at twice it (embed_scales), its third stage and its output (embed_layers), side by side
    vectors = np.load(embeddings_paths(encoder)["vectors"])
    assert encoder.config["embed_scales"] == [1, 2] and encoder.config["embed_layers"] == [3, 4]
    assert vectors.shape == (project.scans.count(), 1536) and np.isfinite(vectors).all()


@pytest.mark.sqlite_pass
def test_pretraining_continues_from_the_starter_by_default(project, settings, tiny_starter):
    settings.STARTER_ENCODER = str(tiny_starter)
    _import_brain(project)
    call_command("pretrain", "--project", project.name, "--epochs", "1", "--image-size", "32",
                 "--batch-size", "32", "--small-input", "no", "--no-progress")
    encoder = ModelVersion.objects.get(project=project, kind="encoder")
    assert encoder.config["start_from"] == "starter"
    assert encoder.config["init_checkpoint"] == str(tiny_starter)
    assert "initialised from encoder" in encoder.metrics["pretrain"]["note"]


@pytest.mark.sqlite_pass
def test_from_scratch_and_a_starter_that_does_not_fit(project, settings, tiny_starter):
    settings.STARTER_ENCODER = str(tiny_starter)
    _import_brain(project)
    common = ["--project", project.name, "--epochs", "1", "--image-size", "32",
              "--batch-size", "32", "--no-progress", "--no-activate"]
    call_command("pretrain", *common, "--small-input", "no", "--from", "scratch")
    assert ModelVersion.objects.get(project=project).config["start_from"] == "scratch"
    # the small stem does not fit the starter's standard stem: auto says so and starts fresh
    call_command("pretrain", *common, "--small-input", "yes")
    run = _pretrain_run(project)
    assert run.model_version.config["start_from"] == "scratch"
    assert "standard stem" in run.log
    # ...and --from starter refuses, in words
    with pytest.raises(Exception):
        call_command("pretrain", *common, "--small-input", "yes", "--from", "starter")
    run = _pretrain_run(project)
    assert run.status == TrainingRun.Status.FAILED and "--from scratch" in run.last_error


@pytest.mark.sqlite_pass
def test_pretraining_continues_the_starters_own_method_unless_told(project, settings,
                                                                    tmp_path):
    """A DINO starter (a site's choice: docs/benchmarks.md) goes on with DINO, its head
    included; --method says otherwise; a run that cannot start from it trains SimCLRv2."""
    dino = tmp_path / "dino-starter.pt"
    starter.build(FIXTURES, dino, config=PretrainConfig(**{**TINY.__dict__, "method": "dino"}),
                  sources=SOURCES[:1], work_dir=tmp_path / "work", command="pytest")
    settings.STARTER_ENCODER = str(dino)
    _import_brain(project)
    common = ["--project", project.name, "--epochs", "1", "--image-size", "32",
              "--batch-size", "32", "--no-progress", "--no-activate"]
    call_command("pretrain", *common, "--small-input", "no")
    encoder = _pretrain_run(project).model_version
    assert encoder.config["start_from"] == "starter"
    assert encoder.config["pretrain"]["method"] == "dino"
    assert "encoder + projection head" in encoder.metrics["pretrain"]["note"]
    call_command("pretrain", *common, "--small-input", "no", "--method", "simclr")
    encoder = _pretrain_run(project).model_version
    assert encoder.config["pretrain"]["method"] == "simclr"
    assert "a new head" in encoder.metrics["pretrain"]["note"]
    call_command("pretrain", *common, "--small-input", "yes")       # the stem does not fit
    encoder = _pretrain_run(project).model_version
    assert encoder.config["start_from"] == "scratch"
    assert encoder.config["pretrain"]["method"] == "simclr"


def test_no_starter_shipped_means_scratch_and_epochs_zero_is_refused(project, settings):
    settings.STARTER_ENCODER = ""
    _import_brain(project)
    with pytest.raises(Exception):
        call_command("pretrain", "--project", project.name, "--epochs", "0", "--no-progress")
    run = _pretrain_run(project)
    assert run.status == TrainingRun.Status.FAILED and "make starter-encoder" in run.last_error


@pytest.mark.parametrize("name,channels,sources", [
    ("simclr-resnet18-64px.pt", 1, {"brain_mri/Training",
                                    "pneumoniamnist/pneumoniamnist.npz#train"}),
    ("simclr-resnet18-rgb-64px.pt", 3, {"bloodmnist_pbc/bloodmnist_pbc.npz#train",
                                        "lc25000_lung/train"}),
])
def test_the_shipped_starters_load_and_match_their_cards(name, channels, sources):
    path = Path(django_settings.BASE_DIR) / "ml_backend" / "starter" / name
    card = starter.read_card(path)
    assert card is not None, f"{name} and its card are shipped in the repository"
    assert path.stat().st_size <= 26 * 1024 * 1024
    assert card["file"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert {s["spec"] for s in card["sources"]} >= sources
    assert path.with_suffix(".md").is_file()
    model, config = load_pretrained(path)
    assert (config.arch, config.image_size, config.channels) == ("resnet18", 64, channels)
    with torch.no_grad():
        features = model.encoder(torch.rand(4, channels, 64, 64))
    assert features.shape == (4, 512) and torch.isfinite(features).all()


def test_the_colour_starter_is_built_in_rgb_and_chosen_for_colour_projects(tmp_path, settings,
                                                                             tiny_starter):
    """``--colour``: RGB sources stay RGB; a colour project gets the colour starter where one
    is shipped, the greyscale one (spread over RGB) where none is."""
    from ml_backend.services.training import starter_encoder

    config = PretrainConfig(**{**TINY.__dict__, "channels": 3, "colour_augment": "stain"})
    out = tmp_path / "tiny-rgb.pt"
    sources = (starter.StarterSource("blood smears", "blood_smear/pool", hflip=True),)
    starter.build(FIXTURES, out, config=config, sources=sources, work_dir=tmp_path / "work",
                  command="pytest --colour", not_seen=starter.COLOUR_NOT_SEEN)
    card = starter.read_card(out)
    assert card["config"]["channels"] == 3 and card["scans"] == 48
    assert "LC25000" in card["note"]
    markdown = out.with_suffix(".md").read_text()
    assert "colour starter encoder" in markdown and "in colour (RGB)" in markdown
    model, loaded = load_pretrained(out)
    assert loaded.channels == 3 and model.encoder.in_channels == 3
    data = starter.load_sources(FIXTURES, sources, size=32, channels=3)
    assert data["images"].shape == (48, 32, 32, 3)
    assert np.abs(data["images"][..., 0].astype(int) - data["images"][..., 2]).mean() > 5

    settings.STARTER_ENCODER = str(tiny_starter)
    settings.STARTER_ENCODER_COLOUR = str(out)
    assert starter_encoder(3)[0] == out and starter_encoder(1)[0] == tiny_starter
    settings.STARTER_ENCODER_COLOUR = ""
    assert starter_encoder(3)[0] == tiny_starter      # spread over RGB when adopted
