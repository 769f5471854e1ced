"""The frozen run configurations of SimCLRv2's three steps, and their round trip to dicts.

Imports no torch: the web app and the Django adapter read, validate and store configs
without loading a model library. A checkpoint stores ``asdict(config)``; ``config_from_dict``
rebuilds the dataclass from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # transforms imports torch; load it only when augment_config() is called
    from ml_backend.ssl.transforms import AugmentConfig


SSL_METHODS = ("simclr", "moco", "byol", "swav", "dino")
# Colour augmentations of a 3-channel (colour) project: "stain" = H&E stain jitter in HED
# space (Tellez et al. 2018) plus bounded hue/saturation jitter, for stained tissue and
# smears; "jitter" = bounded hue/saturation jitter only (photographs: skin, fundus,
# endoscopy); "none". Greyscale projects never get colour augmentations.
COLOUR_AUGMENTS = ("stain", "jitter", "none")
BATCHNORM_MODES = ("pretrained", "recalibrated", "train")


@dataclass(frozen=True)
class PretrainConfig:
    arch: str = "resnet18"
    image_size: int = 64
    small_input: bool | None = None          # None: True when image_size <= 32 (MedMNIST)
    proj_hidden_dim: int = 512
    proj_out_dim: int = 128
    proj_layers: int = 3
    temperature: float = 0.2
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    seed: int = 0
    amp: bool = True                          # float16 on a GPU
    hflip: bool = False
    augment: dict = field(default_factory=dict)   # overrides of AugmentConfig fields
    cpu_bf16: bool = True                     # bf16 autocast on a CPU with native bf16
    channels_last: bool = True                # NHWC tensors (faster convolutions on CPU)
    method: str = "simclr"                    # one of SSL_METHODS (ml_backend/ssl/methods.py)
    momentum: float = 0.99                    # moco / byol / dino: start of the EMA schedule
    queue_size: int = 0                       # moco: 0 = MoCo v3's in-batch symmetric loss;
    #                                           N > 0 = MoCo v2's queue of N negatives (capped
    #                                           at half the data; does not train in short runs)
    prototypes: int = 64                      # swav
    frozen_prototype_steps: int = 100         # swav: prototypes fixed for the first steps
    dino_out_dim: int = 1024                  # dino: output dimension of the head
    channels: int = 1                         # 1 greyscale, 3 colour (RGB) input
    colour_augment: str = "stain"             # colour projects only: one of COLOUR_AUGMENTS

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError("channels must be 1 (greyscale) or 3 (colour)")
        if self.colour_augment not in COLOUR_AUGMENTS:
            raise ValueError(f"colour_augment must be one of {', '.join(COLOUR_AUGMENTS)}")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("epochs must be >= 1 and batch_size >= 2")
        if self.lr <= 0 or self.temperature <= 0:
            raise ValueError("lr and temperature must be positive")
        if self.method not in SSL_METHODS:
            raise ValueError(f"method must be one of {', '.join(SSL_METHODS)}")
        if not 0 <= self.momentum < 1:
            raise ValueError("momentum must be in [0, 1)")
        if self.queue_size < 0:
            raise ValueError("queue_size must be 0 (in-batch negatives) or positive")

    @property
    def uses_small_input(self) -> bool:
        return self.image_size <= 32 if self.small_input is None else self.small_input

    def augment_config(self) -> AugmentConfig:
        from ml_backend.ssl.transforms import AugmentConfig

        colour = self.colour_augment if self.channels == 3 else "none"
        return AugmentConfig(**{"size": self.image_size, "hflip": self.hflip,
                                "channels": self.channels, "colour": colour, **self.augment})


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 1e-4
    schedule: str = "cosine"                 # cosine | onecycle
    grad_clip: float = 1.0
    loss: str = "ce"                          # ce | focal
    focal_gamma: float = 2.0
    class_balance: str = "weighted_loss"      # weighted_loss | sampler | none
    # SimCLRv2 fine-tunes from the first projection layer; on our encoders the encoder's own
    # output generalises better to a new site (docs/benchmarks.md, "Fine-tuning that beats
    # the probe"), so 0 is the default
    from_head_layer: int = 0
    label_smoothing: float = 0.0
    augment: bool = False                     # light crops/affine/intensity while training
    seed: int = 0
    amp: bool = True
    # LP-FT (Kumar et al., ICLR 2022): fine-tuning from a random last layer distorts the
    # pretrained features and loses to the linear probe under distribution shift. "probe"
    # fits the last layer first (class-balanced logistic regression on the frozen features),
    # then fine-tunes everything from there; "random" is the plain SimCLRv2 step 2.
    head_init: str = "probe"
    backbone_lr_scale: float = 0.1            # encoder + head layers learn at lr * this
    # BatchNorm statistics: "pretrained" keeps the encoder's (fixed while fine-tuning),
    # "recalibrated" sets them on the labeled scans first and then keeps them, "train" lets
    # every batch update them (re-estimated on the labeled scans at the end)
    batchnorm: str = "pretrained"
    probe_c: float = 0.5                      # inverse L2 strength of the probe fit
    # the network reads each scan at this multiple of the encoder's training size (the
    # encoder's stem kept; ``network_config``): at 2 the 64 px starter fine-tunes on 128 px
    # scans, whose detail the training size averages away (docs/benchmarks.md, "Fine-tuning
    # at twice the size"); it costs about 4x the compute of 1
    input_scale: int = 1

    def __post_init__(self):
        if self.batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm must be one of {', '.join(BATCHNORM_MODES)}")
        if self.input_scale not in (1, 2, 3, 4):
            raise ValueError("input_scale must be 1, 2, 3 or 4")
        if self.head_init not in ("probe", "random"):
            raise ValueError("head_init must be probe or random")
        if not 0 <= self.backbone_lr_scale <= 1 or self.probe_c <= 0:
            raise ValueError("backbone_lr_scale must be in [0, 1] and probe_c positive")
        if self.schedule not in ("cosine", "onecycle"):
            raise ValueError("schedule must be cosine or onecycle")
        if self.loss not in ("ce", "focal"):
            raise ValueError("loss must be ce or focal")
        if self.class_balance not in ("weighted_loss", "sampler", "none"):
            raise ValueError("class_balance must be weighted_loss, sampler or none")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")


@dataclass(frozen=True)
class DistillConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 3e-4
    weight_decay: float = 1e-4
    temperature: float = 1.0                  # softening of the teacher's logits
    teacher_temperature: float | None = None  # the teacher's own, when it differs: < temperature
                                              # sharpens its soft labels (a student that starts
                                              # as its teacher only moves when they do)
    labeled_weight: float = 0.5               # alpha in (1-a)*distill + a*labeled CE
    grad_clip: float = 1.0
    seed: int = 0
    amp: bool = True
    student_init: str = "teacher"             # teacher | pretrained (random last layer)
    augment: bool = False                     # light augmentation of the unlabeled scans
    teacher_views: int = 1                    # soft labels averaged over the clean scan and
                                              # teacher_views - 1 lightly augmented views
    backbone_lr_scale: float = 0.1
    batchnorm: str = "pretrained"             # as FinetuneConfig.batchnorm (the teacher's)

    def __post_init__(self):
        if self.temperature <= 0 or not 0 <= self.labeled_weight <= 1:
            raise ValueError("temperature must be positive and labeled_weight in [0, 1]")
        if self.teacher_temperature is not None and self.teacher_temperature <= 0:
            raise ValueError("teacher_temperature must be positive (or None: temperature)")
        if self.batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm must be one of {', '.join(BATCHNORM_MODES)}")
        if not 1 <= self.teacher_views <= 32:
            raise ValueError("teacher_views must be in 1..32")
        if self.student_init not in ("teacher", "pretrained"):
            raise ValueError("student_init must be teacher or pretrained")
        if not 0 <= self.backbone_lr_scale <= 1:
            raise ValueError("backbone_lr_scale must be in [0, 1]")


def config_from_dict(cls, data: dict):
    """Rebuild a config dataclass from a checkpoint's dict, ignoring unknown keys."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names})


def check_scales(scales) -> tuple[int, ...]:
    """``scales`` as a sorted tuple of distinct positive integers, each dividing the largest
    (so every view is an exact average-pool of the largest); raises ``ValueError``."""
    try:
        out = tuple(sorted({int(s) for s in scales}))
    except (TypeError, ValueError):
        raise ValueError(f"embedding scales must be whole numbers, got {scales!r}") from None
    if not out or out[0] < 1 or out[-1] > 8:
        raise ValueError(f"embedding scales must be between 1 and 8, got {scales!r}")
    if any(out[-1] % s for s in out):
        raise ValueError(f"each embedding scale must divide the largest ({out[-1]}), "
                         f"got {scales!r}")
    return out


def check_layers(layers) -> tuple[int, ...]:
    """``layers`` (the encoder's residual stages an embedding pools, 1–4) as a sorted tuple
    of distinct integers that holds 4, the encoder's output (the stage class maps are drawn
    through); raises ``ValueError``."""
    try:
        out = tuple(sorted({int(v) for v in layers}))
    except (TypeError, ValueError):
        raise ValueError(f"embedding layers must be whole numbers, got {layers!r}") from None
    if not out or out[0] < 1 or out[-1] != 4:
        raise ValueError(f"embedding layers must be between 1 and 4 and include 4, got "
                         f"{layers!r}")
    return out


def network_config(pretrain_config: PretrainConfig, input_scale: int = 1) -> PretrainConfig:
    """The config of a network fine-tuned from an encoder of ``pretrain_config`` that reads
    scans at ``input_scale`` times the encoder's training size: the size changes, the stem
    the encoder was trained with stays (a 64 px encoder's stem is not the small-input one,
    whatever size it reads). Saved with the network's checkpoint, so everything that loads
    it (inference, distillation, export, Grad-CAM) reads scans at that size."""
    if input_scale == 1:
        return pretrain_config
    return replace(pretrain_config, image_size=pretrain_config.image_size * input_scale,
                   small_input=pretrain_config.uses_small_input)
