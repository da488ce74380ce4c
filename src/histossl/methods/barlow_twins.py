"""Barlow Twins: the cross-correlation of the two views' projections is pushed to the identity.

Zbontar, Jing, Misra, LeCun & Deny 2021, "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction", arXiv 2103.03230. Projection head and loss from lightly (on-diagonal terms to 1,
off-diagonal terms to 0 weighted by ``lambda``).

Departures from the paper: projector width 2048, not 8192 (CPU budget; the paper's figure 4 loses a
few points of accuracy at 2048, and lambda stays at its 5e-3); histology views (``pretrain.views``).

Optimizer: the paper trains with LARS; use ``pretrain.optim.optimizer: lars``. With SGD at the
default lr (0.06) the loss diverged on the tiny synthetic set at batch 8 (the stage then stops with
one line), while LARS at the same lr was stable (measured, 16 px, 4 epochs).
"""

from dataclasses import dataclass

import torch
from lightly.loss import BarlowTwinsLoss
from lightly.models.modules import BarlowTwinsProjectionHead
from torch import nn

from histossl.config import PretrainConfig
from histossl.methods import METHODS
from histossl.methods.base import Method, StepOutput, collapse_metrics


@dataclass(frozen=True)
class BarlowTwinsConfig:
    projection_dim: int = 2048  # paper: 8192
    hidden_dim: int = 2048  # paper: 8192
    lambda_offdiagonal: float = 5e-3  # paper: 5e-3


@METHODS.register("barlow_twins", config=BarlowTwinsConfig)
class BarlowTwins(Method):
    def __init__(self, encoder: nn.Module, settings: BarlowTwinsConfig, pretrain: PretrainConfig, image_size: int) -> None:
        super().__init__(encoder, settings, pretrain, image_size)
        self.projection = BarlowTwinsProjectionHead(encoder.num_features, settings.hidden_dim, settings.projection_dim)
        # Under DDP the cross-correlation sums every process's batch (lightly gathers only when a
        # process group with more than one process exists).
        self.loss = BarlowTwinsLoss(settings.lambda_offdiagonal, gather_distributed=torch.distributed.is_available())

    def step(self, images: torch.Tensor) -> StepOutput:
        z0, z1 = self.projection(self.encoder(torch.cat(self.draw_views(images)))).chunk(2)
        return StepOutput(self.loss(z0, z1), collapse_metrics(z0))
