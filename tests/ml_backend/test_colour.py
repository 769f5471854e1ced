"""Colour kept where the source is colour, on real files: blood-smear and H&E JPEGs, the
brain-MRI JPEGs (greyscale saved as RGB), palette PNGs, RGB/YBR/palette DICOM from pydicom's
test files, a MedMNIST colour npz. Previews keep colour; arrays follow the model's channels;
the stain augmentation stays in range and only recolours; the greyscale starter spreads over
three channels without changing what it sees in a grey scan."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ml_backend.data.arrays import as_channels, load_images
from ml_backend.data.datasets import iter_arrays, read_source
from ml_backend.data.decode import decode_scan, render_preview
from ml_backend.ssl.config import PretrainConfig
from ml_backend.ssl.transforms import StainJitter, augmentation, hed_to_rgb, rgb_to_hed
from tests.base import FIXTURES, SHARED_DATA, pydicom_test_files

SALT = "test-colour"
BLOOD = SHARED_DATA / "bloodmnist_pbc"
HE = SHARED_DATA / "lc25000_lung" / "train"


def _first(folder, pattern="*.jp*g"):
    return sorted(folder.rglob(pattern))[0]


def test_blood_smear_and_he_jpegs_stay_colour():
    for path in (_first(BLOOD / "jpeg" / "eosinophil"), _first(HE / "lung_aca")):
        decoded = decode_scan(path.read_bytes(), name=path.name, salt=SALT)
        assert decoded.pixels.shape[2:] == (3,) and decoded.meta["colour"] == "colour"
        assert "distinct colour channels" in decoded.meta["colour_reason"]
        red, green, blue = (decoded.pixels[..., i].mean() for i in range(3))
        assert abs(red - green) > 0.02 or abs(green - blue) > 0.02      # really coloured
        with Image.open(io.BytesIO(render_preview(decoded.pixels))) as preview:
            assert preview.mode == "RGB"


def test_rgb_encoded_grey_jpeg_is_detected_as_grey():
    path = _first(SHARED_DATA / "brain_mri" / "Training" / "glioma_tumor", "*.jpg")
    with Image.open(path) as image:
        assert image.mode == "RGB"                       # stored as colour ...
    decoded = decode_scan(path.read_bytes(), name=path.name, salt=SALT)
    assert decoded.pixels.ndim == 2 and decoded.meta["colour"] == "grey"   # ... read as grey
    assert "channels agree" in decoded.meta["colour_reason"]
    with Image.open(io.BytesIO(render_preview(decoded.pixels))) as preview:
        assert preview.mode == "L"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_palette_png_colour_or_grey_by_its_palette():
    colour = Image.open(_first(BLOOD / "jpeg" / "basophil")).convert("P", palette=Image.ADAPTIVE)
    decoded = decode_scan(_png(colour), name="smear.png", salt=SALT)
    assert decoded.meta["colour"] == "colour" and decoded.pixels.shape[2] == 3
    assert decoded.meta["colour_reason"].startswith("palette")
    grey = Image.open(_first(FIXTURES / "chest_xray", "*.png")).convert("L").convert("P")
    decoded = decode_scan(_png(grey), name="film.png", salt=SALT)
    assert decoded.meta["colour"] == "grey" and decoded.pixels.ndim == 2


@pytest.mark.parametrize("name", ["SC_rgb_rle.dcm", "SC_ybr_full_422_uncompressed.dcm",
                                  "SC_rgb_jpeg_dcmtk.dcm", "examples_palette.dcm"])
def test_colour_dicom_keeps_colour(name):
    files = {p.name: p for p in pydicom_test_files()}
    decoded = decode_scan(files[name].read_bytes(), salt=SALT)
    assert decoded.pixels.ndim == 3 and decoded.meta["colour"] == "colour", name
    assert 0.0 <= decoded.pixels.min() and decoded.pixels.max() <= 1.0
    if name.startswith("SC_"):
        # pydicom's SC test images are the same picture: red, green and blue bands (YBR is
        # converted to RGB), so the top band is red, whatever the encoding
        top = decoded.pixels[2, 50]
        assert top[0] > 0.8 and top[1] < 0.2 and top[2] < 0.2, (name, top)


def test_greyscale_dicom_is_unchanged():
    files = {p.name: p for p in pydicom_test_files()}
    decoded = decode_scan(files["CT_small.dcm"].read_bytes(), salt=SALT)
    assert decoded.pixels.ndim == 2 and decoded.meta["colour"] == "grey"


def test_colour_npz_items_decode_as_colour():
    listing = read_source(f"{BLOOD / 'bloodmnist_pbc.npz'}#val")
    item, data = next(iter_arrays(listing))
    decoded = decode_scan(data, name=item.name, salt=SALT)
    assert decoded.pixels.shape == (28, 28, 3) and decoded.meta["colour"] == "colour"
    assert item.label in {"basophil", "eosinophil", "erythroblast", "immature_granulocytes",
                          "lymphocyte", "monocyte", "neutrophil", "platelet"}


def test_arrays_follow_the_models_channels():
    colour_png = render_preview(decode_scan(_first(HE / "lung_n").read_bytes(),
                                            salt=SALT).pixels)
    grey_png = render_preview(decode_scan(_first(FIXTURES / "chest_xray", "*.png").read_bytes(),
                                          salt=SALT).pixels)
    rgb = load_images([colour_png, grey_png], 32, channels=3)
    assert rgb.shape == (2, 32, 32, 3)
    assert np.array_equal(rgb[1, ..., 0], rgb[1, ..., 2])          # grey replicated
    assert not np.array_equal(rgb[0, ..., 0], rgb[0, ..., 2])
    grey = load_images([colour_png, grey_png], 32, channels=1)
    assert grey.shape == (2, 32, 32)
    np.testing.assert_allclose(grey[0].astype(int), as_channels(rgb[:1], 1)[0].astype(int),
                               atol=2)


def test_stain_augmentation_stays_in_range_and_only_recolours():
    torch.manual_seed(0)
    path = _first(HE / "lung_scc")
    x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB").resize((64, 64)),
                                    dtype=np.float32) / 255.0).permute(2, 0, 1)
    # the HED round trip is the identity on tissue colours (up to the optical-density floor)
    np.testing.assert_allclose(hed_to_rgb(rgb_to_hed(x)).numpy(), x.numpy(), atol=1e-4)
    assert torch.equal(StainJitter(0.0)(x), x)
    for _ in range(5):
        y = StainJitter(0.05)(x)
        assert y.shape == x.shape and 0.0 <= float(y.min()) and float(y.max()) <= 1.0
        assert 0 < float((y - x).abs().mean()) < 0.1                 # a mild recolouring
    # a per-pixel colour map: equal input pixels give equal output pixels (nothing moves)
    twice = torch.cat([x, x], dim=2)
    y = StainJitter(0.05)(twice)
    assert torch.allclose(y[..., :64], y[..., 64:])


def test_colour_augmentations_only_for_colour_input():
    grey = PretrainConfig(image_size=32).augment_config()
    assert grey.colour == "none" and grey.channels == 1
    colour = PretrainConfig(image_size=32, channels=3).augment_config()
    assert colour.colour == "stain" and colour.channels == 3
    names = [type(step).__name__ for step in augmentation(colour).transforms]
    assert "StainJitter" in names
    assert "StainJitter" not in [type(s).__name__ for s in augmentation(grey).transforms]
    view = augmentation(colour)(torch.rand(3, 40, 40))
    assert view.shape == (3, 32, 32)
    with pytest.raises(ValueError):
        PretrainConfig(channels=2)


def test_greyscale_starter_spread_over_three_channels_sees_grey_scans_alike(tmp_path):
    from ml_backend.ssl.checkpoints import inflate_encoder_checkpoint
    from ml_backend.ssl.train import embed, load_pretrained
    from ml_backend.services.training import starter_encoder

    path, _ = starter_encoder()
    inflate_encoder_checkpoint(path, tmp_path / "colour.pt", 3)
    grey_model, grey_config = load_pretrained(path)
    colour_model, colour_config = load_pretrained(tmp_path / "colour.pt")
    assert grey_config.channels == 1 and colour_config.channels == 3
    assert colour_model.encoder.net.conv1.weight.shape[1] == 3
    scans = load_images(sorted((FIXTURES / "chest_xray").rglob("*.png"))[:4], 64)
    a = embed(grey_model.encoder, scans, grey_config)
    b = embed(colour_model.encoder, as_channels(scans, 3), colour_config)
    np.testing.assert_allclose(a, b, atol=5e-3 * float(np.abs(a).max()))
