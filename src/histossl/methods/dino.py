"""DINO: the student matches the centred, sharpened output of a momentum teacher across crops.

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers", arXiv 2104.14294.
Multi-crop: 2 global crops go through the teacher, the 2 global and N local crops through the
student; head and loss (centring with momentum 0.9, teacher temperature) from lightly. The teacher
temperature warms up linearly from ``warmup_teacher_temp`` to ``teacher_temp`` over the first
``teacher_temp_warmup_fraction`` of the steps (the paper: 0.04 to 0.07 over 30 epochs). The
teacher (encoder + head) is an EMA of the student, and the teacher's encoder is the one exported,
as the paper evaluates the teacher. Per-view blur and solarize as the paper's (1.0 / 0.1 and 0 / 0.2
on the globals, blur 0.5 on the locals).

Departures from the paper: 4096 prototypes, not 65536 (CPU budget, small data sets); momentum from
0.99, not 0.996 (short runs); local crops of 3/7 of the image side (the paper's 96 of 224) at small
image sizes; no freezing of the last layer in the first epoch, no gradient clipping and no weight
decay schedule (the shared ``pretrain.optim``); histology views (``pretrain.views``).
"""

import dataclasses
from dataclasses import dataclass, field

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad
from torch import nn

from histossl.config import PretrainConfig
from histossl.errors import ConfigError
from histossl.methods import METHODS
from histossl.methods.base import Method, StepOutput, ViewSpec, collapse_metrics, momentum_copy


@dataclass(frozen=True)
class DINOConfig:
    local_crops: int = 6  # paper: 6 (ResNet-50) to 10
    local_crop_size: int | None = None  # side in pixels; None: 3/7 of image_size (96 of 224)
    local_crop_scale_min: float = 0.05  # paper: 0.05
    local_crop_scale_max: float = 0.4  # paper: 0.4
    output_dim: int = 4096  # paper: 65536
    hidden_dim: int = 2048  # paper: 2048
    bottleneck_dim: int = 256  # paper: 256
    student_temp: float = 0.1  # paper: 0.1
    warmup_teacher_temp: float = 0.04  # paper: 0.04
    teacher_temp: float = 0.07  # paper: 0.04-0.07
    teacher_temp_warmup_fraction: float = 0.3  # paper: 30 epochs of 100
    center_momentum: float = 0.9  # paper: 0.9
    momentum: float = 0.99  # paper: 0.996
    momentum_end: float = 1.0  # paper: 1
    global_blur_probs: list[float] = field(default_factory=lambda: [1.0, 0.1])
    global_solarize_probs: list[float] = field(default_factory=lambda: [0.0, 0.2])
    local_blur_prob: float = 0.5


def local_side(settings: DINOConfig, image_size: int) -> int:
    return settings.local_crop_size if settings.local_crop_size is not None else max(8, round(image_size * 3 / 7))


@METHODS.register("dino", config=DINOConfig)
class DINO(Method):
    def __init__(self, encoder: nn.Module, settings: DINOConfig, pretrain: PretrainConfig, image_size: int) -> None:
        super().__init__(encoder, settings, pretrain, image_size)
        s = settings
        head = lambda: DINOProjectionHead(encoder.num_features, s.hidden_dim, s.bottleneck_dim, s.output_dim)  # noqa: E731
        self.head = head()
        # A fresh head loaded with the student's weights: the weight-normalised last layer cannot be deep-copied.
        self.teacher_head = head()
        self.teacher_head.load_state_dict(self.head.state_dict())
        deactivate_requires_grad(self.teacher_head)
        self.teacher_encoder = momentum_copy(encoder)
        self.loss = DINOLoss(s.output_dim, s.warmup_teacher_temp, s.teacher_temp, student_temp=s.student_temp, center_momentum=s.center_momentum)
        # The temperature of the next step, set after each optimizer step; a buffer, so a resumed run keeps it.
        self.register_buffer("teacher_temperature", torch.tensor(s.warmup_teacher_temp))

    def view_specs(self) -> list[ViewSpec]:
        s, views = self.settings, self.pretrain.views
        globals_ = [
            ViewSpec(self.image_size, dataclasses.replace(views, blur_prob=b, solarize_prob=p))
            for b, p in zip(s.global_blur_probs, s.global_solarize_probs)
        ]
        local = dataclasses.replace(
            views, crop_scale_min=s.local_crop_scale_min, crop_scale_max=s.local_crop_scale_max, blur_prob=s.local_blur_prob
        )
        return globals_ + [ViewSpec(local_side(s, self.image_size), local)] * s.local_crops

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.teacher_encoder), (self.head, self.teacher_head)]

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        super().after_optimizer_step(step, total_steps)
        s = self.settings
        warmup = s.teacher_temp_warmup_fraction * total_steps
        progress = min(1.0, step / warmup) if warmup > 0 else 1.0
        self.teacher_temperature.fill_(s.warmup_teacher_temp + progress * (s.teacher_temp - s.warmup_teacher_temp))

    def exported_encoder(self) -> nn.Module:
        return self.teacher_encoder

    def step(self, images: torch.Tensor) -> StepOutput:
        views = self.draw_views(images)
        global_views = torch.cat(views[:2])
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_encoder(global_views)).chunk(2)  # teacher: global crops only
        student = list(self.head(self.encoder(global_views)).chunk(2))
        if len(views) > 2:  # the local crops, one forward (one size)
            student += self.head(self.encoder(torch.cat(views[2:]))).chunk(len(views) - 2)
        loss = self.loss(list(teacher), student, teacher_temp=float(self.teacher_temperature))
        return StepOutput(loss, collapse_metrics(student[0]))

    @classmethod
    def check(cls, settings: DINOConfig, pretrain: PretrainConfig, image_size: int, key: str) -> None:
        s = settings
        if s.local_crops < 0:
            raise ConfigError(f"{key}.local_crops: must be 0 or more, got {s.local_crops}")
        side = local_side(s, image_size)
        if s.local_crops and side > image_size:
            raise ConfigError(
                f"{key}.local_crop_size: local crops of {side} px are larger than the global crops (image_size {image_size})"
            )
        if not 0 < s.local_crop_scale_min <= s.local_crop_scale_max <= 1:
            raise ConfigError(
                f"{key}.local_crop_scale_min/max: need 0 < min <= max <= 1, got {s.local_crop_scale_min}, {s.local_crop_scale_max}"
            )
        for name in ("global_blur_probs", "global_solarize_probs"):
            if len(getattr(s, name)) != 2:
                raise ConfigError(f"{key}.{name}: expected two probabilities (one per global crop), got {getattr(s, name)}")
