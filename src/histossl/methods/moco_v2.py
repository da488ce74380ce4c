"""MoCo v2: a query must pick its key (the other view, through a momentum encoder) out of a queue.

Chen, Fan, Girshick & He 2020, "Improved Baselines with Momentum Contrastive Learning", arXiv
2003.04297 (MoCo: He et al. 2019, arXiv 1911.05722). InfoNCE over the key and a queue of earlier keys
(lightly's ``NTXentLoss`` with its ``MemoryBankModule``), MLP projection head, key encoder and head
updated by EMA.

Departures from the paper: a queue of 512 keys, not 65536 (it has to stay below the number of
pretraining images, or a positive's own older key becomes a negative; 65536 is 5% of ImageNet);
momentum 0.99 rather than 0.999 (runs of a few hundred steps on a CPU: the key encoder has to follow);
no shuffled batch norm (one device; the paper shuffles across 8 GPUs so the key batch statistics do
not leak); histology views (``pretrain.views``) for both views.
"""

from dataclasses import dataclass

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from torch import nn
from torch.nn import functional as F

from histossl.config import PretrainConfig
from histossl.methods import METHODS
from histossl.methods.base import Method, StepOutput, momentum_copy


@dataclass(frozen=True)
class MoCoV2Config:
    temperature: float = 0.2  # paper: 0.2
    queue_size: int = 512  # paper: 65536; at most the number of pretraining images
    projection_dim: int = 128  # paper: 128
    projection_hidden_dim: int = 2048  # paper: 2048
    momentum: float = 0.99  # paper: 0.999 (constant)
    momentum_end: float = 0.99  # equal to momentum: constant, as in the paper


@METHODS.register("moco_v2", config=MoCoV2Config)
class MoCoV2(Method):
    def __init__(self, encoder: nn.Module, settings: MoCoV2Config, pretrain: PretrainConfig, image_size: int) -> None:
        super().__init__(encoder, settings, pretrain, image_size)
        self.projection = MoCoProjectionHead(encoder.num_features, settings.projection_hidden_dim, settings.projection_dim)
        self.key_encoder = momentum_copy(encoder)
        self.key_projection = momentum_copy(self.projection)
        # Under DDP every process queues the keys of all processes (gathered), as in the paper.
        self.loss = NTXentLoss(
            temperature=settings.temperature,
            memory_bank_size=(settings.queue_size, settings.projection_dim),
            gather_distributed=torch.distributed.is_available(),
        )
        # lightly registers the queue as non-persistent buffers: a resumed run would start from a fresh
        # random queue (lightly-train PR #301). Persistent here, so the checkpoint holds it.
        bank = self.loss.memory_bank
        bank.register_buffer("bank", bank.bank, persistent=True)
        bank.register_buffer("bank_ptr", bank.bank_ptr, persistent=True)
        self.chance = 1.0 / (settings.queue_size + 1)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.key_encoder), (self.projection, self.key_projection)]

    def step(self, images: torch.Tensor) -> StepOutput:
        x0, x1 = self.draw_views(images)
        query = self.projection(self.encoder(x0))  # (B, projection_dim)
        with torch.no_grad():
            key = self.key_projection(self.key_encoder(x1))
            # Pretext accuracy (MoCo's acc@1): the key scores above every queued key; before the loss
            # call, which pushes this batch's keys into the queue.
            q, k = F.normalize(query.detach(), dim=1), F.normalize(key, dim=1)
            negatives = q @ self.loss.memory_bank.bank.to(q.dtype).T  # bank: (queue_size, projection_dim)
            accuracy = ((q * k).sum(1) > negatives.max(1).values).float().mean()
        return StepOutput(self.loss(query, key), {"pretext_acc": accuracy})

    @classmethod
    def min_images(cls, settings: MoCoV2Config, pretrain: PretrainConfig) -> tuple[int, str]:
        if settings.queue_size > pretrain.batch_size:
            return settings.queue_size, "pretrain.methods.moco_v2.queue_size"
        return pretrain.batch_size, "pretrain.batch_size"

    @classmethod
    def check(cls, settings: MoCoV2Config, pretrain: PretrainConfig, image_size: int, key: str) -> None:
        from histossl.errors import ConfigError

        if settings.queue_size < 1:
            raise ConfigError(f"{key}.queue_size: must be at least 1, got {settings.queue_size}")
        if settings.temperature <= 0:
            raise ConfigError(f"{key}.temperature: must be positive, got {settings.temperature}")
