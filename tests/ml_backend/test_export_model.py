"""A classifier leaves the building: ONNX per label set that onnxruntime runs with the same
probabilities as the product's own predictions (within 1e-4) on real scans, TorchScript too,
and a model card with the evaluation, lineage and limitations."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from tests.base import REPO
from tests.factories import trained_project


@pytest.fixture
def trained(encoded_project, users):
    return trained_project(encoded_project, users["bob"])


def test_onnx_matches_the_products_predictions_on_real_scans(trained, tmp_path):
    import onnxruntime

    from ml_backend.services.artifacts import images_for
    from ml_backend.services.inference import predictor_for

    project = trained
    model = project.active_model
    call_command("export_model", "--project", project.name, "--format", "onnx",
                 "--out", str(tmp_path / "onnx"))
    card = json.loads((tmp_path / "onnx" / "model-card.json").read_text())
    assert card["model"] == model.version and card["evaluation"]["eval_scans"] > 0
    assert card["lineage"][0]["version"] == model.version
    assert card["lineage"][1]["version"] == model.parent.version
    entry = card["files"][0]
    assert entry["max_difference"] <= 1e-4 and entry["checked_on_scans"] > 0
    markdown = (tmp_path / "onnx" / "model-card.md").read_text()
    assert "## Limitations" in markdown and "Not a medical device" in markdown
    # run it as a deployment would, against what the product itself predicts
    scans = list(project.scans.filter(split="eval").order_by("pk")[:12])
    # at the size the card asks for: twice the encoder's training size, since the encoder
    # embeds each scan at both (its embed_scales)
    size = entry["input"]["shape"][2]
    assert model.parent.config["embed_scales"] == [1, 2]
    assert model.parent.config["embed_layers"] == [3, 4]       # and pools two stages
    assert size == 2 * model.parent.config["pretrain"]["image_size"]
    images = images_for(scans, size, 1).astype(np.float32)[:, None] / 255.0
    # and as a consumer who reads only the card would make them, from the preview files
    assert "BICUBIC filter when enlarging" in card["preprocessing"]
    assert np.array_equal(images, _as_the_card_says(scans, size))
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / entry["file"]),
                                           providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"image": images})[0]
    expected = predictor_for(model)(scans)
    names = {c["id"]: c["name"] for c in model.config["classes"]}
    columns = [[names[c] for c in [c["id"] for c in model.config["classes"]]].index(n)
               for n in entry["classes"]]
    np.testing.assert_allclose(got, expected[:, columns], atol=1e-4)


def _as_the_card_says(scans, size: int) -> np.ndarray:
    """The card's recipe, written from its words with Pillow alone (no product code)."""
    from PIL import Image

    from annotator.storage import media_path

    out = []
    for scan in scans:
        with Image.open(media_path(scan.preview.name)) as preview:
            grey = preview.convert("L")
        side = max(grey.size)
        square = Image.new("L", (side, side), 0)
        square.paste(grey, ((side - grey.width) // 2, (side - grey.height) // 2))
        shrink = side > size
        square = square.resize((size, size), Image.Resampling.BILINEAR if shrink
                               else Image.Resampling.BICUBIC) if side != size else square
        out.append(np.asarray(square, dtype=np.float32) / 255.0)
    return np.stack(out)[:, None]


def test_torchscript_and_clear_refusals(trained, tmp_path):
    import torch

    project = trained
    call_command("export_model", "--project", project.name, "--format", "torchscript",
                 "--out", str(tmp_path / "ts"))
    card = json.loads((tmp_path / "ts" / "model-card.json").read_text())
    written = tmp_path / "ts" / card["files"][0]["file"]
    with zipfile.ZipFile(written) as archive:       # no call stack with this server's paths
        assert not [n for n in archive.namelist() if n.endswith("debug_pkl")]
        assert not [n for n in archive.namelist()
                    if str(REPO).encode() in archive.read(n)]
    network = torch.jit.load(str(written))
    size = card["files"][0]["input"]["shape"][2]
    out = network(torch.rand(3, 1, size, size))
    assert out.shape == (3, len(card["files"][0]["classes"]))
    assert torch.allclose(out.sum(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(CommandError, match="not empty"):
        call_command("export_model", "--project", project.name, "--out", str(tmp_path / "ts"))
    with pytest.raises(CommandError, match="is an encoder"):
        call_command("export_model", "--project", project.name, "--model-version",
                     project.active_encoder.version, "--out", str(tmp_path / "enc"))


def test_exported_head_carries_the_balance_offsets():
    """A refit head with balance offsets (a class with few labels beside many) gives the
    same probabilities as torch in the export as in the product."""
    import torch

    from ml_backend.active.refit import fit_head
    from ml_backend.ssl.export import _LinearHead

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 32)) * 0.4
    y = np.array([0] * 300 + [1] * 300 + [2] * 12)
    x = (centres[y] + rng.normal(size=(len(y), 32))).astype(np.float32)
    head, info = fit_head(x, y, balance=1.0)
    assert head.bias is not None and abs(head.bias).max() > 0.5, info["bias"]
    got = _LinearHead(head)(torch.as_tensor(x[:50])).detach().numpy()
    np.testing.assert_allclose(got, head.predict_proba(x[:50]), atol=1e-5)


def test_the_model_card_keeps_odd_names_as_text():
    """Class, finding and label-set names go into the Markdown card as text: a ``|`` does
    not add a table cell, HTML is escaped, and the output columns are one name per line
    (a comma in a name is not a second class)."""
    from ml_backend.services.export import _card_markdown

    odd = ["+cmd|' /C calc'!A0", "<img src=x onerror=alert(1)>", "effusion, left"]
    card = {
        "model": "p1-clf-3", "project": "Chest </script><script>x()</script>",
        "exported": "2026-12-07", "format": "onnx", "status": "active",
        "status_reason": None,
        "files": [{"file": "chest.onnx", "label_set": "chest | set", "classes": odd,
                   "kind": "classes", "input": {"shape": [1, 1, 128, 128]},
                   "max_difference": 1e-6, "checked_on_scans": 12}],
        "preprocessing": "grey, 128 px", "intended_use": "research",
        "training": {"labels": 40, "encoder": "p1-enc-1", "encoder_started_from": "starter"},
        "lineage": [{"version": "p1-clf-3"}], "limitations": ["not a medical device"],
        "evaluation": {"eval_scans": 20, "accuracy": 0.9, "macro_f1": 0.8, "macro_auc": 0.9,
                       "ece": 0.05, "ece_before_scaling": 0.1,
                       "per_class": {name: {"precision": 0.5, "recall": 0.5, "f1": 0.5,
                                            "auc": 0.5, "support": 3} for name in odd}},
    }
    markdown = _card_markdown(card)
    assert "<img" not in markdown and "<script>" not in markdown
    assert "&lt;img src=x onerror=alert(1)&gt;" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| ")
            and "precision" not in line and "file" not in line]
    # every table row has its header's cells: an escaped | is not a cell boundary
    assert rows and all(line.replace("\\|", "").count("|") == 7 for line in rows)
    columns = [line for line in markdown.splitlines() if line.startswith("- column ")]
    assert columns == ["- column 0: +cmd\\|' /C calc'!A0",
                       "- column 1: &lt;img src=x onerror=alert(1)&gt;",
                       "- column 2: effusion, left"]
