"""RotNet: predict by how much an image was rotated (0, 90, 180 or 270 degrees).

Gidaris, Singh & Komodakis 2018, "Unsupervised Representation Learning by Predicting Image
Rotations", arXiv 1803.07728. Every image of the batch is shown at all four rotations (the paper
found that better than one random rotation per image) and a 4-way head predicts the rotation.
"""

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from histossl import augment
from histossl.config import PretrainConfig, ViewConfig
from histossl.methods import METHODS
from histossl.methods.base import Method, StepOutput, ViewSpec


@dataclass(frozen=True)
class RotNetConfig:
    rotation_head_hidden_dim: int = 0  # 0: a linear head on the features


def rotation_view_config(views: ViewConfig, keep_colour: bool) -> ViewConfig:
    """The base view of a rotation task: a vertical flip or a 90-degree turn would change the label."""
    colour_off = {} if keep_colour else {"color_jitter_prob": 0.0, "hed_jitter_prob": 0.0, "grayscale_prob": 0.0}
    return dataclasses.replace(views, vflip=False, rot90=False, **colour_off)


def rotations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) -> the 4B rotated copies (rotation-major) and their labels 0..3."""
    batch = x.shape[0]
    labels = torch.arange(4, device=x.device).repeat_interleave(batch)
    return augment.rotate90(x.repeat(4, 1, 1, 1), labels), labels


@METHODS.register("rotnet", config=RotNetConfig)
class RotNet(Method):
    chance = 0.25
    legacy_settings = True
    jitter_each_copy = False

    def __init__(self, encoder: nn.Module, settings: RotNetConfig, pretrain: PretrainConfig, image_size: int) -> None:
        super().__init__(encoder, settings, pretrain, image_size)
        hidden, features = settings.rotation_head_hidden_dim, encoder.num_features
        self.head = (
            nn.Linear(features, 4)
            if hidden == 0
            else nn.Sequential(nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 4))
        )

    def view_specs(self) -> list[ViewSpec]:
        """One base view per image (unnormalised); ``draw_views`` makes the four rotations from it."""
        return [ViewSpec(self.image_size, rotation_view_config(self.pretrain.views, keep_colour=False))]

    def draw_views(self, images: torch.Tensor) -> list[torch.Tensor]:
        """uint8 (B, H, W, 3) -> ``[x]``: the normalised rotated copies (4B, 3, S, S), rotation-major."""
        (spec,) = self.view_specs()
        if not self.jitter_each_copy:
            x, _ = rotations(augment.random_view(images, spec.augment, spec.size, out=self.view_buffer(0)))
            return [augment.normalize(x)]
        # RotNet+Jitter: the geometry once per image, then the pipeline's pixel steps (stain, colour and
        # grey, blur, solarize, in ``augment.PIPELINE``'s order) drawn independently for every rotated copy.
        base = augment.random_view(images, spec.augment, spec.size, out=self.view_buffer(0), steps=())
        x, _ = rotations(base)
        return [augment.normalize(augment.apply_steps(x, self.pretrain.views, inplace=True))]

    def step(self, images: torch.Tensor) -> StepOutput:
        (x,) = self.draw_views(images)
        labels = torch.arange(4, device=x.device).repeat_interleave(len(x) // 4)  # rotation-major, as ``rotations``
        logits = self.head(self.encoder(x))
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.detach().argmax(1) == labels).float().mean()
        return StepOutput(loss, {"pretext_acc": accuracy})

