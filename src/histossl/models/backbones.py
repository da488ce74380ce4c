"""Encoders from torchvision behind one contract: ``encoder(x) -> (batch, encoder.num_features)``.

Initialisation: ``random``; ``imagenet`` (torchvision's published weights, read from the torch hub
cache); a ``.pth``/``.pt`` state dict (loaded with ``weights_only=True``, so a pickle cannot run
code) or a ``.safetensors`` file, which is also how one pretraining stage hands its encoder to the
next. Saved encoders use torchvision's parameter names, so ``resnet50().load_state_dict(sd,
strict=False)`` misses only ``fc.*``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

from histossl.config import BackboneConfig
from histossl.errors import ConfigError, HistosslError
from histossl.io import apply_umask
from histossl.registry import Registry

BACKBONES: Registry[str] = Registry("backbone")
for _name in ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "wide_resnet50_2"]:
    BACKBONES.register(_name)(_name)


class Encoder(nn.Module):
    """A torchvision ResNet without its classifier: images (B, 3, H, W) -> features (B, num_features)."""

    def __init__(self, name: str, stem: str = "standard") -> None:
        super().__init__()
        self.name = BACKBONES.get(name)
        self.stem = stem
        net = torchvision.models.get_model(name, weights=None)
        if stem == "small":
            # Small patches (e.g. 50 px IDC tiles): a 7x7/2 conv and a max-pool would leave a 2x2 map at
            # the last stage; a 3x3/1 conv without pooling keeps 4x the resolution (as in SimCLR's CIFAR stem).
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        self.num_features: int = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net
        self.channels_last = False  # set with trainer.channels_last: faster convolutions on GPUs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def torchvision_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters under torchvision's names (``conv1.weight``, ``layer1.0...``), no ``fc``."""
        state = self.net.state_dict()
        state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # torch.compile's wrapper
        return {k: v.detach().cpu().contiguous() for k, v in state.items() if not k.startswith("fc.")}

    def load_torchvision_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load torchvision-named weights; ``fc.*`` is ignored, anything else must match exactly."""
        own = self.net.state_dict()
        state = {k.removeprefix("module.").removeprefix("net."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        for key, value in state.items():
            if key not in own:
                raise HistosslError(f"{source}: unexpected key {key!r} for {self.name} ({self.stem} stem)")
            if own[key].shape != value.shape:
                raise HistosslError(
                    f"{source}: shape mismatch at {key!r}: file has {tuple(value.shape)}, "
                    f"{self.name} ({self.stem} stem) expects {tuple(own[key].shape)}"
                )
        missing = [k for k in own if k not in state and not k.startswith("fc.")]
        if missing:
            raise HistosslError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing) for {self.name}")
        self.net.load_state_dict(state, strict=False)


def imagenet_weights_path(name: str) -> Path:
    """Where torchvision's ImageNet weights for ``name`` live in the torch hub cache (``TORCH_HOME``)."""
    weights = torchvision.models.get_model_weights(BACKBONES.get(name)).IMAGENET1K_V1
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _imagenet_state(name: str) -> dict[str, torch.Tensor]:
    path = imagenet_weights_path(name)
    if not path.is_file():
        url = torchvision.models.get_model_weights(name).IMAGENET1K_V1.url
        if os.environ.get("HISTOSSL_OFFLINE") != "1":
            try:
                torch.hub.load_state_dict_from_url(url, progress=True, weights_only=True)
            except Exception as err:  # noqa: BLE001 - any network failure means: tell the user where to put the file
                raise HistosslError(
                    f"ImageNet weights for {name} not found at {path} and could not be downloaded "
                    f"({type(err).__name__}); download {url} and save it at that path"
                ) from None
        if not path.is_file():
            raise HistosslError(f"ImageNet weights for {name} not found at {path}; download {url} and save it there")
    return load_weights_file(path)


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or from ``.pth``/``.pt`` with ``weights_only=True`` (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise HistosslError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling refusals and corrupt files alike
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HistosslError(f"{path}: not a loadable weights file ({first[:200]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HistosslError(f"{path}: expected a state dict of tensors")
    return state


def build_encoder(cfg: BackboneConfig, init: str) -> Encoder:
    """An encoder initialised from ``random``, ``imagenet`` or a weights file."""
    encoder = Encoder(cfg.name, cfg.stem)
    if init == "random":
        return encoder
    if init == "imagenet":
        if cfg.stem != "standard":
            raise ConfigError("backbone.stem: ImageNet weights need the standard stem")
        encoder.load_torchvision_state_dict(_imagenet_state(cfg.name), f"ImageNet weights for {cfg.name}")
        return encoder
    if Path(init).suffix in (".pth", ".pt", ".safetensors"):
        encoder.load_torchvision_state_dict(load_weights_file(init), str(init))
        return encoder
    raise ConfigError(f"init {init!r}: expected random, imagenet or a .pth/.pt/.safetensors file")


def save_encoder(encoder: Encoder, path: Path) -> None:
    """Write the encoder as safetensors (torchvision names, no fc), under a temporary name first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(encoder.torchvision_state_dict(), str(tmp), metadata={"backbone": encoder.name, "stem": encoder.stem})
    apply_umask(tmp)  # safetensors creates the file 0600
    os.replace(tmp, path)
