"""Checkpoint files: atomic writes, ``torch.load(weights_only=True)`` reads, and the two kinds.

- an **encoder** checkpoint (``kind="simclr_encoder"``, written by ``pretrain``): ``config``
  (the ``PretrainConfig`` as a dict), ``encoder``, ``head``, ``optimizer``, ``scheduler``,
  ``epoch``, ``history``, ``model_version`` and, once finished, ``batchnorm_recalibrated``;
- a **classifier** checkpoint (``kind="finetuned"`` or ``"distilled"``): ``pretrain_config``,
  ``config``, ``num_classes``, ``from_head_layer``, ``state``, ``history``, ``model_version``.

The keys are the on-disk format: checkpoints written by earlier versions must keep loading.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from ml_backend.errors import TrainingError
from ml_backend.ssl.config import PretrainConfig, config_from_dict
from ml_backend.ssl.encoder import at_scales
from ml_backend.ssl.models import Classifier, SimCLRModel


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Write atomically: a crash never leaves a half-written checkpoint in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainingError(f"checkpoint not found: {path}") from None
    except (RuntimeError, ValueError, EOFError, OSError) as exc:
        raise TrainingError(f"cannot read checkpoint {path}: {exc}") from None


# --- encoder checkpoints ---------------------------------------------------------------


def save_encoder_checkpoint(path: str | Path, model: SimCLRModel, config: PretrainConfig,
                            optimizer, scheduler, *, model_version: str, epoch: int,
                            history: list, **extra) -> None:
    """The pretraining checkpoint (resumable: optimizer and schedule included); ``extra``
    adds keys such as ``batchnorm_recalibrated=True``."""
    if config.method != "simclr":
        # momentum networks, predictor, prototypes: everything a resumed run needs
        extra = {"method_state": model.state_dict(), **extra}
    save_checkpoint(path, {
        "kind": "simclr_encoder", "model_version": model_version, "config": asdict(config),
        "encoder": model.encoder.state_dict(), "head": model.head.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "epoch": epoch, "history": history, **extra,
    })


def load_pretrained(path: str | Path, *, scales=(1,), layers=(4,)
                    ) -> tuple[SimCLRModel, PretrainConfig]:
    """The encoder checkpoint at ``path`` and its config. ``scales`` other than ``(1,)``:
    the model's encoder reads each scan at those multiples of its training size
    (``encoder.MultiScaleEncoder``) and the config returned asks for the largest
    (``image_size * max(scales)``, the stem of the training size kept); ``layers`` other
    than ``(4,)``: it pools those residual stages too. What the product embeds with;
    pretraining and fine-tuning load it at ``(1,)`` and ``(4,)``."""
    model, config = _load_pretrained(path)
    model.encoder, config = at_scales(model.encoder, config, scales, layers)
    return model, config


def _load_pretrained(path: str | Path) -> tuple[SimCLRModel, PretrainConfig]:
    state = load_checkpoint(path)
    if "encoder" not in state or "config" not in state:
        raise TrainingError(f"{path} is not a SimCLR encoder checkpoint")
    config = config_from_dict(PretrainConfig, state["config"])
    model = SimCLRModel(config)
    model.encoder.load_state_dict(state["encoder"])
    if config.method == "simclr":       # other methods' heads are not SimCLRv2's: unused
        model.head.load_state_dict(state["head"])
    return model.eval(), config


def load_encoder_weights(model: SimCLRModel, path: str | Path) -> str:
    """Start from a saved encoder: one of ours, or a torchvision ResNet state dict on disk.

    Returns a short description of what was loaded. The first convolution is adapted to the
    model's input: 3-channel weights are summed over channels for a greyscale model (the
    usual greyscale adaptation) and kept as they are for a colour one; 1-channel weights
    (our greyscale starter) are spread over three channels for a colour model (each a third,
    so a grey image replicated to RGB gives the same features as before). The
    classification layer is ignored.
    """
    state = load_checkpoint(path)
    if "encoder" in state:  # ours
        encoder_state = dict(state["encoder"])
        stem = "net.conv1.weight"
        adapted = ""
        if stem in encoder_state:
            encoder_state[stem] = adapt_stem(encoder_state[stem], model.encoder.in_channels)
            if encoder_state[stem] is not state["encoder"][stem]:
                adapted = (f" (first convolution adapted from "
                           f"{state['encoder'][stem].shape[1]} to "
                           f"{model.encoder.in_channels} channels)")
        model.encoder.load_state_dict(encoder_state)
        if "head" in state:
            try:
                model.head.load_state_dict(state["head"])
            except RuntimeError:
                return "encoder (a new head: the saved one does not fit)" + adapted
            return "encoder + projection head" + adapted
        return "encoder" + adapted
    state = state.get("state_dict", state)
    mapped = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("encoder.").removeprefix("net.")
        if key.startswith("fc."):
            continue
        if key == "conv1.weight":
            value = adapt_stem(value, model.encoder.in_channels)
        mapped[key] = value
    own = model.encoder.net.state_dict()
    usable = {k: v for k, v in mapped.items() if k in own and own[k].shape == v.shape}
    if len(usable) < len(own) // 2:
        raise TrainingError(f"{path} does not look like a {model.encoder.arch} state dict "
                            f"({len(usable)} of {len(own)} tensors match)")
    model.encoder.net.load_state_dict(usable, strict=False)
    return f"torchvision-style weights ({len(usable)}/{len(own)} tensors)"


def adapt_stem(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A first-convolution weight ``(out, c, k, k)`` for ``channels`` input channels: kept
    when it fits, summed (3 → 1), or spread as thirds (1 → 3)."""
    have = weight.shape[1]
    if have == channels:
        return weight
    if have == 3 and channels == 1:
        return weight.sum(dim=1, keepdim=True)
    if have == 1 and channels == 3:
        return weight.repeat(1, 3, 1, 1) / 3.0
    raise TrainingError(f"cannot adapt a {have}-channel first convolution to {channels} channels")


def inflate_encoder_checkpoint(source: str | Path, target: str | Path, channels: int) -> None:
    """Copy an encoder checkpoint with its first convolution adapted to ``channels`` and its
    config saying so (a colour project adopting the greyscale starter as is). The optimizer
    state, which no longer fits the stem, is left out."""
    state = load_checkpoint(source)
    if "encoder" not in state or "config" not in state:
        raise TrainingError(f"{source} is not a SimCLR encoder checkpoint")
    stem = "net.conv1.weight"
    state["encoder"] = {**state["encoder"], stem: adapt_stem(state["encoder"][stem], channels)}
    state["config"] = {**state["config"], "channels": channels}
    state.pop("optimizer", None)
    state.pop("scheduler", None)
    state.pop("method_state", None)
    save_checkpoint(target, state)


# --- classifier checkpoints ------------------------------------------------------------


def save_classifier(path, model: Classifier, pretrain_config: PretrainConfig, config,
                    num_classes: int, *, model_version: str, history: list, kind: str) -> None:
    save_checkpoint(path, {
        "kind": kind, "model_version": model_version,
        "pretrain_config": asdict(pretrain_config), "config": asdict(config),
        "num_classes": num_classes, "from_head_layer": model.from_head_layer,
        "state": model.state_dict(), "history": history,
    })


def load_classifier(path: str | Path) -> tuple[Classifier, PretrainConfig]:
    state = load_checkpoint(path)
    if "state" not in state or "pretrain_config" not in state:
        raise TrainingError(f"{path} is not a classifier checkpoint")
    pretrain_config = config_from_dict(PretrainConfig, state["pretrain_config"])
    model = Classifier(pretrain_config, state["num_classes"], state["from_head_layer"])
    model.load_state_dict(state["state"])
    return model.eval(), pretrain_config
