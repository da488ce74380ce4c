"""The method interface: what a pretext method declares, and what this base class does for it.

A method is an ``nn.Module`` built as ``Method(encoder, settings, pretrain, image_size)`` from the
encoder it trains, its own settings dataclass (registered with it), the shared pretraining settings
and the image side. It declares:

- ``view_specs()``: the views drawn from each image (side, crop scale, colour/HED/blur/solarize), in
  order; DINO gives 2 global then N local crops. ``draw_views`` draws them with ``augment.random_view``.
- ``step(images)``: a ``StepOutput`` with the loss and a dict of scalar metrics. A method whose
  task has an accuracy sets ``chance`` (its accuracy when guessing) and returns ``pretext_acc``; the
  others return the collapse signal of ``collapse_metrics`` (``embedding_std``, ``effective_rank``).
- ``momentum_pairs()``: ``(student, teacher)`` modules; after every optimizer step the base class
  moves each teacher towards its student with ``momentum(step, total_steps)`` (solo-learn's
  ``momentum_pairs``, lightly's ``update_momentum`` and ``cosine_schedule``). ``after_optimizer_step``
  is the hook; methods with other schedules (DINO's teacher temperature) extend it.
- ``trained_parameters()``: what the optimizer updates (by default every parameter that requires a
  gradient; a teacher made by ``momentum_copy`` does not).
- ``exported_encoder()``: the network written to ``encoder.safetensors`` (DINO exports its teacher).

State that must survive a resume (teachers, queues, centres, schedule values) lives in parameters
or persistent buffers, so Lightning's checkpoint holds it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.debug import std_of_l2_normalized
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from histossl import augment
from histossl.config import PretrainConfig, ViewConfig


@dataclass(frozen=True)
class ViewSpec:
    """One view drawn from every image: its side in pixels and its augmentation settings."""

    size: int
    augment: ViewConfig


@dataclass
class StepOutput:
    """One training step: the loss (scalar, differentiable) and scalar metrics (no gradient)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


# Columns a method without a pretext accuracy writes to metrics.csv.
COLLAPSE_METRICS = ["embedding_std", "effective_rank"]


@torch.no_grad()
def collapse_metrics(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Collapse signal of a batch of embeddings ``(batch, dim)``.

    ``embedding_std``: mean per-dimension std of the L2-normalised embeddings (SimSiam, Chen & He 2020,
    arXiv 2011.10566): 0 when every image maps to one vector, about ``1/sqrt(dim)`` when they spread.
    ``effective_rank``: RankMe (Garrido et al. 2022, arXiv 2210.02885), ``exp`` of the entropy of the
    normalised singular values: 1 when collapsed to a line, at most ``min(batch, dim)``.
    """
    z = z.detach().float()
    finite = torch.isfinite(z).all()  # a diverged step gives NaN metrics (the loss check stops the run), not an SVD error
    z = torch.where(finite, z, torch.zeros_like(z))
    singular = torch.linalg.svdvals(z)
    p = singular / singular.sum().clamp(min=1e-12) + 1e-12
    nan = torch.tensor(float("nan"), device=z.device)
    return {
        "embedding_std": torch.where(finite, std_of_l2_normalized(z), nan),
        "effective_rank": torch.where(finite, torch.exp(-(p * p.log()).sum()), nan),
    }


def momentum_copy(module: nn.Module) -> nn.Module:
    """A teacher: a copy of ``module`` that is never trained by the optimizer, only moved by EMA."""
    teacher = copy.deepcopy(module)
    deactivate_requires_grad(teacher)
    return teacher


class Method(nn.Module):
    """Base of every pretext method; see the module docstring for what a method declares."""

    chance: float | None = None  # pretext accuracy of guessing; None: the task has no accuracy
    # True for rotnet, rotnet_jitter and simclr: they also read ``pretrain.method``, and that whole
    # block is hashed into their stage folders (as before the interface existed, so names are stable).
    legacy_settings = False

    def __init__(self, encoder: nn.Module, settings, pretrain: PretrainConfig, image_size: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.settings = settings
        self.pretrain = pretrain
        self.image_size = image_size

    # -- declared by the method ---------------------------------------------------------------

    def view_specs(self) -> list[ViewSpec]:
        """Two views with the shared ``pretrain.views`` at the image side (SimCLR, MoCo, ...)."""
        return [ViewSpec(self.image_size, self.pretrain.views)] * 2

    def step(self, images: torch.Tensor) -> StepOutput:
        """Loss and metrics of one batch of uint8 images ``(B, H, W, 3)`` on the training device."""
        raise NotImplementedError

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(student, teacher)`` pairs moved by EMA after each optimizer step."""
        return []

    def momentum(self, step: int, total_steps: int) -> float:
        """Teacher momentum at ``step``: cosine from ``settings.momentum`` to ``settings.momentum_end``
        (BYOL, arXiv 2006.07733, eq. in section 3.3)."""
        start = getattr(self.settings, "momentum", 1.0)
        return cosine_schedule(step, total_steps, start, getattr(self.settings, "momentum_end", start))

    def exported_encoder(self) -> nn.Module:
        """The network saved as ``encoder.safetensors``."""
        return self.encoder

    @classmethod
    def check(cls, settings, pretrain: PretrainConfig, image_size: int, key: str) -> None:
        """Raise a ConfigError naming ``key.<field>`` for settings that cannot work together."""

    @classmethod
    def min_images(cls, settings, pretrain: PretrainConfig) -> tuple[int, str]:
        """Fewest pretraining images this method can run on, and the setting that asks for them."""
        return pretrain.batch_size, "pretrain.batch_size"

    # -- done by the base ---------------------------------------------------------------------

    @property
    def metric_names(self) -> list[str]:
        """The metrics ``step`` returns, in the order of the metrics.csv columns."""
        return ["pretext_acc"] if self.chance is not None else COLLAPSE_METRICS

    def draw_views(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The views of ``view_specs``, each a normalised float ``(B, 3, size, size)``.

        Consecutive views with equal specs are drawn in one ``random_view`` call on the repeated
        batch (every row still gets its own random parameters), which is what SimCLR always did.
        """
        specs, views, i = self.view_specs(), [], 0
        while i < len(specs):
            n = 1
            while i + n < len(specs) and specs[i + n] == specs[i]:
                n += 1
            batch = images if n == 1 else torch.cat([images] * n)
            views += augment.random_view(batch, specs[i].augment, specs[i].size, normalized=True, out=self.view_buffer(i)).chunk(n)
            i += n
        return views

    def view_buffer(self, key: int) -> augment.ViewBuffer:
        """The CPU output memory of the views drawn at ``key`` (one per call site), reused across steps.

        A view stays valid through the next step (``augment.ViewBuffer``): ``step`` is done with it,
        backward included, before the step after draws again.
        """
        buffers = self.__dict__.setdefault("_view_buffers", {})  # plain attribute: not state, not a module
        return buffers.setdefault(key, augment.ViewBuffer())

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called after optimizer step ``step`` (1-based count of steps done) of ``total_steps``."""
        pairs = self.momentum_pairs()
        if pairs:
            m = self.momentum(step, total_steps)
            for student, teacher in pairs:
                update_momentum(student, teacher, m)

    def trained_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of everything the optimizer updates."""
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)
