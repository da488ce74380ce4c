"""VICReg: invariance between the views, variance kept above a margin per dimension, covariance
between dimensions pushed to zero.

Bardes, Ponce & LeCun 2021, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning", arXiv 2105.04906. Projection head and loss from lightly, with the
paper's weights (invariance 25, variance 25, covariance 1).

Departures from the paper: expander width 2048, not 8192 (CPU budget); histology views
(``pretrain.views``).

Optimizer: not histossl's default. With SGD at the default lr (0.06) the loss diverges (the tiny
synthetic set at batch 8; idc-breast at 64 px, batch 128, within 12 steps of
``benchmarks/throughput.py``); the stage then stops with one line. The paper's LARS is stable but
learned little in a CPU budget (``docs/benchmarks/methods-ebhi/lars``); AdamW at lr 1e-3
(``pretrain.optim: {optimizer: adamw, lr: 1.0e-3}``, as ``configs/methods-ebhi.yaml``) trained it.
"""

from dataclasses import dataclass

import torch
from lightly.loss import VICRegLoss
from lightly.models.modules.heads import VICRegProjectionHead
from torch import nn

from histossl.config import PretrainConfig
from histossl.methods import METHODS
from histossl.methods.base import Method, StepOutput, collapse_metrics


@dataclass(frozen=True)
class VICRegConfig:
    projection_dim: int = 2048  # paper: 8192
    hidden_dim: int = 2048  # paper: 8192
    invariance_weight: float = 25.0  # paper lambda
    variance_weight: float = 25.0  # paper mu
    covariance_weight: float = 1.0  # paper nu


@METHODS.register("vicreg", config=VICRegConfig)
class VICReg(Method):
    def __init__(self, encoder: nn.Module, settings: VICRegConfig, pretrain: PretrainConfig, image_size: int) -> None:
        super().__init__(encoder, settings, pretrain, image_size)
        s = settings
        self.projection = VICRegProjectionHead(encoder.num_features, s.hidden_dim, s.projection_dim, num_layers=3)
        self.loss = VICRegLoss(
            s.invariance_weight, s.variance_weight, s.covariance_weight, gather_distributed=torch.distributed.is_available()
        )

    def step(self, images: torch.Tensor) -> StepOutput:
        z0, z1 = self.projection(self.encoder(torch.cat(self.draw_views(images)))).chunk(2)
        return StepOutput(self.loss(z0, z1), collapse_metrics(z0))
