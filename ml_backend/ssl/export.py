"""Classifiers that leave the building: one self-contained network per label set, image in,
calibrated class probabilities out, as ONNX (checked with onnxruntime) or TorchScript. Pure:
no Django.

Input ``image``: ``float32 (N, C, S, S)`` in ``[0, 1]`` — the scan's 8-bit preview (a DICOM
already windowed), padded to a square with black (centred), resized to ``S`` with Pillow's
bicubic filter when enlarging and bilinear when shrinking (``ml_backend.data.arrays.to_square``)
and divided by 255; ``C`` is 1 (greyscale) or 3 (RGB). The network normalises with the training mean and
standard deviation itself, then runs the encoder and the head:

* a refit version (``LinearHead`` on frozen embeddings): ``softmax((((f - mean) / scale)
  @ coef.T + intercept) / T)``, where ``f`` is the encoder's features followed, for a head
  with a pixel block, by the image area-averaged to ``side`` x ``side`` (channels last);
* a fine-tuned or distilled network: ``softmax(logits / T)``;
* a findings set's refit heads (``FindingsHead``): ``sigmoid(a * ((((f - mean) / scale)
  @ coef.T + intercept)) + b)``, one calibrated probability per finding;
* a fine-tuned findings network: ``sigmoid(logits)``.

Output ``probabilities``: ``float32 (N, K)`` over the label set's classes (they sum to one),
or over a findings set's findings (independent: each is that finding's probability, and the
model card gives the threshold at or above which the product calls it present), in the
order the model card lists.
"""

from __future__ import annotations

import io
import threading
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn


class ExportError(Exception):
    """The model cannot be exported as asked; ``str(exc)`` says why."""


# torch.jit.trace (and the ONNX exporter, which traces) keeps the module being traced in a
# process-wide table (``torch.jit._trace._trace_module_map``): two threads tracing at once
# overwrite each other's and fail ("Graphs differed across invocations"). One trace at a
# time per process; processes do not share it.
_TRACE_LOCK = threading.Lock()


class _Normalise(nn.Module):
    def __init__(self, mean: float, std: float, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.full((1, channels, 1, 1), float(mean)))
        self.register_buffer("std", torch.full((1, channels, 1, 1), float(std)))

    def forward(self, x):
        return (x - self.mean) / self.std


class _LinearHead(nn.Module):
    """A ``LinearHead`` (ml_backend.active.refit) as torch: standardise, linear, /T, softmax."""

    def __init__(self, head):
        super().__init__()
        if getattr(head, "prototypes", None) is not None:
            raise ExportError("this head blends a nearest-class-mean component, which the "
                              "export does not carry yet: refit without it to export")
        self.register_buffer("mean", torch.as_tensor(np.asarray(head.mean, np.float32)))
        self.register_buffer("scale", torch.as_tensor(np.asarray(head.scale, np.float32)))
        coef = np.asarray(head.coef, np.float32)
        intercept = np.asarray(head.intercept, np.float32)
        if coef.shape[0] == 1 and len(head.class_ids) == 2:   # a binary logistic regression
            coef = np.concatenate([-coef / 2, coef / 2])
            intercept = np.concatenate([-intercept / 2, intercept / 2])
        if getattr(head, "bias", None) is not None:   # the balance offsets (raw-logit units)
            intercept = intercept + np.asarray(head.bias, np.float32)
        self.linear = nn.Linear(coef.shape[1], coef.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(torch.as_tensor(coef))
            self.linear.bias.copy_(torch.as_tensor(intercept))
        self.temperature = float(head.temperature)

    def forward(self, features):
        z = self.linear((features - self.mean) / self.scale)
        return torch.softmax(z / self.temperature, dim=-1)


class _FindingsHead(nn.Module):
    """A ``FindingsHead`` (ml_backend.active.findings) as torch: standardise, one linear
    logit per finding, Platt calibration, independent sigmoids."""

    def __init__(self, head):
        super().__init__()
        as_tensor = lambda a: torch.as_tensor(np.asarray(a, np.float32))  # noqa: E731
        self.register_buffer("mean", as_tensor(head.mean))
        self.register_buffer("scale", as_tensor(head.scale))
        self.register_buffer("platt_a", as_tensor(head.platt_a))
        self.register_buffer("platt_b", as_tensor(head.platt_b))
        coef = np.asarray(head.coef, np.float32)
        self.linear = nn.Linear(coef.shape[1], coef.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(torch.as_tensor(coef))
            self.linear.bias.copy_(as_tensor(head.intercept))

    def forward(self, features):
        z = self.linear((features - self.mean) / self.scale)
        return torch.sigmoid(self.platt_a * z + self.platt_b)


class _Sigmoid(nn.Module):
    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, x):
        return torch.sigmoid(self.classifier(x).float())


class ExportedClassifier(nn.Module):
    """``image (N, C, S, S) in [0, 1]`` → ``probabilities (N, K)``."""

    def __init__(self, encoder: nn.Module, head: nn.Module, *, mean: float, std: float,
                 channels: int, pixel_side: int | None = None):
        super().__init__()
        self.normalise = _Normalise(mean, std, channels)
        self.encoder = encoder
        self.head = head
        self.pixel_side = pixel_side

    def forward(self, image):
        features = self.encoder(self.normalise(image))
        if self.pixel_side:   # the head's pixel block (ml_backend.active.features)
            small = nn.functional.adaptive_avg_pool2d(image, self.pixel_side)
            features = torch.cat([features, small.permute(0, 2, 3, 1).flatten(1)], dim=1)
        return self.head(features)


class _Softmax(nn.Module):
    def __init__(self, classifier: nn.Module, temperature: float):
        super().__init__()
        self.classifier = classifier
        self.temperature = float(temperature)

    def forward(self, x):
        return torch.softmax(self.classifier(x).float() / self.temperature, dim=-1)


def head_network(encoder: nn.Module, head, config,
                 pixel_side: int | None = None) -> ExportedClassifier:
    """Encoder + refit head of one label set (``config``: the encoder's PretrainConfig;
    ``pixel_side``: the head's pixel block, when it reads one)."""
    augment = config.augment_config()
    return ExportedClassifier(encoder, _LinearHead(head), mean=augment.mean, std=augment.std,
                              channels=config.channels, pixel_side=pixel_side).eval()


def cnn_network(classifier: nn.Module, config, temperature: float) -> ExportedClassifier:
    """A fine-tuned / distilled classifier network with its temperature."""
    augment = config.augment_config()
    return ExportedClassifier(nn.Identity(), _Softmax(classifier, temperature),
                              mean=augment.mean, std=augment.std,
                              channels=config.channels).eval()


def findings_head_network(encoder: nn.Module, head, config) -> ExportedClassifier:
    """Encoder + a findings set's refit heads: one independent probability per finding."""
    augment = config.augment_config()
    return ExportedClassifier(encoder, _FindingsHead(head), mean=augment.mean,
                              std=augment.std, channels=config.channels).eval()


def findings_cnn_network(classifier: nn.Module, config) -> ExportedClassifier:
    """A fine-tuned / distilled findings network: independent sigmoids per finding."""
    augment = config.augment_config()
    return ExportedClassifier(nn.Identity(), _Sigmoid(classifier), mean=augment.mean,
                              std=augment.std, channels=config.channels).eval()


def write(network: ExportedClassifier, path: Path, *, fmt: str, size: int,
          channels: int) -> Path:
    """Write ``network`` as ONNX (opset 17, dynamic batch) or TorchScript (traced)."""
    network = network.float().eval()
    example = torch.rand(2, channels, size, size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt not in ("onnx", "torchscript"):
        raise ExportError(f"unknown format {fmt!r}: use onnx or torchscript")
    buffer = io.BytesIO()
    try:
        with _TRACE_LOCK, torch.no_grad():
            if fmt == "onnx":
                torch.onnx.export(network, (example,), buffer, input_names=["image"],
                                  output_names=["probabilities"],
                                  dynamic_axes={"image": {0: "batch"},
                                                "probabilities": {0: "batch"}},
                                  opset_version=17, dynamo=False)
            else:
                torch.jit.save(torch.jit.trace(network, example), buffer)
    except (torch.jit.TracingCheckError, RuntimeError, AssertionError) as exc:
        # the network does not trace the same way twice, or the exporter refuses an op (or
        # trips on its own state): say so in words, not with the tracer's graph dump
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ExportError(f"the network could not be traced for {fmt} ({first})") from exc
    data = buffer.getvalue() if fmt == "onnx" else _without_debug_records(buffer.getvalue())
    path.write_bytes(data)
    return path


def _without_debug_records(archive: bytes) -> bytes:
    """A TorchScript archive without its ``*.debug_pkl`` records: they hold the tracer's call
    stack, with this server's absolute paths (the repository, the virtualenv), which have no
    place in a file that leaves the building. ``torch.jit.load`` does not need them (an error
    inside the network then names no source line, which a consumer cannot read anyway)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as source, \
            zipfile.ZipFile(out, "w", allowZip64=True) as target:
        for info in source.infolist():
            if not info.filename.endswith("debug_pkl"):
                target.writestr(info, source.read(info.filename))
    return out.getvalue()


def check(network: ExportedClassifier, path: Path, images: np.ndarray, *, fmt: str) -> float:
    """The largest difference between PyTorch and the written file (onnxruntime for ONNX) on
    ``images`` (``float32 (N, C, S, S)`` in [0, 1])."""
    x = torch.as_tensor(np.ascontiguousarray(images, dtype=np.float32))
    with torch.no_grad():
        expected = network.float().eval()(x).numpy()
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(["probabilities"], {"image": x.numpy()})[0]
    else:
        with torch.no_grad():
            got = torch.jit.load(str(path))(x).numpy()
    return float(np.abs(got - expected).max())
