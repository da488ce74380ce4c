"""MoCo v3 (ResNet): each view's prediction must pick the momentum encoder's key of the other view
among the keys of the batch; symmetric loss.

Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers", arXiv
2104.02057, the ResNet variant: 3-layer projector and 2-layer predictor with batch norm (lightly's
``MoCoProjectionHead``), loss ``2 tau * CE(q k^T / tau, identity)`` summed over both directions,
momentum from 0.99 to 1 on a cosine schedule, temperature 1.0 (the paper's ResNet setting).

Departures from the paper: hidden width 2048, not 4096 (CPU budget); keys of the local batch only
(the paper gathers them across GPUs: with one device there is nothing to gather); histology views
(``pretrain.views``) for both views.
"""

from dataclasses import dataclass

import torch
from lightly.models.modules import MoCoProjectionHead
from torch import nn
from torch.nn import functional as F

from histossl.config import PretrainConfig
from histossl.methods import METHODS
from histossl.methods.base import Method, StepOutput, momentum_copy


@dataclass(frozen=True)
class MoCoV3Config:
    temperature: float = 1.0  # paper (ResNet-50): 1.0
    projection_dim: int = 256  # paper: 256
    hidden_dim: int = 2048  # paper: 4096
    momentum: float = 0.99  # paper: 0.99, to 1 on a cosine schedule
    momentum_end: float = 1.0


def contrastive(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's loss for queries ``q`` and keys ``k`` ``(batch, dim)``: row i's positive is key i."""
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / temperature
    return 2 * temperature * F.cross_entropy(logits, torch.arange(len(q), device=q.device))


@METHODS.register("moco_v3", config=MoCoV3Config)
class MoCoV3(Method):
    def __init__(self, encoder: nn.Module, settings: MoCoV3Config, pretrain: PretrainConfig, image_size: int) -> None:
        super().__init__(encoder, settings, pretrain, image_size)
        s = settings
        self.projection = MoCoProjectionHead(encoder.num_features, s.hidden_dim, s.projection_dim, num_layers=3, batch_norm=True)
        self.prediction = MoCoProjectionHead(s.projection_dim, s.hidden_dim, s.projection_dim, num_layers=2, batch_norm=True)
        self.key_encoder = momentum_copy(encoder)
        self.key_projection = momentum_copy(self.projection)
        self.chance = 1.0 / pretrain.batch_size

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.key_encoder), (self.projection, self.key_projection)]

    def step(self, images: torch.Tensor) -> StepOutput:
        views = self.draw_views(images)
        q0, q1 = self.prediction(self.projection(self.encoder(torch.cat(views)))).chunk(2)
        with torch.no_grad():
            k0, k1 = self.key_projection(self.key_encoder(torch.cat(views))).chunk(2)
            sim = F.normalize(q0.detach(), dim=1) @ F.normalize(k1, dim=1).T
            accuracy = (sim.argmax(1) == torch.arange(len(sim), device=sim.device)).float().mean()
        t = self.settings.temperature
        return StepOutput(contrastive(q0, k1, t) + contrastive(q1, k0, t), {"pretext_acc": accuracy})
