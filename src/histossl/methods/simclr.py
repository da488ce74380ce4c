"""SimCLR: two random views of each image must be each other's nearest neighbour.

Chen, Kornblith, Norouzi & Hinton 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", arXiv 2002.05709. NT-Xent loss and projection head from lightly. The views are
histology views (``pretrain.views``): crops, flips, 90-degree turns, colour and HED stain jitter,
grey level and blur, drawn independently for each view on the training device.
"""

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import nn
from torch.nn import functional as F

from histossl import augment
from histossl.config import PretrainConfig
from histossl.methods import METHODS, PretextOutput


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


@METHODS.register("simclr")
class SimCLR(nn.Module):
    def __init__(self, num_features: int, cfg: PretrainConfig, image_size: int) -> None:
        super().__init__()
        m = cfg.method
        self.projection = SimCLRProjectionHead(num_features, m.projection_hidden_dim, m.projection_dim)
        # Under DDP the negatives come from every process's batch, as in the paper; lightly gathers
        # only when a process group with more than one process exists, so this is a no-op on one device.
        self.loss = NTXentLoss(temperature=m.temperature, gather_distributed=torch.distributed.is_available())
        self.views = cfg.views
        self.image_size = image_size
        self.chance = 1.0 / (2 * cfg.batch_size - 1)

    def step(self, encoder: nn.Module, images: torch.Tensor) -> PretextOutput:
        # Both views in one call: each of the 2B rows gets its own random parameters, and the views
        # come out as one tensor (no concatenation of two float batches).
        views = augment.random_view(torch.cat([images, images]), self.views, self.image_size, normalized=True)
        z0, z1 = self.projection(encoder(views)).chunk(2)
        return PretextOutput(self.loss(z0, z1), positive_is_nearest(z0.detach(), z1.detach()))
