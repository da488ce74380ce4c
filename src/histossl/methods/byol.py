"""BYOL: the online network predicts the target network's projection of the other view.

Grill et al. 2020, "Bootstrap Your Own Latent", arXiv 2006.07733. Projection and prediction heads
from lightly, negative cosine similarity symmetrised over the two views, target = EMA of the online
encoder and projection with momentum from ``momentum`` to 1 on a cosine schedule. The two views are
asymmetric as in the paper: blur with probability 1.0 and 0.1, solarize with probability 0 and 0.2.

Departures from the paper: momentum starts at 0.99, not 0.996 (a few hundred steps on a CPU); the
views are the histology views of ``pretrain.views`` (90-degree turns, HED stain jitter, milder hue)
with the paper's per-view blur and solarize; the blur sigma is ``pretrain.views.blur_sigma_max``
pixels of the output view (small patches).
"""

import dataclasses
from dataclasses import dataclass, field

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from torch import nn

from histossl.config import PretrainConfig
from histossl.errors import ConfigError
from histossl.methods import METHODS
from histossl.methods.base import Method, StepOutput, ViewSpec, collapse_metrics, momentum_copy


@dataclass(frozen=True)
class BYOLConfig:
    projection_dim: int = 256  # paper: 256
    hidden_dim: int = 4096  # paper: 4096
    momentum: float = 0.99  # paper: 0.996
    momentum_end: float = 1.0  # paper: 1
    blur_probs: list[float] = field(default_factory=lambda: [1.0, 0.1])  # per view, paper
    solarize_probs: list[float] = field(default_factory=lambda: [0.0, 0.2])  # per view, paper


def two_asymmetric_views(method: Method, blur: list[float], solarize: list[float]) -> list[ViewSpec]:
    """BYOL's two views: the shared views with each view's own blur and solarize probability."""
    return [
        ViewSpec(method.image_size, dataclasses.replace(method.pretrain.views, blur_prob=b, solarize_prob=s))
        for b, s in zip(blur, solarize)
    ]


@METHODS.register("byol", config=BYOLConfig)
class BYOL(Method):
    def __init__(self, encoder: nn.Module, settings: BYOLConfig, pretrain: PretrainConfig, image_size: int) -> None:
        super().__init__(encoder, settings, pretrain, image_size)
        s = settings
        self.projection = BYOLProjectionHead(encoder.num_features, s.hidden_dim, s.projection_dim)
        self.prediction = BYOLPredictionHead(s.projection_dim, s.hidden_dim, s.projection_dim)
        self.target_encoder = momentum_copy(encoder)
        self.target_projection = momentum_copy(self.projection)
        self.loss = NegativeCosineSimilarity()

    def view_specs(self) -> list[ViewSpec]:
        return two_asymmetric_views(self, self.settings.blur_probs, self.settings.solarize_probs)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.target_encoder), (self.projection, self.target_projection)]

    def step(self, images: torch.Tensor) -> StepOutput:
        x = torch.cat(self.draw_views(images))
        z = self.projection(self.encoder(x))
        p0, p1 = self.prediction(z).chunk(2)
        with torch.no_grad():
            t0, t1 = self.target_projection(self.target_encoder(x)).chunk(2)
        loss = 0.5 * (self.loss(p0, t1) + self.loss(p1, t0))
        return StepOutput(loss, collapse_metrics(z.chunk(2)[0]))

    @classmethod
    def check(cls, settings: BYOLConfig, pretrain: PretrainConfig, image_size: int, key: str) -> None:
        for name in ("blur_probs", "solarize_probs"):
            values = getattr(settings, name)
            if len(values) != 2 or not all(0 <= v <= 1 for v in values):
                raise ConfigError(f"{key}.{name}: expected two probabilities (one per view), got {values}")
