"""SimCLR: two random views of each image must be each other's nearest neighbour.

Chen, Kornblith, Norouzi & Hinton 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", arXiv 2002.05709. NT-Xent loss and projection head from lightly. The views are
histology views (``pretrain.views``): crops, flips, 90-degree turns, colour and HED stain jitter,
grey level and blur, drawn independently for each view on the training device.
"""

from dataclasses import dataclass

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import nn
from torch.nn import functional as F

from histossl.config import PretrainConfig
from histossl.methods import METHODS
from histossl.methods.base import Method, StepOutput


@dataclass(frozen=True)
class SimCLRConfig:
    temperature: float = 0.2  # NT-Xent temperature (the paper's 0.1-0.5; 0.2 suits small batches)
    projection_dim: int = 128
    projection_hidden_dim: int = 512


def positive_is_nearest(z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    """Fraction of the 2B embeddings whose nearest other embedding is their positive.

    Args:
        z0: (B, D) projections of the first views.
        z1: (B, D) projections of the second views.
    """
    z = F.normalize(torch.cat([z0, z1]), dim=1)
    sim = z @ z.T
    sim.fill_diagonal_(float("-inf"))
    batch = z0.shape[0]
    positive = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)]).to(z.device)
    return (sim.argmax(1) == positive).float().mean()


@METHODS.register("simclr", config=SimCLRConfig)
class SimCLR(Method):
    legacy_settings = True

    def __init__(self, encoder: nn.Module, settings: SimCLRConfig, pretrain: PretrainConfig, image_size: int) -> None:
        super().__init__(encoder, settings, pretrain, image_size)
        self.projection = SimCLRProjectionHead(encoder.num_features, settings.projection_hidden_dim, settings.projection_dim)
        # Under DDP the negatives come from every process's batch, as in the paper; lightly gathers
        # only when a process group with more than one process exists, so this is a no-op on one device.
        self.loss = NTXentLoss(temperature=settings.temperature, gather_distributed=torch.distributed.is_available())
        self.chance = 1.0 / (2 * pretrain.batch_size - 1)

    def step(self, images: torch.Tensor) -> StepOutput:
        # Both views through the encoder in one call (batch-norm statistics over the 2B views).
        z0, z1 = self.projection(self.encoder(torch.cat(self.draw_views(images)))).chunk(2)
        return StepOutput(self.loss(z0, z1), {"pretext_acc": positive_is_nearest(z0.detach(), z1.detach())})
