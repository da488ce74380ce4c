"""SimSiam: each view's prediction matches the other view's projection, with a stop-gradient.

Chen & He 2020, "Exploring Simple Siamese Representation Learning", arXiv 2011.10566. Projection and
prediction heads from lightly (3-layer projector, bottleneck predictor), negative cosine similarity
symmetrised, no momentum encoder, no negatives: the stop-gradient alone prevents collapse, which is
why SimSiam logs the collapse signal the paper introduced (std of the normalised projections).

Departures from the paper: histology views (``pretrain.views``) for both views; the shared
optimizer (``pretrain.optim``) rather than the paper's fixed predictor learning rate.
"""

from dataclasses import dataclass

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead
from torch import nn

from histossl.config import PretrainConfig
from histossl.methods import METHODS
from histossl.methods.base import Method, StepOutput, collapse_metrics


@dataclass(frozen=True)
class SimSiamConfig:
    projection_dim: int = 2048  # paper: 2048
    prediction_hidden_dim: int = 512  # paper: 512 (the bottleneck)


@METHODS.register("simsiam", config=SimSiamConfig)
class SimSiam(Method):
    def __init__(self, encoder: nn.Module, settings: SimSiamConfig, pretrain: PretrainConfig, image_size: int) -> None:
        super().__init__(encoder, settings, pretrain, image_size)
        d = settings.projection_dim
        self.projection = SimSiamProjectionHead(encoder.num_features, d, d)
        self.prediction = SimSiamPredictionHead(d, settings.prediction_hidden_dim, d)
        self.loss = NegativeCosineSimilarity()

    def step(self, images: torch.Tensor) -> StepOutput:
        z = self.projection(self.encoder(torch.cat(self.draw_views(images))))
        p0, p1 = self.prediction(z).chunk(2)
        z0, z1 = z.detach().chunk(2)  # the stop-gradient
        return StepOutput(0.5 * (self.loss(p0, z1) + self.loss(p1, z0)), collapse_metrics(z0))
