"""Self-supervised methods around one encoder, for ``pretrain``'s single training loop.

- ``simclr`` (the default): SimCLRv2 — our 3-layer projection head (SimCLRv2 fine-tunes from
  its first layer, which lightly's SimCLR head does not expose) and our NT-Xent (the same
  loss as ``lightly.loss.NTXentLoss`` without a memory bank; kept so that every checkpoint
  written before keeps its meaning).
- ``moco``: a momentum key encoder (``MoCoProjectionHead``) with, by default
  (``queue_size=0``), MoCo v3's symmetric loss: each view's query against the key encoder's
  keys of the other view, the batch's other keys as negatives. ``queue_size > 0`` is MoCo
  v2's queue of negatives (``lightly.loss.NTXentLoss(memory_bank_size=...)``), which does not
  train in short CPU runs: the key encoder is still close to its random start, its keys of
  different scans are nearly parallel, and a queue full of them holds the loss near
  log(queue + 1) (docs/benchmarks.md, "Self-supervised methods side by side").
- ``byol``: BYOL — online projector + predictor against a momentum target
  (``BYOLProjectionHead``, ``BYOLPredictionHead``, ``NegativeCosineSimilarity``).
- ``swav``: SwAV — online clustering into prototypes with Sinkhorn assignments
  (``SwaVProjectionHead``, ``SwaVPrototypes``, ``SwaVLoss``), two views, no multi-crop.
- ``dino``: DINO — a momentum teacher, centring and sharpening (``DINOProjectionHead``,
  ``DINOLoss``).

Heads, losses, the memory bank and the momentum updates come from ``lightly`` (imported only
here, when a non-SimCLR method is trained). Every method exposes ``encoder`` (the network
the product embeds with) and ``head`` (what a checkpoint stores as ``head``; only SimCLR's is
used downstream), ``loss(view_a, view_b, epoch=...)`` and ``after_step(step, total_steps)``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ml_backend.ssl.config import SSL_METHODS, PretrainConfig
from ml_backend.ssl.losses import NTXentLoss
from ml_backend.ssl.models import SimCLRModel

__all__ = ["SSL_METHODS", "SSLMethod", "build_method"]


class SSLMethod(nn.Module):
    """An encoder, a head and a loss on two augmented views."""

    name = "base"
    encoder: nn.Module
    head: nn.Module

    def loss(self, view_a: torch.Tensor, view_b: torch.Tensor, *, epoch: int) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """After each optimizer step (momentum updates)."""

    def projection(self) -> nn.Module:
        """Encoder followed by the head: what BatchNorm recalibration runs."""
        return nn.Sequential(self.encoder, self.head)

    def start(self) -> None:
        """After the initial weights are loaded: copy them into the momentum networks."""


class SimCLR(SSLMethod):
    name = "simclr"

    def __init__(self, config: PretrainConfig):
        super().__init__()
        self.model = SimCLRModel(config)
        self.encoder, self.head = self.model.encoder, self.model.head
        self.criterion = NTXentLoss(config.temperature)

    def loss(self, view_a, view_b, *, epoch):
        z = self.model(torch.cat([view_a, view_b]))
        return self.criterion(*z.float().chunk(2))

    def projection(self) -> nn.Module:
        return self.model


class _Momentum(SSLMethod):
    """Methods with a momentum copy (teacher / target / key) of encoder and head."""

    def __init__(self, config: PretrainConfig):
        super().__init__()
        self.base_momentum = config.momentum

    def start(self) -> None:
        from lightly.models.utils import deactivate_requires_grad

        self.teacher_encoder = copy.deepcopy(self.encoder)
        self.teacher_head = self.new_head()            # weight-normed heads cannot be deep-copied
        self.teacher_head.load_state_dict(self.head.state_dict())
        deactivate_requires_grad(self.teacher_encoder)
        deactivate_requires_grad(self.teacher_head)

    def new_head(self) -> nn.Module:
        return copy.deepcopy(self.head)

    @torch.no_grad()
    def teacher(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher_head(self.teacher_encoder(x))

    def after_step(self, step: int, total_steps: int) -> None:
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        m = cosine_schedule(step, max(total_steps, 1), self.base_momentum, 1.0)
        update_momentum(self.encoder, self.teacher_encoder, m=m)
        update_momentum(self.head, self.teacher_head, m=m)


class MoCo(_Momentum):
    name = "moco"

    def __init__(self, config: PretrainConfig, *, num_images: int):
        super().__init__(config)
        from lightly.loss import NTXentLoss as LightlyNTXent
        from lightly.models.modules import MoCoProjectionHead

        self.encoder = SimCLRModel(config).encoder
        self.head = MoCoProjectionHead(self.encoder.feature_dim, config.proj_hidden_dim,
                                       config.proj_out_dim)
        self.temperature = config.temperature
        if config.queue_size == 0:                 # MoCo v3's in-batch symmetric loss
            self.queue_size, self.criterion = 0, None
            return
        # a queue longer than half the data would hold stale copies of the batch's own scans
        queue = max(config.batch_size, min(config.queue_size, num_images // 2))
        self.queue_size = queue
        self.criterion = LightlyNTXent(temperature=config.temperature,
                                       memory_bank_size=(queue, config.proj_out_dim))

    def loss(self, view_a, view_b, *, epoch):
        if self.criterion is None:
            both = torch.cat([view_a, view_b])
            q_a, q_b = self.head(self.encoder(both)).float().chunk(2)
            k_a, k_b = self.teacher(both).float().chunk(2)
            return self._contrast(q_a, k_b) + self._contrast(q_b, k_a)
        query = self.head(self.encoder(view_a)).float()
        key = self.teacher(view_b).float()
        return self.criterion(query, key)

    def _contrast(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """MoCo v3's loss: cross-entropy of each query against every key of the batch, its
        own scan's key the target, scaled by 2 τ as in the paper."""
        logits = F.normalize(query, dim=1) @ F.normalize(key, dim=1).T / self.temperature
        target = torch.arange(len(query), device=query.device)
        return F.cross_entropy(logits, target) * 2 * self.temperature


class BYOL(_Momentum):
    name = "byol"

    def __init__(self, config: PretrainConfig):
        super().__init__(config)
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

        self.encoder = SimCLRModel(config).encoder
        self.head = BYOLProjectionHead(self.encoder.feature_dim, config.proj_hidden_dim * 2,
                                       config.proj_out_dim * 2)
        self.predictor = BYOLPredictionHead(config.proj_out_dim * 2, config.proj_hidden_dim * 2,
                                            config.proj_out_dim * 2)
        self.criterion = NegativeCosineSimilarity()

    def loss(self, view_a, view_b, *, epoch):
        both = torch.cat([view_a, view_b])
        p_a, p_b = self.predictor(self.head(self.encoder(both))).float().chunk(2)
        z_a, z_b = self.teacher(both).float().chunk(2)
        return 0.5 * (self.criterion(p_a, z_b) + self.criterion(p_b, z_a))


class SwAV(SSLMethod):
    name = "swav"

    def __init__(self, config: PretrainConfig):
        super().__init__()
        from lightly.loss import SwaVLoss
        from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes

        self.encoder = SimCLRModel(config).encoder
        self.head = SwaVProjectionHead(self.encoder.feature_dim, config.proj_hidden_dim,
                                       config.proj_out_dim)
        self.prototypes = SwaVPrototypes(config.proj_out_dim, n_prototypes=config.prototypes,
                                         n_steps_frozen_prototypes=config.frozen_prototype_steps)
        self.criterion = SwaVLoss(temperature=0.1)
        self.step = 0

    def loss(self, view_a, view_b, *, epoch):
        self.prototypes.normalize()
        z = F.normalize(self.head(self.encoder(torch.cat([view_a, view_b]))).float(), dim=1)
        scores = self.prototypes(z, step=self.step)
        return self.criterion(list(scores.chunk(2)), [])

    def after_step(self, step: int, total_steps: int) -> None:
        self.step = step


class DINO(_Momentum):
    name = "dino"

    def __init__(self, config: PretrainConfig):
        super().__init__(config)
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead

        self.encoder = SimCLRModel(config).encoder
        self.new_head = lambda: DINOProjectionHead(
            self.encoder.feature_dim, config.proj_hidden_dim, config.proj_out_dim,
            config.dino_out_dim, batch_norm=True)
        self.head = self.new_head()
        self.criterion = DINOLoss(output_dim=config.dino_out_dim,
                                  warmup_teacher_temp_epochs=max(1, config.epochs // 3))

    def loss(self, view_a, view_b, *, epoch):
        both = torch.cat([view_a, view_b])
        teacher = list(self.teacher(both).float().chunk(2))
        student = list(self.head(self.encoder(both)).float().chunk(2))
        return self.criterion(teacher, student, epoch=epoch)


def build_method(config: PretrainConfig, *, num_images: int) -> SSLMethod:
    if config.method == "simclr":
        return SimCLR(config)
    if config.method == "moco":
        return MoCo(config, num_images=num_images)
    if config.method == "byol":
        return BYOL(config)
    if config.method == "swav":
        return SwAV(config)
    if config.method == "dino":
        return DINO(config)
    raise ValueError(f"unknown method {config.method!r}: use one of {', '.join(SSL_METHODS)}")
