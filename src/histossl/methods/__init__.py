"""Pretext methods, one short file each, registered by name in ``METHODS``.

A method is an ``nn.Module`` that holds its head and loss and draws its own views. It is built as
``METHODS.get(name)(num_features, cfg)`` from the encoder's feature size and the pretraining config,
and trained by ``histossl.train.pretrain`` through one call per batch::

    out = method.step(encoder, images)   # images: uint8 (B, H, W, 3) on the training device
    out.loss, out.accuracy               # scalar tensors; accuracy of the pretext task

``method.chance`` is the pretext accuracy of guessing, so the report can flag an encoder that learnt
nothing from its pretext task.
"""

from dataclasses import dataclass

import torch

from histossl.registry import Registry

METHODS: Registry[type] = Registry("method")


@dataclass
class PretextOutput:
    loss: torch.Tensor  # scalar, differentiable
    accuracy: torch.Tensor  # scalar in [0, 1], no gradient


# Importing the modules registers them.
from histossl.methods import rotnet, rotnet_jitter, simclr  # noqa: E402,F401
